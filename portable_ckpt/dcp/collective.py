"""``save_checkpoint`` and ``load_checkpoint`` under a process group: every rank calls them, one checkpoint.

Model and optimizer state come from ``torch.distributed.checkpoint.state_dict`` (FSDP2, DTensor
tensor parallelism, DDP and plain modules alike) and go through DCP with our storage writer and
reader; DCP's planner deduplicates replicated tensors and reshards on load. What differs per rank
(the RNG state, ``states=`` objects such as a data loader) is kept per rank. Rank 0 writes the shared
files (config, vocab, scheduler, scaler). Checks that can fail run on every rank and are agreed on
with one collective first, so a bad argument on one rank fails every rank instead of hanging them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from portable_ckpt import errors as _errors
from portable_ckpt import save as _save
from portable_ckpt.dcp.reader import PortableStorageReader
from portable_ckpt.dcp.writer import FileEntries, PortableStorageWriter, write_bytes, write_tensors
from portable_ckpt.errors import CheckpointError, CheckpointInputError, StateMismatchError
from portable_ckpt.files import CheckpointFiles
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import names
from portable_ckpt.format import pt as _pt
from portable_ckpt.format import rng as _rng
from portable_ckpt.format import sharding as _sharding
from portable_ckpt.quant import quantize as _quant
from portable_ckpt.restore import restore_state
from portable_ckpt.root import display, resolve
from portable_ckpt.sharded import ShardedFiles, is_sharded, read_rank_files, read_sharded, to_names
from portable_ckpt.state import Stateful, load_into
from portable_ckpt.storage import Storage, storage_for
from portable_ckpt.storage.base import Joined, Staging
from portable_ckpt.types import Checkpoint

T = TypeVar("T")


def active() -> bool:
    """A default process group is initialized: saves and loads are collective."""
    return dist.is_available() and dist.is_initialized()


def agree(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raised anywhere, raise on every rank (one all-gather)."""
    failure: CheckpointError | None = None
    result: Any = None
    try:
        result = fn()
    except CheckpointError as e:
        failure = e
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, None if failure is None else _report(failure))
    if failure is not None:
        raise failure
    for rank, report in enumerate(reports):
        if report is not None:
            raise _remote_error(rank, *report)
    return result


def _report(e: CheckpointError) -> tuple[str, str, int | None, str | None]:
    message = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return type(e).__name__, message, e.errno if isinstance(e, OSError) else None, e.file


def _remote_error(rank: int, kind: str, message: str, errno: int | None, file: str | None) -> CheckpointError:
    """Another rank's error, rebuilt here: its class, errno and file; the message names the rank once."""
    cls = getattr(_errors, kind, CheckpointError)
    if not (isinstance(cls, type) and issubclass(cls, CheckpointError)):
        cls = CheckpointError
    text = message if message.startswith(f"rank {rank}: ") else f"rank {rank}: {message}"
    if issubclass(cls, OSError):
        return cls(errno or 0, text, file=file)
    return cls(text, file=file)


def from_failures(e: CheckpointException, what: str) -> CheckpointError:
    """DCP's exception of a failed collective step as the library's error, naming the rank that failed."""
    rank, wrapped = min(e.failures.items())
    original = wrapped[0] if isinstance(wrapped, tuple) else wrapped
    if isinstance(original, CheckpointError):
        return _remote_error(rank, *_report(original))
    return _errors.CheckpointWriteError(0, f"rank {rank}: {what}: {type(original).__name__}: {original}")


def _lost(e: RuntimeError, what: str) -> CheckpointError:
    """The process group itself failed (a rank died, a timeout): nothing was committed."""
    return _errors.CheckpointWriteError(
        0,
        f"rank {dist.get_rank()}: {what}: the process group failed ({type(e).__name__}: {e}); a rank died or timed "
        "out, nothing was committed",
    )


def _broadcast(value: T) -> T:
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def _mesh(state: Mapping[str, Any]) -> dict[str, Any] | None:
    for t in state.values():
        if isinstance(t, DTensor):
            mesh = t.device_mesh
            return {"shape": list(mesh.shape), "dim_names": list(mesh.mesh_dim_names or ())}
    return None


