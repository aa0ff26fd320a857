"""The local file system backend: the ``rename`` commit strategy.

A checkpoint is committed by renaming a fully written and fsync'd temporary directory into place;
``latest`` is then replaced atomically. Both happen under an advisory lock on ``<root>/.lock`` so
that concurrent writers never interleave a commit. Readers hold the checkpoint directory open and
open every file through its descriptor; they never take the lock and never need write access.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from portable_ckpt.errors import CheckpointCorruptedError, CheckpointExistsError, CheckpointNotFoundError
from portable_ckpt.format import names
from portable_ckpt.storage.base import CheckpointDir, CommitStrategy, Kind, ReadFile, point_latest

_CHUNK = 1 << 30  # a single read or write moves at most ~2 GiB on Linux


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

    def write(self, data: bytes | memoryview, /) -> int:
        return os.write(self.fd, data)

    def close(self) -> None:
        os.close(self.fd)


class LocalFile:
    """A regular file opened for reading through its checkpoint directory's descriptor."""

    def __init__(self, f: io.BufferedReader) -> None:
        self._f = f
        self.size = os.fstat(f.fileno()).st_size

    def read(self, n: int = -1, /) -> bytes:
        return self._f.read(n)

    def readinto(self, view: memoryview | bytearray, /) -> int:
        return self._f.readinto(view)

    def seek(self, pos: int, /) -> int:
        return self._f.seek(pos)

    def pread_into(self, view: memoryview, offset: int) -> int:
        return os.preadv(self._f.fileno(), [view], offset)

    def fileno(self) -> int:
        return self._f.fileno()

    def mmap_path(self) -> str | None:
        proc = f"/proc/self/fd/{self._f.fileno()}"
        return proc if os.path.exists(proc) else None

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> LocalFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kind(mode: int) -> Kind:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "link" if stat.S_ISLNK(mode) else "other"


