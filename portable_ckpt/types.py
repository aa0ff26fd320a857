"""The result types: what a load returns (``Checkpoint``), what ``inspect_checkpoint`` and
``validate_checkpoint`` return (``CheckpointInfo``, ``ValidationReport`` of ``Problem``)."""

from __future__ import annotations

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
    ``unknown_files`` are listed files this version does not interpret. A format-0 checkpoint has no
    manifest: ``created_at`` and ``producer`` are None and ``rng`` and ``unknown_files`` empty.
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
