"""A streaming safetensors writer and a strict, bounded reader.

Bytes go straight from each tensor's memory to the file (no serialized copy of the state), and come
back with ``readinto`` into freshly allocated tensors. Files are byte-identical to the official
``safetensors.torch.save`` output for the same tensors and metadata.
"""

from __future__ import annotations

import ctypes
import json
import operator
import struct
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from json.encoder import encode_basestring as _json_string  # what json.dumps(ensure_ascii=False) uses
from typing import Any, Protocol

import torch

from portable_ckpt import threads as _threads
from portable_ckpt.errors import CheckpointCorruptedError, CheckpointInputError
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format.hashing import Hasher, checksum, new_hasher

# safetensors dtype name -> torch dtype, listed in the order of the format's dtype enum.
# Tensors are laid out by this order descending, then by name (as the reference writer does).
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "C64": torch.complex64,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
_RANK = {name: rank for rank, name in enumerate(DTYPES)}
ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit; also the spec's
_ALIGN = 8
_CHUNK = 1 << 30  # os.write/readinto move at most ~2 GiB per call on Linux
_SMALL_BYTES = 64 << 10  # tensors below this are copied into a batch buffer instead of written alone
_BATCH_BYTES = 1 << 20
_PIECE_BYTES = 8 << 20  # what one read of a parallel load moves
_HASH_SLICE = 256 << 10  # a slice hashed twice (tensor and file) stays in L2 between the two passes
_MAX_INT = 1 << 64  # dimensions and offsets are u64 in the format
_FILE_ORDER = operator.attrgetter("start", "end")


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a safetensors file: offsets are absolute positions in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Header:
    entries: tuple[TensorEntry, ...]  # in file order
    metadata: dict[str, str]
    data_start: int

    def names(self) -> list[str]:
        return [e.name for e in self.entries]


