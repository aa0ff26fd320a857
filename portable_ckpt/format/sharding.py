"""sharding.json: the table of a sharded checkpoint (format_version 2, format_spec/README.md §20).

For every entry of the saved state (flattened, as ``torch.distributed.checkpoint`` plans it) the
table holds its ``path`` in the nested state and either a tensor — dtype, global shape and every
chunk (file, key in that file, offsets in the global tensor, sizes) — or a plain ``value`` in the
typed JSON encoding of ``states.py``. Chunks of one tensor must cover it exactly: in bounds, not
overlapping, their volumes summing to the tensor's. No I/O here: bytes in, checked documents out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from portable_ckpt.errors import CheckpointCorruptedError, UnsupportedFormatVersionError
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import schemas as _schemas
from portable_ckpt.format import states as _states
from portable_ckpt.format.safetensors import DTYPES

SHARDING = "sharding.json"
MAX_CHUNKS = 16384  # chunks of one tensor (format_spec/README.md §17): bounds the overlap check
_BLOCK = 1024  # rows of the pairwise overlap check at a time
_MAX_INT = 1 << 64
FORMAT_VERSION = 2  # the manifest's format_version of a sharded checkpoint
# the top-level key of the saved state -> the group of files its tensors go to; any other key: "state"
GROUPS: dict[str, str] = {"model": "model", "optimizer": "optimizer"}
OTHER_GROUP = "state"
RANK_FILES = ("rng", "states")  # per-rank files: rng-RRRRR-of-WWWWW.{safetensors,json}, same for states


def group_of(path: tuple[str | int, ...]) -> str:
    return GROUPS.get(str(path[0]), OTHER_GROUP) if path else OTHER_GROUP


def shard_file(group: str, rank: int, world_size: int) -> str:
    """``model-00001-of-00004.safetensors``: the chunks rank 1 of 4 saved of the model's tensors."""
    return f"{group}-{rank:05d}-of-{world_size:05d}.safetensors"


def rank_file(kind: str, rank: int, world_size: int, suffix: str) -> str:
    """``rng-00001-of-00004.json``: a file of rank 1's own (its RNG state, its objects' states)."""
    return f"{kind}-{rank:05d}-of-{world_size:05d}.{suffix}"


def chunk_key(fqn: str, offsets: tuple[int, ...], unique: bool) -> str:
    """The chunk's name in its safetensors file: the entry's name, with its offsets if the file holds two."""
    return fqn if unique else f"{fqn}@{','.join(map(str, offsets))}"


@dataclass(frozen=True, slots=True)
class Chunk:
    file: str
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes, strict=True))


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of the saved state: a sharded tensor (``dtype``, ``shape``, ``chunks``) or a ``value``."""

    name: str
    path: tuple[str | int, ...]
    dtype: str | None = None
    shape: tuple[int, ...] = ()
    chunks: tuple[Chunk, ...] = ()
    value: Any = None

    @property
    def is_tensor(self) -> bool:
        return self.dtype is not None


@dataclass(frozen=True, slots=True)
class Table:
    world_size: int
    mesh: Any
    entries: dict[str, Entry]

    def tensors(self, group: str) -> dict[str, Entry]:
        """The tensor entries of one top-level key (``model``, ``optimizer``), by their name inside it."""
        return {e.name.split(".", 1)[1]: e for e in self.entries.values() if e.is_tensor and e.path[0] == group}


def encode_value(value: Any, path: str) -> Any:
    """A non-tensor entry's value in the typed JSON encoding; tensors belong in chunks, never here."""
    return _states.encode_value(value, path)


