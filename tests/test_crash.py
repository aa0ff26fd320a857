"""Crash consistency: a child process saving through CheckpointManager(root, keep_last=2) is killed with
SIGKILL at random moments; the next process must find the newest committed checkpoint with exactly the
values saved for its step, never a temporary, and must be able to go on saving.

The kill lands either just before a random I/O call of the child (a write, fsync, rename, ...: every phase
of a save) or when the child reports beginning a random step (wherever it has got to by then).
``tests/stress.py`` runs many more trials, with random seeds.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import faults
import pytest

import portable_ckpt as pc

STEPS = 4


def run_trials(tmp_path: Path, seed: int, kinds: list[str]) -> list[faults.TrialResult]:
    rng = random.Random(seed)
    ops = faults.count_ops(tmp_path / "count", STEPS)
    return [
        faults.crash_trial(tmp_path / f"trial{i}", rng, kind=kind, steps=STEPS, ops_per_run=ops)
        for i, kind in enumerate(kinds)
    ]


def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    results = run_trials(tmp_path, seed=1234, kinds=["op", "op", "op", "begin", "begin"])
    failures = [
        f"{r.mode}: committed {r.committed}, loaded {r.loaded}: {r.lost + r.silent + r.unexpected + r.other}"
        for r in results
        if not r.ok
    ]
    assert not failures, "\n".join(failures)
    for r in results:
        if r.mode.startswith("kill@op"):
            assert len(r.committed) < STEPS, f"{r.mode}: the kill did not land inside a save"
    assert any(r.loaded for r in results)


def test_count_of_io_calls_is_stable(tmp_path: Path) -> None:
    """The op-mode kill points are drawn from this count: two runs must agree, or kills would miss."""
    assert faults.count_ops(tmp_path / "a", STEPS) == faults.count_ops(tmp_path / "b", STEPS) > 10 * STEPS


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(proc.stdout)


def test_temporaries_are_never_loaded_and_are_removed_on_open(tmp_path: Path) -> None:
    root = tmp_path / "root"
    manager = pc.CheckpointManager(root, keep_last=2)
    for step in (1, 2):
        faults.save_step(manager, step)
    manager.close()
    # what a crashed save of step 9 leaves: a complete-looking checkpoint under a temporary name
    gone = dead_pid()
    crashed = root / f".tmp-step-00000009-{gone}-deadbeef"
    faults.save_step(tmp_path / "elsewhere", 9)
    shutil.copytree(tmp_path / "elsewhere" / "step-00000009", crashed)
    (root / f".tmp-latest-{gone}-deadbeef").write_text(f"{crashed.name}\n")
    trash = root / ".trash-step-00000001-deadbeef"
    shutil.copytree(root / "step-00000001", trash)
    (root / "step-00000010").mkdir()  # a step directory without manifest.json: incomplete
    (root / "step-00000010" / "model.safetensors").write_bytes(b"partial")
    (root / "latest").write_text(f"{crashed.name}\n")
    alive = root / f".tmp-step-00000011-{os.getppid()}-cafecafe"  # a save running in another process
    alive.mkdir()
    assert faults.load_values(root) == (2, [])
    assert pc.CheckpointManager(root).latest() == root / "step-00000002"
    pc.CheckpointManager(root)  # opening the root cleans up after the dead writer
    assert faults.leftovers(root) == [alive.name]
    assert faults.load_values(root) == (2, [])


@pytest.mark.parametrize("owner", ["dead", "alive"])
def test_a_checkpoint_moved_aside_is_put_back_or_reported(tmp_path: Path, owner: str) -> None:
    """What an overwrite killed between its two renames leaves: step 2 moved aside as .replaced-*, no step 2.
    The next CheckpointManager puts it back when its writer is dead; the check after every crash trial
    (faults.reopen) passes then, and reports the step lost and the .replaced-* leaked when it could not be
    put back (here: its writer, our parent process, is alive, so the manager must leave it alone)."""
    root = tmp_path / "root"
    for step in (1, 2):
        faults.save_step(root, step)
    pid = dead_pid() if owner == "dead" else os.getppid()
    aside = root / f".replaced-step-00000002-{pid}-0badc0de"
    (root / "step-00000002").rename(aside)
    assert faults.moved_aside(root) == {aside.name: "step-00000002"}
    result = faults.TrialResult("overwrite killed between its renames", [], None)
    faults.reopen(root, result)
    if owner == "dead":
        assert result.problems == []
        assert faults.leftovers(root) == [] and faults.load_values(root) == (2, [])
        return
    assert result.other == [
        "checkpoints an overwrite moved aside were neither put back nor removed after CheckpointManager opened "
        f"the root: [{aside.name!r}]"
    ]
    [lost] = result.lost
    assert lost.startswith(f"step-00000002 lost: it was moved aside as {aside.name} and not put back: ")
    assert result.silent == [] and result.unexpected == [] and not result.ok


def test_resume_after_a_crash_between_commit_and_latest(tmp_path: Path) -> None:
    """A crash after the commit rename but before `latest` is replaced leaves `latest` stale: readers load
    what it names (a complete checkpoint), the manager sees the newer step and goes on after it."""
    root = tmp_path / "root"
    manager = pc.CheckpointManager(root, keep_last=2)
    for step in (1, 2):
        faults.save_step(manager, step)
    (root / "latest").write_text("step-00000001\n")  # what the crash leaves
    assert faults.load_values(root) == (1, [])
    manager = pc.CheckpointManager(root, keep_last=2)
    assert manager.steps() == [1, 2]
    faults.save_step(manager, 3)
    assert faults.latest_name(root) == "step-00000003" and manager.steps() == [2, 3]
    assert faults.load_values(root) == (3, [])


def test_sigkill_during_an_overwrite_never_loses_the_step(tmp_path: Path) -> None:
    """save_checkpoint(step 2, overwrite=True) killed at each call of its commit (and a few before): the
    next CheckpointManager must find step 2, the old or the new, never neither."""
    template = tmp_path / "template"
    for step in (1, 2):
        faults.save_step(template, step)
    calls = faults.overwrite_ops(template, tmp_path / "count")
    commit = next(i for i, call in enumerate(calls) if call.endswith("/.lock"))
    kill_points = [1, commit - 1, *range(commit + 1, len(calls) + 1)]  # from taking the lock to the end
    failures = []
    for k in kill_points:
        problems = faults.overwrite_kill_problems(template, tmp_path / f"kill{k}", k)
        failures += [f"killed before call {k} ({calls[k - 1].replace(str(tmp_path), '')}): {p}" for p in problems]
    assert not failures, "\n".join(failures)
