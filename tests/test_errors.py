"""Every error path: the right class (also the matching builtin) and a message naming the problem."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import TinyLM
from torch import nn

from portable_ckpt import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointInputError,
    CheckpointNotFoundError,
    QuantizationMetadataError,
    StateMismatchError,
    UnsupportedFormatVersionError,
    load_checkpoint,
    save_checkpoint,
)
from portable_ckpt.format.manifest import encode


def _rewrite_manifest(path: Path, change) -> None:
    doc = json.loads((path / "manifest.json").read_text())
    change(doc)
    (path / "manifest.json").write_bytes(encode(doc))


@pytest.fixture
def ckpt(tmp_path, trained) -> Path:
    model, optimizer = trained
    return save_checkpoint(model, optimizer, {"lr": 0.1}, ["a"], 7, tmp_path / "root")


def test_error_classes_subclass_the_builtins():
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(CheckpointCorruptedError, ValueError)
    assert issubclass(UnsupportedFormatVersionError, ValueError)
    assert issubclass(QuantizationMetadataError, CheckpointCorruptedError)
    assert issubclass(CheckpointExistsError, FileExistsError)
    for cls in (CheckpointNotFoundError, CheckpointCorruptedError, UnsupportedFormatVersionError, StateMismatchError):
        assert issubclass(cls, CheckpointError)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"nowhere: no such checkpoint or directory"):
        load_checkpoint(tmp_path / "nowhere")


def test_empty_root(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"no committed checkpoint here"):
        load_checkpoint(tmp_path)


def test_missing_manifest(ckpt):
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"manifest.json is missing"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("name", ["config.json", "optimizer.pt", "model.safetensors", "rng.json"])
def test_missing_listed_file(ckpt, name):
    (ckpt / name).unlink()
    with pytest.raises(CheckpointNotFoundError, match=rf"{name}: {name} is listed in the manifest but missing"):
        load_checkpoint(ckpt)


def test_existing_step_needs_overwrite(ckpt, trained):
    model, _ = trained
    with pytest.raises(
        CheckpointExistsError, match=r"step-00000007: a checkpoint for step 7 already exists; pass overwrite=True"
    ):
        save_checkpoint(model, None, {}, None, 7, ckpt.parent)
    with torch.no_grad():
        model.lin.weight.fill_(2.5)
    save_checkpoint(model, None, {}, None, 7, ckpt.parent, overwrite=True)
    assert torch.equal(load_checkpoint(ckpt).model_state["lin.weight"], model.lin.weight)
    assert sorted(os.listdir(ckpt.parent)) == [".lock", "latest", "step-00000007"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"opt": {"betas": [0.9, math.nan]}}, r"config\['opt'\]\['betas'\]\[1\] is nan: JSON has no NaN"),
        ({"lr": math.inf}, r"config\['lr'\] is inf"),
        ({"fn": print}, r"config\['fn'\] is a builtins.builtin_function_or_method, which is not a JSON value"),
        ({1: "x"}, r"config has key 1 of type int; JSON keys are strings"),
        ([1, 2], r"config must be a dict or a dataclass instance, not list"),
    ],
)
def test_bad_config_is_refused_and_nothing_is_written(tmp_path, config, message):
    with pytest.raises(CheckpointInputError, match=message):
        save_checkpoint({"w": torch.ones(1)}, None, config, None, 0, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"step": -1},
            r"step must be an integer >= 0 \(int, NumPy integer or 0-d integer tensor\), found -1; pass the number",
        ),
        (
            {"step": 1.5},
            r"step must be an integer >= 0 \(int, NumPy integer or 0-d integer tensor\), found 1.5; pass the number",
        ),
        ({"vocab": {"a": -1}}, r"vocab must be a list\[str\] or a dict\[str, int\]"),
        ({"vocab": [1, 2]}, r"vocab must be a list\[str\]"),
        ({"extra": {"x": math.nan}}, r"extra\['x'\] is nan"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    args = {"step": 0, "vocab": None, "extra": None, **kwargs}
    with pytest.raises(CheckpointInputError, match=message):
        save_checkpoint({"w": torch.ones(1)}, None, {}, args["vocab"], args["step"], tmp_path, extra=args["extra"])


def test_flipped_tensor_byte(ckpt):
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-3] ^= 0x40
    (ckpt / "model.safetensors").write_bytes(data)
    with pytest.raises(
        CheckpointCorruptedError, match=r"model.safetensors: checksum mismatch: the manifest says [0-9a-f]{32}"
    ):
        load_checkpoint(ckpt)
    with pytest.raises(
        CheckpointCorruptedError, match=r"checksum mismatch: .* the model's tensors were filled in place"
    ):
        load_checkpoint(ckpt, model=TinyLM())
    # with verification off the damage is not seen (it is the checksums' job)
    assert load_checkpoint(ckpt, verify=False).step == 7


def test_truncated_file_is_a_size_mismatch(ckpt):
    size = (ckpt / "optimizer.pt").stat().st_size
    os.truncate(ckpt / "optimizer.pt", size - 10)
    with pytest.raises(
        CheckpointCorruptedError,
        match=rf"optimizer.pt: size mismatch: the manifest says {size} bytes, found {size - 10}",
    ):
        load_checkpoint(ckpt, verify=False)


def test_flipped_manifest_byte(ckpt):
    text = (ckpt / "manifest.json").read_text()
    (ckpt / "manifest.json").write_text(text.replace('"step":7', '"step":8'))
    with pytest.raises(
        CheckpointCorruptedError, match=r"manifest_checksum is [0-9a-f]{32} but the manifest's content hashes to"
    ):
        load_checkpoint(ckpt)


def test_invalid_json_manifest(ckpt):
    (ckpt / "manifest.json").write_text('{"format": "portable-ckpt",')
    with pytest.raises(CheckpointCorruptedError, match=r"manifest.json: invalid JSON: Expecting property name"):
        load_checkpoint(ckpt)


def test_schema_violation(ckpt):
    _rewrite_manifest(ckpt, lambda d: d["files"]["config.json"].update(size=-1))
    with pytest.raises(
        CheckpointCorruptedError,
        match=r"schema violation at \$.files.config.json.size: -1 is less than the minimum of 0",
    ):
        load_checkpoint(ckpt)


def test_step_disagrees_with_directory(ckpt):
    _rewrite_manifest(ckpt, lambda d: d.update(step=8))
    with pytest.raises(CheckpointCorruptedError, match=r"step is 8 but the directory is named for step 7"):
        load_checkpoint(ckpt)


def test_newer_format_version(ckpt):
    _rewrite_manifest(ckpt, lambda d: d.update(format_version=4))
    with pytest.raises(
        UnsupportedFormatVersionError,
        match=r"format_version 4 is newer than this reader supports \(3\); upgrade portable-ckpt",
    ):
        load_checkpoint(ckpt)


def test_manifest_without_quantization_field_loads_as_full_precision(ckpt):
    _rewrite_manifest(ckpt, lambda d: d.pop("quantization"))
    ckpt_ = load_checkpoint(ckpt)
    assert ckpt_.quantization is None


def test_quantized_manifest_without_metadata(ckpt):
    _rewrite_manifest(
        ckpt, lambda d: d.update(quantization={"mode": "ptq", "bits": 8, "metadata_file": "quantization_metadata.json"})
    )
    with pytest.raises(
        QuantizationMetadataError, match=r"quantization_metadata.json: the quantization metadata file is missing"
    ):
        load_checkpoint(ckpt)


def test_model_mismatch_lists_every_difference(ckpt):
    class Other(TinyLM):
        def __init__(self) -> None:
            super().__init__(dim=8)
            self.extra = nn.Linear(2, 2)
            del self.norm

    with pytest.raises(StateMismatchError) as info:
        load_checkpoint(ckpt, model=Other())
    text = str(info.value)
    assert "missing keys (in the model, not in the checkpoint): ['extra.bias', 'extra.weight']" in text
    assert "unexpected keys (in the checkpoint, not in the model): ['norm.bias', 'norm.weight']" in text
    assert "emb.weight: checkpoint [11, 6], model [11, 8]" in text


def test_non_strict_load_ignores_missing_keys(ckpt, trained):
    model, _ = trained

    class Bigger(TinyLM):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(2, 2)

    bigger = Bigger()
    load_checkpoint(ckpt, model=bigger, strict=False)
    assert torch.equal(bigger.lin.weight, model.lin.weight)


def test_optimizer_mismatch(ckpt):
    model = TinyLM()
    wrong = torch.optim.AdamW([model.lin.weight])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        StateMismatchError, match=r"optimizer does not match .*optimizer.pt: group 0 has 1 parameters, checkpoint has 5"
    ):
        load_checkpoint(ckpt, model=model, optimizer=wrong)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before the model is filled


def test_failed_load_leaves_the_model_untouched(ckpt):
    data = bytearray((ckpt / "rng.safetensors").read_bytes())
    data[-1] ^= 1
    (ckpt / "rng.safetensors").write_bytes(data)
    model = TinyLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointCorruptedError, match=r"rng.safetensors: checksum mismatch"):
        load_checkpoint(ckpt, model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_temporaries_are_never_taken_for_checkpoints(ckpt, trained):
    root = ckpt.parent
    (root / ".tmp-step-00000099-1-abcd").mkdir()
    (root / ".tmp-step-00000099-1-abcd" / "manifest.json").write_text("{}")
    (root / "step-00000050").mkdir()  # no manifest: not committed
    assert load_checkpoint(root).step == 7
