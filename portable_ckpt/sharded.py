"""Reading a sharded checkpoint (format_version 2) in any process, with or without ``torch.distributed``.

``ShardedFiles`` holds one committed sharded checkpoint open: its manifest, its ``sharding.json``
table (schema, exact chunk cover) and the shard files, each header checked against the table and
the manifest's per-tensor checksum list. ``read_chunk`` fills a tensor with one chunk and checks
that chunk's checksum; ``full`` reassembles a global tensor; ``state`` rebuilds a nested state
(the model's ``state_dict``, the optimizer's state keyed by parameter name) from the entries.
The DCP reader (``dcp/reader.py``), ``load_checkpoint`` without a process group, ``consolidate``,
``inspect`` and ``validate`` all read through it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from portable_ckpt.errors import CheckpointCorruptedError, StateMismatchError
from portable_ckpt.files import CheckpointFiles
from portable_ckpt.format import names
from portable_ckpt.format import rng as _rng
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.format import sharding as _sharding
from portable_ckpt.format import states as _states
from portable_ckpt.format.hashing import new_hasher
from portable_ckpt.restore import placement
from portable_ckpt.root import display
from portable_ckpt.state import check_model_match
from portable_ckpt.storage import ReadFile
from portable_ckpt.types import Checkpoint

RANK_KINDS = ("rng", "states")


def is_sharded(manifest: dict[str, Any]) -> bool:
    return bool(manifest.get("format_version") == _sharding.FORMAT_VERSION)


class ShardedFiles:
    """A sharded checkpoint held open (see the module docstring); closes its files with ``close``."""

    def __init__(self, files: CheckpointFiles) -> None:
        self.files = files
        label = files.label(_sharding.SHARDING)
        self.table = _sharding.parse(files.read_bytes(_sharding.SHARDING), label, files.entries)
        self._open: dict[str, ReadFile] = {}
        self._headers: dict[str, dict[str, _safetensors.TensorEntry]] = {}
        manifest = files.label(names.MANIFEST)
        if files.manifest.get("aliases"):
            raise CheckpointCorruptedError(
                f"{manifest}: aliases must be empty in format_version 2 (a tied tensor is saved under each name)",
                file=manifest,
            )
        if files.manifest.get("quantization") is not None:
            raise CheckpointCorruptedError(
                f"{manifest}: quantization must be null in format_version 2 "
                "(a quantized model is saved by one process)",
                file=manifest,
            )
        for e in self.table.entries.values():
            if e.path[0] == "model" and (not e.is_tensor or len(e.path) != 2):
                raise CheckpointCorruptedError(
                    f'{label}: entry "{e.name}": a model entry must be a tensor with a path of two members '
                    f'("model" and the state_dict name), found {"a value" if not e.is_tensor else list(e.path)}',
                    file=label,
                )

    def close(self) -> None:
        for f in self._open.values():
            with contextlib.suppress(OSError):
                f.close()
        self._open.clear()

    def __enter__(self) -> ShardedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def shard_files(self) -> list[str]:
        return sorted({c.file for e in self.table.entries.values() for c in e.chunks})

    def header(self, name: str) -> dict[str, _safetensors.TensorEntry]:
        """The tensors of shard file ``name`` by key, checked against the manifest's per-tensor list."""
        if name not in self._headers:
            f = self.files.open(name)
            self._open[name] = f
            header, _ = self.files.read_header(f, name)
            listed = self.files.entries[name].get("tensors")
            if listed is None or set(listed) != set(header.names()):
                raise CheckpointCorruptedError(
                    f"{self.files.label(name)}: its tensors disagree with the manifest's per-tensor checksum list "
                    f"(a shard file must list every tensor)",
                    file=self.files.label(name),
                )
            self._headers[name] = {e.name: e for e in header.entries}
        return self._headers[name]

    def read_chunk(
        self, entry: _sharding.Entry, chunk: _sharding.Chunk, dst: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One chunk's values, verified against its checksum; into ``dst`` (contiguous, CPU) when given."""
        label = self.files.label(chunk.file)
        stored = self.header(chunk.file).get(chunk.key)
        if stored is None:
            raise CheckpointCorruptedError(
                f'{label}: tensor "{chunk.key}" (a chunk of entry "{entry.name}") is not in the file', file=label
            )
        _sharding.check_stored(entry, chunk, stored.dtype, stored.shape, label)
        if dst is None:
            dst = torch.empty(chunk.sizes, dtype=_sharding.torch_dtype(stored.dtype))
        f = self._open[chunk.file]
        f.seek(stored.start)
        h = new_hasher() if self.files.verify else None
        _safetensors.readinto_tensor(f, stored, dst, [h] if h is not None else [], label)
        if h is not None:
            expected = self.files.entries[chunk.file]["tensors"][chunk.key]
            if h.hexdigest() != expected:
                raise CheckpointCorruptedError(
                    f'{label}: checksum mismatch in tensor "{chunk.key}" (entry "{entry.name}", offsets '
                    f"{list(chunk.offsets)}): the manifest says {expected}, the bytes hash to {h.hexdigest()}",
                    file=label,
                )
        return dst

    def full(self, entry: _sharding.Entry) -> torch.Tensor:
        """The global tensor of an entry, reassembled from its chunks."""
        out = torch.empty(entry.shape, dtype=_sharding.torch_dtype(entry.dtype or "F32"))
        for chunk in entry.chunks:
            if chunk.sizes == entry.shape:
                self.read_chunk(entry, chunk, out)
            else:
                out[chunk.slices()] = self.read_chunk(entry, chunk)
        return out

    def state(self, group: str) -> dict[str, Any] | None:
        """The nested state saved under one top-level key (full tensors), or None if nothing was."""
        values = {
            e.path[1:]: (self.full(e) if e.is_tensor else e.value)
            for e in self.table.entries.values()
            if e.path and e.path[0] == group and len(e.path) > 1
        }
        if not values:
            return None
        return _sharding.nest(values, self.files.label(_sharding.SHARDING))

    def verify_all(self) -> None:
        """Every chunk of every entry read and checked (what ``validate`` does)."""
        for entry in self.table.entries.values():
            for chunk in entry.chunks:
                self.read_chunk(entry, chunk)
        for name in self.shard_files:
            self.files.verify_file(name)  # the whole file too: header bytes and padding


_RANK_FILE = re.compile(r"(rng|states)-([0-9]{5,})-of-([0-9]{5,})\.(json|safetensors)")


def check_rank_files(files: CheckpointFiles, table: _sharding.Table) -> None:
    """Every rank file pairs up (§20.1), names a rank of the saved world, and holds what its kind allows."""
    found: dict[tuple[str, int], set[str]] = {}
    for name in files.entries:
        m = _RANK_FILE.fullmatch(name)
        if m is None:
            continue
        kind, rank, world, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if world != table.world_size or rank >= world:
            raise CheckpointCorruptedError(
                f"{files.label(name)}: names rank {rank} of {world}, but sharding.json says {table.world_size} "
                "rank(s) saved",
                file=files.label(name),
            )
        found.setdefault((kind, rank), set()).add(suffix)
    for (kind, rank), suffixes in sorted(found.items()):
        if suffixes != {"json", "safetensors"}:
            name = _sharding.rank_file(kind, rank, table.world_size, "json")
            raise CheckpointCorruptedError(
                f"{files.label(name)}: {kind}-{rank:05d}-of-{table.world_size:05d}.json and .safetensors go together; "
                f"the manifest lists only the .{next(iter(suffixes))}",
                file=files.label(name),
            )
        read_rank_files(files, table, rank, table.world_size, kinds=(kind,))


def read_rank_files(
    files: CheckpointFiles, table: _sharding.Table, rank: int, world_size: int, kinds: tuple[str, ...] = RANK_KINDS
) -> dict[str, Any]:
    """Rank ``rank``'s own saved parts, each ``{"doc", "tensors"}``: ``"rng"`` and ``"states"`` (whose doc
    also holds ``"decoded"``: name -> entry with the tensors resolved)."""
    out: dict[str, Any] = {}
    for kind in kinds:
        doc_name = _sharding.rank_file(kind, rank, world_size, "json")
        tensor_name = _sharding.rank_file(kind, rank, world_size, "safetensors")
        if doc_name not in files.entries:
            continue
        doc = files.read_json(doc_name, kind)
        _, tensors = files.read_tensors(tensor_name) if tensor_name in files.entries else (None, {})
        if kind == "rng":
            _rng.check(tensors, doc, files.manifest.get("rng", []))
        else:
            doc = {**doc, "decoded": _states.decode(doc, tensors, files.label(doc_name))}
        out[kind] = {"doc": doc, "tensors": tensors}
    return out


def _decoded(own: Mapping[str, Any]) -> dict[str, Any]:
    states = own.get("states")
    return dict(states["doc"]["decoded"]) if states is not None else {}


def _param_order(state: Mapping[str, Any]) -> list[Any]:
    return [p for group in state["param_groups"] for p in group["params"]]


def to_names(saved: Mapping[str, Any] | None, template: Mapping[str, Any], label: str) -> dict[str, Any]:
    """An optimizer state keyed by parameter index (``optimizer.state_dict()``) keyed by parameter name
    instead, the names taken in order from ``template`` (what ``get_state_dict`` gives for the live one)."""
    if saved is None:
        raise StateMismatchError(f"{label}: no optimizer state was saved", file=label)
    ids, fqns = _param_order(saved), _param_order(template)
    if len(ids) != len(fqns) or len(saved["param_groups"]) != len(template["param_groups"]):
        raise StateMismatchError(
            f"{label}: the saved optimizer has {len(ids)} parameters in {len(saved['param_groups'])} group(s), "
            f"this one {len(fqns)} in {len(template['param_groups'])} (nothing was modified)",
            file=label,
        )
    name = dict(zip(ids, fqns, strict=True))
    return {
        "state": {name[i]: v for i, v in saved["state"].items() if i in name},
        "param_groups": [{**g, "params": [name[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def to_ids(state: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse: keyed by parameter name -> by index, numbered in param_groups order as torch does."""
    index = {fqn: i for i, fqn in enumerate(_param_order(state))}
    return {
        "state": {index[fqn]: v for fqn, v in state["state"].items() if fqn in index},
        "param_groups": [{**g, "params": [index[f] for f in g["params"]]} for g in state["param_groups"]],
    }


def read_sharded(
    files: CheckpointFiles, *, map_location: Any = "cpu", model: nn.Module | None = None, strict: bool = True
) -> tuple[Checkpoint, dict[str, Any] | None]:
    """A sharded checkpoint read whole in one process: full tensors, the optimizer state keyed by index as
    ``optimizer.state_dict()`` is, rank 0's saved objects; RNG state only when one rank saved it. Given
    ``model``, its names and shapes are matched before anything is read."""
    with ShardedFiles(files) as sharded:
        missing: list[str] = []
        unexpected: list[str] = []
        if model is not None:
            shapes = {name: e.shape for name, e in sharded.table.tensors("model").items()}
            missing, unexpected = check_model_match(model, shapes, files.label(_sharding.SHARDING), strict=strict)
        check_rank_files(files, sharded.table)
        model_state = sharded.state("model") or {}
        optimizer = sharded.state("optimizer")
        for entry in sharded.table.entries.values():  # the other entries too: every chunk is checked (§20.2)
            if entry.path[0] not in ("model", "optimizer"):
                for chunk in entry.chunks:
                    sharded.read_chunk(entry, chunk)
        if optimizer is not None and not {"state", "param_groups"} <= set(optimizer):
            raise CheckpointCorruptedError(
                f"{files.label(_sharding.SHARDING)}: the optimizer entries need 'state' and 'param_groups'",
                file=files.label(_sharding.SHARDING),
            )
        listed = files.entries
        config = files.read_json(names.CONFIG, None) if names.CONFIG in listed else {}
        vocab = files.read_json(names.VOCAB, "vocab") if names.VOCAB in listed else None
        pts = {n: files.read_pt(n, map_location) if n in listed else None for n in (names.SCHEDULER, names.SCALER)}
        own = read_rank_files(files, sharded.table, 0, sharded.table.world_size)
        _, move = placement(map_location)
        ckpt = Checkpoint(
            path=display(files.storage),
            format_version=files.manifest["format_version"],
            step=files.manifest["step"],
            config=config,
            vocab=vocab,
            model_state={k: move(v) for k, v in model_state.items()},
            optimizer_state=None if optimizer is None else to_ids(optimizer),
            quantization=None,
            manifest=files.manifest,
            extra=files.manifest.get("extra"),
            scheduler_state=pts[names.SCHEDULER],
            scaler_state=pts[names.SCALER],
            # rank-local: only a checkpoint one rank saved has states for a one-process reader (§20.5)
            states={n: e["state"] for n, e in _decoded(own).items()} if sharded.table.world_size == 1 else {},
            missing_keys=tuple(missing),
            unexpected_keys=tuple(unexpected),
        )
    return ckpt, own.get("rng") if sharded.table.world_size == 1 else None
