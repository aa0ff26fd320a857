"""portable-ckpt: portable, verifiable, exactly resumable PyTorch checkpoints.

>>> from portable_ckpt import save_checkpoint, load_checkpoint
>>> path = save_checkpoint(model, optimizer, config, vocab, step)   # doctest: +SKIP
>>> ckpt = load_checkpoint(path, model=model, optimizer=optimizer)  # doctest: +SKIP

Text rendering of inspect and validate results is in ``portable_ckpt.report``.
"""

from portable_ckpt.convert.format0 import convert_format0
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
from portable_ckpt.load import load_checkpoint, prepare_model
from portable_ckpt.manager import CheckpointManager, SaveHandle
from portable_ckpt.quant.quantize import is_quantized, quantize
from portable_ckpt.reader import CheckpointReader, open_checkpoint
from portable_ckpt.save import save_checkpoint
from portable_ckpt.types import Checkpoint, CheckpointInfo, FileInfo, Problem, TensorInfo, ValidationReport
from portable_ckpt.version import __version__

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointInputError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointUnsafeError",
    "CheckpointWriteError",
    "FileInfo",
    "Problem",
    "QuantizationMetadataError",
    "SaveHandle",
    "StateMismatchError",
    "TensorInfo",
    "UnsupportedFormatVersionError",
    "ValidationReport",
    "__version__",
    "convert_format0",
    "inspect_checkpoint",
    "is_quantized",
    "load_checkpoint",
    "open_checkpoint",
    "prepare_model",
    "quantize",
    "save_checkpoint",
    "validate_checkpoint",
]
