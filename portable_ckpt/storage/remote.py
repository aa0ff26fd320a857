"""Object stores through fsspec (``s3://``, and ``gs://``, ``az://`` ... the same way): ``manifest-last``.

Every object is written whole. On S3 a ``WriteFile`` is our own multipart upload (``S3Writer``): parts of
``block_size`` with up to ``concurrency`` in flight (bounded memory), completed by ``close()``, which makes the
object visible, or aborted after a failure; other stores go through fsspec's buffered writer. Reads are ranged
GETs (``cat_file`` with start/end) on the implementation's event loop, ``concurrency`` at once: a lazy tensor
read fetches that tensor's bytes only; a sequential read streams ahead of the reader. ``clean()`` also aborts
the multipart uploads dead writers left open under the root.

Storage options (endpoint, credentials, anything the fsspec implementation takes) come from fsspec's
own configuration (``fsspec.config.conf["s3"]``, ``FSSPEC_S3_*`` environment variables), or from
``FsspecStorage.from_location(url, storage_options={...})``, a ``Storage`` that every API accepts in
place of the URL. The file system opened with explicit options serves every later URL of the same
bucket in this process, because the layers above re-open locations by URL (a checkpoint of a root).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import importlib
import os
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

from portable_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointExistsError,
    CheckpointInputError,
    CheckpointNotFoundError,
)
from portable_ckpt.format import names
from portable_ckpt.storage.base import CheckpointDir, CommitStrategy, Kind, ReadFile, point_latest
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

# what to do when the store refuses the credentials
ACCESS_HINT = (
    "pass the credentials as storage options (FsspecStorage.from_location(url, storage_options={'key': ..., "
    "'secret': ...}) or fsspec's configuration, e.g. FSSPEC_S3_KEY and FSSPEC_S3_SECRET) or as the store's own "
    "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE), and check the bucket's permissions"
)

# schemes whose implementation writes create-only (``open(..., "xb")``: S3's If-None-Match: *), used for the
# manifest so that of two writers racing for one step at most one commits (§11.2, two writers of one step)
CREATE_ONLY = frozenset({"s3", "s3a"})

# schemes written by our own multipart upload (parts in flight concurrently); others through fsspec's writer
MULTIPART = frozenset({"s3", "s3a"})

BLOCK_SIZE = 16 << 20  # one buffered part of a multipart upload (S3 needs >= 5 MiB but for the last)
GET_SIZE = 16 << 20  # one ranged GET of a large read
CONCURRENCY = 8  # parts uploading, or ranged GETs fetching, at once per file: memory is this times the size
ABORT_AFTER = 24 * 3600.0  # seconds: a multipart upload open this long is a dead writer's, whatever its step
READAHEAD = 256 << 10  # a small sequential read fetches this much more, so small reads are not one GET each

# (scheme, bucket) -> the file system opened with explicit storage options for it
_OPENED: dict[tuple[str, str], Any] = {}
# threads for implementations without an event loop of their own (fsspec's async ones run on theirs)
_POOL: list[concurrent.futures.ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(concurrent.futures.ThreadPoolExecutor(4 * CONCURRENCY, thread_name_prefix="portable-ckpt-io"))
        return _POOL[0]


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


def _lost_race(url: str) -> CheckpointExistsError:
    """A create-only manifest refused: another writer's object arrived first (§11.2)."""
    return CheckpointExistsError(
        f"{url}: another writer committed this step first; its checkpoint is left as it is "
        "(writers must not save the same step of one root concurrently)",
        file=url,
    )


