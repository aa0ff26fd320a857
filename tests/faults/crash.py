"""Crash trials: a saving process SIGKILLed at a random moment (or before each call of an overwrite), and
the promises checked afterwards: the newest reported commit is there with the values of its step,
temporaries are never taken for checkpoints, and the next CheckpointManager clears up after the dead
writer (every temporary removed; a checkpoint an overwrite moved aside put back, or removed when its step
exists again) and saving resumes.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import portable_ckpt as pc
from faults.inject import Hang, Injector, deadline
from faults.processes import REPLY_SECONDS, fork_server
from faults.states import STEP_DIR, leftovers, load_values, moved_aside, save_step, state_problems, writer_loop


@dataclass
class TrialResult:
    mode: str
    committed: list[int]
    loaded: int | None
    lost: list[str] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # leftovers, a failed resume

    @property
    def ok(self) -> bool:
        return not (self.lost or self.silent or self.unexpected or self.other)

    @property
    def problems(self) -> list[str]:
        return self.lost + self.silent + self.unexpected + self.other


def count_ops(root: Path, steps: int) -> int:
    """How many I/O calls ``writer_loop`` makes for ``steps`` steps (run here, in a scratch root; the
    fsync calls are counted but skipped: a count needs no durability)."""
    real_fsync = os.fsync
    os.fsync = lambda fd: None
    try:
        with Injector(match=re.escape(str(root))).installed() as inj:
            writer_loop(root, steps)
    finally:
        os.fsync = real_fsync
    return len(inj.calls)


def crash_trial(root: Path, rng: random.Random, *, kind: str, steps: int, ops_per_run: int) -> TrialResult:
    """One crash trial: a writer forked by the fork server saves ``steps`` steps through
    CheckpointManager(root, keep_last=2), reporting each step on a named pipe, and is killed with SIGKILL
    at a random moment; then the root is checked from this process (:func:`check_root_after_crash`).

    ``kind`` "op": the writer kills itself just before a random one of its I/O calls (every phase of a
    save is reachable: a write, an fsync, the commit rename, the replacement of ``latest``, a retention
    delete). "begin": this process kills it as soon as it reports beginning a random step, wherever it
    has got to by the time the signal lands.
    """
    server = fork_server()
    kill_op = rng.randint(1, ops_per_run) if kind == "op" else 0
    target = f"begin {rng.randint(1, steps)}"
    mode = f"kill@op{kill_op}" if kind == "op" else f"kill@{target.replace(' ', '')}"
    fifo = root.parent / f"{root.name}.progress"
    os.mkfifo(fifo)
    pid = server.start_crash_writer(root, steps, kill_op, fifo)
    lines = []
    hung = ""
    try:
        with deadline(REPLY_SECONDS), open(fifo, encoding="utf-8") as progress:  # EOF when the writer is dead
            for line in progress:
                lines.append(line.strip())
                if kind == "begin" and lines[-1] in (target, "finished"):
                    os.kill(pid, signal.SIGKILL)
    except Hang as e:  # the writer never opened the pipe, or stopped reporting: kill it, report it
        os.kill(pid, signal.SIGKILL)
        hung = f"the writer was killed: {e}"
    fifo.unlink()
    status = server.wait(pid)
    result = TrialResult(mode, [int(x.split()[1]) for x in lines if x.startswith("committed")], None)
    if hung:
        result.other.append(hung)
    if status != -signal.SIGKILL:
        result.other.append(f"writer ended with status {status}, not SIGKILL: {server.errors()}")
    check_root_after_crash(root, result)
    return result


def reopen(root: Path, result: TrialResult, **options: Any) -> pc.CheckpointManager:
    """Open ``root`` with a CheckpointManager, as the next run does once the writers are gone (finished or
    killed), and record in ``result`` what it failed to clear up after them: every ``.tmp-*``/``.trash-*``
    must be gone, and every checkpoint an overwrite moved aside (``.replaced-*``) put back, holding its
    values, when its step directory is missing, or removed when the step exists again."""
    aside = moved_aside(root)
    missing = {name: step for name, step in aside.items() if not (root / step / "manifest.json").is_file()}
    manager = pc.CheckpointManager(root, **options)
    left = leftovers(root)
    if [n for n in left if n in aside]:
        result.other.append(
            "checkpoints an overwrite moved aside were neither put back nor removed after CheckpointManager "
            f"opened the root: {[n for n in left if n in aside]}"
        )
    if [n for n in left if n not in aside]:
        result.other.append(
            f"temporaries left after CheckpointManager opened the root: {[n for n in left if n not in aside]}"
        )
    for name, step in missing.items():
        try:
            _, problems = load_values(root / step)
            result.silent += [f"{step}, put back from {name}: {p}" for p in problems]
        except pc.CheckpointError as e:
            result.lost.append(f"{step} lost: it was moved aside as {name} and not put back: {type(e).__name__}: {e}")
    return manager


def check_root_after_crash(root: Path, result: TrialResult) -> None:
    """The promises after a crash: the newest reported commit is there, every value right, temporaries
    never taken for checkpoints and cleared up by the next CheckpointManager (:func:`reopen`), and saving
    resumes."""
    last = result.committed[-1] if result.committed else 0
    try:
        ckpt = pc.load_checkpoint(root, restore_rng=False)
        result.loaded = ckpt.step
        if not STEP_DIR.match(ckpt.path.name):
            result.silent.append(f"loaded {ckpt.path.name}, which is not a committed step directory")
        if ckpt.step < last:
            result.lost.append(f"loaded step {ckpt.step}, but step {last} had been committed")
        result.silent += [f"step {ckpt.step}: {p}" for p in state_problems(ckpt)]
    except pc.CheckpointNotFoundError as e:
        if last:
            result.lost.append(f"step {last} had been committed, but loading the root says: {e}")
    except pc.CheckpointError as e:
        result.lost.append(f"loading the root: {type(e).__name__}: {e}")
    except Exception as e:  # anything else is a finding
        result.unexpected.append(f"loading the root: {type(e).__module__}.{type(e).__qualname__}: {e}")
    for name in sorted(os.listdir(root)):
        if STEP_DIR.match(name) and (root / name / "manifest.json").is_file():
            try:
                step, problems = load_values(root / name)
                result.silent += [f"{name}: {p}" for p in problems]
            except pc.CheckpointError as e:
                result.lost.append(f"{name}: {type(e).__name__}: {e}")
            except Exception as e:  # anything else is a finding
                result.unexpected.append(f"{name}: {type(e).__module__}.{type(e).__qualname__}: {e}")
    try:
        manager = reopen(root, result, keep_last=2)
        steps = manager.steps()
        nxt = (steps[-1] if steps else 0) + 1
        save_step(manager, nxt)
        step, problems = load_values(root)
        if step != nxt or problems or len(manager.steps()) != min(2, len(steps) + 1):
            result.other.append(f"resume: saved {nxt}, loaded {step} {problems}, kept {manager.steps()}")
    except pc.CheckpointError as e:
        result.other.append(f"resume failed: {type(e).__name__}: {e}")


def overwrite_ops(template: Path, scratch: Path) -> list[str]:
    """The I/O calls of ``save_checkpoint(step 2, overwrite=True)`` into a copy of ``template`` (steps 1, 2)."""
    shutil.copytree(template, scratch)
    with Injector(match=re.escape(str(scratch))).installed() as counter:
        save_step(scratch, 2, "B", overwrite=True)
    return counter.calls


def overwrite_kill_problems(template: Path, where: Path, kill_op: int) -> list[str]:
    """Kill a process overwriting step 2 (writer B over writer main) just before its ``kill_op``-th I/O call;
    then open the root with a CheckpointManager, as the next run would. Step 2 must still be there, whole
    (the old or the new), step 1 untouched, the root loading step 2, nothing left behind (:func:`reopen`:
    the old step 2, if the writer had moved it aside, put back or removed)."""
    root = where / "root"
    shutil.copytree(template, root)
    server = fork_server()
    [(status, _)] = server.run(
        [["kill-writer", str(root), "--step", "2", "--name", "B", "--overwrite", "--kill-op", str(kill_op)]],
        where / "worker",
    )
    result = TrialResult(f"overwrite killed before call {kill_op}", [], None)
    if status not in (-signal.SIGKILL, 0):
        result.other.append(f"the writer failed ({status}): {server.errors()}")
    reopen(root, result)
    for step in (1, 2):
        try:
            _, wrong = load_values(root / f"step-{step:08d}")
            result.silent += [f"step {step}: {p}" for p in wrong]
        except pc.CheckpointError as e:
            result.lost.append(f"step {step} lost: {type(e).__name__}: {e}")
    try:
        step, _ = load_values(root)
        if step != 2:
            result.other.append(f"the root loads step {step}, not the newest, step 2")
    except pc.CheckpointError as e:
        result.other.append(f"loading the root: {type(e).__name__}: {e}")
    return result.problems
