"""The Checkpoint result type."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a checkpoint holds. ``quantization`` is the quantization metadata document, or None."""

    path: Path
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
