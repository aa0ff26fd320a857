"""The incremental section: a LoRA fine-tune of an int4-quantized model, incremental saves against full ones.

    python -m benchmarks.incremental --size-mib 512 --reps 5 [--json] [--profile]

The model is a stack of ``LAYERS`` square ``nn.Linear`` layers (bf16, no bias), each quantized with
``quantize(bits=4, mode="lora", group_size=128, symmetric=False, lora_rank=RANK)``: packed int4 weights,
bf16 scales and packed zero points are frozen buffers (``--size-mib`` is their stored bytes), ``lora_A`` /
``lora_B`` are the trainable parameters, and AdamW holds only those. Every repetition takes one optimizer
step (random gradients on the adapters: they and the optimizer state change, the base does not), then, in
alternating order:

- ``full``: ``save_checkpoint(..., incremental=False)`` (format_version 1) of that state into a fresh root;
- ``incremental``: ``snapshot(..., incremental=True)`` + ``write(..., stats=Stats())`` (what
  ``save_checkpoint(..., incremental=True)`` does, with the reuse statistics) into the run's root, whose
  ``latest`` is the previous step of the same run: its frozen parts are hard-linked.

Each arm's wall time is measured, and its bytes written two ways: ``wchar`` of ``/proc/self/io`` (every byte
the process passed to write(2) and friends during the save, all threads) and the sizes of the files in the new
step directory with one link (``st_nlink == 1``: not linked from the previous step) plus ``latest``. Bytes
changed = the trainable parts + every file that is not a model part (optimizer, RNG, config, vocab,
quantization metadata, manifest) + ``latest``. The page cache is flushed (``os.sync``) before each save,
untimed. Once, the last incremental checkpoint is loaded into a freshly built quantized model and optimizer
and every tensor is compared bitwise with the live ones.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import portable_ckpt as pc
from portable_ckpt import reuse as _reuse
from portable_ckpt import save as _save

LAYERS = 16
RANK = 16
GROUP = 128
# stored bytes per weight element: a packed int4 code, a bf16 scale and a packed int4 zero point per group
BYTES_PER_ELEMENT = 0.5 + 2 / GROUP + 0.5 / GROUP
TIME_TARGET = 0.2
BYTES_TARGET = 1.1
CONFIG = {"model": "int4-lora-bench", "lr": 1e-4}


def _dim(size_mib: float) -> int:
    dim = int((size_mib * 2**20 / LAYERS / BYTES_PER_ELEMENT) ** 0.5) // GROUP * GROUP
    return max(GROUP, dim)


def build(size_mib: float, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The quantized model and AdamW on its adapters.

    The first layer is quantized from a random bf16 weight by ``quantize``; the others are copies of it with
    their own random packed codes and zero points (any bit pattern is a valid packed int4 code) and scales,
    and their own adapters: quantizing 16 large layers takes minutes on a small machine, and the checkpoint
    neither knows nor cares how the codes were chosen."""
    dim = _dim(size_mib)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    holder = nn.Sequential(nn.Linear(dim, dim, bias=False, dtype=torch.bfloat16))
    pc.quantize(holder, bits=4, mode="lora", group_size=GROUP, symmetric=False, lora_rank=RANK)
    template = holder[0]
    layers = [template]
    for _ in range(LAYERS - 1):
        layer = copy.deepcopy(template)
        with torch.no_grad():
            for role in ("weight_packed", "weight_zero_point"):
                t = getattr(layer, role)
                t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, generator=gen))
            factor = torch.rand(layer.weight_scale.shape, generator=gen) + 0.5
            layer.weight_scale.mul_(factor.to(layer.weight_scale.dtype))
        layer.init_adapters()
        layers.append(layer)
    model = nn.Sequential(*layers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=CONFIG["lr"])
    return model, optimizer