def build(world_size: int, mesh: Any, entries: Mapping[str, Entry]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, e in entries.items():
        doc: dict[str, Any] = {"path": list(e.path)}
        if e.is_tensor:
            doc["dtype"] = e.dtype
            doc["shape"] = list(e.shape)
            doc["chunks"] = [
                {"file": c.file, "key": c.key, "offsets": list(c.offsets), "sizes": list(c.sizes)}
                for c in sorted(e.chunks, key=lambda c: c.offsets)
            ]
        else:
            doc["value"] = e.value
        out[name] = doc
    return {"format_version": FORMAT_VERSION, "world_size": world_size, "mesh": mesh, "entries": out}


def _bad(label: str, what: str) -> CheckpointCorruptedError:
    return CheckpointCorruptedError(f"{label}: {what}", file=label)


def parse(data: bytes, label: str, listed: Mapping[str, Any]) -> Table:
    """Parse and check sharding.json: its schema, every chunk's file listed in the manifest, and every
    tensor covered exactly by its chunks."""
    doc = _jsonio.loads(data, label)
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if type(version) is int and version > FORMAT_VERSION:
        raise UnsupportedFormatVersionError(
            f"{label}: format_version {version} is newer than this reader supports ({FORMAT_VERSION}); "
            "upgrade portable-ckpt to read it",
            file=label,
        )
    validate(doc, label)
    entries: dict[str, Entry] = {}
    for name, raw in doc["entries"].items():
        path = tuple(raw["path"])
        if "value" in raw:
            entries[name] = Entry(name=name, path=path, value=_states.decode_value(raw["value"], name, label))
            continue
        shape = tuple(raw["shape"])
        chunks = tuple(
            Chunk(file=c["file"], key=c["key"], offsets=tuple(c["offsets"]), sizes=tuple(c["sizes"]))
            for c in raw["chunks"]
        )
        for c in chunks:
            if c.file not in listed:
                raise _bad(label, f'entry "{name}": chunk file {c.file} is not listed in the manifest')
        check_cover(name, shape, chunks, label)
        entries[name] = Entry(name=name, path=path, dtype=raw["dtype"], shape=shape, chunks=chunks)
    keys = [(c.file, c.key) for e in entries.values() for c in e.chunks]
    if len(set(keys)) != len(keys):
        raise _bad(label, "two chunks name the same key of the same file")
    paths = {e.path for e in entries.values()}
    if len(paths) != len(entries):
        raise _bad(label, "two entries have the same path")
    nest(dict.fromkeys(paths), label)  # no path conflicts with another's
    return Table(world_size=doc["world_size"], mesh=doc["mesh"], entries=entries)


_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*\.safetensors")  # the schema's, matched whole
_TENSOR_KEYS = frozenset({"path", "dtype", "shape", "chunks"})
_VALUE_KEYS = frozenset({"path", "value"})
_CHUNK_KEYS = frozenset({"file", "key", "offsets", "sizes"})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _dims(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= 64 and all(_is_int(x) and x >= 0 for x in v)


def _entry_problem(raw: Any) -> str | None:
    """What of schema ``sharding``'s entry rules ``raw`` breaks, or None (the same rules, by code)."""
    if not isinstance(raw, dict):
        return "not an object"
    path = raw.get("path")
    if not (
        isinstance(path, list)
        and 1 <= len(path) <= 64
        and isinstance(path[0], str)
        and all(isinstance(p, str) or (_is_int(p) and 0 <= p <= 1_000_000) for p in path)
    ):
        return "path must be 1 to 64 strings and integers in [0, 1000000], the first a string"
    if set(raw) == _VALUE_KEYS:
        return None
    if set(raw) != _TENSOR_KEYS:
        return f"members {sorted(raw)}: expected {sorted(_TENSOR_KEYS)} or {sorted(_VALUE_KEYS)}"
    if not (isinstance(raw["dtype"], str) and raw["dtype"] in DTYPES):
        return f"dtype {raw['dtype']!r} is not a safetensors dtype"
    if not _dims(raw["shape"]):
        return "shape must be at most 64 integers >= 0"
    chunks = raw["chunks"]
    if not isinstance(chunks, list) or not 1 <= len(chunks) <= MAX_CHUNKS:
        return f"chunks must be an array of 1 to {MAX_CHUNKS} chunks"
    for i, c in enumerate(chunks):
        if not isinstance(c, dict) or set(c) != _CHUNK_KEYS:
            return f"chunks[{i}] must be an object with exactly {sorted(_CHUNK_KEYS)}"
        if not (isinstance(c["file"], str) and len(c["file"]) <= 128 and _FILE.fullmatch(c["file"])):
            return f"chunks[{i}].file {c['file']!r} is not a safetensors file name"
        if not (isinstance(c["key"], str) and c["key"]):
            return f"chunks[{i}].key must be a non-empty string"
        if not (_dims(c["offsets"]) and _dims(c["sizes"])):
            return f"chunks[{i}]: offsets and sizes must be at most 64 integers >= 0"
    return None


def validate(doc: Any, label: str) -> None:
    """Schema ``sharding``: its top level by jsonschema, each entry by the same rules in code.

    jsonschema spends milliseconds per entry here (oneOf over two $refs, nested arrays); a table of
    thousands of chunks would pay seconds. The schema stays the definition; tests hold the two equal.
    """
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        _schemas.validate(doc, "sharding", label)
        return
    _schemas.validate({**doc, "entries": {}}, "sharding", label)
    for name, raw in entries.items():
        problem = None if 1 <= len(name) <= 1024 else "the name must be 1 to 1024 characters"
        problem = problem or _entry_problem(raw)
        if problem is not None:
            raise _bad(label, f"schema violation at $.entries.{name}: {problem}")


def check_cover(name: str, shape: tuple[int, ...], chunks: tuple[Chunk, ...], label: str) -> None:
    """The chunks lie inside the tensor, do not overlap, and their volumes sum to its volume."""
    running = 1
    for d, n in enumerate(shape):  # §5.5's rule for shapes: no partial product reaches 2**64
        running *= n
        if running >= _MAX_INT:
            raise _bad(label, f'entry "{name}": shape {list(shape)} has 2**64 elements or more by dimension {d}')
    total = math.prod(shape)
    volume = 0
    for c in chunks:
        if len(c.offsets) != len(shape) or len(c.sizes) != len(shape):
            raise _bad(label, f'entry "{name}": chunk {c.key} has {len(c.offsets)} dimensions, the tensor {len(shape)}')
        for d, (o, s, n) in enumerate(zip(c.offsets, c.sizes, shape, strict=True)):
            if o + s > n:
                raise _bad(
                    label,
                    f'entry "{name}": chunk {c.key} spans [{o}, {o + s}) of dimension {d}, beyond its size {n}',
                )
        volume += math.prod(c.sizes)
    live = [c for c in chunks if math.prod(c.sizes) > 0]
    if len(live) > 1 and shape:
        lo = torch.tensor([c.offsets for c in live], dtype=torch.int64)  # < 2**63: bounded by the shape
        hi = lo + torch.tensor([c.sizes for c in live], dtype=torch.int64)
        for start in range(0, len(live), _BLOCK):  # boxes i and j overlap iff they do in every dimension
            a, b = lo[start : start + _BLOCK, None, :], hi[start : start + _BLOCK, None, :]
            overlap = ((a < hi[None, :, :]) & (lo[None, :, :] < b)).all(-1)
            rows = torch.arange(start, start + len(a))
            overlap[rows - start, rows] = False
            if bool(overlap.any()):
                i, j = (int(x) for x in overlap.nonzero()[0])
                raise _bad(label, f'entry "{name}": chunks {live[start + i].key} and {live[j].key} overlap')
    elif len(live) > 1:
        raise _bad(label, f'entry "{name}": chunks {live[0].key} and {live[1].key} overlap')  # two of a scalar
    if volume != total:
        raise _bad(
            label,
            f'entry "{name}": its chunks hold {volume} elements but its shape {list(shape)} has {total}; '
            "a chunk is missing",
        )


def check_stored(entry: Entry, chunk: Chunk, dtype: str, shape: tuple[int, ...], label: str) -> None:
    """A chunk's tensor in its safetensors file has the entry's dtype and the chunk's sizes."""
    if dtype != entry.dtype or tuple(shape) != chunk.sizes:
        raise _bad(
            label,
            f'tensor "{chunk.key}" is {dtype} {list(shape)} but sharding.json says entry "{entry.name}" is '
            f"{entry.dtype} and this chunk {list(chunk.sizes)}",
        )


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def nest(values: Mapping[tuple[str | int, ...], Any], label: str) -> dict[str, Any]:
    """Rebuild the nested state from its entries' paths (an int step indexes a list, padded with None)."""
    root: dict[str, Any] = {}
    for path, value in values.items():
        node: Any = root
        for i, step in enumerate(path):
            last = i == len(path) - 1
            empty: Any = value if last else [] if isinstance(path[i + 1], int) else {}
            if isinstance(node, list) and isinstance(step, int):
                node.extend([None] * (step + 1 - len(node)))
                if last or node[step] is None:
                    node[step] = empty
                node = node[step]
            elif isinstance(node, dict) and isinstance(step, str) and not (last and step in node):
                node = node.setdefault(step, empty)
            else:
                raise _bad(label, f"entry path {list(path)} conflicts with another entry's path")
    return root