@dataclass(frozen=True, slots=True)
class WriteResult:
    size: int
    checksum: str
    tensor_checksums: dict[str, str]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (the caller keeps ``t`` alive)."""
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


def host_contiguous(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t if t.is_contiguous() else t.contiguous()


def tensor_checksum(t: torch.Tensor) -> str:
    """The checksum of a tensor's data bytes as a file would hold them (the ``tensors`` table's value)."""
    t = host_contiguous(t)
    h = new_hasher()
    h.update(tensor_bytes(t))
    return h.hexdigest()


def dtype_name(t: torch.Tensor, name: str) -> str:
    try:
        return DTYPE_NAMES[t.dtype]
    except KeyError:
        raise CheckpointInputError(
            f'tensor "{name}" has dtype {t.dtype}, which safetensors cannot store; '
            f"supported: {', '.join(str(d) for d in DTYPES.values())}"
        ) from None


def _plan(tensors: Mapping[str, torch.Tensor]) -> list[tuple[int, str, str, torch.Tensor]]:
    """(minus dtype rank, name, dtype name, tensor) in file order: dtype rank descending, then name."""
    rows = []
    for name, t in tensors.items():
        dtype = DTYPE_NAMES.get(t.dtype) or dtype_name(t, name)
        rows.append((-_RANK[dtype], name, dtype, t))
    rows.sort(key=lambda row: (row[0], row[1]))
    return rows


def _header(rows: list[tuple[int, str, str, torch.Tensor]], metadata: Mapping[str, str] | None) -> bytes:
    """The padded header: exactly ``json.dumps`` of {"__metadata__": ..., name: entry, ...} with compact
    separators, assembled from strings (json.dumps spends ~3 us per entry on its 30,000 containers)."""
    parts = []
    if metadata:
        parts.append('"__metadata__":' + json.dumps(dict(metadata), separators=(",", ":"), ensure_ascii=False))
    offset = 0
    for _, name, dtype, t in rows:
        end = offset + t.nbytes
        parts.append(
            f'{_json_string(name)}:{{"dtype":"{dtype}","shape":[{",".join(map(str, t.shape))}],'
            f'"data_offsets":[{offset},{end}]}}'
        )
        offset = end
    raw = ("{" + ",".join(parts) + "}").encode("utf-8")
    raw += b" " * (-len(raw) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def layout(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    """The padded header bytes and the tensor order of the file."""
    rows = _plan(tensors)
    return _header(rows, metadata), [name for _, name, _, _ in rows]


class Sink(Protocol):
    """Where a writer puts bytes: ``write`` may take fewer bytes than given and returns how many."""

    def write(self, data: memoryview, /) -> int: ...


class Source(Protocol):
    """What a reader reads from: a file-like object positioned by ``seek``."""

    def read(self, n: int = -1, /) -> bytes: ...
    def readinto(self, view: memoryview | bytearray, /) -> int: ...
    def seek(self, pos: int, /) -> int: ...


def _write_all(sink: Sink, view: memoryview) -> None:
    pos = 0
    while pos < len(view):
        pos += sink.write(view[pos : pos + _CHUNK])


def _hash_into(view: memoryview, file_hash: Hasher, out: dict[str, str], name: str, _keep: object = None) -> None:
    """Both checksums of a large tensor in one pass over memory: each slice is hashed twice while it is in
    cache. ``_keep`` holds the tensor whose memory ``view`` points into until it is hashed."""
    tensor_hash = new_hasher()
    for pos in range(0, len(view), _HASH_SLICE):
        part = view[pos : pos + _HASH_SLICE]
        tensor_hash.update(part)
        file_hash.update(part)
    out[name] = tensor_hash.hexdigest()


class _Batch:
    """Small tensors copied back to back into one buffer, so that they cost one write (and one file-hash
    update) per ``_BATCH_BYTES`` instead of a system call and a memory view each."""

    def __init__(self) -> None:
        self.buf = bytearray(_BATCH_BYTES)
        self.view = memoryview(self.buf)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        self.fill = 0


def write(
    sink: Sink,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> WriteResult:
    """Write ``tensors`` as one safetensors file into ``sink``; returns its size and checksums.

    Tensors on other devices or not contiguous are staged through host memory one at a time, so
    the extra memory is at most the largest such tensor. Large tensors are hashed on a helper thread
    behind the writes (``threads.Trailing``: the writer never waits for it until the end, and then
    hashes what is left itself); small ones are batched into one buffer per write and hashed inline.
    """
    rows = _plan(tensors)
    head = _header(rows, metadata)
    file_hash = new_hasher()
    file_hash.update(head)
    checksums: dict[str, str] = {}
    size = len(head)
    with _threads.Trailing("hash") as behind:
        _write_all(sink, memoryview(head))
        batch: _Batch | None = None

        def flush() -> None:
            nonlocal batch
            if batch is not None and batch.fill:
                data = batch.view[: batch.fill]
                _write_all(sink, data)
                behind.put(file_hash.update, data, inline=True)  # each batch its own buffer: no reuse race
            batch = None

        for _, name, _, t in rows:
            host = t if t.is_cpu and t.is_contiguous() else host_contiguous(t)
            nbytes = host.nbytes
            size += nbytes
            if nbytes < _SMALL_BYTES:
                if batch is None or batch.fill + nbytes > _BATCH_BYTES:
                    flush()
                    batch = _Batch()
                at = batch.fill
                if nbytes:
                    ctypes.memmove(batch.address + at, host.data_ptr(), nbytes)
                batch.fill = at + nbytes
                checksums[name] = checksum(batch.view[at : at + nbytes])
                continue
            flush()
            view = tensor_bytes(host)
            _write_all(sink, view)
            behind.put(_hash_into, view, file_hash, checksums, name, host)
            if host is not t:
                behind.drain()  # a staged copy: hashed before the next is made, so one at a time is alive
        flush()
        behind.finish()
    ordered = {name: checksums[name] for _, name, _, _ in rows}
    return WriteResult(size=size, checksum=file_hash.hexdigest(), tensor_checksums=ordered)


def _bad(filename: str, what: str) -> CheckpointCorruptedError:
    return CheckpointCorruptedError(f"{filename}: {what}", file=filename)


def _parse_entry(filename: str, name: object, raw: object, data_start: int) -> TensorEntry:
    """One tensor's entry, checked. A valid entry is accepted by the few checks of the fast path below;
    anything else goes through the full checks, which name what is wrong."""
    if type(name) is str and name and type(raw) is dict and len(raw) == 3:
        dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
        itemsize = ITEMSIZE.get(dtype) if type(dtype) is str else None
        if itemsize is not None and type(shape) is list and type(offsets) is list and len(offsets) == 2:
            begin, end = offsets
            numel = 1
            for d in shape:
                if type(d) is not int or not 0 <= d < _MAX_INT:
                    break
                numel *= d
                if numel >= _MAX_INT:
                    break
            else:
                if (
                    type(begin) is int
                    and type(end) is int
                    and 0 <= begin <= end < _MAX_INT
                    and end - begin == numel * itemsize
                ):
                    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)  # type: ignore[arg-type]
    return _check_entry(filename, name, raw, data_start)


def _check_entry(filename: str, name: object, raw: object, data_start: int) -> TensorEntry:
    if not isinstance(name, str) or not name:
        raise _bad(filename, f"tensor name {name!r} is not a non-empty string")
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise _bad(filename, f'tensor "{name}": entry must have exactly dtype, shape and data_offsets')
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        shown = repr(dtype[:40]) if isinstance(dtype, str) else f"of type {type(dtype).__name__}"
        raise _bad(filename, f'tensor "{name}": unknown dtype {shown}')
    # bounds first: printing a 5000-digit integer would itself fail
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < _MAX_INT for d in shape):
        raise _bad(filename, f'tensor "{name}": shape is not a list of integers in [0, 2**64)')
    if not isinstance(offsets, list) or not all(type(o) is int and 0 <= o < _MAX_INT for o in offsets):
        raise _bad(filename, f'tensor "{name}": data_offsets are not integers in [0, 2**64)')
    if len(offsets) != 2 or offsets[0] > offsets[1]:
        raise _bad(filename, f'tensor "{name}": data_offsets {offsets!r} are not [begin, end] with begin <= end')
    numel = 1
    for d in shape:
        numel *= d
        if numel >= _MAX_INT:
            raise _bad(filename, f'tensor "{name}": shape of {len(shape)} dimensions holds 2**64 elements or more')
    expected = numel * ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != expected:
        raise _bad(
            filename,
            f'tensor "{name}" needs {expected} bytes ({dtype} {shape}) but its offsets span {offsets[1] - offsets[0]}',
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def parse_header(prefix: bytes, file_size: int, filename: str) -> Header:
    """Validate a header. ``prefix`` holds at least the first 8 bytes and the whole header."""
    if file_size < 8 or len(prefix) < 8:
        raise _bad(filename, f"file is {file_size} bytes, too short for the 8-byte header length")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES:
        raise _bad(filename, f"header length {length} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if 8 + length > file_size or len(prefix) < 8 + length:
        raise _bad(filename, f"header length {length} runs past the end of the file ({file_size} bytes)")
    try:
        # the JSON rules of every document (format_spec §17), except the size limit, which is MAX_HEADER_BYTES
        doc = json.loads(
            prefix[8 : 8 + length].decode("utf-8"),
            object_pairs_hook=_jsonio.unique_keys,
            parse_constant=_jsonio.reject_constant,
            parse_int=_jsonio.bounded_int,
        )
    except UnicodeDecodeError as e:
        raise _bad(filename, f"header is not UTF-8 (byte {e.start + 8})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; so are duplicate names
        raise _bad(filename, f"header is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise _bad(filename, "header is not a JSON object")
    if _jsonio.has_lone_surrogate(prefix[8 : 8 + length], doc):
        raise _bad(filename, "header is not valid JSON (a string holds a lone surrogate)")
    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(filename, "__metadata__ must map strings to strings")
    data_start = 8 + length
    entries = sorted(
        (_parse_entry(filename, name, raw, data_start) for name, raw in doc.items()),
        key=_FILE_ORDER,
    )
    cursor = data_start
    for entry in entries:
        if entry.start != cursor:
            what = "overlaps the previous tensor" if entry.start < cursor else "leaves a gap before it"
            raise _bad(
                filename,
                f'tensor "{entry.name}" at bytes {entry.start}..{entry.end} {what} (expected start {cursor})',
            )
        cursor = entry.end
    if cursor != file_size:
        raise _bad(filename, f"tensor data ends at byte {cursor} but the file has {file_size} bytes")
    return Header(entries=tuple(entries), metadata=metadata, data_start=data_start)


def read_header(f: Source, file_size: int, filename: str) -> tuple[Header, bytes]:
    """Read and validate the header at the start of ``f``; returns it with its raw bytes."""
    first = f.read(8)
    if len(first) < 8:
        raise _bad(filename, f"file is {file_size} bytes, too short for the 8-byte header length")
    (length,) = struct.unpack("<Q", first)
    if length > MAX_HEADER_BYTES or 8 + length > file_size:
        parse_header(first, file_size, filename)  # raises with the precise reason
    raw = first + f.read(length)
    return parse_header(raw, file_size, filename), raw


def readinto_tensor(f: Source, entry: TensorEntry, dst: torch.Tensor, hashers: Iterable[Hasher], filename: str) -> None:
    """Fill contiguous CPU tensor ``dst`` with the entry's bytes read at the file's current position."""
    view = tensor_bytes(dst)
    pos = 0
    while pos < len(view):
        n = f.readinto(view[pos : pos + _CHUNK])
        if not n:
            raise _bad(filename, f'file ends inside tensor "{entry.name}" (byte {entry.start + pos})')
        pos += n
    for h in hashers:
        h.update(view)


def _fill(f: Source, view: memoryview, first: TensorEntry, filename: str, run: Iterable[TensorEntry] = ()) -> None:
    """Read exactly ``len(view)`` bytes (the tensors from ``first`` on) at the file's current position."""
    pos = 0
    while pos < len(view):
        n = f.readinto(view[pos : pos + _CHUNK])
        if not n:
            at = first.start + pos
            inside = next((e for e in run if e.start <= at < e.end), first)
            raise _bad(filename, f'file ends inside tensor "{inside.name}" (byte {at})')
        pos += n


