"""The storage seam: the few operations the checkpoint layer needs from wherever bytes live.

A ``Storage`` is one directory-like location (a checkpoints root, or a checkpoint directory), named
by a path or a URL. Codecs never see it: they get the streams it opens. Two commit strategies are
specified (format_spec/README.md §12):

- ``rename``: files are written into a temporary sibling directory, synced, and the directory is
  renamed into place (POSIX file systems);
- ``manifest-last``: files are written into the step directory itself and ``manifest.json`` is
  written last; its arrival is the commit (object stores, which cannot rename a directory).
"""

from __future__ import annotations

import errno
from contextlib import AbstractContextManager
from typing import Literal, Protocol

from portable_ckpt.errors import CheckpointWriteError
from portable_ckpt.format import names

CommitStrategy = Literal["rename", "manifest-last"]
Kind = Literal["file", "dir", "link", "other"]


class ReadFile(Protocol):
    """One file opened for reading: sequential reads from a position, and positional reads."""

    size: int

    def read(self, n: int = -1, /) -> bytes: ...
    def readinto(self, view: memoryview | bytearray, /) -> int: ...
    def seek(self, pos: int, /) -> int: ...
    def pread_into(self, view: memoryview, offset: int) -> int: ...
    def mmap_path(self) -> str | None:
        """A path naming this very open file that ``torch.load(mmap=True)`` can map, or None."""
        ...

    def close(self) -> None: ...


class WriteFile(Protocol):
    """One new file being written: ``write`` may write fewer bytes than given and returns how many."""

    def write(self, data: bytes | memoryview, /) -> int: ...
    def close(self) -> None: ...


class CheckpointDir(Protocol):
    """A checkpoint directory held open: every file is opened from the same checkpoint, even if the
    name is renamed away or replaced (retention, overwrite) while it is read."""

    @property
    def location(self) -> str: ...

    def open(self, name: str) -> ReadFile:
        """Open a regular file of the checkpoint (``CheckpointNotFoundError`` if absent,
        ``CheckpointCorruptedError`` if it is a directory, pipe, device or dangling link)."""
        ...

    def kind(self, name: str) -> Kind | None: ...
    def close(self) -> None: ...


class Joined(Protocol):
    """Another process's staging area, joined to write files into it (the ranks of a sharded save)."""

    def create(self, name: str) -> WriteFile: ...
    def sync(self, name: str) -> None: ...


class Staging(Protocol):
    """A checkpoint being written. ``create`` each file, ``sync`` it, then ``commit`` (or ``abort``).

    ``area`` names the staging area for ``Storage.join`` in other processes of the same save."""

    @property
    def area(self) -> str: ...

    def create(self, name: str) -> WriteFile: ...
    def sync(self, name: str) -> None: ...
    def reuse(self, name: str, source: CheckpointDir, source_name: str, opened: ReadFile | None = None) -> bool:
        """Make the committed file ``source_name`` of ``source`` (a checkpoint of the same root) the file
        ``name`` of this checkpoint without passing its bytes through this process: a hard link, a
        server-side copy; only while it is still the file ``opened`` (whose bytes the caller checked).
        False when it cannot; the caller then writes the file (format_spec §21.3)."""
        ...

    def commit(self) -> str:
        """Make the checkpoint visible and point ``latest`` at the newest step; returns its location."""
        ...

    def abort(self) -> None: ...


class Storage(Protocol):
    """A directory-like location: a checkpoints root or a checkpoint directory."""

    @property
    def location(self) -> str: ...
    @property
    def commit_strategy(self) -> CommitStrategy: ...

    def child(self, name: str) -> Storage: ...
    def kind(self, name: str | None = None) -> Kind | None:
        """What ``name`` inside this location is (None: this location itself); None when absent."""
        ...

    def listdir(self) -> list[str]:
        """The names directly inside this location; empty when it does not exist."""
        ...

    def read_small(self, name: str, limit: int) -> bytes | None:
        """Up to ``limit`` bytes of a small regular file (``latest``); None when absent or not a file."""
        ...

    def write_small(self, name: str, data: bytes) -> None:
        """Replace a small file atomically (readers see the old or the new bytes)."""
        ...

    def make_root(self) -> None:
        """Create this location if it does not exist (object stores: nothing to do)."""
        ...

    def open_dir(self) -> CheckpointDir: ...
    def stage(self, name: str, *, overwrite: bool) -> Staging:
        """Begin writing the checkpoint directory ``name`` of this root (``CheckpointExistsError`` if it is
        committed and not ``overwrite``)."""
        ...

    def join(self, area: str) -> Joined:
        """Write into the staging area ``area`` of this root that another process opened (``Staging.area``)."""
        ...

    def remove(self, name: str) -> None:
        """Delete a checkpoint directory so that readers never see it half deleted."""
        ...

    def locked(self) -> AbstractContextManager[None]:
        """Hold this root's commit lock (writers only; readers never need it)."""
        ...

    def clean(self) -> list[str]:
        """Remove what dead writers left behind (temporaries, uncommitted steps); returns the names."""
        ...


def committed_steps(root: Storage) -> list[int]:
    """Steps with a committed checkpoint (a step directory holding a regular manifest.json), ascending."""
    steps = []
    for name in root.listdir():
        step = names.step_of(name)
        if step is not None and root.child(name).kind(names.MANIFEST) == "file":
            steps.append(step)
    return sorted(steps)


def point_latest(root: Storage) -> None:
    """Point ``latest`` at the newest committed step (no-op when there is none)."""
    steps = committed_steps(root)
    if steps:
        root.write_small(names.LATEST, (names.step_name(steps[-1]) + "\n").encode())


def write_error(e: OSError, what: str) -> CheckpointWriteError:
    """The OS error of a failed save as the library's own, saying that nothing was committed."""
    reason = errno.errorcode.get(e.errno or 0, "error")
    err = CheckpointWriteError(
        e.errno, f"{what}: {e.strerror or e} ({reason}); nothing was committed", file=e.filename or None
    )
    if e.filename is not None:
        err.filename = e.filename
    return err
