"""portable-ckpt: portable, verifiable, exactly resumable PyTorch checkpoints.

>>> from portable_ckpt import save_checkpoint, load_checkpoint
>>> path = save_checkpoint(model, optimizer, config, vocab, step)   # doctest: +SKIP
>>> ckpt = load_checkpoint(path, model=model, optimizer=optimizer)  # doctest: +SKIP
"""

from ._checkpoint import Checkpoint
from ._errors import (
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
from ._legacy import convert
from ._load import load_checkpoint, prepare_model
from ._manager import CheckpointManager, SaveHandle
from ._manifest import FORMAT_VERSION, LIBRARY_VERSION
from ._quant import is_quantized, quantize
from ._reader import CheckpointReader, open_checkpoint
from ._save import save_checkpoint

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
