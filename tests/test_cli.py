"""The CLI through main(argv): exit codes, stable JSON, messages naming the file."""

from __future__ import annotations

import functools
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import portable_ckpt
from portable_ckpt import cli, save_checkpoint
from portable_ckpt.cli import main
from portable_ckpt.report import ProgressLine, escape

VECTORS = Path(__file__).resolve().parent.parent / "format_spec" / "vectors"


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


def test_help_says_what_the_tool_does_and_shows_each_command_with_an_example():
    code, out, err = run(["--help"])
    assert (code, err) == (0, "")
    assert out.startswith("usage: portable-ckpt [--traceback] COMMAND [ARGS...]\n\nInspect, validate and convert")
    assert (
        "commands (portable-ckpt COMMAND --help says what each prints):\n"
        "  inspect      what a checkpoint holds                  portable-ckpt inspect checkpoints\n"
        "  list         every checkpoint of a root, checked      portable-ckpt list checkpoints\n"
        "  validate     verify checksums, schemas, headers       portable-ckpt validate checkpoints/step-00000100\n"
        "  diff         what differs between two checkpoints     portable-ckpt diff run-a/checkpoints run-b/checkpoints\n"
        "  convert      a format-0 checkpoint to format 1        portable-ckpt convert old-run/ checkpoints\n"
        "  import       a foreign checkpoint as format 1         portable-ckpt import out/ckpt.pt checkpoints\n"
        "  export       a checkpoint as a Hugging Face folder    portable-ckpt export checkpoints hf-model --to hf\n"
        "  consolidate  a sharded checkpoint as one-process      portable-ckpt consolidate dist-ckpts single\n"
        "  demo         train, SIGKILL, resume bit-identically   portable-ckpt demo --quantize int8\n"
    ) in out
    assert (
        "exit status: 0 ok, 1 invalid or unreadable checkpoint, 2 usage error (diff: 0 identical, 1 different)." in out
    )


@pytest.mark.parametrize(
    ("command", "prints", "status"),
    [
        ("inspect", "Prints the format version, step", "exit status: 0 described, 1 not found or unreadable"),
        ("validate", 'Prints "ok       PATH" for a valid checkpoint', "exit status: 0 every checkpoint valid, 1 any"),
        (
            "list",
            "List every committed checkpoint of the checkpoints root ROOT",
            "exit status: 0 every checkpoint valid",
        ),
        ("diff", "Prints the tensors added, removed and changed", "exit status: 0 identical, 1 different, 2 usage"),
        ("convert", "Prints the new checkpoint's path", "exit status: 0 converted, 1 unreadable source"),
        ("demo", "print both loss curves and the verdict", "exit status: 0 PASS, 1 FAIL"),
    ],
)
def test_each_command_help_says_what_it_prints_and_its_exit_status(command, prints, status):
    code, out, _ = run([command, "--help"])
    assert code == 0 and out.startswith(f"usage: portable-ckpt {command} ")
    assert prints in out and status in out and "2 usage error" in out


def test_convert_help_says_it_reads_format_0_only():
    _, out, _ = run(["convert", "--help"])
    assert "Convert a format-0 checkpoint" in out and "Only format 0 is read." in out


def test_version():
    assert run(["--version"]) == (0, f"portable-ckpt {portable_ckpt.__version__}\n", "")


def _vector(name, tmp_path):
    """A copy of a test vector, and its manifest's producer (it names the versions that generated it)."""
    path = shutil.copytree(VECTORS / name, tmp_path / name, symlinks=True)
    return path, json.loads((path / "manifest.json").read_text())["producer"]


def test_inspect_json_of_a_test_vector_is_stable(tmp_path):
    path, producer = _vector("valid-tied", tmp_path)
    code, out, _ = run(["inspect", "--json", str(path)])
    assert code == 0 and json.loads(out) == {
        "path": str(path),
        "format_version": 1,
        "step": 7,
        "created_at": "2025-01-01T00:00:00.000000Z",
        "producer": producer,
        "files": [
            {"name": "config.json", "size": 34},
            {"name": "model.safetensors", "size": 416},
            {"name": "vocab.json", "size": 24},
        ],
        "tensors": [
            {"dtype": "F32", "name": "emb.weight", "shape": [8, 4]},
            {"dtype": "F32", "name": "lin.bias", "shape": [4]},
            {"dtype": "F32", "name": "lin.weight", "shape": [4, 4]},
        ],
        "aliases": {"head.weight": "emb.weight"},
        "rng": [],
        "quantization": None,
        "unknown_files": [],
    }
    assert out.startswith('{\n  "aliases": {\n    "head.weight": "emb.weight"\n  },\n')  # sorted keys, indent 2


def test_inspect_text_of_a_test_vector_is_stable(tmp_path):
    path, producer = _vector("valid-tied", tmp_path)
    code, out, _ = run(["inspect", str(path)])
    assert code == 0 and out == (
        f"checkpoint      {path}\n"
        "format_version  1\n"
        "step            7\n"
        "created_at      2025-01-01T00:00:00.000000Z\n"
        f"producer        portable-ckpt {producer['version']}, torch {producer['torch']}\n"
        "files\n"
        "  config.json                              34 B\n"
        "  model.safetensors                       416 B\n"
        "  vocab.json                               24 B\n"
        "tensors (3)\n"
        "  emb.weight                               F32    [8, 4]\n"
        "  lin.bias                                 F32    [4]\n"
        "  lin.weight                               F32    [4, 4]\n"
        "  head.weight                              -> emb.weight (tied)\n"
        "quantization    none (full precision)\n"
    )


