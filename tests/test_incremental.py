"""Incremental saves (format_version 3, format_spec §21): parts, reuse by hard link or copy, value equality,
retention, every reader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faults
import pytest
import torch
from torch import nn

import portable_ckpt as pc
from portable_ckpt import save as _save
from portable_ckpt.cli import main
from portable_ckpt.format import layout
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.reuse import Stats
from portable_ckpt.storage import storage_for
from portable_ckpt.storage.memory import MemoryStorage

PART = 4096  # bytes of tensor data per part: the frozen base below spans several parts


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
        self.head = nn.Linear(32, 4)
        self.register_buffer("count", torch.zeros(3))
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.base(x)))


def _train(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    loss = model(torch.randn(8, 32)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _setup(seed: int = 0) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _save_stats(model, opt, step, root, **kw) -> tuple[Path | str, Stats]:
    stats = Stats()
    snap = _save.snapshot(model, opt, {"run": 1}, None, step, incremental=True, part_bytes=PART, **kw)
    return _save.write(snap, root, stats=stats), stats


def _parts(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if layout.PART.fullmatch(n))


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_split_puts_frozen_first_and_packs_by_size():
    tensors = {
        "a": torch.zeros(1024),  # 4 KiB frozen
        "b": torch.zeros(512),  # 2 KiB frozen
        "t": torch.zeros(256),  # trainable
        "c": torch.zeros(2048),  # 8 KiB frozen: alone
        "d": torch.zeros(10),
    }
    assert layout.split(tensors, frozenset({"t"}), 4096) == [["a"], ["b"], ["c"], ["d"], ["t"]]
    assert layout.split(tensors, frozenset({"t"}), 1 << 20) == [["a", "b", "c", "d"], ["t"]]
    assert layout.split({}, frozenset(), 10) == [[]]


def test_first_save_writes_every_part_and_loads_equal(tmp_path):
    model, opt = _setup()
    path, stats = _save_stats(model, opt, 1, tmp_path)
    doc = json.loads((Path(path) / "manifest.json").read_text())
    assert doc["format_version"] == 3
    parts = _parts(Path(path))
    assert len(parts) >= 4 and parts == [layout.part_name(i, len(parts)) for i in range(len(parts))]
    assert "model.safetensors" not in doc["files"]
    assert stats.reused == [] and sorted(stats.written) == parts
    # the trainable head is in the last part, alone with nothing frozen
    assert set(doc["files"][parts[-1]]["tensors"]) == {"head.weight", "head.bias"}
    fresh, fresh_opt = _setup(seed=1)
    ckpt = pc.load_checkpoint(path, fresh, fresh_opt)
    assert ckpt.step == 1 and ckpt.format_version == 3
    _equal(fresh.state_dict(), model.state_dict())
    assert fresh_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_unchanged_parts_are_hard_linked_changed_ones_written(tmp_path):
    model, opt = _setup()
    first, _ = _save_stats(model, opt, 1, tmp_path)
    _train(model, opt, 1)
    second, stats = _save_stats(model, opt, 2, tmp_path)
    parts = _parts(Path(second))
    trainable = parts[-1]
    assert stats.written == [trainable] and sorted(stats.reused) == parts[:-1]
    for name in parts[:-1]:
        a, b = os.stat(Path(first) / name), os.stat(Path(second) / name)
        assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev) and b.st_nlink == 2
        assert not os.path.islink(Path(second) / name)
    assert os.stat(Path(second) / trainable).st_nlink == 1
    assert stats.reused_bytes == sum(os.stat(Path(second) / n).st_size for n in parts[:-1])
    # a changed buffer makes its part written again, and only that one (the head did not train since)
    model.count += 1
    third, stats3 = _save_stats(model, opt, 3, tmp_path)
    files = json.loads((Path(third) / "manifest.json").read_text())["files"]
    owner = next(n for n in parts if "count" in files[n]["tensors"])
    assert owner != trainable and stats3.written == [owner]
    for path, step in ((first, 1), (second, 2), (third, 3)):
        assert pc.load_checkpoint(path).step == step
    fresh, _ = _setup(seed=5)
    pc.load_checkpoint(third, fresh)
    _equal(fresh.state_dict(), model.state_dict())


def test_retention_deletes_any_checkpoint_without_breaking_another(tmp_path):
    model, opt = _setup()
    manager = pc.CheckpointManager(tmp_path, keep_last=1, incremental=True, part_bytes=PART)
    states = {}
    for step in range(1, 6):
        _train(model, opt, step)
        manager.save(model, opt, {}, None, step)
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}
    assert manager.steps() == [5]
    # every frozen part now has a single name left: the source checkpoints were deleted under it
    path = Path(manager.latest())
    assert all(os.stat(path / n).st_nlink == 1 for n in _parts(path))
    fresh, fresh_opt = _setup(seed=9)
    manager.restore(fresh, fresh_opt)
    _equal(fresh.state_dict(), states[5])
    assert pc.validate_checkpoint(path).problems == ()


def test_deleting_the_newest_keeps_the_older_whole(tmp_path):
    model, opt = _setup()
    first, _ = _save_stats(model, opt, 1, tmp_path)
    _train(model, opt, 1)
    _save_stats(model, opt, 2, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pc.CheckpointManager(tmp_path).drop_after(1)
    fresh, _ = _setup(seed=3)
    pc.load_checkpoint(first, fresh)
    assert not torch.equal(fresh.head.weight, before["head.weight"])  # step 1's, not step 2's
    assert pc.validate_checkpoint(first).problems == ()


def test_resume_from_incremental_is_bitwise_the_uninterrupted_run(tmp_path):
    model, opt = _setup()
    for step in range(1, 4):
        _train(model, opt, step)
        pc.save_checkpoint(model, opt, {}, None, step, tmp_path, incremental=True, part_bytes=PART)
    _train(model, opt, 4)
    _train(model, opt, 5)
    resumed, resumed_opt = _setup(seed=7)
    ckpt = pc.load_checkpoint(tmp_path, resumed, resumed_opt)
    assert ckpt.step == 3
    _train(resumed, resumed_opt, 4)
    _train(resumed, resumed_opt, 5)
    _equal(resumed.state_dict(), model.state_dict())


def test_a_full_save_and_an_incremental_one_hold_the_same_state(tmp_path):
    model, opt = _setup()
    full = pc.save_checkpoint(model, opt, {}, None, 1, tmp_path / "full")
    inc = pc.save_checkpoint(model, opt, {}, None, 1, tmp_path / "inc", incremental=True, part_bytes=PART)
    a, b = pc.load_checkpoint(full), pc.load_checkpoint(inc)
    _equal(a.model_state, b.model_state)
    diff = pc.diff_checkpoints(full, inc)
    assert {t.change for t in diff.tensors} == {"equal"} and len(diff.tensors) == len(model.state_dict())
    assert all(f.name != "model.safetensors" and not layout.PART.fullmatch(f.name) for f in diff.files)
    with pc.open_checkpoint(inc) as reader:
        assert reader.keys() == sorted(model.state_dict())
        assert torch.equal(reader.tensor("base.1.weight"), model.base[1].weight)
        assert torch.equal(reader.tensor("head.bias"), model.head.bias)
    info = pc.inspect_checkpoint(inc)
    assert info.format_version == 3 and info.unknown_files == ()
    assert sorted(t.name for t in info.tensors) == sorted(model.state_dict())


def test_a_format_1_predecessor_is_not_reused_but_the_next_one_is(tmp_path):
    model, opt = _setup()
    pc.save_checkpoint(model, opt, {}, None, 1, tmp_path)
    _, stats = _save_stats(model, opt, 2, tmp_path)
    assert stats.reused == []
    _train(model, opt, 2)
    _, stats = _save_stats(model, opt, 3, tmp_path)
    assert len(stats.written) == 1 and len(stats.reused) >= 3


def test_another_split_reuses_only_parts_of_the_same_tensors(tmp_path):
    model, opt = _setup()
    _save_stats(model, opt, 1, tmp_path)
    stats = Stats()
    snap = _save.snapshot(model, opt, {}, None, 2, incremental=True, part_bytes=1 << 20)
    path = _save.write(snap, tmp_path, stats=stats)
    # the frozen tensors now share one part (written); the head's part holds the same tensors as before,
    # under another name (part 1 of 2, was the last of 8): reused, since a file's bytes do not hold its name
    assert stats.written == [layout.part_name(0, 2)] and stats.reused == [layout.part_name(1, 2)]
    fresh, _ = _setup(seed=4)
    pc.load_checkpoint(path, fresh)
    _equal(fresh.state_dict(), model.state_dict())


def test_tied_tensors_stay_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(16, 8)
            self.out = nn.Linear(8, 16, bias=False)
            self.out.weight = self.emb.weight

    torch.manual_seed(0)
    model = Tied()
    path = pc.save_checkpoint(model, None, {}, None, 1, tmp_path, incremental=True, part_bytes=64)
    doc = json.loads((Path(path) / "manifest.json").read_text())
    assert doc["aliases"] == {"out.weight": "emb.weight"}
    fresh = Tied()
    pc.load_checkpoint(path, fresh)
    assert fresh.out.weight is fresh.emb.weight and torch.equal(fresh.emb.weight, model.emb.weight)


def test_quantized_lora_keeps_its_base_linked_and_loads_quantized(tmp_path):
    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))

    model = pc.quantize(net(), bits=4, group_size=16, mode="lora", lora_rank=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    manager = pc.CheckpointManager(tmp_path, incremental=True, part_bytes=2048)
    for step in (1, 2):
        torch.manual_seed(step)
        loss = model(torch.randn(4, 64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        manager.save(model, opt, {}, None, step)
    first, second = Path(tmp_path / "step-00000001"), Path(tmp_path / "step-00000002")
    doc = json.loads((second / "manifest.json").read_text())
    assert doc["quantization"]["bits"] == 4 and "quantization_metadata.json" in doc["files"]
    linked = [n for n in _parts(second) if os.stat(second / n).st_nlink == 2]
    assert linked and all(os.path.samefile(first / n, second / n) for n in linked)
    frozen = {t for n in linked for t in doc["files"][n]["tensors"]}
    assert not any("lora" in t for t in frozen)
    fresh = pc.prepare_model(second, net())
    assert pc.is_quantized(fresh)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    manager.restore(fresh, fresh_opt)
    _equal(fresh.state_dict(), model.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))


def test_memory_store_reuses_by_copy_under_both_commit_strategies():
    for commit in ("rename", "manifest-last"):
        root = MemoryStorage.from_location(f"memory://inc-{commit}", commit=commit)
        model, opt = _setup()
        _save_stats(model, opt, 1, root)
        _train(model, opt, 1)
        path, stats = _save_stats(model, opt, 2, root)
        assert len(stats.reused) >= 3 and len(stats.written) == 1, commit
        fresh, _ = _setup(seed=2)
        pc.load_checkpoint(path, fresh)
        _equal(fresh.state_dict(), model.state_dict())
        root.remove("step-00000001")
        pc.load_checkpoint(storage_for(path), fresh)
        _equal(fresh.state_dict(), model.state_dict())


def test_async_incremental_saves(tmp_path):
    model, opt = _setup()
    manager = pc.CheckpointManager(tmp_path, incremental=True, part_bytes=PART)
    for step in range(1, 4):
        _train(model, opt, step)
        manager.save(model, opt, {}, None, step, blocking=False)
    manager.wait()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    second = tmp_path / "step-00000003"
    assert any(os.stat(second / n).st_nlink > 1 for n in _parts(second))
    fresh, _ = _setup(seed=8)
    manager.restore(fresh)
    _equal(fresh.state_dict(), expected)


def test_overwriting_the_source_step_itself(tmp_path):
    model, opt = _setup()
    path, _ = _save_stats(model, opt, 1, tmp_path)
    _train(model, opt, 1)
    stats = Stats()
    snap = _save.snapshot(model, opt, {}, None, 1, incremental=True, part_bytes=PART)
    _save.write(snap, tmp_path, overwrite=True, stats=stats)
    assert len(stats.reused) >= 3
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == [".lock"]
    fresh, _ = _setup(seed=6)
    pc.load_checkpoint(path, fresh)
    _equal(fresh.state_dict(), model.state_dict())


def test_a_state_mapping_saves_incrementally(tmp_path):
    state = {f"w{i}": torch.full((512,), float(i)) for i in range(6)}
    pc.save_checkpoint(state, None, {}, None, 1, tmp_path, incremental=True, part_bytes=4096)
    state["w5"] = state["w5"] + 1
    stats = Stats()
    _save.write(_save.snapshot(state, None, {}, None, 2, incremental=True, part_bytes=4096), tmp_path, stats=stats)
    assert len(stats.reused) == 2 and len(stats.written) == 1
    _equal(pc.load_checkpoint(tmp_path).model_state, state)


def test_bad_part_bytes_and_incremental_are_refused_at_the_call(tmp_path):
    model, opt = _setup()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(pc.CheckpointInputError, match="part_bytes"):
            pc.save_checkpoint(model, opt, {}, None, 1, tmp_path, incremental=True, part_bytes=bad)
    with pytest.raises(pc.CheckpointInputError, match="incremental"):
        pc.CheckpointManager(tmp_path, incremental="yes")
    assert not any(p.name.startswith("step-") for p in tmp_path.iterdir())


def test_cli_inspect_and_validate_an_incremental_checkpoint(tmp_path, capsys):
    model, opt = _setup()
    path, _ = _save_stats(model, opt, 1, tmp_path)
    assert main(["validate", str(path)]) == 0
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format_version" in out or "format" in out
    assert "model-00000-of-" in out


def test_a_source_whose_tensor_table_lies_is_not_reused(tmp_path):
    """§21.3: the file checksum decides, not the per-tensor table. A source part whose table was forged to
    claim the tensors now in memory (its file checksum still that of its real bytes) is written, not linked."""
    model, opt = _setup()
    first, _ = _save_stats(model, opt, 1, tmp_path)
    with torch.no_grad():
        model.base[0].weight.add_(1.0)  # memory now differs from the saved bytes
    doc = faults.read_manifest(Path(first))
    part = next(n for n in _parts(Path(first)) if "base.0.weight" in doc["files"][n]["tensors"])
    for name in doc["files"][part]["tensors"]:
        doc["files"][part]["tensors"][name] = _safetensors.tensor_checksum(model.state_dict()[name])
    faults.write_manifest(Path(first), doc)
    second, stats = _save_stats(model, opt, 2, tmp_path)
    assert part in stats.written and len(stats.reused) >= 3
    assert os.stat(Path(second) / part).st_nlink == 1
    fresh, _ = _setup(seed=2)
    pc.load_checkpoint(second, fresh)
    _equal(fresh.state_dict(), model.state_dict())


@pytest.mark.parametrize("rename", ["model-000000-of-00003.safetensors", "model-00000-of-000003.safetensors"])
def test_a_part_name_not_spelled_canonically_is_refused(tmp_path, rename):
    state = {f"w{i}": torch.full((512,), float(i)) for i in range(3)}
    path = Path(pc.save_checkpoint(state, None, {}, None, 1, tmp_path, incremental=True, part_bytes=2048))
    doc = faults.read_manifest(path)
    doc["files"][rename] = doc["files"].pop("model-00000-of-00003.safetensors")
    os.rename(path / "model-00000-of-00003.safetensors", path / rename)
    faults.write_manifest(path, doc)
    with pytest.raises(pc.CheckpointCorruptedError, match="is not how model part 0 of 3 is named"):
        pc.load_checkpoint(path)


def test_a_step_directory_with_parts_but_no_manifest_is_incomplete(tmp_path):
    state = {"w": torch.zeros(4)}
    path = Path(pc.save_checkpoint(state, None, {}, None, 1, tmp_path, incremental=True))
    (path / "manifest.json").unlink()
    moved = tmp_path / "copy"
    path.rename(moved)
    with pytest.raises(pc.CheckpointNotFoundError, match=r"manifest\.json is missing; the checkpoint is incomplete"):
        pc.load_checkpoint(moved)


def test_the_source_is_the_newest_checkpoint_even_when_latest_is_stale(tmp_path):
    """A crash between a commit and the update of ``latest`` leaves it naming an older step: the next save
    still reuses from the newest committed one (found by listing), so the part trained since is linked."""
    model, opt = _setup()
    _save_stats(model, opt, 1, tmp_path)
    _train(model, opt, 1)
    _save_stats(model, opt, 2, tmp_path)
    (tmp_path / "latest").write_text("step-00000001\n")
    path, stats = _save_stats(model, opt, 3, tmp_path)
    assert stats.written == [] and len(stats.reused) == len(_parts(Path(path)))
    head = _parts(Path(path))[-1]
    assert os.path.samefile(tmp_path / "step-00000002" / head, Path(path) / head)


def test_incremental_is_refused_under_a_process_group(tmp_path):
    """Under a process group every save is sharded (format_version 2): incremental=True is refused by
    save_checkpoint and CheckpointManager before anything is written."""
    import torch.distributed as dist

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model, opt = _setup()
        with pytest.raises(pc.CheckpointInputError, match="incremental=True is for one process"):
            pc.save_checkpoint(model, opt, {}, None, 1, tmp_path, incremental=True)
        with pytest.raises(pc.CheckpointInputError, match="incremental=True is for one process"):
            pc.CheckpointManager(tmp_path, incremental=True)
    finally:
        dist.destroy_process_group()
    assert not any(p.name.startswith("step-") for p in tmp_path.iterdir())
