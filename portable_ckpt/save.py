"""save_checkpoint: snapshot the training state, write it to a temporary directory, commit."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from portable_ckpt import threads as _threads
from portable_ckpt.errors import CheckpointError, CheckpointExistsError, CheckpointInputError
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import manifest as _manifest
from portable_ckpt.format import pt as _pt
from portable_ckpt.format import rng as _rng
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.format import schemas as _schemas
from portable_ckpt.format.hashing import checksum
from portable_ckpt.quant import quantize as _quant
from portable_ckpt.state import Stateful, model_state
from portable_ckpt.storage import local as _layout

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
QUANT_FILE = "quantization_metadata.json"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a checkpoint holds, captured at one moment; written later by ``write``."""

    step: int
    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    scaler: dict[str, Any] | None
    config: dict[str, Any]
    vocab: list[str] | dict[str, int] | None
    extra: dict[str, Any] | None
    quantization: dict[str, Any] | None
    rng_tensors: dict[str, torch.Tensor]
    rng_doc: dict[str, Any] | None
    rng_sources: list[str]


def _json_object(value: Any, name: str) -> dict[str, Any]:
    doc = _jsonio.to_json_value(value, name)
    if not isinstance(doc, dict):
        raise CheckpointInputError(f"{name} must be a dict or a dataclass instance, not {type(value).__name__}")
    return doc


def _vocab(vocab: Any) -> list[str] | dict[str, int] | None:
    if vocab is None:
        return None
    doc = _jsonio.to_json_value(vocab, "vocab")
    try:
        _schemas.validate(doc, "vocab", "vocab")
    except CheckpointError as e:
        raise CheckpointInputError(f"{e}; vocab must be a list[str] or a dict[str, int] of ids >= 0") from None
    return doc


def _host_copy(state: Any, pool: dict[str, torch.Tensor], key: str) -> Any:
    """A deep copy with every tensor copied into host buffers kept in ``pool`` under ``key``.

    Buffers are reused by the next snapshot with the same names, shapes and dtypes, so repeated
    asynchronous saves copy into memory that is already mapped (and, for CUDA, pinned). CUDA
    copies are asynchronous; the caller synchronizes once.
    """
    if isinstance(state, torch.Tensor):
        t = state.detach()
        buf = pool.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
            pool[key] = buf
        return buf.copy_(t, non_blocking=t.device.type == "cuda")
    if isinstance(state, dict):
        return {k: _host_copy(v, pool, f"{key}/{k}") for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_host_copy(v, pool, f"{key}/{i}") for i, v in enumerate(state))
    return state


def snapshot(
    model: nn.Module | Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    config: Any,
    vocab: Any,
    step: int,
    *,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    extra: Any = None,
    pool: dict[str, torch.Tensor] | None = None,
) -> Snapshot:
    """Capture the state. Given a buffer ``pool``, every tensor is copied into it, so training may go on
    while the snapshot is written; without one, the snapshot refers to the live tensors."""
    if type(step) is not int or step < 0:
        raise CheckpointInputError(f"step must be an int >= 0, found {step!r}")
    tensors, aliases = model_state(model)
    for name, t in tensors.items():
        _safetensors.dtype_name(t, name)  # an unsupported dtype fails at the call, not in a background write
    quant = _quant.quantization_metadata(model) if isinstance(model, nn.Module) else None
    rng_tensors, rng_doc, rng_sources = _rng.capture()
    states = [
        optimizer.state_dict() if optimizer is not None else None,
        scheduler.state_dict() if scheduler is not None else None,
        scaler.state_dict() if scaler is not None else None,
    ]
    if pool is not None:
        tensors = {k: _host_copy(v, pool, f"model/{k}") for k, v in tensors.items()}
        states = [_host_copy(s, pool, f"state{i}") for i, s in enumerate(states)]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the pinned copies above are asynchronous
    return Snapshot(
        step=step,
        tensors=tensors,
        aliases=aliases,
        optimizer=states[0],
        scheduler=states[1],
        scaler=states[2],
        config=_json_object(config, "config"),
        vocab=_vocab(vocab),
        extra=None if extra is None else _json_object(extra, "extra"),
        quantization=quant,
        rng_tensors=rng_tensors,
        rng_doc=rng_doc,
        rng_sources=rng_sources,
    )


