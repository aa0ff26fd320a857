"""open_checkpoint: read single tensors of a checkpoint lazily, each verified on its own.

Opening reads and checks manifest.json and the safetensors header of model.safetensors, nothing
else. ``tensor(name)`` then reads only that tensor's bytes (positional reads straight into a fresh
tensor) and checks them against the per-tensor XXH3-128 checksum the manifest stores. Stored
tensors are returned as stored: a quantized checkpoint yields its packed tensors.

>>> with open_checkpoint("checkpoints") as ckpt:      # doctest: +SKIP
...     w = ckpt.tensor("lm_head.weight")
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import torch

from portable_ckpt.errors import CheckpointCorruptedError, CheckpointInputError
from portable_ckpt.files import CheckpointFiles, check_aliases, open_model_files
from portable_ckpt.format import names
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.format import sharding as _sharding
from portable_ckpt.format.hashing import checksum
from portable_ckpt.root import display, is_legacy, resolve
from portable_ckpt.sharded import ShardedFiles, is_sharded
from portable_ckpt.storage import ReadFile, Storage

_CHUNK = 1 << 30  # a single read moves at most ~2 GiB on Linux


class CheckpointReader:
    """A checkpoint opened for lazy, verified reads of single tensors. Create it with ``open_checkpoint``.

    ``path`` is the checkpoint directory, ``manifest`` its parsed manifest, ``step`` its step.
    Use it as a context manager, or call ``close()``; names and shapes stay available after closing.
    """

    def __init__(
        self,
        path: Path | str,
        manifest: dict[str, Any],
        parts: list[tuple[str, ReadFile, _safetensors.Header]],
    ) -> None:
        self.path = path
        self.manifest = manifest
        self._label = f"{path}/{parts[0][0]}" if len(parts) == 1 else f"{path}/{names.MANIFEST}"
        # kept open: every tensor() is a positional read on its model file
        self._files: dict[str, ReadFile] | None = {name: f for name, f, _ in parts}
        self._entries = {e.name: e for _, _, header in parts for e in header.entries}
        self._where = {e.name: name for name, _, header in parts for e in header.entries}
        self._checksums = {name: manifest["files"][name].get("tensors") for name, _, _ in parts}
        self._aliases: dict[str, str] = dict(manifest.get("aliases") or {})  # checked by open_checkpoint

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    def keys(self) -> list[str]:
        """Every tensor name, stored or alias, sorted."""
        return sorted([*self._entries, *self._aliases])

    def _entry(self, name: str) -> _safetensors.TensorEntry:
        entry = self._entries.get(self._aliases.get(name, name))
        if entry is None:
            names = self.keys()
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            hint = f"close names: {', '.join(repr(n) for n in close)}" if close else "no name is close"
            raise CheckpointInputError(
                f"{self._label}: no tensor named {name!r}; {hint}; the checkpoint has {len(names)} names (see .keys())",
                file=self._label,
            )
        return entry

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype name, shape) of tensor ``name``, e.g. ``("F32", (4, 4))``; reads nothing."""
        entry = self._entry(name)
        return entry.dtype, entry.shape

    def tensor(self, name: str, *, verify: bool = True) -> torch.Tensor:
        """Read tensor ``name`` (or an alias of it) into a new CPU tensor, reading only its bytes.

        With ``verify`` (the default) its bytes are checked against the manifest's per-tensor checksum.
        """
        entry = self._entry(name)
        if self._files is None:
            raise CheckpointInputError(
                f"{self._label}: this reader is closed; read tensors inside the `with open_checkpoint(...)` "
                "block, or open the checkpoint again",
                file=self._label,
            )
        where = self._where[entry.name]
        label = f"{self.path}/{where}"
        expected = None
        if verify:
            table = self._checksums[where]
            if table is None:
                raise CheckpointInputError(
                    f"{label}: the manifest holds no per-tensor checksums for this file, so one tensor "
                    "cannot be verified alone; pass verify=False, or verify the whole file with load_checkpoint",
                    file=label,
                )
            expected = table[entry.name]
        out = torch.empty(entry.shape, dtype=_safetensors.DTYPES[entry.dtype])
        view = _safetensors.tensor_bytes(out)
        pos = 0
        f = self._files[where]
        while pos < len(view):
            n = f.pread_into(view[pos : pos + _CHUNK], entry.start + pos)
            if not n:
                raise CheckpointCorruptedError(
                    f'{label}: file ends inside tensor "{entry.name}" (byte {entry.start + pos})', file=label
                )
            pos += n
        if expected is not None:
            found = checksum(view)
            if found != expected:
                raise CheckpointCorruptedError(
                    f'{label}: tensor "{entry.name}" (bytes {entry.start}..{entry.end}) is damaged: '
                    f"the manifest says checksum {expected}, its bytes hash to {found}",
                    file=label,
                )
        return out

    def close(self) -> None:
        if self._files is not None:
            for f in self._files.values():
                f.close()
            self._files = None

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._files is None else "open"
        return f"<CheckpointReader {self.path} step={self.step} tensors={len(self._entries)} {state}>"


