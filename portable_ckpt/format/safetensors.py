"""A streaming safetensors writer and a strict, bounded reader.

Bytes go straight from each tensor's memory to the file (no serialized copy of the state), and come
back with ``readinto`` into freshly allocated tensors. Files are byte-identical to the official
``safetensors.torch.save`` output for the same tensors and metadata.
"""

from __future__ import annotations

import ctypes
import json
import struct
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from portable_ckpt import threads as _threads
from portable_ckpt.errors import CheckpointCorruptedError, CheckpointInputError
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format.hashing import Hasher, new_hasher

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
_OVERLAP_MIN_BYTES = 1 << 20
_MAX_INT = 1 << 64  # dimensions and offsets are u64 in the format


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


def _host_contiguous(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t if t.is_contiguous() else t.contiguous()


def dtype_name(t: torch.Tensor, name: str) -> str:
    try:
        return DTYPE_NAMES[t.dtype]
    except KeyError:
        raise CheckpointInputError(
            f'tensor "{name}" has dtype {t.dtype}, which safetensors cannot store; '
            f"supported: {', '.join(str(d) for d in DTYPES.values())}"
        ) from None


def layout(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    """The padded header bytes and the tensor order of the file."""
    order = sorted(tensors, key=lambda n: (-_RANK[dtype_name(tensors[n], n)], n))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw, order


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


def _hash_into(view: memoryview, file_hash: Hasher) -> str:
    tensor_hash = new_hasher()
    tensor_hash.update(view)
    file_hash.update(view)
    return tensor_hash.hexdigest()


def write(
    sink: Sink,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> WriteResult:
    """Write ``tensors`` as one safetensors file into ``sink``; returns its size and checksums.

    Tensors on other devices or not contiguous are staged through host memory one at a time, so
    the extra memory is at most the largest such tensor. Large tensors are hashed on a second
    thread while the same bytes are written (both release the GIL), so checksums cost no extra time.
    """
    head, order = layout(tensors, metadata)
    file_hash = new_hasher()
    file_hash.update(head)
    checksums: dict[str, str] = {}
    size = len(head)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="portable-ckpt-hash") as hasher:
        _write_all(sink, memoryview(head))
        for name in order:
            host = _host_contiguous(tensors[name])
            view = tensor_bytes(host)
            size += len(view)
            if len(view) < _OVERLAP_MIN_BYTES:  # a thread hand-off costs more than hashing a small tensor
                checksums[name] = _hash_into(view, file_hash)
                _write_all(sink, view)
                continue
            digest = _threads.submit(hasher, _hash_into, view, file_hash)
            _write_all(sink, view)
            checksums[name] = digest.result()
    return WriteResult(size=size, checksum=file_hash.hexdigest(), tensor_checksums=checksums)


def _bad(filename: str, what: str) -> CheckpointCorruptedError:
    return CheckpointCorruptedError(f"{filename}: {what}", file=filename)


def _parse_entry(filename: str, name: object, raw: object, data_start: int) -> TensorEntry:
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
        key=lambda e: (e.start, e.end),
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


def read_tensors(
    f: Source,
    header: Header,
    filename: str,
    *,
    file_hash: Hasher | None = None,
    destinations: Callable[[TensorEntry], torch.Tensor | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Read every tensor in file order, after the header, into new (or given) CPU tensors."""
    out: dict[str, torch.Tensor] = {}
    f.seek(header.data_start)
    hashers = [file_hash] if file_hash is not None else []
    for e in header.entries:
        dst = destinations(e) if destinations is not None else None
        if dst is None:
            dst = torch.empty(e.shape, dtype=DTYPES[e.dtype])
        readinto_tensor(f, e, dst, hashers, filename)
        out[e.name] = dst
    return out
