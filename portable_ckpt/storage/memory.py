"""An in-memory backend (``memory://...``): an object store in this process, and the test seam.

Objects are whole byte strings published when their writer closes (like an object store's PUT), so a
writer that dies mid-file leaves nothing. It can commit either way: ``manifest-last`` by default (what
an object store allows), or ``rename`` (a directory rename emulated under one lock). ``Faults`` makes
any operation fail on its n-th matching call, which is how the tests inject I/O errors without
patching ``os``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from portable_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointExistsError,
    CheckpointInputError,
    CheckpointNotFoundError,
)
from portable_ckpt.format import names
from portable_ckpt.storage.base import CheckpointDir, CommitStrategy, Kind, ReadFile, point_latest
from portable_ckpt.storage.local import owner_alive

SCHEME = "memory://"


@dataclass
class Faults:
    """Fail the ``nth`` call of ``op`` (create, write, sync, put, delete, move; "" for any) on a key matching
    ``match`` with ``OSError(errno)``. ``calls`` records every operation as "op key"."""

    op: str = ""
    match: str = ""
    nth: int = 0
    errno: int = errno.EIO
    calls: list[str] = field(default_factory=list)
    seen: int = 0
    failed: list[str] = field(default_factory=list)

    def check(self, op: str, key: str) -> None:
        self.calls.append(f"{op} {key}")
        if self.nth and (not self.op or self.op == op) and re.search(self.match, key):
            self.seen += 1
            if self.seen == self.nth:
                self.failed.append(f"{op} {key}")
                raise OSError(self.errno, f"injected {os.strerror(self.errno)}", key)


class Store:
    """The objects of every ``memory://`` location in this process: key (a path) -> bytes."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.lock = threading.RLock()
        self.faults = Faults()

    def put(self, key: str, data: bytes | bytearray, op: str = "put") -> None:
        with self.lock:
            self.faults.check(op, key)
            self.objects[key] = bytes(data)

    def delete(self, key: str) -> None:
        with self.lock:
            self.faults.check("delete", key)
            self.objects.pop(key, None)

    def keys_under(self, prefix: str) -> list[str]:
        with self.lock:
            return sorted(k for k in self.objects if k.startswith(prefix + "/"))

    def move_tree(self, src: str, dst: str) -> None:
        """Move every object under ``src`` to ``dst`` at once (the emulated directory rename)."""
        with self.lock:
            self.faults.check("move", f"{src} -> {dst}")
            if self.keys_under(dst):
                raise OSError(errno.ENOTEMPTY, "destination exists", dst)
            for key in self.keys_under(src):
                self.objects[dst + key[len(src) :]] = self.objects.pop(key)

    def delete_tree(self, prefix: str) -> None:
        for key in self.keys_under(prefix):
            self.delete(key)

    def reset(self) -> None:
        with self.lock:
            self.objects.clear()
            self.faults = Faults()


STORE = Store()