class ShardedCheckpointReader(CheckpointReader):
    """A sharded checkpoint (format_version 2) opened for lazy reads: ``tensor(name)`` reassembles one
    model tensor from its chunks, reading (and verifying) only their bytes."""

    def __init__(self, path: Path | str, files: CheckpointFiles) -> None:
        self.path = path
        self.manifest = files.manifest
        self._label = files.label(_sharding.SHARDING)
        self._held: CheckpointFiles | None = files
        self._sharded = ShardedFiles(files)
        self._tensors = self._sharded.table.tensors("model")
        self._aliases = {}

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def _sharded_entry(self, name: str) -> _sharding.Entry:
        entry = self._tensors.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, self.keys(), n=3, cutoff=0.6)
            hint = f"close names: {', '.join(repr(n) for n in close)}" if close else "no name is close"
            raise CheckpointInputError(f"{self._label}: no model tensor named {name!r}; {hint}", file=self._label)
        return entry

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        entry = self._sharded_entry(name)
        return entry.dtype or "", entry.shape

    def tensor(self, name: str, *, verify: bool = True) -> torch.Tensor:
        entry = self._sharded_entry(name)
        if self._held is None:
            raise CheckpointInputError(
                f"{self._label}: this reader is closed; read tensors inside the `with open_checkpoint(...)` block",
                file=self._label,
            )
        self._held.verify = verify
        return self._sharded.full(entry)

    def close(self) -> None:
        if self._held is not None:
            self._sharded.close()
            self._held.close()
            self._held = None

    def __repr__(self) -> str:
        state = "closed" if self._held is None else "open"
        return f"<CheckpointReader {self.path} step={self.step} sharded tensors={len(self._tensors)} {state}>"


def open_checkpoint(path: str | os.PathLike[str] | Storage) -> CheckpointReader:
    """Open a checkpoint directory, or a root's newest committed checkpoint, for lazy tensor reads.

    Reads and checks the manifest (schema, its own checksum) and the model file's header (size,
    layout, the tensor table against the manifest); tensor bytes are read only by ``tensor()``.

    >>> with open_checkpoint("checkpoints/step-00000100") as ckpt:   # doctest: +SKIP
    ...     ckpt.info("h.0.w"), ckpt.tensor("h.0.w").shape
    (('F32', (4, 4)), torch.Size([4, 4]))
    """
    directory = resolve(path)
    if directory.kind(names.MANIFEST) is None and is_legacy(directory):
        raise CheckpointInputError(
            f"{directory.location}: a format-0 checkpoint (model.pt) has no per-tensor layout to read lazily; "
            "load it with load_checkpoint, or convert it with portable_ckpt.convert_format0",
            file=directory.location,
        )
    files = CheckpointFiles(directory, verify=True)
    if is_sharded(files.manifest):
        try:
            return ShardedCheckpointReader(display(directory), files)
        except BaseException:
            files.close()
            raise
    with files:
        manifest = files.manifest
        opened = open_model_files(files)  # checks kind, size, header, tensor table; open after files closes
    try:
        stored = {n for _, _, header, _ in opened for n in header.names()}
        label = files.label(opened[0][0]) if len(opened) == 1 else files.label(names.MANIFEST)
        check_aliases(stored, manifest.get("aliases") or {}, label)
        return CheckpointReader(display(directory), manifest, [(name, f, header) for name, f, header, _ in opened])
    except BaseException:
        for _, f, _, _ in opened:
            f.close()
        raise
