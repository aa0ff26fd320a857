"""Quantized models through save_checkpoint / load_checkpoint: exact, quantized on load, checked."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from portable_ckpt import (
    CheckpointInputError,
    CheckpointNotFoundError,
    QuantizationMetadataError,
    StateMismatchError,
    is_quantized,
    load_checkpoint,
    prepare_model,
    quantize,
    save_checkpoint,
)
from portable_ckpt.cli import main
from portable_ckpt.format.manifest import encode

COMBOS = list(itertools.product([8, 4], [True, False], [None, 16]))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(torch.relu(self.fc1(self.emb(ids)))))


IDS = torch.arange(40).reshape(5, 8)


def _float_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _combo_id(c) -> str:
    bits, sym, group = c
    return f"int{bits}-{'sym' if sym else 'asym'}-{'group' + str(group) if group else 'channel'}"


@pytest.mark.parametrize("combo", COMBOS, ids=_combo_id)
@pytest.mark.parametrize("mode", ["ptq", "lora", "qat"])
def test_quantized_round_trip(tmp_path, combo, mode):
    bits, symmetric, group = combo
    original = _float_net()
    reference = {k: v.clone() for k, v in original.state_dict().items()}
    model = quantize(_float_net(), bits=bits, symmetric=symmetric, group_size=group, mode=mode)
    model.eval()
    with torch.no_grad():
        expected = model(IDS)
    path = save_checkpoint(model, None, {}, None, 1, tmp_path)

    fresh = _float_net(seed=5)
    fresh.eval()
    ckpt = load_checkpoint(path, model=fresh)
    assert is_quantized(fresh)
    assert ckpt.quantization["bits"] == bits and ckpt.quantization["mode"] == mode
    assert ckpt.manifest["quantization"]["bits"] == bits
    with torch.no_grad():
        assert torch.equal(fresh(IDS), expected)
    saved, loaded = model.state_dict(), fresh.state_dict()
    assert saved.keys() == loaded.keys()
    for k in saved:
        assert saved[k].dtype == loaded[k].dtype and torch.equal(saved[k], loaded[k]), k
    # dequantized weights lie within half a quantization step of the float weights
    for name in ("emb", "fc1", "fc2"):
        module = getattr(fresh, name)
        w = reference[f"{name}.weight"]
        scale = loaded[f"{name}.weight_scale"]
        step = scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
        assert bool(((module.dequantized_weight() - w).abs() <= step / 2 + 1e-6).all()), name


def test_model_none_returns_stored_tensors_and_metadata(tmp_path):
    model = quantize(_float_net(), bits=4, group_size=16, symmetric=False)
    path = save_checkpoint(model, None, {}, None, 0, tmp_path)
    ckpt = load_checkpoint(path)
    assert ckpt.model_state["fc1.weight_packed"].dtype == torch.int32
    assert torch.equal(ckpt.model_state["fc1.weight_packed"], model.fc1.weight_packed)
    assert ckpt.quantization["packing"] == "int4-in-int32-lsb-first"
    assert {m["name"] for m in ckpt.quantization["modules"]} == {"emb", "fc1", "fc2"}


@pytest.mark.parametrize(("bits", "fraction"), [(8, 1 / 4), (4, 1 / 8)])
def test_quantized_weights_take_a_fraction_of_fp32(tmp_path, bits, fraction):
    model = quantize(_float_net(), bits=bits)
    path = save_checkpoint(model, None, {}, None, 0, tmp_path)
    with safe_open(path / "model.safetensors", "pt") as f:
        for name in ("fc1", "fc2"):
            stored = f.get_tensor(f"{name}.weight" if bits == 8 else f"{name}.weight_packed")
            float_bytes = getattr(_float_net(), name).weight.numel() * 4
            assert stored.numel() * stored.element_size() == float_bytes * fraction
    out = io.StringIO()
    assert main(["inspect", "--json", str(path)], out=out) == 0
    q = json.loads(out.getvalue())["quantization"]
    assert q["bits"] == bits and q["float32_bytes"] == 4 * (40 * 32 + 64 * 32 + 32 * 64)
    assert q["quantized_bytes"] < q["float32_bytes"] * (fraction + 0.1)


def test_full_precision_checkpoint_has_no_quantization(tmp_path):
    path = save_checkpoint(_float_net(), None, {}, None, 0, tmp_path)
    assert not (path / "quantization_metadata.json").exists()
    ckpt = load_checkpoint(path)
    assert ckpt.quantization is None and ckpt.manifest["quantization"] is None


def test_lora_resume_needs_the_optimizer_built_after_quantizing(tmp_path):
    model = quantize(_float_net(), bits=8, mode="lora")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS).pow(2).mean().backward()
    optimizer.step()
    path = save_checkpoint(model, optimizer, {}, None, 1, tmp_path)

    stale = _float_net()
    stale_opt = torch.optim.AdamW(stale.parameters())
    with pytest.raises(
        StateMismatchError,
        match=r"the optimizer holds the float model's parameters.*build the optimizer after quantize\(model, ...\)",
    ):
        load_checkpoint(path, model=stale, optimizer=stale_opt)
    assert not is_quantized(stale)  # refused before the model was touched

    fresh = prepare_model(path, _float_net(seed=3))
    assert is_quantized(fresh)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    load_checkpoint(path, model=fresh, optimizer=fresh_opt)
    assert torch.equal(fresh.fc1.lora_B, model.fc1.lora_B)
    assert fresh_opt.state_dict()["state"][0]["step"] == 1


def _requantized(path: Path, change) -> None:
    meta = json.loads((path / "quantization_metadata.json").read_text())
    change(meta)
    data = (json.dumps(meta, sort_keys=True, separators=(",", ":")) + "\n").encode()
    (path / "quantization_metadata.json").write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    from portable_ckpt.format.hashing import checksum

    manifest["files"]["quantization_metadata.json"] = {"size": len(data), "checksum": checksum(data)}
    (path / "manifest.json").write_bytes(encode(manifest))


@pytest.fixture
def qpath(tmp_path) -> Path:
    return save_checkpoint(quantize(_float_net(), bits=4, symmetric=False), None, {}, None, 0, tmp_path)


def test_missing_metadata_file(qpath):
    """Listed but absent is a missing file like any other (spec §13); not listed at all is bad metadata."""
    (qpath / "quantization_metadata.json").unlink()
    with pytest.raises(
        CheckpointNotFoundError,
        match=r"quantization_metadata.json: quantization_metadata.json is listed in the manifest but missing",
    ):
        load_checkpoint(qpath, model=_float_net())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(bits=3), r"schema violation at \$.bits"),
        (lambda m: m.update(packing="int4-msb-first"), r"schema violation at \$.packing|unknown packing"),
        (lambda m: m["modules"][1]["tensors"].pop("weight_scale"), r'module "fc1"'),
        (lambda m: m["modules"][1]["tensors"]["weight_scale"].update(shape=[64, 2]), r'module "fc1"'),
    ],
    ids=["bits", "packing", "scale-missing", "scale-shape"],
)
def test_invalid_metadata_names_the_problem(qpath, change, message):
    _requantized(qpath, change)
    with pytest.raises(QuantizationMetadataError, match=message):
        load_checkpoint(qpath, model=_float_net())
    assert main(["validate", str(qpath)], out=io.StringIO()) == 1


def test_metadata_disagreeing_with_manifest(qpath):
    _requantized(qpath, lambda m: m.update(bits=8, packing="int8"))
    with pytest.raises(QuantizationMetadataError, match=r"bits is 8 but the manifest says 4"):
        load_checkpoint(qpath)


def test_architecture_mismatch(qpath):
    class Smaller(Net):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(32, 48)

    with pytest.raises(StateMismatchError, match=r"fc1"):
        load_checkpoint(qpath, model=Smaller())


def test_quantize_misuse_is_an_input_error():
    model = quantize(_float_net(), bits=8)
    with pytest.raises(CheckpointInputError, match=r"already quantized"):
        quantize(model)
