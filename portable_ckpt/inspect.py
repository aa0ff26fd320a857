"""Cheap descriptions and full validation of checkpoints, for the CLI and for callers."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from portable_ckpt.convert import format0 as _legacy
from portable_ckpt.errors import CheckpointError
from portable_ckpt.files import CheckpointFiles, merged_header, model_headers, read_quantization
from portable_ckpt.format import names
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.format import sharding as _sharding
from portable_ckpt.load import read_checkpoint
from portable_ckpt.root import basename, committed_steps, display, resolve
from portable_ckpt.sharded import RANK_KINDS, ShardedFiles, is_sharded
from portable_ckpt.storage import Storage, storage_for
from portable_ckpt.types import CheckpointInfo, CommittedStep, FileInfo, Problem, Progress, TensorInfo, ValidationReport


def problem_from(e: CheckpointError, fallback: str) -> Problem:
    """The problem an error reports: the file it is about (``e.file``, else ``fallback``) and what is wrong."""
    text = str(e)
    file = e.file or fallback
    message = text.removeprefix(f"{file}: ") if e.file else text
    return Problem(file=file, message=message, error=type(e).__name__)


def validate_checkpoint(
    path: str | os.PathLike[str] | Storage, *, progress: Progress | None = None
) -> ValidationReport:
    """Every problem found in the checkpoint (or a root's newest checkpoint) at ``path``; never raises
    CheckpointError. Each damaged file is one problem; with every file intact, the first structural one.

    progress: called as ``progress(done, total, file_name)`` before each file is verified.

    >>> report = validate_checkpoint("checkpoints")  # doctest: +SKIP
    >>> report.valid, [(p.file, p.error) for p in report.problems]  # doctest: +SKIP
    (True, [])
    """
    problems = tuple(_problems(path, progress))
    shown = path if isinstance(path, str) else Path(path) if isinstance(path, os.PathLike) else path.location
    return ValidationReport(path=shown, problems=problems)


def _problems(path: str | os.PathLike[str] | Storage, progress: Progress | None) -> list[Problem]:
    try:
        directory = resolve(path)
    except CheckpointError as e:
        return [problem_from(e, os.fspath(path) if isinstance(path, (str, os.PathLike)) else path.location)]
    if directory.kind(names.MANIFEST) is None:
        try:
            _legacy.read(directory)
        except CheckpointError as e:
            return [problem_from(e, directory.location)]
        return []
    try:
        files = CheckpointFiles(directory, verify=True)
    except CheckpointError as e:
        return [problem_from(e, f"{directory.location}/{names.MANIFEST}")]
    problems: list[Problem] = []
    with files:
        listed = sorted(files.entries)
        for done, name in enumerate(listed):  # every file's kind, size and checksum, each reported
            if progress is not None:
                progress(done, len(listed), name)
            try:
                files.verify_file(name)
            except CheckpointError as e:
                problems.append(problem_from(e, files.label(name)))
    if problems:
        return problems
    try:  # then every structural check a load makes, on the verified files
        if is_sharded(files.manifest):
            with CheckpointFiles(directory, verify=True) as again, ShardedFiles(again) as sharded:
                sharded.verify_all()  # every shard's header against the table, every chunk's checksum
        read_checkpoint(directory, verify=False)
    except CheckpointError as e:
        return [problem_from(e, directory.location)]
    return []


def inspect_checkpoint(path: str | os.PathLike[str] | Storage) -> CheckpointInfo:
    """Describe the checkpoint (or a root's newest checkpoint) at ``path`` from its manifest and headers
    only: no tensor data is read and checksums are not verified (``validate_checkpoint`` does that).
    Given a root, ``checkpoints`` lists its committed checkpoints too.

    >>> info = inspect_checkpoint("checkpoints")  # doctest: +SKIP
    >>> info.step, [(t.name, t.dtype, t.shape) for t in info.tensors][:1]  # doctest: +SKIP
    (100, [('emb.weight', 'F32', (61, 96))])
    >>> [(c.step, c.latest) for c in info.checkpoints]  # doctest: +SKIP
    [(50, False), (100, True)]
    """
    storage = storage_for(path)
    directory = resolve(storage)
    info = _describe(directory)
    if directory.location == storage.location:
        return info
    return dataclasses.replace(info, checkpoints=_committed(storage, directory))


def _committed(root: Storage, newest: Storage) -> tuple[CommittedStep, ...]:
    """The root's committed checkpoints by step; ``newest`` (what the root resolved to) is marked latest."""
    steps = committed_steps(root)
    chosen = basename(newest)
    return tuple(
        CommittedStep(
            step=s,
            name=names.step_name(s),
            path=display(root.child(names.step_name(s))),
            latest=names.step_name(s) == chosen,
        )
        for s in steps
    )


def _describe(directory: Storage) -> CheckpointInfo:
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
        if is_sharded(manifest):
            return _describe_sharded(files)
        with model_headers(files) as parts:
            header = merged_header(parts)
        quant = None
        if manifest.get("quantization") is not None:
            meta = read_quantization(files, manifest, header)
            if meta is not None:
                quant = {**manifest["quantization"], **_quant_sizes(meta, header)}
        model_files = files.model_files
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
        unknown_files=tuple(sorted(set(manifest["files"]) - (names.KNOWN_FILES - {names.MODEL}) - set(model_files))),
    )


def _describe_sharded(files: CheckpointFiles) -> CheckpointInfo:
    """A sharded checkpoint: its model's global tensors from sharding.json, how it was sharded."""
    manifest = files.manifest
    with ShardedFiles(files) as sharded:
        table = sharded.table
        model = table.tensors("model")
        known = set(sharded.shard_files) | {_sharding.SHARDING, *names.KNOWN_FILES}
        known |= {n for n in manifest["files"] if n.split("-", 1)[0] in RANK_KINDS}
        return CheckpointInfo(
            path=display(files.storage),
            format_version=manifest["format_version"],
            step=manifest["step"],
            created_at=manifest["created_at"],
            producer=manifest["producer"],
            files=tuple(FileInfo(n, e["size"]) for n, e in sorted(manifest["files"].items())),
            tensors=tuple(TensorInfo(n, e.dtype or "", e.shape) for n, e in sorted(model.items())),
            aliases={},
            rng=tuple(manifest.get("rng", [])),
            quantization=None,
            unknown_files=tuple(sorted(set(manifest["files"]) - known)),
            sharding={
                "world_size": table.world_size,
                "mesh": table.mesh,
                "shard_files": len(sharded.shard_files),
                "chunks": sum(len(e.chunks) for e in table.entries.values()),
                "optimizer_tensors": len(table.tensors("optimizer")),
            },
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
