"""export_checkpoint: a folder transformers' from_pretrained loads, full precision or compressed-tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from portable_ckpt import (
    CheckpointExistsError,
    CheckpointInputError,
    export_checkpoint,
    import_checkpoint,
    load_checkpoint,
    quantize,
    save_checkpoint,
)
from portable_ckpt.quant.packing import unpack_int32, unpack_zero_point

transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402

IGNORE = ("model.embed_tokens", "lm_head")
IDS = torch.arange(24).reshape(2, 12) % 64


def tiny_llama(tie: bool = False) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def hf_config(model: torch.nn.Module) -> dict:
    return json.loads(model.config.to_json_string())  # id2label keys as strings, as config.json has them


def save(model: torch.nn.Module, tmp_path, name: str = "ckpt"):
    return save_checkpoint(model, None, hf_config(model), None, 1, tmp_path / name)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def from_pretrained(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_hf_export_of_a_full_precision_model_gives_the_same_logits(tmp_path, tie):
    model = tiny_llama(tie)
    report = export_checkpoint(save(model, tmp_path), tmp_path / "hf", to="hf")
    assert sorted(p.name for p in report.path.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(logits(from_pretrained(report.path)), logits(model))
    if tie:
        assert "lm_head.weight" not in load_file(report.path / "model.safetensors")
        assert [e.entry for e in report.changed] == ["lm_head.weight"]
    else:
        assert report.changed == ()


def test_hf_export_imports_back_with_the_same_tensors(tmp_path):
    model = tiny_llama()
    export_checkpoint(save(model, tmp_path), tmp_path / "hf", to="hf")
    imported = import_checkpoint(tmp_path / "hf", tmp_path / "again")
    state = load_checkpoint(imported.path).model_state
    ours = model.state_dict()
    assert sorted(state) == sorted(ours)
    assert all(torch.equal(state[k], ours[k]) for k in ours)


@pytest.mark.parametrize("bits", [8, 4])
def test_hf_export_of_a_quantized_model_writes_its_dequantized_weights(tmp_path, bits):
    model = quantize(tiny_llama(), bits=bits, group_size=16, ignore=IGNORE)
    report = export_checkpoint(save(model, tmp_path), tmp_path / "hf", to="hf")
    assert torch.equal(logits(from_pretrained(report.path)), logits(model))
    assert "model.layers.0.mlp.up_proj.weight" in {e.entry for e in report.changed}


def test_hf_export_of_a_lora_model_merges_the_adapters(tmp_path):
    model = quantize(tiny_llama(), bits=4, ignore=IGNORE, mode="lora", lora_rank=2)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p)  # nonzero adapters, so the merge shows
    report = export_checkpoint(save(model, tmp_path), tmp_path / "hf", to="hf")
    torch.testing.assert_close(logits(from_pretrained(report.path)), logits(model), rtol=1e-5, atol=1e-5)
    assert "LoRA adapters merged" in report.changed[0].detail


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [None, 16])
def test_compressed_tensors_export_loads_in_transformers_with_the_same_logits(tmp_path, bits, group_size):
    model = quantize(tiny_llama(), bits=bits, group_size=group_size, ignore=IGNORE)
    report = export_checkpoint(save(model, tmp_path), tmp_path / "ct", to="compressed-tensors")
    qc = json.loads((report.path / "config.json").read_text())["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (qc["quant_method"], qc["format"], qc["ignore"]) == (
        "compressed-tensors",
        "pack-quantized",
        ["lm_head", "model.embed_tokens"],
    )
    assert (weights["num_bits"], weights["strategy"], weights["group_size"]) == (
        bits,
        "group" if group_size else "channel",
        group_size,
    )
    assert torch.equal(logits(from_pretrained(report.path)), logits(model))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_codes_scales_and_zero_points_are_ours_bitwise(tmp_path, bits, symmetric):
    model = quantize(tiny_llama(), bits=bits, symmetric=symmetric, group_size=16, ignore=IGNORE)
    ckpt = load_checkpoint(save(model, tmp_path))
    report = export_checkpoint(ckpt.path, tmp_path / "ct", to="compressed-tensors")
    written = load_file(report.path / "model.safetensors")
    qc = json.loads((report.path / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(**qc["config_groups"]["group_0"]["weights"])
    )
    ours = ckpt.model_state
    for module in ckpt.quantization["modules"]:
        name, (rows, cols) = module["name"], module["shape"]
        t = {role: written[f"{name}.{role}"] for role in ("weight_packed", "weight_scale", "weight_shape")}
        assert t["weight_shape"].tolist() == [rows, cols]
        assert torch.equal(t["weight_scale"], ours[f"{name}.weight_scale"])
        codes = ours[f"{name}.weight"] if bits == 8 else unpack_int32(ours[f"{name}.weight_packed"], 4, cols)
        assert torch.equal(unpack_int32(t["weight_packed"], bits, cols), codes)
        if symmetric:
            assert f"{name}.weight_zero_point" not in written
        else:
            t["weight_zero_point"] = written[f"{name}.weight_zero_point"]
            assert t["weight_zero_point"].shape == ((rows + 32 // bits - 1) // (32 // bits), cols // 16)
            zp = ours[f"{name}.weight_zero_point"]
            zp = zp if bits == 8 else unpack_zero_point(zp, 4, rows)
            assert torch.equal(unpack_zero_point(t["weight_zero_point"], bits, rows), zp)
        # compressed-tensors' own decompression gives our dequantized weight exactly
        weight = PackedQuantizationCompressor.decompress(t, scheme)["weight"]
        assert torch.equal(weight, model.get_submodule(name).dequantized_weight())


def test_compressed_tensors_export_drops_qat_master_weights_and_says_so(tmp_path):
    model = quantize(tiny_llama(), bits=4, ignore=IGNORE, mode="qat")
    report = export_checkpoint(save(model, tmp_path), tmp_path / "ct", to="compressed-tensors")
    assert "model.layers.0.mlp.up_proj.weight_master" in {e.entry for e in report.changed}
    assert not any(k.endswith("weight_master") for k in load_file(report.path / "model.safetensors"))
    assert torch.equal(logits(from_pretrained(report.path)), logits(model))


def test_compressed_tensors_export_refuses_lora_and_names_the_option(tmp_path):
    model = quantize(tiny_llama(), bits=4, ignore=IGNORE, mode="lora", lora_rank=2)
    with pytest.raises(CheckpointInputError, match=r'LoRA checkpoint \(rank 2\).*export with to="hf" \(--to hf\)'):
        export_checkpoint(save(model, tmp_path), tmp_path / "ct", to="compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_compressed_tensors_export_refuses_a_full_precision_model(tmp_path):
    with pytest.raises(
        CheckpointInputError, match="a full-precision checkpoint; compressed-tensors needs a quantized one"
    ):
        export_checkpoint(save(tiny_llama(), tmp_path), tmp_path / "ct", to="compressed-tensors")


def test_architecture_config_comes_from_the_option_when_the_training_config_is_not_hf(tmp_path):
    model = tiny_llama()
    path = save_checkpoint(model, None, {"lr": 0.1}, None, 1, tmp_path / "ckpt")
    with pytest.raises(CheckpointInputError, match=r"not a Hugging Face config; pass the architecture with config="):
        export_checkpoint(path, tmp_path / "hf", to="hf")
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(hf_config(model)))
    for config in (hf_config(model), config_file):
        out = tmp_path / f"hf-{type(config).__name__}"
        export_checkpoint(path, out, to="hf", config=config)
        assert torch.equal(logits(from_pretrained(out)), logits(model))


def test_export_refuses_an_unknown_target_and_an_existing_folder(tmp_path):
    path = save(tiny_llama(), tmp_path)
    with pytest.raises(CheckpointInputError, match=r"to='gguf': expected one of 'hf', 'compressed-tensors'"):
        export_checkpoint(path, tmp_path / "out", to="gguf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(CheckpointExistsError, match="already exists; export into a new or empty folder"):
        export_checkpoint(path, tmp_path / "out", to="hf")


def test_cli_export_prints_the_folder_and_each_change(tmp_path, capsys):
    from portable_ckpt.cli import main

    model = tiny_llama(tie=True)
    path = save(model, tmp_path)
    assert main(["export", str(path), str(tmp_path / "hf"), "--to", "hf"]) == 0
    out = capsys.readouterr().out
    assert out == (
        f"{tmp_path / 'hf'}\n"
        f"exported {path} as hf: config.json, model.safetensors\n"
        "changed: 1\n"
        "  lm_head.weight: not written: tied to model.embed_tokens.weight (tie_word_embeddings)\n"
    )
    assert torch.equal(logits(from_pretrained(tmp_path / "hf")), logits(model))
    assert main(["export", str(path), str(tmp_path / "ct"), "--to", "compressed-tensors", "--json"]) == 1
    assert "CheckpointInputError: " in capsys.readouterr().err


def test_hf_export_of_an_incremental_checkpoint_gives_the_same_logits(tmp_path):
    """An incremental checkpoint (format_version 3: the model in parts, the tied head an alias) exports like
    a format-1 one."""
    model = tiny_llama(tie=True)
    model.model.embed_tokens.weight.requires_grad_(False)
    path = save_checkpoint(model, None, hf_config(model), None, 1, tmp_path / "inc", incremental=True, part_bytes=8192)
    assert json.loads((path / "manifest.json").read_text())["format_version"] == 3
    report = export_checkpoint(path, tmp_path / "hf", to="hf")
    assert torch.equal(logits(from_pretrained(report.path)), logits(model))
