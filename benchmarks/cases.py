"""The contenders. Each case runs alone in a fresh process and prints its rows as JSON:

    python -m benchmarks.cases save.ours --state full --size-mib 512 --reps 5 --json

A case builds its state, runs one warm-up and ``--reps`` timed repetitions, and reports every
sample. Page cache is warm: load cases read a file written (and synced) just before, and the
warm-up has read it once. Peak RSS (VmHWM) is reset before each repetition (``/proc/self/clear_refs``)
and its increase over the RSS of the process once its state was built is recorded: memory a
repetition leaves allocated (e.g. kept by the allocator for reuse) counts.

Every load ends with the same touching pass over every destination tensor (XXH3-64 of its bytes,
``states.digest``), inside the timed region, and that digest must equal the source state's: a
lazy loader cannot skip bytes, and every contender is checked to have loaded the right ones.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from portable_ckpt import CheckpointManager, load_checkpoint, save_checkpoint
from portable_ckpt.format.safetensors import tensor_bytes
from portable_ckpt.reader import open_checkpoint
from portable_ckpt.storage.local import fsync_path

from .states import KINDS, StateSpec, build, build_target, digest, flat_tensors, make_optimizer

_CHUNK = 1 << 30
Model = torch.nn.Module
Opt = torch.optim.Optimizer | None


# --- measurement ---------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0); returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _peak() -> int:
    return _status_kib("VmHWM") * 1024


def _rchar() -> int:
    """Bytes this process has read through read(2)-family calls, page cache hits included."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _sync() -> None:
    """Flush dirty pages left by untimed work so that their writeback does not land in a timed repetition."""
    os.sync()


@dataclass(frozen=True, slots=True)
class Arm:
    """One thing to time: ``body(setup(i))``, then ``check(arg, result)`` untimed."""

    setup: Callable[[int], Any]
    body: Callable[[Any], Any]
    check: Callable[[Any, Any], None]


def repeat(reps: int, arms: list[Arm], fresh: int | None = None) -> list[tuple[list[float], list[int]]]:
    """One warm-up round, then ``reps`` timed rounds; each round runs every arm once.

    The order alternates (AB, BA, ...) so that the drift of a shared machine falls on every arm
    alike: a contender and its paired raw limit are measured side by side. Returns (seconds, peak
    RSS increase) per arm. ``fresh``: one timed round and no warm-up (the first call of a fresh
    process), in the order AB for an even ``fresh``, BA for an odd one.
    """
    results: list[tuple[list[float], list[int]]] = [([], []) for _ in arms]
    gc.collect()
    base = _reset_peak()  # the process with its state built: what every repetition's peak is compared with
    rounds = range(reps + 1) if fresh is None else [1 + fresh % 2]
    for i in rounds:
        for k in range(len(arms)) if i % 2 == 0 else reversed(range(len(arms))):
            arm = arms[k]
            arg = arm.setup(i)
            gc.collect()
            _reset_peak()
            t0 = time.perf_counter()
            out = arm.body(arg)
            dt = time.perf_counter() - t0
            peak = _peak()
            arm.check(arg, out)
            del arg, out
            if i:
                results[k][0].append(dt)
                results[k][1].append(max(0, peak - base))
    return results


# --- savers: (model, optimizer, output directory) -> None ----------------------------------------


