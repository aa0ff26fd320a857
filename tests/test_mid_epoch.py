"""Mid-epoch checkpoints resume bit-identically: a job SIGKILLed between two saves inside an epoch and
resumed in a new process reproduces the uninterrupted job's losses and final parameters exactly, with
shuffling, dropout and a user-held generator (tests/mid_epoch_job.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).resolve().parent / "mid_epoch_job.py"
TIMEOUT = 120


def run(root: Path, out: Path, loader: str, kill_at: int | None = None) -> int:
    cmd = [sys.executable, str(JOB), str(root), str(out), "--loader", loader]
    if kill_at is not None:
        cmd += ["--kill-at", str(kill_at)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if kill_at is None:
        assert done.returncode == 0, done.stderr[-3000:]
    return done.returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    base = tmp_path_factory.mktemp("uninterrupted")
    results = {}
    for loader in ("stateful", "recipe"):
        run(base / loader, base / f"{loader}.json", loader)
        results[loader] = json.loads((base / f"{loader}.json").read_text())
    assert results["stateful"]["steps"] == results["recipe"]["steps"] == 21
    return results


# killed inside epoch 1, and right after the last batch of epoch 0 (its checkpoint is at an epoch end)
@pytest.mark.parametrize("kill_at", [10, 7])
@pytest.mark.parametrize("loader", ["stateful", "recipe"])
def test_sigkill_mid_epoch_and_resume_is_bit_identical(tmp_path, uninterrupted, loader, kill_at):
    out = tmp_path / "run.json"
    assert run(tmp_path / "root", out, loader, kill_at) == -signal.SIGKILL
    run(tmp_path / "root", out, loader)
    resumed, expected = json.loads(out.read_text()), uninterrupted[loader]
    assert resumed["losses"] == expected["losses"]  # floats from JSON: bitwise (repr round-trips)
    assert resumed["params"] == expected["params"]


def test_without_the_generator_state_a_resumed_epoch_diverges(tmp_path, uninterrupted):
    """The control: skipping batches without restoring the shuffling generator draws another order."""
    out = tmp_path / "run.json"
    assert run(tmp_path / "root", out, "naive", 10) == -signal.SIGKILL
    run(tmp_path / "root", out, "naive")
    resumed, expected = json.loads(out.read_text()), uninterrupted["recipe"]
    first_resumed = 10  # the checkpoint is at step 9
    assert all(resumed["losses"][str(s)] == expected["losses"][str(s)] for s in range(first_resumed))
    assert resumed["losses"][str(first_resumed)] != expected["losses"][str(first_resumed)]
