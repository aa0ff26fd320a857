"""Optimizer, scheduler and scaler state as ``torch.save`` files, restricted to the format's allowlist.

Codecs only: ``save`` writes into a stream, ``load`` reads from a path or a stream; where the bytes
live is the storage layer's business. Three guards, all from the tables below (format_spec/README.md,
"The restricted .pt encoding"):

- ``check_state`` walks an object before ``torch.save`` writes a byte of it: every value must be one
  the allowlist can rebuild, else ``CheckpointInputError`` naming its key path;
- ``check_archive`` reads the zip container and scans every pickle opcode of ``data.pkl`` before
  ``torch.load`` sees it: a global or opcode outside the allowlist is ``CheckpointUnsafeError``;
- ``torch.load(weights_only=True)`` then unpickles, and whatever it raises on a damaged or hostile
  file comes out as ``CheckpointCorruptedError`` naming the file.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import io
import os
import pickle
import pickletools
import re
import struct
import sys
import zipfile
from collections.abc import Iterator
from typing import Any, BinaryIO

import torch

from portable_ckpt import threads as _threads
from portable_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointInputError,
    CheckpointNotFoundError,
    CheckpointUnsafeError,
)
from portable_ckpt.format.hashing import checksum, new_hasher
from portable_ckpt.format.safetensors import DTYPES

_SERIALIZATION_CONFIG: Any
try:
    from torch.utils.serialization import config as _SERIALIZATION_CONFIG
except ImportError:  # torch < 2.6
    _SERIALIZATION_CONFIG = None

# --------------------------------------------------------------------------------------------------
# the allowlist
# --------------------------------------------------------------------------------------------------

# safetensors dtype name -> the typed storage class torch.save names for its tensors (via
# _rebuild_tensor_v2), or None: torch.save stores those with an UntypedStorage and _rebuild_tensor_v3.
STORAGE_CLASSES: dict[str, str | None] = {
    "BOOL": "BoolStorage",
    "U8": "ByteStorage",
    "I8": "CharStorage",
    "F8_E5M2": None,
    "F8_E4M3": None,
    "I16": "ShortStorage",
    "U16": None,
    "F16": "HalfStorage",
    "BF16": "BFloat16Storage",
    "I32": "IntStorage",
    "U32": None,
    "F32": "FloatStorage",
    "C64": "ComplexFloatStorage",
    "F64": "DoubleStorage",
    "I64": "LongStorage",
    "U64": None,
}

# every global data.pkl may name (GLOBAL "module name", with Python 2's "__builtin__" read as
# "builtins", which is what torch.save's protocol-2 pickler writes) -> what torch.save writes it for
GLOBALS: dict[str, str] = {
    "collections.OrderedDict": "OrderedDict, and every tensor's (empty) backward-hooks argument",
    "collections.Counter": "Counter (MultiStepLR's milestones)",
    "builtins.set": "set",
    "builtins.complex": "complex",
    "_codecs.encode": "bytes (non-empty)",
    "torch.device": "torch.device",
    "torch._utils._rebuild_tensor_v2": "a tensor whose dtype has a typed storage class",
    "torch._utils._rebuild_tensor_v3": "a tensor of U16, U32, U64, F8_E5M2 or F8_E4M3",
    "torch.storage.UntypedStorage": "the storage of a _rebuild_tensor_v3 tensor",
    **{f"torch.{cls}": f"the storage of a {name} tensor" for name, cls in STORAGE_CLASSES.items() if cls},
    **{str(dtype): f"the dtype {name}" for name, dtype in DTYPES.items()},
}
_MODULE_NAMES = {"__builtin__": "builtins"}

# every opcode data.pkl may hold (pickle protocol 2, as torch.save writes it) -> what it does
OPCODES: dict[str, str] = {
    "PROTO": "protocol 2: the first opcode, and only there",
    "STOP": "the end: the last byte of data.pkl",
    "MARK": "starts a tuple, list or dict body",
    "NONE": "None",
    "NEWTRUE": "True",
    "NEWFALSE": "False",
    "BININT": "a 4-byte signed integer",
    "BININT1": "a 1-byte unsigned integer",
    "BININT2": "a 2-byte unsigned integer",
    "LONG1": "an integer of at most 255 bytes",
    "BINFLOAT": "a float",
    "BINUNICODE": "a string",
    "EMPTY_TUPLE": "()",
    "TUPLE": "a tuple from the mark",
    "TUPLE1": "a 1-tuple",
    "TUPLE2": "a 2-tuple",
    "TUPLE3": "a 3-tuple",
    "EMPTY_LIST": "[]",
    "APPEND": "list append",
    "APPENDS": "list extend from the mark",
    "EMPTY_DICT": "{}",
    "SETITEM": "dict item",
    "SETITEMS": "dict items from the mark",
    "BINPUT": "memoize",
    "LONG_BINPUT": "memoize",
    "BINGET": "memo reference",
    "LONG_BINGET": "memo reference",
    "GLOBAL": "one of the globals above",
    "REDUCE": "call a global of the allowlist",
    "BUILD": "set the attributes of an OrderedDict (a model state_dict's _metadata)",
    "BINPERSID": "a storage: the persistent id ('storage', storage type, key, location, element count)",
}

# the records of a torch.save archive, below its one top-level directory -> the most bytes each may hold
MAX_PICKLE_BYTES = 64 * 1024 * 1024
RECORDS: dict[str, int] = {
    "data.pkl": MAX_PICKLE_BYTES,
    "version": 64,
    ".data/version": 64,
    "byteorder": 64,
    ".format_version": 64,
    ".storage_alignment": 64,
    ".data/serialization_id": 64,
}
STORAGE_RECORD = re.compile(r"data/(0|[1-9][0-9]*)")  # data/<key>: the bytes of one storage

_LONG1_BITS = 2039  # an integer whose two's complement needs more than 255 bytes is pickled as LONG4
_NO_STORAGE_DEVICES = frozenset({"meta", "xla", "maia", "mtia", torch._C._get_privateuse1_backend_name()})
_TORCH_DTYPES = frozenset(DTYPES.values())
_SCALARS = frozenset({str, float, bool, complex, type(None), torch.device})
_MAPPINGS = frozenset({dict, collections.OrderedDict, collections.Counter})
_SEQUENCES = frozenset({list, tuple, set})

# What a damaged or hostile .pt file can still make torch.load raise after check_archive; torch does
# not narrow this down (AssertionError: "saved_id must be a tuple, got int"; LookupError: an unknown
# codec given to _codecs.encode; RuntimeError: a storage record that is missing; ...).
TORCH_LOAD_ERRORS = (
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    struct.error,
    RuntimeError,
    EOFError,
    ValueError,
    LookupError,
    TypeError,
    AttributeError,
    ArithmeticError,
    ImportError,
    AssertionError,
    RecursionError,
    MemoryError,
    BufferError,
    SystemError,
    NotImplementedError,
)
# NotImplementedError: a zip feature zipfile does not read (a "version needed to extract" above 6.3)
MAX_STATE_DEPTH = 64  # containers in an optimizer, scheduler or scaler state, as in JSON (§4)
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    ValueError,
    EOFError,
    struct.error,
    OverflowError,
    NotImplementedError,
)
_EOCD = b"PK\x05\x06"  # end of central directory record: 22 bytes, the last of the file (no comment)
_LOCAL_HEADER = b"PK\x03\x04"


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def _render(what: str, node: tuple[Any, ...] | None) -> str:
    """The key path of a value: ``optimizer.param_groups[0]['mode']``."""
    steps: list[tuple[Any, str]] = []
    while node is not None:
        node, key, how = node
        steps.append((key, how))
    out = what
    for depth, (key, how) in enumerate(reversed(steps)):
        if how == "index":
            out += f"[{key}]"
        elif how == "attribute":
            out += f".__dict__[{key!r}]"
        elif how == "key":
            out += f" (the key {key!r})"
        elif depth == 0 and isinstance(key, str) and key.isidentifier():
            out += f".{key}"
        else:
            out += f"[{key!r}]"
    return out


def _tensor_problem(t: torch.Tensor) -> str | None:
    if t.dtype not in _TORCH_DTYPES:
        return f"a tensor of dtype {t.dtype}, which is not in the format's dtype table"
    if t.layout is not torch.strided or t.is_quantized or t.is_nested:
        return (
            f"a {t.layout} tensor (quantized: {t.is_quantized}, nested: {t.is_nested}); only dense tensors are allowed"
        )
    if t.device.type in _NO_STORAGE_DEVICES:
        return f"a tensor on device {t.device.type}, which has no storage to save"
    if t.__dict__:
        return f"a tensor carrying Python attributes {sorted(t.__dict__)[:5]}"
    return None


def check_state(obj: Any, what: str = "state") -> None:
    """Refuse (``CheckpointInputError``) any value of ``obj`` that the format's allowlist cannot rebuild.

    ``what`` names the object in the message (``optimizer``, ``scheduler``, ``scaler``). One cheap walk:
    exact types only (an ``int`` subclass such as an ``Enum`` member is refused), shared and cyclic
    containers visited once, tensors checked by their metadata, never their data.
    """
    stack: list[tuple[Any, tuple[Any, ...] | None, int]] = [(obj, None, 0)]
    seen: set[int] = set()
    while stack:
        value, where, depth = stack.pop()
        kind = type(value)
        problem = None
        if kind in _SCALARS:
            continue
        if depth > MAX_STATE_DEPTH:  # torch.save and torch.load recurse once per level
            raise CheckpointInputError(
                f"{_render(what, where)}: containers nest deeper than {MAX_STATE_DEPTH} levels, more than a .pt "
                "file of a checkpoint holds (format_spec/README.md, the restricted .pt encoding); flatten the state"
            )
        if kind is int:
            if (value if value >= 0 else ~value).bit_length() <= _LONG1_BITS:
                continue
            problem = f"an integer of {value.bit_length()} bits (at most {_LONG1_BITS} bits fit the pickle)"
        elif kind is torch.Tensor:
            problem = _tensor_problem(value)
            if problem is None:
                continue
        elif kind is bytes:
            if value:
                continue
            problem = "an empty bytes object (torch.save pickles it as builtins.bytes, which is not allowed)"
        elif kind is torch.dtype:
            if value in _TORCH_DTYPES:
                continue
            problem = f"the dtype {value}, which is not in the format's dtype table"
        elif kind in _MAPPINGS or kind in _SEQUENCES:
            if id(value) in seen:
                continue
            seen.add(id(value))
            d = depth + 1
            if kind in _MAPPINGS:
                if kind is not dict and vars(value):  # pickled with BUILD
                    stack.extend((v, (where, k, "attribute"), d) for k, v in vars(value).items())
                for k, v in value.items():
                    stack.append((k, (where, k, "key"), d))
                    stack.append((v, (where, k, "item"), d))
            elif kind is set:
                stack.extend((v, (where, v, "key"), d) for v in value)
            else:
                stack.extend((v, (where, i, "index"), d) for i, v in enumerate(value))
            continue
        if problem is None:
            problem = f"a {kind.__module__}.{kind.__qualname__}"
        raise CheckpointInputError(
            f"{_render(what, where)} is {problem}: a .pt file of a checkpoint holds only tensors, dtypes, devices, "
            "dict, OrderedDict, Counter, list, tuple, set, str, bytes, int, float, complex, bool and None "
            "(format_spec/README.md, the restricted .pt encoding); convert the value (e.g. an Enum to its .value, "
            "a numpy number with float() or int()) before saving"
        )


class _HashingWriter:
    """A file-like sink for torch.save that hashes bytes on their way to the file (no buffered copy)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.hash = new_hasher()
        self.size = 0
        self.error: OSError | None = None  # torch.save turns a failed write into a RuntimeError

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        self.hash.update(view)
        self.size += n
        try:
            while view:
                view = view[self.stream.write(view) :]
        except OSError as e:
            self.error = e
            raise
        return n

    def flush(self) -> None:
        pass


