"""Object stores through fsspec (``s3://``, and ``gs://``, ``az://`` ... the same way): ``manifest-last``.

Every object is written whole: a ``WriteFile`` streams into fsspec's buffered writer, which uploads one
part at a time (bounded memory) and makes the object visible only when ``close()`` completes it. Reads
are ranged GETs (``cat_file`` with start/end), so a lazy tensor read fetches that tensor's bytes only.

Storage options (endpoint, credentials, anything the fsspec implementation takes) come from fsspec's
own configuration (``fsspec.config.conf["s3"]``, ``FSSPEC_S3_*`` environment variables), or from
``FsspecStorage.from_location(url, storage_options={...})``, a ``Storage`` that every API accepts in
place of the URL. The file system opened with explicit options serves every later URL of the same
bucket in this process, because the layers above re-open locations by URL (a checkpoint of a root).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

from portable_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointExistsError,
    CheckpointInputError,
    CheckpointNotFoundError,
)
from portable_ckpt.format import names
from portable_ckpt.storage.base import CommitStrategy, Kind, point_latest
from portable_ckpt.storage.local import owner_alive

# schemes with their own backends; fsspec knows them too, but they are not object stores for us
OWN_SCHEMES = frozenset({"file", "local", "memory"})

# object-store schemes accepted even without fsspec installed, and how to get their implementation
EXTRAS: dict[str, str] = {
    "s3": "pip install 'portable-ckpt[s3]'",
    "s3a": "pip install 'portable-ckpt[s3]'",
    "gs": "pip install gcsfs",
    "gcs": "pip install gcsfs",
    "az": "pip install adlfs",
    "abfs": "pip install adlfs",
}

# errors an implementation raises that are not OSError (module, class), per scheme: converted to OSError
FOREIGN_ERRORS: dict[str, tuple[str, str]] = {
    "s3": ("botocore.exceptions", "BotoCoreError"),
    "s3a": ("botocore.exceptions", "BotoCoreError"),
    "gs": ("google.auth.exceptions", "GoogleAuthError"),
    "gcs": ("google.auth.exceptions", "GoogleAuthError"),
    "az": ("azure.core.exceptions", "AzureError"),
    "abfs": ("azure.core.exceptions", "AzureError"),
}

# what to check, by the name of the foreign error's class
HINTS: dict[str, tuple[int, str]] = {
    "NoCredentialsError": (errno.EACCES, "no credentials found: pass key/secret in storage_options or set them up"),
    "PartialCredentialsError": (errno.EACCES, "incomplete credentials: check key and secret"),
    "EndpointConnectionError": (errno.ECONNREFUSED, "cannot reach the endpoint: check endpoint_url and the network"),
    "ConnectTimeoutError": (errno.ETIMEDOUT, "the endpoint does not answer: check endpoint_url and the network"),
    "ReadTimeoutError": (errno.ETIMEDOUT, "the endpoint stopped answering"),
}

# schemes whose implementation writes create-only (``open(..., "xb")``: S3's If-None-Match: *), used for the
# manifest so that of two writers racing for one step at most one commits (§11.2, two writers of one step)
CREATE_ONLY = frozenset({"s3", "s3a"})

BLOCK_SIZE = 16 << 20  # one buffered part of a multipart upload (S3 needs >= 5 MiB but for the last)
READAHEAD = 256 << 10  # a sequential read fetches this much more, so small reads are not one GET each
MAX_GET = 64 << 20  # the most one ranged GET returns (bounds the extra copy of readinto)

# (scheme, bucket) -> the file system opened with explicit storage options for it
_OPENED: dict[tuple[str, str], Any] = {}


def scheme_of(location: str) -> str:
    return location.split("://", 1)[0].lower() if "://" in location else ""


def _foreign(scheme: str) -> tuple[type[BaseException], ...]:
    module, cls = FOREIGN_ERRORS.get(scheme, ("", ""))
    if not module:
        return ()
    try:
        return (getattr(importlib.import_module(module), cls),)
    except (ImportError, AttributeError):
        return ()


def _os_error(e: BaseException, url: str) -> OSError:
    code, hint = HINTS.get(type(e).__name__, (errno.EIO, "check the endpoint, the credentials and the network"))
    return OSError(code, f"{e} ({hint})", url)


@dataclasses.dataclass(frozen=True)
class FsspecStorage:
    """A location on an fsspec file system: ``fs`` with ``path`` (no scheme), shown as ``scheme://path``."""

    fs: Any
    path: str
    scheme: str = "s3"
    block_size: int = BLOCK_SIZE
    commit_strategy: CommitStrategy = "manifest-last"
    create_only: bool = True  # write the manifest create-only where the scheme can (False: a store without it)

    @staticmethod
    def accepts(location: str) -> bool:
        scheme = scheme_of(location)
        if not scheme or scheme in OWN_SCHEMES:
            return False
        if scheme in EXTRAS:
            return True
        try:
            from fsspec.registry import known_implementations, registry
        except ImportError:
            return False
        return scheme in known_implementations or scheme in registry

    @classmethod
    def from_location(
        cls,
        location: str,
        *,
        storage_options: dict[str, Any] | None = None,
        block_size: int = BLOCK_SIZE,
        create_only: bool = True,
    ) -> FsspecStorage:
        """The storage a URL names. ``storage_options`` go to the fsspec implementation (``endpoint_url``,
        ``key``, ``secret``, ...) and serve later URLs of the same bucket too. ``block_size``: the part
        buffered per file being written; ``create_only=False`` for an S3 store without conditional writes.

        >>> FsspecStorage.from_location("s3://bucket/run", storage_options={"anon": True})  # doctest: +SKIP
        """
        scheme = scheme_of(location)
        try:
            import fsspec
            from fsspec.core import url_to_fs

            fsspec.get_filesystem_class(scheme)
        except ImportError as e:
            remedy = EXTRAS.get(scheme, f"install the fsspec implementation for {scheme}://")
            raise CheckpointInputError(
                f"{location}: {scheme}:// URLs need an fsspec implementation that is not installed ({e}); {remedy}"
            ) from None
        except ValueError as e:  # fsspec knows no such protocol
            raise CheckpointInputError(f"{location}: {e}") from None
        bucket = location.split("://", 1)[1].strip("/").split("/", 1)[0]
        fs = _OPENED.get((scheme, bucket)) if storage_options is None else None
        if fs is None:
            options = dict(storage_options or {})  # fsspec adds what its configuration says for the scheme
            options.setdefault("use_listings_cache", False)  # another process may have written since
            fs, _ = url_to_fs(location, **options)
            if storage_options is not None:
                _OPENED[(scheme, bucket)] = fs
        return cls(fs, fs._strip_protocol(location).rstrip("/"), scheme, block_size, create_only=create_only)

    @property
    def location(self) -> str:
        return self.key_url(self.path)

    def key_url(self, key: str) -> str:
        return key if "://" in key else f"{self.scheme}://{key}"

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    def url(self, name: str | None = None) -> str:
        return self.location if name is None else f"{self.location}/{name}"

    def _key(self, name: str) -> str:
        return f"{self.path}/{name}"

    @contextlib.contextmanager
    def errors(self, url: str) -> Iterator[None]:
        """The implementation's own errors (botocore's, ...) as OSError naming ``url``."""
        try:
            yield
        except _foreign(self.scheme) as e:
            raise _os_error(e, url) from e
        except OSError as e:
            if e.filename is not None or type(e).__module__ != "builtins":
                raise
            # the implementation's translation of a server error (s3fs: "[Errno 121] InternalError") names no
            # object; the same type, with the URL
            raise type(e)(e.errno, e.strerror or str(e), url) from e

    @contextlib.contextmanager
    def reading(self, url: str) -> Iterator[None]:
        """Access denied while reading is named with what to check (writes keep the OSError, which a save
        reports as CheckpointWriteError); other errors pass as OSError naming ``url``."""
        try:
            with self.errors(url):
                yield
        except PermissionError as e:
            raise CheckpointNotFoundError(
                f"{url}: access denied ({e}); check the credentials (key, secret, profile) and the bucket's "
                "permissions",
                file=url,
            ) from e

    def child(self, name: str) -> FsspecStorage:
        return dataclasses.replace(self, path=self._key(name))

    def info(self, key: str) -> dict[str, Any] | None:
        with self.errors(self.key_url(key)):
            try:
                return self.fs.info(key, refresh=True)
            except FileNotFoundError:
                return None

    def kind(self, name: str | None = None) -> Kind | None:
        key = self._key(name) if name else self.path
        with self.reading(self.url(name)):
            found = self.info(key)
            if found is None and name is None:
                self.check_bucket()
        if found is None:
            return None
        return "file" if found.get("type") == "file" else "dir"

    def check_bucket(self) -> None:
        """A missing bucket is named as such (not as a missing checkpoint)."""
        if self.info(self.bucket) is None:
            raise CheckpointNotFoundError(
                f"{self.location}: the bucket {self.bucket!r} does not exist or these credentials cannot see it; "
                "check the URL, endpoint_url and the credentials",
                file=self.location,
            )

    def keys_under(self, key: str) -> dict[str, int]:
        """Every object below ``key`` (a prefix, as a directory): relative name -> size."""
        with self.errors(self.key_url(key)):
            try:
                found = self.fs.find(key, detail=True)
            except FileNotFoundError:
                return {}
        start = len(key) + 1
        return {k[start:]: int(v.get("size") or 0) for k, v in found.items() if k.startswith(key + "/")}

    def listdir(self) -> list[str]:
        try:
            with self.reading(self.location):
                found = self.fs.ls(self.path, detail=False, refresh=True)
        except CheckpointNotFoundError:
            raise
        except FileNotFoundError:
            return []
        start = len(self.path) + 1
        return sorted({k[start:].split("/", 1)[0] for k in found if k.startswith(self.path + "/")})

    def read_small(self, name: str, limit: int) -> bytes | None:
        with self.errors(self.url(name)):
            try:
                return self.fs.cat_file(self._key(name), start=0, end=limit)
            except (FileNotFoundError, IsADirectoryError):
                return None

    def write_small(self, name: str, data: bytes) -> None:
        with self.errors(self.url(name)):
            self.fs.pipe_file(self._key(name), data)  # one PUT: readers see the old or the new object

    def make_root(self) -> None:
        self.check_bucket()  # prefixes need no creating; the bucket must exist

    def open_dir(self) -> FsspecDir:
        return FsspecDir(self)

    def stage(self, name: str, *, overwrite: bool) -> FsspecStaging:
        return FsspecStaging(self, name, overwrite=overwrite)

    def delete(self, key: str) -> None:
        with self.errors(self.key_url(key)), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(key)

    def delete_tree(self, key: str) -> None:
        keys = [f"{key}/{n}" for n in self.keys_under(key)]
        if keys:
            with self.errors(self.key_url(key)), contextlib.suppress(FileNotFoundError):
                self.fs.rm(keys)

    def remove(self, name: str) -> None:
        """The manifest goes first, so a half-deleted checkpoint is never a committed one (§11.2)."""
        self.delete(self._key(f"{name}/{names.MANIFEST}"))
        self.delete_tree(self._key(name))

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """No lock: an object store has none across hosts, and manifest-last needs none for a single
        writer per root (§11.2); two writers of one step are told apart by their markers and checksums."""
        return contextlib.nullcontext()

    def pending_writer(self, name: str) -> bool:
        marker = f"{names.PENDING_PREFIX}{name}-"
        return any(n.startswith(marker) and owner_alive(n) for n in self.listdir())

    def clean(self) -> list[str]:
        removed = []
        for name in self.listdir():
            step = names.step_of(name)
            stale_step = (
                step is not None and self.child(name).kind(names.MANIFEST) != "file" and not self.pending_writer(name)
            )
            temporary = name.startswith((names.TMP_PREFIX, names.TRASH_PREFIX, names.PENDING_PREFIX))
            if stale_step or (temporary and not owner_alive(name)):
                self.delete_tree(self._key(name))
                self.delete(self._key(name))
                removed.append(name)
        return removed


