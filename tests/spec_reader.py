"""A minimal reader of format_versions 1, 2 and 3, written only from ``format_spec/`` (and its schemas).

It imports nothing from ``portable_ckpt``: it exists to show that the specification is enough to read a
checkpoint, and to cross-check the reference implementation, down to the error class of every refusal
(§18: the class is normative, the message is not). It resolves a path (§3.5) and a root (§3.1, §3.2),
verifies the manifest checksum over the bytes it read (§10), every listed file's size and checksum (§13),
parses model.safetensors (§5.5), checks every per-tensor checksum, the RNG files (§14), the quantization
summary (§7), the JSON rules of every JSON text (§4), the restricted .pt encoding statically and then with
``torch.load(weights_only=True)`` (§4), and returns the model state with aliases (§6).

A sharded checkpoint (format_version 2, §20) is read whole, in one process: ``sharding.json`` against schema
``sharding`` and every rule of §20.2 (chunk files listed, chunk bounds, no overlap, volumes that cover the
tensor, one chunk per (file, key), no path conflicts), every shard file as a safetensors file whose tensors
are exactly its manifest entry's ``tensors``, each chunk's stored dtype and shape and its per-tensor checksum,
the values in the typed encoding of states.json without ``$tensor``, and each rank's ``rng-R-of-W`` pair as
§14 says. ``load`` returns the model state (the ``"model"`` entries, named by ``path[1]``, reassembled as
full tensors); ``load_sharded`` also gives every reassembled tensor and the nested state of §20.3, and
``optimizer_state_dict`` numbers an optimizer's parameters as §20.3 describes.

An incremental checkpoint (format_version 3, §21) is format_version 1 with ``model.safetensors`` replaced by
the model parts ``model-IIIII-of-NNNNN.safetensors``: rules 1 to 4 of §21.1 are checked on the manifest (at
least one part, one ``n``, every index of ``0 .. n-1`` listed once, a ``tensors`` table for every part, no tensor
name in two tables), then every part as ``model.safetensors`` (§5.5, its tensors exactly its table, every
per-tensor checksum); the model state is the union, and ``aliases`` refer to it. A listed ``model.safetensors``
is then an unknown file, verified and otherwise ignored.

Out of scope: format 0, the module-by-module checks of quantization.md, and the user object states
(``states.*``, ``states-R-of-W.*``), which are verified as listed files and otherwise not read. A reader at
another number of ranks (§20.5) is out of scope too. ``manifest_bytes`` is §10's writer side, for comparing
files byte for byte.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import pickletools
import re
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import torch
import xxhash

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
STEP_DIR = re.compile(r"step-[0-9]{8,}")
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")
MAX_HEADER = 100_000_000
# §10: the file ends with the checksum as the top-level object's last member
TRAILER = re.compile(rb',"manifest_checksum":"([0-9a-f]{32})"\}\n\Z')
MAX_JSON = 64 * 1024 * 1024
MAX_DEPTH = 64  # §4: nesting of arrays and objects
INT_RANGE = (-(2**63), 2**64)  # §4: every JSON integer, [low, high)
LATEST_MAX = 4096  # §3.2
LATEST_WHITESPACE = b" \t\n\r"  # §3.2: JSON whitespace, and only it, is stripped
JSON_FILES = {"config.json", "vocab.json", "rng.json", "quantization_metadata.json"}
MAX_VERSION = 3  # §15: the highest format_version this reader implements
# §21.1: a model part of format_version 3, part i of n (both zero-padded to at least five digits)
MODEL_PART = re.compile(r"model-([0-9]{5,})-of-([0-9]{5,})\.safetensors")

# §5.4: dtype -> (rank, torch dtype, bytes per element)
DTYPES: dict[str, tuple[int, torch.dtype, int]] = {
    "BOOL": (0, torch.bool, 1),
    "U8": (1, torch.uint8, 1),
    "I8": (2, torch.int8, 1),
    "F8_E5M2": (3, torch.float8_e5m2, 1),
    "F8_E4M3": (4, torch.float8_e4m3fn, 1),
    "I16": (5, torch.int16, 2),
    "U16": (6, torch.uint16, 2),
    "F16": (7, torch.float16, 2),
    "BF16": (8, torch.bfloat16, 2),
    "I32": (9, torch.int32, 4),
    "U32": (10, torch.uint32, 4),
    "F32": (11, torch.float32, 4),
    "C64": (12, torch.complex64, 8),
    "F64": (13, torch.float64, 8),
    "I64": (14, torch.int64, 8),
    "U64": (15, torch.uint64, 8),
}

# §4, the restricted .pt encoding: the opcodes, the globals (with __builtin__ read as builtins), the records
PT_OPCODES = {
    "PROTO", "STOP", "MARK", "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT",
    "BINUNICODE", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "APPEND", "APPENDS",
    "EMPTY_DICT", "SETITEM", "SETITEMS", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET", "GLOBAL", "REDUCE",
    "BUILD", "BINPERSID",
}  # fmt: skip
PT_STORAGES = [
    "Bool", "Byte", "Char", "Short", "Half", "BFloat16", "Int", "Float", "ComplexFloat", "Double", "Long"
]  # fmt: skip
PT_GLOBALS = {
    "collections.OrderedDict",
    "collections.Counter",
    "builtins.set",
    "builtins.complex",
    "_codecs.encode",
    "torch.device",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch.storage.UntypedStorage",
    *(f"torch.{kind}Storage" for kind in PT_STORAGES),
    *(str(dtype) for _, dtype, _ in DTYPES.values()),
}
PT_RECORDS = {
    "data.pkl": 67_108_864,
    "byteorder": 64,
    "version": 64,
    ".data/version": 64,
    ".format_version": 64,
    ".storage_alignment": 64,
    ".data/serialization_id": 64,
}
PT_STORAGE_RECORD = re.compile(r"data/(0|[1-9][0-9]*)")

# §14: the tensors of rng.safetensors
RNG_TENSORS = {"torch.cpu": ("U8", [5056]), "python": ("I64", [625]), "numpy": ("I64", [624])}
CUDA_STATE = ("U8", [16])


class SpecError(Exception):
    """Anything the specification says a reader must refuse; ``error`` is the class §18 names for it."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error