def _keep_update(hasher: Hasher, view: memoryview, _keep: object) -> None:
    hasher.update(view)


def read_tensors(
    f: Source,
    header: Header,
    filename: str,
    *,
    file_hash: Hasher | None = None,
    destinations: Callable[[TensorEntry], torch.Tensor | None] | None = None,
    threads: int = 1,
) -> dict[str, torch.Tensor]:
    """Read every tensor in file order, after the header, into new (or given) CPU tensors.

    Runs of small tensors are read with one ``readinto`` into a buffer and copied out; ``file_hash`` is
    fed on a helper thread behind the reads (``threads.Trailing``), all of it before this returns.
    With ``threads`` > 1 and a source that has ``pread_into``, pieces of the file are read on that
    many threads (and hashed behind them, in file order).
    """
    if threads > 1 and callable(getattr(f, "pread_into", None)):
        return _read_parallel(f, header, filename, file_hash, destinations, threads)
    out: dict[str, torch.Tensor] = {}
    f.seek(header.data_start)
    entries = header.entries
    with _threads.Trailing("hash") as behind:
        i = 0
        while i < len(entries):
            e = entries[i]
            if e.nbytes < _SMALL_BYTES:
                j, total = i, 0
                while (
                    j < len(entries) and entries[j].nbytes < _SMALL_BYTES and total + entries[j].nbytes <= _BATCH_BYTES
                ):
                    total += entries[j].nbytes
                    j += 1
                run = entries[i:j]
                buf = bytearray(total)
                view = memoryview(buf)
                _fill(f, view, e, filename, run)
                if file_hash is not None:
                    behind.put(file_hash.update, view, inline=True)
                address = ctypes.addressof(ctypes.c_char.from_buffer(buf)) if total else 0
                for small in run:
                    dst = destinations(small) if destinations is not None else None
                    if dst is None:
                        dst = torch.empty(small.shape, dtype=DTYPES[small.dtype])
                    if small.nbytes:
                        ctypes.memmove(dst.data_ptr(), address + small.start - e.start, small.nbytes)
                    out[small.name] = dst
                i = j
                continue
            dst = destinations(e) if destinations is not None else None
            if dst is None:
                dst = torch.empty(e.shape, dtype=DTYPES[e.dtype])
            view = tensor_bytes(dst)
            _fill(f, view, e, filename)
            if file_hash is not None:
                behind.put(_keep_update, file_hash, view, dst)
            out[e.name] = dst
            i += 1
        behind.finish()
    return out


