"""Turning live training objects into storable state and back.

Model state: a flat name -> tensor mapping; tensors that are the same tensor under two names
(tied weights) are stored once and recorded as aliases. Optimizer, scheduler and scaler state:
``torch.save`` files, always read back with ``weights_only=True`` (no code runs on load).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from portable_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointInputError,
    CheckpointNotFoundError,
    StateMismatchError,
)
from portable_ckpt.format.hashing import new_hasher

_SERIALIZATION_CONFIG: Any
try:
    from torch.utils.serialization import config as _SERIALIZATION_CONFIG
except ImportError:  # torch < 2.6
    _SERIALIZATION_CONFIG = None

# What a damaged or hostile .pt file can make torch.load raise; torch does not narrow this down.
TORCH_LOAD_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    OverflowError,
    UnicodeDecodeError,
    zipfile.BadZipFile,
    struct.error,
    ImportError,
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


class _HashingWriter:
    """A file-like sink for torch.save that hashes bytes on their way to the file (no buffered copy)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.hash = new_hasher()
        self.size = 0
        self.error: OSError | None = None  # torch.save turns a failed write into a RuntimeError

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        self.hash.update(view)
        self.size += n
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as e:
            self.error = e
            raise
        return n

    def flush(self) -> None:
        pass


def save_pt(path: str | os.PathLike[str], obj: Any) -> tuple[int, str]:
    """torch.save ``obj`` to a new file; returns (size, checksum)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        writer = _HashingWriter(fd)
        with _no_zip_crc():
            try:
                torch.save(obj, writer)  # type: ignore[arg-type]
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None  # the disk's error, not torch's wrapper of it
                raise
    finally:
        os.close(fd)
    return writer.size, writer.hash.hexdigest()


def _no_zip_crc() -> contextlib.AbstractContextManager[Any]:
    """The zip CRC32 that torch.save computes costs ~40% of a save; the manifest's XXH3 covers the file."""
    if _SERIALIZATION_CONFIG is None:  # torch < 2.6 has no such switch
        return contextlib.nullcontext()
    patch: contextlib.AbstractContextManager[Any] = _SERIALIZATION_CONFIG.patch({"save.compute_crc32": False})
    return patch


def load_pt(path: str | os.PathLike[str], filename: str, map_location: Any, *, mmap: bool = True) -> Any:
    """torch.load with weights_only=True; any refusal or damage becomes CheckpointCorruptedError."""
    try:
        # mmap: tensors are read from the page cache on first touch instead of copied up front
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"{filename}: removed while the checkpoint was being read (retention or a concurrent overwrite)"
        ) from None
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # torch's first line advises weights_only=False; the line naming the refused global is the reason
        reason = next(
            (ln for ln in lines if "GLOBAL" in ln or "global" in ln), lines[-1] if lines else type(e).__name__
        )
        raise CheckpointCorruptedError(
            f"{filename}: refused to unpickle (only tensors and plain containers are allowed; "
            f"no code from a checkpoint is ever run): {reason[:300]}"
        ) from None
    except TORCH_LOAD_ERRORS as e:
        raise CheckpointCorruptedError(
            f"{filename}: not a readable torch.save file: {type(e).__name__}: {str(e)[:300]}"
        ) from None


def load_into(obj: Stateful, state: Any, what: str, filename: str) -> None:
    """obj.load_state_dict(state), with mismatches reported as StateMismatchError."""
    try:
        obj.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as e:
        raise StateMismatchError(f"{what} does not match {filename}: {type(e).__name__}: {e}") from None
