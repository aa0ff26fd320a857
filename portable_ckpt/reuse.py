"""Reusing unchanged model parts of the previous checkpoint in an incremental save (format_spec §21.3).

``open_source`` holds the root's newest committed checkpoint open (its manifest verified); ``Source.reuse``
makes one of its model parts the new checkpoint's file of the same tensors (hard link, server-side
copy) when the file this save would write, hashed from memory now, has that part's size and file
checksum, and the part's header on disk is the one this save would write. Anything that prevents
it (no previous checkpoint, another layout, retention removing the source meanwhile, a file system
without links) just means the part is written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from portable_ckpt.errors import CheckpointError, CheckpointNotFoundError
from portable_ckpt.files import CheckpointFiles
from portable_ckpt.format import layout as _layout
from portable_ckpt.format import names
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.format.hashing import new_hasher
from portable_ckpt.storage import Staging, Storage


@dataclass
class Stats:
    """What an incremental save did: parts reused and written (appended to from the writing threads)."""

    reused: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # of the reused parts

    @property
    def reused_bytes(self) -> int:
        return sum(self.sizes.values())


@dataclass
class Source:
    files: CheckpointFiles
    parts: dict[frozenset[str], list[str]]  # the tensor names of a part -> the source's parts holding exactly them

    def close(self) -> None:
        self.files.close()

    def reuse(self, staging: Staging, name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
        """The new file ``name``'s manifest entry if a source part was reused for it, else None (§21.3)."""
        candidates = self.parts.get(frozenset(tensors))
        if not candidates:
            return None
        head, order = _safetensors.layout(tensors, None)
        size = len(head) + sum(t.numel() * t.element_size() for t in tensors.values())
        first = _safetensors.tensor_checksum(tensors[order[0]]) if order else None
        whole: str | None = None
        for candidate in candidates:
            entry = self.files.entries[candidate]
            if entry["size"] != size or (first is not None and entry["tensors"].get(order[0]) != first):
                continue  # changed (the usual case of a trainable part): one tensor hashed, not the part
            try:
                with self.files.opened(candidate) as f:  # checks the size against the source's manifest
                    _, raw = self.files.read_header(f, candidate)
                    if raw != head:
                        continue
                    if whole is None:  # the checksum of the file this save would write, from memory
                        whole = _file_checksum(head, [tensors[n] for n in order])
                    if whole != entry["checksum"]:
                        continue
                    # A local file can have rotted since it was written: its bytes are hashed too, so a damaged
                    # part is written afresh instead of carried into this checkpoint. (Objects of a store are
                    # checksummed by the store; the copy is conditional on the object read.)
                    if f.mmap_path() is not None and self.files.hash_file(f) != entry["checksum"]:
                        continue
                    if staging.reuse(name, self.files.dir, candidate, f):
                        return {"size": entry["size"], "checksum": entry["checksum"], "tensors": dict(entry["tensors"])}
            except (CheckpointError, OSError):  # gone or changed since the manifest was read: write it
                continue
        return None


def _file_checksum(head: bytes, ordered: list[torch.Tensor]) -> str:
    h = new_hasher()
    h.update(head)
    for t in ordered:
        t = _safetensors.host_contiguous(t)
        h.update(_safetensors.tensor_bytes(t))
    return h.hexdigest()


def open_source(root: Storage) -> Source | None:
    """The newest committed checkpoint of ``root``, if it is incremental and readable; else None.

    Found by listing the root, not through ``latest``: a crash between a commit and the update of ``latest``
    leaves it naming an older checkpoint, whose parts the next save would reuse less. One retired while it is
    opened (retention by another process) gives way to the one before it."""
    try:
        steps = sorted((s for n in root.listdir() if (s := names.step_of(n)) is not None), reverse=True)
    except (CheckpointError, OSError):
        return None
    tried = 0
    for step in steps:  # the newest first; a step directory without a manifest is not committed
        if tried == 3:
            return None
        try:
            files = CheckpointFiles(root.child(names.step_name(step)), verify=False)
        except CheckpointNotFoundError:
            tried += 1
            continue
        except (CheckpointError, OSError):
            return None
        try:
            if files.manifest["format_version"] != _layout.INCREMENTAL_FORMAT_VERSION:
                files.close()
                return None
            parts: dict[frozenset[str], list[str]] = {}
            for name in files.model_files:
                parts.setdefault(frozenset(files.entries[name]["tensors"]), []).append(name)
            return Source(files, parts)
        except (CheckpointError, OSError):
            with contextlib.suppress(OSError):
                files.close()
            return None
    return None
