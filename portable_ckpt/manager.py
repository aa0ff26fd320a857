"""CheckpointManager: a checkpoints root with retention, resume and asynchronous saves."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from portable_ckpt import save as _save
from portable_ckpt.errors import CheckpointInputError, CheckpointNotFoundError, CheckpointWriteError
from portable_ckpt.load import load_checkpoint
from portable_ckpt.state import Stateful
from portable_ckpt.storage import local as _layout
from portable_ckpt.types import Checkpoint


class SaveHandle:
    """A save running in the background: ``done()``, ``wait()`` (re-raises its error), ``result()``."""

    def __init__(self, future: Future[Path]) -> None:
        self._future = future
        self.observed = False  # an error seen here is not raised again by the manager

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> None:
        self.result(timeout)

    def result(self, timeout: float | None = None) -> Path:
        try:
            return self._future.result(timeout)
        finally:
            self.observed = self._future.done()


def _lower_priority() -> None:
    """Background saves yield the CPU to training (Linux nice is per thread; helper threads inherit it)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _count(value: int | None, name: str) -> int | None:
    if value is not None and (type(value) is not int or value < 1):
        raise CheckpointInputError(f"{name} must be None or an int >= 1, found {value!r}")
    return value


class CheckpointManager:
    """Saves numbered checkpoints under ``root``, keeps the ones retention asks for, restores the newest.

    ``keep_last=N`` keeps the N newest; ``keep_every=K`` also keeps every step divisible by K. The
    newest committed checkpoint is never deleted. Opening a root removes temporaries left behind by
    crashed saves.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] = "checkpoints",
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.keep_last = _count(keep_last, "keep_last")
        self.keep_every = _count(keep_every, "keep_every")
        self.root.mkdir(parents=True, exist_ok=True)
        _layout.clean_temporaries(self.root)
        self._executor: ThreadPoolExecutor | None = None
        self._pending: SaveHandle | None = None
        self._lock = threading.Lock()
        # host buffers of the last non-blocking save, reused by the next (the previous write is over by then)
        self._staging: dict[str, torch.Tensor] = {}

    def latest(self) -> Path | None:
        """The newest committed checkpoint directory, or None."""
        return _layout.read_latest(self.root)

    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        return _layout.committed_steps(self.root)

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
        blocking: bool = True,
    ) -> Any:
        """Save ``step``; returns its path, or with ``blocking=False`` a SaveHandle.

        A non-blocking save copies the state to host memory before returning, so training may
        update the parameters at once; the write and the commit run in a background thread, one
        save at a time.
        """
        self.wait()
        steps = self.steps()
        if steps and type(step) is int and step <= steps[-1]:
            raise CheckpointInputError(
                f"step {step} is not after the newest checkpoint in {self.root} (step {steps[-1]}); "
                "saved steps must keep increasing"
            )
        pool = None if blocking else self._staging
        snap = _save.snapshot(
            model, optimizer, config, vocab, step, scheduler=scheduler, scaler=scaler, extra=extra, pool=pool
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

    def _write(self, snap: _save.Snapshot) -> Path:
        path = _save.write(snap, self.root)
        try:
            self._retain()
        except OSError as e:
            raise CheckpointWriteError(
                e.errno, f"{path} was committed, but removing older checkpoints failed: {e.strerror or e}"
            ) from e
        return path

    def wait(self) -> None:
        """Block until a pending background save has committed; re-raise its error if it failed."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None and not pending.observed:
            pending.result()

    def _retain(self) -> None:
        if self.keep_last is None:
            return
        with _layout.locked(self.root):
            steps = _layout.committed_steps(self.root)
            keep = set(steps[-self.keep_last :])
            if self.keep_every is not None:
                keep |= {s for s in steps if s % self.keep_every == 0}
            for step in steps[:-1]:
                if step not in keep:
                    _layout.delete(self.root, step)

    def restore(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        scheduler: Stateful | None = None,
        scaler: Stateful | None = None,
        step: int | None = None,
        restore_rng: bool = True,
        map_location: Any = "cpu",
        strict: bool = True,
        verify: bool = True,
    ) -> Checkpoint | None:
        """Load the newest committed checkpoint (or ``step``) into the given objects; None if there is none."""
        self.wait()
        if step is None:
            path = self.latest()
            if path is None:
                return None
        else:
            path = self.root / _layout.step_name(step)
            if not (path / "manifest.json").is_file():
                raise CheckpointNotFoundError(f"{path}: no committed checkpoint for step {step}; have {self.steps()}")
        return load_checkpoint(
            path,
            model,
            optimizer,
            scheduler=scheduler,
            scaler=scaler,
            map_location=map_location,
            strict=strict,
            verify=verify,
            restore_rng=restore_rng,
        )

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