def unsatisfiable(e: OSError) -> bool:
    """The store's 416 for a range beyond the object's end (it shrank, or is empty): a short read, not a failure."""
    return e.errno == errno.EINVAL and "range" in str(e).lower()


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
    concurrency: int = CONCURRENCY  # parts in flight per file written, ranged GETs per file read
    get_size: int = GET_SIZE  # one ranged GET of a large read
    abort_after: float = ABORT_AFTER  # clean() aborts multipart uploads begun longer ago than this (seconds)

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
        concurrency: int = CONCURRENCY,
        abort_after: float = ABORT_AFTER,
    ) -> FsspecStorage:
        """The storage a URL names. ``storage_options`` go to the fsspec implementation (``endpoint_url``,
        ``key``, ``secret``, ...) and serve later URLs of the same bucket too. ``block_size``: one part of a
        multipart upload; ``concurrency``: parts uploading, or ranged GETs, at once per file (the extra
        memory is about their product); ``create_only=False`` for an S3 store without conditional writes;
        ``abort_after``: ``clean()`` aborts any multipart upload under the root begun longer ago (seconds).

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
        if concurrency < 1:
            raise CheckpointInputError(f"{location}: concurrency must be at least 1, not {concurrency}")
        path = fs._strip_protocol(location).rstrip("/")
        return cls(
            fs, path, scheme, block_size, create_only=create_only, concurrency=concurrency, abort_after=abort_after
        )

    @property
    def location(self) -> str:
        return self.key_url(self.path)

    def key_url(self, key: str) -> str:
        return key if "://" in key else f"{self.scheme}://{key}"

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def prefix(self) -> str:
        """The keys below this location start with this (empty at a bucket's top)."""
        below = self.path.partition("/")[2]
        return f"{below}/" if below else ""

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
        except PermissionError as e:  # credentials refused (InvalidAccessKeyId, SignatureDoesNotMatch, 403)
            if e.filename is not None:
                raise
            raise PermissionError(errno.EACCES, f"access denied ({e.strerror or e}); {ACCESS_HINT}", url) from e
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
            raise CheckpointNotFoundError(f"{url}: {e.strerror or e}", file=url) from e

    def child(self, name: str) -> FsspecStorage:
        return dataclasses.replace(self, path=self._key(name))

    def submit(self, method: str, *args: Any, **kwargs: Any) -> Future[Any]:
        """Start ``fs.<method>(...)`` without waiting for it: as a coroutine on the implementation's own
        event loop where it has one (s3fs, gcsfs, adlfs), else on a thread."""
        fs = self.fs
        if getattr(fs, "async_impl", False) and not getattr(fs, "asynchronous", False):
            return asyncio.run_coroutine_threadsafe(getattr(fs, f"_{method}")(*args, **kwargs), fs.loop)
        return _pool().submit(getattr(fs, method), *args, **kwargs)

    def writer(self, key: str, *, create_only: bool = False) -> S3Writer | FsspecWriter:
        if self.scheme in MULTIPART and hasattr(self.fs, "_call_s3"):
            return S3Writer(self, key, create_only=create_only)
        return FsspecWriter(self, key, create_only=create_only)

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
            except OSError as e:
                if unsatisfiable(e):  # an empty object: S3 refuses any range of it
                    return b""
                raise

    def write_small(self, name: str, data: bytes) -> None:
        with self.errors(self.url(name)):
            self.fs.pipe_file(self._key(name), data)  # one PUT: readers see the old or the new object

    def make_root(self) -> None:
        self.check_bucket()  # prefixes need no creating; the bucket must exist

    def open_dir(self) -> FsspecDir:
        return FsspecDir(self)

    def stage(self, name: str, *, overwrite: bool) -> FsspecStaging:
        return FsspecStaging(self, name, overwrite=overwrite)

    def join(self, area: str) -> FsspecJoined:
        """Write into the step directory ``area`` that another process's staging opened (manifest-last:
        the staging area is the step directory itself)."""
        if names.step_of(area) is None or "/" in area:
            raise CheckpointInputError(f"{self.url(area)}: not a staging area of {self.location}", file=self.url(area))
        return FsspecJoined(self, self._key(area))

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
        return removed + self.abort_uploads()

    def open_uploads(self) -> Iterator[dict[str, Any]]:
        """The multipart uploads begun and neither completed nor aborted under this location (S3)."""
        more: dict[str, str] = {}
        while True:
            with self.errors(self.location):
                page = self.fs.call_s3("list_multipart_uploads", Bucket=self.bucket, Prefix=self.prefix, **more)
            yield from page.get("Uploads") or []
            if not page.get("IsTruncated"):
                return
            more = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def abort_uploads(self) -> list[str]:
        """Abort the multipart uploads dead writers left open under this root (S3 keeps their parts, unlisted
        and billed, until then): those in a step directory without a manifest and without a live writer's
        marker (what ``clean`` deletes the objects of), and any begun more than ``abort_after`` seconds ago
        (a live writer's upload is never that old; aborting one fails its save, which commits nothing)."""
        if self.scheme not in MULTIPART or not hasattr(self.fs, "call_s3"):
            return []
        now = datetime.datetime.now(datetime.timezone.utc)
        start = len(self.prefix)
        dead: dict[str, bool] = {}
        aborted = []
        for upload in list(self.open_uploads()):
            name = upload["Key"][start:]
            top = name.split("/", 1)[0]
            if top not in dead:
                dead[top] = (
                    names.step_of(top) is not None
                    and self.child(top).kind(names.MANIFEST) != "file"
                    and not self.pending_writer(top)
                )
            begun = upload.get("Initiated")
            old = isinstance(begun, datetime.datetime) and (now - begun).total_seconds() > self.abort_after
            if dead[top] or old:
                with self.errors(self.url(name)), contextlib.suppress(FileNotFoundError):  # NoSuchUpload: gone
                    self.fs.call_s3(
                        "abort_multipart_upload", Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                aborted.append(f"{name} (multipart upload)")
        return aborted


class FsspecFile:
    """One object read by ranged GETs.

    ``pread_into`` fetches exactly the range asked, in ``get_size`` pieces at most ``concurrency`` at a time.
    Sequential reads (``readinto``) fetch ``READAHEAD`` more than a small read asks; a large one starts a
    stream of ranged GETs running ahead of the reader once a second read continues it (a lone large read
    fetches what it asks, rounded up to whole ranges), at most ``concurrency`` pieces fetched or waiting, so
    the extra memory is ``(concurrency + 1) * get_size`` (with the piece being copied) whatever the size.
    """

    def __init__(self, storage: FsspecStorage, key: str, size: int, etag: str | None = None) -> None:
        self.storage, self.key, self.size = storage, key, size
        self.etag = etag  # the object's ETag when it was opened (S3), for a copy conditional on it
        self.url = storage.key_url(key)
        self.pos = 0
        self.buf: bytes = b""
        self.buf_start = 0
        self.ahead: collections.deque[tuple[int, int, Future[bytes]]] = collections.deque()  # (start, end, GET)
        self.ahead_end = 0  # where the next streamed range starts
        self.ahead_limit = 0  # how far the stream may run: the first read's end, then the object's

    def get(self, start: int, end: int) -> Future[bytes]:
        return self.storage.submit("cat_file", self.key, start=start, end=end)

    def result(self, start: int, end: int, got: Future[bytes]) -> bytes:
        try:
            with self.storage.reading(self.url):
                data = got.result()
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"{self.url}: the object was deleted while the checkpoint was read (retention?)", file=self.url
            ) from None
        except OSError as e:
            if not unsatisfiable(e):
                raise
            data = b""  # the object shrank below this range after it was opened
        if len(data) != end - start:
            raise CheckpointCorruptedError(
                f"{self.url}: bytes {start}-{end} came back as {len(data)} bytes (the object changed while read?)",
                file=self.url,
            )
        return data

    def fetch(self, start: int, end: int) -> bytes:
        end = min(end, self.size)
        return self.result(start, end, self.get(start, end)) if start < end else b""

    def read(self, n: int = -1, /) -> bytes:
        want = self.size - self.pos if n < 0 else min(n, self.size - self.pos)
        out = bytearray(want)
        got = self.readinto(out)
        return bytes(out[:got])

    def readinto(self, view: memoryview | bytearray, /) -> int:
        view = memoryview(view).cast("B")
        done = 0
        while done < len(view) and self.pos < self.size:
            offset = self.pos - self.buf_start
            if not 0 <= offset < len(self.buf):
                self.refill(len(view) - done)
                offset = 0
            piece = memoryview(self.buf)[offset : offset + len(view) - done]
            view[done : done + len(piece)] = piece
            done += len(piece)
            self.pos += len(piece)
        return done

    def refill(self, want: int) -> None:
        """Make ``buf`` start at ``pos``: the stream's next range, or a new GET."""
        head = self.ahead[0][0] if self.ahead else self.ahead_end  # where the stream goes on
        if self.ahead_limit and self.pos == head:
            self.ahead_limit = self.size  # a second read continues the stream: let it run ahead
        elif want >= READAHEAD:  # a large read: whole ranges of it, the last one rounded up to a range
            self.stop()
            step = self.storage.get_size
            self.ahead_end, self.ahead_limit = self.pos, min(self.size, self.pos + -(-want // step) * step)
        else:
            self.stop()
            self.buf, self.buf_start = self.fetch(self.pos, self.pos + want + READAHEAD), self.pos
            return
        self.top_up()
        start, end, got = self.ahead.popleft()
        self.buf, self.buf_start = self.result(start, end, got), start
        self.top_up()

    def top_up(self) -> None:
        step = self.storage.get_size
        while len(self.ahead) < self.storage.concurrency and self.ahead_end < self.ahead_limit:
            start, end = self.ahead_end, min(self.ahead_end + step, self.ahead_limit)
            self.ahead.append((start, end, self.get(start, end)))
            self.ahead_end = end

    def stop(self) -> None:
        while self.ahead:
            self.ahead.pop()[2].cancel()
        self.ahead_limit = 0

    def seek(self, pos: int, /) -> int:
        self.pos = pos
        return pos

    def pread_into(self, view: memoryview, offset: int) -> int:
        view = memoryview(view).cast("B")
        end = min(offset + len(view), self.size)
        step, window = self.storage.get_size, self.storage.concurrency
        ranges = [(s, min(s + step, end)) for s in range(offset, end, step)]
        pending: collections.deque[tuple[int, int, Future[bytes]]] = collections.deque()
        try:
            for i in range(len(ranges)):
                while len(pending) < window and i + len(pending) < len(ranges):
                    s, e = ranges[i + len(pending)]
                    pending.append((s, e, self.get(s, e)))
                s, e, got = pending.popleft()
                view[s - offset : e - offset] = self.result(s, e, got)
        finally:
            for *_, got in pending:
                got.cancel()
        return max(0, end - offset)

    def mmap_path(self) -> str | None:
        return None

    def close(self) -> None:
        self.stop()
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
            raise _lost_race(self.url) from None
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        self.failed = True
        with contextlib.suppress(OSError, *_foreign(self.storage.scheme)):
            self.f.discard()  # aborts a multipart upload begun
        self.f.closed = True  # so that its finalizer does not try to complete the discarded upload


class S3Writer:
    """Streams one S3 object as a multipart upload with up to ``concurrency`` parts in flight (s3fs's own
    writer uploads one part at a time). A file smaller than a part is one PUT at ``close``. The extra
    memory is ``(concurrency + 1) * block_size``: the parts uploading and the one filling. After a failed
    write or upload, ``close`` aborts the upload instead of completing it, so no partial object appears."""

    def __init__(self, storage: FsspecStorage, key: str, *, create_only: bool = False) -> None:
        self.storage, self.url, self.failed, self.lost = storage, storage.key_url(key), False, False
        self.bucket, self.key = key.split("/", 1)
        self.match = {"IfNoneMatch": "*"} if create_only else {}
        self.part = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self.inflight: collections.deque[tuple[int, Future[dict[str, Any]]]] = collections.deque()

    def call(self, method: str, **kwargs: Any) -> Future[dict[str, Any]]:
        return self.storage.submit("call_s3", method, Bucket=self.bucket, Key=self.key, **kwargs)

    def wait(self, got: Future[dict[str, Any]]) -> dict[str, Any]:
        with self.storage.errors(self.url):
            return got.result()

    def write(self, data: bytes | memoryview, /) -> int:
        if self.failed:
            raise RuntimeError(f"{self.url}: write after a failed write")
        view = memoryview(data).cast("B")
        n = min(len(view), self.storage.block_size - len(self.part))
        self.part += view[:n]
        if len(self.part) >= self.storage.block_size:
            try:
                self.send()
            except BaseException:
                self.failed = True
                raise
        return n

    def send(self) -> None:
        """Upload the filled part, after waiting for the oldest in flight if ``concurrency`` are."""
        if self.upload_id is None:
            self.upload_id = self.wait(self.call("create_multipart_upload"))["UploadId"]
        while len(self.inflight) >= self.storage.concurrency:
            self.collect()
        number = len(self.parts) + len(self.inflight) + 1
        body, self.part = self.part, bytearray()  # handed over whole: the next part fills a new buffer
        self.inflight.append((number, self.call("upload_part", PartNumber=number, UploadId=self.upload_id, Body=body)))

    def collect(self) -> None:
        number, got = self.inflight.popleft()
        out = self.wait(got)
        self.parts.append(
            {"PartNumber": number, "ETag": out["ETag"], **{k: v for k, v in out.items() if k == "ChecksumSHA256"}}
        )

    def close(self) -> None:
        if self.failed:
            self.discard()
            return
        try:
            if self.upload_id is None:  # smaller than a part: one PUT
                self.wait(self.call("put_object", Body=bytes(self.part), **self.match))
            else:
                if self.part:
                    self.send()
                while self.inflight:
                    self.collect()
                self.wait(
                    self.call(
                        "complete_multipart_upload",
                        UploadId=self.upload_id,
                        MultipartUpload={"Parts": self.parts},
                        **self.match,
                    )
                )
                self.upload_id = None
        except FileExistsError:  # create-only: another writer's object arrived first
            self.discard()
            self.lost = True
            raise _lost_race(self.url) from None
        except BaseException:
            self.discard()
            raise
        finally:
            self.part = bytearray()

    def discard(self) -> None:
        """Abort the upload once no part of it is in flight (a part landing after the abort would be kept)."""
        self.failed = True
        self.part = bytearray()
        concurrent.futures.wait([got for _, got in self.inflight])
        self.inflight.clear()
        if self.upload_id is not None:
            with contextlib.suppress(OSError, *_foreign(self.storage.scheme)):
                self.wait(self.call("abort_multipart_upload", UploadId=self.upload_id))
            self.upload_id = None


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
        return FsspecFile(self.storage, self.storage._key(name), int(found["size"]), found.get("ETag"))

    def kind(self, name: str) -> Kind | None:
        if name in self.objects:
            return "file"
        return "dir" if any(k.startswith(name + "/") for k in self.objects) else None

    def close(self) -> None:
        self.objects = {}


@dataclasses.dataclass(frozen=True)
class FsspecJoined:
    """Objects written into another writer's step directory (its manifest, written last, commits them)."""

    root: FsspecStorage
    dir: str

    def create(self, name: str) -> S3Writer | FsspecWriter:
        return self.root.writer(f"{self.dir}/{name}")

    def sync(self, name: str) -> None:
        pass  # an object is durable once its writer's close() returned


class FsspecStaging:
    """The step directory itself, marked by a ``.pending-`` object until the manifest has arrived (§11.2)."""

    def __init__(self, root: FsspecStorage, name: str, *, overwrite: bool) -> None:
        self.root, self.name, self.done = root, name, False
        self.manifest: S3Writer | FsspecWriter | None = None
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

    @property
    def area(self) -> str:
        return self.name

    def create(self, name: str) -> S3Writer | FsspecWriter:
        if self.done:
            raise RuntimeError("this staging area was already committed or aborted")
        if name != names.MANIFEST:
            return self.root.writer(f"{self.dir}/{name}")
        self.manifest = self.root.writer(
            f"{self.dir}/{name}", create_only=self.root.create_only and self.root.scheme in CREATE_ONLY
        )
        return self.manifest

    def sync(self, name: str) -> None:
        pass  # an object is durable once its writer's close() returned

    def reuse(self, name: str, source: CheckpointDir, source_name: str, opened: ReadFile | None = None) -> bool:
        """A server-side copy of the source's object (S3 CopyObject: no byte passes through this process), on
        S3 conditional on the ETag the object had when ``opened`` (its header read, its checksums compared);
        False where it cannot (another store or bucket, the object removed or replaced meanwhile, the copy
        refused)."""
        if self.done:
            raise RuntimeError("this staging area was already committed or aborted")
        if not isinstance(source, FsspecDir) or source.storage.fs is not self.root.fs:
            return False
        src, dst = source.storage._key(source_name), f"{self.dir}/{name}"
        try:
            with self.root.errors(self.root.key_url(dst)):
                found = self.root.info(src)
                if found is None or found.get("type") != "file":
                    return False
                tag = opened.etag if isinstance(opened, FsspecFile) and opened.etag else found.get("ETag")
                if isinstance(opened, FsspecFile) and opened.etag and found.get("ETag") != opened.etag:
                    return False  # replaced since it was opened
                options = {"CopySourceIfMatch": tag} if tag and self.root.scheme in MULTIPART else {}
                self.root.fs.cp_file(src, dst, **options)
                copied = self.root.info(dst)
        except (OSError, ValueError):
            return False
        if copied is None or copied.get("size") != found.get("size"):
            with contextlib.suppress(OSError):
                self.root.delete(dst)
            return False
        return True

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
