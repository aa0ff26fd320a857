"""A Hugging Face Trainer ``checkpoint-N/`` folder: the files it holds and where each goes.

Weights from ``model.safetensors`` (or its sharded index) or ``pytorch_model.bin``; ``optimizer.pt``,
``scheduler.pt`` and ``scaler.pt`` through the format's allowlist; ``rng_state*.pth`` through the narrow
NumPy allowlist of ``sources.py``; the JSON files by the table ``JSON_FILES``. ``training_args.bin`` is
never unpickled.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from portable_ckpt.convert import sources as _sources
from portable_ckpt.convert.parts import Parts
from portable_ckpt.errors import CheckpointCorruptedError, CheckpointError, CheckpointNotFoundError
from portable_ckpt.format import schemas as _schemas

# the model's weights, in the order preferred: (file, sharded by an index)
HF_WEIGHTS = (
    ("model.safetensors.index.json", True),
    ("model.safetensors", False),
    ("pytorch_model.bin.index.json", True),
    ("pytorch_model.bin", False),
)
HF_STATES = {"optimizer.pt": "optimizer", "scheduler.pt": "scheduler", "scaler.pt": "scaler"}
HF_NEVER = {"training_args.bin": "never unpickled: TrainingArguments is a Python object, which would run code to load"}
_RNG_FILE = re.compile(r"rng_state(?:_([0-9]+))?\.pth")
_SHARD = re.compile(r"[A-Za-z0-9._-]+")  # a shard named by an index: a plain file name of the same folder


def _trainer_state(path: Path, parts: Parts) -> None:
    doc, nonfinite = _sources.load_json_nonfinite(path)
    if isinstance(doc, dict) and "global_step" in doc:
        parts.set_step(doc["global_step"], path.name)
    parts.set_json(parts.extra, "trainer_state", doc, path.name, "extra")
    if nonfinite and "trainer_state" in parts.extra:
        parts.skip(
            f"{path.name} (NaN, Infinity)", f"{nonfinite} non-finite numbers, which JSON cannot hold: stored as null"
        )


def _config(path: Path, parts: Parts) -> None:
    doc = _sources.load_json(path)
    if isinstance(doc, dict):
        parts.config = doc
        parts.carry(path.name, "config")
    else:
        parts.skip(path.name, f"a JSON {type(doc).__name__}, not an object, so not the config")


def _generation_config(path: Path, parts: Parts) -> None:
    parts.set_json(parts.extra, "generation_config", _sources.load_json(path), path.name, "extra")


def _vocab(path: Path, parts: Parts) -> None:
    doc = _sources.load_json(path)
    try:
        _schemas.validate(doc, "vocab", path.name)
    except CheckpointError as e:
        parts.skip(path.name, f"not a vocabulary the format holds: {e}")
        return
    parts.vocab = doc
    parts.carry(path.name, "vocab")


# the JSON files of the folder -> what reads each into the checkpoint
JSON_FILES: dict[str, Callable[[Path, Parts], None]] = {
    "trainer_state.json": _trainer_state,  # the step (global_step), and the whole document into extra
    "config.json": _config,  # the model's architecture config
    "generation_config.json": _generation_config,
    "vocab.json": _vocab,
}


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    state = _sources.load_safetensors(path) if path.suffix == ".safetensors" else _sources.load_pt(path)
    if not isinstance(state, dict):
        raise CheckpointCorruptedError(f"{path}: expected a state_dict (str -> tensor)", file=path)
    return state


def _load_sharded(folder: Path, index_name: str) -> dict[str, torch.Tensor]:
    label = str(folder / index_name)
    index = _sources.load_json(folder / index_name)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointCorruptedError(f"{label}: expected {{'weight_map': {{tensor: shard file}}}}", file=label)
    shards = sorted(set(weight_map.values()))
    for shard in shards:  # all named, before any is read
        if not _SHARD.fullmatch(shard) or shard in (".", ".."):
            raise CheckpointCorruptedError(
                f"{label}: shard {shard[:200]!r} is not a file name of this folder", file=label
            )
        if not (folder / shard).is_file():
            raise CheckpointNotFoundError(f"{folder / shard}: listed by {index_name} but missing", file=folder / shard)
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        for name, t in _load_weights(folder / shard).items():
            if weight_map.get(name) != shard:
                raise CheckpointCorruptedError(
                    f"{folder / shard}: holds {name!r}, which {index_name} maps to {weight_map.get(name)!r}",
                    file=folder / shard,
                )
            state[name] = t
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointCorruptedError(f"{label}: {missing[:5]} are in no shard", file=label)
    return state


def read_folder(folder: Path, parts: Parts) -> set[str]:
    """Read what the importer knows of ``folder``; returns the names it handled (read, or listed as not carried)."""
    handled: set[str] = set()
    weights = [(n, sharded) for n, sharded in HF_WEIGHTS if (folder / n).is_file()]
    name, sharded = weights[0]
    state = _load_sharded(folder, name) if sharded else _load_weights(folder / name)
    parts.set_model(state, name)
    handled.add(name)
    if sharded:
        handled |= set(_sources.load_json(folder / name)["weight_map"].values())
    for other, _ in weights[1:]:
        parts.skip(other, f"another copy of the weights; {name} was imported")
        handled.add(other)
    for file, slot in HF_STATES.items():
        if (folder / file).is_file():
            parts.set_state(slot, _sources.load_pt(folder / file), file)
            handled.add(file)
    for file, read in JSON_FILES.items():
        if (folder / file).is_file():
            read(folder / file, parts)
            handled.add(file)
    for file, reason in HF_NEVER.items():
        if (folder / file).exists():
            parts.skip(file, reason)
            handled.add(file)
    handled |= _read_rng(folder, parts)
    return handled


def _read_rng(folder: Path, parts: Parts) -> set[str]:
    files = sorted(
        (int(m.group(1) or -1), p.name) for p in folder.iterdir() if (m := _RNG_FILE.fullmatch(p.name)) and p.is_file()
    )
    if not files:
        return set()
    (_, chosen), others = files[0], files[1:]  # rng_state.pth, else the first process's
    tensors, doc, carried, skipped = _sources.rng_from_trainer(_sources.load_rng_file(folder / chosen))
    if carried:
        parts.rng = (tensors, doc)
        parts.carry(chosen, f"rng.safetensors and rng.json ({', '.join(carried)})")
    for key in skipped:
        parts.skip(f"{chosen}[{key!r}]", "not a generator state format 1 can restore exactly")
    for _, name in others:
        parts.skip(name, f"another process's RNG state; a checkpoint holds one process's ({chosen} was imported)")
    return {name for _, name in files}


__all__ = ["HF_NEVER", "HF_STATES", "HF_WEIGHTS", "JSON_FILES", "read_folder"]
