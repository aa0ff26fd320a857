"""import_checkpoint of compressed-tensors folders: quantized checkpoints with the very codes, scales and zero
points; folders written by compressed-tensors itself read as its own decompression reads them; refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from portable_ckpt import (
    CheckpointCorruptedError,
    CheckpointInputError,
    export_checkpoint,
    import_checkpoint,
    load_checkpoint,
    quantize,
    save_checkpoint,
    validate_checkpoint,
)
from portable_ckpt.cli import main
from portable_ckpt.quant.packing import unpack_int32, unpack_zero_point

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor, ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

IGNORE = ("model.embed_tokens", "lm_head")
IDS = torch.arange(24).reshape(2, 12) % 64
Q_PROJ = "model.layers.0.self_attn.q_proj"


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,  # linear layers with a bias, carried beside the codes
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def exported(tmp_path: Path, *, bits: int = 4, symmetric: bool = False, group_size: int | None = 16) -> Path:
    """A compressed-tensors folder written by export_checkpoint from a quantized tiny Llama."""
    model = quantize(tiny_llama(), bits=bits, symmetric=symmetric, group_size=group_size, ignore=IGNORE)
    ckpt = save_checkpoint(model, None, json.loads(model.config.to_json_string()), None, 1, tmp_path / "ckpt")
    return export_checkpoint(ckpt, tmp_path / "ct", to="compressed-tensors").path


def compressed_by_ct(tmp_path: Path, fmt: str, bits: int, symmetric: bool, group_size: int | None) -> Path:
    """A folder written by compressed-tensors' own ModelCompressor; scales and zero points from its own
    qparams rule (calculate_qparams over each group's min and max)."""
    model = tiny_llama()
    args = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=symmetric,
        strategy="group" if group_size else "channel",
        group_size=group_size,
    )
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        ignore=["lm_head"],
        quantization_status=QuantizationStatus.FROZEN,
    )
    apply_quantization_config(model, config, show_progress=False)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.detach()
            grouped = w.reshape(w.shape[0], -1, group_size or w.shape[1])
            scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    out = tmp_path / "by-ct"
    model.save_pretrained(out)
    compressor.update_config(str(out))
    return out


def quantization_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def edit_config(folder: Path, edit: Any) -> None:
    doc = json.loads((folder / "config.json").read_text())
    edit(doc["quantization_config"])
    (folder / "config.json").write_text(json.dumps(doc))


def edit_weights(folder: Path, edit: Any) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


