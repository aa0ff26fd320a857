"""The result types: what a load returns (``Checkpoint``), what ``inspect_checkpoint`` and
``validate_checkpoint`` return (``CheckpointInfo``, ``ValidationReport`` of ``Problem``), what
``list_checkpoints`` returns (``CheckpointListing``) and ``diff_checkpoints`` (``CheckpointDiff``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a checkpoint holds. ``quantization`` is the quantization metadata document, or None."""

    path: Path | str  # a Path on the local file system, else the URL
    format_version: int
    step: int
    config: dict[str, Any]
    vocab: list[str] | dict[str, int] | None
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    quantization: dict[str, Any] | None
    manifest: dict[str, Any]
    extra: dict[str, Any] | None
    scheduler_state: dict[str, Any] | None = None
    scaler_state: dict[str, Any] | None = None
    # user objects and generators saved with states=...: name -> state_dict (a uint8 tensor for a generator)
    states: dict[str, Any] = field(default_factory=dict)
    # with strict=False: the model's keys the checkpoint lacks, and the checkpoint's keys the model lacks
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FileInfo:
    """One file of a checkpoint and its size in bytes."""

    name: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One stored tensor: its name, safetensors dtype name (``"F32"``, ``"I8"``, ...) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """What ``inspect_checkpoint`` reads from a manifest and the safetensors header, without tensor data.

    ``path`` is the checkpoint directory described (a root's newest checkpoint when given a root).
    ``files`` and ``tensors`` are sorted by name; ``aliases`` maps each tied name to the stored one;
    ``rng`` names the random generators whose state the checkpoint carries; ``quantization`` is the
    manifest's quantization summary with ``quantized_bytes`` and ``float32_bytes`` added, or None;
    ``unknown_files`` are listed files this version does not interpret; ``sharding`` describes a
    sharded checkpoint (``world_size``, ``mesh``, ``shard_files``, ``chunks``, ``optimizer_tensors``).
    A format-0 checkpoint has no manifest: ``created_at`` and ``producer`` are None and ``rng`` and
    ``unknown_files`` empty.
    """

    path: Path | str
    format_version: int
    step: int
    created_at: str | None
    producer: dict[str, Any] | None
    files: tuple[FileInfo, ...]
    tensors: tuple[TensorInfo, ...]
    aliases: dict[str, str]
    rng: tuple[str, ...]
    quantization: dict[str, Any] | None
    unknown_files: tuple[str, ...]
    # given a root: its committed checkpoints by step (None when given a checkpoint directory)
    checkpoints: tuple[CommittedStep, ...] | None = None
    # a sharded checkpoint (format_version 2): world_size and mesh at save, shard files, chunks; else None
    sharding: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object ``portable-ckpt inspect --json`` prints."""
        doc: dict[str, Any] = {
            "path": str(self.path),
            "format_version": self.format_version,
            "step": self.step,
            "files": [f.to_json() for f in self.files],
            "tensors": [t.to_json() for t in self.tensors],
            "aliases": dict(self.aliases),
            "quantization": None if self.quantization is None else dict(self.quantization),
        }
        if self.format_version != 0:  # format 0 has no manifest: its object never had these keys
            doc |= {
                "created_at": self.created_at,
                "producer": self.producer,
                "rng": list(self.rng),
                "unknown_files": list(self.unknown_files),
            }
        if self.sharding is not None:
            doc["sharding"] = dict(self.sharding)
        if self.checkpoints is not None:  # given a root: which checkpoints it holds
            doc["checkpoints"] = [c.to_json() for c in self.checkpoints]
        return doc


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a checkpoint: the file (its path), what is wrong, and the error class name."""

    file: str
    message: str
    error: str  # the CheckpointError subclass name, e.g. "CheckpointCorruptedError"

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "message": self.message, "error": self.error}


