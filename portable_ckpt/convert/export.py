"""Export a checkpoint for other code: a Hugging Face ``from_pretrained`` folder, full precision or in
compressed-tensors' ``pack-quantized`` format (``format_spec/quantization.md``, section *compressed-tensors*).

The folder holds ``model.safetensors`` and the architecture's ``config.json``; nothing else of the
checkpoint (optimizer, RNG, vocabulary) goes there. Every tensor that is not written as stored is
listed in the report with what was done to it: nothing is dropped silently.

>>> report = export_checkpoint("checkpoints", "hf-model", to="hf")  # doctest: +SKIP
>>> report.path
PosixPath('hf-model')
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from portable_ckpt.errors import CheckpointExistsError, CheckpointInputError, CheckpointNotFoundError
from portable_ckpt.load import load_checkpoint
from portable_ckpt.quant.packing import COMPUTE_DTYPES, PACKINGS, Geometry, dequantize_values, pack_quantized

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
HF_KEYS = ("model_type", "architectures")  # a training config holding both is taken as the architecture config
QAT_MASTER = "not written: the stored codes are its quantization (mode qat)"


@dataclass(frozen=True, slots=True)
class ExportEntry:
    """One tensor or file of the export: ``entry`` names it, ``detail`` says what was done to it."""

    entry: str
    detail: str


@dataclass(frozen=True, slots=True)
class ExportReport:
    """The result of ``export_checkpoint``: the folder written, from which checkpoint, and what was changed."""

    path: Path
    to: str
    source: str
    files: tuple[str, ...]
    changed: tuple[ExportEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "to": self.to,
            "source": self.source,
            "files": list(self.files),
            "changed": [{"entry": e.entry, "detail": e.detail} for e in self.changed],
        }


# --------------------------------------------------------------------------------------------------
# quantized modules: dequantize, or repack as pack-quantized
# --------------------------------------------------------------------------------------------------


def _geometry(meta: Mapping[str, Any], module: Mapping[str, Any]) -> Geometry:
    rows, cols = module["shape"]
    lora = meta.get("lora") or {}
    return Geometry(rows=rows, cols=cols, group_size=meta["group_size"], lora_rank=lora.get("rank"))


def _tensors(state: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and "." not in k[len(prefix) :]}


def _codes(meta: Mapping[str, Any], t: Mapping[str, torch.Tensor], g: Geometry) -> tuple[torch.Tensor, ...]:
    packing = PACKINGS[meta["packing"]]
    q = packing.decode(t, g)
    zp = packing.decode_zp(t["weight_zero_point"], g) if "weight_zero_point" in t else None
    return (q, zp) if zp is not None else (q,)


def _dequantized(meta: Mapping[str, Any], module: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The float weight the quantized module computes with, LoRA adapters merged (W + alpha/rank · B A)."""
    g = _geometry(meta, module)
    q, *zp = _codes(meta, t, g)
    dtype = COMPUTE_DTYPES[meta["compute_dtype"]]
    weight = dequantize_values(q, t["weight_scale"], zp[0] if zp else None, dtype)
    if meta["mode"] == "lora":
        weight = weight + (meta["lora"]["alpha"] / meta["lora"]["rank"]) * (t["lora_B"] @ t["lora_A"])
    return weight


