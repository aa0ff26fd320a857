"""CheckpointManager: retention, restore, RNG and scheduler state, async saves."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TinyLM, train_some

from portable_ckpt import CheckpointInputError, CheckpointManager, CheckpointNotFoundError, load_checkpoint


def _save_steps(manager: CheckpointManager, steps, model=None) -> None:
    model = model or TinyLM()
    for step in steps:
        with torch.no_grad():
            model.lin.weight.fill_(step)
        manager.save(model, None, {}, None, step)


@pytest.mark.parametrize(
    ("keep_last", "keep_every", "expected"),
    [
        (None, None, [0, 5, 10, 15, 20, 25, 30]),
        (1, None, [30]),
        (3, None, [20, 25, 30]),
        (2, 10, [0, 10, 20, 25, 30]),
    ],
)
def test_retention_keeps_exactly_what_it_should(tmp_path, keep_last, keep_every, expected):
    manager = CheckpointManager(tmp_path, keep_last=keep_last, keep_every=keep_every)
    _save_steps(manager, range(0, 35, 5))
    assert manager.steps() == expected
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("step-")) == [f"step-{s:08d}" for s in expected]
    assert manager.latest() == tmp_path / "step-00000030"
    assert (tmp_path / "latest").read_text() == "step-00000030\n"


def test_restore_returns_none_on_an_empty_root(tmp_path):
    assert CheckpointManager(tmp_path / "fresh").restore(TinyLM()) is None


def test_restore_newest_and_a_given_step(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    _save_steps(manager, [1, 2, 3])
    model = TinyLM()
    assert manager.restore(model).step == 3 and model.lin.weight[0, 0].item() == 3.0
    assert manager.restore(model, step=2).step == 2 and model.lin.weight[0, 0].item() == 2.0
    with pytest.raises(CheckpointNotFoundError, match=r"no committed checkpoint for step 1; have \[2, 3\]"):
        manager.restore(model, step=1)


def test_saved_steps_must_increase(tmp_path):
    manager = CheckpointManager(tmp_path)
    _save_steps(manager, [10])
    with pytest.raises(CheckpointInputError, match=r"step 10 is not after the newest checkpoint .* \(step 10\)"):
        _save_steps(manager, [10])


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_retention_arguments(tmp_path, bad):
    with pytest.raises(CheckpointInputError, match=r"keep_last must be None or an int >= 1"):
        CheckpointManager(tmp_path, keep_last=bad)


def test_crashed_temporaries_are_cleaned_on_open(tmp_path):
    manager = CheckpointManager(tmp_path)
    _save_steps(manager, [1])
    dead = tmp_path / ".tmp-step-00000002-999999999-abcd1234"  # no such pid
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".trash-step-00000000-deadbeef").mkdir()
    CheckpointManager(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [".lock", "latest", "step-00000001"]


def test_rng_and_scheduler_state_are_restored(tmp_path):
    torch.manual_seed(3)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=20)
    for _ in range(4):
        train_some(model, optimizer, steps=1)
        scheduler.step()
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    manager = CheckpointManager(tmp_path)
    manager.save(model, optimizer, {}, None, 4, scheduler=scheduler)
    expected = (random.random(), float(np.random.rand()), torch.rand(3), scheduler.state_dict())

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    fresh = TinyLM()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_sched = torch.optim.lr_scheduler.OneCycleLR(fresh_opt, max_lr=0.1, total_steps=20)
    ckpt = manager.restore(fresh, fresh_opt, scheduler=fresh_sched)
    assert ckpt.step == 4
    assert fresh_sched.state_dict() == expected[3]
    assert fresh_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert random.random() == expected[0]
    assert float(np.random.rand()) == expected[1]
    assert torch.equal(torch.rand(3), expected[2])
    assert sorted(ckpt.manifest["rng"]) == ["numpy", "python", "torch.cpu"]


def test_restore_rng_false_leaves_generators_alone(tmp_path):
    manager = CheckpointManager(tmp_path)
    torch.manual_seed(1)
    _save_steps(manager, [1])
    model = TinyLM()
    torch.manual_seed(2)
    expected = torch.rand(2)
    torch.manual_seed(2)
    manager.restore(model, restore_rng=False)
    assert torch.equal(torch.rand(2), expected)
    torch.manual_seed(2)
    load_checkpoint(tmp_path, restore_rng=False)
    assert torch.equal(torch.rand(2), expected)


def test_async_save_writes_the_state_at_the_call(tmp_path):
    model = TinyLM()
    with torch.no_grad():
        model.lin.weight.fill_(1.0)
    with CheckpointManager(tmp_path) as manager:
        handle = manager.save(model, None, {}, None, 1, blocking=False)
        with torch.no_grad():
            model.lin.weight.fill_(2.0)  # training goes on while the write runs
        path = handle.result()
        assert handle.done() and path == tmp_path / "step-00000001"
    assert torch.equal(load_checkpoint(path).model_state["lin.weight"], torch.ones(6, 6))


def test_async_save_error_is_reraised(tmp_path):
    manager = CheckpointManager(tmp_path)
    (tmp_path / "step-00000001").mkdir()  # squats the name: the commit must fail
    handle = manager.save(TinyLM(), None, {}, None, 1, blocking=False)
    with pytest.raises(FileExistsError, match=r"a checkpoint for step 1 already exists"):
        handle.wait()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_consecutive_async_saves_each_keep_their_own_values(tmp_path):
    model = TinyLM()
    handles = []
    with CheckpointManager(tmp_path) as manager:
        for step in range(4):
            with torch.no_grad():
                model.lin.weight.fill_(float(step))
            handles.append(manager.save(model, None, {}, None, step, blocking=False))
            with torch.no_grad():
                model.lin.weight.fill_(-1.0)  # changed while the write runs; the checkpoint must not see it
    for step, handle in enumerate(handles):
        stored = load_checkpoint(handle.result()).model_state["lin.weight"]
        assert torch.equal(stored, torch.full((6, 6), float(step)))


def test_an_async_error_seen_through_the_handle_is_not_raised_again(tmp_path):
    manager = CheckpointManager(tmp_path)
    (tmp_path / "step-00000001").mkdir()
    handle = manager.save(TinyLM(), None, {}, None, 1, blocking=False)
    with pytest.raises(FileExistsError):
        handle.result()
    assert manager.save(TinyLM(), None, {}, None, 2) == tmp_path / "step-00000002"


def test_an_unobserved_async_error_surfaces_at_the_next_call(tmp_path):
    manager = CheckpointManager(tmp_path)
    (tmp_path / "step-00000001").mkdir()
    manager.save(TinyLM(), None, {}, None, 1, blocking=False)
    with pytest.raises(FileExistsError, match=r"step 1 already exists"):
        manager.wait()


def test_interpreter_exit_finishes_a_pending_async_save(tmp_path):
    """A script that returns right after a non-blocking save leaves a complete, committed checkpoint."""
    script = (
        "import torch\n"
        "from portable_ckpt import CheckpointManager\n"
        f"manager = CheckpointManager({str(tmp_path)!r})\n"
        "state = {f'w{i}': torch.full((256, 1024), float(i)) for i in range(32)}\n"
        "manager.save(state, None, {}, None, 1, blocking=False)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 1 and torch.equal(ckpt.model_state["w31"], torch.full((256, 1024), 31.0))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
