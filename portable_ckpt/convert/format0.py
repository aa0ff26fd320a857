"""Format 0: the layout training code used before this project, read-only, and its conversion.

A format-0 checkpoint is a directory with ``model.pt`` (torch.save of the model state_dict),
``metadata.json`` holding ``{"step": N}``, and optionally ``optimizer.pt``, ``config.json`` and
``vocab.json``. Pickles are read with ``weights_only=True``; there are no checksums to verify.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from pathlib import Path
from typing import Any

import torch

from portable_ckpt import save as _save
from portable_ckpt.errors import CheckpointCorruptedError
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import manifest as _manifest
from portable_ckpt.format import names
from portable_ckpt.format import pt as _pt
from portable_ckpt.format import schemas as _schemas
from portable_ckpt.root import display
from portable_ckpt.storage import CheckpointDir, LocalStorage, Storage, storage_for
from portable_ckpt.types import Checkpoint

MODEL = "model.pt"
METADATA = "metadata.json"
OPTIMIZER = "optimizer.pt"
CONFIG = "config.json"
VOCAB = "vocab.json"
FILES = (MODEL, OPTIMIZER, CONFIG, VOCAB, METADATA)


def _json(d: CheckpointDir, name: str, kind: str | None) -> Any:
    label = f"{d.location}/{name}"
    with contextlib.closing(d.open(name)) as f:
        if f.size > _jsonio.MAX_JSON_BYTES:
            raise CheckpointCorruptedError(
                f"{label}: {f.size} bytes, over the limit of {_jsonio.MAX_JSON_BYTES}", file=label
            )
        doc = _jsonio.loads(f.read(), label)
    if kind is not None:
        _schemas.validate(doc, kind, label)
    return doc


def _pt_state(d: CheckpointDir, name: str, map_location: Any) -> Any:
    with contextlib.closing(d.open(name)) as f:
        return _pt.load(io.BytesIO(f.read()), f"{d.location}/{name}", map_location, mmap=False)


def read(location: str | os.PathLike[str] | Storage, *, map_location: Any = "cpu") -> Checkpoint:
    """Read a format-0 directory into the same Checkpoint a format-1 load returns."""
    directory = storage_for(location)
    d = directory.open_dir()
    try:
        return _read(directory, d, map_location)
    finally:
        d.close()


def _read(directory: Storage, d: CheckpointDir, map_location: Any) -> Checkpoint:
    meta = _json(d, METADATA, "legacy_metadata")
    named = names.step_of(d.location.rstrip("/").rsplit("/", 1)[-1])
    if named is not None and named != meta["step"]:
        label = f"{d.location}/{METADATA}"
        raise CheckpointCorruptedError(
            f"{label}: step is {meta['step']} but the directory is named for step {named}", file=label
        )
    present = {name: d.kind(name) for name in FILES if d.kind(name) is not None}
    for name, kind in present.items():
        if kind != "file":
            raise CheckpointCorruptedError(
                f"{d.location}/{name}: not a regular file (symlinks, pipes and devices are refused)",
                file=f"{d.location}/{name}",
            )
    state = _pt_state(d, MODEL, map_location)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointCorruptedError(
            f"{d.location}/{MODEL}: expected a state_dict mapping names to tensors", file=f"{d.location}/{MODEL}"
        )
    optimizer = None
    if OPTIMIZER in present:
        optimizer = _pt_state(d, OPTIMIZER, map_location)
        if not isinstance(optimizer, dict):
            raise CheckpointCorruptedError(
                f"{d.location}/{OPTIMIZER}: expected an optimizer state_dict (a dict)", file=f"{d.location}/{OPTIMIZER}"
            )
    config = _json(d, CONFIG, None) if CONFIG in present else {}
    if not isinstance(config, dict):
        raise CheckpointCorruptedError(f"{d.location}/{CONFIG}: expected a JSON object", file=f"{d.location}/{CONFIG}")
    vocab = _json(d, VOCAB, "vocab") if VOCAB in present else None
    files = {}
    for name in present:
        with contextlib.closing(d.open(name)) as f:
            files[name] = {"size": f.size}
    return Checkpoint(
        path=display(directory),
        format_version=0,
        step=meta["step"],
        config=config,
        vocab=vocab,
        model_state=dict(state),
        optimizer_state=optimizer,
        quantization=None,
        manifest={"format": _manifest.FORMAT, "format_version": 0, "step": meta["step"], "files": files},
        extra=None,
    )


def convert_format0(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = False) -> Path | str:
    """Rewrite the format-0 checkpoint ``src`` as format 1 under the root ``dst``; returns the new path."""
    ckpt = read(storage_for(src))
    snap = _save.snapshot(ckpt.model_state, None, ckpt.config, ckpt.vocab, ckpt.step)
    snap = dataclasses.replace(
        snap,
        optimizer=ckpt.optimizer_state,
        rng_tensors={},
        rng_doc=None,
        rng_sources=[],
        extra={"converted_from": {"format_version": 0, "path": _source_path(src)}},
    )
    return _save.write(snap, dst, overwrite=overwrite)


def _source_path(src: str | os.PathLike[str]) -> str:
    storage = storage_for(src)
    return str(storage.path.resolve()) if isinstance(storage, LocalStorage) else storage.location