def _write_contents(tmp: Path, snap: Snapshot) -> dict[str, dict[str, Any]]:
    """Write every file but the manifest. Each file is fsync'd on a helper thread as soon as it is
    written, so its writeback overlaps the serialization of the next; all syncs end before return."""
    files: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="portable-ckpt-fsync") as syncer:
        syncs = []

        def written(name: str, size: int, digest: str) -> None:
            files[name] = {"size": size, "checksum": digest}
            syncs.append(_threads.submit(syncer, _layout.fsync_path, tmp / name))

        result = _safetensors.write_file(tmp / MODEL_FILE, snap.tensors)
        written(MODEL_FILE, result.size, result.checksum)
        files[MODEL_FILE]["tensors"] = result.tensor_checksums
        for name, state in (
            (OPTIMIZER_FILE, snap.optimizer),
            (SCHEDULER_FILE, snap.scheduler),
            (SCALER_FILE, snap.scaler),
        ):
            if state is not None:
                f = _layout.create(tmp / name)
                try:
                    written(name, *_pt.save(f, state))  # type: ignore[arg-type]
                finally:
                    f.close()
        docs: dict[str, Any] = {CONFIG_FILE: snap.config, VOCAB_FILE: snap.vocab}
        if snap.rng_doc is not None:
            result = _safetensors.write_file(tmp / _rng.TENSOR_FILE, snap.rng_tensors)
            written(_rng.TENSOR_FILE, result.size, result.checksum)
            docs[_rng.JSON_FILE] = snap.rng_doc
        if snap.quantization is not None:
            _schemas.validate(snap.quantization, "quantization_metadata", QUANT_FILE)
            docs[QUANT_FILE] = snap.quantization
        for name, doc in docs.items():
            if doc is not None:
                data = _jsonio.dumps(doc)
                _layout.write_file(tmp / name, data, sync=False)
                written(name, len(data), checksum(data))
        for done in syncs:
            done.result()  # re-raises a failed fsync
    return files


def write(snap: Snapshot, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write a snapshot as ``<directory>/step-NNNNNNNN`` through a temporary directory and an atomic rename."""
    root = Path(directory)
    final = root / _layout.step_name(snap.step)
    if final.exists() and not overwrite:
        raise CheckpointExistsError(
            f"{final}: a checkpoint for step {snap.step} already exists; pass overwrite=True to replace it"
        )
    tmp: Path | None = None
    try:
        tmp = _layout.new_temp_dir(root, snap.step)
        files = _write_contents(tmp, snap)
        summary = _quant.manifest_summary(snap.quantization) if snap.quantization is not None else None
        doc = _manifest.build(
            step=snap.step,
            files=files,
            aliases=snap.aliases,
            rng=snap.rng_sources,
            quantization=summary,
            extra=snap.extra,
        )
        _layout.write_file(tmp / _manifest.MANIFEST, _manifest.encode(doc))
        final = _layout.commit(tmp, root, snap.step, overwrite=overwrite)
        tmp = None
        return final
    except CheckpointError:
        raise
    except OSError as e:
        raise _layout.as_write_error(e, f"saving step {snap.step} into {root}") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(
    model: nn.Module | Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    config: Any,
    vocab: Any,
    step: int,
    directory: str | os.PathLike[str] = "checkpoints",
    *,
    overwrite: bool = False,
    extra: Any = None,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
) -> Path:
    """Save one checkpoint as ``<directory>/step-<step:08d>/`` and return that path.

    Every file is written and fsync'd in a temporary sibling directory, the manifest last; the
    directory is then renamed into place and ``latest`` replaced. Nothing is written when an
    argument is invalid (a NaN in ``config``, a negative step).

    >>> save_checkpoint(model, optimizer, {"lr": 3e-4}, ["a", "b"], 100)  # doctest: +SKIP
    PosixPath('checkpoints/step-00000100')
    """
    snap = snapshot(model, optimizer, config, vocab, step, scheduler=scheduler, scaler=scaler, extra=extra)
    return write(snap, directory, overwrite=overwrite)
