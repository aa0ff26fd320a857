"""A minimal reader of format_version 1, written only from ``format_spec/README.md``.

It imports nothing from ``portable_ckpt``: it exists to show that the specification is enough to read a
checkpoint, and to cross-check the reference implementation. It resolves a root (§3.2), verifies the
manifest checksum over the bytes it read (§10), every listed file's size and checksum (§13), parses
model.safetensors (§5.5), checks every per-tensor checksum, and returns the model state with aliases (§6).
``manifest_bytes`` is §10's writer side, for comparing files byte for byte.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any

import torch
import xxhash

STEP_DIR = re.compile(r"step-[0-9]{8,}")
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")
MAX_HEADER = 100_000_000
# §10: the file ends with the checksum as the top-level object's last member
TRAILER = re.compile(rb',"manifest_checksum":"([0-9a-f]{32})"\}\n\Z')
MAX_JSON = 64 * 1024 * 1024

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


class SpecError(Exception):
    """Anything the specification says a reader must refuse."""


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


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise SpecError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _constant(name: str) -> Any:
    raise SpecError(f"{name} is not JSON")


def _binary64(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise SpecError(f"number {text} is beyond binary64")
    return value


def _no_lone_surrogates(value: Any) -> None:
    """Every string (key or value) must have a UTF-8 encoding; a lone surrogate has none."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_lone_surrogates(k)
            _no_lone_surrogates(v)
    elif isinstance(value, list):
        for v in value:
            _no_lone_surrogates(v)


def strict_json(data: bytes) -> Any:
    """§17: UTF-8, no duplicate keys, no NaN/Infinity, no numbers beyond binary64, no lone surrogates."""
    if len(data) > MAX_JSON:
        raise SpecError("JSON document over 64 MiB")
    try:
        doc = json.loads(
            data.decode("utf-8"), object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_binary64
        )
        _no_lone_surrogates(doc)
    except (UnicodeError, ValueError) as e:
        raise SpecError(f"invalid JSON: {e}") from None
    return doc


def read_regular(path: Path) -> bytes:
    """§17: never follow a symlink; only regular files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise SpecError(f"{path.name} is missing") from None
    except OSError as e:
        raise SpecError(f"{path.name}: cannot open ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpecError(f"{path.name} is not a regular file")
        return f.read()


def resolve(path: Path) -> Path:
    """§3.2: a checkpoint directory, or the checkpoint a root's ``latest`` names, else the highest step."""
    if (path / "manifest.json").exists():
        return path
    committed = sorted(
        (int(p.name[5:]), p) for p in path.iterdir() if STEP_DIR.fullmatch(p.name) and (p / "manifest.json").is_file()
    )
    try:
        name = (path / "latest").read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeError):
        name = ""
    if STEP_DIR.fullmatch(name) and (path / name / "manifest.json").is_file():
        return path / name
    if not committed:
        raise SpecError(f"{path}: no committed checkpoint")
    return committed[-1][1]


def _plain_nonnegative(value: Any) -> bool:
    return type(value) is int and value >= 0


def read_manifest(directory: Path) -> dict[str, Any]:
    """§7, §10, §15: the manifest, its version and its checksum."""
    data = read_regular(directory / "manifest.json")
    doc = strict_json(data)
    if not isinstance(doc, dict) or doc.get("format") != "portable-ckpt":
        raise SpecError("not a portable-ckpt manifest")
    if type(doc.get("format_version")) is not int or doc["format_version"] != 1:
        raise SpecError(f"format_version {doc.get('format_version')!r} is not 1")
    if doc.get("checksum_algorithm") != "xxh3-128":
        raise SpecError("checksum_algorithm is not xxh3-128")
    # §17: integers are written without fraction or exponent, so they parse as int (5.0 parses as a float)
    if not _plain_nonnegative(doc.get("step")):
        raise SpecError(f"step {doc.get('step')!r} is not a plain integer >= 0")
    files = doc.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and _plain_nonnegative(e.get("size")) for e in files.values()
    ):
        raise SpecError("files: every entry needs a size that is a plain integer >= 0")
    trailer = TRAILER.search(data)
    if trailer is None:
        raise SpecError("manifest.json does not end with its manifest_checksum member")
    digest = trailer.group(1).decode("ascii")
    if xxh3(data[: trailer.start()] + b"}\n") != digest or doc.get("manifest_checksum") != digest:
        raise SpecError("manifest_checksum does not match")
    if STEP_DIR.fullmatch(directory.name) and int(directory.name[5:]) != doc["step"]:
        raise SpecError("step disagrees with the directory name")
    for name in doc["files"]:
        if not FILE_NAME.fullmatch(name) or len(name) > 128 or name in ("manifest.json", "latest"):
            raise SpecError(f"file name {name!r} is not allowed")
    return doc


def read_file(directory: Path, manifest: dict[str, Any], name: str) -> bytes:
    """§13 step 3: size and checksum of a listed file."""
    entry = manifest["files"][name]
    data = read_regular(directory / name)
    if len(data) != entry["size"] or xxh3(data) != entry["checksum"]:
        raise SpecError(f"{name}: size or checksum mismatch")
    return data


def parse_safetensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """§5.5: the tensors of a safetensors file, and each one's absolute byte range."""
    if len(data) < 8:
        raise SpecError("shorter than 8 bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise SpecError(f"header length {n}")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_pairs)
    except (UnicodeError, ValueError) as e:
        raise SpecError(f"header: {e}") from None
    if not isinstance(header, dict):
        raise SpecError("header is not an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SpecError("__metadata__")
    spans = []
    for name, entry in header.items():
        if not name or not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise SpecError(f"entry {name!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise SpecError(f"unknown dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or not all(type(d) is int and 0 <= d < 2**64 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and 0 <= o < 2**64 for o in offsets)
        ):
            raise SpecError(f"entry {name!r}")
        begin, end = offsets
        numel = 1
        for d in shape:  # §5.5: every running product of the dimensions stays below 2**64
            numel *= d
            if numel >= 2**64:
                raise SpecError(f"entry {name!r}: 2**64 elements or more")
        if not 0 <= begin <= end or end - begin != numel * DTYPES[dtype][2]:
            raise SpecError(f"entry {name!r}: offsets")
        spans.append((begin, end, name, dtype, shape))
    cursor = 0
    for begin, end, name, _, _ in sorted(spans):
        if begin != cursor:
            raise SpecError(f"tensor {name!r}: gap or overlap")
        cursor = end
    if 8 + n + cursor != len(data):
        raise SpecError("data does not end at the end of the file")
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


def load(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and the model state (aliases included) of the checkpoint at ``path``."""
    directory = resolve(Path(path))
    manifest = read_manifest(directory)
    for name in manifest["files"]:
        read_file(directory, manifest, name)  # every listed file, known or not
    data = read_file(directory, manifest, "model.safetensors")
    tensors, ranges = parse_safetensors(data)
    listed = manifest["files"]["model.safetensors"].get("tensors")
    if listed is not None:
        if set(listed) != set(tensors):
            raise SpecError("tensor table disagrees with model.safetensors")
        for name, (begin, end) in ranges.items():
            if xxh3(data[begin:end]) != listed[name]:
                raise SpecError(f"tensor {name!r}: checksum mismatch")
    state = dict(tensors)
    for alias, target in manifest.get("aliases", {}).items():
        if target not in tensors or alias in tensors:
            raise SpecError(f"alias {alias!r} -> {target!r}")
        state[alias] = tensors[target]
    return manifest, state
