"""python -m benchmarks: run every case in a fresh process, check the targets, write a report.

    python -m benchmarks                  # the full run (several minutes)
    python -m benchmarks --quick          # a smoke run with small sizes (under a minute)
    python -m benchmarks --only save.     # the cases whose id contains "save."

The markdown report goes to stdout (``--json`` prints the JSON instead), both are written to
``benchmarks/results/``, progress goes to stderr. Exit status: 0 when every case ran (whatever
the targets say), 1 when a case failed, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from . import report
from .states import StateSpec

HERE = Path(__file__).resolve().parent
DEFAULTS: dict[str, Any] = {
    "size_mib": 512.0,
    "tensors": 256,
    "small_tensors": 10_000,
    "small_kib": 4.0,
    "scaling": "64,256,1024",
    "lazy_size_mib": 1024.0,
    "async_size_mib": 256.0,
    "s3_size_mib": 512.0,
    "dcp_size_mib": 512.0,
    "incremental_size_mib": 512.0,
    "reps": 5,
    "fresh_runs": 10,
    "io_threads": "1,2,4",
    "launcher": "subprocess",
}
QUICK: dict[str, Any] = {
    "size_mib": 16.0,
    "tensors": 256,
    "small_tensors": 1000,
    "small_kib": 4.0,
    "scaling": "4,16",
    "lazy_size_mib": 16.0,
    "async_size_mib": 16.0,
    "s3_size_mib": 8.0,
    "dcp_size_mib": 16.0,
    "incremental_size_mib": 16.0,
    "reps": 3,
    "fresh_runs": 2,
    "io_threads": "1,2",
    "launcher": "forkserver",
}
# Cases per group of states, in the order they run: each raw limit right before what is compared with it.
SAVES = [
    "save.raw_fsync",
    "save.ours",
    "save.torch_fsync",
    "save.safetensors_fsync",
    "save.raw",
    "save.torch",
    "save.safetensors",
]
LOADS = ["load.raw", "load.ours_noverify", "load.ours", "load.torch", "load.torch_mmap", "load.safetensors"]
SMALL = [
    "save.raw_fsync",
    "save.ours",
    "save.torch_fsync",
    "save.safetensors_fsync",
    "load.raw",
    "load.ours_noverify",
    "load.ours",
    "load.torch",
    "load.safetensors",
    "lazy",
]
SCALING = ["save.raw_fsync", "save.ours", "load.raw", "load.ours"]
# Parallel I/O: these cases again with PORTABLE_CKPT_IO_THREADS=N, on the full state (two large files)
IO_SERIES = ["save.ours", "load.ours"]
# Fresh-process pairs (case, timed alternately against, state): each run is a new process that times the
# two once, without warm-up (its first save or load), AB in even runs and BA in odd ones; the ratios of
# the runs give the median and the 90th percentile (tails, and first-call costs that a warm-up hides).
FRESH = [
    ("save.ours", "save.raw_fsync", "model"),
    ("save.ours", "save.raw_fsync", "full"),
    ("load.ours", "load.ours_noverify", "model"),
    ("load.ours", "load.ours_noverify", "full"),
]


@dataclass(frozen=True, slots=True)
class Job:
    case: str
    state: str  # the state's name in the report
    spec: StateSpec
    io_threads: int = 0  # PORTABLE_CKPT_IO_THREADS for the case (0: the library's default)
    against: str | None = None  # fresh pairs: the case timed alternately with this one
    fresh: int | None = None  # fresh pairs: the run's number (its parity gives the order)

    @property
    def id(self) -> str:
        return f"{self.case}:{self.state}" + (f"#{self.fresh}" if self.fresh is not None else "")

    @property
    def env(self) -> dict[str, str]:
        return {"PORTABLE_CKPT_IO_THREADS": str(self.io_threads)} if self.io_threads else {}


def plan(args: argparse.Namespace) -> tuple[list[Job], dict[str, str]]:
    """The jobs to run and a description of each state."""
    from .cases import CASES

    small_mib = args.small_tensors * args.small_kib / 1024
    states = {
        "model": StateSpec("model", args.size_mib, args.tensors),
        "full": StateSpec("full", args.size_mib, args.tensors),
        "small": StateSpec("small", small_mib, args.small_tensors),
        "few": StateSpec("few", small_mib, args.small_tensors),
        **{f"scale-{s:g}": StateSpec("model", s, args.tensors) for s in args.scaling},
        "lazy": StateSpec("model", args.lazy_size_mib, args.tensors),
        "async": StateSpec("full", args.async_size_mib, args.tensors),
        **{f"io-{n}": StateSpec("full", args.size_mib, args.tensors) for n in args.io_threads},
    }
    described = {
        "model": f"{args.tensors} fp32 tensors, {args.size_mib:g} MiB, no optimizer",
        "full": f"the same model + AdamW state (exp_avg, exp_avg_sq, step): {3 * args.size_mib:g} MiB",
        "small": f"{args.small_tensors} fp32 tensors of {args.small_kib:g} KiB ({small_mib:.1f} MiB), no optimizer",
        "few": f"the same {small_mib:.1f} MiB in 16 tensors (the per-byte reference for small)",
        "scale-*": f"model states of {', '.join(f'{s:g}' for s in args.scaling)} MiB",
        "lazy": f"a {args.lazy_size_mib:g} MiB model checkpoint; one weight of the middle layer is read "
        "(the lazy case also runs on small: one of its tensors)",
        "async": f"full state of a {args.async_size_mib:g} MiB model (AdamW: {3 * args.async_size_mib:g} MiB per "
        "checkpoint); step = 8 matmuls + a full AdamW update; a save every K steps, K chosen so that "
        "saves are twice a blocking save's duration apart",
        "io-*": f"the full state with PORTABLE_CKPT_IO_THREADS={','.join(map(str, args.io_threads))} "
        "(files, and pieces of model.safetensors on load, on that many threads)",
    }
    groups = [
        ("model", SAVES + LOADS),
        ("full", SAVES + LOADS),
        ("small", SMALL),
        ("few", ["save.raw_fsync", "save.ours", "load.raw", "load.ours"]),
    ]
    groups += [(f"scale-{s:g}", SCALING) for s in args.scaling]
    groups += [("lazy", ["lazy"]), ("async", ["async"])]
    jobs = [
        Job(case, state, states[state])
        for state, cases in groups
        for case in cases
        if states[state].kind in CASES[case].kinds
    ]
    jobs += [Job(case, f"io-{n}", states[f"io-{n}"], io_threads=n) for n in args.io_threads for case in IO_SERIES]
    jobs += [
        Job(case, state, states[state], against=against, fresh=k)
        for case, against, state in FRESH
        for k in range(args.fresh_runs)
    ]
    if args.only:
        jobs = [j for j in jobs if any(word in j.id for word in args.only)]
    return jobs, described


def _run_subprocess(job: Job, args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.cases",
        job.case,
        "--state",
        job.spec.kind,
        "--size-mib",
        str(job.spec.size_mib),
        "--tensors",
        str(job.spec.tensors),
        "--reps",
        str(args.reps),
        "--workdir",
        str(workdir),
        "--threads",
        str(args.threads),
        "--json",
    ]
    if job.against is not None:
        cmd += ["--against", job.against, "--fresh", str(job.fresh)]
    env = {**os.environ, **job.env}
    proc = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=args.case_timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr or f"exit status {proc.returncode}")
    rows: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    return rows


def _run_forked(job: Job, args: argparse.Namespace, workdir: Path, ctx: Any) -> list[dict[str, Any]]:
    from .cases import run_in_child

    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=run_in_child,
        args=(sender, job.case, job.spec, args.reps, workdir, args.threads, job.env, job.against, job.fresh),
    )
    proc.start()
    sender.close()
    try:
        if not receiver.poll(args.case_timeout):
            proc.kill()
            raise TimeoutError(f"no result after {args.case_timeout} s")
        status, payload = receiver.recv()
    except EOFError:
        raise RuntimeError(f"the worker died (exit status {proc.exitcode})") from None
    finally:
        proc.join()
    if status != "ok":
        raise RuntimeError(payload)
    rows: list[dict[str, Any]] = payload
    return rows


def _run_s3(args: argparse.Namespace, failures: list[dict[str, str]]) -> dict[str, Any] | None:
    """The s3 section (benchmarks/s3.py) in a process of its own; skipped with a note without moto."""
    from . import s3

    if args.s3 == "off" or (args.only and not any("s3" in word for word in args.only)):
        return None
    if not s3.available():
        if args.s3 == "on":
            failures.append({"id": "s3", "error": "moto[server] and s3fs are not installed"})
        return {"skipped": "moto[server] and s3fs are not installed (pip install 'moto[server]' s3fs)"}
    return _section(args, failures, "s3", "save/load/lazy against raw s3fs", str(args.s3_size_mib))


def _run_dcp(args: argparse.Namespace, failures: list[dict[str, str]]) -> dict[str, Any] | None:
    """The distributed section (benchmarks/dcp.py): two gloo ranks, ours against DCP's own storage."""
    if args.dcp == "off" or (args.only and not any("dcp" in word for word in args.only)):
        return None
    return _section(args, failures, "dcp", "sharded save/load against DCP's FileSystemWriter", str(args.dcp_size_mib))


