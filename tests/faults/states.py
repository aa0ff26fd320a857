"""A training state that is a function of the step, and checks that a loaded checkpoint holds it.

:class:`TinyModel` (tied embedding, a linear layer, int64 and bf16 buffers), its optimizer and scheduler
get every value from the step (:func:`make_state`); the RNG state saved with it is seeded from the step
too. :func:`state_problems` and :func:`load_values` say what in a loaded checkpoint disagrees with that;
:func:`leftovers` lists what saves, deletions and overwrites leave in a root while they run, and may
not leave once their writer is gone.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import portable_ckpt as pc

STEP_DIR = re.compile(r"^step-[0-9]{8,}$")
VOCAB = ["<pad>", "a", "b", "c", "d", "e"]
WRITER_OFFSETS = {"main": 0.0, "A": 0.0, "B": 0.5}  # writer name -> value - step of its checkpoints

# the files of a checkpoint of TinyModel, in the order save writes them (manifest last)
FILES = (
    "model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng.safetensors",
    "rng.json",
    "config.json",
    "vocab.json",
    "manifest.json",
)
QUANT_FILE = "quantization_metadata.json"
# a save in progress (or crashed), a checkpoint being deleted, a checkpoint an overwrite moved aside
TEMPORARY_PREFIXES = (".tmp-", ".trash-", ".replaced-")
REPLACED = re.compile(r"\.replaced-(step-[0-9]{8,})-[0-9]+-[0-9a-f]+")  # matched whole


class TinyModel(nn.Module):
    """Embedding tied to the output head (an alias), a linear layer, an int64 and a bf16 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(len(VOCAB), 4)
        self.lin = nn.Linear(4, 3)
        self.head = nn.Linear(4, len(VOCAB), bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("seen", torch.zeros(2, dtype=torch.int64))
        self.register_buffer("scale", torch.zeros(2, dtype=torch.bfloat16))


def make_state(step: int, writer: str = "main") -> tuple[TinyModel, torch.optim.Optimizer, Any]:
    """Model, optimizer and scheduler whose every value is ``step`` (+ the writer's offset)."""
    value = step + WRITER_OFFSETS[writer]
    model = TinyModel()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model.seen.fill_(step)
        model.scale.fill_(value)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.full_like(p, value)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1000)
    sched.last_epoch = step
    return model, opt, sched


def config_for(step: int, writer: str = "main") -> dict[str, Any]:
    return {"step": step, "writer": writer, "value": step + WRITER_OFFSETS[writer]}


def save_step(
    target: str | os.PathLike[str] | pc.CheckpointManager, step: int, writer: str = "main", *, overwrite: bool = False
) -> Path:
    """Save the state of ``step`` into a root (save_checkpoint) or through a manager."""
    model, opt, sched = make_state(step, writer)
    with preserved_rng():
        seed_rng(config_for(step, writer)["value"])  # the RNG state saved is a function of the step too
        if isinstance(target, pc.CheckpointManager):
            path: Path = target.save(model, opt, config_for(step, writer), VOCAB, step, scheduler=sched)
            return path
        return pc.save_checkpoint(
            model, opt, config_for(step, writer), VOCAB, step, target, scheduler=sched, overwrite=overwrite
        )


def writer_loop(root: Path, steps: int, *, report: Callable[[str], None] = lambda line: None) -> None:
    """Save the next ``steps`` steps through CheckpointManager(root, keep_last=2), reporting each."""
    manager = pc.CheckpointManager(root, keep_last=2)
    done = manager.steps()
    first = done[-1] + 1 if done else 1
    for step in range(first, first + steps):
        report(f"begin {step}")
        save_step(manager, step)
        report(f"committed {step}")
    manager.close()


def seed_rng(value: float) -> None:
    seed = round(value * 2)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_problems(value: float) -> list[str]:
    """How the global generators differ from the state ``seed_rng(value)`` gives them (after a restore)."""
    now = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    with preserved_rng():
        seed_rng(value)
        expected = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    same = (now[0] == expected[0], bool((now[1] == expected[1]).all()), torch.equal(now[2], expected[2]))
    return [
        f"{name} generator state is not the saved one"
        for name, ok in zip(("python", "numpy", "torch"), same, strict=True)
        if not ok
    ]


def _same(t: Any, value: float) -> bool:
    return isinstance(t, torch.Tensor) and torch.equal(t, torch.full_like(t, value))


def state_problems(ckpt: pc.Checkpoint) -> list[str]:
    """What in ``ckpt`` is not the state ``make_state(ckpt.step, writer)`` saved (empty when all is right)."""
    step, config = ckpt.step, ckpt.config
    writer = config.get("writer") if isinstance(config, dict) else None
    if writer not in WRITER_OFFSETS or config.get("step") != step:
        return [f"config {config!r} does not describe step {step}"]
    value = step + WRITER_OFFSETS[writer]
    problems = []
    expected = {
        "emb.weight": value,
        "head.weight": value,
        "lin.weight": value,
        "lin.bias": value,
        "seen": step,
        "scale": value,
    }
    if set(ckpt.model_state) != set(expected):
        problems.append(f"model tensors {sorted(ckpt.model_state)}")
    problems += [
        f"model {k}" for k, v in expected.items() if k in ckpt.model_state and not _same(ckpt.model_state[k], v)
    ]
    opt = ckpt.optimizer_state or {}
    buffers = [s.get("momentum_buffer") for s in opt.get("state", {}).values()]
    if len(buffers) != 3 or not all(_same(b, value) for b in buffers):
        problems.append("optimizer momentum buffers")
    if (ckpt.scheduler_state or {}).get("last_epoch") != step:
        problems.append("scheduler last_epoch")
    if ckpt.vocab != VOCAB:
        problems.append("vocab")
    return problems


def load_values(path: str | os.PathLike[str], *, verify: bool = True) -> tuple[int, list[str]]:
    """Load ``path`` (a checkpoint or a root); (its step, what is wrong with its values, RNG state included)."""
    with preserved_rng():
        ckpt = pc.load_checkpoint(path, verify=verify, restore_rng=True)
        problems = state_problems(ckpt)
        if not problems:
            problems = rng_problems(ckpt.config["value"])
    return ckpt.step, problems


def leftovers(root: Path) -> list[str]:
    """What saves, deletions and overwrites leave in a root while they run: ``.tmp-*``, ``.trash-*``, and
    ``.replaced-*`` (a complete checkpoint an overwrite moved aside until the new one is in place). Once its
    writer has finished, or died and a CheckpointManager has opened the root, none may be left."""
    try:
        return sorted(n for n in os.listdir(root) if n.startswith(TEMPORARY_PREFIXES))
    except FileNotFoundError:
        return []


def moved_aside(root: Path) -> dict[str, str]:
    """Checkpoints an overwrite moved aside (``.replaced-step-N-PID-HEX``): name -> the step directory it left."""
    found = {}
    for name in leftovers(root):
        m = REPLACED.fullmatch(name)
        if m is not None:
            found[name] = m.group(1)
    return found


def latest_name(root: Path) -> str | None:
    try:
        return (root / "latest").read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Put the global random generators back as they were (a load with restore_rng changes them)."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


def quantized_model() -> nn.Module:
    """A small model with its linear layers quantized to int8 (ptq)."""
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 8))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.linspace(-1, 1, p.numel()).reshape(p.shape) * (i + 1))
    return pc.quantize(model, bits=8)
