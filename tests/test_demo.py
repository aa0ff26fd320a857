"""The demonstration: it proves bit-identical resume, validates, and never touches an earlier run."""

from __future__ import annotations

import ast
import builtins
import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import portable_ckpt
from portable_ckpt import cli
from portable_ckpt.demo import demo as _demo
from portable_ckpt.demo import plot as _plot
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


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's signature and IHDR chunk; fails if the file is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    return struct.unpack(">II", head[16:24])


def block_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every import of matplotlib fail, as on an install without the plot extra."""
    real = builtins.__import__

    def without_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", without_matplotlib)


def curves(title: str, steps: int, kill_at: int, resume_from: int) -> _plot.Curves:
    log = [(s, 3.0 - 0.01 * s) for s in range(steps)]
    return _plot.Curves(title, log, log[: kill_at + 1] + log[resume_from + 1 :], kill_at, resume_from)


@pytest.mark.parametrize("chapters", [1, 2])
def test_the_loss_curves_are_a_png_of_the_expected_size(tmp_path: Path, chapters: int) -> None:
    path = tmp_path / "losses.png"
    assert _plot.draw_losses([curves(f"chapter {i}", 60, 37, 30) for i in range(chapters)], path)
    assert png_size(path) == (800, 400 * chapters)


def test_the_demo_says_how_to_get_the_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    demo = Demo(tmp_path, out)
    demo.curves.append(curves("float", 6, 3, 2))
    block_matplotlib(monkeypatch)
    demo.plot()
    assert out.getvalue() == (
        "loss curves not drawn: matplotlib is not installed (pip install 'portable-ckpt[plot]' adds it)\n"
    )
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    demo.plot()
    assert out.getvalue().splitlines()[-1] == f"loss curves: {tmp_path / 'losses.png'}"
    assert png_size(tmp_path / "losses.png") == (800, 400)


def test_the_resumed_process_starts_where_the_log_steps_back() -> None:
    log = [(0, 3.0), (1, 2.0), (2, 1.5), (3, 1.25), (2, 1.5), (3, 1.25), (4, 1.0)]
    assert _plot.split_processes(log) == (log[:4], log[4:])
    assert _plot.split_processes(log[:4]) == (log[:4], [])


@pytest.mark.slow
def test_demo_proves_resume_and_later_runs_leave_earlier_ones_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()
    with monkeypatch.context() as without_plot:  # without the plot extra: one line says so, nothing else changes
        block_matplotlib(without_plot)
        assert run_demo(tmp_path, steps=6, out=out) == 0
    text = out.getvalue()
    lines = text.splitlines()
    run1 = tmp_path / "run-001"
    assert lines[-3:-1] == [
        "loss curves not drawn: matplotlib is not installed (pip install 'portable-ckpt[plot]' adds it)",
        "",
    ]
    assert not (run1 / "losses.png").exists()
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
    assert lines[-3] == f"loss curves: {tmp_path / 'run-002' / 'losses.png'}"
    assert png_size(tmp_path / "run-002" / "losses.png") == (800, 800)  # the float and the LoRA chapters
