"""Faults through the storage seam: the in-memory backend fails the n-th operation of a save (no ``os``
patching), under either commit strategy; the root must then hold exactly what it held before."""

from __future__ import annotations

import errno

import portable_ckpt as pc
from faults.states import save_step, state_problems
from portable_ckpt.storage import MemoryStorage
from portable_ckpt.storage.memory import STORE, Faults

STRATEGIES = ("manifest-last", "rename")
ERRNOS = (errno.ENOSPC, errno.EIO, errno.EDQUOT)


def _root(strategy: str) -> MemoryStorage:
    return MemoryStorage.from_location("memory://stress-root", commit=strategy)  # type: ignore[arg-type]


def save_operations(strategy: str) -> list[str]:
    """The storage operations of the second save into a root (its first save done), in order."""
    STORE.reset()
    root = _root(strategy)
    save_step(root, 1)  # type: ignore[arg-type]
    STORE.faults = Faults()
    save_step(root, 2)  # type: ignore[arg-type]
    calls = list(STORE.faults.calls)
    STORE.reset()
    return calls


def fault_problems(strategy: str, nth: int, code: int = errno.ENOSPC) -> tuple[bool, list[str]]:
    """Fail the ``nth`` operation of saving step 2 over a committed step 1; returns (whether the save
    raised, the broken promises found)."""
    STORE.reset()
    root = _root(strategy)
    problems: list[str] = []
    try:
        save_step(root, 1)  # type: ignore[arg-type]
        before = dict(STORE.objects)
        STORE.faults = Faults(nth=nth, errno=code)
        raised = False
        try:
            save_step(root, 2)  # type: ignore[arg-type]
        except pc.CheckpointWriteError as e:
            raised = True
            if e.errno != code or "nothing was committed" not in str(e):
                problems.append(f"{strategy} op {nth}: wrong error: {e}")
        except Exception as e:  # any other exception is a broken promise
            raised = True
            problems.append(f"{strategy} op {nth}: raised {type(e).__name__}: {e}")
        failed_op = STORE.faults.failed
        STORE.faults = Faults()
        pc.CheckpointManager(root)  # cleans what the failed save left
        expected = 1 if raised else 2
        if raised and dict(STORE.objects) != before:
            extra = sorted(set(STORE.objects) - set(before))
            gone = sorted(set(before) - set(STORE.objects))
            changed = sorted(k for k in before if k in STORE.objects and STORE.objects[k] != before[k])
            problems.append(f"{strategy} op {nth} {failed_op}: root changed: +{extra} -{gone} ~{changed}")
        ckpt = pc.load_checkpoint(root)
        if ckpt.step != expected:
            problems.append(f"{strategy} op {nth} {failed_op}: newest is step {ckpt.step}, expected {expected}")
        problems += [f"{strategy} op {nth}: {p}" for p in state_problems(ckpt)]
    finally:
        STORE.reset()
    return raised, problems
