"""Round trips are exact: tensors, optimizer state, config, vocab, step, ties."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from conftest import OPTIMIZERS, TinyLM, train_some
from safetensors import safe_open

from portable_ckpt import load_checkpoint, save_checkpoint
from portable_ckpt.format import manifest as _manifest

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]
SHAPES = [(), (0,), (3,), (2, 3), (2, 0, 4), (1, 1, 1, 5)]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(shape) * 31 + 7)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tensor_round_trip_is_exact(tmp_path, dtype, shape):
    t = _sample(dtype, shape)
    path = save_checkpoint({"t": t}, None, {}, None, 0, tmp_path)
    back = load_checkpoint(path).model_state["t"]
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_non_contiguous_and_special_values(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])
    state = {"transposed": base.t(), "strided": base[:, ::2], "special": special}
    back = load_checkpoint(save_checkpoint(state, None, {}, None, 1, tmp_path)).model_state
    assert torch.equal(back["transposed"], base.t()) and back["transposed"].is_contiguous()
    assert torch.equal(back["strided"], base[:, ::2])
    # bitwise: NaN payload and the sign of zero survive
    assert torch.equal(back["special"].view(torch.int32), special.view(torch.int32))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_model_and_optimizer_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = OPTIMIZERS[name](model.parameters())
    train_some(model, optimizer)
    path = save_checkpoint(model, optimizer, {"lr": 0.1}, ["a", "b"], 100, tmp_path)

    torch.manual_seed(1)
    fresh = TinyLM()
    fresh_opt = OPTIMIZERS[name](fresh.parameters())
    ckpt = load_checkpoint(path, model=fresh, optimizer=fresh_opt)

    for (k, a), (k2, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b)
    saved, restored = optimizer.state_dict(), fresh_opt.state_dict()
    assert saved["param_groups"] == restored["param_groups"]
    assert saved["state"].keys() == restored["state"].keys()
    for idx, state in saved["state"].items():
        for key, value in state.items():
            other = restored["state"][idx][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    # training continues identically from both copies
    train_some(model, optimizer, steps=2, seed=5)
    train_some(fresh, fresh_opt, steps=2, seed=5)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    assert ckpt.step == 100 and ckpt.format_version == 1


def test_tied_weights_are_stored_once_and_retied(tmp_path, trained):
    model, optimizer = trained
    path = save_checkpoint(model, optimizer, {}, None, 3, tmp_path)
    with safe_open(path / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    assert "emb.weight" in stored and "head.weight" not in stored
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["aliases"] == {"head.weight": "emb.weight"}

    fresh = TinyLM()
    ckpt = load_checkpoint(path, model=fresh)
    assert fresh.head.weight is fresh.emb.weight
    assert torch.equal(fresh.head.weight, model.emb.weight)
    assert ckpt.model_state["head.weight"] is ckpt.model_state["emb.weight"]


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float = 3e-4
    layers: int = 2
    name: str = "tiny"
    betas: tuple[float, float] = (0.9, 0.95)
    tags: tuple[str, ...] = ()


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            {"lr": 0.5, "nested": {"a": [1, 2, None], "b": True}, "unicode": "héllo ☃"},
            {"lr": 0.5, "nested": {"a": [1, 2, None], "b": True}, "unicode": "héllo ☃"},
        ),
        (Config(), {"lr": 3e-4, "layers": 2, "name": "tiny", "betas": [0.9, 0.95], "tags": []}),
    ],
    ids=["dict", "dataclass"],
)
def test_config_round_trip(tmp_path, config, expected):
    ckpt = load_checkpoint(save_checkpoint({"w": torch.ones(1)}, None, config, None, 0, tmp_path))
    assert ckpt.config == expected


@pytest.mark.parametrize(
    "vocab", [["a", "b", "\n", "é"], {"<pad>": 0, "x": 1, "y": 7}, None], ids=["list", "dict", "none"]
)
def test_vocab_round_trip_keeps_its_kind(tmp_path, vocab):
    path = save_checkpoint({"w": torch.ones(1)}, None, {}, vocab, 0, tmp_path)
    ckpt = load_checkpoint(path)
    assert ckpt.vocab == vocab and type(ckpt.vocab) is type(vocab)
    assert (path / "vocab.json").exists() == (vocab is not None)


def test_extra_and_step_round_trip(tmp_path):
    path = save_checkpoint({"w": torch.ones(1)}, None, {}, None, 12345678, tmp_path, extra={"epoch": 3, "note": "x"})
    assert path.name == "step-12345678"
    ckpt = load_checkpoint(path)
    assert ckpt.step == 12345678 and ckpt.extra == {"epoch": 3, "note": "x"}


def test_step_directory_and_latest(tmp_path):
    root = tmp_path / "new" / "root"
    first = save_checkpoint({"w": torch.zeros(1)}, None, {}, None, 5, root)
    second = save_checkpoint({"w": torch.ones(1)}, None, {}, None, 100, root)
    assert first == root / "step-00000005" and second == root / "step-00000100"
    assert (root / "latest").read_text() == "step-00000100\n"
    ckpt = load_checkpoint(root)
    assert ckpt.step == 100 and torch.equal(ckpt.model_state["w"], torch.ones(1))


def test_files_read_by_the_official_safetensors_library(tmp_path, trained):
    model, optimizer = trained
    path = save_checkpoint(model, optimizer, {}, None, 0, tmp_path)
    with safe_open(path / "model.safetensors", "pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            assert torch.equal(f.get_tensor(name), model.state_dict()[name])


def test_manifest_is_deterministic_apart_from_time(tmp_path, trained):
    """Two saves of one state (the config's keys in another order) write the same bytes: every file, and the
    whole manifest but for created_at (and manifest_checksum, which covers it)."""
    model, optimizer = trained
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    saves = []
    for name, config in (("a", {"b": 1, "a": 2}), ("b", {"a": 2, "b": 1})):
        random.seed(7)  # the RNG state saved is the same too
        np.random.seed(7)
        torch.manual_seed(7)
        saves.append(
            save_checkpoint(
                model, optimizer, config, ["x", "y"], 3, tmp_path / name, scheduler=scheduler, extra={"epoch": 1}
            )
        )
    a, b = saves
    assert (a / "config.json").read_bytes() == b'{"a":2,"b":1}\n'
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert [f for f in files if (a / f).read_bytes() != (b / f).read_bytes()] == ["manifest.json"]
    ma, mb = (json.loads((p / "manifest.json").read_bytes()) for p in (a, b))
    timeless = [{k: v for k, v in m.items() if k not in ("created_at", "manifest_checksum")} for m in (ma, mb)]
    assert timeless[0] == timeless[1]
    assert set(ma) - set(timeless[0]) == {"created_at", "manifest_checksum"}
    assert sorted(ma["files"]) == sorted(f for f in files if f != "manifest.json")
    # byte for byte: b's manifest at a's time is a's manifest (same canonical JSON, so the same checksum)
    assert _manifest.encode({**mb, "created_at": ma["created_at"]}) == (a / "manifest.json").read_bytes()


def test_load_fills_the_models_own_tensors(tmp_path, trained):
    """No second copy: parameters keep their identity (the optimizer still holds them) and get the values."""
    model, optimizer = trained
    path = save_checkpoint(model, optimizer, {}, None, 1, tmp_path)
    torch.manual_seed(9)
    fresh = TinyLM()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    params = list(fresh.parameters())
    pointers = [p.data_ptr() for p in params]
    ckpt = load_checkpoint(path, model=fresh, optimizer=fresh_opt)
    assert list(fresh.parameters()) == params and [p.data_ptr() for p in params] == pointers
    assert ckpt.model_state["lin.weight"].data_ptr() == fresh.lin.weight.data_ptr()
    assert torch.equal(fresh.lin.weight, model.lin.weight)
    assert fresh_opt.param_groups[0]["params"][0] is params[0]
