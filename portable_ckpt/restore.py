"""Restoring live objects from a checkpoint that has been read and checked: the model (in place where it
was filled while reading), optimizer, scheduler, scaler, user states and generators; and where tensors go
(``map_location``, as ``torch.load`` takes it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from portable_ckpt.errors import CheckpointInputError, StateMismatchError
from portable_ckpt.format import names
from portable_ckpt.format import rng as _rng
from portable_ckpt.state import Stateful, check_model_match, load_into
from portable_ckpt.types import Checkpoint


def _device(value: Any, what: str) -> torch.device:
    try:
        device = torch.device(value)
        torch.empty(0, device=device)  # the device exists here (CUDA built and present, ...)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointInputError(
            f"map_location {what}{value!r} is not a usable device here: {str(e).splitlines()[0][:200]}; "
            'pass "cpu", "cuda:0", a torch.device, a dict of device names or a callable, as for torch.load'
        ) from None
    return torch.device("cpu") if device.type == "cpu" else device  # torch.load knows "cpu", not "cpu:0"


def placement(map_location: Any) -> tuple[Any, Callable[[torch.Tensor], torch.Tensor]]:
    """Check ``map_location`` as torch.load takes it; returns (what torch.load gets, where a CPU tensor goes).

    A bad argument is a CheckpointInputError here, never a "damaged file" later.
    """
    if map_location is None or isinstance(map_location, (str, torch.device)):
        device = _device("cpu" if map_location is None else map_location, "")
        return device, (lambda t: t) if device.type == "cpu" else (lambda t: t.to(device))
    if isinstance(map_location, Mapping):
        mapping = {}
        for k, v in map_location.items():
            if not isinstance(k, str):
                raise CheckpointInputError(f"map_location keys must be device names (str), found {k!r}")
            mapping[k] = str(_device(v, f"[{k!r}] = "))
        target = torch.device(mapping.get("cpu", "cpu"))
        return mapping, (lambda t: t) if target.type == "cpu" else (lambda t: t.to(target))
    if callable(map_location):

        def move(t: torch.Tensor) -> torch.Tensor:
            moved = map_location(t.untyped_storage(), "cpu")
            device = getattr(moved, "device", None)
            return t if device is None or torch.device(device).type == "cpu" else t.to(device)

        return map_location, move
    raise CheckpointInputError(
        f"map_location is a {type(map_location).__qualname__}; pass a device name, a torch.device, a dict of "
        "device names or a callable (storage, location) -> storage, as for torch.load"
    )


def _filled_in_place(model: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    """Every tensor was read into the model's own memory and no module customizes loading: then
    load_state_dict would only copy each tensor onto itself (it costs ~1 ms per 100 tensors)."""
    own = model.state_dict(keep_vars=True)
    if own.keys() != state.keys() or any(state[k] is not t for k, t in own.items()):
        return False
    return all(
        type(m)._load_from_state_dict is nn.Module._load_from_state_dict
        and not m._load_state_dict_pre_hooks
        and not m._load_state_dict_post_hooks
        for m in model.modules()
    )


def restore_state(obj: Any, state: Any, what: str, source: str) -> None:
    """Restore one user object (``load_state_dict``) or generator (``set_state``) from its saved state."""
    if isinstance(obj, torch.Generator):
        try:
            obj.set_state(state)
        except RuntimeError as e:
            raise StateMismatchError(
                f"{source}: {what} cannot take the saved generator state: {e}", file=source
            ) from None
    else:
        load_into(obj, state, what, source)


def absent_state(what: str, source: str) -> StateMismatchError:
    return StateMismatchError(
        f"{source}: the checkpoint holds no {what} state, but a {what} was passed to restore; "
        f"pass {what}=None, or load a checkpoint saved with one (nothing was modified)",
        file=source,
    )


def apply(
    ckpt: Checkpoint,
    rng: Mapping[str, Any] | None,
    *,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Stateful | None,
    scaler: Stateful | None,
    strict: bool,
    restore_rng: bool,
    states: Mapping[str, Any] | None = None,
) -> None:
    """Restore live objects from a checkpoint that has been fully read and checked."""
    restoring = (
        ("optimizer", optimizer, ckpt.optimizer_state, names.OPTIMIZER),
        ("scheduler", scheduler, ckpt.scheduler_state, names.SCHEDULER),
        ("scaler", scaler, ckpt.scaler_state, names.SCALER),
    )
    for what, obj, state, name in restoring:  # before the model is touched
        if obj is not None and state is None:
            raise absent_state(what, f"{ckpt.path}/{name}")
    absent = sorted(set(states or {}) - set(ckpt.states))
    if absent:  # format 0 has none; format 1 was checked while reading
        raise absent_state(f"states {absent}", f"{ckpt.path}/{names.STATES_JSON}")
    if model is not None:
        if ckpt.format_version == 0:  # format 1 matched and converted the model while reading
            shapes = {k: tuple(v.shape) for k, v in ckpt.model_state.items()}
            check_model_match(model, shapes, f"{ckpt.path}/model.pt", strict=strict)
        if not _filled_in_place(model, ckpt.model_state):
            model.load_state_dict(ckpt.model_state, strict=strict)
    for what, obj, state, name in restoring:
        if obj is not None:
            load_into(obj, state, what, f"{ckpt.path}/{name}")
    for name, obj in (states or {}).items():  # present and of the right kind: checked while reading
        restore_state(obj, ckpt.states[name], f"states[{name!r}]", f"{ckpt.path}/{names.STATES_JSON}")
    if restore_rng and rng is not None:
        _rng.restore(rng["tensors"], rng["doc"])
