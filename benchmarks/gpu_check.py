"""One short CUDA check, for a machine with a GPU: ``python benchmarks/gpu_check.py [--gib 1.0]``.

Checks that CUDA tensors save (staged through host memory), that ``map_location="cuda"`` loads to
the device, that CUDA generator state is saved and restored, that async saves of CUDA state
capture the values at the call, and that quantized CUDA models round-trip; then times a save and
a load of a ``--gib``-sized CUDA model. Prints one JSON object; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portable_ckpt import CheckpointManager, load_checkpoint, quantize, save_checkpoint


def _net() -> nn.Module:
    return nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        ids = torch.randint(0, 64, (8, 16), device="cuda")
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        optimizer.step()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def checks(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    torch.manual_seed(0)
    torch.cuda.manual_seed_all(0)
    model = _net().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer, 3)
    path = save_checkpoint(model, optimizer, {"device": "cuda"}, None, 3, root / "plain")
    after_save = torch.rand(4, device="cuda")
    manifest = json.loads((path / "manifest.json").read_text())
    out["rng_sources"] = manifest["rng"]

    ckpt = load_checkpoint(path, map_location="cuda", restore_rng=False)
    out["map_location_cuda_devices"] = sorted({str(t.device) for t in ckpt.model_state.values()})
    out["map_location_cuda_equal"] = _same(ckpt.model_state, model.state_dict())
    exp_avg = ckpt.optimizer_state["state"][0]["exp_avg"] if ckpt.optimizer_state else None
    out["optimizer_state_device"] = str(exp_avg.device) if exp_avg is not None else None

    torch.manual_seed(5)
    fresh = _net().cuda()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_checkpoint(path, model=fresh, optimizer=fresh_opt, map_location="cuda")
    out["cuda_rng_restored"] = bool(torch.equal(torch.rand(4, device="cuda"), after_save))
    out["model_in_place_equal"] = _same(fresh.state_dict(), model.state_dict())
    torch.manual_seed(9)
    torch.cuda.manual_seed_all(9)
    _train(model, optimizer, 2)
    torch.manual_seed(9)
    torch.cuda.manual_seed_all(9)
    _train(fresh, fresh_opt, 2)
    out["training_continues_identically"] = _same(fresh.state_dict(), model.state_dict())

    manager = CheckpointManager(root / "async")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    handle = manager.save(model, optimizer, {}, None, 1, blocking=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on during the write
    out["async_equals_state_at_call"] = _same(load_checkpoint(handle.result()).model_state, expected)

    q = quantize(_net().cuda(), bits=4, group_size=16, symmetric=False, mode="lora")
    ids = torch.randint(0, 64, (4, 8), device="cuda")
    with torch.no_grad():
        y = q(ids)
    qpath = save_checkpoint(q, None, {}, None, 0, root / "quant")
    back = _net().cuda()
    load_checkpoint(qpath, model=back, map_location="cuda")
    with torch.no_grad():
        out["quantized_cuda_outputs_equal"] = bool(torch.equal(back(ids), y))
    return out


def timings(root: Path, gib: float) -> dict[str, float]:
    n = int(gib * (1 << 30) / 4 / 256)
    big = nn.ParameterList([nn.Parameter(torch.randn(n, device="cuda")) for _ in range(256)])
    torch.cuda.synchronize()
    t = time.perf_counter()
    path = save_checkpoint(big, None, {}, None, 0, root / "big")
    save_s = time.perf_counter() - t
    manager = CheckpointManager(root / "big-async", keep_last=1)
    t = time.perf_counter()
    handle = manager.save(big, None, {}, None, 0, blocking=False)
    async_first_call_s = time.perf_counter() - t  # allocates the pinned buffers
    handle.wait()
    t = time.perf_counter()
    handle = manager.save(big, None, {}, None, 1, blocking=False)
    async_call_s = time.perf_counter() - t  # reuses them
    handle.wait()
    t = time.perf_counter()
    load_checkpoint(path, map_location="cuda")
    torch.cuda.synchronize()
    load_to_cuda_s = time.perf_counter() - t
    t = time.perf_counter()
    load_checkpoint(path, model=big)
    torch.cuda.synchronize()
    load_into_cuda_model_s = time.perf_counter() - t
    return {
        "gib": gib,
        "save_s": save_s,
        "async_first_call_blocking_s": async_first_call_s,
        "async_call_blocking_s": async_call_s,
        "async_call_vs_sync_save": async_call_s / save_s,
        "load_map_location_cuda_s": load_to_cuda_s,
        "load_into_cuda_model_s": load_into_cuda_model_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **checks(Path(tmp))}
        result["timings"] = timings(Path(tmp), args.gib)
    bools = [v for v in result.values() if isinstance(v, bool)]
    result["all_checks_pass"] = all(bools) and "torch.cuda.0" in result["rng_sources"]  # type: ignore[operator]
    print(json.dumps(result, indent=2))
    return 0 if result["all_checks_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
