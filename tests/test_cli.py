"""The CLI through main(argv): exit codes, stable JSON, messages naming the file."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from portable_ckpt import save_checkpoint
from portable_ckpt.cli import escape, main


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def ckpt(tmp_path, trained):
    model, optimizer = trained
    return save_checkpoint(model, optimizer, {"lr": 0.1}, ["a", "b"], 12, tmp_path)


def test_validate_fresh_checkpoint(ckpt):
    code, out, err = run(["validate", str(ckpt)])
    assert (code, err) == (0, "") and out == f"ok       {ckpt}\n"


def test_validate_root_and_json(ckpt):
    code, out, _ = run(["validate", "--json", str(ckpt.parent)])
    doc = json.loads(out)
    assert code == 0 and doc == {
        "valid": True,
        "checkpoints": [{"path": str(ckpt.parent), "valid": True, "problems": []}],
    }


@pytest.mark.parametrize(
    ("damage", "file", "message"),
    [
        (lambda p: (p / "config.json").write_text('{"lr": 0.2}\n'), "config.json", "size mismatch"),
        (lambda p: (p / "vocab.json").unlink(), "vocab.json", "listed in the manifest but missing"),
        (lambda p: (p / "manifest.json").write_text("{"), "manifest.json", "invalid JSON"),
        (lambda p: _flip(p / "model.safetensors", -1), "model.safetensors", "checksum mismatch"),
        (lambda p: _flip(p / "optimizer.pt", 100), "optimizer.pt", "checksum mismatch"),
    ],
    ids=["config-size", "vocab-missing", "manifest-json", "tensor-byte", "optimizer-byte"],
)
def test_validate_damaged(ckpt, damage, file, message):
    damage(ckpt)
    code, out, _ = run(["validate", str(ckpt)])
    assert code == 1 and "INVALID" in out and file in out and message in out
    code, out, _ = run(["validate", "--json", str(ckpt)])
    problems = json.loads(out)["checkpoints"][0]["problems"]
    assert code == 1 and any(file in p["file"] and message in p["message"] for p in problems)


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)


def test_validate_several_paths_one_bad(ckpt, tmp_path):
    code, out, _ = run(["validate", str(ckpt), str(tmp_path / "missing")])
    assert code == 1 and out.startswith(f"ok       {ckpt}\nINVALID  {tmp_path / 'missing'}")


def test_inspect_text_and_json(ckpt):
    code, out, _ = run(["inspect", str(ckpt)])
    assert code == 0
    assert "format_version  1\nstep            12\n" in out
    assert "lin.weight" in out and "F32    [6, 6]" in out and "head.weight" in out and "(tied)" in out
    assert "quantization    none (full precision)" in out
    code, out, _ = run(["inspect", "--json", str(ckpt)])
    doc = json.loads(out)
    assert doc["step"] == 12 and doc["quantization"] is None and doc["aliases"] == {"head.weight": "emb.weight"}
    assert {"name": "f16", "dtype": "F16", "shape": [5]} in doc["tensors"]
    assert [f["name"] for f in doc["files"]] == sorted(f["name"] for f in doc["files"])


def test_inspect_escapes_control_characters(tmp_path):
    path = save_checkpoint({"evil\x1b[31mname\n": torch.ones(1)}, None, {}, None, 0, tmp_path)
    code, out, _ = run(["inspect", str(path)])
    assert code == 0 and "evil\\x1b[31mname\\n" in out and "\x1b" not in out


def test_escape():
    assert escape("a\tb\x00c\u202e") == "a\\tb\\x00c\\u202e"
    assert escape("héllo ☃") == "héllo ☃"


def test_known_error_has_no_traceback(tmp_path):
    code, out, err = run(["inspect", str(tmp_path / "nope")])
    assert code == 1 and out == ""
    assert (
        err == f"portable-ckpt inspect: CheckpointNotFoundError: {tmp_path / 'nope'}: no such checkpoint or directory\n"
    )


def test_usage_error_exits_2():
    assert run(["frobnicate"])[0] == 2
    assert run([])[0] == 2


def test_module_entry_point(ckpt):
    proc = subprocess.run(
        [sys.executable, "-m", "portable_ckpt", "validate", str(ckpt)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.startswith("ok ")
