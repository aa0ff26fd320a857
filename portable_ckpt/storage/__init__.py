"""Where checkpoint bytes live. ``storage_for`` picks the backend for a path or URL from ``BACKENDS``.

A new backend (an object store through fsspec, DCP's storage layer) implements the ``Storage``
protocol of ``base.py`` and takes its place in the table, before the local file system, which
accepts every plain path.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from portable_ckpt.errors import CheckpointInputError
from portable_ckpt.storage.base import CheckpointDir, ReadFile, Staging, Storage, WriteFile
from portable_ckpt.storage.local import LocalStorage
from portable_ckpt.storage.memory import MemoryStorage
from portable_ckpt.storage.remote import FsspecStorage

# (accepts(location), open(location)), tried in order
BACKENDS: tuple[tuple[Callable[[str], bool], Callable[[str], Storage]], ...] = (
    (MemoryStorage.accepts, lambda location: MemoryStorage.from_location(location)),
    (FsspecStorage.accepts, lambda location: FsspecStorage.from_location(location)),
    (LocalStorage.accepts, LocalStorage.from_location),
)


def storage_for(location: str | os.PathLike[str] | Storage) -> Storage:
    """The storage a path or URL names (a ``Storage`` is returned as it is)."""
    if not isinstance(location, (str, os.PathLike)):
        return location
    text = os.fspath(location)
    for accepts, open_ in BACKENDS:
        if accepts(text):
            return open_(text)
    scheme = text.split("://", 1)[0]
    raise CheckpointInputError(
        f"{text}: no storage backend for {scheme}:// URLs; this install reads local paths, memory:// and the "
        "object stores fsspec knows (s3:// with the extra: pip install 'portable-ckpt[s3]')"
    )


__all__ = [
    "BACKENDS",
    "CheckpointDir",
    "FsspecStorage",
    "LocalStorage",
    "MemoryStorage",
    "ReadFile",
    "Staging",
    "Storage",
    "WriteFile",
    "storage_for",
]