class MemoryFile:
    """A snapshot of one object, read like a file."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)
        self._data = data
        self.size = len(data)

    def read(self, n: int = -1, /) -> bytes:
        return self._buf.read(n)

    def readinto(self, view: memoryview | bytearray, /) -> int:
        return self._buf.readinto(view)

    def seek(self, pos: int, /) -> int:
        return self._buf.seek(pos)

    def pread_into(self, view: memoryview, offset: int) -> int:
        piece = self._data[offset : offset + len(view)]
        view[: len(piece)] = piece
        return len(piece)

    def mmap_path(self) -> str | None:
        return None

    def close(self) -> None:
        self._buf.close()


class MemoryWriter:
    """Buffers one object and publishes it when closed."""

    def __init__(self, store: Store, key: str) -> None:
        self.store, self.key = store, key
        self.buf = bytearray()

    def write(self, data: bytes | memoryview, /) -> int:
        self.store.faults.check("write", self.key)
        self.buf += data
        return len(data)

    def close(self) -> None:
        self.store.put(self.key, self.buf, op="create")


class MemoryDir:
    """The objects of one checkpoint directory as they were when it was opened."""

    def __init__(self, store: Store, prefix: str) -> None:
        self.store, self.prefix = store, prefix
        self.location = SCHEME + prefix.lstrip("/")
        with store.lock:
            self.objects = {k[len(prefix) + 1 :]: store.objects[k] for k in store.keys_under(prefix)}
        if not self.objects:
            raise CheckpointNotFoundError(
                f"{self.location}: no such checkpoint directory (removed by retention?)", file=self.location
            )

    def open(self, name: str) -> MemoryFile:
        data = self.objects.get(name)
        if data is None:
            kind = self.kind(name)
            if kind is None:
                raise CheckpointNotFoundError(
                    f"{self.location}/{name}: {name} is missing", file=f"{self.location}/{name}"
                )
            raise CheckpointCorruptedError(
                f"{self.location}/{name}: {name} is not a regular file", file=f"{self.location}/{name}"
            )
        return MemoryFile(data)

    def kind(self, name: str) -> Kind | None:
        if name in self.objects:
            return "file"
        return "dir" if any(k.startswith(name + "/") for k in self.objects) else None

    def close(self) -> None:
        self.objects = {}


@dataclass(frozen=True, slots=True)
class MemoryStorage:
    """A location in ``STORE``; ``commit_strategy`` is ``manifest-last`` unless asked otherwise."""

    prefix: str
    commit_strategy: CommitStrategy = "manifest-last"
    store: Store = STORE
    accepts_scheme: ClassVar[str] = SCHEME

    @staticmethod
    def accepts(location: str) -> bool:
        return location.startswith(SCHEME)

    @classmethod
    def from_location(cls, location: str, *, commit: CommitStrategy = "manifest-last") -> MemoryStorage:
        return cls("/" + location.removeprefix(SCHEME).strip("/"), commit)

    @property
    def location(self) -> str:
        return SCHEME + self.prefix.lstrip("/")

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def child(self, name: str) -> MemoryStorage:
        return MemoryStorage(self._key(name), self.commit_strategy, self.store)

    def kind(self, name: str | None = None) -> Kind | None:
        key = self._key(name) if name else self.prefix
        with self.store.lock:
            if key in self.store.objects:
                return "file"
            return "dir" if self.store.keys_under(key) else None

    def listdir(self) -> list[str]:
        start = len(self.prefix) + 1
        return sorted({k[start:].split("/", 1)[0] for k in self.store.keys_under(self.prefix)})

    def read_small(self, name: str, limit: int) -> bytes | None:
        data = self.store.objects.get(self._key(name))
        return None if data is None else data[:limit]

    def write_small(self, name: str, data: bytes) -> None:
        self.store.put(self._key(name), data)

    def make_root(self) -> None:
        pass  # prefixes exist as soon as an object is under them

    def open_dir(self) -> MemoryDir:
        return MemoryDir(self.store, self.prefix)

    def stage(self, name: str, *, overwrite: bool) -> MemoryStaging:
        return MemoryStaging(self, name, overwrite=overwrite)

    def join(self, area: str) -> MemoryJoined:
        if not area.startswith(self.prefix + "/") or "/" in area[len(self.prefix) + 1 :]:
            raise CheckpointInputError(f"{SCHEME}{area.lstrip('/')}: not a staging area of {self.location}")
        return MemoryJoined(self.store, area)

    def remove(self, name: str) -> None:
        """``manifest-last``: the manifest goes first, so a half-deleted checkpoint is never committed."""
        if self.commit_strategy == "manifest-last":
            self.store.delete(self._key(f"{name}/{names.MANIFEST}"))
            self.store.delete_tree(self._key(name))
            return
        trash = f"{names.TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        self.store.move_tree(self._key(name), self._key(trash))
        self.store.delete_tree(self._key(trash))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with self.store.lock:
            yield

    def pending_writer(self, name: str) -> bool:
        """A live writer's marker names this step directory."""
        marker = f"{names.PENDING_PREFIX}{name}-"
        return any(n.startswith(marker) and owner_alive(n) for n in self.listdir())

    def clean(self) -> list[str]:
        removed = []
        with self.locked():
            for name in self.listdir():
                step = names.step_of(name)
                stale_step = (
                    step is not None
                    and self.child(name).kind(names.MANIFEST) != "file"
                    and not self.pending_writer(name)
                )
                temporary = name.startswith((names.TMP_PREFIX, names.TRASH_PREFIX, names.PENDING_PREFIX))
                if stale_step or (temporary and not owner_alive(name)):
                    self.store.delete_tree(self._key(name))
                    self.store.delete(self._key(name))
                    removed.append(name)
        return removed


@dataclass(frozen=True, slots=True)
class MemoryJoined:
    """Objects written under another writer's staging prefix."""

    store: Store
    dir: str

    def create(self, name: str) -> MemoryWriter:
        return MemoryWriter(self.store, f"{self.dir}/{name}")

    def sync(self, name: str) -> None:
        self.store.faults.check("sync", f"{self.dir}/{name}")


