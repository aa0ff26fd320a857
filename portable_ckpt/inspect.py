"""Cheap descriptions and full validation of checkpoints, for the CLI and for callers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from portable_ckpt.convert import format0 as _legacy
from portable_ckpt.errors import CheckpointError
from portable_ckpt.format import manifest as _manifest
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.load import KNOWN_FILES, _Files, _quantization, read_checkpoint, resolve
from portable_ckpt.save import MODEL_FILE


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a checkpoint: the file (path) and what is wrong with it."""

    file: str
    message: str
    error: str  # the CheckpointError subclass name


def _problem(e: CheckpointError, fallback: str) -> Problem:
    text = str(e)
    file, sep, message = text.partition(": ")
    if not sep or ("/" not in file and "." not in file):
        file, message = fallback, text
    return Problem(file=file, message=message, error=type(e).__name__)


def validate_checkpoint(path: str | os.PathLike[str]) -> list[Problem]:
    """Every problem found in the checkpoint at ``path`` (empty when valid). Never raises CheckpointError."""
    try:
        directory = resolve(path)
    except CheckpointError as e:
        return [_problem(e, str(path))]
    if not (directory / _manifest.MANIFEST).exists():
        try:
            _legacy.read(directory)
        except CheckpointError as e:
            return [_problem(e, str(directory))]
        return []
    try:
        files = _Files(directory, verify=True)
    except CheckpointError as e:
        return [_problem(e, str(directory / _manifest.MANIFEST))]
    problems: list[Problem] = []
    with files:
        for name in sorted(files.entries):  # every file's kind, size and checksum, each reported
            try:
                files.verify_file(name)
            except CheckpointError as e:
                problems.append(_problem(e, files.label(name)))
    if problems:
        return problems
    try:  # then every structural check a load makes, on the verified files
        read_checkpoint(directory, verify=False)
    except CheckpointError as e:
        return [_problem(e, str(directory))]
    return []


def inspect_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-compatible description read from the manifest and headers only (no tensor data)."""
    directory = resolve(path)
    if not (directory / _manifest.MANIFEST).exists():
        ckpt = _legacy.read(directory)
        return {
            "path": str(directory),
            "format_version": 0,
            "step": ckpt.step,
            "files": [{"name": n, "size": e["size"]} for n, e in sorted(ckpt.manifest["files"].items())],
            "tensors": [
                {"name": k, "dtype": _safetensors.DTYPE_NAMES.get(v.dtype, str(v.dtype)), "shape": list(v.shape)}
                for k, v in sorted(ckpt.model_state.items())
            ],
            "aliases": {},
            "quantization": None,
        }
    with _Files(directory, verify=False) as files:
        manifest = files.manifest
        with files.open(MODEL_FILE) as f:
            header, _ = _safetensors.read_header(f, manifest["files"][MODEL_FILE]["size"], files.label(MODEL_FILE))
        quant = None
        if manifest.get("quantization") is not None:
            meta = _quantization(files, manifest, header)
            if meta is not None:
                quant = {**manifest["quantization"], **_quant_sizes(meta, header)}
    return {
        "path": str(directory),
        "format_version": manifest["format_version"],
        "step": manifest["step"],
        "created_at": manifest["created_at"],
        "producer": manifest["producer"],
        "files": [{"name": n, "size": e["size"]} for n, e in sorted(manifest["files"].items())],
        "tensors": [
            {"name": e.name, "dtype": e.dtype, "shape": list(e.shape)}
            for e in sorted(header.entries, key=lambda e: e.name)
        ],
        "aliases": manifest.get("aliases", {}),
        "rng": manifest.get("rng", []),
        "quantization": quant,
        "unknown_files": sorted(set(manifest["files"]) - KNOWN_FILES),
    }


# the tensors that represent a quantized weight (adapters, biases and QAT master weights are extra)
_QUANTIZED_ROLES = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def _quant_sizes(meta: dict[str, Any], header: _safetensors.Header) -> dict[str, int]:
    """Bytes of the quantized weights as stored (integers, scales, zero points) against the same weights in fp32."""
    by_name = {e.name: e for e in header.entries}
    stored = full = 0
    for module in meta["modules"]:
        for role in _QUANTIZED_ROLES:
            t = module["tensors"].get(role)
            if t is not None and t["name"] in by_name:
                stored += by_name[t["name"]].nbytes
        rows, cols = module["shape"]
        full += 4 * rows * cols
    return {"quantized_bytes": stored, "float32_bytes": full}
