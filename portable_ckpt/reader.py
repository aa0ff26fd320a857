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
import io
import os
from pathlib import Path
from typing import Any

import torch

from portable_ckpt.convert import format0 as _legacy
from portable_ckpt.errors import CheckpointCorruptedError, CheckpointInputError
from portable_ckpt.format import manifest as _manifest
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.format.hashing import checksum
from portable_ckpt.load import _check_aliases, _check_tensor_table, _Files, resolve
from portable_ckpt.save import MODEL_FILE

_CHUNK = 1 << 30  # a single read moves at most ~2 GiB on Linux


class CheckpointReader:
    """A checkpoint opened for lazy, verified reads of single tensors. Create it with ``open_checkpoint``.

    ``path`` is the checkpoint directory, ``manifest`` its parsed manifest, ``step`` its step.
    Use it as a context manager, or call ``close()``; names and shapes stay available after closing.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        header: _safetensors.Header,
        file: io.BufferedReader,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self._label = f"{path}/{MODEL_FILE}"
        self._file: io.BufferedReader | None = file  # kept open: every tensor() is a positional read on its descriptor
        self._entries = {e.name: e for e in header.entries}
        self._checksums: dict[str, str] | None = manifest["files"][MODEL_FILE].get("tensors")
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
                f"{self._label}: no tensor named {name!r}; {hint}; the checkpoint has {len(names)} names (see .keys())"
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
        if self._file is None:
            raise CheckpointInputError(
                f"{self._label}: this reader is closed; read tensors inside the `with open_checkpoint(...)` "
                "block, or open the checkpoint again"
            )
        expected = None
        if verify:
            if self._checksums is None:
                raise CheckpointInputError(
                    f"{self._label}: the manifest holds no per-tensor checksums for this file, so one tensor "
                    "cannot be verified alone; pass verify=False, or verify the whole file with load_checkpoint"
                )
            expected = self._checksums[entry.name]
        out = torch.empty(entry.shape, dtype=_safetensors.DTYPES[entry.dtype])
        view = _safetensors.tensor_bytes(out)
        fd = self._file.fileno()
        pos = 0
        while pos < len(view):
            n = os.preadv(fd, [view[pos : pos + _CHUNK]], entry.start + pos)
            if not n:
                raise CheckpointCorruptedError(
                    f'{self._label}: file ends inside tensor "{entry.name}" (byte {entry.start + pos})'
                )
            pos += n
        if expected is not None:
            found = checksum(view)
            if found != expected:
                raise CheckpointCorruptedError(
                    f'{self._label}: tensor "{entry.name}" (bytes {entry.start}..{entry.end}) is damaged: '
                    f"the manifest says checksum {expected}, its bytes hash to {found}"
                )
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._file is None else "open"
        return f"<CheckpointReader {self.path} step={self.step} tensors={len(self._entries)} {state}>"


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointReader:
    """Open a checkpoint directory, or a root's newest committed checkpoint, for lazy tensor reads.

    Reads and checks the manifest (schema, its own checksum) and the model file's header (size,
    layout, the tensor table against the manifest); tensor bytes are read only by ``tensor()``.

    >>> with open_checkpoint("checkpoints/step-00000100") as ckpt:   # doctest: +SKIP
    ...     ckpt.info("h.0.w"), ckpt.tensor("h.0.w").shape
    (('F32', (4, 4)), torch.Size([4, 4]))
    """
    directory = resolve(path)
    manifest_path = directory / _manifest.MANIFEST
    if not manifest_path.exists() and _legacy.is_legacy(directory):
        raise CheckpointInputError(
            f"{directory}: a format-0 checkpoint (model.pt) has no per-tensor layout to read lazily; "
            "load it with load_checkpoint, or convert it with portable_ckpt.convert"
        )
    with _Files(directory, verify=True) as files:
        manifest = files.manifest
        f = files.open(MODEL_FILE)  # checks kind and size; stays open after the directory is released
    try:
        header, _ = _safetensors.read_header(f, manifest["files"][MODEL_FILE]["size"], files.label(MODEL_FILE))
        _check_tensor_table(files, header)
        _check_aliases(files, header, manifest.get("aliases") or {})
        return CheckpointReader(directory, manifest, header, f)
    except BaseException:
        f.close()
        raise
