"""Turning live training objects into storable state and back.

Model state: a flat name -> tensor mapping; tensors that are the same tensor under two names
(tied weights) are stored once and recorded as aliases. Optimizer, scheduler and scaler state:
``torch.save`` files, always read back with ``weights_only=True`` (no code runs on load).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from portable_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointInputError,
    StateMismatchError,
)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any: ...


def model_state(model: nn.Module | Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store, aliases alias -> stored name) for a module or a state_dict mapping."""
    if isinstance(model, nn.Module):
        state = model.state_dict(keep_vars=False)
    elif isinstance(model, Mapping):
        state = dict(model)
    else:
        raise CheckpointInputError(
            f"model is a {type(model).__qualname__}; pass an nn.Module or a mapping of names to tensors"
        )
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name in sorted(state):
        t = state[name]
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise CheckpointInputError(f"model state entry {name!r} is not a str -> torch.Tensor pair")
        if t.numel() and t.device.type != "meta":
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        stored[name] = t
    return stored, aliases


def with_aliases(
    tensors: dict[str, torch.Tensor], aliases: Mapping[str, str], filename: str
) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for alias, target in aliases.items():
        if target not in tensors:
            raise CheckpointCorruptedError(f'{filename}: alias "{alias}" points at "{target}", which is not stored')
        if alias in tensors:
            raise CheckpointCorruptedError(f'{filename}: alias "{alias}" is also stored as a tensor')
        out[alias] = tensors[target]
    return dict(sorted(out.items()))


def check_model_match(model: nn.Module, shapes: Mapping[str, Sequence[int]], source: str, *, strict: bool) -> None:
    """Raise one error listing every missing, unexpected and mismatched key (``shapes``: stored name -> shape)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(shapes))
    unexpected = sorted(set(shapes) - set(own))
    mismatched = [
        f"{k}: checkpoint {list(shapes[k])}, model {list(own[k].shape)}"
        for k in sorted(set(own) & set(shapes))
        if tuple(own[k].shape) != tuple(shapes[k])
    ]
    problems = [f"shape mismatch: {'; '.join(mismatched)}"] if mismatched else []
    if strict:
        problems = (
            ([f"missing keys (in the model, not in the checkpoint): {missing}"] if missing else [])
            + ([f"unexpected keys (in the checkpoint, not in the model): {unexpected}"] if unexpected else [])
            + problems
        )
    if problems:
        raise StateMismatchError(f"model does not match {source}: " + "; ".join(problems))


def check_optimizer_match(optimizer: torch.optim.Optimizer, state: Mapping[str, Any], source: str) -> None:
    """The checks optimizer.load_state_dict makes, done before anything is loaded."""
    groups, saved = optimizer.param_groups, state["param_groups"]
    if not isinstance(saved, list) or len(saved) != len(groups):
        found = len(saved) if isinstance(saved, list) else type(saved).__name__
        raise StateMismatchError(
            f"optimizer does not match {source}: {len(groups)} parameter groups, checkpoint has {found}"
        )
    for i, (group, stored) in enumerate(zip(groups, saved, strict=True)):
        params = stored.get("params") if isinstance(stored, dict) else None
        if not isinstance(params, list) or len(params) != len(group["params"]):
            found = len(params) if isinstance(params, list) else "none"
            raise StateMismatchError(
                f"optimizer does not match {source}: group {i} has {len(group['params'])} parameters, "
                f"checkpoint has {found}"
            )


def load_into(obj: Stateful, state: Any, what: str, filename: str) -> None:
    """obj.load_state_dict(state), with mismatches reported as StateMismatchError."""
    try:
        obj.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as e:
        raise StateMismatchError(f"{what} does not match {filename}: {type(e).__name__}: {e}") from None