def _pread_exact(f: Any, view: memoryview, offset: int, first: TensorEntry, filename: str) -> None:
    pos = 0
    while pos < len(view):
        n = f.pread_into(view[pos : pos + _CHUNK], offset + pos)
        if not n:
            raise _bad(filename, f'file ends inside tensor "{first.name}" (byte {offset + pos})')
        pos += n


def _read_parallel(
    f: Any,
    header: Header,
    filename: str,
    file_hash: Hasher | None,
    destinations: Callable[[TensorEntry], torch.Tensor | None] | None,
    threads: int,
) -> dict[str, torch.Tensor]:
    """``read_tensors`` with the file's pieces (each large tensor in ``_PIECE_BYTES`` slices, each run of
    small tensors one buffer) read by ``pread_into`` on a thread pool; the caller hashes behind them."""
    out: dict[str, torch.Tensor] = {}
    pieces: list[tuple[memoryview, TensorEntry, object, list[TensorEntry]]] = []
    entries, i = header.entries, 0
    while i < len(entries):
        e = entries[i]
        if e.nbytes < _SMALL_BYTES:
            j, total = i, 0
            while j < len(entries) and entries[j].nbytes < _SMALL_BYTES and total + entries[j].nbytes <= _BATCH_BYTES:
                total += entries[j].nbytes
                j += 1
            buf = bytearray(total)
            pieces.append((memoryview(buf), e, buf, list(entries[i:j])))
            i = j
            continue
        dst = destinations(e) if destinations is not None else None
        if dst is None:
            dst = torch.empty(e.shape, dtype=DTYPES[e.dtype])
        out[e.name] = dst
        view = tensor_bytes(dst)
        for pos in range(0, len(view), _PIECE_BYTES):
            pieces.append(
                (view[pos : pos + _PIECE_BYTES], TensorEntry(e.name, e.dtype, e.shape, e.start + pos, e.end), dst, [])
            )
        i += 1
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="portable-ckpt-read")
    with pool, _threads.Trailing("hash") as behind:
        reads = [_threads.submit(pool, _pread_exact, f, view, at.start, at, filename) for view, at, _, _ in pieces]
        for done, (view, at, keep, run) in zip(reads, pieces, strict=True):
            done.result()
            if file_hash is not None:
                behind.put(_keep_update, file_hash, view, keep)
            address = ctypes.addressof(ctypes.c_char.from_buffer(keep)) if run and len(view) else 0  # type: ignore[arg-type]
            for small in run:
                dst = destinations(small) if destinations is not None else None
                if dst is None:
                    dst = torch.empty(small.shape, dtype=DTYPES[small.dtype])
                if small.nbytes:
                    ctypes.memmove(dst.data_ptr(), address + small.start - at.start, small.nbytes)
                out[small.name] = dst
        behind.finish()
    return {e.name: out[e.name] for e in entries}
