"""Cheap descriptions and full validation of checkpoints, for the CLI and for callers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from portable_ckpt.convert import format0 as _legacy
from portable_ckpt.errors import CheckpointError
from portable_ckpt.files import CheckpointFiles, read_quantization
from portable_ckpt.format import names
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.load import read_checkpoint
from portable_ckpt.root import display, resolve
from portable_ckpt.types import CheckpointInfo, FileInfo, Problem, TensorInfo, ValidationReport


def _problem(e: CheckpointError, fallback: str) -> Problem:
    text = str(e)
    file, sep, message = text.partition(": ")
    if not sep or ("/" not in file and "." not in file):
        file, message = fallback, text
    return Problem(file=file, message=message, error=type(e).__name__)


def validate_checkpoint(path: str | os.PathLike[str]) -> ValidationReport:
    """Every problem found in the checkpoint (or a root's newest checkpoint) at ``path``; never raises
    CheckpointError. Each damaged file is one problem; with every file intact, the first structural one.

    >>> report = validate_checkpoint("checkpoints")  # doctest: +SKIP
    >>> report.valid, [(p.file, p.error) for p in report.problems]  # doctest: +SKIP
    (True, [])
    """
    return ValidationReport(path=path if isinstance(path, str) else Path(path), problems=tuple(_problems(path)))


def _problems(path: str | os.PathLike[str]) -> list[Problem]:
    try:
        directory = resolve(path)
    except CheckpointError as e:
        return [_problem(e, str(path))]
    if directory.kind(names.MANIFEST) is None:
        try:
            _legacy.read(directory)
        except CheckpointError as e:
            return [_problem(e, directory.location)]
        return []
    try:
        files = CheckpointFiles(directory, verify=True)
    except CheckpointError as e:
        return [_problem(e, f"{directory.location}/{names.MANIFEST}")]
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
        return [_problem(e, directory.location)]
    return []


def inspect_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Describe the checkpoint (or a root's newest checkpoint) at ``path`` from its manifest and headers
    only: no tensor data is read and checksums are not verified (``validate_checkpoint`` does that).

    >>> info = inspect_checkpoint("checkpoints")  # doctest: +SKIP
    >>> info.step, [(t.name, t.dtype, t.shape) for t in info.tensors][:1]  # doctest: +SKIP
    (100, [('emb.weight', 'F32', (61, 96))])
    """
    directory = resolve(path)
    if directory.kind(names.MANIFEST) is None:
        ckpt = _legacy.read(directory)
        return CheckpointInfo(
            path=display(directory),
            format_version=0,
            step=ckpt.step,
            created_at=None,
            producer=None,
            files=tuple(FileInfo(n, e["size"]) for n, e in sorted(ckpt.manifest["files"].items())),
            tensors=tuple(
                TensorInfo(k, _safetensors.DTYPE_NAMES.get(v.dtype, str(v.dtype)), tuple(v.shape))
                for k, v in sorted(ckpt.model_state.items())
            ),
            aliases={},
            rng=(),
            quantization=None,
            unknown_files=(),
        )
    with CheckpointFiles(directory, verify=False) as files:
        manifest = files.manifest
        with files.opened(names.MODEL) as f:
            header, _ = files.read_header(f, names.MODEL)
        quant = None
        if manifest.get("quantization") is not None:
            meta = read_quantization(files, manifest, header)
            if meta is not None:
                quant = {**manifest["quantization"], **_quant_sizes(meta, header)}
    return CheckpointInfo(
        path=display(directory),
        format_version=manifest["format_version"],
        step=manifest["step"],
        created_at=manifest["created_at"],
        producer=manifest["producer"],
        files=tuple(FileInfo(n, e["size"]) for n, e in sorted(manifest["files"].items())),
        tensors=tuple(
            TensorInfo(e.name, e.dtype, tuple(e.shape)) for e in sorted(header.entries, key=lambda e: e.name)
        ),
        aliases=dict(manifest.get("aliases", {})),
        rng=tuple(manifest.get("rng", [])),
        quantization=quant,
        unknown_files=tuple(sorted(set(manifest["files"]) - names.KNOWN_FILES)),
    )


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