def corrupted(message: str) -> SpecError:
    return SpecError("CheckpointCorruptedError", message)


def not_found(message: str) -> SpecError:
    return SpecError("CheckpointNotFoundError", message)


def xxh3(data: bytes) -> str:
    """§8: XXH3-128, 32 lowercase hex digits, high 64 bits first."""
    return xxhash.xxh3_128_hexdigest(data)


def canonical(value: Any) -> bytes:
    """§9: the canonical bytes of a JSON value."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8") + b"\n"


def manifest_bytes(doc: dict[str, Any]) -> bytes:
    """§10, writer side: the canonical body, then its checksum inserted as the last member."""
    body = canonical({k: v for k, v in doc.items() if k != "manifest_checksum"})
    return body[:-2] + b',"manifest_checksum":"' + xxh3(body).encode("ascii") + b'"}\n'


# --------------------------------------------------------------------------------------------------
# §4: JSON texts
# --------------------------------------------------------------------------------------------------


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _binary64(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is beyond binary64")
    return value


def _integer(text: str) -> int:
    """§4: exact, in [-2**63, 2**64), refused by its length before conversion when longer than 20 digits."""
    if len(text.lstrip("-")) > 20:
        raise ValueError("integer literal of more than 20 digits")
    value = int(text)
    if not INT_RANGE[0] <= value < INT_RANGE[1]:
        raise ValueError(f"integer {value} outside [-2**63, 2**64)")
    return value


def _check_strings_and_depth(doc: Any) -> None:
    """No lone surrogate in any string (key or value); arrays and objects nested at most 64 deep."""
    stack = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            value.encode("utf-8")  # a lone surrogate has no UTF-8 encoding
        elif isinstance(value, (dict, list)):
            if depth + 1 > MAX_DEPTH:
                raise ValueError(f"nested deeper than {MAX_DEPTH}")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)


def json_text(data: bytes) -> Any:
    """§4: one JSON text, by the rules of every JSON text (no size limit here)."""
    try:
        doc = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_pairs,
            parse_constant=_constant,
            parse_float=_binary64,
            parse_int=_integer,
        )
        _check_strings_and_depth(doc)
    except (UnicodeError, ValueError, RecursionError) as e:
        raise corrupted(f"invalid JSON: {e}") from None
    return doc


def strict_json(data: bytes) -> Any:
    """§4: a JSON file: at most 64 MiB, and the rules of every JSON text."""
    if len(data) > MAX_JSON:
        raise corrupted("JSON file over 64 MiB")
    return json_text(data)


def _plain_integer(checker: Any, value: Any) -> bool:
    return type(value) is int  # §1: 3.0 and True are not integers here


_VALIDATOR = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _plain_integer),
)


def validate(doc: Any, schema: str, error: str = "CheckpointCorruptedError") -> None:
    """§1: valid under the draft 2020-12 schema, with integers plain JSON integers."""
    with open(SCHEMAS / f"{schema}.schema.json", encoding="utf-8") as f:
        found = jsonschema.exceptions.best_match(_VALIDATOR(json.load(f)).iter_errors(doc))
    if found is not None:
        raise SpecError(error, f"{schema}: {found.message[:200]}")


# --------------------------------------------------------------------------------------------------
# §3: paths and roots
# --------------------------------------------------------------------------------------------------


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """§17: never block; only regular files (a symlink is followed to one, §4)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise not_found(f"{path.name} is missing") from None
    except OSError as e:
        raise corrupted(f"{path.name}: cannot open ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise corrupted(f"{path.name} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        return f.read() if limit is None else f.read(limit)


def step_of(name: str) -> int | None:
    """§3.1: the step a step directory name denotes (only its one spelling counts), else None."""
    if not STEP_DIR.fullmatch(name):
        return None
    step = int(name[5:])
    return step if name == f"step-{step:08d}" else None


def _committed(root: Path, name: str) -> bool:
    """§3.1: a step directory holding a regular file manifest.json."""
    try:
        return stat.S_ISREG(os.stat(root / name / "manifest.json").st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def _has(path: Path, name: str, *, regular: bool = False) -> bool:
    try:
        mode = os.stat(path / name).st_mode
    except FileNotFoundError:
        return os.path.islink(path / name) and not regular
    return stat.S_ISREG(mode) or not regular


def latest(root: Path) -> Path:
    """§3.2: the checkpoint ``latest`` names if committed, else the highest committed step."""
    try:
        data = read_regular(root / "latest", LATEST_MAX + 1)
    except SpecError:
        data = b""
    name = data.strip(LATEST_WHITESPACE) if len(data) <= LATEST_MAX else b""
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if step_of(text) is not None and _committed(root, text):
        return root / text
    committed = sorted((step, n) for n in os.listdir(root) if (step := step_of(n)) is not None and _committed(root, n))
    if not committed:
        raise not_found(f"{root}: no committed checkpoint")
    return root / committed[-1][1]


def resolve(path: Path) -> Path:
    """§3.5: what a path names."""
    if not path.is_dir():
        raise not_found(f"{path}: no such directory")
    if _has(path, "manifest.json"):
        return path
    if _has(path, "model.pt", regular=True) and _has(path, "metadata.json", regular=True):
        raise SpecError("NotImplemented", f"{path}: format 0 is out of this reader's scope")
    if (
        step_of(path.name) is not None
        or _has(path, "model.safetensors")
        or any(MODEL_PART.fullmatch(n) for n in os.listdir(path))
    ):
        raise not_found(f"{path}: manifest.json is missing; the checkpoint is incomplete")
    return latest(path)


# --------------------------------------------------------------------------------------------------
# §7, §10, §13: the manifest and the listed files
# --------------------------------------------------------------------------------------------------


def read_manifest(directory: Path) -> dict[str, Any]:
    """§7, §10, §13 step 1 and 2, §15: the manifest, its version, schema, checksum, names and step."""
    data = read_regular(directory / "manifest.json")
    doc = strict_json(data)
    if not isinstance(doc, dict):
        raise corrupted("manifest.json is not an object")
    version = doc.get("format_version")
    if doc.get("format") == "portable-ckpt" and type(version) is int and version > MAX_VERSION:
        raise SpecError("UnsupportedFormatVersionError", f"format_version {version} is newer than {MAX_VERSION}")
    validate(doc, "manifest")
    trailer = TRAILER.search(data)
    if trailer is None:
        raise corrupted("manifest.json does not end with its manifest_checksum member")
    digest = trailer.group(1).decode("ascii")
    if xxh3(data[: trailer.start()] + b"}\n") != digest or doc.get("manifest_checksum") != digest:
        raise corrupted("manifest_checksum does not match")
    for name in doc["files"]:
        if not FILE_NAME.fullmatch(name) or len(name) > 128 or name in ("manifest.json", "latest"):
            raise corrupted(f"file name {name!r} is not allowed")
    step = step_of(directory.name)
    if step is not None and step != doc["step"]:
        raise corrupted("step disagrees with the directory name")
    return doc


def read_file(directory: Path, manifest: dict[str, Any], name: str) -> bytes:
    """§13 step 3: a listed file exists, is regular, and has its size and checksum."""
    entry = manifest["files"][name]
    try:
        data = read_regular(directory / name)
    except SpecError as e:
        if e.error == "CheckpointNotFoundError":
            raise not_found(f"{name} is listed in the manifest but missing") from None
        raise
    if len(data) != entry["size"] or xxh3(data) != entry["checksum"]:
        raise corrupted(f"{name}: size or checksum mismatch")
    return data


# --------------------------------------------------------------------------------------------------
# §5: safetensors
# --------------------------------------------------------------------------------------------------


def parse_safetensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """§5.5: the tensors of a safetensors file, and each one's absolute byte range."""
    if len(data) < 8:
        raise corrupted("shorter than 8 bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise corrupted(f"header length {n}")
    header = json_text(data[8 : 8 + n])  # §5.5 item 3: the rules of every JSON text, the header's own limit
    if not isinstance(header, dict):
        raise corrupted("header is not an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise corrupted("__metadata__")
    spans = []
    for name, entry in header.items():
        if not name or not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise corrupted(f"entry {name!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise corrupted(f"unknown dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or not all(type(d) is int and 0 <= d < 2**64 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and 0 <= o < 2**64 for o in offsets)
        ):
            raise corrupted(f"entry {name!r}")
        begin, end = offsets
        numel = 1
        for d in shape:  # §5.5: every running product of the dimensions stays below 2**64
            numel *= d
            if numel >= 2**64:
                raise corrupted(f"entry {name!r}: 2**64 elements or more")
        if not 0 <= begin <= end or end - begin != numel * DTYPES[dtype][2]:
            raise corrupted(f"entry {name!r}: offsets")
        spans.append((begin, end, name, dtype, shape))
    cursor = 0
    for begin, end, name, _, _ in sorted(spans):
        if begin != cursor:
            raise corrupted(f"tensor {name!r}: gap or overlap")
        cursor = end
    if 8 + n + cursor != len(data):
        raise corrupted("data does not end at the end of the file")
    tensors, ranges = {}, {}
    for begin, end, name, dtype, shape in spans:
        torch_dtype = DTYPES[dtype][1]
        if end == begin:
            t = torch.empty(shape, dtype=torch_dtype)
        else:
            t = torch.frombuffer(bytearray(data[8 + n + begin : 8 + n + end]), dtype=torch_dtype).reshape(shape)
        tensors[name] = t
        ranges[name] = (8 + n + begin, 8 + n + end)
    return tensors, ranges


def _dtype_name(t: torch.Tensor) -> str:
    return next(name for name, (_, dtype, _) in DTYPES.items() if dtype == t.dtype)


# --------------------------------------------------------------------------------------------------
# §4: the restricted .pt encoding
# --------------------------------------------------------------------------------------------------


def _pt_record(data: bytes, info: zipfile.ZipInfo) -> bytes:
    """A stored member's bytes, through its local header, which must agree with the central directory."""
    at = info.header_offset
    if data[at : at + 4] != b"PK\x03\x04" or struct.unpack("<H", data[at + 8 : at + 10])[0] != 0:
        raise corrupted(f"{info.filename}: local header")
    name_len, extra_len = struct.unpack("<HH", data[at + 26 : at + 30])
    if data[at + 30 : at + 30 + name_len] != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
        raise corrupted(f"{info.filename}: local header name")
    start = at + 30 + name_len + extra_len
    return data[start : start + info.compress_size]


def check_pt(data: bytes) -> None:
    """§4: the container and its records, then every opcode and global of data.pkl."""
    if len(data) < 22 or data[-22:-18] != b"PK\x05\x06" or data[-2:] != b"\0\0":
        raise corrupted("not a zip archive ending with its end-of-central-directory record")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, struct.error) as e:
        raise corrupted(f"not a zip archive: {e}") from None
    names = [i.filename for i in infos]
    if not infos or min(i.header_offset for i in infos) != 0 or len(set(names)) != len(names):
        raise corrupted("zip layout")
    archive = names[0].split("/", 1)[0]
    records = {}
    for info in infos:
        top, _, record = info.filename.partition("/")
        if top != archive or not record or top in ("", ".", "..") or "\\" in top or "\0" in top:
            raise corrupted(f"member {info.filename!r}")
        if record not in PT_RECORDS and not PT_STORAGE_RECORD.fullmatch(record):
            raise corrupted(f"member {info.filename!r} is not a record of torch.save")
        if info.compress_type != 0 or info.flag_bits & 1 or info.file_size != info.compress_size:
            raise corrupted(f"member {info.filename!r} is compressed or encrypted")
        if record in PT_RECORDS:
            if info.file_size > PT_RECORDS[record]:
                raise corrupted(f"member {info.filename!r} is too large")
            records[record] = _pt_record(data, info)
    if "data.pkl" not in records or records.get("byteorder", b"little") != b"little":
        raise corrupted("data.pkl or byteorder")
    pickle_bytes = records["data.pkl"]
    before: list[str] = []
    end = None
    try:
        for op, arg, pos in pickletools.genops(pickle_bytes):
            if op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                full = f"{'builtins' if module == '__builtin__' else module}.{name}"
                if full not in PT_GLOBALS:
                    raise SpecError("CheckpointUnsafeError", f"unsafe: global {full}")
            elif op.name not in PT_OPCODES:
                raise SpecError("CheckpointUnsafeError", f"unsafe: opcode {op.name}")
            if (pos == 0) != (op.name == "PROTO") or (op.name == "PROTO" and arg != 2):
                raise corrupted("data.pkl does not begin with PROTO 2")
            if (
                op.name == "BINPERSID"
                and before[-1:] != ["TUPLE"]
                and before[-2:] not in (["TUPLE", "BINPUT"], ["TUPLE", "LONG_BINPUT"])
            ):
                raise corrupted("a persistent id that is not a tuple")
            before.append(op.name)
            if op.name == "STOP" and pos is not None:  # a bytes stream always has positions
                end = pos + 1
    except ValueError as e:
        raise corrupted(f"data.pkl is not a pickle: {e}") from None
    if end != len(pickle_bytes):
        raise corrupted("bytes after STOP")


UNPICKLING_ERRORS = (
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    RuntimeError,
    ValueError,
    LookupError,
    TypeError,
    AttributeError,
    AssertionError,
    EOFError,
    ArithmeticError,
    ImportError,
    RecursionError,
    MemoryError,
)


def load_pt(data: bytes) -> Any:
    """§4: checked statically, then unpickled with an unpickler that refuses everything else."""
    check_pt(data)
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except UNPICKLING_ERRORS as e:  # §4: whatever the unpickler raises is CheckpointCorruptedError
        raise corrupted(f"unpickling failed: {type(e).__name__}") from None


# --------------------------------------------------------------------------------------------------
# the checkpoint
# --------------------------------------------------------------------------------------------------


def _check_rng_files(directory: Path, manifest: dict[str, Any], json_name: str, tensors_name: str) -> list[str]:
    """§14: one pair of RNG files (rng.json and rng.safetensors, or a rank's): the sorted tensor names."""
    doc = strict_json(read_file(directory, manifest, json_name))
    validate(doc, "rng")
    tensors, _ = parse_safetensors(read_file(directory, manifest, tensors_name))
    expected = {"torch.cpu": RNG_TENSORS["torch.cpu"]}
    expected.update({k: RNG_TENSORS[k] for k in ("python", "numpy") if doc[k] is not None})
    expected.update({f"torch.cuda.{i}": CUDA_STATE for i in range(doc["torch"]["cuda_devices"])})
    if set(tensors) != set(expected):
        raise corrupted(f"{tensors_name} holds {sorted(tensors)}, {json_name} calls for {sorted(expected)}")
    for name, (dtype, shape) in expected.items():
        if (_dtype_name(tensors[name]), list(tensors[name].shape)) != (dtype, shape):
            raise corrupted(f"rng tensor {name}")
    words = tensors.get("python")
    if words is not None and not (all(0 <= w < 2**32 for w in words[:624].tolist()) and 0 <= words[624] <= 624):
        raise corrupted("python state out of range")
    keys = tensors.get("numpy")
    if keys is not None and bool(((keys < 0) | (keys >= 2**32)).any()):
        raise corrupted("numpy state out of range")
    return sorted(expected)


def _check_rng(directory: Path, manifest: dict[str, Any]) -> None:
    """§4 (listed together), §7 (`rng`), §14 (the tensors)."""
    files, sources = manifest["files"], manifest.get("rng", [])
    listed = [name for name in ("rng.json", "rng.safetensors") if name in files]
    if len(listed) == 1:
        raise corrupted("rng.json and rng.safetensors go together")
    if not listed:
        if sources:
            raise corrupted("rng lists generators but there are no RNG files")
        return
    if sources != _check_rng_files(directory, manifest, "rng.json", "rng.safetensors"):
        raise corrupted("the manifest's rng disagrees with rng.safetensors")


QUANT = "QuantizationMetadataError"


def _check_quantization(directory: Path, manifest: dict[str, Any]) -> None:
    """§7 `quantization` and quantization.md's manifest summary; the module-by-module checks are out of scope."""
    summary = manifest.get("quantization")
    if summary is None:
        return
    name = summary["metadata_file"]
    if name not in manifest["files"]:
        raise SpecError(QUANT, "the quantization metadata is not listed")
    data = read_file(directory, manifest, name)  # listed but absent: CheckpointNotFoundError (step 3)
    try:
        meta = strict_json(data)
    except SpecError as e:
        raise SpecError(QUANT, str(e)) from None
    if isinstance(meta, dict) and type(meta.get("format_version")) is int and meta["format_version"] > 1:
        raise SpecError("UnsupportedFormatVersionError", "quantization metadata format_version is newer than 1")
    validate(meta, "quantization_metadata", QUANT)
    for key in ("mode", "bits", "symmetric", "granularity", "group_size"):
        if key in summary and (type(summary[key]) is not type(meta[key]) or summary[key] != meta[key]):
            raise SpecError(QUANT, f"the manifest's {key} disagrees with the metadata")


def model_parts(manifest: dict[str, Any]) -> list[str]:
    """§21.1 rules 1 to 4 on the manifest of a format-3 checkpoint: the model parts' names, part 0 first."""
    files = manifest["files"]
    by_index: dict[int, str] = {}
    counts: set[int] = set()
    for name in files:
        m = MODEL_PART.fullmatch(name)
        if m is None:
            continue
        i, n = int(m.group(1)), int(m.group(2))
        if name != f"model-{i:05d}-of-{n:05d}.safetensors":  # rule 2: one spelling per part
            raise corrupted(f"manifest: {name} is not the spelling of model part {i} of {n}")
        counts.add(n)
        if i >= n:
            raise corrupted(f"manifest: model part {name} has index {i}, not below its count {n}")
        if i in by_index:
            raise corrupted(f"manifest: model parts {by_index[i]} and {name} are both part {i}")
        by_index[i] = name
    if not by_index:  # rule 1
        raise corrupted("manifest: format_version 3 lists no model part")
    if len(counts) != 1:  # rule 2
        raise corrupted(f"manifest: the model parts disagree on their count: {sorted(counts)}")
    (n,) = counts
    missing = sorted(set(range(n)) - set(by_index))
    if missing:
        raise corrupted(f"manifest: model part {missing[0]} of {n} is not listed")
    owner: dict[str, str] = {}
    for _, name in sorted(by_index.items()):
        listed = files[name].get("tensors")
        if listed is None:  # rule 3: per-tensor checksums are Mandatory for model parts
            raise corrupted(f"manifest: model part {name} has no per-tensor checksums (tensors)")
        for tensor in listed:  # rule 4
            if tensor in owner:
                raise corrupted(f"manifest: tensor {tensor!r} is in model parts {owner[tensor]} and {name}")
            owner[tensor] = name
    return [name for _, name in sorted(by_index.items())]


def load(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and the model state (aliases included) of the checkpoint at ``path`` (§13's order)."""
    directory = resolve(Path(path))
    manifest = read_manifest(directory)
    if manifest["format_version"] == 2:
        return manifest, read_sharded(directory, manifest).model
    files = manifest["files"]
    model_files = model_parts(manifest) if manifest["format_version"] == 3 else ["model.safetensors"]
    for name in files:
        read_file(directory, manifest, name)  # every listed file, known or not
    if ("rng.json" in files) != ("rng.safetensors" in files):
        raise corrupted("rng.json and rng.safetensors go together")
    tensors: dict[str, torch.Tensor] = {}
    for file in model_files:  # §21.1: every part is read and checked as model.safetensors is
        data = read_file(directory, manifest, file)
        part, ranges = parse_safetensors(data)
        listed = files[file].get("tensors")
        if listed is not None:
            if set(listed) != set(part):
                raise corrupted(f"tensor table disagrees with {file}")
            for name, (begin, end) in ranges.items():
                if xxh3(data[begin:end]) != listed[name]:
                    raise corrupted(f"{file}: tensor {name!r}: checksum mismatch")
        if set(part) & set(tensors):  # rule 4 (already checked on the tables, which equal the files)
            raise corrupted(f"{file}: tensor {sorted(set(part) & set(tensors))[0]!r} is also in another part")
        tensors.update(part)
    _check_quantization(directory, manifest)
    state = dict(tensors)
    for alias, target in manifest.get("aliases", {}).items():
        if target not in tensors or alias in tensors:
            raise corrupted(f"alias {alias!r} -> {target!r}")
        state[alias] = tensors[target]
    for name in ("optimizer.pt", "scheduler.pt", "scaler.pt"):
        if name in files:
            obj = load_pt(read_file(directory, manifest, name))
            if not isinstance(obj, dict) or (name == "optimizer.pt" and not {"state", "param_groups"} <= set(obj)):
                raise corrupted(f"{name} is not a state_dict")
    _check_rng(directory, manifest)
    for name in sorted(JSON_FILES & set(files) - {"rng.json", "quantization_metadata.json"}):
        doc = strict_json(read_file(directory, manifest, name))
        if name == "config.json" and not isinstance(doc, dict):
            raise corrupted("config.json is not an object")
        if name == "vocab.json":
            validate(doc, "vocab")
    return manifest, state


# --------------------------------------------------------------------------------------------------
# §20: sharded checkpoints (format_version 2)
# --------------------------------------------------------------------------------------------------

# §20.1: a rank's RNG files; the rank and world are zero-padded to five digits
RNG_RANK_FILE = re.compile(r"(rng-[0-9]{5,}-of-[0-9]{5,})\.(json|safetensors)")
TYPED_VALUES = {"$tuple", "$dict", "$float"}  # §4's typed forms, less $tensor (§20.2: values hold no tensor)
FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
KEY_TYPES = (type(None), bool, int, float, str, tuple)  # §4: the keys a `$dict` may have


@dataclass
class Sharded:
    """A format-2 checkpoint read whole: ``sharding.json``, every global tensor by entry name, the nested
    state of §20.3 (tensors and decoded values), and the model state (``path[1]`` of the "model" entries,
    aliases included)."""

    sharding: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    state: Any
    model: dict[str, torch.Tensor]


def _sharding_error(name: str, message: str) -> SpecError:
    return corrupted(f"sharding.json: entry {name!r}: {message}")


def _is_key(key: Any) -> bool:
    return isinstance(key, KEY_TYPES) and (not isinstance(key, tuple) or all(_is_key(k) for k in key))


def decode_value(value: Any, name: str) -> Any:
    """§20.2 `value`: the typed JSON encoding of states.json (§4) without `$tensor`, decoded to Python."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [decode_value(v, name) for v in value]
    if not any(k.startswith("$") for k in value):
        return {k: decode_value(v, name) for k, v in value.items()}
    form = next(iter(value))
    if len(value) != 1 or form not in TYPED_VALUES:
        raise _sharding_error(name, f"value member {sorted(value)} is not in the typed encoding of values")
    inner = value[form]
    if form == "$float" and isinstance(inner, str) and inner in FLOATS:
        return FLOATS[inner]
    if form == "$tuple" and isinstance(inner, list):
        return tuple(decode_value(v, name) for v in inner)
    if form == "$dict" and isinstance(inner, list) and all(isinstance(p, list) and len(p) == 2 for p in inner):
        out: dict[Any, Any] = {}
        for raw_key, raw_value in inner:
            key = decode_value(raw_key, name)
            if not _is_key(key):
                raise _sharding_error(name, f"$dict key {raw_key!r} is not a None, bool, int, float, str or tuple")
            if key in out:
                raise _sharding_error(name, f"$dict key {raw_key!r} appears twice")
            out[key] = decode_value(raw_value, name)
        return out
    raise _sharding_error(name, f"malformed {form}")


def _volume(sizes: list[int]) -> int:
    return math.prod(sizes)  # the product of [] is 1: a 0-dimensional chunk holds one element


def _check_tensor_entry(name: str, entry: dict[str, Any], files: dict[str, Any]) -> None:
    """§20.2 rules 2 and 3 for one tensor entry."""
    shape, chunks = entry["shape"], entry["chunks"]
    numel = 1
    for d in shape:  # as §5.5 for a safetensors shape: every partial product stays below 2**64
        numel *= d
        if numel >= 2**64:
            raise _sharding_error(name, "shape of 2**64 elements or more")
    for chunk in chunks:
        if chunk["file"] not in files:
            raise _sharding_error(name, f"chunk file {chunk['file']!r} is not listed in the manifest")
        offsets, sizes = chunk["offsets"], chunk["sizes"]
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise _sharding_error(
                name, f"a chunk of {len(offsets)}/{len(sizes)} dimensions, the tensor has {len(shape)}"
            )
        if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
            raise _sharding_error(name, f"chunk at {offsets} of {sizes} reaches beyond its size {shape}")
    boxes = [(c["offsets"], c["sizes"]) for c in chunks if _volume(c["sizes"]) > 0]
    for i, (a_at, a_len) in enumerate(boxes):
        for b_at, b_len in boxes[:i]:
            if all(a < b + m and b < a + n for a, n, b, m in zip(a_at, a_len, b_at, b_len, strict=True)):
                raise _sharding_error(name, f"chunks at {b_at} and {a_at} overlap")
    if sum(_volume(c["sizes"]) for c in chunks) != _volume(shape):
        raise _sharding_error(name, "the chunks do not cover the tensor: a chunk is missing")


def _check_paths(entries: dict[str, Any]) -> None:
    """§20.2 rule 5: no path a prefix of another (or equal to it), no integer and string at one place."""
    leaf = object()
    root: dict[Any, Any] = {}
    for name, entry in entries.items():
        node = root
        for member in entry["path"]:
            if node.get(leaf) is not None:
                raise _sharding_error(name, f"path {entry['path']} extends the path of {node[leaf]!r}")
            kinds = {type(k) for k in node if k is not leaf}
            if kinds and type(member) not in kinds:
                raise _sharding_error(name, f"path {entry['path']} mixes list indices and member names")
            node = node.setdefault(member, {})
        if node:
            other = node.get(leaf) or "another entry"
            raise _sharding_error(name, f"path {entry['path']} is a prefix of, or equals, the path of {other!r}")
        node[leaf] = name


def check_sharding(doc: Any, manifest: dict[str, Any]) -> None:
    """§20.2 rules 1 to 5: everything sharding.json says by itself, before any shard file is parsed."""
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if type(version) is int and version > 2:  # §20.2: before the schema, as for the manifest (§15)
        raise SpecError("UnsupportedFormatVersionError", f"sharding.json format_version {version} is newer than 2")
    validate(doc, "sharding")
    files, seen = manifest["files"], dict[tuple[str, str], str]()
    for name, entry in doc["entries"].items():
        if "value" in entry:
            decode_value(entry["value"], name)
            continue
        _check_tensor_entry(name, entry, files)
        for chunk in entry["chunks"]:
            where = (chunk["file"], chunk["key"])
            if where in seen:
                raise _sharding_error(name, f"chunk {where} is also a chunk of {seen[where]!r}")
            seen[where] = name
    _check_paths(doc["entries"])


def _rebuild(items: list[tuple[list[Any], Any]], depth: int = 0) -> Any:
    """§20.3: string members are object members, integer ones list indices (a list is as long as its largest
    index plus one; an index no entry names holds None)."""
    if len(items) == 1 and len(items[0][0]) == depth:
        return items[0][1]
    groups: dict[Any, list[tuple[list[Any], Any]]] = {}
    for path, value in items:
        groups.setdefault(path[depth], []).append((path, value))
    children = {member: _rebuild(group, depth + 1) for member, group in groups.items()}
    if type(next(iter(children))) is not int:
        return children
    out: list[Any] = [None] * (max(children) + 1)
    for index, child in children.items():
        out[index] = child
    return out


def _reassemble(name: str, entry: dict[str, Any], shards: dict[str, Any]) -> torch.Tensor:
    """§20.2 rule 6 and the reassembly, byte for byte (as uint8 with a trailing dimension of the item size)."""
    dtype, shape = entry["dtype"], entry["shape"]
    itemsize, torch_dtype = DTYPES[dtype][2], DTYPES[dtype][1]
    empty = _volume(shape) == 0  # nothing to copy (the chunks are still checked)
    out = torch.zeros([*([0] * len(shape) if empty else shape), itemsize], dtype=torch.uint8)
    for chunk in entry["chunks"]:
        file, key, sizes = chunk["file"], chunk["key"], chunk["sizes"]
        tensors, ranges, data = shards[file]
        if key not in tensors:
            raise _sharding_error(name, f"{file} holds no tensor {key!r}")
        stored = (_dtype_name(tensors[key]), list(tensors[key].shape))
        if stored != (dtype, sizes):
            raise corrupted(
                f"{file}: tensor {key!r} is stored as {stored[0]} {stored[1]} but sharding.json says {dtype} {sizes}"
            )
        begin, end = ranges[key]
        if end > begin:
            region = tuple(slice(o, o + s) for o, s in zip(chunk["offsets"], sizes, strict=True))
            out[region] = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.uint8).reshape([*sizes, itemsize])
    if empty:
        try:
            return torch.empty(shape, dtype=torch_dtype)
        except RuntimeError:  # a dimension of 2**63 or more: no torch tensor has it
            raise _sharding_error(name, f"torch cannot represent the shape {shape}") from None
    return torch.frombuffer(bytearray(out.numpy().tobytes()), dtype=torch_dtype).reshape(shape)


def _check_rank_rng(directory: Path, manifest: dict[str, Any]) -> None:
    """§20.1 and §14: each rank's rng-R-of-W.json and .safetensors, listed together; the manifest's `rng` is the
    sorted tensor names of every rank's pair ([] when there is none)."""
    stems: dict[str, set[str]] = {}
    world = json.loads(read_file(directory, manifest, "sharding.json"))["world_size"]
    for name in manifest["files"]:
        if m := RNG_RANK_FILE.fullmatch(name):
            stems.setdefault(m.group(1), set()).add(m.group(2))
            rank, of = (int(x) for x in re.findall(r"[0-9]+", m.group(1)))
            if of != world or rank >= world:  # §20.1: a rank of the world that saved
                raise corrupted(f"{name} names rank {rank} of {of}; sharding.json says {world} ranks")
    sources = manifest.get("rng", [])
    if not stems and sources:
        raise corrupted("rng lists generators but there are no RNG files")
    for stem, kinds in sorted(stems.items()):
        if kinds != {"json", "safetensors"}:
            raise corrupted(f"{stem}.json and {stem}.safetensors go together")
        if sources != _check_rng_files(directory, manifest, f"{stem}.json", f"{stem}.safetensors"):
            raise corrupted(f"the manifest's rng disagrees with {stem}.safetensors")


def read_sharded(directory: Path, manifest: dict[str, Any]) -> Sharded:
    """§20: a format-2 checkpoint, read whole in one process, after read_manifest (§13 steps 1 and 2)."""
    files = manifest["files"]
    for name in files:
        read_file(directory, manifest, name)  # §13 step 3: every listed file, known or not
    if manifest.get("quantization") is not None:
        raise corrupted("quantization is not part of format_version 2")
    doc = strict_json(read_file(directory, manifest, "sharding.json"))
    check_sharding(doc, manifest)
    entries = doc["entries"]
    # §20.1: a shard file (a file some chunk names) carries per-tensor checksums of exactly its tensors
    shards: dict[str, Any] = {}
    for file in sorted({c["file"] for e in entries.values() for c in e.get("chunks", [])}):
        listed = files[file].get("tensors")
        if listed is None:
            raise corrupted(f"{file}: a shard file's manifest entry needs its per-tensor checksum list")
        data = read_file(directory, manifest, file)
        tensors, ranges = parse_safetensors(data)
        if set(listed) != set(tensors):
            raise corrupted(f"{file}: tensors disagree with the manifest's per-tensor checksum list")
        for key, (begin, end) in ranges.items():
            if xxh3(data[begin:end]) != listed[key]:
                raise corrupted(f"{file}: tensor {key!r}: checksum mismatch")
        shards[file] = (tensors, ranges, data)
    tensors = {name: _reassemble(name, e, shards) for name, e in entries.items() if "chunks" in e}
    values = {name: tensors[name] if "chunks" in e else decode_value(e["value"], name) for name, e in entries.items()}
    state = _rebuild([(e["path"], values[name]) for name, e in entries.items()]) if entries else {}
    model: dict[str, torch.Tensor] = {}
    for name, e in entries.items():
        path = e["path"]
        if path[0] != "model":
            continue
        if len(path) != 2 or not isinstance(path[1], str) or "chunks" not in e:
            raise _sharding_error(name, 'a model entry is a tensor at a path ["model", NAME]')
        model[path[1]] = tensors[name]
    if manifest.get("aliases"):  # §20.1: a tied tensor is saved under each of its names
        raise corrupted("aliases must be empty in format_version 2")
    for name in ("scheduler.pt", "scaler.pt"):
        if name in files:
            obj = load_pt(read_file(directory, manifest, name))
            if not isinstance(obj, dict):
                raise corrupted(f"{name} is not a state_dict")
    _check_rank_rng(directory, manifest)
    for name in sorted({"config.json", "vocab.json"} & set(files)):
        json_doc = strict_json(read_file(directory, manifest, name))
        if name == "config.json" and not isinstance(json_doc, dict):
            raise corrupted("config.json is not an object")
        if name == "vocab.json":
            validate(json_doc, "vocab")
    return Sharded(doc, tensors, state, model)


def load_sharded(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Sharded]:
    """The manifest and everything ``read_sharded`` gives of the format-2 checkpoint at ``path``."""
    directory = resolve(Path(path))
    manifest = read_manifest(directory)
    if manifest["format_version"] != 2:
        raise ValueError(f"{path}: format_version {manifest['format_version']}, not a sharded checkpoint")
    return manifest, read_sharded(directory, manifest)


def optimizer_state_dict(optimizer: dict[str, Any]) -> dict[str, Any]:
    """§20.3: the "optimizer" state (keyed by parameter name) in torch.optim.Optimizer.state_dict()'s form:
    parameters numbered 0, 1, 2, ... in their order across param_groups, `state` keyed by those numbers."""
    groups = optimizer.get("param_groups", [])
    number: dict[str, int] = {}
    for group in groups:
        for param in group["params"]:
            number.setdefault(param, len(number))
    state = optimizer.get("state", {})
    unknown = set(state) - set(number)
    if unknown:
        raise corrupted(f"optimizer state of {sorted(unknown)}, in no param group")
    return {
        "state": {number[p]: s for p, s in state.items()},
        "param_groups": [{**g, "params": [number[p] for p in g["params"]]} for g in groups],
    }