# --------------------------------------------------------------------------------------------------
# round trips: export, then import
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [None, 16], ids=["channel", "group16"])
def test_export_then_import_gives_back_the_codes_scales_and_zero_points(tmp_path, bits, symmetric, group_size):
    model = quantize(tiny_llama(), bits=bits, symmetric=symmetric, group_size=group_size, ignore=IGNORE)
    original = load_checkpoint(
        save_checkpoint(model, None, json.loads(model.config.to_json_string()), None, 1, tmp_path / "ckpt")
    )
    folder = export_checkpoint(original.path, tmp_path / "ct", to="compressed-tensors").path
    report = import_checkpoint(folder, tmp_path / "imported")
    assert report.kind == "compressed-tensors"
    assert report.not_carried == ()
    validate_checkpoint(report.path)
    ckpt = load_checkpoint(report.path)
    # every tensor as the original checkpoint stored it, the float lm_head and embedding included
    assert sorted(ckpt.model_state) == sorted(original.model_state)
    for name, ours in original.model_state.items():
        back = ckpt.model_state[name]
        assert back.dtype == ours.dtype and torch.equal(back, ours), name
    theirs, again = original.quantization, ckpt.quantization
    scheme = ("mode", "bits", "symmetric", "granularity", "group_size", "packing", "compute_dtype", "lora")
    assert {k: again[k] for k in scheme} == {k: theirs[k] for k in scheme}
    assert sorted(again["modules"], key=lambda m: m["name"]) == sorted(theirs["modules"], key=lambda m: m["name"])
    assert (again["method"], sorted(again["ignored_modules"])) == ("compressed-tensors", sorted(IGNORE))
    assert "quantization_config" not in ckpt.config  # the architecture config, as a later export needs it
    origin = ckpt.extra["imported_from"]
    assert (origin["kind"], origin["quantization_config"]) == ("compressed-tensors", quantization_config(folder))
    # loads back into a quantized model computing exactly what the original computed
    fresh = tiny_llama(seed=1)
    load_checkpoint(report.path, model=fresh)
    assert torch.equal(logits(fresh), logits(model))
    # and exports again to the same tensors
    again_folder = export_checkpoint(report.path, tmp_path / "ct-again", to="compressed-tensors").path
    first, second = load_file(folder / "model.safetensors"), load_file(again_folder / "model.safetensors")
    assert sorted(first) == sorted(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_sharded_folder_imports_and_a_damaged_shard_is_named(tmp_path):
    folder = exported(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()
    report = import_checkpoint(folder, tmp_path / "imported")
    state = load_checkpoint(report.path).model_state
    for role in ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "bias"):
        assert torch.equal(state[f"{Q_PROJ}.{role}"], tensors[f"{Q_PROJ}.{role}"]), role  # int4: as stored
    shard = index["weight_map"][f"{Q_PROJ}.weight_scale"]
    moved = load_file(folder / shard)
    moved[f"{Q_PROJ}.weight_scale"] = moved[f"{Q_PROJ}.weight_scale"][:, :1].contiguous()
    save_file(moved, folder / shard)
    with pytest.raises(
        CheckpointCorruptedError,
        match=rf'{shard}: tensor "{Q_PROJ}.weight_scale" is F32 \[32, 1\], expected F32 \[32, 2\]',
    ):
        import_checkpoint(folder, tmp_path / "again")


# --------------------------------------------------------------------------------------------------
# folders compressed-tensors wrote itself
# --------------------------------------------------------------------------------------------------

CT_SCHEMES = [
    ("pack-quantized", 4, True, 16),
    ("pack-quantized", 4, False, None),
    ("pack-quantized", 8, True, None),
    ("pack-quantized", 8, False, 16),
    ("naive-quantized", 8, True, 16),
    ("naive-quantized", 8, False, None),
    ("naive-quantized", 4, False, 16),
]


@pytest.mark.parametrize(("fmt", "bits", "symmetric", "group_size"), CT_SCHEMES, ids=lambda v: str(v))
def test_folder_written_by_compressed_tensors_dequantizes_as_its_own_decompression(
    tmp_path, fmt, bits, symmetric, group_size
):
    folder = compressed_by_ct(tmp_path, fmt, bits, symmetric, group_size)
    report = import_checkpoint(folder, tmp_path / "imported")
    assert report.kind == "compressed-tensors"
    model = tiny_llama(seed=1)
    ckpt = load_checkpoint(report.path, model=model)
    assert (ckpt.quantization["bits"], ckpt.quantization["symmetric"], ckpt.quantization["group_size"]) == (
        bits,
        symmetric,
        group_size,
    )
    assert ckpt.quantization["ignored_modules"] == ["lm_head"]
    stored = load_file(folder / "model.safetensors")
    group = quantization_config(folder)["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]))
    compressor = BaseCompressor.get_value_from_registry(fmt)
    names = [m["name"] for m in ckpt.quantization["modules"]]
    assert len(names) == 14  # every Linear layer but the ignored lm_head
    for name in names:
        tensors = {k[len(name) + 1 :]: v for k, v in stored.items() if k.startswith(f"{name}.")}
        theirs = compressor.decompress(tensors, scheme)["weight"]
        ours = model.get_submodule(name).dequantized_weight()
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), name
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(model.state_dict()[name], stored[name])


def test_cli_import_of_a_compressed_tensors_folder(tmp_path, capsys):
    folder = exported(tmp_path, bits=8)
    assert main(["import", str(folder), str(tmp_path / "imported")]) == 0
    out = capsys.readouterr().out
    assert "imported compressed-tensors" in out
    assert (
        "config.json['quantization_config']: quantization_metadata.json: 14 linear modules, pack-quantized int8 "
        "asymmetric group_size 16; codes, scales and zero points as stored; int8 codes and zero points unpacked to "
        "I8 (weight_shape becomes the module's shape); the block itself in "
        "extra['imported_from']['quantization_config']"
    ) in out


# --------------------------------------------------------------------------------------------------
# quantization a portable checkpoint cannot hold: refused, naming the config.json field
# --------------------------------------------------------------------------------------------------

G0 = "quantization_config.config_groups.group_0"


def _weights(**changes: Any) -> Any:
    return lambda qc: qc["config_groups"]["group_0"]["weights"].update(changes)


def _second_group(qc: dict[str, Any]) -> None:
    group = json.loads(json.dumps(qc["config_groups"]["group_0"]))
    group["weights"]["num_bits"] = 8
    group["targets"] = ["re:.*mlp.*"]
    qc["config_groups"]["group_1"] = group


REFUSED = {
    "activations": (
        lambda qc: qc["config_groups"]["group_0"].update(input_activations={"num_bits": 8, "type": "int"}),
        rf'{G0}.input_activations is {{"num_bits": 8, "type": "int"}}; the importer supports null',
    ),
    "float": (_weights(type="float", num_bits=8), rf'{G0}.weights.type is "float"; the importer supports "int"'),
    "bits": (_weights(num_bits=2), rf"{G0}.weights.num_bits is 2; the importer supports 4, 8"),
    "strategy": (
        _weights(strategy="tensor", group_size=None),
        rf'{G0}.weights.strategy is "tensor"; the importer supports "channel", "group"',
    ),
    "actorder": (_weights(actorder="weight"), rf'{G0}.weights.actorder is "weight"; the importer supports null'),
    "dynamic": (_weights(dynamic=True), rf"{G0}.weights.dynamic is true; the importer supports false"),
    "format": (
        lambda qc: qc.update(format="int-quantized"),
        r'quantization_config.format is "int-quantized"; the importer supports "pack-quantized", "naive-quantized"',
    ),
    "method": (
        lambda qc: qc.update(quant_method="gptq"),
        r'quantization_config.quant_method is "gptq"; the importer supports "compressed-tensors"',
    ),
    "status": (
        lambda qc: qc.update(quantization_status="frozen"),
        r'quantization_config.quantization_status is "frozen"; the importer supports "compressed"',
    ),
    "embedding": (
        lambda qc: qc["config_groups"]["group_0"].update(targets=["Linear", "Embedding"]),
        rf"{G0}.targets is \[\"Linear\", \"Embedding\"\]; the importer supports targets without 'Embedding'",
    ),
    "two schemes": (
        _second_group,
        r"quantization_config.config_groups holds 2 different schemes \(group_0: pack-quantized int4 asymmetric group_size 16; "
        r"group_1: pack-quantized int8 asymmetric group_size 16\); a portable checkpoint holds one scheme",
    ),
}


@pytest.fixture(scope="module")
def int4_folder(tmp_path_factory) -> Path:
    return exported(tmp_path_factory.mktemp("int4"))


@pytest.mark.parametrize("case", list(REFUSED))
def test_unrepresentable_quantization_is_refused_naming_the_field(int4_folder, tmp_path, case):
    edit, message = REFUSED[case]
    folder = Path(shutil.copytree(int4_folder, tmp_path / "ct"))
    edit_config(folder, edit)
    # refused before any weight is read: a truncated weights file is never reached
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointInputError, match=rf"{folder / 'config.json'}: {message}") as e:
        import_checkpoint(folder, tmp_path / "out")
    assert e.value.file == str(folder / "config.json")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# damaged folders: a specific error naming the file and the tensor