def _scrambled(model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh copy of ``model`` whose every tensor differs from it in every byte, and a fresh AdamW."""
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for t in fresh.state_dict().values():
            assert t.is_contiguous()
            t.reshape(-1).view(torch.uint8).bitwise_not_()
    return fresh, torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=CONFIG["lr"])


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    """One AdamW step on random gradients: the adapters and both moments change, the frozen base does not."""
    optimizer.zero_grad()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * 1e-2
    optimizer.step()


def _wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def _files(step_dir: Path) -> dict[str, os.stat_result]:
    return {p.name: p.stat() for p in step_dir.iterdir() if p.is_file()}


def _account(step_dir: Path, root: Path, trainable: set[str]) -> dict[str, Any]:
    """Sizes in a committed step directory: new (one link) vs linked, changed (trainable parts + non-model files)."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    files = _files(step_dir)
    latest = (root / "latest").stat().st_size
    new = sum(s.st_size for s in files.values() if s.st_nlink == 1) + latest
    linked = sum(s.st_size for s in files.values() if s.st_nlink > 1)
    changed = latest
    parts = {"frozen": 0, "trainable": 0}
    for name, s in files.items():
        entry = manifest["files"].get(name, {})
        tensors = entry.get("tensors")
        if name.startswith("model-") and tensors is not None:
            kind = "trainable" if tensors and all(t in trainable for t in tensors) else "frozen"
            parts[kind] += 1
            if kind == "trainable":
                changed += s.st_size
        else:
            changed += s.st_size  # optimizer.pt, rng, config, vocab, quantization metadata, manifest.json
    total = sum(s.st_size for s in files.values()) + latest
    return {"new": new, "linked": linked, "changed": changed, "total": total, "parts": parts}


def _timed(fn: Any) -> tuple[float, int, Any]:
    os.sync()
    w0 = _wchar()
    t0 = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t0
    return elapsed, _wchar() - w0, out


def _save_full(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, root: Path) -> Path:
    return Path(pc.save_checkpoint(model, optimizer, CONFIG, None, step, root))


def _save_incremental(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: int, root: Path, stats: _reuse.Stats
) -> Path:
    snap = _save.snapshot(model, optimizer, CONFIG, None, step, incremental=True)
    return Path(_save.write(snap, root, stats=stats))


def _prune(root: Path, keep: Path) -> None:
    """Keep only the newest step (``latest``) of the incremental root, as CheckpointManager(keep_last=1) would."""
    for p in root.glob("step-*"):
        if p.name != keep.name:
            shutil.rmtree(p)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))


