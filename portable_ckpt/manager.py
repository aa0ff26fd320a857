"""CheckpointManager: a checkpoints root with retention, resume and asynchronous saves."""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import nn

from portable_ckpt import root as _root
from portable_ckpt import save as _save
from portable_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointInputError,
    CheckpointNotFoundError,
    CheckpointWriteError,
)
from portable_ckpt.format import names
from portable_ckpt.format.layout import PART_BYTES
from portable_ckpt.load import load_checkpoint
from portable_ckpt.root import display
from portable_ckpt.state import Stateful
from portable_ckpt.storage import Storage, storage_for
from portable_ckpt.types import Checkpoint


class SaveHandle:
    """A save running in the background, as ``CheckpointManager.save(..., blocking=False)`` returns it.

    ``done()`` says whether it has finished; ``result()`` waits and returns the committed checkpoint's
    path (or re-raises the save's error); ``wait()`` is ``result()`` without the path.
    """

    def __init__(self, future: Future[Path | str]) -> None:
        self._future = future
        self.observed = False  # an error seen here is not raised again by the manager

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> None:
        self.result(timeout)

    def result(self, timeout: float | None = None) -> Path | str:
        try:
            return self._future.result(timeout)
        finally:
            self.observed = self._future.done()


def _lower_priority() -> None:
    """Background saves yield the CPU to training (Linux nice is per thread; helper threads inherit it)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _step_of(storage: Storage) -> int:
    return names.step_of(storage.location.rstrip("/").rsplit("/", 1)[-1]) or 0


def _count(value: int | None, name: str) -> int | None:
    if value is not None and (type(value) is not int or value < 1):
        raise CheckpointInputError(f"{name} must be None or an int >= 1, found {value!r}")
    return value


class CheckpointManager:
    """Saves numbered checkpoints under ``root``, keeps the ones retention asks for, restores the newest.

    ``keep_last=N`` keeps the N newest; ``keep_every=K`` also keeps every step divisible by K. The
    newest committed checkpoint is never deleted. Opening a root removes temporaries left behind by
    crashed saves. ``incremental=True`` makes every save incremental (format_version 3): model parts
    unchanged since the previous checkpoint are hard-linked (or copied server-side) instead of written,
    and retention may still delete any checkpoint (``save_checkpoint``'s ``incremental``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | Storage = "checkpoints",
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        incremental: bool = False,
        part_bytes: int = PART_BYTES,
    ) -> None:
        self.incremental = _save.incremental_option(incremental)
        self.part_bytes = part_bytes
        self.storage = storage_for(root)
        self.root = display(self.storage)
        self.keep_last = _count(keep_last, "keep_last")
        self.keep_every = _count(keep_every, "keep_every")
        self._group: Any = None  # under a process group: the group of background saves' collectives
        self._distributed = _save.distributed()
        if not self._distributed or torch.distributed.get_rank() == 0:
            self.storage.make_root()
            self.storage.clean()
        if self._distributed:
            torch.distributed.barrier()  # no rank saves before rank 0 has cleaned
        self._executor: ThreadPoolExecutor | None = None
        self._pending: SaveHandle | None = None
        self._lock = threading.Lock()
        # host buffers of the last non-blocking save, reused by the next (the previous write is over by then)
        self._staging: dict[str, torch.Tensor] = {}
        self.skipped: list[tuple[str, str]] = []  # what the last restore(fall_back=True) skipped, and why

    def latest(self) -> Path | str | None:
        """The newest committed checkpoint directory, or None."""
        found = _root.latest(self.storage)
        return None if found is None else display(found)

    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        return _root.committed_steps(self.storage)

    @overload
    def save(
        self,
        model: nn.Module | Mapping[str, torch.Tensor],
        optimizer: torch.optim.Optimizer | None,
        config: Any,
        vocab: Any,
        step: int,
        *,
        scheduler: Stateful | None = ...,
        scaler: Stateful | None = ...,
        extra: Any = ...,
        states: Mapping[str, Any] | None = ...,
        blocking: Literal[True] = ...,
    ) -> Path | str: ...

    @overload
    def save(
        self,
        model: nn.Module | Mapping[str, torch.Tensor],
        optimizer: torch.optim.Optimizer | None,
        config: Any,
        vocab: Any,
        step: int,
        *,
        scheduler: Stateful | None = ...,
        scaler: Stateful | None = ...,
        extra: Any = ...,
        states: Mapping[str, Any] | None = ...,
        blocking: Literal[False],
    ) -> SaveHandle: ...

    @overload
    def save(
        self,
        model: nn.Module | Mapping[str, torch.Tensor],
        optimizer: torch.optim.Optimizer | None,
        config: Any,
        vocab: Any,
        step: int,
        *,
        scheduler: Stateful | None = ...,
        scaler: Stateful | None = ...,
        extra: Any = ...,
        states: Mapping[str, Any] | None = ...,
        blocking: bool,
    ) -> Path | str | SaveHandle: ...

    def save(
        self,
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
        blocking: bool = True,
    ) -> Path | str | SaveHandle:
        """Save ``step``; returns its path, or with ``blocking=False`` a SaveHandle.

        A non-blocking save copies the state to host memory before returning, so training may
        update the parameters at once; the write and the commit run in a background thread, one
        save at a time.
        """
        self.wait()
        steps = self.steps()
        step = _save.as_step(step)
        if steps and step <= steps[-1]:
            raise CheckpointInputError(
                f"step {step} is not after the newest checkpoint in {self.storage.location} (step {steps[-1]}); "
                "saved steps must keep increasing. To continue from an earlier step (after restore(step=N)), "
                "call drop_after(N) to delete the newer checkpoints, or save into a new root"
            )
        if self._distributed:
            return self._save_collective(
                model, optimizer, config, vocab, step, scheduler, scaler, extra, states, blocking=blocking
            )
        pool = None if blocking else self._staging
        snap = _save.snapshot(
            model,
            optimizer,
            config,
            vocab,
            step,
            scheduler=scheduler,
            scaler=scaler,
            extra=extra,
            states=states,
            pool=pool,
            incremental=self.incremental,
            part_bytes=self.part_bytes,
        )
        if blocking:
            return self._write(snap)
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="portable-ckpt-save", initializer=_lower_priority
                )
            self._pending = SaveHandle(self._executor.submit(self._write, snap))
            return self._pending

    def _save_collective(
        self,
        model: Any,
        optimizer: torch.optim.Optimizer | None,
        config: Any,
        vocab: Any,
        step: int,
        scheduler: Stateful | None,
        scaler: Stateful | None,
        extra: Any,
        states: Mapping[str, Any] | None,
        *,
        blocking: bool,
    ) -> Path | str | SaveHandle:
        """Every rank saves its shards (dcp/collective.py); rank 0 applies retention after the commit."""
        from portable_ckpt.dcp import collective

        if not blocking and self._group is None:
            self._group = torch.distributed.new_group(backend="gloo")  # collective: every rank creates it
        result = collective.save(
            model,
            optimizer,
            config,
            vocab,
            step,
            self.storage,
            overwrite=False,
            extra=extra,
            scheduler=scheduler,
            scaler=scaler,
            states=states,
            group=None if blocking else self._group,
        )
        if blocking:
            return self._retained(result)
        future: Future[Path | str] = Future()

        def committed(f: Future[Path | str]) -> None:
            try:
                future.set_result(self._retained(f.result()))
            except BaseException as e:
                future.set_exception(e)

        result.add_done_callback(committed)
        with self._lock:
            self._pending = SaveHandle(future)
            return self._pending

    def _retained(self, path: Path | str) -> Path | str:
        if self._distributed and torch.distributed.get_rank() != 0:
            return path
        try:
            self._retain()
        except OSError as e:
            raise CheckpointWriteError(
                e.errno,
                f"{path} was committed, but removing older checkpoints failed: {e.strerror or e}",
                file=str(path),
            ) from e
        return path

    def _write(self, snap: _save.Snapshot) -> Path | str:
        return self._retained(_save.write(snap, self.storage))

    def wait(self) -> None:
        """Block until a pending background save has committed; re-raise its error if it failed."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None and not pending.observed:
            pending.result()

    def _retain(self) -> None:
        _root.retain(self.storage, keep_last=self.keep_last, keep_every=self.keep_every)

    def drop_after(self, step: int) -> list[int]:
        """Delete every committed checkpoint after ``step`` (to branch from it); returns the steps deleted.

        Nothing is deleted unless asked: this is the one call that removes newer checkpoints.
        ``latest`` then names the newest remaining one.
        """
        self.wait()
        step = _save.as_step(step)
        with self.storage.locked():
            doomed = [s for s in self.steps() if s > step]
            for s in reversed(doomed):
                self.storage.remove(names.step_name(s))
            _root.point_latest(self.storage)
        return doomed

    def restore(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        scheduler: Stateful | None = None,
        scaler: Stateful | None = None,
        states: Mapping[str, Any] | None = None,
        step: int | None = None,
        restore_rng: bool = True,
        map_location: Any = "cpu",
        strict: bool = True,
        verify: bool = True,
        fall_back: bool = False,
    ) -> Checkpoint | None:
        """Load the newest committed checkpoint (or ``step``) into the given objects; None if there is none.

        With ``fall_back=True``, a newest checkpoint that is damaged or missing files
        (``CheckpointCorruptedError``, ``CheckpointNotFoundError``) is skipped for the next older one, and so
        on: each skipped one is reported with ``warnings.warn`` and listed in ``self.skipped`` as (path, error).
        The objects then hold the state of the checkpoint that loaded, even if a skipped one had already
        filled some of the model's tensors with unverified values before its checksum failed.
        """
        self.wait()
        self.skipped = []
        if step is None:
            found = _root.latest(self.storage)
            if found is None:
                return None
        else:
            found = self.storage.child(names.step_name(step))
            if found.kind(names.MANIFEST) != "file":
                raise CheckpointNotFoundError(
                    f"{found.location}: no committed checkpoint for step {step}; have {self.steps()}",
                    file=found.location,
                )
        older = [s for s in reversed(self.steps()) if s < (_step_of(found) if fall_back else -1)]
        while True:
            try:
                return load_checkpoint(
                    found,
                    model,
                    optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    states=states,
                    map_location=map_location,
                    strict=strict,
                    verify=verify,
                    restore_rng=restore_rng,
                )
            except (CheckpointCorruptedError, CheckpointNotFoundError) as e:
                if not older:
                    raise
                self.skipped.append((found.location, f"{type(e).__name__}: {e}"))
                warnings.warn(
                    f"skipped {found.location}: {type(e).__name__}: {e}; trying step {older[0]}", stacklevel=2
                )
                found = self.storage.child(names.step_name(older.pop(0)))

    def close(self) -> None:
        """Finish any pending save and stop the background thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
