"""list_checkpoints: every checkpoint of a root, each checked, and what in the root is not a checkpoint.

>>> listing = list_checkpoints("checkpoints")  # doctest: +SKIP
>>> [(c.step, c.valid, c.latest) for c in listing.checkpoints]  # doctest: +SKIP
[(50, True, False), (100, True, True)]
"""

from __future__ import annotations

import contextlib
import os

from portable_ckpt.errors import CheckpointError, CheckpointInputError, CheckpointNotFoundError
from portable_ckpt.files import CheckpointFiles
from portable_ckpt.format import names
from portable_ckpt.inspect import problem_from, validate_checkpoint
from portable_ckpt.root import committed_steps, display, is_legacy, latest
from portable_ckpt.storage import Storage, storage_for
from portable_ckpt.types import CheckpointEntry, CheckpointListing, Leftover, Problem, Progress

__all__ = ["list_checkpoints"]

# name prefix -> what a temporary of the root is (format_spec/README.md §12); never a checkpoint
TEMPORARIES: dict[str, str] = {
    names.TMP_PREFIX: "temporary of a save in progress, or left by one that crashed",
    names.TRASH_PREFIX: "a checkpoint being deleted",
    names.REPLACED_PREFIX: "a checkpoint moved aside by an overwrite in progress",
    names.PENDING_PREFIX: "marker of a save in progress (manifest-last commit)",
}
UNCOMMITTED = "step directory without manifest.json: a save that never committed"


def list_checkpoints(
    root: str | os.PathLike[str], *, verify: bool = True, progress: Progress | None = None
) -> CheckpointListing:
    """Every committed checkpoint of the checkpoints root ``root`` by step, and its leftovers.

    verify: validate each checkpoint fully (every file's size and checksum, schemas, headers, as
    ``validate_checkpoint``); False checks only each manifest (schema, its own checksum, its step).
    progress: called as ``progress(done, total, "step-NNNNNNNN: file")`` before each checkpoint and file.
    Raises ``CheckpointNotFoundError`` if ``root`` is not a directory, ``CheckpointInputError`` if it is a
    checkpoint directory rather than a root; a damaged checkpoint is reported, never raised.
    """
    storage = storage_for(root)
    kind = storage.kind()
    if kind != "dir":
        what = "no such directory" if kind is None else "not a directory"
        raise CheckpointNotFoundError(f"{storage.location}: {what}; pass a checkpoints root", file=storage.location)
    if storage.kind(names.MANIFEST) is not None or is_legacy(storage):
        parent = storage.location.rstrip("/").rsplit("/", 1)[0]
        raise CheckpointInputError(
            f"{storage.location}: a checkpoint directory, not a checkpoints root; list its root ({parent}), "
            "or inspect this checkpoint with portable-ckpt inspect",
            file=storage.location,
        )
    entries = sorted(storage.listdir())
    steps = committed_steps(storage)
    newest = latest(storage)
    chosen = None if newest is None else newest.location
    checkpoints = []
    for done, step in enumerate(steps):
        name = names.step_name(step)
        child = storage.child(name)
        files_progress = None if progress is None else _per_file(progress, done, len(steps), name)
        if files_progress is not None:
            files_progress(0, 1, names.MANIFEST)
        entry = _entry(child, step, name, latest=child.location == chosen, verify=verify, progress=files_progress)
        checkpoints.append(entry)
    leftovers = [_leftover(storage, name) for name in entries]
    return CheckpointListing(
        root=display(storage), checkpoints=tuple(checkpoints), leftovers=tuple(x for x in leftovers if x is not None)
    )


def _per_file(progress: Progress, done: int, total: int, name: str) -> Progress:
    """One checkpoint's files as one unit of the root's count, each named in the label."""
    return lambda _done, _total, file: progress(done, total, f"{name}: {file}")


def _entry(
    child: Storage, step: int, name: str, *, latest: bool, verify: bool, progress: Progress | None
) -> CheckpointEntry:
    created_at = size = quantization = None
    problems: tuple[Problem, ...] = ()
    try:
        with CheckpointFiles(child, verify=False) as files:  # the manifest: schema, own checksum, step
            manifest = files.manifest
            with contextlib.closing(files.dir.open(names.MANIFEST)) as f:
                size = f.size + sum(e["size"] for e in files.entries.values())
        created_at, quantization = manifest["created_at"], manifest.get("quantization")
    except CheckpointError as e:
        problems = (problem_from(e, f"{child.location}/{names.MANIFEST}"),)
    if verify and not problems:
        problems = validate_checkpoint(child.location, progress=progress).problems
    return CheckpointEntry(
        step=step,
        name=name,
        path=display(child),
        created_at=created_at,
        size=size,
        quantization=None if quantization is None else dict(quantization),
        latest=latest,
        verified=verify,
        problems=problems,
    )


def _leftover(root: Storage, name: str) -> Leftover | None:
    for prefix, reason in TEMPORARIES.items():
        if name.startswith(prefix):
            return Leftover(name=name, path=display(root.child(name)), kind="temporary", reason=reason)
    if names.step_of(name) is not None and root.child(name).kind(names.MANIFEST) != "file":
        return Leftover(name=name, path=display(root.child(name)), kind="uncommitted", reason=UNCOMMITTED)
    return None