def save(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    config: Any,
    vocab: Any,
    step: int,
    directory: str | os.PathLike[str] | Storage,
    *,
    overwrite: bool,
    extra: Any,
    scheduler: Stateful | None,
    scaler: Stateful | None,
    states: Mapping[str, Any] | None,
    group: dist.ProcessGroup | None = None,
) -> Any:
    """The collective ``save_checkpoint`` (see the module docstring); returns the committed directory.

    Given ``group`` (a process group of its own), the save is asynchronous: it returns once the state
    is staged in host memory, with a ``concurrent.futures.Future`` of the directory."""

    def check() -> _save.Snapshot:
        if not isinstance(model, nn.Module):
            raise CheckpointInputError(
                f"under a process group, save_checkpoint takes the model (an nn.Module), not a "
                f"{type(model).__name__}: its state comes from torch.distributed.checkpoint.state_dict"
            )
        if _quant.quantization_metadata(model) is not None:
            raise CheckpointInputError(
                "a quantized model is saved by one process: call save_checkpoint on rank 0 only, outside the "
                "collective, or save the float model sharded"
            )
        # the model's own tensors are DCP's; everything else is checked as a one-process save checks it
        return _save.snapshot(
            {}, None, config, vocab, step, scheduler=scheduler, scaler=scaler, extra=extra, states=states
        )

    snap = agree(check)
    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [])
    state: dict[str, Any] = {"model": msd}
    if optimizer is not None:
        state["optimizer"] = osd

    def shared(sink: Joined | Staging, rank: int, world: int) -> FileEntries:
        files: FileEntries = {}
        for name, obj in ((names.SCHEDULER, snap.scheduler), (names.SCALER, snap.scaler)):
            if obj is not None:
                f = sink.create(name)
                try:
                    size, digest = _pt.save(f, obj, what=name.removesuffix(".pt"))  # type: ignore[arg-type]
                finally:
                    f.close()
                sink.sync(name)
                files[name] = {"size": size, "checksum": digest}
        return files

    def own(sink: Joined | Staging, rank: int, world: int) -> FileEntries:
        files: FileEntries = {}
        parts = (
            ("rng", snap.rng_doc, snap.rng_tensors),
            ("states", snap.states_doc, snap.states_tensors or {}),
        )
        for kind, doc, tensors in parts:
            if doc is None:
                continue
            name = _sharding.rank_file(kind, rank, world, "safetensors")
            written = write_tensors(sink, name, tensors)
            files[name] = {"size": written.size, "checksum": written.checksum}
            files |= write_bytes(sink, _sharding.rank_file(kind, rank, world, "json"), _jsonio.dumps(doc))
        return files

    writer = PortableStorageWriter(
        directory,
        snap.step,
        config=snap.config,
        vocab=snap.vocab,
        extra=snap.extra,
        overwrite=overwrite,
        mesh=_mesh(msd),
        rng_sources=snap.rng_sources,
        coordinator_files=shared,
        rank_files=own,
    )
    where = display(storage_for(directory).child(names.step_name(snap.step)))
    if group is None:
        try:
            dcp.save(state, storage_writer=writer)
        except CheckpointException as e:
            writer.abort()
            raise from_failures(e, f"saving step {snap.step}") from None
        except RuntimeError as e:  # gloo/nccl: a peer closed the connection, a collective timed out
            writer.abort()
            raise _lost(e, f"saving step {snap.step}") from e
        return where
    # DCP stages the state into host memory before returning; the write runs on a thread, its
    # collectives on ``group`` so that they never interleave with training's on the default group
    staged = dcp.async_save(state, storage_writer=writer, process_group=group)
    done: Future[Path | str] = Future()

    def finished(f: Any) -> None:
        try:
            f.result()
            done.set_result(where)
        except CheckpointException as e:
            writer.abort()
            done.set_exception(from_failures(e, f"saving step {snap.step}"))
        except BaseException as e:
            writer.abort()
            done.set_exception(e)

    staged.add_done_callback(finished)  # type: ignore[union-attr]
    return done


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [])
    return {"model": msd, **({"optimizer": osd} if optimizer is not None else {})}