class _Pickler(pickle.Pickler):
    """torch.save's pickler (torch/serialization.py ``_save``): protocol 2, every storage replaced by the
    persistent id ('storage', storage type, key, location, element count), keys "0", "1", ... in order of
    first appearance; the storages are collected for the records that follow data.pkl."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=2)
        self.keys: dict[int, str] = {}
        self.storages: dict[str, torch.UntypedStorage] = {}
        self.dtypes: dict[int, torch.dtype] = {}

    def persistent_id(self, obj: Any) -> tuple[Any, ...] | None:
        if isinstance(obj, torch.storage.TypedStorage):
            storage, dtype = obj._untyped_storage, obj.dtype
            storage_type: Any = getattr(torch, obj._pickle_storage_type())
            numel = obj._size()
        elif isinstance(obj, torch.UntypedStorage):
            storage, dtype, storage_type, numel = obj, torch.uint8, torch.UntypedStorage, obj.nbytes()
        else:
            return None
        shared = storage.device.type != "meta" and storage.data_ptr() != 0
        if shared and self.dtypes.setdefault(storage.data_ptr(), dtype) != dtype:
            raise RuntimeError("Cannot save multiple tensors or storages that view the same data as different types")
        key = self.keys.setdefault(storage._cdata, str(len(self.keys)))
        self.storages[key] = storage
        return ("storage", storage_type, key, torch.serialization.location_tag(storage), numel)


# The container torch.save writes (caffe2/serialize/inline_container.cc, through miniz), as long as no size
# or offset needs a zip64 field: each record stored, its data aligned to 64 bytes by an "FB" extra field
# of "Z"s, CRC-32 left 0 (the manifest's XXH3 covers the file), sizes in a data descriptor after it.
_ALIGNMENT = 64
_ZIP32_END = 0xFFFFFFFF
_SMALL_RECORD = 64 << 10  # records below this are copied into the pending buffer, not written alone


def _flags(size: int) -> int:
    return 0x0808 if size else 0x0800  # UTF-8 names; sizes in a data descriptor, which an empty record lacks


def _local_header(name: bytes, offset: int, size: int) -> bytes:
    pad = -(offset + 30 + len(name) + 4) % _ALIGNMENT
    head = struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, _flags(size), 0, 0, 0, 0, 0, 0, len(name), 4 + pad)
    return head + name + b"FB" + struct.pack("<H", pad) + b"Z" * pad


def _descriptor(size: int) -> bytes:
    return struct.pack("<IIII", 0x08074B50, 0, size, size) if size else b""


def _central_directory(records: list[tuple[bytes, int, int]], start: int) -> bytes:
    """The central directory, zip64 end records and end record, for records (name, size, header offset)."""
    cd = b"".join(
        struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, _flags(size), 0, 0, 0, 0, size, size, len(name), 0, 0, 0, 0, 0, at
        )
        + name
        for name, size, at in records
    )
    n, end = len(records), start + len(cd)
    zip64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, n, n, len(cd), start)
    locator = struct.pack("<IIQI", 0x07064B50, 0, end, 1)
    return cd + zip64 + locator + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(cd), start, 0)


def _storage_bytes(storage: torch.UntypedStorage) -> memoryview:
    n = storage.nbytes()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(storage.data_ptr())).cast("B")


def _write_archive(stream: BinaryIO, obj: Any) -> tuple[int, str] | None:
    """Write ``obj`` as torch.save would, straight from the storages' memory: one write per large storage
    and one per run of small records (torch.save makes several per record, ~4,000 for an AdamW state).
    None, with nothing written, where the archive would need zip64 fields (4 GiB and more): torch.save
    writes those."""
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    pickler.dump(obj)
    data_pkl = buf.getvalue()
    alignment = str(_SERIALIZATION_CONFIG.save.storage_alignment if _SERIALIZATION_CONFIG is not None else 64)
    small: list[tuple[str, bytes]] = [
        ("data.pkl", data_pkl),
        (".format_version", b"1"),
        (".storage_alignment", alignment.encode()),
        ("byteorder", sys.byteorder.encode()),
    ]
    names = [n for n, _ in small] + [f"data/{key}" for key in pickler.storages] + ["version", ".data/serialization_id"]
    # torch derives this id from record-name hashes; readers only compare it for equality: ours is as unique
    serial = str(int(checksum(b"\0".join(n.encode() for n in names) + data_pkl), 16) % 10**40).zfill(40).encode()
    contents: list[bytes | torch.UntypedStorage] = [d for _, d in small]
    contents += [*pickler.storages.values(), b"3\n", serial]
    records: list[tuple[bytes, int, int]] = []
    offset = 0
    for name, data in zip(names, contents, strict=True):
        encoded = f"archive/{name}".encode()
        size = data.nbytes() if isinstance(data, torch.UntypedStorage) else len(data)
        records.append((encoded, size, offset))
        offset += len(_local_header(encoded, offset, size)) + size + len(_descriptor(size))
    if offset >= _ZIP32_END or len(records) >= 0xFFFF:
        return None
    file_hash = new_hasher()
    pending = bytearray()
    with _threads.Trailing("hash") as behind:

        def put(view: memoryview) -> None:
            while view:
                view = view[stream.write(view) :]

        def flush() -> None:
            nonlocal pending
            if pending:
                data = memoryview(pending)
                put(data)
                behind.put(file_hash.update, data, inline=True)
                pending = bytearray()

        # three phases, each at least one write: the pickle and the small records, the storages, then the
        # closing records and the central directory (a failure can land in any of them)
        phases = {len(small), len(records) - 2}
        for k, ((encoded, size, at), data) in enumerate(zip(records, contents, strict=True)):
            if k in phases:
                flush()
            pending += _local_header(encoded, at, size)
            if not isinstance(data, torch.UntypedStorage):
                pending += data
            else:
                host = data if data.device.type == "cpu" else data.cpu()
                view = _storage_bytes(host)
                if size < _SMALL_RECORD:
                    pending += view
                else:
                    flush()
                    put(view)
                    behind.put(_update, file_hash, view, host)
                    if host is not data:
                        behind.drain()  # one host copy of a device storage at a time
            pending += _descriptor(size)
        pending += _central_directory(records, offset)
        total = offset + len(_central_directory(records, offset))
        flush()
        behind.finish()
    return total, file_hash.hexdigest()


def _update(hasher: Any, view: memoryview, _keep: object) -> None:
    hasher.update(view)


def save(stream: BinaryIO, obj: Any, *, what: str = "state") -> tuple[int, str]:
    """Write ``obj`` as the torch.save file of it into a writable binary stream; returns (size, checksum).

    ``obj`` is checked first (``check_state``; ``what`` names it in the message), so a value outside the
    allowlist is refused before a byte is written. The archive is written from the storages' memory in
    torch.save's layout (``_write_archive``; torch.load reads it); only files of 4 GiB and more go
    through torch.save itself.
    """
    check_state(obj, what)
    written = _write_archive(stream, obj)
    if written is not None:
        return written
    writer = _HashingWriter(stream)
    with _no_zip_crc():
        try:
            torch.save(obj, writer)  # type: ignore[arg-type]
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None  # the disk's error, not torch's wrapper of it
            raise
    return writer.size, writer.hash.hexdigest()


def _no_zip_crc() -> contextlib.AbstractContextManager[Any]:
    """The zip CRC32 that torch.save computes costs ~40% of a save; the manifest's XXH3 covers the file."""
    if _SERIALIZATION_CONFIG is None:  # torch < 2.6 has no such switch
        return contextlib.nullcontext()
    patch: contextlib.AbstractContextManager[Any] = _SERIALIZATION_CONFIG.patch({"save.compute_crc32": False})
    return patch


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