def save_raw(model: Model, optimizer: Opt, out: Path, *, fsync: bool) -> None:
    """Every tensor's bytes, back to back, pwrite'd straight from tensor memory into one file."""
    fd = os.open(out / "raw.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        for _, t in flat_tensors(model, optimizer):
            view = tensor_bytes(t)
            pos = 0
            while pos < len(view):
                pos += os.pwrite(fd, view[pos : pos + _CHUNK], offset + pos)
            offset += len(view)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def save_torch(model: Model, optimizer: Opt, out: Path, *, fsync: bool) -> None:
    obj: Any = model.state_dict()
    if optimizer is not None:
        obj = {"model": obj, "optimizer": optimizer.state_dict()}
    torch.save(obj, out / "state.pt")
    if fsync:
        fsync_path(out / "state.pt")


def save_safetensors(model: Model, optimizer: Opt, out: Path, *, fsync: bool) -> None:
    save_file(model.state_dict(), out / "model.safetensors")
    if fsync:
        fsync_path(out / "model.safetensors")


def save_ours(model: Model, optimizer: Opt, out: Path) -> None:
    save_checkpoint(model, optimizer, {}, None, 0, out)


# --- loaders: (file written by the matching saver, target model, target optimizer) -> None --------


def load_raw(out: Path, model: Model, optimizer: Opt) -> None:
    """readinto the preallocated model (and optimizer state) tensors, in file order."""
    fd = os.open(out / "raw.bin", os.O_RDONLY)
    try:
        offset = 0
        for _, t in flat_tensors(model, optimizer):
            view = tensor_bytes(t)
            pos = 0
            while pos < len(view):
                n = os.preadv(fd, [view[pos : pos + _CHUNK]], offset + pos)
                if not n:
                    raise EOFError(f"{out}/raw.bin ends at byte {offset + pos}")
                pos += n
            offset += len(view)
    finally:
        os.close(fd)


def load_torch(out: Path, model: Model, optimizer: Opt, *, mmap: bool) -> None:
    obj = torch.load(out / "state.pt", weights_only=True, mmap=mmap)
    if optimizer is None:
        model.load_state_dict(obj)
    else:
        model.load_state_dict(obj["model"])
        optimizer.load_state_dict(obj["optimizer"])


def load_safetensors(out: Path, model: Model, optimizer: Opt) -> None:
    model.load_state_dict(load_file(out / "model.safetensors"))


def load_ours(out: Path, model: Model, optimizer: Opt, *, verify: bool) -> None:
    load_checkpoint(out / "step-00000000", model, optimizer, verify=verify)


# --- the case table ------------------------------------------------------------------------------

Saver = Callable[[Model, Opt, Path], None]
Loader = Callable[[Path, Model, Opt], None]


@dataclass(frozen=True, slots=True)
class Case:
    label: str
    direction: str  # save | load | lazy | async
    baseline: str | None  # the raw case of the same direction this one is compared with
    writes: str  # exactly which bytes the case writes (or reads)
    kinds: tuple[str, ...] = KINDS
    save: Saver | None = None
    prepare: Saver | None = None  # load cases: writes the file the loader reads, untimed
    load: Loader | None = None
    preallocated: bool = False  # load into an optimizer whose state tensors already exist


_MODEL_KINDS = ("model", "small", "few")
_TORCH_BYTES = "torch.save zip: the model state_dict (plus, for full, {'model', 'optimizer'} state_dicts)"
_OURS_BYTES = (
    "a checkpoint directory: model.safetensors (+ optimizer.pt for full), rng.safetensors, rng.json, "
    "config.json, manifest.json, latest; every file and directory fsync'd"
)

CASES: dict[str, Case] = {
    "save.raw_fsync": Case(
        "raw pwrite+fsync",
        "save",
        None,
        "every tensor's bytes (model, + optimizer state for full) in one file, fsync'd",
        save=lambda m, o, d: save_raw(m, o, d, fsync=True),
    ),
    "save.ours": Case("save_checkpoint", "save", "save.raw_fsync", _OURS_BYTES, save=save_ours),
    "save.torch_fsync": Case(
        "torch.save+fsync",
        "save",
        "save.raw_fsync",
        _TORCH_BYTES + ", fsync'd",
        save=lambda m, o, d: save_torch(m, o, d, fsync=True),
    ),
    "save.safetensors_fsync": Case(
        "save_file+fsync",
        "save",
        "save.raw_fsync",
        "model.safetensors, fsync'd",
        kinds=_MODEL_KINDS,
        save=lambda m, o, d: save_safetensors(m, o, d, fsync=True),
    ),
    "save.raw": Case(
        "raw pwrite",
        "save",
        None,
        "as raw pwrite+fsync, without fsync",
        save=lambda m, o, d: save_raw(m, o, d, fsync=False),
    ),
    "save.torch": Case(
        "torch.save",
        "save",
        "save.raw",
        _TORCH_BYTES + ", not fsync'd",
        save=lambda m, o, d: save_torch(m, o, d, fsync=False),
    ),
    "save.safetensors": Case(
        "save_file",
        "save",
        "save.raw",
        "model.safetensors, not fsync'd",
        kinds=_MODEL_KINDS,
        save=lambda m, o, d: save_safetensors(m, o, d, fsync=False),
    ),
    "load.raw": Case(
        "raw readinto",
        "load",
        None,
        "raw.bin read into the preallocated model/optimizer tensors",
        prepare=lambda m, o, d: save_raw(m, o, d, fsync=False),
        load=load_raw,
        preallocated=True,
    ),
    "load.ours_noverify": Case(
        "load_checkpoint verify=False",
        "load",
        "load.raw",
        "the checkpoint directory",
        prepare=save_ours,
        load=lambda d, m, o: load_ours(d, m, o, verify=False),
    ),
    "load.ours": Case(
        "load_checkpoint verify=True",
        "load",
        "load.raw",
        "the checkpoint directory",
        prepare=save_ours,
        load=lambda d, m, o: load_ours(d, m, o, verify=True),
    ),
    "load.torch": Case(
        "torch.load + load_state_dict",
        "load",
        "load.raw",
        "state.pt",
        prepare=lambda m, o, d: save_torch(m, o, d, fsync=False),
        load=lambda d, m, o: load_torch(d, m, o, mmap=False),
    ),
    "load.torch_mmap": Case(
        "torch.load(mmap) + load_state_dict",
        "load",
        "load.raw",
        "state.pt",
        prepare=lambda m, o, d: save_torch(m, o, d, fsync=False),
        load=lambda d, m, o: load_torch(d, m, o, mmap=True),
    ),
    "load.safetensors": Case(
        "load_file + load_state_dict",
        "load",
        "load.raw",
        "model.safetensors",
        kinds=_MODEL_KINDS,
        prepare=lambda m, o, d: save_safetensors(m, o, d, fsync=False),
        load=load_safetensors,
    ),
    "lazy": Case(
        "open_checkpoint + tensor()",
        "lazy",
        "lazy.raw",
        "reads manifest.json, the safetensors header and one tensor",
        kinds=("model", "small"),
    ),
    "async": Case(
        "training loop with saves",
        "async",
        None,
        "checkpoints through CheckpointManager (keep_last=1), a save every K steps",
        kinds=("full",),
    ),
}
# Rows that cases emit besides their own (label, direction, baseline).
EXTRA_ROWS: dict[str, tuple[str, str, str | None]] = {
    "lazy.raw": ("raw pread of the same tensor", "lazy", None),
    "async.step_none": ("train step, no checkpointing", "async", None),
    "async.step_sync": ("train step, sync save every K steps", "async", "async.step_none"),
    "async.step_async": ("train step, async save every K steps", "async", "async.step_none"),
    "async.call_sync": ("save(blocking=True) call", "async", None),
    "async.call_async": ("save(blocking=False) call", "async", "async.call_sync"),
}


def _row(case: str, nbytes: int, samples: list[float], rss: list[int], **extra: Any) -> dict[str, Any]:
    return {"case": case, "bytes": nbytes, "samples": samples, "rss_increase": rss, "extra": extra}


def _paired(row: dict[str, Any], baseline: str | None, results: list[tuple[list[float], list[int]]]) -> dict[str, Any]:
    if baseline is not None:
        row["paired_case"], row["paired_samples"] = baseline, results[1][0]
    return row


def _save_case(
    case: Case, spec: StateSpec, reps: int, work: Path, against: str | None = None, fresh: int | None = None
) -> list[dict[str, Any]]:
    model, optimizer = build(spec)
    sizes: dict[str, list[int]] = {}

    def arm(c: Case) -> Arm:
        save = c.save
        if save is None:
            raise ValueError(f"{c.label} has no saver")
        label = c.label

        def setup(i: int) -> Path:
            return Path(tempfile.mkdtemp(dir=work))

        def check(out: Path, _: Any) -> None:
            sizes.setdefault(label, []).append(_du(out))
            shutil.rmtree(out)  # before writeback: a file never fsync'd costs no disk time later
            _sync()

        return Arm(setup, lambda out: save(model, optimizer, out), check)

    baseline = against or case.baseline
    arms = [arm(case)] + ([arm(CASES[baseline])] if baseline else [])
    _sync()
    results = repeat(reps, arms, fresh)
    state_bytes = sum(t.nbytes for _, t in flat_tensors(model, optimizer))
    return [_paired(_row("", sizes[case.label][-1], *results[0], state_bytes=state_bytes), baseline, results)]


def _load_case(
    case: Case, spec: StateSpec, reps: int, work: Path, against: str | None = None, fresh: int | None = None
) -> list[dict[str, Any]]:
    baseline = against or case.baseline
    cases = [case] + ([CASES[baseline]] if baseline else [])
    source, source_opt = build(spec)
    expected = digest(flat_tensors(source, source_opt))
    sources: dict[str, Path] = {}
    for c in cases:
        if c.prepare is None or c.load is None:
            raise ValueError(f"{c.label} has no preparing saver or no loader")
        sources[c.label] = work / f"src{len(sources)}"
        sources[c.label].mkdir()
        c.prepare(source, source_opt, sources[c.label])
    size = _du(sources[case.label])
    del source, source_opt
    gc.collect()
    _sync()
    # one model for every arm (each load overwrites all of it); an optimizer with its state for raw reads
    model, prealloc = build_target(spec, optimizer_state=any(c.preallocated for c in cases))

    def arm(c: Case) -> Arm:
        load, src = c.load, sources[c.label]
        if load is None:
            raise ValueError(f"{c.label} has no loader")

        def setup(i: int) -> Opt:
            return prealloc if c.preallocated or not spec.has_optimizer else make_optimizer(model)

        def body(optimizer: Opt) -> str:
            load(src, model, optimizer)
            return digest(flat_tensors(model, optimizer))

        def check(_: Any, found: str) -> None:
            if found != expected:
                raise RuntimeError(f"{c.label}: loaded state digests to {found}, the saved state to {expected}")

        return Arm(setup, body, check)

    results = repeat(reps, [arm(c) for c in cases], fresh)
    return [_paired(_row("", size, *results[0]), baseline, results)]


def _header_range(path: Path, name: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(n))[name]
    return 8 + n + entry["data_offsets"][0], 8 + n + entry["data_offsets"][1]


def _lazy_case(case: Case, spec: StateSpec, reps: int, work: Path, **_: Any) -> list[dict[str, Any]]:
    model, _ = build(spec)
    path = save_checkpoint(model, None, {}, None, 0, work)
    state = model.state_dict()
    names = sorted(n for n in state if n.endswith(".weight")) or sorted(state)
    name = names[len(names) // 2]
    shape, expected = tuple(state[name].shape), digest([(name, state[name])])
    tensor_size = state[name].nbytes
    del model, state
    gc.collect()
    _sync()
    bytes_read: list[int] = []

    def lazy(_: Any) -> torch.Tensor:
        before = _rchar()
        with open_checkpoint(path) as reader:
            t = reader.tensor(name)
        bytes_read.append(_rchar() - before)
        return t

    start, _end = _header_range(path / "model.safetensors", name)

    def raw(_: Any) -> torch.Tensor:
        t = torch.empty(shape)
        fd = os.open(path / "model.safetensors", os.O_RDONLY)
        try:
            os.preadv(fd, [tensor_bytes(t)], start)
        finally:
            os.close(fd)
        return t

    def check(_: Any, t: torch.Tensor) -> None:
        if digest([(name, t)]) != expected:
            raise RuntimeError(f"tensor {name} read back with different bytes")

    (samples, rss), (raw_samples, raw_rss) = repeat(
        reps, [Arm(lambda i: None, lazy, check), Arm(lambda i: None, raw, check)]
    )
    timed_reads = bytes_read[1:]  # the first is the warm-up's
    return [
        {
            **_row(
                "",
                tensor_size,
                samples,
                rss,
                tensor=name,
                tensor_bytes=tensor_size,
                checkpoint_bytes=_du(path),
                bytes_read=sorted(timed_reads)[len(timed_reads) // 2],
                bytes_read_samples=timed_reads,
            ),
            "paired_case": "lazy.raw",
            "paired_samples": raw_samples,
        },
        _row("lazy.raw", tensor_size, raw_samples, raw_rss),
    ]


def _async_case(case: Case, spec: StateSpec, reps: int, work: Path, **_: Any) -> list[dict[str, Any]]:
    model, optimizer = build(spec)
    if optimizer is None:
        raise ValueError("the async case needs a state with an optimizer (--state full)")
    for p in model.parameters():
        p.grad = p.detach() * 1e-3  # kept: every step is a full AdamW update
    weights = [p for n, p in sorted(model.named_parameters()) if n.endswith(".weight")][:8]
    x = torch.randn(64, weights[0].shape[1], generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with torch.no_grad():
            for w in weights:
                torch.tanh(x @ w.T)
        optimizer.step()

    # Warm-up, and calibration: saves come every `every` steps, spaced so that a background save has
    # time to finish (twice a blocking save's duration), as in training where saves are minutes apart.
    t0 = time.perf_counter()
    for _ in range(2):
        step()
    step_s = (time.perf_counter() - t0) / 2
    t0 = time.perf_counter()
    with CheckpointManager(work / "warm") as warm:
        warm.save(model, optimizer, {}, None, 0)  # also first-use costs (schemas, imports)
    save_s = time.perf_counter() - t0
    shutil.rmtree(work / "warm")
    _sync()
    every, saves = min(64, max(4, math.ceil(2 * save_s / step_s))), reps + 1  # the first is a warm-up
    ckpt_bytes: list[int] = []

    def loop(variant: str) -> dict[str, Any]:
        root = work / variant
        out: dict[str, Any] = {"windows": [], "calls": [], "waits": [], "rss": []}
        with CheckpointManager(root, keep_last=1) as manager:
            for w in range(saves):
                t_window = time.perf_counter()
                for _ in range(every):
                    step()
                if variant != "none":
                    t0 = time.perf_counter()
                    manager.wait()  # the previous background save, if still running: timed apart
                    out["waits"].append(time.perf_counter() - t0)
                    gc.collect()
                    base = _reset_peak()
                    t0 = time.perf_counter()
                    manager.save(model, optimizer, {}, None, (w + 1) * every, blocking=variant == "sync")
                    out["calls"].append(time.perf_counter() - t0)
                    out["rss"].append(max(0, _peak() - base))
                out["windows"].append((time.perf_counter() - t_window) / every)
            t0 = time.perf_counter()
            manager.wait()
            out["final_wait"] = time.perf_counter() - t0
            latest = manager.latest()
        if latest is not None:
            load_checkpoint(latest)  # untimed: the last save is complete and verifies
            ckpt_bytes.append(_du(latest))
        shutil.rmtree(root)
        _sync()
        return out

    runs = {variant: loop(variant) for variant in ("none", "sync", "async")}
    nbytes = ckpt_bytes[-1]
    a = runs["async"]
    extra = {
        "save_every": every,
        "saves": saves,
        "calibration": {"step_s": step_s, "save_s": save_s},
        "async_waits_s": a["waits"],
        "async_final_wait_s": a["final_wait"],
    }
    # each variant's first window is its warm-up (an async save's first call also allocates the host
    # buffers that later ones reuse)
    return [
        _row("async.step_none", 0, runs["none"]["windows"][1:], [], **extra),
        _row("async.step_sync", 0, runs["sync"]["windows"][1:], []),
        _row("async.step_async", 0, a["windows"][1:], []),
        _row("async.call_sync", nbytes, runs["sync"]["calls"][1:], runs["sync"]["rss"][1:]),
        _row(
            "async.call_async",
            nbytes,
            a["calls"][1:],
            a["rss"][1:],
            first_call_s=a["calls"][0],
            first_call_rss=a["rss"][0],
        ),
    ]


_RUNNERS = {"save": _save_case, "load": _load_case, "lazy": _lazy_case, "async": _async_case}


def run(
    case_name: str,
    spec: StateSpec,
    reps: int,
    workdir: Path,
    threads: int = 0,
    *,
    against: str | None = None,
    fresh: int | None = None,
) -> list[dict[str, Any]]:
    """Run one case; returns its rows (``case`` is filled in with the case's name where empty).

    ``threads``: torch intra-op threads for the case (0 leaves torch's default). ``against``: the case
    timed alternately with it instead of its raw limit. ``fresh``: one timed round, no warm-up (``repeat``).
    """
    case = CASES[case_name]
    if threads:
        torch.set_num_threads(threads)
    if spec.kind not in case.kinds:
        raise ValueError(f"case {case_name} does not apply to state {spec.kind!r} (only {', '.join(case.kinds)})")
    gc.freeze()  # the imported modules' objects: keeps each untimed gc.collect() short
    work = Path(tempfile.mkdtemp(prefix=f"{case_name}-", dir=workdir))
    try:
        rows = _RUNNERS[case.direction](case, spec, reps, work, against=against, fresh=fresh)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        row["case"] = row["case"] or case_name
    return rows


def run_in_child(
    conn: Any,
    case_name: str,
    spec: StateSpec,
    reps: int,
    workdir: Path,
    threads: int,
    env: dict[str, str] | None = None,
    against: str | None = None,
    fresh: int | None = None,
) -> None:
    """Entry point of a forked worker: send back ("ok", rows) or ("error", traceback)."""
    try:
        os.environ.update(env or {})
        conn.send(("ok", run(case_name, spec, reps, workdir, threads, against=against, fresh=fresh)))
    except BaseException:  # reported to the driver, which records the failure and goes on
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.cases",
        description="Run one benchmark case.",
        epilog="cases: " + "; ".join(f"{name}: {c.label}" for name, c in CASES.items()),
    )
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("--state", choices=KINDS, default="model")
    p.add_argument("--size-mib", type=float, default=512)
    p.add_argument("--tensors", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default 0: torch's default)")
    p.add_argument("--against", choices=sorted(CASES), help="time alternately with this case, not the raw limit")
    p.add_argument("--fresh", type=int, help="one timed round without warm-up, in the order AB (even) or BA (odd)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON object")
    args = p.parse_args(argv)
    if args.state not in CASES[args.case].kinds:
        p.error(f"case {args.case} applies to --state {', '.join(CASES[args.case].kinds)}, not {args.state}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = StateSpec(args.state, args.size_mib, args.tensors)
    rows = run(args.case, spec, args.reps, args.workdir, args.threads, against=args.against, fresh=args.fresh)
    if args.json:
        print(json.dumps({"rows": rows}))
    else:
        for row in rows:
            s = sorted(row["samples"])
            print(
                f"{row['case']}: {row['bytes']} bytes, median {s[len(s) // 2]:.4f} s, min {s[0]:.4f}, max {s[-1]:.4f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
