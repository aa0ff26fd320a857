"""Format 0 (model.pt + metadata.json) loads like format 1 and converts to it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TinyLM

from portable_ckpt import CheckpointCorruptedError, convert_format0, load_checkpoint
from portable_ckpt.cli import main


@pytest.fixture
def legacy(tmp_path, trained):
    model, optimizer = trained
    d = tmp_path / "old"
    d.mkdir()
    torch.save(model.state_dict(), d / "model.pt")
    torch.save(optimizer.state_dict(), d / "optimizer.pt")
    (d / "config.json").write_text(json.dumps({"lr": 0.01}))
    (d / "vocab.json").write_text(json.dumps(["a", "b"]))
    (d / "metadata.json").write_text(json.dumps({"step": 42}))
    return d


def test_format0_loads_into_a_model(legacy, trained):
    model, optimizer = trained
    fresh = TinyLM()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    ckpt = load_checkpoint(legacy, model=fresh, optimizer=fresh_opt)
    assert (ckpt.format_version, ckpt.step, ckpt.config, ckpt.vocab) == (0, 42, {"lr": 0.01}, ["a", "b"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    assert fresh_opt.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]


def test_convert_writes_format1(legacy, trained, tmp_path):
    model, _ = trained
    new = convert_format0(legacy, tmp_path / "new")
    assert new == tmp_path / "new" / "step-00000042"
    ckpt = load_checkpoint(new)
    assert ckpt.format_version == 1 and ckpt.step == 42 and ckpt.vocab == ["a", "b"]
    assert torch.equal(ckpt.model_state["lin.weight"], model.lin.weight)
    assert ckpt.optimizer_state is not None and ckpt.extra["converted_from"]["format_version"] == 0
    assert "rng.json" not in ckpt.manifest["files"]


def test_convert_cli(legacy, tmp_path, capsys):
    assert main(["convert", str(legacy), str(tmp_path / "cli")]) == 0
    assert capsys.readouterr().out.strip().endswith("step-00000042")
    assert main(["validate", str(tmp_path / "cli")]) == 0


def test_format0_bad_metadata(legacy):
    (legacy / "metadata.json").write_text(json.dumps({"step": "ten"}))
    with pytest.raises(
        CheckpointCorruptedError, match=r"metadata.json: schema violation at \$.step: 'ten' is not of type 'integer'"
    ):
        load_checkpoint(legacy)


def test_format0_model_must_be_a_state_dict(legacy):
    torch.save([torch.ones(1)], legacy / "model.pt")
    with pytest.raises(CheckpointCorruptedError, match=r"model.pt: expected a state_dict mapping names to tensors"):
        load_checkpoint(legacy)
