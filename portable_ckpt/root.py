"""The checkpoints root: which checkpoint a path names, committed steps, ``latest``, retention, cleanup.

Everything here goes through the storage seam, so it holds for every backend and commit strategy.
"""

from __future__ import annotations

import os
from pathlib import Path

from portable_ckpt.errors import CheckpointNotFoundError
from portable_ckpt.format import names
from portable_ckpt.storage import LocalStorage, Storage, storage_for
from portable_ckpt.storage.base import committed_steps, point_latest

__all__ = ["committed_steps", "display", "latest", "point_latest", "resolve", "retain"]

LEGACY_FILES = ("model.pt", "metadata.json")  # a format-0 directory holds both


def basename(storage: Storage) -> str:
    return storage.location.rstrip("/").rsplit("/", 1)[-1]


def display(storage: Storage) -> Path | str:
    """What the API returns for a location: a ``Path`` on the local file system, else the URL."""
    return storage.path if isinstance(storage, LocalStorage) else storage.location


def is_legacy(storage: Storage) -> bool:
    return all(storage.kind(name) == "file" for name in LEGACY_FILES)  # regular files, not links (spec §3.5)


_CONVERT = (
    "it is not a portable checkpoint: import it with `portable-ckpt import SRC DST` "
    "(portable_ckpt.import_checkpoint), which reads state_dict, nanoGPT, Hugging Face Trainer and Lightning checkpoints"
)

# what a directory that is not ours holds (files that name it), in the order tried
FOREIGN_DIRS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("trainer_state.json",), "a Hugging Face Trainer checkpoint folder (trainer_state.json, no manifest.json)"),
    (("pytorch_model.bin",), "a Hugging Face model folder (pytorch_model.bin, no manifest.json)"),
    (("model.safetensors.index.json",), "a sharded Hugging Face model folder (no manifest.json)"),
    ((".metadata",), "a torch.distributed.checkpoint (DCP) directory (.metadata, no manifest.json)"),
)

# file name endings and the training code that writes them
FOREIGN_SUFFIXES: dict[str, str] = {
    ".ckpt": "a PyTorch Lightning checkpoint (a torch.save file)",
    ".pt": "a torch.save file",
    ".pth": "a torch.save file",
    ".bin": "a torch.save file (pytorch_model.bin style)",
    ".safetensors": "a bare safetensors file (weights only, no manifest)",
}


def foreign_file(storage: Storage) -> str:
    """Name what a file given in place of a checkpoint directory is, from its name and first bytes."""
    name = basename(storage)
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    parent = storage.location.rstrip("/").rsplit("/", 1)[0] if "/" in storage.location else "."
    head = storage_for(parent or "/").read_small(name, 4) or b""
    if suffix in FOREIGN_SUFFIXES:
        return f"not a directory but {FOREIGN_SUFFIXES[suffix]}; {_CONVERT}"
    if head.startswith(b"PK\x03\x04"):
        return f"not a directory but a zip file (torch.save writes zip files); {_CONVERT}"
    return "not a directory"


def foreign_dir(storage: Storage) -> str | None:
    """Name what a directory without a manifest holds, if it is a known foreign layout."""
    for files, what in FOREIGN_DIRS:
        if all(storage.kind(f) is not None for f in files):
            return f"{what}: {_CONVERT}"
    return None


def latest(root: Storage) -> Storage | None:
    """The checkpoint ``latest`` names, if it is committed; else the highest committed step; else None.

    ``latest`` is a hint: a missing, unreadable, stale or malformed one falls back to the scan.
    """
    data = root.read_small(names.LATEST, names.LATEST_MAX_BYTES + 1) or b""
    try:
        name = data.decode("ascii").strip(" \t\r\n") if len(data) <= names.LATEST_MAX_BYTES else ""
    except UnicodeDecodeError:
        name = ""
    if names.step_of(name) is not None and root.child(name).kind(names.MANIFEST) == "file":
        return root.child(name)
    steps = committed_steps(root)
    return root.child(names.step_name(steps[-1])) if steps else None


def resolve(path: str | os.PathLike[str] | Storage) -> Storage:
    """The checkpoint directory ``path`` names: itself when it holds ``manifest.json`` (or is a format-0
    directory), else the newest committed checkpoint of the root it is."""
    storage = storage_for(path)
    kind = storage.kind()
    if kind is None:
        raise CheckpointNotFoundError(f"{storage.location}: no such checkpoint or directory", file=storage.location)
    if kind != "dir":
        raise CheckpointNotFoundError(
            f"{storage.location}: {foreign_file(storage)}; pass a checkpoint directory or a checkpoints root",
            file=storage.location,
        )
    if storage.kind(names.MANIFEST) is not None or is_legacy(storage):
        return storage
    what = foreign_dir(storage)
    if what is not None:
        raise CheckpointNotFoundError(f"{storage.location}: {what}", file=storage.location)
    if (
        names.step_of(basename(storage)) is not None
        or storage.kind(names.MODEL) is not None
        or any(names.MODEL_PART.fullmatch(n) for n in storage.listdir())
    ):
        raise CheckpointNotFoundError(
            f"{storage.location}/{names.MANIFEST}: manifest.json is missing; the checkpoint is incomplete",
            file=f"{storage.location}/{names.MANIFEST}",
        )
    found = latest(storage)
    if found is None:
        raise CheckpointNotFoundError(
            f"{storage.location}: no committed checkpoint here (expected manifest.json, or step-NNNNNNNN "
            "directories with one)",
            file=storage.location,
        )
    return found


def retain(root: Storage, *, keep_last: int | None, keep_every: int | None) -> list[int]:
    """Delete the committed steps retention does not keep; the newest is always kept. Returns them."""
    if keep_last is None:
        return []
    removed = []
    with root.locked():
        steps = committed_steps(root)
        keep = set(steps[-keep_last:])
        if keep_every is not None:
            keep |= {s for s in steps if s % keep_every == 0}
        for step in steps[:-1]:
            if step not in keep:
                root.remove(names.step_name(step))
                removed.append(step)
    return removed