def load(
    path: str | os.PathLike[str] | Storage,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    *,
    strict: bool,
    verify: bool,
    scheduler: Stateful | None,
    scaler: Stateful | None,
    states: Mapping[str, Any] | None,
    restore_rng: bool,
) -> Checkpoint:
    """The collective ``load_checkpoint``: every rank fills its own shards of ``model`` and ``optimizer``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    # rank 0 resolves `latest`, so every rank reads the same checkpoint even if a save commits meanwhile
    location: str = _broadcast(agree(lambda: resolve(path).location if rank == 0 else ""))
    directory = storage_for(location)
    files = agree(lambda: CheckpointFiles(directory, verify))
    try:
        if not is_sharded(files.manifest):
            return _load_unsharded(files, model, optimizer, strict=strict, scheduler=scheduler, scaler=scaler)
        if model is None and optimizer is None and not states:  # nothing to fill: the whole state, as read
            ckpt, _ = agree(lambda: read_sharded(files))
            for what, obj, st in (
                ("scheduler", scheduler, ckpt.scheduler_state),
                ("scaler", scaler, ckpt.scaler_state),
            ):
                if obj is not None:
                    load_into(obj, st, what, f"{files.location}/{what}.pt")
            return ckpt
        sharded = agree(lambda: ShardedFiles(files))
        with sharded:

            def check() -> tuple[dict[str, Any], Any, Any, Any, dict[str, Any]]:
                config = files.read_json(names.CONFIG, None) if names.CONFIG in files.entries else {}
                vocab = files.read_json(names.VOCAB, "vocab") if names.VOCAB in files.entries else None
                sched = files.read_pt(names.SCHEDULER, "cpu") if names.SCHEDULER in files.entries else None
                scal = files.read_pt(names.SCALER, "cpu") if names.SCALER in files.entries else None
                for what, obj, st in (("scheduler", scheduler, sched), ("scaler", scaler, scal)):
                    if obj is not None and st is None:
                        raise StateMismatchError(f"{files.location}: no {what} state was saved", file=files.location)
                own = read_rank_files(files, sharded.table, rank, world) if sharded.table.world_size == world else {}
                if states and "states" not in own:
                    raise StateMismatchError(
                        f"{files.location}: states were saved per rank by {sharded.table.world_size} rank(s); "
                        f"this job has {world}, so rank {rank} has no saved states to restore (nothing was modified)",
                        file=files.location,
                    )
                if model is not None and strict:
                    _check_keys(sharded, set(state["model"]), optimizer)
                return config, vocab, sched, scal, own

            state = _dcp_state(model, optimizer) if model is not None else {}
            config, vocab, sched, scal, own = agree(check)
            if model is not None:
                try:
                    dcp.load(state, storage_reader=_Reader(sharded))
                except CheckpointException as e:
                    raise from_failures(e, f"loading {files.location}") from None
                except RuntimeError as e:
                    raise _lost(e, f"loading {files.location}") from e
                set_state_dict(
                    model,
                    optimizer if optimizer is not None else [],
                    model_state_dict=state["model"],
                    optim_state_dict=state.get("optimizer", {}),
                    options=StateDictOptions(strict=strict),
                )
            for what, obj, st in (("scheduler", scheduler, sched), ("scaler", scaler, scal)):
                if obj is not None:
                    load_into(obj, st, what, f"{files.location}/{what}.pt")
            user_states = own["states"]["doc"]["decoded"] if "states" in own else {}
            for name, obj in (states or {}).items():
                restore_state(obj, user_states[name]["state"], f"states[{name!r}]", files.location)
            if restore_rng and "rng" in own:
                _rng.restore(own["rng"]["tensors"], own["rng"]["doc"])
            return Checkpoint(
                path=display(directory),
                format_version=files.manifest["format_version"],
                step=files.manifest["step"],
                config=config,
                vocab=vocab,
                model_state=state.get("model", {}),
                optimizer_state=state.get("optimizer"),
                quantization=None,
                manifest=files.manifest,
                extra=files.manifest.get("extra"),
                scheduler_state=sched,
                scaler_state=scal,
                states={n: e["state"] for n, e in user_states.items()},
            )
    finally:
        files.close()


class _Reader(PortableStorageReader):
    """The DCP reader over a checkpoint this rank already opened and checked."""

    def __init__(self, sharded: ShardedFiles) -> None:
        super().__init__(sharded.files.storage, verify=sharded.files.verify)
        self._sharded = sharded

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        pass

    def close(self) -> None:
        pass  # the caller closes what it opened


def _check_keys(sharded: ShardedFiles, own: set[str], optimizer: torch.optim.Optimizer | None) -> None:
    saved = set(sharded.table.tensors("model"))
    if saved != own:
        raise StateMismatchError(
            f"{sharded.files.location}: the model's keys differ from the checkpoint's: missing "
            f"{sorted(own - saved)[:10]}, unexpected {sorted(saved - own)[:10]} (nothing was modified); "
            "pass strict=False to load the keys both have",
            file=sharded.files.location,
        )
    if optimizer is not None and not any(e.path[0] == "optimizer" for e in sharded.table.entries.values()):
        raise StateMismatchError(f"{sharded.files.location}: no optimizer state was saved", file=sharded.files.location)


def _load_unsharded(
    files: CheckpointFiles,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    *,
    strict: bool,
    scheduler: Stateful | None,
    scaler: Stateful | None,
) -> Checkpoint:
    """A format-1 checkpoint into a (possibly sharded) model: every rank reads the full tensors and keeps its shards."""
    from portable_ckpt.load import read_checkpoint  # load imports this module lazily; no cycle at import time

    ckpt, _ = agree(lambda: read_checkpoint(files.storage, verify=files.verify))
    if model is not None:
        template = _dcp_state(model, optimizer).get("optimizer")
        optim_state = to_names(ckpt.optimizer_state, template, files.label(names.OPTIMIZER)) if template else {}
        set_state_dict(
            model,
            optimizer if optimizer is not None else [],
            model_state_dict=dict(ckpt.model_state),
            optim_state_dict=optim_state,
            options=StateDictOptions(full_state_dict=True, strict=strict),
        )
    for what, obj, st in (("scheduler", scheduler, ckpt.scheduler_state), ("scaler", scaler, ckpt.scaler_state)):
        if obj is not None:
            load_into(obj, st, what, f"{files.location}/{what}.pt")
    return ckpt