class FsspecFile:
    """One object read by ranged GETs; sequential reads fetch ``READAHEAD`` more than asked."""

    def __init__(self, storage: FsspecStorage, key: str, size: int) -> None:
        self.storage, self.key, self.size = storage, key, size
        self.url = storage.key_url(key)
        self.pos = 0
        self.buf = b""
        self.buf_start = 0

    def fetch(self, start: int, end: int) -> bytes:
        end = min(end, self.size, start + MAX_GET)
        if start >= end:
            return b""
        try:
            with self.storage.errors(self.url):
                return self.storage.fs.cat_file(self.key, start=start, end=end)
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"{self.url}: the object was deleted while the checkpoint was read (retention?)", file=self.url
            ) from None

    def read(self, n: int = -1, /) -> bytes:
        want = self.size - self.pos if n < 0 else min(n, self.size - self.pos)
        out = bytearray(want)
        got = 0
        while got < want:
            k = self.readinto(memoryview(out)[got:])
            if not k:
                break
            got += k
        return bytes(out[:got])

    def readinto(self, view: memoryview | bytearray, /) -> int:
        view = memoryview(view).cast("B")
        offset = self.pos - self.buf_start
        if not 0 <= offset < len(self.buf):
            if len(view) >= READAHEAD:  # large: straight from the store
                n = self.pread_into(view, self.pos)
                self.pos += n
                return n
            self.buf, self.buf_start, offset = self.fetch(self.pos, self.pos + len(view) + READAHEAD), self.pos, 0
        piece = self.buf[offset : offset + len(view)]
        view[: len(piece)] = piece
        self.pos += len(piece)
        return len(piece)

    def seek(self, pos: int, /) -> int:
        self.pos = pos
        return pos

    def pread_into(self, view: memoryview, offset: int) -> int:
        data = self.fetch(offset, offset + len(view))
        memoryview(view).cast("B")[: len(data)] = data
        return len(data)

    def mmap_path(self) -> str | None:
        return None

    def close(self) -> None:
        self.buf = b""


