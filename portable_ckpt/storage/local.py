"""The checkpoints root on disk: step directories, the ``latest`` pointer, temporaries, the commit.

A checkpoint is committed by renaming a fully written and fsync'd temporary directory into place;
``latest`` is then replaced atomically. Both happen under an advisory lock on ``<root>/.lock`` so
that concurrent writers never interleave a commit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

from portable_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointWriteError,
)

STEP_DIR = re.compile(r"step-([0-9]{8,})")  # matched whole (fullmatch): "$" would accept a trailing newline
LATEST = "latest"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"  # a save in progress (or crashed)
TRASH_PREFIX = ".trash-"  # a checkpoint being deleted
REPLACED_PREFIX = ".replaced-"  # a complete checkpoint moved aside by an overwrite, until the new one is in place


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    m = STEP_DIR.fullmatch(name)
    return int(m.group(1)) if m else None


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Create ``path`` (never replacing a file) with ``data``, synced to disk unless ``sync=False``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


class FdWriter:
    """A writable binary stream on a raw descriptor: every write is one ``os.write`` (no buffering, no copy)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes | memoryview) -> int:
        return os.write(self.fd, data)

    def close(self) -> None:
        os.close(self.fd)


def create(path: Path) -> FdWriter:
    """A new file (never replacing one) for writing."""
    return FdWriter(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


def open_regular(path: Path, what: str, missing: str | None = None, *, dir_fd: int | None = None) -> io.BufferedReader:
    """Open a checkpoint file for reading; symlinks, directories, pipes and devices are refused.

    With ``dir_fd`` the file is opened by name inside that open directory (``path`` names it in
    messages). O_NONBLOCK keeps a named pipe from blocking the open; it changes nothing for regular files.
    """
    try:
        fd = os.open(
            path.name if dir_fd is not None else path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd
        )
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: {missing or what + ' is missing'}") from None
    except OSError as e:
        raise CheckpointCorruptedError(f"{path}: cannot open {what} ({e.strerror}); symlinks are refused") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointCorruptedError(f"{path}: {what} is not a regular file")
    return os.fdopen(fd, "rb")


def open_dir(path: Path) -> int:
    """A descriptor of a checkpoint directory: every file is then opened through it, so a reader
    sees one checkpoint even if the name is renamed away (retention, overwrite) while it reads."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such checkpoint directory (removed by retention?)") from None
    except OSError as e:
        raise CheckpointCorruptedError(f"{path}: cannot open the checkpoint directory ({e.strerror})") from None


def committed_steps(root: Path) -> list[int]:
    """Steps with a committed checkpoint (a step directory holding manifest.json), ascending."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    steps = []
    for name in names:
        step = step_of(name)
        if step is not None and (root / name / "manifest.json").is_file():
            steps.append(step)
    return sorted(steps)


def read_latest(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, if it is committed; else the highest committed step; else None."""
    try:
        with open_regular(root / LATEST, LATEST) as f:
            name = f.read(4096).decode("utf-8").strip()
    except (CheckpointError, OSError, UnicodeDecodeError):  # missing, not a file, unreadable: fall back to the scan
        name = ""
    if step_of(name) is not None and (root / name / "manifest.json").is_file():
        return root / name
    steps = committed_steps(root)
    return root / step_name(steps[-1]) if steps else None


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold the root's advisory commit lock (blocks until free)."""
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def new_temp_dir(root: Path, step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{step_name(step)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _replace_latest(root: Path) -> None:
    steps = committed_steps(root)
    if not steps:
        return
    tmp = root / f"{TMP_PREFIX}latest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        # not fsync'd on its own: the root's fsync after the rename covers it, and a reader that finds
        # `latest` empty or stale after a crash falls back to the highest committed step
        write_file(tmp, (step_name(steps[-1]) + "\n").encode(), sync=False)
        os.replace(tmp, root / LATEST)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def commit(tmp: Path, root: Path, step: int, *, overwrite: bool) -> Path:
    """Move the finished temporary directory into place and point ``latest`` at the newest step.

    If anything fails after the rename (syncing the root, replacing ``latest``), the commit is
    undone, so a save that raises has committed nothing.
    """
    final = root / step_name(step)
    fsync_path(tmp)
    with locked(root):
        trash = None
        if final.exists():
            if not overwrite:
                raise CheckpointExistsError(
                    f"{final}: a checkpoint for step {step} already exists; "
                    "pass overwrite=True to replace it, or save a new step"
                )
            trash = root / f"{REPLACED_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
        try:
            os.rename(tmp, final)
        except OSError:
            if trash is not None:
                os.rename(trash, final)
            raise
        try:
            _replace_latest(root)
            fsync_path(root)  # one sync makes both renames durable
        except OSError:
            _undo(root, final, trash)
            raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def _undo(root: Path, final: Path, trash: Path | None) -> None:
    """Best effort, on a failing disk: retire the new checkpoint, put back the one it replaced, repoint latest."""
    with contextlib.suppress(OSError):
        retired = root / f"{TRASH_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, retired)
        shutil.rmtree(retired, ignore_errors=True)
        if trash is not None:
            os.rename(trash, final)
        _replace_latest(root)
        fsync_path(root)


def delete(root: Path, step: int) -> None:
    """Remove a committed checkpoint: renamed away first so it vanishes atomically for readers."""
    final = root / step_name(step)
    trash = root / f"{TRASH_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(final, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def clean_temporaries(root: Path) -> list[str]:
    """Remove leftovers of crashed saves and deletions whose writer is gone; returns their names.

    A checkpoint an overwrite moved aside (``.replaced-step-N-...``) whose writer died before the new
    one took its place is put back, not deleted: it is complete, and it is the only copy of step N.
    """
    removed: list[str] = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return removed
    with locked(root):  # a live writer's commit holds the lock between its two renames
        for name in sorted(names):
            if not name.startswith((TMP_PREFIX, TRASH_PREFIX, REPLACED_PREFIX)) or _owner_alive(name):
                continue
            path = root / name
            m = re.fullmatch(rf"{re.escape(REPLACED_PREFIX)}(step-[0-9]+)-[0-9]+-[0-9a-f]+", name)
            if m is not None and not (root / m.group(1)).exists():
                with contextlib.suppress(OSError):  # a failing disk: leave it for the next opening
                    os.rename(path, root / m.group(1))
                    _replace_latest(root)
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            removed.append(name)
    return removed


def _owner_alive(name: str) -> bool:
    """Temporaries carry the writer's pid; one of a live process (or our own) may still be in use."""
    m = re.match(r"^\.(?:tmp|replaced)-(?:step-[0-9]+|latest)-([0-9]+)-", name)
    if m is None:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return True  # our own save (an async one) may be running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def as_write_error(e: OSError, what: str) -> CheckpointWriteError:
    reason = errno.errorcode.get(e.errno or 0, "error")
    err = CheckpointWriteError(e.errno, f"{what}: {e.strerror or e} ({reason}); nothing was committed")
    if e.filename is not None:
        err.filename = e.filename
    return err


def require_dir(path: Path) -> None:
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such checkpoint or directory")
