"""portable-ckpt: portable, verifiable, exactly resumable PyTorch checkpoints.

>>> from portable_ckpt import save_checkpoint, load_checkpoint
>>> path = save_checkpoint(model, optimizer, config, vocab, step)   # doctest: +SKIP
>>> ckpt = load_checkpoint(path, model=model, optimizer=optimizer)  # doctest: +SKIP
"""

from portable_ckpt.convert.format0 import convert
from portable_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointInputError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    QuantizationMetadataError,
    StateMismatchError,
    UnsupportedFormatVersionError,
)
from portable_ckpt.format.manifest import FORMAT_VERSION, LIBRARY_VERSION
from portable_ckpt.load import load_checkpoint, prepare_model
from portable_ckpt.manager import CheckpointManager, SaveHandle
from portable_ckpt.quant.quantize import is_quantized, quantize
from portable_ckpt.reader import CheckpointReader, open_checkpoint
from portable_ckpt.save import save_checkpoint
from portable_ckpt.types import Checkpoint

__version__ = LIBRARY_VERSION

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInputError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointWriteError",
    "QuantizationMetadataError",
    "SaveHandle",
    "StateMismatchError",
    "UnsupportedFormatVersionError",
    "__version__",
    "convert",
    "is_quantized",
    "load_checkpoint",
    "open_checkpoint",
    "prepare_model",
    "quantize",
    "save_checkpoint",
]