class FsspecWriter:
    """Streams one object: fsspec buffers one part and uploads it; ``close`` completes the object.
    After a failed write, ``close`` discards the upload instead, so no partial object appears."""

    def __init__(self, storage: FsspecStorage, key: str, *, create_only: bool = False) -> None:
        self.storage, self.url, self.failed, self.lost = storage, storage.key_url(key), False, False
        with storage.errors(self.url):
            self.f = storage.fs.open(key, "xb" if create_only else "wb", block_size=storage.block_size)

    def write(self, data: bytes | memoryview, /) -> int:
        view = memoryview(data).cast("B")
        n = min(len(view), self.storage.block_size)  # at most one part buffered beyond the last
        try:
            with self.storage.errors(self.url):
                self.f.write(view[:n])
        except BaseException:
            self.failed = True
            raise
        return n

    def close(self) -> None:
        if self.failed:
            self.discard()
            return
        try:
            with self.storage.errors(self.url):
                self.f.close()
        except FileExistsError:  # create-only: another writer's object arrived first
            self.discard()
            self.lost = True
            raise CheckpointExistsError(
                f"{self.url}: another writer committed this step first; its checkpoint is left as it is "
                "(writers must not save the same step of one root concurrently)",
                file=self.url,
            ) from None
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        self.failed = True
        with contextlib.suppress(OSError, *_foreign(self.storage.scheme)):
            self.f.discard()  # aborts a multipart upload begun
        self.f.closed = True  # so that its finalizer does not try to complete the discarded upload


