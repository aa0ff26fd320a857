"""The training states the benchmarks save and load, built deterministically from a small spec.

Kinds (``--state``):

- ``model``: a model of ``tensors`` fp32 tensors (``tensors // 2`` layers of a weight ``[rows, 1024]``
  and a bias ``[rows]``) totalling about ``size_mib``; no optimizer.
- ``full``: the same model with its AdamW state (``exp_avg`` and ``exp_avg_sq`` per parameter plus a
  0-d ``step``), so the optimizer holds twice the model's bytes.
- ``small``: ``tensors`` 1-D fp32 tensors of ``size_mib / tensors`` each (many small tensors), in
  ``sqrt(tensors)`` blocks.
- ``few``: the same total bytes as ``small`` in 16 tensors (its large-tensor twin).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import xxhash
from torch import nn

from portable_ckpt.format.safetensors import tensor_bytes

KINDS = ("model", "full", "small", "few")
_COLS = 1024
_FEW = 16


@dataclass(frozen=True, slots=True)
class StateSpec:
    kind: str
    size_mib: float
    tensors: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown state kind {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.size_mib <= 0 or self.tensors < 2:
            raise ValueError(f"size_mib must be > 0 and tensors >= 2, found {self.size_mib} and {self.tensors}")

    @property
    def has_optimizer(self) -> bool:
        return self.kind == "full"


def shapes(spec: StateSpec) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the spec's model."""
    floats = int(spec.size_mib * (1 << 20)) // 4
    if spec.kind in ("model", "full"):
        layers = spec.tensors // 2
        rows = max(1, round(floats / layers / (_COLS + 1)))
        out: dict[str, tuple[int, ...]] = {}
        for i in range(layers):
            out[f"layers.{i}.weight"] = (rows, _COLS)
            out[f"layers.{i}.bias"] = (rows,)
        return out
    count = spec.tensors if spec.kind == "small" else _FEW
    # sqrt(count) blocks of sqrt(count) tensors, as deep models nest them; one flat level of 10,000
    # children would instead measure Module.load_state_dict, which filters every key per child
    group = math.isqrt(count - 1) + 1
    return {f"blocks.{i // group}.p{i % group}": (max(1, floats // count),) for i in range(count)}


class Net(nn.Module):
    """A module holding parameters of the given dotted names and shapes (no forward: state only)."""

    def __init__(self, param_shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        for name, shape in param_shapes.items():
            owner: nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]  # type: ignore[assignment]
            owner.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))  # zeros: pages touched


def init_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One AdamW step with small gradients, so that every state tensor exists and holds data."""
    for p in model.parameters():
        p.grad = p.detach() * 1e-3 + 1e-4
    optimizer.step()
    for p in model.parameters():
        p.grad = None


def make_optimizer(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def build(spec: StateSpec, *, seed: int = 0) -> tuple[Net, torch.optim.AdamW | None]:
    """The source state: random parameters and, for ``full``, a populated AdamW state."""
    model = Net(shapes(spec))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1, 1, generator=g)
    if not spec.has_optimizer:
        return model, None
    optimizer = make_optimizer(model)
    init_optimizer_state(model, optimizer)
    return model, optimizer


def build_target(spec: StateSpec, *, optimizer_state: bool) -> tuple[Net, torch.optim.AdamW | None]:
    """A model (zeros, memory touched) to load into; with ``optimizer_state`` an AdamW whose state exists."""
    model = Net(shapes(spec))
    if not spec.has_optimizer:
        return model, None
    optimizer = make_optimizer(model)
    if optimizer_state:
        init_optimizer_state(model, optimizer)
    return model, optimizer


def flat_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the state in one defined order: the model's, then the optimizer's."""
    out = [(name, t.detach()) for name, t in sorted(model.state_dict().items())]
    if optimizer is not None:
        state = optimizer.state_dict()["state"]
        for index in sorted(state):
            for key in sorted(state[index]):
                value = state[index][key]
                if isinstance(value, torch.Tensor):
                    out.append((f"optimizer.{index}.{key}", value))
    return out


def nbytes(tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in tensors)


def digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """XXH3-64 over every tensor's bytes: the pass that touches each loaded byte, and a correctness check."""
    h = xxhash.xxh3_64()
    for _, t in tensors:
        h.update(tensor_bytes(t.contiguous()))
    return h.hexdigest()
