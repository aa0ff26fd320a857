"""save_checkpoint: snapshot the training state, write it through the storage seam, commit."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from portable_ckpt import threads as _threads
from portable_ckpt.errors import CheckpointError, CheckpointInputError
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import layout as _layout
from portable_ckpt.format import manifest as _manifest
from portable_ckpt.format import names
from portable_ckpt.format import pt as _pt
from portable_ckpt.format import rng as _rng
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.format import schemas as _schemas
from portable_ckpt.format import states as _states
from portable_ckpt.format.hashing import checksum
from portable_ckpt.quant import quantize as _quant
from portable_ckpt.reuse import Source, Stats, open_source
from portable_ckpt.root import display
from portable_ckpt.state import Stateful, model_state, unwrap
from portable_ckpt.storage import Staging, Storage, WriteFile, storage_for
from portable_ckpt.storage.base import write_error


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
    states_doc: dict[str, Any] | None = None
    states_tensors: dict[str, torch.Tensor] | None = None
    parts: tuple[tuple[str, ...], ...] | None = None  # incremental (format_version 3): the model parts' tensors


def _json_object(value: Any, name: str) -> dict[str, Any]:
    doc = _jsonio.to_json_value(value, name)
    if not isinstance(doc, dict):
        raise CheckpointInputError(f"{name} must be a dict or a dataclass instance, not {type(value).__name__}")
    _within_limit(doc, name)
    return doc


def _within_limit(doc: Any, name: str) -> None:
    """The reader refuses JSON documents over its limit: so does the writer, at the call."""
    size = len(_jsonio.dumps(doc))
    if size > _jsonio.MAX_JSON_BYTES:
        raise CheckpointInputError(
            f"{name} is {size:,} bytes as JSON, over the format's limit of {_jsonio.MAX_JSON_BYTES:,} bytes for one "
            "JSON document; store large data as tensors (model state) or outside the checkpoint"
        )


def as_step(step: Any) -> int:
    """The step as a plain int: an int, a NumPy integer or a 0-d integer tensor; never a float or a bool."""
    value = step
    if isinstance(step, torch.Tensor) and step.dim() == 0 and not step.is_floating_point() and not step.is_complex():
        value = step.item()
    elif type(step).__module__ == "numpy" and hasattr(step, "dtype") and step.dtype.kind in "iu" and step.ndim == 0:
        value = int(step)
    if type(value) is not int or value < 0:
        raise CheckpointInputError(
            f"step must be an integer >= 0 (int, NumPy integer or 0-d integer tensor), found {step!r}; "
            "pass the number of optimizer steps taken"
        )
    return value


def _vocab(vocab: Any) -> list[str] | dict[str, int] | None:
    if vocab is None:
        return None
    if callable(getattr(vocab, "get_vocab", None)):  # a tokenizer (Hugging Face and others): its token -> id map
        vocab = vocab.get_vocab()
    doc = _jsonio.to_json_value(vocab, "vocab")
    try:
        _schemas.validate(doc, "vocab", "vocab")
    except CheckpointError as e:
        raise CheckpointInputError(f"{e}; vocab must be a list[str] or a dict[str, int] of ids >= 0") from None
    _within_limit(doc, "vocab")
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
    states: Mapping[str, Any] | None = None,
    pool: dict[str, torch.Tensor] | None = None,
    incremental: bool = False,
    part_bytes: int = _layout.PART_BYTES,
) -> Snapshot:
    """Capture the state. Given a buffer ``pool``, every tensor is copied into it, so training may go on
    while the snapshot is written; without one, the snapshot refers to the live tensors. ``incremental``
    splits the model state into frozen and trainable parts (format_version 3, format_spec §21.2)."""
    step = as_step(step)
    tensors, aliases = model_state(model)
    parts = None
    if incremental:
        if type(part_bytes) is not int or part_bytes < 1:
            raise CheckpointInputError(f"part_bytes must be an int >= 1, found {part_bytes!r}")
        trainable = _layout.trainable_names(unwrap(model) if isinstance(model, nn.Module) else model, list(tensors))
        parts = tuple(tuple(p) for p in _layout.split(tensors, trainable, part_bytes))
    for name, t in tensors.items():
        _safetensors.dtype_name(t, name)  # an unsupported dtype fails at the call, not in a background write
    quant = _quant.quantization_metadata(model) if isinstance(model, nn.Module) else None
    rng_tensors, rng_doc, rng_sources = _rng.capture()
    states_doc, states_tensors = _states.encode(states) if states else (None, None)
    if states_doc is not None:
        try:
            _schemas.validate(states_doc, "states", "states")
        except CheckpointError as e:
            raise CheckpointInputError(f"{e}; see the states encoding in format_spec/README.md") from None
        _within_limit(states_doc, "states")
        for name, t in (states_tensors or {}).items():
            _safetensors.dtype_name(t, name)
    pt_states = [
        optimizer.state_dict() if optimizer is not None else None,
        scheduler.state_dict() if scheduler is not None else None,
        scaler.state_dict() if scaler is not None else None,
    ]
    for what, state in zip(("optimizer", "scheduler", "scaler"), pt_states, strict=True):
        if state is not None:
            _pt.check_state(state, what)  # at the call, also for a background save
    if pool is not None:
        tensors = {k: _host_copy(v, pool, f"model/{k}") for k, v in tensors.items()}
        pt_states = [_host_copy(s, pool, f"state{i}") for i, s in enumerate(pt_states)]
        if states_tensors:
            states_tensors = _host_copy(states_tensors, pool, "states")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the pinned copies above are asynchronous
    return Snapshot(
        step=step,
        tensors=tensors,
        aliases=aliases,
        optimizer=pt_states[0],
        scheduler=pt_states[1],
        scaler=pt_states[2],
        config=_json_object(config, "config"),
        vocab=_vocab(vocab),
        extra=None if extra is None else _json_object(extra, "extra"),
        quantization=quant,
        rng_tensors=rng_tensors,
        rng_doc=rng_doc,
        rng_sources=rng_sources,
        states_doc=states_doc,
        states_tensors=states_tensors,
        parts=parts,
    )


def _write_contents(
    staging: Staging, snap: Snapshot, source: Source | None = None, stats: Stats | None = None
) -> dict[str, dict[str, Any]]:
    """Write every file but the manifest. Files are written on ``threads.io_threads()`` threads (the
    model and the optimizer state at once, where there are cores for both), each synced on a helper
    thread as soon as it is written, so its writeback overlaps the rest; all end before return."""
    files: dict[str, dict[str, Any]] = {}
    threads = _threads.io_threads()
    with (
        ThreadPoolExecutor(max_workers=4, thread_name_prefix="portable-ckpt-fsync") as syncer,
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="portable-ckpt-write") as writer,
    ):
        syncs = []
        writes = []

        def write_one(name: str, encode: Callable[[Any], tuple[int, str]]) -> None:
            f = staging.create(name)
            try:
                size, digest = encode(f)
            finally:
                f.close()
            files[name] = {"size": size, "checksum": digest}
            syncs.append(_threads.submit(syncer, staging.sync, name))

        def put(name: str, encode: Callable[[Any], tuple[int, str]]) -> None:
            if threads > 1:
                writes.append(_threads.submit(writer, write_one, name, encode))
            else:
                write_one(name, encode)

        tensor_checksums: dict[str, dict[str, str]] = {}

        def model(f: Any, name: str, tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
            result = _safetensors.write(f, tensors)
            tensor_checksums[name] = result.tensor_checksums
            return result.size, result.checksum

        def part(name: str, tensors: dict[str, torch.Tensor]) -> None:
            entry = source.reuse(staging, name, tensors) if source is not None else None
            if entry is None:
                write_one(name, functools.partial(model, name=name, tensors=tensors))
                if stats is not None:
                    stats.written.append(name)
                return
            files[name] = entry
            if stats is not None:
                stats.reused.append(name)
                stats.sizes[name] = entry["size"]

        if snap.parts is None:
            model_files = {names.MODEL: snap.tensors}
        else:
            model_files = {
                _layout.part_name(i, len(snap.parts)): {k: snap.tensors[k] for k in tensors}
                for i, tensors in enumerate(snap.parts)
            }

        # the largest files first, so that they start together
        for name, state in zip(names.PT_FILES, (snap.optimizer, snap.scheduler, snap.scaler), strict=True):
            if state is not None and name == names.OPTIMIZER:
                put(name, functools.partial(_pt_file, state=state, what=name.removesuffix(".pt")))
        for name, tensors in model_files.items():
            if threads > 1:
                writes.append(_threads.submit(writer, part, name, tensors))
            else:
                part(name, tensors)
        for name, state in zip(names.PT_FILES, (snap.optimizer, snap.scheduler, snap.scaler), strict=True):
            if state is not None and name != names.OPTIMIZER:
                put(name, functools.partial(_pt_file, state=state, what=name.removesuffix(".pt")))
        docs: dict[str, Any] = {names.CONFIG: snap.config, names.VOCAB: snap.vocab}
        if snap.rng_doc is not None:
            put(names.RNG_TENSORS, lambda f: _sizes(_safetensors.write(f, snap.rng_tensors)))
            docs[names.RNG_JSON] = snap.rng_doc
        if snap.states_doc is not None:
            put(names.STATES_TENSORS, lambda f: _sizes(_safetensors.write(f, snap.states_tensors or {})))
            docs[names.STATES_JSON] = snap.states_doc
        if snap.quantization is not None:
            _schemas.validate(snap.quantization, "quantization_metadata", names.QUANTIZATION)
            docs[names.QUANTIZATION] = snap.quantization
        for name, doc in docs.items():
            if doc is not None:
                put(name, functools.partial(_json_file, data=_jsonio.dumps(doc)))
        for done in writes:
            done.result()  # re-raises a failed write
        for done in syncs:
            done.result()  # re-raises a failed sync
        for name, table in tensor_checksums.items():
            files[name]["tensors"] = table
    return dict(sorted(files.items()))


def _sizes(result: _safetensors.WriteResult) -> tuple[int, str]:
    return result.size, result.checksum


def _pt_file(f: WriteFile, *, state: Any, what: str) -> tuple[int, str]:
    return _pt.save(f, state, what=what)  # type: ignore[arg-type]


def _json_file(f: WriteFile, *, data: bytes) -> tuple[int, str]:
    return _write_all(f, data), checksum(data)


def _write_all(f: WriteFile, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[f.write(view) :]
    return len(data)


def write(
    snap: Snapshot, directory: str | os.PathLike[str] | Storage, *, overwrite: bool = False, stats: Stats | None = None
) -> Path | str:
    """Write a snapshot as ``<directory>/step-NNNNNNNN`` and commit it by the storage's strategy
    (a temporary directory renamed into place, or the manifest written last). An incremental snapshot
    reuses the unchanged model parts of the root's newest committed checkpoint (format_spec §21.3); ``stats``
    collects which."""
    root = storage_for(directory)
    staging: Staging | None = None
    source = open_source(root) if snap.parts is not None else None
    try:
        staging = root.stage(names.step_name(snap.step), overwrite=overwrite)
        files = _write_contents(staging, snap, source, stats)
        summary = _quant.manifest_summary(snap.quantization) if snap.quantization is not None else None
        doc = _manifest.build(
            step=snap.step,
            files=files,
            aliases=snap.aliases,
            rng=snap.rng_sources,
            quantization=summary,
            extra=snap.extra,
            version=_manifest.FORMAT_VERSION if snap.parts is None else _manifest.INCREMENTAL_FORMAT_VERSION,
        )
        f = staging.create(names.MANIFEST)
        try:
            _write_all(f, _manifest.encode(doc))
        finally:
            f.close()
        staging.sync(names.MANIFEST)
        location = staging.commit()
        staging = None
        return display(storage_for(location))
    except CheckpointError:
        raise
    except OSError as e:
        raise write_error(e, f"saving step {snap.step} into {root.location}") from e
    finally:
        if staging is not None:
            staging.abort()
        if source is not None:
            source.close()


def save_checkpoint(
    model: nn.Module | Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    config: Any,
    vocab: Any,
    step: int,
    directory: str | os.PathLike[str] | Storage = "checkpoints",
    *,
    overwrite: bool = False,
    extra: Any = None,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    states: Mapping[str, Any] | None = None,
    incremental: bool = False,
    part_bytes: int = _layout.PART_BYTES,
) -> Path | str:
    """Save one checkpoint as ``<directory>/step-<step:08d>/`` and return that path.

    Every file is written and fsync'd in a temporary sibling directory, the manifest last; the
    directory is then renamed into place and ``latest`` replaced. Nothing is written when an
    argument is invalid (a NaN in ``config``, a negative step).

    Under an initialized process group every rank calls it with its own (possibly sharded) model and
    optimizer, and one sharded checkpoint is written (format_version 2; README "Distributed training").

    ``states`` maps names to objects whose ``state_dict()`` is saved too (a ``StatefulDataLoader``, a
    sampler, an EMA, a callback) and to ``torch.Generator`` objects (their state): pickle-free, in
    ``states.json`` and ``states.safetensors``; ``load_checkpoint(..., states=...)`` restores them.

    ``incremental=True`` writes the model state in frozen and trainable parts of at most ``part_bytes``
    (format_version 3) and hard-links (or, on object stores, copies server-side) every part whose tensors
    are unchanged since the root's newest committed checkpoint, instead of writing it (README "Incremental saves").

    >>> save_checkpoint(model, optimizer, {"lr": 3e-4}, ["a", "b"], 100)  # doctest: +SKIP
    PosixPath('checkpoints/step-00000100')
    """
    incremental = incremental_option(incremental)
    if distributed():  # every rank calls this: one sharded checkpoint through DCP (format_spec §20)
        from portable_ckpt.dcp import collective

        return collective.save(
            model,  # type: ignore[arg-type]
            optimizer,
            config,
            vocab,
            step,
            directory,
            overwrite=overwrite,
            extra=extra,
            scheduler=scheduler,
            scaler=scaler,
            states=states,
        )
    snap = snapshot(
        model,
        optimizer,
        config,
        vocab,
        step,
        scheduler=scheduler,
        scaler=scaler,
        extra=extra,
        states=states,
        incremental=incremental,
        part_bytes=part_bytes,
    )
    return write(snap, directory, overwrite=overwrite)


def incremental_option(incremental: Any) -> bool:
    """``incremental=``: True or False, and True only without a process group (an incremental checkpoint,
    format_version 3, is one process's; under a process group every save is sharded)."""
    if type(incremental) is not bool:
        raise CheckpointInputError(f"incremental must be True or False, found {incremental!r}")
    if incremental and distributed():
        raise CheckpointInputError(
            "incremental=True is for one process (format_version 3); under a process group every save is "
            "sharded (format_version 2): pass incremental=False"
        )
    return incremental


def distributed() -> bool:
    """A default process group is initialized: saves and loads are collective."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()