def _corrupted(filename: str, what: str) -> CheckpointCorruptedError:
    return CheckpointCorruptedError(f"{filename}: not a readable torch.save file: {what}", file=filename)


def _read_record(f: BinaryIO, info: zipfile.ZipInfo, filename: str) -> bytes:
    """A stored member's bytes, read through its local header (zipfile's reader would check the CRC-32,
    which the format leaves 0)."""
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) < 30 or head[:4] != _LOCAL_HEADER:
        raise _corrupted(filename, f"member {info.filename!r}: no local file header at byte {info.header_offset}")
    (method,) = struct.unpack("<H", head[8:10])
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    name = f.read(name_len)
    encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
    if method != zipfile.ZIP_STORED or name != info.orig_filename.encode(encoding):
        raise _corrupted(filename, f"member {info.filename!r}: its local header disagrees with the central directory")
    f.seek(info.header_offset + 30 + name_len + extra_len)
    data = f.read(info.compress_size)
    if len(data) != info.compress_size:
        raise _corrupted(filename, f"member {info.filename!r} runs past the end of the file")
    return data


def _opcodes(data: bytes, filename: str) -> Iterator[tuple[str, Any, int]]:
    """(name, argument, byte offset) of each opcode up to STOP, parsed without executing anything."""
    ops = pickletools.genops(data)
    while True:
        try:
            op, arg, pos = next(ops)
        except StopIteration:
            return
        except ValueError as e:  # pickletools' word for a malformed pickle
            raise _corrupted(filename, f"data.pkl is not a valid pickle ({str(e)[:200]})") from None
        yield op.name, arg, pos if pos is not None else -1