def _pack_quantized(
    meta: Mapping[str, Any], module: Mapping[str, Any], t: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized tensors by role: codes in int32 words along the columns (8 or 4 per
    word), zero points along the rows, ``weight_shape`` int64 [rows, cols]."""
    q, *zp = _codes(meta, t, _geometry(meta, module))
    return {**pack_quantized(q, zp[0] if zp else None, meta["bits"]), "weight_scale": t["weight_scale"]}


def _refuse_lora(meta: Mapping[str, Any], src: str) -> None:
    if meta["mode"] == "lora":
        raise CheckpointInputError(
            f"{src}: a LoRA checkpoint (rank {meta['lora']['rank']}): compressed-tensors cannot hold the "
            'adapters, and re-quantizing the merged weight would change the model; export with to="hf" '
            "(--to hf) for the merged full-precision model"
        )


# --------------------------------------------------------------------------------------------------
# targets: (checkpoint state, metadata or None, src, changes) -> tensors to write, quantization_config or None
# --------------------------------------------------------------------------------------------------

Changes = list[ExportEntry]


def _float_state(
    state: dict[str, torch.Tensor], meta: Mapping[str, Any] | None, src: str, changes: Changes
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    out = dict(state)
    if meta is None:
        return out, None
    merged = ", LoRA adapters merged" if meta["mode"] == "lora" else ""
    for module in meta["modules"]:
        name = module["name"]
        tensors = _tensors(state, name)
        for role in tensors:
            if role != "bias":
                del out[f"{name}.{role}"]
        out[f"{name}.weight"] = _dequantized(meta, module, tensors)
        changes.append(ExportEntry(f"{name}.weight", f"dequantized from int{meta['bits']}{merged}"))
    return out, None


def _compressed_state(
    state: dict[str, torch.Tensor], meta: Mapping[str, Any] | None, src: str, changes: Changes
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    if meta is None:
        raise CheckpointInputError(
            f"{src}: a full-precision checkpoint; compressed-tensors needs a quantized one "
            '(portable_ckpt.quantize, then save), or export with to="hf" (--to hf)'
        )
    _refuse_lora(meta, src)
    out = dict(state)
    linear = [m for m in meta["modules"] if m["kind"] == "linear"]
    for module in meta["modules"]:
        name = module["name"]
        tensors = _tensors(state, name)
        for role in tensors:
            if role != "bias":
                del out[f"{name}.{role}"]
        if module["kind"] == "linear":
            out.update({f"{name}.{role}": v for role, v in _pack_quantized(meta, module, tensors).items()})
            if meta["bits"] == 8:
                changes.append(ExportEntry(f"{name}.weight", "int8 codes repacked to weight_packed (4 per int32)"))
        else:  # compressed-tensors' config groups target Linear layers only
            out[f"{name}.weight"] = _dequantized(meta, module, tensors)
            changes.append(
                ExportEntry(f"{name}.weight", "an embedding: dequantized (compressed-tensors targets Linear)")
            )
        if "weight_master" in tensors:
            changes.append(ExportEntry(f"{name}.weight_master", QAT_MASTER))
    strategy = "group" if meta["granularity"] == "group" else "channel"
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": meta["bits"],
                    "type": "int",
                    "symmetric": meta["symmetric"],
                    "strategy": strategy,
                    "group_size": meta["group_size"],
                    "dynamic": False,
                },
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": sorted(set(meta["ignored_modules"]) - {m["name"] for m in linear}),
    }
    return out, config


TARGETS: dict[str, Callable[..., tuple[dict[str, torch.Tensor], dict[str, Any] | None]]] = {
    "hf": _float_state,
    "compressed-tensors": _compressed_state,
}


# --------------------------------------------------------------------------------------------------
# the export
# --------------------------------------------------------------------------------------------------


def _architecture(
    config: Mapping[str, Any] | str | os.PathLike[str] | None, trained: Mapping[str, Any], src: str
) -> dict[str, Any]:
    if config is None:
        if all(k in trained for k in HF_KEYS):
            return dict(trained)
        raise CheckpointInputError(
            f"{src}: the checkpoint's config has no {' and '.join(HF_KEYS)}, so it is not a Hugging Face config; "
            "pass the architecture with config= (a dict or the path of a config.json; --config FILE)"
        )
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: no such config file (config= / --config)", file=path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointInputError(f"{path}: not a JSON config: {e}", file=path) from e
    if not isinstance(doc, dict):
        raise CheckpointInputError(f"{path}: a JSON {type(doc).__name__}, expected an object", file=path)
    return doc


def _untie(state: dict[str, torch.Tensor], arch: Mapping[str, Any], changes: Changes) -> None:
    """With ``tie_word_embeddings`` HF re-ties the head on load, so a head equal to another tensor is left out."""
    head = state.get("lm_head.weight")
    if not arch.get("tie_word_embeddings") or head is None:
        return
    twin = next(
        (k for k, v in state.items() if k != "lm_head.weight" and v.shape == head.shape and torch.equal(v, head)), None
    )
    if twin is not None:
        del state["lm_head.weight"]
        changes.append(ExportEntry("lm_head.weight", f"not written: tied to {twin} (tie_word_embeddings)"))


def export_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str,
    config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
) -> ExportReport:
    """Export the checkpoint ``src`` (a directory, or a root's newest) as the new folder ``dst``.

    to: ``"hf"`` (full precision; a quantized model is dequantized, LoRA merged) or ``"compressed-tensors"``
    (pack-quantized integers). config: the architecture's config.json as a dict or a path; default the
    checkpoint's training config when it is a Hugging Face one.
    """
    if to not in TARGETS:
        raise CheckpointInputError(f"to={to!r}: expected one of {', '.join(map(repr, TARGETS))}")
    out = Path(dst)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointExistsError(f"{out}: already exists; export into a new or empty folder", file=out)
    ckpt = load_checkpoint(src)
    label = str(ckpt.path)
    arch = _architecture(config, ckpt.config, label)
    changes: Changes = []
    state, quant_config = TARGETS[to](ckpt.model_state, ckpt.quantization, label, changes)
    _untie(state, arch, changes)
    if quant_config is not None:
        arch["quantization_config"] = quant_config
    tmp = out.with_name(f".{out.name}.export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # clones: safetensors refuses tensors that share memory
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sorted(state.items())}
    save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    (tmp / CONFIG_FILE).write_text(json.dumps(arch, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return ExportReport(path=out, to=to, source=label, files=(CONFIG_FILE, WEIGHTS_FILE), changed=tuple(changes))


__all__ = ["TARGETS", "ExportEntry", "ExportReport", "export_checkpoint"]