class FsspecDir:
    """A checkpoint directory as listed when opened; each file opened is checked to exist still."""

    def __init__(self, storage: FsspecStorage) -> None:
        self.storage = storage
        self.location = storage.location
        with storage.reading(self.location):
            self.objects = storage.keys_under(storage.path)
        if not self.objects:
            raise CheckpointNotFoundError(
                f"{self.location}: no such checkpoint directory (removed by retention?)", file=self.location
            )

    def open(self, name: str) -> FsspecFile:
        url = f"{self.location}/{name}"
        if name not in self.objects:
            if self.kind(name) is None:
                raise CheckpointNotFoundError(f"{url}: {name} is missing", file=url)
            raise CheckpointCorruptedError(f"{url}: {name} is not a regular file", file=url)
        with self.storage.reading(url):
            found = self.storage.info(self.storage._key(name))
        if found is None or found.get("type") != "file":
            raise CheckpointNotFoundError(f"{url}: {name} was deleted since the checkpoint was opened", file=url)
        return FsspecFile(self.storage, self.storage._key(name), int(found["size"]))

    def kind(self, name: str) -> Kind | None:
        if name in self.objects:
            return "file"
        return "dir" if any(k.startswith(name + "/") for k in self.objects) else None

    def close(self) -> None:
        self.objects = {}


