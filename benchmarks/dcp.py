"""The distributed section: our sharded save and resharding load against DCP's own storage, same run, same state.

    python -m benchmarks.dcp --size-mib 512 --reps 5 [--json]

Two gloo ranks hold an FSDP2-sharded model of linear layers and its AdamW state (``--size-mib`` is the
whole state: parameters and both moments, over both ranks). Each repetition saves it with
``save_checkpoint`` under the process group (``save.ours``), with ``dcp.save`` and DCP's
``FileSystemWriter`` (``save.dcp``) and with DCP's ``HuggingFaceStorageWriter`` (model only, its one
layout, ``save.hf``; quoted, not a target), in alternating order; each time is the slowest rank's,
between barriers. Loads: every checkpoint is loaded back into the same sharded model
(``load.ours``: ``load_checkpoint``, verified; ``load.dcp``: ``dcp.load`` with ``FileSystemReader`` and
``set_state_dict``), and then resharded into one process (world size 1) in a second job. Extra peak
memory per rank is sampled from ``/proc/self/statm`` during each operation, against the rank's shard.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import portable_ckpt as pc

LAYERS = 32
PAGE = os.sysconf("SC_PAGE_SIZE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """The largest resident set seen while the block runs, sampled every 2 ms, minus the RSS before it."""

    def __enter__(self) -> PeakRss:
        self.base = self.peak = _rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def _model(size_mib: float) -> nn.Module:
    # parameters are a third of the state (AdamW keeps two moments of each)
    dim = max(8, int((size_mib * 2**20 / 3 / 4 / LAYERS) ** 0.5))
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(dim, dim, bias=False) for _ in range(LAYERS)])


def _sharded(size_mib: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model(size_mib)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # creates both moments
    opt.zero_grad()
    return model, opt


def _timed(fn: Any) -> tuple[float, int]:
    dist.barrier()
    with PeakRss() as mem:
        t0 = time.perf_counter()
        fn()
        mine = time.perf_counter() - t0
    box = [torch.tensor([mine, float(mem.extra)], dtype=torch.float64)]
    dist.all_reduce(box[0], op=dist.ReduceOp.MAX)  # the slowest rank's time, the largest rank's peak
    return float(box[0][0]), int(box[0][1])


def _save_job(rank: int, world: int, port: int, size_mib: float, reps: int, work: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        model, opt = _sharded(size_mib)
        shard = sum(p.to_local().numel() * 4 * 3 for p in model.parameters())  # params + two moments
        rows: list[dict[str, Any]] = []
        for rep in range(reps):
            paths = {k: f"{work}/{k}-{rep}" for k in ("ours", "dcp", "hf")}

            def ours(p: str = paths["ours"], step: int = rep) -> None:
                pc.save_checkpoint(model, opt, {}, None, step, p)

            def raw(p: str = paths["dcp"]) -> None:
                msd, osd = get_state_dict(model, opt)
                dcp.save({"model": msd, "optimizer": osd}, storage_writer=FileSystemWriter(p))

            def hf(p: str = paths["hf"]) -> None:
                msd, _ = get_state_dict(model, opt)
                dcp.save(msd, storage_writer=HuggingFaceStorageWriter(p, save_distributed=True))

            order = [("ours", ours), ("dcp", raw), ("hf", hf)]
            if rep % 2:
                order = [order[1], order[0], order[2]]
            row: dict[str, Any] = {"rep": rep}
            for name, fn in order:
                row[f"save.{name}"], row[f"save.{name}.extra_rss"] = _timed(fn)

            def load_ours(p: str = paths["ours"], step: int = rep) -> None:
                pc.load_checkpoint(f"{p}/step-{step:08d}", model, opt)

            def load_raw(p: str = paths["dcp"]) -> None:
                msd, osd = get_state_dict(model, opt)
                state = {"model": msd, "optimizer": osd}
                dcp.load(state, storage_reader=FileSystemReader(p))
                set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

            loads = [("ours", load_ours), ("dcp", load_raw)]
            for name, fn in loads if rep % 2 == 0 else loads[::-1]:
                row[f"load.{name}"], row[f"load.{name}.extra_rss"] = _timed(fn)
            row["shard_bytes"] = shard
            rows.append(row)
            dist.barrier()
            if rank == 0 and rep < reps - 1:  # the last repetition's checkpoints feed the resharding job
                for p in paths.values():
                    shutil.rmtree(p, ignore_errors=True)
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def _reshard_job(size_mib: float, reps: int, work: str, step: int, out: str) -> None:
    """World size 1, no process group: both checkpoints of 2 ranks loaded whole into a plain model."""
    torch.set_num_threads(1)
    model = _model(size_mib)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    rows = []
    for rep in range(reps):

        def ours() -> None:
            pc.load_checkpoint(f"{work}/ours-{step}/step-{step:08d}", model, opt)

        def raw() -> None:
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optimizer": osd}
            dcp.load(state, storage_reader=FileSystemReader(f"{work}/dcp-{step}"), no_dist=True)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

        row: dict[str, Any] = {"rep": rep}
        for name, fn in [("ours", ours), ("dcp", raw)][:: 1 if rep % 2 == 0 else -1]:
            with PeakRss():
                t0 = time.perf_counter()
                fn()
                row[f"reshard.{name}"] = time.perf_counter() - t0
        rows.append(row)
    Path(out).write_text(json.dumps(rows))


def _ratio(rows: list[dict[str, Any]], a: str, b: str) -> dict[str, float]:
    ratios = sorted(r[a] / r[b] for r in rows)
    return {
        "median": statistics.median(ratios),
        "min": ratios[0],
        "max": ratios[-1],
        "ours_s": statistics.median(r[a] for r in rows),
        "theirs_s": statistics.median(r[b] for r in rows),
    }


JOB_SECONDS = 900.0  # a job's deadline: its processes are killed after it, whatever they are doing


def _bounded(targets: list[tuple[Any, tuple[Any, ...]]], what: str) -> None:
    """Run each (function, args) in a spawned process; wait at most JOB_SECONDS, then kill what is left."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=fn, args=args, daemon=True) for fn, args in targets]
    for p in procs:
        p.start()
    end = time.monotonic() + JOB_SECONDS
    try:
        for p in procs:
            p.join(timeout=max(0.0, end - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    codes = [p.exitcode for p in procs]
    if any(code != 0 for code in codes):
        raise RuntimeError(f"{what} failed or ran past {JOB_SECONDS:.0f} s (exit codes {codes})")


def run(size_mib: float, reps: int) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory(prefix="pc-bench-dcp-") as work:
        out = f"{work}/save.json"
        port = _free_port()
        _bounded([(_save_job, (rank, 2, port, size_mib, reps, work, out)) for rank in range(2)], "the save job")
        rows = json.loads(Path(out).read_text())
        reshard_out = f"{work}/reshard.json"
        _bounded([(_reshard_job, (size_mib, reps, work, reps - 1, reshard_out))], "the resharding job")
        reshard = json.loads(Path(reshard_out).read_text())
    shard = rows[0]["shard_bytes"]
    return {
        "size_mib": size_mib,
        "world_size": 2,
        "reps": reps,
        "save_vs_filesystem_writer": _ratio(rows, "save.ours", "save.dcp"),
        "save_hf_vs_filesystem_writer (model only, quoted)": _ratio(rows, "save.hf", "save.dcp"),
        "load_vs_filesystem_reader (2 -> 2)": _ratio(rows, "load.ours", "load.dcp"),
        "reshard_load_vs_filesystem_reader (2 -> 1)": _ratio(reshard, "reshard.ours", "reshard.dcp"),
        "extra_peak_rss_fraction_of_shard": {
            k: max(r[f"{k}.extra_rss"] for r in rows) / shard
            for k in ("save.ours", "save.dcp", "load.ours", "load.dcp")
        },
        "shard_mib": shard / 2**20,
    }


def render(result: dict[str, Any]) -> str:
    lines = [f"distributed: {result['size_mib']:.0f} MiB state over 2 ranks, {result['reps']} reps (alternated)"]
    for key, value in result.items():
        if isinstance(value, dict) and "median" in value:
            lines.append(
                f"  {key:52} {value['median']:.2f}x (min {value['min']:.2f}, max {value['max']:.2f}; "
                f"{value['ours_s']:.3f} s vs {value['theirs_s']:.3f} s)"
            )
    mem = result["extra_peak_rss_fraction_of_shard"]
    lines.append("  extra peak RSS per rank / shard: " + ", ".join(f"{k} {v:.1%}" for k, v in mem.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dcp", description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=float, default=512.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(args.size_mib, args.reps)
    print(json.dumps(result) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
