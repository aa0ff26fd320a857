"""The storage seam: the same checkpoints on the local disk and in memory, under both commit strategies.

The memory backend is also the fault-injection seam: every operation of a save can be made to fail
without patching ``os``, and after each failure the root must hold exactly what it held before.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import faults
import pytest
import torch
from torch import nn

from portable_ckpt import (
    CheckpointCorruptedError,
    CheckpointExistsError,
    CheckpointInputError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWriteError,
    load_checkpoint,
    open_checkpoint,
    save_checkpoint,
)
from portable_ckpt.format import names
from portable_ckpt.storage import LocalStorage, MemoryStorage, storage_for
from portable_ckpt.storage.memory import STORE, Faults

STRATEGIES = ("manifest-last", "rename")


@pytest.fixture(autouse=True)
def clean_store() -> Iterator[None]:
    STORE.reset()
    yield
    STORE.reset()


def model_for(step: int) -> nn.Module:
    torch.manual_seed(step)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    return opt


def memory_root(strategy: str, name: str = "run") -> MemoryStorage:
    return MemoryStorage.from_location(f"memory://{name}", commit=strategy)  # type: ignore[arg-type]


def objects() -> dict[str, bytes]:
    return dict(STORE.objects)


def test_backends_are_chosen_by_location():
    assert isinstance(storage_for("memory://bucket/run"), MemoryStorage)
    assert storage_for("memory://bucket/run").location == "memory://bucket/run"
    assert isinstance(storage_for("/tmp/x"), LocalStorage)
    assert storage_for("file:///tmp/x") == LocalStorage(Path("/tmp/x"))
    with pytest.raises(CheckpointInputError, match=r"nosuch://b: no storage backend for nosuch:// URLs"):
        storage_for("nosuch://b")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_memory_round_trip_equals_local_bytes(strategy, tmp_path):
    """Same state, same bytes on disk and in memory (the codecs never see where bytes go)."""
    model = model_for(1)
    opt = optimizer_for(model)
    root = memory_root(strategy)
    where = save_checkpoint(model, opt, {"lr": 1e-3}, ["a", "b"], 7, root)
    assert where == "memory://run/step-00000007"
    local = Path(save_checkpoint(model, opt, {"lr": 1e-3}, ["a", "b"], 7, tmp_path))
    for name in (names.MODEL, names.CONFIG, names.VOCAB):
        assert STORE.objects[f"/run/step-00000007/{name}"] == (local / name).read_bytes()
    fresh = model_for(2)
    fresh_opt = optimizer_for(fresh)
    ckpt = load_checkpoint("memory://run", fresh, fresh_opt)
    assert ckpt.step == 7 and ckpt.path == "memory://run/step-00000007"
    assert ckpt.config == {"lr": 1e-3} and ckpt.vocab == ["a", "b"]
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert STORE.objects["/run/latest"] == b"step-00000007\n"
    leftovers = [k for k in STORE.objects if k.startswith(("/run/.tmp-", "/run/.pending-"))]
    assert leftovers == []


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_manager_retention_latest_and_lazy_reads_in_memory(strategy):
    root = memory_root(strategy)
    with CheckpointManager(root, keep_last=2) as manager:
        for step in (1, 2, 3, 4):
            manager.save(model_for(step), None, {"step": step}, None, step)
        assert manager.steps() == [3, 4]
        assert manager.latest() == "memory://run/step-00000004"
        handle = manager.save(model_for(5), None, {"step": 5}, None, 5, blocking=False)
        assert handle.result() == "memory://run/step-00000005"
        fresh = model_for(0)
        ckpt = manager.restore(fresh)
        assert ckpt is not None and ckpt.step == 5 and ckpt.config == {"step": 5}
    assert sorted({k.split("/")[2] for k in STORE.objects}) == ["latest", "step-00000004", "step-00000005"]
    with open_checkpoint("memory://run") as reader:
        assert reader.step == 5
        assert torch.equal(reader.tensor("0.weight"), model_for(5).state_dict()["0.weight"])


def test_manifest_last_without_manifest_is_not_committed_and_is_cleaned():
    """A dead writer's data objects without a manifest are never loaded, and the manager removes them."""
    root = memory_root("manifest-last")
    save_checkpoint(model_for(1), None, {}, None, 1, root)
    for name in (names.MODEL, names.CONFIG):  # step 2 as a writer leaves it when it dies before the manifest
        STORE.objects[f"/run/step-00000002/{name}"] = STORE.objects[f"/run/step-00000001/{name}"]
    STORE.objects["/run/.pending-step-00000002-999999999-0123abcd"] = b""  # its writer's pid is gone
    assert load_checkpoint("memory://run").step == 1
    with pytest.raises(CheckpointNotFoundError, match=r"manifest\.json is missing; the checkpoint is incomplete"):
        load_checkpoint("memory://run/step-00000002")
    CheckpointManager(root)
    assert sorted(STORE.objects) == [
        "/run/latest",
        *sorted(
            f"/run/step-00000001/{n}"
            for n in (names.MANIFEST, names.MODEL, names.CONFIG, names.RNG_JSON, names.RNG_TENSORS)
        ),
    ]