# --------------------------------------------------------------------------------------------------


def _pop(role: str) -> Any:
    return lambda t: t.pop(f"{Q_PROJ}.{role}")


def _set(role: str, value: torch.Tensor) -> Any:
    return lambda t: t.__setitem__(f"{Q_PROJ}.{role}", value)


def _unpacked_zero_point(t: dict[str, torch.Tensor]) -> None:
    t[f"{Q_PROJ}.weight_zero_point"] = unpack_zero_point(t[f"{Q_PROJ}.weight_zero_point"], 4, 32).to(torch.int32)


DAMAGED = {
    "shape": (
        _set("weight_shape", torch.tensor([32, 40])),
        rf'tensor "{Q_PROJ}.weight_packed" is I32 \[32, 4\], expected I32 \[32, 5\] for weight_shape \[32, 40\]',
    ),
    "shape dtype": (
        _set("weight_shape", torch.tensor([32.0, 32.0])),
        rf'tensor "{Q_PROJ}.weight_shape" is F32 \[2\] \[32.0, 32.0\], expected an integer \[rows, cols\] >= 1',
    ),
    "scale": (_pop("weight_scale"), rf'tensor "{Q_PROJ}.weight_scale" is missing: a pack-quantized int4 asymmetric'),
    "packed": (_pop("weight_packed"), rf'tensor "{Q_PROJ}.weight_packed" is missing'),
    "zero point": (_pop("weight_zero_point"), rf'tensor "{Q_PROJ}.weight_zero_point" is missing'),
    "unpacked zero point": (
        _unpacked_zero_point,
        rf'tensor "{Q_PROJ}.weight_zero_point" is I32 \[32, 2\], expected I32 \[4, 2\] \(packed along the rows\)',
    ),
    "scale shape": (
        _set("weight_scale", torch.ones(32, 1)),
        rf'tensor "{Q_PROJ}.weight_scale" is F32 \[32, 1\], expected F32 \[32, 2\]',
    ),
    "scale dtype": (
        _set("weight_scale", torch.ones(32, 2, dtype=torch.int32)),
        rf'tensor "{Q_PROJ}.weight_scale" is I32 \[32, 2\], expected one of F32, F16, BF16',
    ),
    "mixed dtypes": (
        lambda t: t.update({f"{Q_PROJ}.{r}": t[f"{Q_PROJ}.{r}"].half() for r in ("weight_scale", "bias")}),
        rf'tensor "{Q_PROJ}.weight_scale" is F16 but the scales of "model.layers.0.mlp.down_proj" are F32',
    ),
    "partial group": (
        _set("weight_shape", torch.tensor([32, 30])),
        rf'tensor "{Q_PROJ}.weight_scale" groups 30 columns by 16, which leaves a partial group',
    ),
    "bias dtype": (
        _set("bias", torch.zeros(32, dtype=torch.float16)),
        rf'tensor "{Q_PROJ}.bias" is F16 \[32\], expected F32 \[32\] \(the scales\' dtype\)',
    ),
    "unknown role": (
        _set("weight_g_idx", torch.zeros(32, dtype=torch.int32)),
        rf'tensor "{Q_PROJ}.weight_g_idx" is not a tensor a pack-quantized int4 asymmetric group_size 16 module holds',
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_folder_names_the_file_and_tensor(int4_folder, tmp_path, case):
    edit, message = DAMAGED[case]
    folder = Path(shutil.copytree(int4_folder, tmp_path / "ct"))
    edit_weights(folder, edit)
    with pytest.raises(CheckpointCorruptedError, match=rf"{folder / 'model.safetensors'}: {message}") as e:
        import_checkpoint(folder, tmp_path / "out")
    assert e.value.file == str(folder / "model.safetensors")
    assert not (tmp_path / "out").exists()


def test_truncated_weights_file_is_named(int4_folder, tmp_path):
    folder = Path(shutil.copytree(int4_folder, tmp_path / "ct"))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    # the format's safetensors reader names the file and the bytes it lacks
    with pytest.raises(CheckpointCorruptedError, match=rf"{folder / 'model.safetensors'}: .*\d+ bytes") as e:
        import_checkpoint(folder, tmp_path / "out")
    assert e.value.file == str(folder / "model.safetensors")
    assert not (tmp_path / "out").exists()


def _naive_int4(folder: Path) -> None:
    """Rewrite an int4 pack-quantized folder as naive-quantized: codes and zero points one per int8."""
    edit_config(folder, lambda qc: qc.update(format="naive-quantized"))

    def unpack(t: dict[str, torch.Tensor]) -> None:
        for name in [k.removesuffix(".weight_packed") for k in t if k.endswith(".weight_packed")]:
            rows, cols = t.pop(f"{name}.weight_shape").tolist()
            t[f"{name}.weight"] = unpack_int32(t.pop(f"{name}.weight_packed"), 4, cols)
            t[f"{name}.weight_zero_point"] = unpack_zero_point(t[f"{name}.weight_zero_point"], 4, rows)

    edit_weights(folder, unpack)


def test_naive_codes_and_zero_points_out_of_range_are_named(int4_folder, tmp_path):
    folder = Path(shutil.copytree(int4_folder, tmp_path / "ct"))
    _naive_int4(folder)
    packed = load_checkpoint(import_checkpoint(folder, tmp_path / "ok").path).model_state[f"{Q_PROJ}.weight_packed"]
    assert torch.equal(packed, load_file(int4_folder / "model.safetensors")[f"{Q_PROJ}.weight_packed"])

    def code(t: dict[str, torch.Tensor]) -> None:
        t[f"{Q_PROJ}.weight"][3, 5] = 9

    edit_weights(folder, code)
    with pytest.raises(
        CheckpointCorruptedError, match=rf'tensor "{Q_PROJ}.weight" holds 9 at \[3, 5\], outside \[-8, 7\] for 4 bits'
    ):
        import_checkpoint(folder, tmp_path / "out")

    def zero_point(t: dict[str, torch.Tensor]) -> None:
        t[f"{Q_PROJ}.weight"][3, 5] = 0
        t[f"{Q_PROJ}.weight_zero_point"][1, 0] = -9

    edit_weights(folder, zero_point)
    with pytest.raises(
        CheckpointCorruptedError, match=rf'"{Q_PROJ}.weight_zero_point" holds -9 at \[1, 0\], outside \[-8, 7\]'
    ):
        import_checkpoint(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_block_without_quantized_tensors(tmp_path):
    model = tiny_llama()
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    doc = json.loads((folder / "config.json").read_text())
    doc["quantization_config"] = quantization_config(exported(tmp_path))
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(
        CheckpointCorruptedError, match=r"model.safetensors: no quantized module .*has a quantization_config"
    ):
        import_checkpoint(folder, tmp_path / "out")
