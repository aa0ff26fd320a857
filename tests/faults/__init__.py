"""Shared helpers for the fault-tolerance tests and ``tests/stress.py``, one concern per module:

- :mod:`faults.states`: a tiny model whose whole training state is a function of the step (weights ==
  step), a checker that says what in a loaded checkpoint disagrees with that, and what a root may hold
  besides checkpoints (temporaries, checkpoints an overwrite moved aside);
- :mod:`faults.files`: an attacker's tools: hand-built safetensors files (``struct.pack``), manifests
  edited and resealed, every size and checksum of a damaged checkpoint recomputed;
- :mod:`faults.hostile`: pickles that would run code, and the ``.pt`` files that carry them;
- :mod:`faults.damage` and :mod:`faults.corruption`: the corruption catalog (one :class:`Case` per
  damage) and :func:`run_case`, which tries a case with and without verification, with and without
  recomputed checksums, and through ``portable-ckpt validate``;
- :mod:`faults.inject`: failing ``os.write``/``os.fsync``/... at a chosen call, another process acting
  right after a file is opened, a deadline (SIGALRM), the peak resident memory of a block;
- :mod:`faults.crash`: crash trials (SIGKILL of a saving child) and the checks of the root afterwards;
- :mod:`faults.storage`: the n-th operation of a save failed through the in-memory storage backend, under
  either commit strategy;
- :mod:`faults.importers`: every source kind ``import_checkpoint`` reads, built valid, then damaged or made
  hostile (truncated zips, wrong pickles, path tricks inside the zip, symlinks out of a Trainer folder, a
  sharded index naming a missing shard, a damaged ``trainer_state.json``), and random mutations of them;
- :mod:`faults.remote`: kill trials against a local S3 server (moto), objects of ``memory://`` and S3
  roots changed between listing and reading, a ``latest`` naming a step without a manifest;
- :mod:`faults.incremental`: incremental saves (format_version 3): a model with frozen and trainable parts,
  kill trials of an incremental writer, ``os.link`` and every other I/O call (and every in-memory operation,
  ``copy`` included) failing, reused parts changed or removed behind the checkpoints' back, retention and
  ``drop_after`` racing a save that links, server-side copies on S3 (its child roles: ``inc-*``);
- :mod:`faults.roles` and :mod:`faults.processes`: the child processes (``python tests/faults ROLE ...``)
  of the crash, disk-full and concurrency tests, forked by one fork server.

The test modules use the names re-exported here (``faults.save_step``, ``faults.Injector``, ...).
"""

from __future__ import annotations

from faults.corruption import ALLOWED, REFUSALS, Case, Outcome, corruption_cases, run_case
from faults.crash import (
    TrialResult,
    check_root_after_crash,
    count_ops,
    crash_trial,
    overwrite_kill_problems,
    overwrite_ops,
    reopen,
)
from faults.damage import edit_bytes
from faults.files import checksum, read_manifest, recompute, st_pack, st_split, tensor_table, write_manifest
from faults.hostile import RunsCode, evil_raw_pickle, evil_torch_file, payloads
from faults.incremental import IncModel, inc_crash_trial, inc_load, inc_problems, inc_save, race_round
from faults.inject import IO_ERRNO, IO_OPS, Hang, Injector, after_open, deadline, peak_rss, replace_with, retire
from faults.processes import ForkServer, fork_server
from faults.states import (
    FILES,
    QUANT_FILE,
    STEP_DIR,
    VOCAB,
    WRITER_OFFSETS,
    TinyModel,
    config_for,
    latest_name,
    leftovers,
    load_values,
    make_state,
    moved_aside,
    preserved_rng,
    quantized_model,
    rng_problems,
    save_step,
    state_problems,
    writer_loop,
)
from faults.storage import STRATEGIES, fault_problems, save_operations

__all__ = [
    "ALLOWED",
    "FILES",
    "IO_ERRNO",
    "IO_OPS",
    "QUANT_FILE",
    "REFUSALS",
    "STEP_DIR",
    "STRATEGIES",
    "VOCAB",
    "WRITER_OFFSETS",
    "Case",
    "ForkServer",
    "Hang",
    "IncModel",
    "Injector",
    "Outcome",
    "RunsCode",
    "TinyModel",
    "TrialResult",
    "after_open",
    "check_root_after_crash",
    "checksum",
    "config_for",
    "corruption_cases",
    "count_ops",
    "crash_trial",
    "deadline",
    "edit_bytes",
    "evil_raw_pickle",
    "evil_torch_file",
    "fault_problems",
    "fork_server",
    "inc_crash_trial",
    "inc_load",
    "inc_problems",
    "inc_save",
    "latest_name",
    "leftovers",
    "load_values",
    "make_state",
    "moved_aside",
    "overwrite_kill_problems",
    "overwrite_ops",
    "payloads",
    "peak_rss",
    "preserved_rng",
    "quantized_model",
    "race_round",
    "read_manifest",
    "recompute",
    "reopen",
    "replace_with",
    "retire",
    "rng_problems",
    "run_case",
    "save_operations",
    "save_step",
    "st_pack",
    "st_split",
    "state_problems",
    "tensor_table",
    "write_manifest",
    "writer_loop",
]