@dataclass(frozen=True, slots=True)
class ValidationReport:
    """What ``validate_checkpoint`` found: every problem of the checkpoint at ``path`` (as the caller named it)."""

    path: Path | str
    problems: tuple[Problem, ...]

    @property
    def valid(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The object ``portable-ckpt validate --json`` prints for one checkpoint."""
        return {"path": str(self.path), "valid": self.valid, "problems": [p.to_json() for p in self.problems]}


# A progress callback: ``progress(done, total, label)`` before each unit of work (a file, a tensor);
# ``portable_ckpt.report.ProgressLine`` draws one on a terminal.
Progress = Callable[[int, int, str], None]


def _json_number(x: float | None) -> float | None:
    """JSON has no infinity: a non-finite value is written as null."""
    return x if x is not None and math.isfinite(x) else None


@dataclass(frozen=True, slots=True)
class CommittedStep:
    """One committed checkpoint of a root, as ``inspect_checkpoint`` of a root lists it (nothing is verified)."""

    step: int
    name: str  # the directory name, e.g. "step-00000100"
    path: Path | str
    latest: bool  # the checkpoint the root resolves to (``latest``, else the highest step)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "name": self.name, "path": str(self.path), "latest": self.latest}


@dataclass(frozen=True, slots=True)
class CheckpointEntry:
    """One committed checkpoint of a root, as ``list_checkpoints`` found it.

    ``size`` is the bytes of its files (the manifest's sizes and the manifest itself), None when the
    manifest is unreadable; ``quantization`` the manifest's quantization summary (``mode``, ``bits``, ...)
    or None for full precision; ``verified`` says whether every file was checked (else only the manifest).
    """

    step: int
    name: str
    path: Path | str
    created_at: str | None
    size: int | None
    quantization: dict[str, Any] | None
    latest: bool
    verified: bool
    problems: tuple[Problem, ...]

    @property
    def valid(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "name": self.name,
            "path": str(self.path),
            "created_at": self.created_at,
            "size": self.size,
            "quantization": None if self.quantization is None else dict(self.quantization),
            "latest": self.latest,
            "verified": self.verified,
            "valid": self.valid,
            "problems": [p.to_json() for p in self.problems],
        }


@dataclass(frozen=True, slots=True)
class Leftover:
    """Something in a root that is not a committed checkpoint: a save's temporary, a step directory
    without ``manifest.json``. ``kind`` is ``"temporary"`` or ``"uncommitted"``."""

    name: str
    path: Path | str
    kind: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "kind": self.kind, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class CheckpointListing:
    """What ``list_checkpoints`` found in a root: its checkpoints by step, and what is not a checkpoint."""

    root: Path | str
    checkpoints: tuple[CheckpointEntry, ...]
    leftovers: tuple[Leftover, ...]

    @property
    def latest(self) -> CheckpointEntry | None:
        return next((c for c in self.checkpoints if c.latest), None)

    @property
    def valid(self) -> bool:
        """True when every checkpoint passed its check (leftovers do not count)."""
        return all(c.valid for c in self.checkpoints)

    def to_json(self) -> dict[str, Any]:
        """The object ``portable-ckpt list --json`` prints."""
        latest = self.latest
        return {
            "root": str(self.root),
            "valid": self.valid,
            "latest": None if latest is None else latest.step,
            "checkpoints": [c.to_json() for c in self.checkpoints],
            "uncommitted": [x.to_json() for x in self.leftovers],
        }


@dataclass(frozen=True, slots=True)
class TensorDiff:
    """One tensor name of two checkpoints. ``change``: ``"equal"`` (same dtype, shape and bytes),
    ``"changed"``, ``"added"`` (only in b) or ``"removed"`` (only in a). For a changed tensor of the same
    dtype and shape, ``differing`` counts the elements whose bytes differ and ``max_abs_diff`` is the
    largest absolute difference (``inf`` when a NaN or an infinity differs); both are None otherwise."""

    name: str
    change: str
    a: TensorInfo | None
    b: TensorInfo | None
    differing: int | None = None
    max_abs_diff: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "change": self.change,
            "a": None if self.a is None else {"dtype": self.a.dtype, "shape": list(self.a.shape)},
            "b": None if self.b is None else {"dtype": self.b.dtype, "shape": list(self.b.shape)},
            "differing_elements": self.differing,
            "max_abs_diff": _json_number(self.max_abs_diff),
        }


@dataclass(frozen=True, slots=True)
class ValueChange:
    """One difference in the JSON documents of two checkpoints, at a path like ``config['optim']['lr']``.
    ``change``: ``"changed"``, ``"added"`` (only in b; ``a`` is None) or ``"removed"`` (only in a)."""

    path: str
    change: str
    a: Any
    b: Any

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "change": self.change, "a": self.a, "b": self.b}


@dataclass(frozen=True, slots=True)
class FileChange:
    """A file (other than the model, config and vocabulary, compared in detail) whose bytes differ by its
    manifest checksum, or that only one checkpoint has: optimizer, scheduler, RNG state, ..."""

    name: str
    change: str  # "changed", "added", "removed"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "change": self.change}


@dataclass(frozen=True, slots=True)
class CheckpointDiff:
    """What ``diff_checkpoints`` found between checkpoints ``a`` and ``b``.

    ``tensors``: every tensor name of either (stored or tied), sorted, equal ones included; ``values``:
    step, config, vocab, extra and quantization-summary differences, in that order; ``files``: other files
    whose bytes differ. ``created_at`` and ``producer`` are not compared.
    """

    a: Path | str
    b: Path | str
    a_step: int
    b_step: int
    tensors: tuple[TensorDiff, ...]
    values: tuple[ValueChange, ...]
    files: tuple[FileChange, ...]

    @property
    def identical(self) -> bool:
        return all(t.change == "equal" for t in self.tensors) and not self.values and not self.files

    def to_json(self) -> dict[str, Any]:
        """The object ``portable-ckpt diff --json`` prints."""
        return {
            "a": {"path": str(self.a), "step": self.a_step},
            "b": {"path": str(self.b), "step": self.b_step},
            "identical": self.identical,
            "tensors": [t.to_json() for t in self.tensors],
            "values": [v.to_json() for v in self.values],
            "files": [f.to_json() for f in self.files],
        }