# The allowed opcodes by their byte -> how their argument is laid out: a fixed size, "n1"/"n4" (a 1- or
# 4-byte length, then that many bytes), or "nl2" (two newline-terminated lines: GLOBAL).
_GLOBAL, _PROTO, _STOP, _LONG1, _BINUNICODE = (ord(c) for c in "c\x80.\x8aX")
_ALLOWED_GLOBALS = frozenset(
    f"{module} {attr}".encode()
    for full in GLOBALS
    for name, attr in [full.rsplit(".", 1)]
    for module in {name} | {k for k, v in _MODULE_NAMES.items() if v == name}
)


# A run of the allowed opcodes whose argument has a fixed size, matched in one call of the regex engine;
# BINPERSID (Q) only right after TUPLE (t), or after TUPLE and a BINPUT/LONG_BINPUT (q., r....).
_FIXED_RUN = re.compile(
    rb"(?:[(N\x88\x89\]ae)\x85\x86\x87}suRb]|[Kqh].|M.{2}|[Jjr].{4}|G.{8}|t(?:Q|q.Q|r.{4}Q)?)*", re.DOTALL
)


def _fast_scan(data: bytes) -> bool:
    """Whether data.pkl passes the allowlist, decided by a regex over its runs of fixed-size opcodes and a
    loop over the rest (strings, large ints, globals): pickletools' parser costs ~30 us per tensor (0.45 s
    for 15,000). False for anything it is not sure of: ``_scan_pickle``'s full parse then decides, with
    its precise message."""
    n = len(data)
    if n < 3 or data[0] != _PROTO or data[1] != 2:
        return False
    pos = 2
    while True:
        match = _FIXED_RUN.match(data, pos)
        pos = match.end() if match else pos
        if pos >= n:
            return False  # no STOP
        op = data[pos]
        pos += 1
        if op == _STOP:
            return pos == n
        if op == _LONG1:
            if pos >= n:
                return False
            pos += 1 + data[pos]
        elif op == _BINUNICODE:
            if pos + 4 > n:
                return False
            (length,) = struct.unpack_from("<I", data, pos)
            try:
                data[pos + 4 : pos + 4 + length].decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                return False
            pos += 4 + length
        elif op == _GLOBAL:
            first = data.find(b"\n", pos)
            second = data.find(b"\n", first + 1) if first >= 0 else -1
            if second < 0 or data[pos:second].replace(b"\n", b" ") not in _ALLOWED_GLOBALS:
                return False
            pos = second + 1
        else:
            return False
        if pos > n:
            return False


