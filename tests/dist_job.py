"""What each rank of tests/test_distributed.py runs: tiny FSDP2, tensor-parallel and DDP jobs over gloo.

``rank_main`` is the target of every rank process: it joins the process group (127.0.0.1, the
launcher's free port, a timeout on every collective), runs the named jobs in order and writes one
``<job>-<rank>.json`` per job: ``{"ok": true, "value": ...}`` or the error's class, classes and
message. Jobs write the tensors the test compares with ``torch.save`` (full tensors, gathered with
``full_tensor()``). Nothing here asserts: the test process compares what the ranks wrote.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel

import portable_ckpt as pc
from portable_ckpt.dcp import PortableStorageReader, PortableStorageWriter

IN, HIDDEN, OUT = 8, 16, 10  # 10 splits unevenly over 3 and 4 ranks: resharding moves chunk boundaries
CONFIG = {"name": "mlp", "dims": [IN, HIDDEN, OUT]}
VOCAB = ["<pad>", "a", "b"]
TRAIN_STEPS = 3  # of the saved FSDP2 job
BATCH = 4  # the global batch; rank r of w takes samples r, r + w, ...


# -- models, data, optimizers --------------------------------------------------------------------


def build_mlp(seed: int, *, dropout: float = 0.0) -> nn.Sequential:
    """The same values on every rank for the same seed: a 2-layer MLP (dropout makes resume depend on RNG)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Dropout(dropout), nn.Linear(HIDDEN, OUT))


def adamw(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)


def fsdp(model: nn.Sequential) -> nn.Sequential:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def tensor_parallel(model: nn.Sequential) -> nn.Module:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return parallelize_module(model, mesh, {"0": ColwiseParallel(), "3": RowwiseParallel()})


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s global batch, from its own generator (not the global RNG), and this rank's part."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, OUT, generator=g)
    return x[rank::world], y[rank::world]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.item())


def full(t: Any) -> Any:
    """A DTensor's global value (collective: every rank calls it), a plain tensor as a copy."""
    if isinstance(t, DTensor):
        return t.full_tensor().detach().clone()
    return t.detach().clone() if isinstance(t, torch.Tensor) else t


