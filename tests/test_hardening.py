"""What real training code does to a checkpoint library: lazy tensor bits, wrapped models, odd arguments,
foreign files, and going back to an earlier step. Every case checks values or the exact error."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from portable_ckpt import (
    CheckpointCorruptedError,
    CheckpointInputError,
    CheckpointManager,
    CheckpointNotFoundError,
    StateMismatchError,
    load_checkpoint,
    save_checkpoint,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.out = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.lin(x))


def net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def same_params(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_conjugate_and_negative_bits_are_saved_as_the_values_they_show(tmp_path):
    base = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    state = {"conj": base.conj(), "neg": torch._neg_view(torch.tensor([1.0, -2.0]))}
    assert state["conj"].is_conj() and state["neg"].is_neg()
    path = save_checkpoint(state, None, {}, None, 1, tmp_path)
    loaded = load_checkpoint(path).model_state
    assert torch.equal(loaded["conj"], torch.tensor([1 - 2j, 3 + 4j], dtype=torch.complex64))
    assert torch.equal(loaded["neg"], torch.tensor([-1.0, 2.0]))
    assert not loaded["conj"].is_conj()


def test_conjugated_parameter_loads_into_a_model_with_its_values(tmp_path):
    class C(nn.Module):
        def __init__(self, value: torch.Tensor) -> None:
            super().__init__()
            self.w = nn.Parameter(value)

    src = C(torch.tensor([1 + 1j, 2 - 3j], dtype=torch.complex64).conj())
    path = save_checkpoint(src, None, {}, None, 1, tmp_path)
    dst = C(torch.zeros(2, dtype=torch.complex64).conj())
    load_checkpoint(path, dst)
    assert torch.equal(dst.w.resolve_conj(), torch.tensor([1 - 1j, 2 + 3j], dtype=torch.complex64))


def test_sparse_tensors_are_refused_with_their_name(tmp_path):
    state = {"emb.weight": torch.eye(3).to_sparse()}
    with pytest.raises(CheckpointInputError, match=r'tensor "emb.weight" has layout torch.sparse_coo'):
        save_checkpoint(state, None, {}, None, 1, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_config_over_the_json_limit_is_refused_at_save(tmp_path):
    config = {"blob": "x" * (64 * 1024 * 1024)}
    with pytest.raises(CheckpointInputError, match=r"config is 67,108,876 bytes as JSON, over the format's limit"):
        save_checkpoint(net(0), None, config, None, 1, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "map_location",
    ["cpu", "cpu:0", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, location: storage, None],
    ids=["str", "cpu:0", "device", "dict", "callable", "none"],
)
def test_map_location_takes_what_torch_load_takes(tmp_path, map_location):
    model = net(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(model, opt, {}, None, 1, tmp_path)
    fresh = net(2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    ckpt = load_checkpoint(path, fresh, fresh_opt, map_location=map_location)
    assert same_params(model, fresh)
    assert all(t.device.type == "cpu" for t in ckpt.model_state.values())
    assert torch.equal(
        fresh_opt.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"]
    )


@pytest.mark.parametrize(
    ("map_location", "message"),
    [
        ("bogus", r"map_location 'bogus' is not a usable device here: Expected one of cpu"),
        ({"cpu": "nowhere"}, r"map_location \['cpu'\] = 'nowhere' is not a usable device here"),
        ({0: "cpu"}, r"map_location keys must be device names \(str\), found 0"),
        (3.5, r"map_location is a float; pass a device name, a torch.device, a dict"),
    ],
)
def test_a_bad_map_location_is_an_input_error_not_a_damaged_file(tmp_path, map_location, message):
    path = save_checkpoint(net(1), None, {}, None, 1, tmp_path)
    with pytest.raises(CheckpointInputError, match=message):
        load_checkpoint(path, map_location=map_location)


def test_compiled_and_data_parallel_models_save_unwrapped_names_and_load_both_ways(tmp_path):
    model = net(3)
    for i, wrapped in enumerate((torch.compile(model), nn.DataParallel(model))):
        assert all(k.startswith(("_orig_mod.", "module.")) for k in wrapped.state_dict())
        path = save_checkpoint(wrapped, None, {}, None, i + 1, tmp_path)
        ckpt = load_checkpoint(path)
        assert sorted(ckpt.model_state) == ["lin.bias", "lin.weight", "out.bias", "out.weight"]
        plain = net(4)
        load_checkpoint(path, plain)
        assert same_params(plain, model)
        rewrapped_inner = net(5)
        load_checkpoint(path, torch.compile(rewrapped_inner))
        assert same_params(rewrapped_inner, model)


def test_a_prefixed_state_names_the_prefix_and_the_fix(tmp_path):
    prefixed = {f"module.{k}": v for k, v in net(6).state_dict().items()}
    path = save_checkpoint(prefixed, None, {}, None, 1, tmp_path)
    with pytest.raises(StateMismatchError, match=r"every checkpoint key has the prefix 'module\.' that the model"):
        load_checkpoint(path, net(7))


def test_strict_false_reports_the_keys_it_skipped(tmp_path):
    src = net(8)
    state = {k: v for k, v in src.state_dict().items() if k != "out.bias"}
    state["extra.scale"] = torch.ones(1)
    path = save_checkpoint(state, None, {}, None, 1, tmp_path)
    dst = net(9)
    ckpt = load_checkpoint(path, dst, strict=False)
    assert ckpt.missing_keys == ("out.bias",)
    assert ckpt.unexpected_keys == ("extra.scale",)
    assert torch.equal(dst.lin.weight, src.lin.weight)


def test_an_optimizer_for_a_checkpoint_without_one_is_refused_before_the_model_changes(tmp_path):
    path = save_checkpoint(net(10), None, {}, None, 1, tmp_path)
    model = net(11)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(StateMismatchError, match=r"optimizer.pt: the checkpoint holds no optimizer state, but an? "):
        load_checkpoint(path, model, opt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda d: (torch.save({"w": torch.ones(1)}, d / "model.pt"), d / "model.pt")[1], "a torch.save file"),
        (lambda d: (torch.save({"state_dict": {}}, d / "epoch=3.ckpt"), d / "epoch=3.ckpt")[1], "PyTorch Lightning"),
        (lambda d: (torch.save({}, d / "blob"), d / "blob")[1], "a zip file (torch.save writes zip files)"),
    ],
    ids=["pt", "lightning", "zip"],
)
def test_a_foreign_file_is_named(tmp_path, make, what):
    with pytest.raises(
        CheckpointNotFoundError, match=rf"not a directory but .*{re.escape(what)}.*; it is not a portable checkpoint"
    ):
        load_checkpoint(make(tmp_path))


def test_a_trainer_folder_is_named(tmp_path):
    folder = tmp_path / "checkpoint-500"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 500}))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointNotFoundError, match=r"checkpoint-500: a Hugging Face Trainer checkpoint folder"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    "step", [np.int64(5), np.uint16(5), np.int32(5), torch.tensor(5), torch.tensor(5, dtype=torch.int32)]
)
def test_steps_from_numpy_and_tensors(tmp_path, step):
    path = save_checkpoint(net(0), None, {}, None, step, tmp_path)
    assert Path(path).name == "step-00000005" and load_checkpoint(path).step == 5


@pytest.mark.parametrize("step", [5.0, True, np.float32(5), torch.tensor(5.0), torch.tensor([5]), -1])
def test_steps_that_are_not_integers_are_refused(tmp_path, step):
    with pytest.raises(CheckpointInputError, match=r"step must be an integer >= 0 \(int, NumPy integer or 0-d"):
        save_checkpoint(net(0), None, {}, None, step, tmp_path)


def test_a_tokenizer_is_stored_as_its_vocabulary(tmp_path):
    class Tokenizer:
        def get_vocab(self) -> dict[str, int]:
            return {"<pad>": 0, "a": 1, "b": 2}

    path = save_checkpoint(net(0), None, {}, Tokenizer(), 1, tmp_path)
    assert load_checkpoint(path).vocab == {"<pad>": 0, "a": 1, "b": 2}


def test_drop_after_rewinds_a_root_only_when_asked(tmp_path):
    manager = CheckpointManager(tmp_path)
    for step in (10, 20, 30):
        manager.save(net(step), None, {"step": step}, None, step)
    ckpt = manager.restore(net(0), step=20)
    assert ckpt is not None and ckpt.config == {"step": 20}
    with pytest.raises(
        CheckpointInputError, match=r"step 21 is not after the newest checkpoint .* call drop_after\(N\)"
    ):
        manager.save(net(21), None, {}, None, 21)
    assert manager.steps() == [10, 20, 30]  # the refusal deleted nothing
    assert manager.drop_after(20) == [30]
    assert manager.steps() == [10, 20] and (tmp_path / "latest").read_text() == "step-00000020\n"
    manager.save(net(21), None, {"step": 21}, None, 21)
    assert manager.steps() == [10, 20, 21]


def test_restore_can_fall_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    manager = CheckpointManager(tmp_path)
    for step in (1, 2, 3):
        manager.save(net(step), None, {"step": step}, None, step)
    damaged = tmp_path / "step-00000003" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0x55
    damaged.write_bytes(bytes(data))
    model = net(0)
    with pytest.raises(CheckpointCorruptedError, match=r"model.safetensors: checksum mismatch.*filled in place"):
        manager.restore(model)
    with pytest.warns(UserWarning, match=r"skipped .*step-00000003: CheckpointCorruptedError: .*; trying step 2"):
        ckpt = manager.restore(model, fall_back=True)
    assert ckpt is not None and ckpt.step == 2 and same_params(model, net(2))
    assert [(Path(p).name, e.split(":")[0]) for p, e in manager.skipped] == [
        ("step-00000003", "CheckpointCorruptedError")
    ]


def test_numpy_scalars_in_config_are_stored_as_the_python_values_equal_to_them(tmp_path):
    config = {
        "lr": np.float32(0.1),
        "half": np.float16(0.1),
        "steps": np.int64(-3),
        "small": np.uint8(7),
        "flag": np.bool_(True),
        "nested": [np.int32(2), {"x": np.float64(1.5)}],
    }
    path = save_checkpoint(net(0), None, config, None, 1, tmp_path, extra={"seed": np.int64(11)})
    ckpt = load_checkpoint(path)
    assert ckpt.config == config and ckpt.extra == {"seed": 11}
    assert type(ckpt.config["lr"]) is float and ckpt.config["lr"] == float(np.float32(0.1))
    assert type(ckpt.config["flag"]) is bool and type(ckpt.config["steps"]) is int


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"id2label": {0: "neg", 1: "pos"}},
            r"config\['id2label'\] has key 0 of type int; JSON keys are strings, and ",
        ),
        ({"w": np.zeros(2)}, r"config\['w'\] is a numpy.ndarray, which is not a JSON value .* belongs in the model"),
        ({"w": torch.ones(1)}, r"config\['w'\] is a torch.Tensor, which is not a JSON value"),
        ({"nan": np.float32("nan")}, r"config\['nan'\] is nan: JSON has no NaN or Infinity"),
    ],
    ids=["hf-id2label", "ndarray", "tensor", "numpy-nan"],
)
def test_config_values_that_would_not_load_back_equal_are_refused_with_the_remedy(tmp_path, config, message):
    with pytest.raises(CheckpointInputError, match=message):
        save_checkpoint(net(0), None, config, None, 1, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_distributed_data_parallel_saves_the_inner_names(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = net(12)
        ddp = nn.parallel.DistributedDataParallel(model)
        assert all(k.startswith("module.") for k in ddp.state_dict())
        path = save_checkpoint(ddp, None, {}, None, 1, tmp_path / "root")
        assert sorted(load_checkpoint(path).model_state) == ["lin.bias", "lin.weight", "out.bias", "out.weight"]
        other = nn.parallel.DistributedDataParallel(net(13))
        load_checkpoint(path, other)
        assert same_params(other.module, model)
    finally:
        dist.destroy_process_group()


READ_ONLY_PROBE = """
import sys
from portable_ckpt import CheckpointManager, load_checkpoint, validate_checkpoint
root = sys.argv[1]
manager = CheckpointManager(root)
ckpt = manager.restore()
print(ckpt.step, manager.steps(), load_checkpoint(root).step, validate_checkpoint(root).valid)
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to drop to nobody")
def test_a_read_only_root_restores_without_write_access(tmp_path):
    """As an unprivileged user who cannot write the root (a shared mount): restore, load and validate work,
    and nothing is written, not even the lock file, although a crashed save left a temporary behind."""
    shared = Path(tempfile.mkdtemp(prefix="portable-ckpt-ro-"))
    try:
        shared.chmod(0o755)
        root = shared / "root"
        manager = CheckpointManager(root)
        for step in (1, 2):
            manager.save(net(step), None, {}, None, step)
        (root / ".tmp-step-00000003-999999999-0123abcd").mkdir()  # a crashed writer's leftover
        for p in (root, *root.rglob("*")):
            p.chmod(0o555 if p.is_dir() else 0o444)
        before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", READ_ONLY_PROBE]
        done = subprocess.run([*cmd, str(root)], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == ["2", "[1,", "2]", "2", "True"]
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before  # the leftover stays too
    finally:
        for p in (shared, *shared.rglob("*")):
            p.chmod(0o755)
        shutil.rmtree(shared)


def test_a_mismatch_outside_the_quantized_modules_is_raised_before_the_model_is_converted(tmp_path):
    from portable_ckpt import is_quantized, quantize

    class WithNorm(Net):
        def __init__(self, norm: bool) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(2) if norm else nn.Identity()

    torch.manual_seed(0)
    path = save_checkpoint(quantize(WithNorm(norm=True), bits=8), None, {}, None, 1, tmp_path)
    plain = WithNorm(norm=False)
    with pytest.raises(
        StateMismatchError,
        match=r"unexpected keys \(in the checkpoint, not in the model\): \['norm.bias', 'norm.weight'\]",
    ):
        load_checkpoint(path, plain)
    assert not is_quantized(plain)  # nothing was replaced
    fresh = WithNorm(norm=True)
    load_checkpoint(path, fresh)
    assert is_quantized(fresh)