def _check_values(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load ``path`` into a fresh model (every byte of it differing from the live one) and a fresh AdamW;
    compare every model tensor and optimizer state tensor bitwise with the live ones."""
    fresh, fresh_opt = _scrambled(model)
    live, got = model.state_dict(), fresh.state_dict()
    assert not any(_equal(live[k], got[k]) for k in live if live[k].numel()), "the scrambled copy equals the model"
    pc.load_checkpoint(path, fresh, fresh_opt)
    live, got = model.state_dict(), fresh.state_dict()
    bad = [k for k in live if k not in got or not _equal(live[k], got[k])] + [k for k in got if k not in live]
    tensors = len(live)
    live_opt, got_opt = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    for i, state in live_opt.items():
        for k, v in state.items():
            tensors += 1
            other = got_opt.get(i, {}).get(k)
            if not isinstance(other, torch.Tensor) or not _equal(v, other):
                bad.append(f"optimizer.state[{i}].{k}")
    return {"equal": not bad, "tensors_compared": tensors, "mismatches": bad[:10]}


def _profile(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, root: Path, top: int = 20) -> str:
    """cProfile of one incremental save (cumulative time), as text."""
    prof = cProfile.Profile()
    stats = _reuse.Stats()
    prof.enable()
    _save_incremental(model, optimizer, step, root, stats)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    ps = io.StringIO()
    pstats.Stats(prof, stream=ps).sort_stats("tottime").print_stats(top)
    return out.getvalue() + "\n" + ps.getvalue()


def _spread(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {"median": statistics.median(s), "min": s[0], "max": s[-1]}


def run(size_mib: float, reps: int, workdir: str | None = None, profile: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    t_build = time.perf_counter()
    model, optimizer = build(size_mib, seed=0)
    build_s = time.perf_counter() - t_build
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_bytes = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n not in trainable)
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in trainable)
    gen = torch.Generator().manual_seed(1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pc-bench-incremental-", dir=workdir) as work:
        inc_root = Path(work) / "incremental"
        train_step(model, optimizer, gen)
        first_stats = _reuse.Stats()
        first_s, first_wchar, first = _timed(lambda: _save_incremental(model, optimizer, 0, inc_root, first_stats))
        previous = first
        for rep in range(reps):
            step = rep + 1
            train_step(model, optimizer, gen)
            full_root = Path(work) / f"full-{rep}"
            row: dict[str, Any] = {"rep": rep, "step": step}
            order = ["full", "incremental"] if rep % 2 == 0 else ["incremental", "full"]
            for arm in order:
                if arm == "full":
                    s, w, path = _timed(lambda r=full_root, k=step: _save_full(model, optimizer, k, r))
                    acct = _account(path, full_root, trainable)
                    row["full"] = {"s": s, "wchar": w, "bytes": acct["total"]}
                    shutil.rmtree(full_root)
                else:
                    stats = _reuse.Stats()
                    s, w, path = _timed(
                        lambda k=step, st=stats: _save_incremental(model, optimizer, k, inc_root, st)  # type: ignore[misc]
                    )
                    acct = _account(path, inc_root, trainable)
                    row["incremental"] = {
                        "s": s,
                        "wchar": w,
                        "new_bytes": acct["new"],
                        "linked_bytes": acct["linked"],
                        "changed_bytes": acct["changed"],
                        "total_bytes": acct["total"],
                        "reused": len(stats.reused),
                        "written": len(stats.written),
                        "reused_bytes": stats.reused_bytes,
                        "parts": acct["parts"],
                    }
                    previous = path
            _prune(inc_root, previous)
            rows.append(row)
        check = _check_values(previous, model, optimizer)
        profile_text = None
        if profile:
            profile_text = _profile(model, optimizer, reps + 1, inc_root)
    time_ratios = [r["incremental"]["s"] / r["full"]["s"] for r in rows]
    bytes_ratios = [r["incremental"]["wchar"] / r["incremental"]["changed_bytes"] for r in rows]
    new_ratios = [r["incremental"]["new_bytes"] / r["incremental"]["changed_bytes"] for r in rows]
    last = rows[-1]["incremental"]
    result: dict[str, Any] = {
        "size_mib": size_mib,
        "reps": reps,
        "model": {
            "layers": LAYERS,
            "dim": _dim(size_mib),
            "lora_rank": RANK,
            "group_size": GROUP,
            "frozen_bytes": frozen_bytes,
            "adapter_bytes": adapter_bytes,
            "build_s": build_s,
        },
        "first_save": {
            "s": first_s,
            "wchar": first_wchar,
            "reused": len(first_stats.reused),
            "written": len(first_stats.written),
        },
        "rows": rows,
        "time_ratio": _spread(time_ratios),
        "full_s": _spread([r["full"]["s"] for r in rows]),
        "incremental_s": _spread([r["incremental"]["s"] for r in rows]),
        "bytes_ratio": _spread(bytes_ratios),
        "new_bytes_ratio": _spread(new_ratios),
        "full_bytes": rows[-1]["full"]["bytes"],
        "full_wchar": rows[-1]["full"]["wchar"],
        "changed_bytes": last["changed_bytes"],
        "written_bytes": last["wchar"],
        "new_bytes": last["new_bytes"],
        "parts": {"reused": last["reused"], "written": last["written"], **last["parts"]},
        "value_check": check,
        "targets": {
            "time": {"limit": TIME_TARGET, "passed": statistics.median(time_ratios) <= TIME_TARGET},
            "bytes": {"limit": BYTES_TARGET, "passed": max(bytes_ratios) <= BYTES_TARGET},
        },
        "load_average": os.getloadavg(),
    }
    if profile_text is not None:
        result["profile"] = profile_text
    return result


def render(result: dict[str, Any]) -> str:
    MIB = 2**20
    m, t, b = result["model"], result["time_ratio"], result["bytes_ratio"]
    parts = result["parts"]
    lines = [
        f"incremental: int4 LoRA model, {m['frozen_bytes'] / MIB:.0f} MiB frozen ({m['layers']} x [{m['dim']}, "
        f"{m['dim']}], group {m['group_size']}, zero points), rank-{m['lora_rank']} adapters "
        f"{m['adapter_bytes'] / MIB:.1f} MiB; {result['reps']} reps (alternated)",
        f"  save time incremental / full   {t['median']:.3f}x (min {t['min']:.3f}, max {t['max']:.3f}; "
        f"{result['incremental_s']['median']:.3f} s vs {result['full_s']['median']:.3f} s)  "
        f"target <= {TIME_TARGET}x: {'PASS' if result['targets']['time']['passed'] else 'FAIL'}",
        f"  bytes written / bytes changed  {b['median']:.3f}x (max {b['max']:.3f}; wchar "
        f"{result['written_bytes'] / MIB:.1f} MiB, changed {result['changed_bytes'] / MIB:.1f} MiB; new files "
        f"{result['new_bytes'] / MIB:.1f} MiB)  target <= {BYTES_TARGET}x (every rep): "
        f"{'PASS' if result['targets']['bytes']['passed'] else 'FAIL'}",
        f"  full save: {result['full_bytes'] / MIB:.1f} MiB on disk, wchar {result['full_wchar'] / MIB:.1f} MiB",
        f"  parts: {parts['reused']} reused (linked), {parts['written']} written "
        f"({parts['frozen']} frozen, {parts['trainable']} trainable); first save: {result['first_save']['written']} "
        f"written in {result['first_save']['s']:.3f} s",
        f"  value check (load into a fresh model, bitwise): {'PASS' if result['value_check']['equal'] else 'FAIL'} "
        f"({result['value_check']['tensors_compared']} tensors)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.incremental", description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=float, default=512.0, help="stored bytes of the frozen int4 base")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--workdir", default=None, help="where checkpoints are written (a temporary folder inside it)")
    p.add_argument("--profile", action="store_true", help="cProfile one more incremental save (printed to stderr)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(args.size_mib, args.reps, args.workdir, args.profile)
    if "profile" in result:
        print(result["profile"], file=sys.stderr)
    print(json.dumps(result) if args.json else render(result))
    if not result["value_check"]["equal"]:
        print(f"value check failed: {result['value_check']['mismatches']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
