"""The demonstration: it proves bit-identical resume, validates, and never touches an earlier run."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import portable_ckpt
from portable_ckpt import cli
from portable_ckpt.demo import demo as _demo
from portable_ckpt.demo.demo import Demo, first_difference, plan, run_demo

IDENTICAL = (
    "IDENTICAL: all {} losses and all final parameters are bit-identical (and the optimizer and scheduler state)"
)


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``directory``: its bytes and modification time."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("steps", [3, 4, 6, 8, 30, 60, 61])
def test_plan_kills_between_saves_after_at_least_one(steps: int) -> None:
    save_every, kill_at = plan(steps)
    assert kill_at % save_every != 0  # not a save step: the resume replays some steps
    assert 0 < kill_at < steps - 1  # after the first save (step 0), before the last step
    assert plan(60) == (10, 37)


def test_plan_refuses_too_few_steps(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="steps=2: the demo needs at least 3 steps"):
        run_demo(tmp_path / "demo", steps=2, out=io.StringIO())
    assert not (tmp_path / "demo").exists()  # refused before writing anything


def test_the_verdict_names_the_first_step_that_differs(tmp_path: Path) -> None:
    for name, losses in {"a": [3.0, 2.5, 2.25, 2.0], "b": [3.0, 2.5, 2.25, 2.5, 2.0000000000000004]}.items():
        (tmp_path / name).mkdir()
        steps = [0, 1, 2, 2, 3] if name == "b" else [0, 1, 2, 3]  # b replayed step 2 after a resume
        lines = [json.dumps({"step": s, "loss": v}) + "\n" for s, v in zip(steps, losses, strict=True)]
        (tmp_path / name / "losses.jsonl").write_text("".join(lines))
    out = io.StringIO()
    assert not Demo(tmp_path, out).compare(tmp_path / "a", tmp_path / "b", steps=4, resume_from=1, kill_at=2)
    assert out.getvalue().splitlines()[-1] == (
        "DIFFERENT: first difference at step 2: uninterrupted 2.25, interrupted+resumed [2.25, 2.5]"
    )


def test_first_difference_compares_bits_through_nested_state() -> None:
    state = {"model": {"w": torch.tensor([0.0, 1.0])}, "optimizer": {"state": {0: {"step": 3}}, "groups": [1, 2]}}
    same = {"model": {"w": torch.tensor([0.0, 1.0])}, "optimizer": {"state": {0: {"step": 3}}, "groups": [1, 2]}}
    assert first_difference(state, same, "x") is None
    same["model"]["w"] = torch.tensor([-0.0, 1.0])  # equal as numbers, not as bits
    assert first_difference(state, same, "x") == "x['model']['w'] differs"
    assert first_difference({"a": 1}, {"a": 2}, "x") == "x['a']: 1 vs 2"


def test_the_demo_imports_only_public_names() -> None:
    tree = ast.parse(Path(_demo.__file__).read_text(encoding="utf-8"))
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {m for m in modules if m.split(".")[0] == "portable_ckpt"} == {
        "portable_ckpt",
        "portable_ckpt.demo",  # its trainer
        "portable_ckpt.report",
    }
    from_package = {
        a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "portable_ckpt" for a in n.names
    }
    assert from_package <= set(portable_ckpt.__all__)
    # and importing the demo does not import the command line (the CLI imports the demo, lazily)
    code = "import sys, portable_ckpt.demo.demo; print('portable_ckpt.cli' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout == "False\n"


@pytest.mark.slow
def test_demo_proves_resume_and_later_runs_leave_earlier_ones_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()
    assert run_demo(tmp_path, steps=6, out=out) == 0
    text = out.getvalue()
    lines = text.splitlines()
    run1 = tmp_path / "run-001"
    assert IDENTICAL.format(6) in lines
    assert "killed by SIGKILL after step 3; newest committed checkpoint: step 2" in lines
    final = run1 / "float" / "interrupted" / "checkpoints" / "step-00000005"
    assert f"ok       {final}" in lines
    assert "quantization    none (full precision)" in lines
    assert "DIFFERENT" not in text and lines[-1].startswith("PASS")
    before = snapshot(run1)

    # The real command, with the quantized chapter; FLOAT_STEPS is the command's default step count.
    monkeypatch.setattr(_demo, "FLOAT_STEPS", 6)
    out = io.StringIO()
    assert cli.main(["demo", "--dir", str(tmp_path), "--quantize", "int4"], out=out) == 0
    text = out.getvalue()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-001", "run-002"]
    assert snapshot(run1) == before
    lines = text.splitlines()
    assert IDENTICAL.format(6) in lines
    assert IDENTICAL.format(3) in lines  # LoRA fine-tuning runs half the steps
    tuned = tmp_path / "run-002" / "lora-int4" / "interrupted" / "checkpoints" / "step-00000002"
    assert f"ok       {tuned}" in lines
    assert any(
        line.startswith("integer weights frozen: all 27 base tensors (weight_packed, weight_scale, weight_shape)")
        for line in lines
    )
    assert "quantization    lora, int4, symmetric, group 32" in lines
    assert "DIFFERENT" not in text and lines[-1].startswith("PASS")
