"""Optimizer, scheduler and scaler state as ``torch.save`` files, always read back with ``weights_only=True``.

Codecs only: ``save`` writes into a stream, ``load`` reads from a path or a stream; where the bytes
live is the storage layer's business.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import torch

from portable_ckpt.errors import CheckpointCorruptedError, CheckpointNotFoundError
from portable_ckpt.format.hashing import new_hasher

_SERIALIZATION_CONFIG: Any
try:
    from torch.utils.serialization import config as _SERIALIZATION_CONFIG
except ImportError:  # torch < 2.6
    _SERIALIZATION_CONFIG = None

# What a damaged or hostile .pt file can make torch.load raise; torch does not narrow this down.
TORCH_LOAD_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    OverflowError,
    UnicodeDecodeError,
    zipfile.BadZipFile,
    struct.error,
    ImportError,
)


class _HashingWriter:
    """A file-like sink for torch.save that hashes bytes on their way to the file (no buffered copy)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.hash = new_hasher()
        self.size = 0
        self.error: OSError | None = None  # torch.save turns a failed write into a RuntimeError

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        self.hash.update(view)
        self.size += n
        try:
            while view:
                view = view[self.stream.write(view) :]
        except OSError as e:
            self.error = e
            raise
        return n

    def flush(self) -> None:
        pass


def save(stream: BinaryIO, obj: Any) -> tuple[int, str]:
    """torch.save ``obj`` into a writable binary stream; returns (size, checksum)."""
    writer = _HashingWriter(stream)
    with _no_zip_crc():
        try:
            torch.save(obj, writer)  # type: ignore[arg-type]
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None  # the disk's error, not torch's wrapper of it
            raise
    return writer.size, writer.hash.hexdigest()


def _no_zip_crc() -> contextlib.AbstractContextManager[Any]:
    """The zip CRC32 that torch.save computes costs ~40% of a save; the manifest's XXH3 covers the file."""
    if _SERIALIZATION_CONFIG is None:  # torch < 2.6 has no such switch
        return contextlib.nullcontext()
    patch: contextlib.AbstractContextManager[Any] = _SERIALIZATION_CONFIG.patch({"save.compute_crc32": False})
    return patch


def load(source: str | os.PathLike[str] | BinaryIO, filename: str, map_location: Any, *, mmap: bool = True) -> Any:
    """torch.load with weights_only=True; any refusal or damage becomes CheckpointCorruptedError."""
    try:
        # mmap: tensors are read from the page cache on first touch instead of copied up front
        return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"{filename}: removed while the checkpoint was being read (retention or a concurrent overwrite)"
        ) from None
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # torch's first line advises weights_only=False; the line naming the refused global is the reason
        reason = next(
            (ln for ln in lines if "GLOBAL" in ln or "global" in ln), lines[-1] if lines else type(e).__name__
        )
        raise CheckpointCorruptedError(
            f"{filename}: refused to unpickle (only tensors and plain containers are allowed; "
            f"no code from a checkpoint is ever run): {reason[:300]}"
        ) from None
    except TORCH_LOAD_ERRORS as e:
        raise CheckpointCorruptedError(
            f"{filename}: not a readable torch.save file: {type(e).__name__}: {str(e)[:300]}"
        ) from None
