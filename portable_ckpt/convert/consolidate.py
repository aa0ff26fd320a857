"""Consolidate: a sharded checkpoint (format_version 2) rewritten as a one-process checkpoint (format 1).

Every global tensor is reassembled from its chunks (checksums verified), the optimizer state is
keyed by parameter index again (numbered in param_groups order, as ``optimizer.state_dict()`` does),
and the shared files (config, vocab, scheduler, scaler) are carried over. Per-rank parts cannot all
fit a one-process checkpoint: rank 0's RNG state and ``states=`` objects are kept, the others are
not (the manifest's ``extra["consolidated_from"]`` says so).

>>> consolidate_checkpoint("ckpts/step-00000100", "single")  # doctest: +SKIP
PosixPath('single/step-00000100')
"""

from __future__ import annotations

import os
from pathlib import Path

from portable_ckpt import save as _save
from portable_ckpt.errors import CheckpointInputError
from portable_ckpt.files import CheckpointFiles
from portable_ckpt.root import resolve
from portable_ckpt.sharded import ShardedFiles, is_sharded, read_rank_files, read_sharded
from portable_ckpt.storage import Storage


def consolidate_checkpoint(
    src: str | os.PathLike[str] | Storage,
    dst: str | os.PathLike[str] | Storage,
    *,
    overwrite: bool = False,
) -> Path | str:
    """Rewrite the sharded checkpoint ``src`` (or a root's newest) as ``<dst>/step-NNNNNNNN``; returns it."""
    directory = resolve(src)
    with CheckpointFiles(directory, verify=True) as files:
        if not is_sharded(files.manifest):
            raise CheckpointInputError(
                f"{files.location}: format_version {files.manifest['format_version']} is not sharded; there is "
                "nothing to consolidate (it loads in one process as it is)",
                file=files.location,
            )
        ckpt, _ = read_sharded(files)
        with ShardedFiles(files) as sharded:
            world_size = sharded.table.world_size
            own = read_rank_files(files, sharded.table, 0, world_size)
    rng = own.get("rng")
    states = own.get("states")
    extra = dict(ckpt.extra or {})
    extra["consolidated_from"] = {
        "path": str(ckpt.path),
        "world_size": world_size,
        "per_rank": "rank 0's RNG state and states= objects kept" if world_size > 1 else "all kept",
    }
    snap = _save.Snapshot(
        step=ckpt.step,
        tensors=ckpt.model_state,
        aliases={},
        optimizer=ckpt.optimizer_state,
        scheduler=ckpt.scheduler_state,
        scaler=ckpt.scaler_state,
        config=ckpt.config,
        vocab=ckpt.vocab,
        extra=extra,
        quantization=None,
        rng_tensors=rng["tensors"] if rng is not None else {},
        rng_doc=rng["doc"] if rng is not None else None,
        rng_sources=list(files.manifest.get("rng", [])) if rng is not None else [],
        states_doc={k: v for k, v in states["doc"].items() if k != "decoded"} if states is not None else None,
        states_tensors=states["tensors"] if states is not None else None,
    )
    return _save.write(snap, dst, overwrite=overwrite)
