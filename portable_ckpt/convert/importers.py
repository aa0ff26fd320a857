"""Import checkpoints other code wrote: a torch.save state_dict, a nanoGPT training dict, a Hugging Face
Trainer ``checkpoint-N/`` folder (``hf_trainer.py``), a compressed-tensors quantized folder
(``compressed.py``, saved as a quantized checkpoint), a PyTorch Lightning ``.ckpt``; each is saved as a
format-1 checkpoint. Readers fill a ``Parts`` (``parts.py``) and list every entry they do not carry over.

Every pickle is read through the format's allowlist (``sources.py``); a hostile one is refused with
``CheckpointUnsafeError`` before anything of it runs. What is not carried over is listed in the
report with the reason: nothing is dropped silently. The manifest's ``extra["imported_from"]`` names
the source kind, its name and the XXH3-128 checksum of its bytes (and keeps a compressed-tensors
folder's ``quantization_config`` block as found).

>>> report = import_checkpoint("out/ckpt.pt", "checkpoints")  # doctest: +SKIP
>>> report.kind, report.step, report.path
('nanogpt', 5000, PosixPath('checkpoints/step-00005000'))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from portable_ckpt import save as _save
from portable_ckpt.convert import compressed as _compressed
from portable_ckpt.convert import hf_trainer as _hf_trainer
from portable_ckpt.convert import sources as _sources
from portable_ckpt.convert.parts import ImportEntry, Parts, plain
from portable_ckpt.errors import CheckpointInputError, CheckpointNotFoundError
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import names
from portable_ckpt.format.hashing import checksum

# source kind -> what it is, as the report and the messages name it
KINDS: dict[str, str] = {
    "state_dict": "a torch.save state_dict (str -> tensor)",
    "safetensors": "a bare safetensors file (weights only)",
    "nanogpt": "a nanoGPT training checkpoint (model, optimizer, iter_num, model_args, config)",
    "hf-trainer": "a Hugging Face Trainer checkpoint folder",
    "compressed-tensors": "a compressed-tensors quantized Hugging Face folder (config.json with a quantization_config)",
    "lightning": "a PyTorch Lightning checkpoint (.ckpt)",
}


@dataclass(frozen=True, slots=True)
class ImportReport:
    """The result of ``import_checkpoint``: the new checkpoint, its source, and what was and was not carried over."""

    path: Path | str
    kind: str
    source: str
    source_checksum: str
    step: int
    carried: tuple[ImportEntry, ...]
    not_carried: tuple[ImportEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "source": self.source,
            "source_checksum": self.source_checksum,
            "step": self.step,
            "carried": [{"entry": e.entry, "detail": e.detail} for e in self.carried],
            "not_carried": [{"entry": e.entry, "detail": e.detail} for e in self.not_carried],
        }


def _keys(obj: dict[Any, Any]) -> str:
    return ", ".join(repr(k) for k in list(obj)[:10]) + (", ..." if len(obj) > 10 else "")


# --------------------------------------------------------------------------------------------------
# single files: what torch.save wrote, told apart by its keys
# --------------------------------------------------------------------------------------------------


def _read_state_dict(obj: dict[Any, Any], parts: Parts) -> None:
    parts.set_model(obj, "(the state_dict)")


def _read_nanogpt(obj: dict[Any, Any], parts: Parts) -> None:
    parts.set_model(obj["model"], "model", strip="_orig_mod.")  # nanoGPT's own resume strips it so
    if "optimizer" in obj:
        parts.set_state("optimizer", obj["optimizer"], "optimizer")
    parts.set_step(obj["iter_num"], "iter_num")
    for key in ("model_args", "config"):
        if key in obj:
            parts.set_json(parts.config, key, obj[key], key, "config")
    for key in sorted(set(obj) - {"model", "optimizer", "iter_num", "model_args", "config"}, key=str):
        parts.set_json(parts.extra, str(key), obj[key], str(key), "extra")


_LIGHTNING_SCALERS = ("native_amp_scaling_state", "MixedPrecision", "MixedPrecisionPlugin")  # the AMP GradScaler
_LIGHTNING_KEYS = {"state_dict", "optimizer_states", "lr_schedulers", "global_step", "hyper_parameters"}


def _read_lightning(obj: dict[Any, Any], parts: Parts) -> None:
    parts.set_model(obj["state_dict"], "state_dict")
    for key, slot in (("optimizer_states", "optimizer"), ("lr_schedulers", "scheduler")):
        states = obj.get(key, [])
        if not isinstance(states, list):
            parts.skip(key, f"a {type(states).__name__}, expected a list of {slot} state_dicts")
            continue
        for i, state in enumerate(states):
            if i == 0:
                parts.set_state(slot, state, f"{key}[0]")
            else:
                parts.skip(f"{key}[{i}]", f"{slot} {i + 1} of {len(states)}: a checkpoint holds one {slot}")
    if "global_step" in obj:
        parts.set_step(obj["global_step"], "global_step")
    if "hyper_parameters" in obj:
        hp = obj["hyper_parameters"]
        try:
            doc = _jsonio.to_json_value(plain(hp), "hyper_parameters")
        except CheckpointInputError as e:
            parts.skip("hyper_parameters", f"not JSON, so not the config: {e}")
        else:
            if isinstance(doc, dict):
                parts.config.update(doc)
                parts.carry("hyper_parameters", "config")
            else:
                parts.skip("hyper_parameters", f"a {type(hp).__name__}, not a dict, so not the config")
    scaler = next((k for k in _LIGHTNING_SCALERS if k in obj), None)
    if scaler is not None:
        parts.set_state("scaler", obj[scaler], scaler)
    for key in sorted(set(obj) - _LIGHTNING_KEYS - {scaler}, key=str):
        parts.set_json(parts.extra, str(key), obj[key], str(key), "extra")


def _is_state_dict(obj: Any) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


# kind -> (does this dict have that layout, its reader), in the order tried
FILE_LAYOUTS: dict[str, tuple[Callable[[dict[Any, Any]], bool], Callable[[dict[Any, Any], Parts], None]]] = {
    "lightning": (
        lambda o: "state_dict" in o and ("pytorch-lightning_version" in o or "global_step" in o),
        _read_lightning,
    ),
    "nanogpt": (lambda o: "model" in o and "iter_num" in o, _read_nanogpt),
    "state_dict": (_is_state_dict, _read_state_dict),
}


def _read_file(path: Path, parts: Parts) -> str:
    if path.suffix == ".safetensors":
        parts.set_model(_sources.load_safetensors(path), "(the safetensors file)")
        return "safetensors"
    obj = _sources.load_pt(path)
    if isinstance(obj, dict):
        for kind, (matches, read) in FILE_LAYOUTS.items():
            if matches(obj):
                read(obj, parts)
                return kind
    found = f"a dict with keys {_keys(obj)}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise CheckpointInputError(
        f"{path}: a torch.save file holding {found}, which is none of the layouts the importer knows: "
        f"{KINDS['state_dict']}; {KINDS['nanogpt']}; {KINDS['lightning']}"
    )


# --------------------------------------------------------------------------------------------------
# the import
# --------------------------------------------------------------------------------------------------


def _folder_checksum(folder: Path) -> tuple[str, dict[str, str]]:
    files = {p.name: _sources.file_checksum(p) for p in sorted(folder.iterdir()) if p.is_file()}
    listing = "".join(f"{digest}  {name}\n" for name, digest in files.items())
    return checksum(listing.encode("utf-8")), files


@dataclass(frozen=True, slots=True)
class _Source:
    kind: str
    checksum: str
    files: dict[str, str] | None = None  # per-file checksums of a folder
    scheme: _compressed.Scheme | None = None  # a compressed-tensors folder's
    quantization: dict[str, Any] | None = None  # its quantization_metadata.json document


def _read_source(path: Path, parts: Parts) -> _Source:
    """What the source is, after filling ``parts``."""
    if path.is_file():
        digest = _sources.file_checksum(path)
        return _Source(_read_file(path, parts), digest)
    if (path / names.MANIFEST).exists():
        raise CheckpointInputError(
            f"{path}: already a portable checkpoint (it has {names.MANIFEST}); nothing to import"
        )
    if not any((path / n).is_file() for n, _ in _hf_trainer.HF_WEIGHTS):
        raise CheckpointNotFoundError(
            f"{path}: a directory without any file the importer knows (expected {KINDS['hf-trainer']} with "
            f"{', '.join(n for n, _ in _hf_trainer.HF_WEIGHTS)}); pass the checkpoint-N folder, or a "
            ".pt/.pth/.bin/.ckpt file",
            file=path,
        )
    digest, files = _folder_checksum(path)
    scheme = _compressed.read_scheme(path)  # refuses a quantization it cannot hold before any weight is read
    handled = _hf_trainer.read_folder(path, parts)
    quantization = None if scheme is None else _compressed.convert(path, scheme, parts)
    for p in sorted(path.iterdir()):
        if p.name not in handled:
            what = "a directory" if p.is_dir() else "a file"
            parts.skip(p.name, f"{what} the importer does not know (tokenizer files: keep them beside the checkpoint)")
    kind = "hf-trainer" if scheme is None else "compressed-tensors"
    return _Source(kind, digest, files, scheme, quantization)


def import_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    step: int | None = None,
    overwrite: bool = False,
) -> ImportReport:
    """Import the foreign checkpoint ``src`` (a file, a Trainer folder or a compressed-tensors folder) as
    ``<dst>/step-NNNNNNNN``; a compressed-tensors folder becomes a quantized checkpoint.

    ``step`` overrides the step the source records (a bare state_dict records none: 0 then).
    Refuses hostile pickles (``CheckpointUnsafeError``), sources of no known layout, and quantization a
    portable checkpoint cannot hold (``CheckpointInputError`` naming the ``config.json`` field).
    """
    given = None if step is None else _save.as_step(step)  # a bad step fails before anything is read
    path = Path(src)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file or directory", file=path)
    parts = Parts(label=str(path))
    source = _read_source(path, parts)
    if given is not None:
        parts.step = given
        parts.carry("(step)", f"{parts.step}, as given")
    elif parts.step is None:
        parts.step = 0
        parts.carry("(step)", "0: the source records no step; pass step= (--step N) to set one")
    origin: dict[str, Any] = {"kind": source.kind, "source": path.name, "source_checksum": source.checksum}
    if source.files is not None:
        origin["files"] = source.files
    if source.scheme is not None:
        origin[_compressed.BLOCK] = source.scheme.config
    extra = {**parts.extra, "imported_from": origin}
    snap = _save.snapshot(parts.model, None, parts.config, parts.vocab, parts.step, extra=extra)
    rng_tensors, rng_doc = parts.rng if parts.rng is not None else ({}, None)
    snap = dataclasses.replace(
        snap,
        optimizer=parts.optimizer,
        scheduler=parts.scheduler,
        scaler=parts.scaler,
        rng_tensors=rng_tensors,
        rng_doc=rng_doc,
        rng_sources=sorted(rng_tensors),
        quantization=source.quantization,
    )
    written = _save.write(snap, dst, overwrite=overwrite)
    return ImportReport(
        path=written,
        kind=source.kind,
        source=str(path),
        source_checksum=source.checksum,
        step=parts.step,
        carried=tuple(parts.carried),
        not_carried=tuple(parts.skipped),
    )


__all__ = ["FILE_LAYOUTS", "KINDS", "ImportEntry", "ImportReport", "import_checkpoint"]