def open_regular(path: Path, what: str, missing: str | None = None, *, dir_fd: int | None = None) -> io.BufferedReader:
    """Open a checkpoint file for reading; it must be (or be a symlink to) a regular file: directories,
    pipes, devices and dangling links are refused. Reads follow links (a copy made of links to blobs reads
    like the original: every byte is checked against the manifest); writers never create them.

    With ``dir_fd`` the file is opened by name inside that open directory (``path`` names it in
    messages). O_NONBLOCK keeps a named pipe from blocking the open; it changes nothing for regular files.
    """
    try:
        fd = os.open(path.name if dir_fd is not None else path, os.O_RDONLY | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: {missing or what + ' is missing'}", file=path) from None
    except OSError as e:
        raise CheckpointCorruptedError(f"{path}: cannot open {what} ({e.strerror})", file=path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointCorruptedError(f"{path}: {what} is not a regular file", file=path)
    return os.fdopen(fd, "rb")


class LocalDir:
    """A checkpoint directory held open by descriptor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"{path}: no such checkpoint directory (removed by retention?)", file=path
            ) from None
        except OSError as e:
            raise CheckpointCorruptedError(
                f"{path}: cannot open the checkpoint directory ({e.strerror})", file=path
            ) from None

    def open(self, name: str) -> LocalFile:
        return LocalFile(open_regular(self.path / name, name, dir_fd=self.fd))

    def kind(self, name: str) -> Kind | None:
        try:
            return _kind(os.stat(name, dir_fd=self.fd).st_mode)  # what a read would open: links followed
        except FileNotFoundError:
            return "link" if os.path.lexists(os.path.join(self.location, name)) else None

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True, slots=True)
class LocalStorage:
    """A directory on the local file system."""

    path: Path
    commit_strategy: ClassVar[CommitStrategy] = "rename"

    @staticmethod
    def accepts(location: str) -> bool:
        return "://" not in location or location.startswith("file://")

    @classmethod
    def from_location(cls, location: str) -> LocalStorage:
        return cls(Path(location.removeprefix("file://")))

    @property
    def location(self) -> str:
        return str(self.path)

    def child(self, name: str) -> LocalStorage:
        return LocalStorage(self.path / name)

    def kind(self, name: str | None = None) -> Kind | None:
        """What a read would open (links followed); a dangling link is ``"link"``."""
        path = self.path / name if name else self.path
        try:
            return _kind(os.stat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return "link" if name and os.path.islink(path) else None

    def listdir(self) -> list[str]:
        try:
            return os.listdir(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def read_small(self, name: str, limit: int) -> bytes | None:
        try:
            with open_regular(self.path / name, name) as f:
                return f.read(limit)
        except (CheckpointNotFoundError, CheckpointCorruptedError, OSError):
            return None

    def write_small(self, name: str, data: bytes) -> None:
        # not fsync'd on its own: the caller syncs the directory, and readers tolerate a stale `latest`
        tmp = self.path / f"{names.TMP_PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            write_file(tmp, data, sync=False)
            os.replace(tmp, self.path / name)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def make_root(self) -> None:
        if not self.path.is_dir():
            self.path.mkdir(parents=True, exist_ok=True)

    def open_dir(self) -> LocalDir:
        return LocalDir(self.path)

    def stage(self, name: str, *, overwrite: bool) -> LocalStaging:
        return LocalStaging(self, name, overwrite=overwrite)

    def join(self, area: str) -> LocalJoined:
        if not area.startswith(names.TMP_PREFIX) or "/" in area or not (self.path / area).is_dir():
            raise CheckpointNotFoundError(
                f"{self.path / area}: no staging directory of a save in progress under {self.path}",
                file=self.path / area,
            )
        return LocalJoined(self.path / area)

    def remove(self, name: str) -> None:
        """Renamed away first, so the checkpoint vanishes at once for readers, then deleted."""
        trash = self.path / f"{names.TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path / name, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the root's advisory commit lock (blocks until free)."""
        fd = os.open(self.path / names.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def clean(self) -> list[str]:
        """Remove leftovers of crashed saves and deletions whose writer is gone; returns their names.

        A checkpoint an overwrite moved aside (``.replaced-step-N-...``) whose writer died before the new
        one took its place is put back, not deleted: it is complete, and it is the only copy of step N.
        """
        removed: list[str] = []
        prefixes = (names.TMP_PREFIX, names.TRASH_PREFIX, names.REPLACED_PREFIX)
        candidates = sorted(n for n in self.listdir() if n.startswith(prefixes))
        if not candidates or not os.access(self.path, os.W_OK):
            return removed  # nothing to do, or a read-only copy: reading never needs write access
        with self.locked():  # a live writer's commit holds the lock between its two renames
            for name in candidates:
                if owner_alive(name):
                    continue
                path = self.path / name
                m = re.fullmatch(rf"{re.escape(names.REPLACED_PREFIX)}(step-[0-9]+)-[0-9]+-[0-9a-f]+", name)
                if m is not None and not (self.path / m.group(1)).exists():
                    with contextlib.suppress(OSError):  # a failing disk: leave it for the next opening
                        os.rename(path, self.path / m.group(1))
                        point_latest(self)
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                removed.append(name)
        return removed


@dataclass(frozen=True, slots=True)
class LocalJoined:
    """Files created in another process's temporary directory (the coordinator renames it on commit)."""

    dir: Path

    def create(self, name: str) -> FdWriter:
        return FdWriter(os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))

    def sync(self, name: str) -> None:
        fsync_path(self.dir / name)


class LocalStaging:
    """A temporary sibling directory ``.tmp-<name>-<pid>-<random>``, renamed into place on commit."""

    def __init__(self, root: LocalStorage, name: str, *, overwrite: bool) -> None:
        self.root = root
        self.name = name
        self.overwrite = overwrite
        if not overwrite and (root.path / name).exists():
            raise _exists(root.path / name, name)
        root.path.mkdir(parents=True, exist_ok=True)
        self.tmp: Path | None = root.path / f"{names.TMP_PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()

    def _dir(self) -> Path:
        if self.tmp is None:
            raise RuntimeError("this staging area was already committed or aborted")
        return self.tmp

    @property
    def area(self) -> str:
        return self._dir().name

    def create(self, name: str) -> FdWriter:
        return FdWriter(os.open(self._dir() / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))

    def sync(self, name: str) -> None:
        fsync_path(self._dir() / name)

    def reuse(self, name: str, source: CheckpointDir, source_name: str, opened: ReadFile | None = None) -> bool:
        """A hard link to ``source``'s regular file (never a symlink), checked to be the very file ``opened``
        (the one whose bytes were checked) when given; False where none can be made (another backend, another
        file system, the file removed or replaced meanwhile). The directory's sync at commit makes the new
        entry durable; the file's data were synced when the source was written."""
        if not isinstance(source, LocalDir):
            return False
        target = self._dir() / name
        try:
            before = os.stat(source_name, dir_fd=source.fd, follow_symlinks=False)
            if not stat.S_ISREG(before.st_mode):
                return False
            if isinstance(opened, LocalFile):
                held = os.fstat(opened.fileno())
                if (held.st_ino, held.st_dev) != (before.st_ino, before.st_dev):
                    return False
            os.link(source_name, target, src_dir_fd=source.fd, follow_symlinks=False)
        except OSError:
            return False
        try:
            after = os.stat(target, follow_symlinks=False)
        except OSError:
            after = None
        if after is None or (after.st_ino, after.st_dev) != (before.st_ino, before.st_dev):
            with contextlib.suppress(OSError):
                target.unlink()
            return False
        return True

    def abort(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def commit(self) -> str:
        """Rename the finished directory into place and point ``latest`` at the newest step.

        If anything fails after the rename (syncing the root, replacing ``latest``), the commit is
        undone, so a save that raises has committed nothing.
        """
        tmp, root = self._dir(), self.root.path
        final = root / self.name
        fsync_path(tmp)
        with self.root.locked():
            moved = None
            if final.exists():
                if not self.overwrite:
                    raise _exists(final, self.name)
                moved = root / f"{names.REPLACED_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(final, moved)
            try:
                os.rename(tmp, final)
            except OSError:
                if moved is not None:
                    os.rename(moved, final)
                raise
            self.tmp = None
            try:
                point_latest(self.root)
                fsync_path(root)  # one sync makes both renames durable
            except OSError:
                self._undo(final, moved)
                raise
        if moved is not None:
            shutil.rmtree(moved, ignore_errors=True)
        return str(final)

    def _undo(self, final: Path, moved: Path | None) -> None:
        """Best effort, on a failing disk: retire the new checkpoint, put back the one it replaced, repoint latest."""
        with contextlib.suppress(OSError):
            retired = self.root.path / f"{names.TRASH_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, retired)
            shutil.rmtree(retired, ignore_errors=True)
            if moved is not None:
                os.rename(moved, final)
            point_latest(self.root)
            fsync_path(self.root.path)


def _exists(path: Path, name: str) -> CheckpointExistsError:
    return CheckpointExistsError(
        f"{path}: a checkpoint for step {names.step_of(name)} already exists; "
        "pass overwrite=True to replace it, or save a new step",
        file=path,
    )


def owner_alive(name: str) -> bool:
    """Temporaries carry the writer's pid; one of a live process (or our own) may still be in use."""
    m = re.match(r"^\.(?:tmp|replaced|pending)-(?:step-[0-9]+|latest)-([0-9]+)-", name)
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
