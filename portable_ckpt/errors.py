"""The one error hierarchy. Each class also subclasses the matching builtin."""

from __future__ import annotations

import os


class CheckpointError(Exception):
    """Root of every error this library raises on purpose.

    ``file`` names the checkpoint file or directory the error is about (a path or URL), or is None
    when the error concerns an argument; programs read it instead of parsing the message.
    """

    file: str | None

    def __init__(self, *args: object, file: str | os.PathLike[str] | None = None) -> None:
        super().__init__(*args)
        self.file = None if file is None else os.fspath(file)


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path, or a file its manifest lists, does not exist."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A checkpoint for this step is already committed (pass overwrite=True to replace it)."""


class CheckpointInputError(CheckpointError, ValueError):
    """An argument given to save or load is unusable (a NaN in config, a negative step, ...)."""


class CheckpointCorruptedError(CheckpointError, ValueError):
    """A file is malformed, violates its schema, or disagrees with the manifest."""


class UnsupportedFormatVersionError(CheckpointError, ValueError):
    """The checkpoint was written by a newer format version than this reader knows."""


class QuantizationMetadataError(CheckpointCorruptedError):
    """The manifest says quantized but the quantization metadata is missing or invalid."""


class StateMismatchError(CheckpointError, ValueError):
    """The model or optimizer does not match the checkpoint (keys, shapes, dtypes)."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (disk full, permission, I/O); nothing was committed."""


class CheckpointUnsafeError(CheckpointCorruptedError):
    """A .pt file asks for a global or pickle opcode outside the format's allowlist: refused for safety."""