def _scan_pickle(data: bytes, filename: str) -> None:
    """Every opcode and global of data.pkl against the allowlist; the persistent ids are tuples."""
    if _fast_scan(data):
        return
    prev: tuple[str, str] = ("", "")
    end = -1
    for name, arg, pos in _opcodes(data, filename):
        if name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            full = f"{_MODULE_NAMES.get(module, module)}.{attr}"
            if full not in GLOBALS:
                raise CheckpointUnsafeError(
                    f"{filename}: refused to unpickle, unsafe: data.pkl (byte {pos}) names the global "
                    f"{full[:200]}, which the format does not allow (only tensors and plain containers; "
                    "no code from a checkpoint is ever run); the file may be hostile",
                    file=filename,
                )
        elif name not in OPCODES:
            raise CheckpointUnsafeError(
                f"{filename}: refused to unpickle, unsafe: data.pkl (byte {pos}) holds the pickle opcode {name}, "
                "which the format does not allow (no code from a checkpoint is ever run); the file may be hostile",
                file=filename,
            )
        if (pos == 0) != (name == "PROTO") or (name == "PROTO" and arg != 2):
            raise _corrupted(filename, f"data.pkl must begin with PROTO 2, and only there (byte {pos}: {name})")
        if name == "BINPERSID" and not (
            prev[1] == "TUPLE" or (prev[1] in ("BINPUT", "LONG_BINPUT") and prev[0] == "TUPLE")
        ):
            raise _corrupted(
                filename,
                f"data.pkl (byte {pos}): a persistent id that is not a tuple "
                "('storage', storage type, key, location, element count)",
            )
        prev = (prev[1], name)
        if name == "STOP":
            end = pos + 1
    if end != len(data):
        raise _corrupted(filename, f"data.pkl holds {len(data) - end} bytes after its STOP opcode")


