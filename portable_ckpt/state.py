"""Turning live training objects into storable state and back.

Model state: a flat name -> tensor mapping; tensors that are the same tensor under two names
(tied weights) are stored once and recorded as aliases. Optimizer, scheduler and scaler state:
``torch.save`` files, always read back with ``weights_only=True`` (no code runs on load).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from portable_ckpt.errors import (
    CheckpointInputError,
    StateMismatchError,
)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any: ...


# modules that only wrap another one (the attribute that holds it): their state_dicts prefix every key
WRAPPERS: dict[type[nn.Module], str] = {nn.DataParallel: "module", nn.parallel.DistributedDataParallel: "module"}
COMPILED = ("torch._dynamo.eval_frame", "OptimizedModule", "_orig_mod")  # torch.compile's wrapper
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _wrapped_attr(model: nn.Module) -> str | None:
    attr = WRAPPERS.get(type(model))
    if attr is None:  # only a program that compiled a model has imported dynamo: never import it here
        module, name, compiled_attr = COMPILED
        compiled = getattr(sys.modules.get(module), name, None)
        attr = compiled_attr if compiled is not None and type(model) is compiled else None
    return attr


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` / ``DataParallel`` / ``DistributedDataParallel`` wrapper holds (repeatedly).

    Checkpoints store the unwrapped module's names, so they load into wrapped and unwrapped models alike.
    """
    while (attr := _wrapped_attr(model)) is not None:
        model = getattr(model, attr)
    return model


def _storable(name: str, t: torch.Tensor) -> torch.Tensor:
    """The tensor as the format stores it: dense, with its lazy conjugate and negative bits resolved."""
    if t.layout != torch.strided:
        raise CheckpointInputError(
            f'tensor "{name}" has layout {t.layout}, which a safetensors file cannot hold; store it dense '
            "(tensor.to_dense()) or keep it out of the state_dict"
        )
    if t.is_conj() or t.is_neg():  # the memory holds other values than the tensor shows: store what it shows
        return t.resolve_conj().resolve_neg()
    return t


def model_state(model: nn.Module | Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store, aliases alias -> stored name) for a module or a state_dict mapping."""
    if isinstance(model, nn.Module):
        state = unwrap(model).state_dict(keep_vars=False)
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
        t = _storable(name, t)
        if t.numel() and t.device.type != "meta":
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        stored[name] = t
    return stored, aliases


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """When the two key sets differ only by a wrapper's prefix, say which and how to fix it."""
    if not (missing or unexpected):
        return ""
    for prefix in WRAPPER_PREFIXES:
        if (
            all(k.startswith(prefix) for k in unexpected)
            and sorted(k.removeprefix(prefix) for k in unexpected) == missing
        ):
            return (
                f"; every checkpoint key has the prefix {prefix!r} that the model's keys lack: the state was "
                f"saved from a wrapper (torch.compile, DataParallel); strip {prefix!r} from its keys"
            )
        if all(k.startswith(prefix) for k in missing) and sorted(k.removeprefix(prefix) for k in missing) == unexpected:
            return (
                f"; every model key has the prefix {prefix!r} that the checkpoint's keys lack: pass the "
                "unwrapped module, or save the wrapped model itself (its wrapper is then removed on save)"
            )
    return ""


def _some(keys: list[str], limit: int = 10) -> str:
    return repr(keys) if len(keys) <= limit else f"{keys[:limit]!r} and {len(keys) - limit} more"


def check_model_match(
    model: nn.Module, shapes: Mapping[str, Sequence[int]], source: str, *, strict: bool
) -> tuple[list[str], list[str]]:
    """Raise one error naming the missing, unexpected and mismatched keys (``shapes``: stored name -> shape);
    returns (missing, unexpected), which ``strict=False`` tolerates."""
    return compare_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes, source, strict=strict)


def compare_shapes(
    own: Mapping[str, Sequence[int]], shapes: Mapping[str, Sequence[int]], source: str, *, strict: bool
) -> tuple[list[str], list[str]]:
    """``check_model_match`` on the model's name -> shape table ``own``."""
    missing = sorted(set(own) - set(shapes))
    unexpected = sorted(set(shapes) - set(own))
    mismatched = [
        f"{k}: checkpoint {list(shapes[k])}, model {list(own[k])}"
        for k in sorted(set(own) & set(shapes))
        if tuple(own[k]) != tuple(shapes[k])
    ]
    problems = [f"shape mismatch: {'; '.join(mismatched)}"] if mismatched else []
    if strict:
        problems = (
            ([f"missing keys (in the model, not in the checkpoint): {_some(missing)}"] if missing else [])
            + ([f"unexpected keys (in the checkpoint, not in the model): {_some(unexpected)}"] if unexpected else [])
            + problems
        )
    if problems:
        raise StateMismatchError(
            f"model does not match {source}: " + "; ".join(problems) + _prefix_hint(missing, unexpected), file=source
        )
    return missing, unexpected


def check_optimizer_match(optimizer: torch.optim.Optimizer, state: Mapping[str, Any], source: str) -> None:
    """The checks optimizer.load_state_dict makes, done before anything is loaded."""
    groups, saved = optimizer.param_groups, state["param_groups"]
    if not isinstance(saved, list) or len(saved) != len(groups):
        found = len(saved) if isinstance(saved, list) else type(saved).__name__
        raise StateMismatchError(
            f"optimizer does not match {source}: {len(groups)} parameter groups, checkpoint has {found}", file=source
        )
    for i, (group, stored) in enumerate(zip(groups, saved, strict=True)):
        params = stored.get("params") if isinstance(stored, dict) else None
        if not isinstance(params, list) or len(params) != len(group["params"]):
            found = len(params) if isinstance(params, list) else "none"
            raise StateMismatchError(
                f"optimizer does not match {source}: group {i} has {len(group['params'])} parameters, "
                f"checkpoint has {found}",
                file=source,
            )


def load_into(obj: Stateful, state: Any, what: str, filename: str) -> None:
    """obj.load_state_dict(state), with mismatches reported as StateMismatchError."""
    try:
        obj.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as e:
        raise StateMismatchError(f"{what} does not match {filename}: {type(e).__name__}: {e}", file=filename) from None
