"""Concurrent writers and readers of one checkpoints root, as separate processes started together.

Two writers saving different steps both succeed; two writers saving the same steps each get exactly one
success per step, the other a CheckpointExistsError; a reader that loads the root in a loop while a
writer saves with retention sees complete checkpoints (values checked) or CheckpointNotFoundError, never
anything partial or mixed; ``latest`` always names a complete checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import faults
import pytest

import portable_ckpt as pc


def run_together(*jobs: list[str], tmp_path: Path) -> list[list[str]]:
    """Run the jobs as separate processes released at the same instant; their output lines.

    Readers are told to stop (a stop file) once every writer has finished, in case they never see the
    step they wait for.
    """
    server = faults.fork_server()
    results = server.run(jobs, tmp_path / "workers", stop_file=tmp_path / "stop")
    assert [status for status, _ in results] == [0] * len(jobs), server.errors()
    return [lines for _, lines in results]


def outcomes(lines: list[str]) -> dict[int, dict[str, str]]:
    assert lines[-1] == "done", lines[-5:]
    return {r["step"]: r for r in map(json.loads, lines[:-1])}


def assert_nothing_left(root: Path) -> None:
    """The writers have finished: they left no temporary and no checkpoint moved aside (``.replaced-*``), and
    a CheckpointManager opening the root, as the next run would, finds nothing to put back or remove."""
    assert faults.leftovers(root) == []
    before = sorted(p.name for p in root.glob("step-*"))
    result = faults.TrialResult("reopened after the writers finished", [], None)
    faults.reopen(root, result)
    assert result.problems == []
    assert sorted(p.name for p in root.glob("step-*")) == before


def committed_values(root: Path) -> dict[int, str]:
    """step -> the writer whose state it holds, for every committed checkpoint (all values checked)."""
    found = {}
    for path in sorted(root.glob("step-*")):
        ckpt = pc.load_checkpoint(path, restore_rng=False)
        assert faults.state_problems(ckpt) == [], path
        found[ckpt.step] = ckpt.config["writer"]
    return found


def test_two_writers_different_steps(tmp_path: Path) -> None:
    root, stop = tmp_path / "root", tmp_path / "stop"  # the stop file is created by run_together
    n = 15
    a, b, reader = run_together(
        ["writer", str(root), "--name", "A", "--steps", ",".join(str(s) for s in range(1, 2 * n, 2))],
        ["writer", str(root), "--name", "B", "--steps", ",".join(str(s) for s in range(2, 2 * n + 1, 2))],
        ["reader", str(root), "--until-step", str(2 * n), "--stop-file", str(stop), "--check-latest"],
        tmp_path=tmp_path,
    )
    assert all(r["outcome"] == "saved" for r in [*outcomes(a).values(), *outcomes(b).values()])
    assert committed_values(root) == {s: "A" if s % 2 else "B" for s in range(1, 2 * n + 1)}
    assert faults.latest_name(root) == f"step-{2 * n:08d}"
    assert_nothing_left(root)
    counts = json.loads(reader[-1])
    assert counts["bad"] == [] and counts["loaded"] > 0 and counts["latest_checked"] > 0, counts


def test_two_writers_same_steps(tmp_path: Path) -> None:
    root, stop = tmp_path / "root", tmp_path / "stop"  # the stop file is created by run_together
    n = 15
    steps = ",".join(str(s) for s in range(1, n + 1))
    a, b, reader = run_together(
        ["writer", str(root), "--name", "A", "--steps", steps],
        ["writer", str(root), "--name", "B", "--steps", steps],
        ["reader", str(root), "--until-step", str(n), "--stop-file", str(stop), "--check-latest"],
        tmp_path=tmp_path,
    )
    a_out, b_out = outcomes(a), outcomes(b)
    winners = committed_values(root)
    for step in range(1, n + 1):
        got = {a_out[step]["outcome"], b_out[step]["outcome"]}
        assert got == {"saved", "CheckpointExistsError"}, (step, a_out[step], b_out[step])
        loser = a_out[step] if a_out[step]["outcome"] != "saved" else b_out[step]
        assert f"step-{step:08d}: a checkpoint for step {step} already exists" in loser["message"]
        assert winners[step] == ("A" if a_out[step]["outcome"] == "saved" else "B")  # never a mix
    assert faults.latest_name(root) == f"step-{n:08d}"
    assert_nothing_left(root)
    counts = json.loads(reader[-1])
    assert counts["bad"] == [] and counts["loaded"] > 0, counts


@pytest.mark.parametrize("keep_last", [1, 2])
def test_reader_never_sees_a_partial_checkpoint_during_retention(tmp_path: Path, keep_last: int) -> None:
    root, stop = tmp_path / "root", tmp_path / "stop"  # the stop file is created by run_together
    n = 30
    writer, reader = run_together(
        [
            "writer",
            str(root),
            "--name",
            "main",
            "--keep-last",
            str(keep_last),
            "--steps",
            ",".join(str(s) for s in range(1, n + 1)),
        ],
        ["reader", str(root), "--until-step", str(n), "--stop-file", str(stop)],
        tmp_path=tmp_path,
    )
    assert all(r["outcome"] == "saved" for r in outcomes(writer).values())
    counts = json.loads(reader[-1])
    # every load gave a complete checkpoint with the right values, or CheckpointNotFoundError
    assert counts["bad"] == [], counts["bad"][:10]
    assert counts["loaded"] > 0, counts
    assert sorted(committed_values(root)) == list(range(n - keep_last + 1, n + 1))
    assert_nothing_left(root)


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_readers_during_overwrites_see_one_whole_checkpoint(tmp_path: Path, verify: bool) -> None:
    """Two writers overwrite step 5 over and over (overwrite=True, states of the same sizes) while readers
    load the step directory and the root: every load is one writer's complete state (values and RNG state
    checked), or CheckpointNotFoundError; never a false checksum mismatch, never files of two saves."""
    root, stop = tmp_path / "root", tmp_path / "stop"
    faults.save_step(root, 5, "A")
    rounds = ",".join(["5"] * 12)
    flags = [] if verify else ["--no-verify"]
    *writers, by_dir, by_root = run_together(
        ["writer", str(root), "--name", "A", "--overwrite", "--steps", rounds],
        ["writer", str(root), "--name", "B", "--overwrite", "--steps", rounds],
        ["reader", str(root / "step-00000005"), "--stop-file", str(stop), *flags],
        ["reader", str(root), "--stop-file", str(stop), *flags],
        tmp_path=tmp_path,
    )
    assert all(r["outcome"] == "saved" for w in writers for r in outcomes(w).values())
    for lines in (by_dir, by_root):
        counts = json.loads(lines[-1])
        assert counts["bad"] == [], counts["bad"][:5]
        assert counts["loaded"] > 0, counts
    assert set(committed_values(root)) == {5}
    assert_nothing_left(root)


# --- the same races, made deterministic: the other process acts right after the reader opens a file --------


# (file, nth touch): a .pt file is opened to be verified, then torch.load opens it, sizes it and maps it
RACE_POINTS = [(name, 1) for name in faults.FILES] + [
    (pt, k) for pt in ("optimizer.pt", "scheduler.pt") for k in (2, 3)
]


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize(("name", "nth"), RACE_POINTS, ids=[f"{n}-touch{k}" for n, k in RACE_POINTS])
def test_checkpoint_retired_while_being_read(tmp_path: Path, name: str, nth: int, verify: bool) -> None:
    """Retention deletes the checkpoint right after the reader touched one of its files (the nth time)."""
    root = tmp_path / "root"
    faults.save_step(root, 4)
    ckdir = faults.save_step(root, 5)
    with faults.after_open(name, lambda: faults.retire(ckdir), nth) as fired:
        try:
            step, problems = faults.load_values(ckdir, verify=verify)
            outcome = f"step {step} {problems}"
        except pc.CheckpointNotFoundError:
            outcome = "not found"
        except pc.CheckpointError as e:
            outcome = f"{type(e).__name__}: {e}"
    assert fired, f"{name} was never opened"  # .pt files are opened once, by name; torch.load then maps that descriptor
    assert outcome in ("not found", "step 5 []"), outcome


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize(("name", "nth"), RACE_POINTS, ids=[f"{n}-touch{k}" for n, k in RACE_POINTS])
def test_checkpoint_overwritten_while_being_read(tmp_path: Path, name: str, nth: int, verify: bool) -> None:
    """save_checkpoint(overwrite=True) by another process replaces step 5 (writer A's) with writer B's right
    after the reader opened one of its files: the reader gets A's state or B's, whole, or not found."""
    ckdir = faults.save_step(tmp_path / "root", 5, "A")
    replacement = faults.save_step(tmp_path / "other", 5, "B")
    with faults.after_open(name, lambda: faults.replace_with(ckdir, replacement), nth) as fired:
        try:
            with faults.preserved_rng():
                ckpt = pc.load_checkpoint(ckdir, verify=verify, restore_rng=True)
                problems = faults.state_problems(ckpt) or faults.rng_problems(ckpt.config["value"])
            outcome = f"writer {ckpt.config['writer']} {problems}"
        except pc.CheckpointNotFoundError:
            outcome = "not found"
        except pc.CheckpointError as e:
            outcome = f"{type(e).__name__}: {e}"
    assert fired, f"{name} was never opened"  # .pt files are opened once, by name; torch.load then maps that descriptor
    assert outcome in ("not found", "writer A []", "writer B []"), outcome


def test_a_verified_load_never_returns_bytes_it_did_not_verify(tmp_path: Path) -> None:
    """Two overwrites in quick succession: B's save replaces A's right after the reader opened optimizer.pt
    to verify it, and a new save of A's state (byte-identical files) is back in place as soon as the reader
    opens scheduler.pt (the same bytes in A's and B's saves). Every file the reader verifies then matches
    A's manifest; the optimizer state it returns must be the one whose checksum it verified."""
    ckdir = faults.save_step(tmp_path / "root", 5, "A")
    b = faults.save_step(tmp_path / "b", 5, "B")
    a_again = faults.save_step(tmp_path / "a", 5, "A")
    assert (b / "scheduler.pt").read_bytes() == (ckdir / "scheduler.pt").read_bytes()
    with (
        faults.after_open("optimizer.pt", lambda: faults.replace_with(ckdir, b)) as first,
        faults.after_open("scheduler.pt", lambda: faults.replace_with(ckdir, a_again)),
    ):
        try:
            step, problems = faults.load_values(ckdir, verify=True)
            outcome = f"step {step} {problems}"
        except pc.CheckpointNotFoundError:
            outcome = "not found"
        except pc.CheckpointError as e:
            outcome = f"{type(e).__name__}: {e}"
    assert first  # through the directory descriptor, scheduler.pt may be gone (not found) before it is opened
    assert outcome in ("not found", "step 5 []"), outcome