def check_archive(f: BinaryIO, filename: str) -> None:
    """The static check of a .pt file: the zip container of torch.save, every record stored uncompressed and
    within its bound, then every opcode of data.pkl against the allowlist. Reads only the small records."""
    size = f.seek(0, os.SEEK_END)
    if size < 22:
        raise _corrupted(filename, f"not a zip archive ({size} bytes)")
    f.seek(size - 22)
    tail = f.read(22)
    if tail[:4] != _EOCD or tail[20:22] != b"\0\0":
        raise _corrupted(filename, "not a zip archive that ends with its end-of-central-directory record")
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as z:
            infos = z.infolist()
    except _ZIP_ERRORS as e:
        raise _corrupted(filename, f"not a zip archive ({str(e)[:200]})") from None
    if not infos or min(i.header_offset for i in infos) != 0:
        raise _corrupted(filename, "the zip archive does not start at the first byte of the file")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise _corrupted(filename, f"member {duplicate!r} appears twice")
    archive = names[0].partition("/")[0]
    records: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        top, slash, record = info.filename.partition("/")
        if not slash or top != archive or top in ("", ".", "..") or "\\" in top or "\0" in top:
            raise _corrupted(filename, f"member {info.filename[:200]!r} is not in the archive's one directory")
        limit = RECORDS.get(record)
        if limit is None and not STORAGE_RECORD.fullmatch(record):
            raise _corrupted(
                filename,
                f"unexpected member {info.filename[:200]!r} (a torch.save archive holds data.pkl, data/<n>, "
                "version, byteorder, .format_version, .storage_alignment and .data/serialization_id)",
            )
        if info.compress_type != zipfile.ZIP_STORED:
            raise _corrupted(
                filename,
                f"member {info.filename!r} is compressed (method {info.compress_type}); torch.save "
                "stores every member uncompressed, and so must every .pt file of a checkpoint",
            )
        if info.flag_bits & 0x1:
            raise _corrupted(filename, f"member {info.filename!r} is encrypted")
        if info.file_size != info.compress_size:
            raise _corrupted(filename, f"member {info.filename!r}: stored, yet its two sizes differ")
        if limit is not None:
            if info.file_size > limit:
                raise _corrupted(
                    filename, f"member {info.filename!r} is {info.file_size} bytes, over its limit of {limit}"
                )
            records[record] = info
    if "data.pkl" not in records:
        raise _corrupted(filename, f"the archive has no {archive}/data.pkl")
    if "byteorder" in records and _read_record(f, records["byteorder"], filename) != b"little":
        raise _corrupted(filename, "byteorder is not 'little'")
    for record in sorted(set(records) - {"data.pkl", "byteorder"}):
        _read_record(f, records[record], filename)  # small; checks that its local header agrees
    _scan_pickle(_read_record(f, records["data.pkl"], filename), filename)