def test_manifest_last_retention_removes_the_manifest_first():
    root = memory_root("manifest-last")
    for step in (1, 2):
        save_checkpoint(model_for(step), None, {}, None, step, root)
    STORE.faults = Faults(op="delete", match="step-00000001/model", nth=1)  # dies right after the manifest went
    with pytest.raises(OSError):
        root.remove(names.step_name(1))
    assert STORE.faults.calls[0] == "delete /run/step-00000001/manifest.json"
    assert [k for k in STORE.objects if "step-00000001" in k]  # half deleted ...
    assert CheckpointManager(root).steps() == [2]  # ... never committed, and cleaned on the next opening
    assert not [k for k in STORE.objects if "step-00000001" in k]


def test_overwrite_needs_a_rename_commit():
    root = memory_root("manifest-last")
    save_checkpoint(model_for(1), None, {}, None, 1, root)
    with pytest.raises(CheckpointExistsError, match="already exists; pass overwrite=True"):
        save_checkpoint(model_for(1), None, {}, None, 1, root)
    with pytest.raises(CheckpointInputError, match="overwrite=True needs a rename commit"):
        save_checkpoint(model_for(1), None, {}, None, 1, root, overwrite=True)
    renaming = memory_root("rename", "other")
    save_checkpoint(model_for(1), None, {"v": 1}, None, 1, renaming)
    save_checkpoint(model_for(2), None, {"v": 2}, None, 1, renaming, overwrite=True)
    assert load_checkpoint("memory://other").config == {"v": 2}


def count_operations(strategy: str) -> list[str]:
    root = memory_root(strategy)
    save_checkpoint(model_for(1), optimizer_for(model_for(1)), {"a": 1}, ["x"], 1, root)
    STORE.faults = Faults()
    save_checkpoint(model_for(2), optimizer_for(model_for(2)), {"a": 2}, ["y"], 2, root)
    return list(STORE.faults.calls)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_failure_at_any_operation_commits_nothing(strategy):
    """Fail each operation of a save in turn: the save raises CheckpointWriteError, step 1 stays latest
    and loads, and no object of step 2 remains once the manager has reopened the root."""
    operations = count_operations(strategy)
    assert len(operations) >= 10
    failed_before_commit = 0
    for nth in range(1, len(operations) + 1):
        STORE.reset()
        root = memory_root(strategy)
        save_checkpoint(model_for(1), None, {"a": 1}, ["x"], 1, root)
        before = objects()
        STORE.faults = Faults(nth=nth, errno=errno.ENOSPC)
        try:
            save_checkpoint(model_for(2), None, {"a": 2}, ["y"], 2, root)
        except CheckpointWriteError as e:
            assert "nothing was committed" in str(e) and e.errno == errno.ENOSPC
            failed_before_commit += 1
            STORE.faults = Faults()
            CheckpointManager(root)
            assert objects() == before, STORE.faults.failed
            assert load_checkpoint("memory://run").step == 1
        else:  # the fault hit an operation after the save: nothing it refused to do
            assert load_checkpoint("memory://run").step == 2
    assert failed_before_commit >= 5


def test_corrupted_object_in_memory_is_named():
    root = memory_root("manifest-last")
    save_checkpoint(model_for(1), None, {}, None, 1, root)
    key = "/run/step-00000001/model.safetensors"
    data = bytearray(STORE.objects[key])
    data[-1] ^= 0xFF
    STORE.objects[key] = bytes(data)
    with pytest.raises(CheckpointCorruptedError, match=r"memory://run/step-00000001/model.safetensors: checksum"):
        load_checkpoint("memory://run", model_for(2))


def test_a_reader_holds_one_checkpoint_while_it_is_replaced():
    """An open checkpoint keeps reading the objects it opened, even when retention deletes them."""
    root = memory_root("manifest-last")
    save_checkpoint(model_for(1), None, {}, None, 1, root)
    with open_checkpoint("memory://run/step-00000001") as reader:
        root.remove(names.step_name(1))
        assert torch.equal(reader.tensor("2.bias"), model_for(1).state_dict()["2.bias"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_stress_runs_storage_fault_sweep_finds_nothing(strategy):
    """The sweep tests/stress.py runs (faults.fault_problems), on every operation of a save."""
    operations = faults.save_operations(strategy)
    results = [faults.fault_problems(strategy, nth) for nth in range(1, len(operations) + 1)]
    assert sum(raised for raised, _ in results) >= 5
    assert [p for _, problems in results for p in problems] == []