def snapshot(model: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Full tensors of the model's state_dict and the optimizer's state_dict (keyed by index), collective."""
    out: dict[str, Any] = {"model": {k: full(v) for k, v in model.state_dict().items()}}
    if opt is not None:
        sd = opt.state_dict()
        out["optim_state"] = {i: {k: full(v) for k, v in s.items()} for i, s in sd["state"].items()}
        out["param_groups"] = sd["param_groups"]
    return out


def save_on_rank0(obj: Any, path: Path) -> None:
    if dist.get_rank() == 0:
        torch.save(obj, path)


def error_doc(e: BaseException) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "ok": False,
        "type": type(e).__name__,
        "classes": [c.__name__ for c in type(e).__mro__],
        "message": str(e),
        "traceback": traceback.format_exc(),
        "errno": e.errno if isinstance(e, OSError) else None,
    }
    if isinstance(e, CheckpointException):  # DCP's wrapper: what each failing rank raised
        doc["failures"] = {
            str(r): [type(f[0] if isinstance(f, tuple) else f).__name__, str(f[0] if isinstance(f, tuple) else f)]
            for r, f in e.failures.items()
        }
    return doc


# -- fault injection: this rank's writes into a staging directory --------------------------------


@contextlib.contextmanager
def staging_writes(action: Callable[[], None] | None) -> Iterator[None]:
    """While inside, this process's ``os.write`` into any file under a staging directory (``.tmp-step-...``)
    runs ``action`` first (raise, or die): a fault of this rank's disk only, every other file untouched."""
    real = os.write

    def write(fd: int, data: Any, /) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if action is not None and "/.tmp-step-" in target:
            action()
        return real(fd, data)

    os.write = write
    try:
        yield
    finally:
        os.write = real


def _disk_full() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# -- jobs ----------------------------------------------------------------------------------------


def fsdp_save(rank: int, world: int, out: Path, root: str) -> str:
    """FSDP2 + AdamW, a few steps, saved collectively; rank 0 writes the saved global tensors."""
    model = fsdp(build_mlp(0))
    opt = adamw(model)
    torch.manual_seed(7)
    for step in range(1, TRAIN_STEPS + 1):
        train_step(model, opt, *batch(step, rank, world))
    path = pc.save_checkpoint(model, opt, CONFIG, VOCAB, TRAIN_STEPS, root, extra={"run": "fsdp"})
    save_on_rank0(snapshot(model, opt), out / "fsdp-saved.pt")
    return str(path)


def fsdp_load(rank: int, world: int, out: Path, root: str, name: str) -> dict[str, Any]:
    """A fresh FSDP2 model (other values) and an empty AdamW, loaded from ``root``; rank 0 writes them."""
    model = fsdp(build_mlp(99))
    opt = adamw(model)
    ck = pc.load_checkpoint(root, model, opt)
    save_on_rank0(snapshot(model, opt), out / f"{name}.pt")
    return {"step": ck.step, "config": ck.config, "vocab": ck.vocab, "extra": ck.extra, "version": ck.format_version}


def fsdp_load_corrupted(rank: int, world: int, out: Path, root: str) -> None:
    model = fsdp(build_mlp(99))
    pc.load_checkpoint(root, model, adamw(model))


def load_mismatched(rank: int, world: int, out: Path, root: str) -> None:
    """A model with one more layer than the checkpoint's: the load must fail on every rank, changing nothing."""
    torch.manual_seed(99)
    model = fsdp(nn.Sequential(*build_mlp(99), nn.Linear(OUT, 3)))
    opt = adamw(model)
    save_on_rank0(snapshot(model, None), out / "mismatch-before.pt")
    try:
        pc.load_checkpoint(root, model, opt)
    finally:
        save_on_rank0(snapshot(model, None), out / "mismatch-after.pt")


def tp_roundtrip(rank: int, world: int, out: Path, root: str) -> str:
    """A tensor-parallel MLP (column-wise then row-wise linear) trained, saved, loaded into a fresh one."""
    model = tensor_parallel(build_mlp(0))
    opt = adamw(model)
    for step in range(1, 3):
        train_step(model, opt, *batch(step, 0, 1))  # every rank of a TP group sees the same batch
    path = pc.save_checkpoint(model, opt, CONFIG, None, 2, root)
    save_on_rank0(snapshot(model, opt), out / "tp-saved.pt")
    fresh = tensor_parallel(build_mlp(99))
    fresh_opt = adamw(fresh)
    pc.load_checkpoint(path, fresh, fresh_opt)
    save_on_rank0(snapshot(fresh, fresh_opt), out / "tp-loaded.pt")
    return str(path)


def ddp_roundtrip(rank: int, world: int, out: Path, root: str) -> str:
    """DDP (replicated on every rank) trained, saved, loaded into a fresh DDP model."""
    model = DistributedDataParallel(build_mlp(0))
    opt = adamw(model)
    for step in range(1, 3):
        train_step(model, opt, *batch(step, rank, world))
    path = pc.save_checkpoint(model, opt, CONFIG, None, 2, root)
    save_on_rank0(snapshot(model.module, opt), out / "ddp-saved.pt")
    fresh = DistributedDataParallel(build_mlp(99))
    fresh_opt = adamw(fresh)
    pc.load_checkpoint(path, fresh, fresh_opt)
    save_on_rank0(snapshot(fresh.module, fresh_opt), out / "ddp-loaded.pt")
    return str(path)


def format1_into_fsdp(rank: int, world: int, out: Path, path: str, name: str = "format1") -> int:
    """A one-process (format 1, or 3: incremental) checkpoint loaded into a 2-rank FSDP2 model and optimizer."""
    model = fsdp(build_mlp(99))
    opt = adamw(model)
    ck = pc.load_checkpoint(path, model, opt)
    save_on_rank0(snapshot(model, opt), out / f"{name}-loaded.pt")
    return ck.step


def dcp_direct(rank: int, world: int, out: Path, root: str) -> dict[str, Any]:
    """``dcp.save``/``dcp.load`` with our storage pair, torchtitan-style; then a value JSON cannot hold."""
    model = fsdp(build_mlp(0))
    opt = adamw(model)
    for step in range(1, 3):
        train_step(model, opt, *batch(step, rank, world))
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optimizer": osd, "extra_counter": 5}, storage_writer=PortableStorageWriter(root, step=3))
    save_on_rank0(snapshot(model, opt), out / "dcp-saved.pt")
    path = f"{root}/step-00000003"
    fresh = fsdp(build_mlp(99))
    fresh_opt = adamw(fresh)
    fmsd, fosd = get_state_dict(fresh, fresh_opt)
    state: dict[str, Any] = {"model": fmsd, "optimizer": fosd, "extra_counter": 0}
    dcp.load(state, storage_reader=PortableStorageReader(path))
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    save_on_rank0(snapshot(fresh, fresh_opt), out / "dcp-loaded.pt")
    bad: dict[str, Any] = {}
    try:
        dcp.save({"model": msd, "handle": object()}, storage_writer=PortableStorageWriter(root, step=4))
    except BaseException as e:
        bad = error_doc(e)
    return {
        "extra_counter": state["extra_counter"],
        "path": path,
        "bad": bad,
        "steps": pc.CheckpointManager(root).steps(),
    }


def nonblocking_save(rank: int, world: int, out: Path, root: str) -> dict[str, Any]:
    """A background save; the parameters change right after the call; what was saved is the values before."""
    model = fsdp(build_mlp(0))
    opt = adamw(model)
    train_step(model, opt, *batch(1, rank, world))
    save_on_rank0(snapshot(model, opt), out / "async-before.pt")
    mgr = pc.CheckpointManager(root, keep_last=2)
    handle = mgr.save(model, opt, CONFIG, None, 1, blocking=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # on this rank's shard, at once, while the write may still run
    train_step(model, opt, *batch(2, rank, world))
    path = handle.result(timeout=60)
    save_on_rank0(snapshot(model, opt), out / "async-after.pt")
    mgr.close()
    return {"handle": type(handle).__name__, "path": str(path), "steps": mgr.steps()}


def train(
    rank: int,
    world: int,
    out: Path,
    root: str,
    name: str,
    total: int,
    every: int,
    resume: bool = False,
    restore_rng: bool = True,
    stop_at: int | None = None,
    reached: Any = None,
    hold: Any = None,
) -> dict[str, Any]:
    """FSDP2 training with dropout (per-rank RNG) and a scheduler, saving every ``every`` steps.

    resume: restore the newest checkpoint first (rank 0 writes what was loaded), with the RNG state
    unless not ``restore_rng``. stop_at: after that
    step, send this rank on the pipe ``reached`` and wait on the pipe ``hold``, which the test never
    writes to (it SIGKILLs every rank there; if the test itself is gone, the pipe's end wakes the rank). Returns the losses as float.hex, by step; rank 0 writes the final state."""
    model = fsdp(build_mlp(0, dropout=0.25))
    opt = adamw(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    torch.manual_seed(100 + rank)  # each rank its own dropout stream
    mgr = pc.CheckpointManager(root, keep_last=2)
    start = 0
    if resume:
        ck = mgr.restore(model, opt, scheduler=sched, restore_rng=restore_rng)
        if ck is None:
            raise RuntimeError(f"nothing to resume in {root}")
        start = ck.step
        save_on_rank0(snapshot(model, opt), out / f"{name}-restored.pt")
    losses: dict[int, str] = {}
    for step in range(start + 1, total + 1):
        losses[step] = train_step(model, opt, *batch(step, rank, world)).hex()
        sched.step()
        if step % every == 0:
            mgr.save(model, opt, CONFIG, None, step, scheduler=sched)
            save_on_rank0(snapshot(model, opt), out / f"{name}-step{step}.pt")
        if step == stop_at:
            reached.send(rank)
            hold.poll(120)
    save_on_rank0(snapshot(model, opt), out / f"{name}-final.pt")
    mgr.close()
    return {"losses": losses, "steps": mgr.steps(), "lr": sched.get_last_lr()}


def save_twice_with_fault(
    rank: int, world: int, out: Path, root: str, name: str, fault: str, faulty: int, blocking: bool = True
) -> dict[str, Any]:
    """Step 1 saved; then step 2 (in the background unless ``blocking``), during which rank ``faulty``'s
    disk is full or it dies writing a shard."""
    model = fsdp(build_mlp(0))
    opt = adamw(model)
    train_step(model, opt, *batch(1, rank, world))
    mgr = pc.CheckpointManager(root)
    mgr.save(model, opt, CONFIG, None, 1)
    save_on_rank0(snapshot(model, opt), out / f"{name}-step1.pt")
    train_step(model, opt, *batch(2, rank, world))
    with staging_writes((_disk_full if fault == "diskfull" else _die) if rank == faulty else None):
        if blocking:
            mgr.save(model, opt, CONFIG, None, 2)
        else:
            mgr.save(model, opt, CONFIG, None, 2, blocking=False).result(timeout=60)
    return {"saved": True}


class Position:
    """A rank's own resumable object (as a data loader's position is): its state differs per rank."""

    def __init__(self, seen: int) -> None:
        self.seen = seen

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "order": (3, 1, 2)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"]


def states_per_rank(rank: int, world: int, out: Path, root: str) -> dict[str, Any]:
    """Each rank saves its own ``states=`` object and gets its own back."""
    model = fsdp(build_mlp(0))
    opt = adamw(model)
    pc.save_checkpoint(model, opt, CONFIG, VOCAB, 1, root, states={"position": Position(100 + rank)})
    restored = Position(0)
    ck = pc.load_checkpoint(root, model, opt, states={"position": restored})
    return {"seen": restored.seen, "states": ck.states}


def fsdp_s3(rank: int, world: int, out: Path, url: str, options: dict[str, Any]) -> dict[str, Any]:
    """FSDP2 saved onto an S3 root (the manager, manifest-last, every rank uploading its shards), then
    loaded back into a fresh sharded model; rank 0 writes both as full tensors."""
    from portable_ckpt.storage import FsspecStorage

    root = FsspecStorage.from_location(url, storage_options=options)
    model = fsdp(build_mlp(0))
    opt = adamw(model)
    torch.manual_seed(7)
    manager = pc.CheckpointManager(root, keep_last=1)
    for step in range(1, TRAIN_STEPS + 1):
        train_step(model, opt, *batch(step, rank, world))
        manager.save(model, opt, CONFIG, VOCAB, step)
    save_on_rank0(snapshot(model, opt), out / "s3-saved.pt")
    fresh = fsdp(build_mlp(99))
    fresh_opt = adamw(fresh)
    ck = manager.restore(fresh, fresh_opt)
    save_on_rank0(snapshot(fresh, fresh_opt), out / "s3-loaded.pt")
    return {"step": ck.step if ck else None, "steps": manager.steps(), "path": str(ck.path) if ck else None}


JOBS: dict[str, Callable[..., Any]] = {
    f.__name__: f
    for f in (
        fsdp_save,
        fsdp_load,
        fsdp_load_corrupted,
        load_mismatched,
        tp_roundtrip,
        ddp_roundtrip,
        format1_into_fsdp,
        dcp_direct,
        nonblocking_save,
        train,
        save_twice_with_fault,
        fsdp_s3,
        states_per_rank,
    )
}


def rank_main(
    rank: int, world: int, port: int, out: str, jobs: list[tuple[str, str, dict[str, Any]]], pg_timeout: float
) -> None:
    """One rank: join the group, run ``jobs`` (label, job name, keyword arguments), report each to a file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    where = Path(out)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout))
    try:
        for label, job, kwargs in jobs:
            try:
                doc = {"ok": True, "value": JOBS[job](rank, world, where, **kwargs)}
            except BaseException as e:
                doc = error_doc(e)
            (where / f"{label}-{rank}.json").write_text(json.dumps(doc, default=str))
    finally:
        dist.destroy_process_group()