def test_validate_json_of_a_damaged_test_vector_is_stable(tmp_path):
    path, _ = _vector("invalid-missing-file", tmp_path)
    code, out, _ = run(["validate", "--json", str(path)])
    assert code == 1 and json.loads(out) == {
        "valid": False,
        "checkpoints": [
            {
                "path": str(path),
                "valid": False,
                "problems": [
                    {
                        "error": "CheckpointNotFoundError",
                        "file": f"{path}/optimizer.pt",
                        "message": "optimizer.pt is listed in the manifest but missing",
                    }
                ],
            }
        ],
    }


# --- inspect of a root ---------------------------------------------------------------------------


def test_inspect_root_lists_its_checkpoints(ckpt, trained):
    model, optimizer = trained
    root = ckpt.parent
    newest = save_checkpoint(model, optimizer, {"lr": 0.1}, ["a", "b"], 30, root)
    code, out, _ = run(["inspect", str(root)])
    assert code == 0 and out.startswith(
        f"root            {root}: 2 committed checkpoints\n"
        "  step-00000012    step 12\n"
        "  step-00000030    step 30  latest: described below\n"
        f"checkpoint      {newest}\n"
        "format_version  1\n"
        "step            30\n"
    )
    assert run(["inspect", str(newest)])[1] == out[out.index("checkpoint      ") :]  # the rest as for the directory
    code, out, _ = run(["inspect", "--json", str(root)])
    doc = json.loads(out)
    assert doc["checkpoints"] == [
        {"step": 12, "name": "step-00000012", "path": str(ckpt), "latest": False},
        {"step": 30, "name": "step-00000030", "path": str(newest), "latest": True},
    ]
    directory_doc = json.loads(run(["inspect", "--json", str(newest)])[1])
    assert "checkpoints" not in directory_doc  # a checkpoint directory's object keeps its keys
    assert {k: v for k, v in doc.items() if k != "checkpoints"} == directory_doc


def test_inspect_root_marks_what_latest_names(ckpt, trained):
    model, optimizer = trained
    save_checkpoint(model, optimizer, {}, None, 30, ckpt.parent)
    (ckpt.parent / "latest").write_text("step-00000012\n")
    doc = json.loads(run(["inspect", "--json", str(ckpt.parent)])[1])
    assert doc["step"] == 12 and [c["latest"] for c in doc["checkpoints"]] == [True, False]


# --- progress on a terminal ----------------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_draws_one_updating_line_and_clears_it():
    stream, clock = FakeTTY(), Clock()
    progress = ProgressLine(stream, prefix="validate", delay=0.5, interval=0.1, width=40, clock=clock)
    progress(0, 3, "config.json")
    assert stream.getvalue() == ""  # quick work shows nothing
    clock.now += 0.6
    progress(1, 3, "model.safetensors")
    assert stream.getvalue() == "\rvalidate 1/3 model.safetensors"
    clock.now += 0.05
    progress(2, 3, "optimizer.pt")  # too soon after the last redraw
    assert stream.getvalue() == "\rvalidate 1/3 model.safetensors"
    clock.now += 0.2
    progress(2, 3, "x")  # shorter: blanks cover the rest of the longer line
    assert stream.getvalue().endswith("\rvalidate 2/3 x" + " " * 16)
    clock.now += 0.2
    progress(3, 3, "evil\x1b[2J" + "n" * 50)  # escaped, and cut to the terminal's width
    assert stream.getvalue().endswith("\rvalidate 3/3 evil\\x1b[2Jnnnnnnnnnnnnnnn")
    assert len("validate 3/3 evil\\x1b[2Jnnnnnnnnnnnnnnn") == 39
    progress.close()
    assert stream.getvalue().endswith("\r" + " " * 39 + "\r")
    before = stream.getvalue()
    progress.close()  # nothing drawn since: nothing to clear
    assert stream.getvalue() == before


def test_progress_line_draws_nothing_when_not_a_terminal():
    stream, clock = io.StringIO(), Clock()
    with ProgressLine(stream, delay=0, interval=0, clock=clock) as progress:
        clock.now += 1
        progress(1, 2, "a")
    assert stream.getvalue() == ""


@pytest.mark.parametrize("command", ["validate", "list", "diff"])
def test_commands_draw_progress_on_a_terminal_stderr_only(ckpt, monkeypatch, command):
    monkeypatch.setattr(cli, "ProgressLine", functools.partial(ProgressLine, delay=0, interval=0, width=200))
    argv = {"validate": [str(ckpt)], "list": [str(ckpt.parent)], "diff": [str(ckpt), str(ckpt)]}[command]
    quiet_out = io.StringIO()
    assert main([command, *argv], out=quiet_out, err=io.StringIO()) == 0
    out, err = io.StringIO(), FakeTTY()
    assert main([command, *argv], out=out, err=err) == 0
    assert out.getvalue() == quiet_out.getvalue() and "\r" not in out.getvalue()  # stdout: data only
    drawn = err.getvalue()
    assert drawn.startswith(f"\r{command} 0/") and drawn.endswith("\r")
    assert drawn.split("\r")[-2].strip() == ""  # the last thing written clears the line
    first = {"validate": f"{ckpt}: config.json", "list": "step-00000012: manifest.json", "diff": "b16"}[command]
    assert drawn.split("\r")[1].split(" ", 2)[2] == first