class MemoryStaging:
    """``rename``: a temporary prefix moved into place. ``manifest-last``: the step directory itself,
    marked by a ``.pending-`` object until the manifest has arrived."""

    def __init__(self, root: MemoryStorage, name: str, *, overwrite: bool) -> None:
        self.root, self.name, self.overwrite = root, name, overwrite
        tag = f"{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.done = False
        if root.commit_strategy == "rename":
            self.dir = root._key(f"{names.TMP_PREFIX}{tag}")
            self.marker = None
            return
        if overwrite:
            raise CheckpointInputError(
                f"{root.location}/{name}: overwrite=True needs a rename commit; an object store cannot replace a "
                "committed checkpoint atomically. Save a new step, or delete the old one first",
                file=f"{root.location}/{name}",
            )
        with root.locked():
            if root.child(name).kind(names.MANIFEST) == "file":
                raise _exists(root, name)
            if root.pending_writer(name):
                raise CheckpointExistsError(
                    f"{root.location}/{name}: another writer is saving this step", file=f"{root.location}/{name}"
                )
            root.store.delete_tree(root._key(name))  # a dead writer's uncommitted leftovers
            self.marker = root._key(f"{names.PENDING_PREFIX}{tag}")
            root.store.put(self.marker, b"")
        self.dir = root._key(name)

    @property
    def area(self) -> str:
        return self.dir

    def create(self, name: str) -> MemoryWriter:
        if self.done:
            raise RuntimeError("this staging area was already committed or aborted")
        return MemoryWriter(self.root.store, f"{self.dir}/{name}")

    def sync(self, name: str) -> None:
        self.root.store.faults.check("sync", f"{self.dir}/{name}")

    def reuse(self, name: str, source: CheckpointDir, source_name: str, opened: ReadFile | None = None) -> bool:
        """The source's object under a second key, as a server-side copy does (no bytes through the writer),
        only while it is the object ``opened`` read."""
        if self.done:
            raise RuntimeError("this staging area was already committed or aborted")
        if not isinstance(source, MemoryDir) or source.store is not self.root.store:
            return False
        key = f"{source.prefix}/{source_name}"
        with self.root.store.lock:
            data = self.root.store.objects.get(key)
        if data is None or data is not source.objects.get(source_name):  # removed or replaced since opened
            return False
        if isinstance(opened, MemoryFile) and opened._data is not data:
            return False
        try:
            self.root.store.put(f"{self.dir}/{name}", data, op="copy")
        except OSError:
            return False
        return True

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        with contextlib.suppress(OSError):
            if self.marker is not None:
                self.root.store.delete(f"{self.dir}/{names.MANIFEST}")
            self.root.store.delete_tree(self.dir)
            if self.marker is not None:
                self.root.store.delete(self.marker)

    def commit(self) -> str:
        root, final = self.root, self.root._key(self.name)
        with root.locked():
            if self.marker is not None:  # the manifest has arrived: committed; then latest
                try:
                    point_latest(root)
                except OSError:  # undone: the manifest goes first, then the rest (abort), latest repointed
                    self.abort()
                    with contextlib.suppress(OSError):
                        point_latest(root)
                    raise
                self.done = True
                with contextlib.suppress(OSError):
                    root.store.delete(self.marker)
                return root.child(self.name).location
            moved = None
            if root.store.keys_under(final):
                if not self.overwrite:
                    raise _exists(root, self.name)
                moved = root._key(f"{names.REPLACED_PREFIX}{self.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                root.store.move_tree(final, moved)
            try:
                root.store.move_tree(self.dir, final)
            except OSError:
                if moved is not None:
                    root.store.move_tree(moved, final)
                raise
            self.done = True
            try:
                point_latest(root)
            except OSError:
                with contextlib.suppress(OSError):
                    root.store.delete_tree(final)
                    if moved is not None:
                        root.store.move_tree(moved, final)
                    point_latest(root)
                raise
            if moved is not None:
                root.store.delete_tree(moved)
        return root.child(self.name).location


def _exists(root: MemoryStorage, name: str) -> CheckpointExistsError:
    return CheckpointExistsError(
        f"{root.location}/{name}: a checkpoint for step {names.step_of(name)} already exists; "
        "pass overwrite=True to replace it, or save a new step",
        file=f"{root.location}/{name}",
    )