def _run_incremental(args: argparse.Namespace, failures: list[dict[str, str]]) -> dict[str, Any] | None:
    """The incremental section (benchmarks/incremental.py): int4 LoRA saves, incremental against full."""
    if args.incremental == "off" or (args.only and not any("incremental" in word for word in args.only)):
        return None
    section = _section(
        args,
        failures,
        "incremental",
        "int4 LoRA: incremental save against a full save",
        str(args.incremental_size_mib),
        ["--workdir", str(args.workdir)],
    )
    if section is not None and not section["value_check"]["equal"]:
        failures.append({"id": "incremental", "error": f"value check: {section['value_check']['mismatches']}"})
    return section


def _section(
    args: argparse.Namespace,
    failures: list[dict[str, str]],
    name: str,
    what: str,
    size_mib: str,
    extra: list[str] | None = None,
) -> dict[str, Any] | None:
    """``python -m benchmarks.<name> --size-mib N --reps R --json`` in a process of its own; its JSON object."""
    print(f"[{name}] {what} ...", end="", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--size-mib", size_mib, "--reps", str(args.reps)]
    cmd += extra or []
    try:
        proc = subprocess.run(
            [*cmd, "--json"], cwd=HERE.parent, capture_output=True, text=True, timeout=args.case_timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:] or f"exit status {proc.returncode}")
        section: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
        failures.append({"id": name, "error": str(e) or type(e).__name__})
        print(" FAILED", file=sys.stderr)
        return None
    print(" done", file=sys.stderr)
    return section


