"""Format 0: the layout training code used before this project, read-only, and its conversion.

A format-0 checkpoint is a directory with ``model.pt`` (torch.save of the model state_dict),
``metadata.json`` holding ``{"step": N}``, and optionally ``optimizer.pt``, ``config.json`` and
``vocab.json``. Pickles are read with ``weights_only=True``; there are no checksums to verify.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Any

import torch

from portable_ckpt.errors import CheckpointCorruptedError
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import manifest as _manifest
from portable_ckpt.format import pt as _pt
from portable_ckpt.format import schemas as _schemas
from portable_ckpt.types import Checkpoint

MODEL = "model.pt"
METADATA = "metadata.json"
FILES = (MODEL, "optimizer.pt", "config.json", "vocab.json", METADATA)


def is_legacy(directory: Path) -> bool:
    return (directory / MODEL).is_file() and (directory / METADATA).is_file()


def _json(directory: Path, name: str, kind: str | None) -> Any:
    label = f"{directory}/{name}"
    doc = _jsonio.loads(_manifest.read_regular(directory / name, name, _jsonio.MAX_JSON_BYTES), label)
    if kind is not None:
        _schemas.validate(doc, kind, label)
    return doc


def read(directory: Path, *, map_location: Any = "cpu") -> Checkpoint:
    """Read a format-0 directory into the same Checkpoint a format-1 load returns."""
    meta = _json(directory, METADATA, "legacy_metadata")
    for name in FILES:
        try:
            mode = os.lstat(directory / name).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(mode):
            raise CheckpointCorruptedError(
                f"{directory}/{name}: not a regular file (symlinks, pipes and devices are refused)"
            )
    state = _pt.load(directory / MODEL, f"{directory}/{MODEL}", map_location, mmap=False)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointCorruptedError(f"{directory}/{MODEL}: expected a state_dict mapping names to tensors")
    optimizer = None
    if (directory / "optimizer.pt").exists():
        optimizer = _pt.load(directory / "optimizer.pt", f"{directory}/optimizer.pt", map_location, mmap=False)
        if not isinstance(optimizer, dict):
            raise CheckpointCorruptedError(f"{directory}/optimizer.pt: expected an optimizer state_dict (a dict)")
    config = _json(directory, "config.json", None) if (directory / "config.json").exists() else {}
    if not isinstance(config, dict):
        raise CheckpointCorruptedError(f"{directory}/config.json: expected a JSON object")
    vocab = _json(directory, "vocab.json", "vocab") if (directory / "vocab.json").exists() else None
    files = {name: {"size": os.path.getsize(directory / name)} for name in FILES if (directory / name).exists()}
    return Checkpoint(
        path=directory,
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


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Rewrite the format-0 checkpoint ``src`` as format 1 under the root ``dst``; returns the new path."""
    from portable_ckpt import save as _save  # late: save imports the loader's siblings

    ckpt = read(Path(src))
    snap = _save.snapshot(ckpt.model_state, None, ckpt.config, ckpt.vocab, ckpt.step)
    snap = dataclasses.replace(
        snap,
        optimizer=ckpt.optimizer_state,
        rng_tensors={},
        rng_doc=None,
        rng_sources=[],
        extra={"converted_from": {"format_version": 0, "path": str(Path(src).resolve())}},
    )
    return _save.write(snap, dst, overwrite=overwrite)