class FsspecStaging:
    """The step directory itself, marked by a ``.pending-`` object until the manifest has arrived (§11.2)."""

    def __init__(self, root: FsspecStorage, name: str, *, overwrite: bool) -> None:
        self.root, self.name, self.done = root, name, False
        self.manifest: FsspecWriter | None = None
        url = root.url(name)
        if overwrite:
            raise CheckpointInputError(
                f"{url}: overwrite=True needs a rename commit; an object store cannot replace a committed "
                "checkpoint atomically. Save a new step, or delete the old one first",
                file=url,
            )
        self.marker = root._key(f"{names.PENDING_PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            root.write_small(self.marker.rsplit("/", 1)[1], b"")
        except FileNotFoundError:  # NoSuchBucket
            root.check_bucket()
            raise
        self.dir = root._key(name)
        try:
            if root.child(name).kind(names.MANIFEST) == "file":
                raise CheckpointExistsError(
                    f"{url}: a checkpoint for step {names.step_of(name)} already exists; "
                    "pass overwrite=True to replace it, or save a new step",
                    file=url,
                )
            mine = self.marker.rsplit("/", 1)[1]
            others = [n for n in root.listdir() if n != mine and n.startswith(f"{names.PENDING_PREFIX}{name}-")]
            if any(owner_alive(n) for n in others):
                raise CheckpointExistsError(f"{url}: another writer is saving this step", file=url)
            root.delete_tree(self.dir)  # a dead writer's uncommitted leftovers
        except BaseException:
            with contextlib.suppress(OSError):
                root.delete(self.marker)
            raise

    def create(self, name: str) -> FsspecWriter:
        if self.done:
            raise RuntimeError("this staging area was already committed or aborted")
        if name != names.MANIFEST:
            return FsspecWriter(self.root, f"{self.dir}/{name}")
        self.manifest = FsspecWriter(
            self.root, f"{self.dir}/{name}", create_only=self.root.create_only and self.root.scheme in CREATE_ONLY
        )
        return self.manifest

    def sync(self, name: str) -> None:
        pass  # an object is durable once its writer's close() returned

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        with contextlib.suppress(OSError):
            if self.manifest is None or not self.manifest.lost:  # else the step is the other writer's now
                self.root.delete(f"{self.dir}/{names.MANIFEST}")
                self.root.delete_tree(self.dir)
            self.root.delete(self.marker)

    def commit(self) -> str:
        """The manifest has arrived: committed. Then ``latest``; if that fails, the commit is undone."""
        try:
            point_latest(self.root)
        except OSError:
            self.abort()
            with contextlib.suppress(OSError):
                point_latest(self.root)
            raise
        self.done = True
        with contextlib.suppress(OSError):
            self.root.delete(self.marker)
        return self.root.child(self.name).location