def _environment() -> dict[str, str]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "commit": commit,
        "python": platform.python_version(),
        "torch": version("torch"),
        "safetensors": version("safetensors"),
        "xxhash": version("xxhash"),
        "CPUs": str(os.cpu_count()),
        "kernel": platform.release(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes and 3 repetitions: a smoke run")
    p.add_argument("--size-mib", type=float, help="model size of the model and full states (default 512)")
    p.add_argument("--tensors", type=int, help="tensors in the model (default 256)")
    p.add_argument("--small-tensors", type=int, help="tensors in the many-small-tensors state (default 10000)")
    p.add_argument("--small-kib", type=float, help="size of each small tensor (default 4)")
    p.add_argument("--scaling", help="model sizes in MiB for the scaling series (default 64,256,1024)")
    p.add_argument("--lazy-size-mib", type=float, help="checkpoint size of the lazy-read case (default 1024)")
    p.add_argument("--async-size-mib", type=float, help="model size of the async-save case (default 256)")
    p.add_argument(
        "--s3",
        choices=["auto", "on", "off"],
        default="auto",
        help="the s3 section (a local moto server): auto runs it where moto[server] and s3fs are importable",
    )
    p.add_argument("--s3-size-mib", type=float, help="bytes of the s3 section's checkpoint (default 512)")
    p.add_argument(
        "--dcp",
        choices=["on", "off"],
        default="on",
        help="the distributed section: 2 gloo ranks, our sharded save/load against DCP's FileSystemWriter/Reader",
    )
    p.add_argument("--dcp-size-mib", type=float, help="state of the distributed section over 2 ranks (default 512)")
    p.add_argument(
        "--incremental",
        choices=["on", "off"],
        default="on",
        help="the incremental section: int4 LoRA fine-tune, incremental save (linked frozen parts) against a full save",
    )
    p.add_argument(
        "--incremental-size-mib",
        type=float,
        help="stored bytes of the incremental section's frozen int4 base (default 512)",
    )
    p.add_argument("--reps", type=int, help="timed repetitions per case, after one warm-up (default 5)")
    p.add_argument("--fresh-runs", type=int, help="fresh processes per fresh-process pair (default 10; 0: none)")
    p.add_argument("--io-threads", help="PORTABLE_CKPT_IO_THREADS values of the parallel I/O series (default 1,2,4)")
    p.add_argument(
        "--launcher",
        choices=["subprocess", "forkserver"],
        help="fresh `python -m benchmarks.cases` per case, or forks of a server that has imported "
        "torch (faster start; default subprocess, forkserver with --quick)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads in each case (default 1: on a small shared machine OpenMP "
        "spin-waits under contention make multi-threaded timings erratic; 0: torch's default)",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only the cases whose id (case:state) contains TEXT; repeatable",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where checkpoints are written (a temporary folder inside it, removed at the end)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON and markdown")
    p.add_argument("--case-timeout", type=float, default=1800, help="seconds before a case is killed")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of the markdown")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.scaling = [float(s) for s in str(args.scaling).split(",") if s.strip()]
    except ValueError:
        p.error(f"--scaling takes comma-separated sizes in MiB, found {args.scaling!r}")
    try:
        args.io_threads = [int(s) for s in str(args.io_threads).split(",") if s.strip()]
    except ValueError:
        p.error(f"--io-threads takes comma-separated thread counts, found {args.io_threads!r}")
    if args.reps < 1 or args.size_mib <= 0 or args.tensors < 2 or args.small_tensors < 16:
        p.error("need --reps >= 1, --size-mib > 0, --tensors >= 2, --small-tensors >= 16")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs, states = plan(args)
    sections = ("s3", "dcp", "incremental")  # run by --only with their name, without cases
    if not jobs and not any(name in word for word in args.only for name in sections):
        print(f"no case id contains {args.only}", file=sys.stderr)
        return 2
    ctx = None
    if args.launcher == "forkserver":
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["benchmarks.cases", "torch._dynamo"])  # AdamW.step imports it: 1.5 s
    workdir = Path(tempfile.mkdtemp(prefix="portable-ckpt-bench-", dir=args.workdir))
    rows: list[dict[str, Any]] = []
    fresh_rows: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    started = time.perf_counter()
    try:
        for i, job in enumerate(jobs, 1):
            t0 = time.perf_counter()
            print(f"[{i}/{len(jobs)}] {job.id} ...", end="", file=sys.stderr, flush=True)
            try:
                got = _run_forked(job, args, workdir, ctx) if ctx else _run_subprocess(job, args, workdir)
            except (RuntimeError, TimeoutError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
                failures.append({"id": job.id, "error": str(e) or type(e).__name__})
                print(f" FAILED ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
                if job.fresh is not None:
                    continue  # a fresh pair reports the runs that worked
                rows.append(
                    {
                        "case": job.case,
                        "state": job.state,
                        "job": job.id,
                        "bytes": 0,
                        "samples": [],
                        "rss_increase": [],
                        "extra": {"error": True},
                    }
                )
                continue
            for row in got:
                row["state"], row["job"] = job.state, job.id
                if job.fresh is not None:
                    row["fresh"] = job.fresh
            (fresh_rows if job.fresh is not None else rows).extend(got)
            med = sorted(got[0]["samples"])[len(got[0]["samples"]) // 2]
            print(f" {med:.4f} s median ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    s3_section = _run_s3(args, failures)
    dcp_section = _run_dcp(args, failures)
    incremental_section = _run_incremental(args, failures)
    rows = report.summarize(rows)
    now = dt.datetime.now(dt.timezone.utc)
    wall_s = time.perf_counter() - started
    result: dict[str, Any] = {
        "meta": {
            "date": now.strftime("%Y-%m-%d %H:%M UTC"),
            "environment": _environment(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "reps": args.reps,
            "launcher": args.launcher,
            "threads": args.threads,
            "workdir": str(args.workdir),
            "states": states,
            "wall_s": wall_s,
        },
        "rows": rows,
        "fresh": report.fresh_pairs(fresh_rows),
        "failures": failures,
    }
    result["targets"] = report.targets(rows) + report.fresh_targets(result["fresh"])
    result["targets"] += report.incremental_targets(incremental_section)
    if s3_section is not None:
        result["s3"] = s3_section
    if dcp_section is not None:
        result["dcp"] = dcp_section
    if incremental_section is not None:
        result["incremental"] = incremental_section
    stem = now.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    json_path, md_path = report.write(result, args.out, stem)
    print(f"wrote {json_path} and {md_path} ({wall_s:.0f} s)", file=sys.stderr)
    print(json.dumps(result, indent=1, sort_keys=True) if args.json else report.markdown(result))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
