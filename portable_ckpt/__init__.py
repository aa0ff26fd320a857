"""portable-ckpt: portable, verifiable, exactly resumable PyTorch checkpoints.

>>> from portable_ckpt import save_checkpoint, load_checkpoint
>>> path = save_checkpoint(model, optimizer, config, vocab, step)   # doctest: +SKIP
>>> ckpt = load_checkpoint(path, model=model, optimizer=optimizer)  # doctest: +SKIP

Text rendering of inspect, validate, list and diff results is in ``portable_ckpt.report``.
"""

from typing import Any as _Any

from portable_ckpt.convert.consolidate import consolidate_checkpoint
from portable_ckpt.convert.export import ExportEntry, ExportReport, export_checkpoint
from portable_ckpt.convert.format0 import convert_format0
from portable_ckpt.convert.importers import ImportEntry, ImportReport, import_checkpoint
from portable_ckpt.diff import diff_checkpoints
from portable_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointInputError,
    CheckpointNotFoundError,
    CheckpointUnsafeError,
    CheckpointWriteError,
    QuantizationMetadataError,
    StateMismatchError,
    UnsupportedFormatVersionError,
)
from portable_ckpt.format.manifest import FORMAT_VERSION
from portable_ckpt.inspect import inspect_checkpoint, validate_checkpoint
from portable_ckpt.listing import list_checkpoints
from portable_ckpt.load import load_checkpoint, prepare_model
from portable_ckpt.manager import CheckpointManager, SaveHandle
from portable_ckpt.quant.quantize import is_quantized, quantize
from portable_ckpt.reader import CheckpointReader, open_checkpoint
from portable_ckpt.save import save_checkpoint
from portable_ckpt.types import (
    Checkpoint,
    CheckpointDiff,
    CheckpointEntry,
    CheckpointInfo,
    CheckpointListing,
    CommittedStep,
    FileChange,
    FileInfo,
    Leftover,
    Problem,
    TensorDiff,
    TensorInfo,
    ValidationReport,
    ValueChange,
)
from portable_ckpt.version import __version__

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointCorruptedError",
    "CheckpointDiff",
    "CheckpointEntry",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointInputError",
    "CheckpointListing",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointUnsafeError",
    "CheckpointWriteError",
    "CommittedStep",
    "ExportEntry",
    "ExportReport",
    "FileChange",
    "FileInfo",
    "ImportEntry",
    "ImportReport",
    "Leftover",
    "PortableStorageReader",
    "PortableStorageWriter",
    "Problem",
    "QuantizationMetadataError",
    "SaveHandle",
    "StateMismatchError",
    "TensorDiff",
    "TensorInfo",
    "UnsupportedFormatVersionError",
    "ValidationReport",
    "ValueChange",
    "__version__",
    "consolidate_checkpoint",
    "convert_format0",
    "diff_checkpoints",
    "export_checkpoint",
    "import_checkpoint",
    "inspect_checkpoint",
    "is_quantized",
    "list_checkpoints",
    "load_checkpoint",
    "open_checkpoint",
    "prepare_model",
    "quantize",
    "save_checkpoint",
    "validate_checkpoint",
]

_LAZY = {"PortableStorageReader", "PortableStorageWriter"}  # torch.distributed.checkpoint: imported on first use


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        from portable_ckpt import dcp

        return getattr(dcp, name)
    raise AttributeError(f"module 'portable_ckpt' has no attribute {name!r}")