@contextlib.contextmanager
def _opened(source: str | os.PathLike[str] | BinaryIO, filename: str) -> Iterator[tuple[BinaryIO, str | None]]:
    """The open file to check, and a path naming that very file for a memory-mapped torch.load (None:
    read it from the stream), so that nothing can swap the file between the check and the load."""
    if not isinstance(source, (str, os.PathLike)):
        yield source, None
        return
    try:
        f = open(source, "rb")  # noqa: SIM115 -- held open for the torch.load that follows
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"{filename}: removed while the checkpoint was being read (retention or a concurrent overwrite)",
            file=filename,
        ) from None
    with f:
        proc = f"/proc/self/fd/{f.fileno()}"
        yield f, (proc if os.path.exists(proc) else None)


def load(source: str | os.PathLike[str] | BinaryIO, filename: str, map_location: Any, *, mmap: bool = True) -> Any:
    """``check_archive``, then torch.load with weights_only=True; any refusal or damage becomes
    ``CheckpointCorruptedError`` (``CheckpointUnsafeError`` for what the allowlist refuses) naming the file.

    ``mmap`` (for a path) maps the tensors' bytes instead of copying them; a stream is always copied.
    """
    with _opened(source, filename) as (f, path):
        check_archive(f, filename)
        f.seek(0)
        try:
            # mmap: tensors are read from the page cache on first touch instead of copied up front
            if path is not None:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            return torch.load(f, map_location=map_location, weights_only=True, mmap=False)
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"{filename}: removed while the checkpoint was being read (retention or a concurrent overwrite)",
                file=filename,
            ) from None
        except pickle.UnpicklingError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            # torch's first line advises weights_only=False; the line naming the refused global is the reason
            reason = next(
                (ln for ln in lines if "GLOBAL" in ln or "global" in ln), lines[-1] if lines else type(e).__name__
            )
            raise CheckpointCorruptedError(
                f"{filename}: refused to unpickle (only tensors and plain containers are allowed; "
                f"no code from a checkpoint is ever run): {reason[:300]}",
                file=filename,
            ) from None
        except TORCH_LOAD_ERRORS as e:
            raise _corrupted(filename, f"{type(e).__name__}: {str(e)[:300]}") from None


__all__ = [
    "GLOBALS",
    "OPCODES",
    "RECORDS",
    "STORAGE_CLASSES",
    "TORCH_LOAD_ERRORS",
    "check_archive",
    "check_state",
    "load",
    "save",
]
