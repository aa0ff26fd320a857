"""``portable-ckpt demo``: train, SIGKILL mid-run, resume in a new process, prove it bit-identical.

Each invocation writes into a new ``DIR/run-NNN`` and deletes nothing. The float chapter trains the
reference model twice in child processes, once uninterrupted and once SIGKILLed between two saves
and resumed, then compares every loss and every final tensor bit for bit, and inspects and
validates the result. With ``quantize`` the quantized chapter follows: a post-training-quantized
copy (size on disk, eval loss), then LoRA fine-tuning of the quantized model with the same
kill-and-resume comparison, a check that the integer weights never moved, and validation.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import torch

from portable_ckpt import inspect_checkpoint, load_checkpoint, validate_checkpoint
from portable_ckpt.demo import plot as _plot
from portable_ckpt.demo import trainer as _trainer
from portable_ckpt.report import human_size, render_info, render_validation

FLOAT_STEPS = 60
THREADS = 1  # every training process uses the same count: it decides how float reductions are split
PROGRESS_EVERY = 5
# --quantize -> the scheme: int4 needs groups to keep its error small; 32 divides every width here
SCHEMES: dict[str, dict[str, Any]] = {
    "int8": {"bits": 8, "group_size": None},
    "int4": {"bits": 4, "group_size": 32},
}
_STEP_LINE = re.compile(r"step\s+(\d+)\s")


def plan(steps: int) -> tuple[int, int]:
    """(save_every, kill_at) for a run of ``steps``: about six saves, a kill mid-interval past the middle."""
    if steps < 3:
        raise ValueError(f"steps={steps}: the demo needs at least 3 steps to save, kill and resume")
    save_every = max(2, steps // 6)
    candidates = [k for k in range(steps - 1) if k % save_every]  # not a save step, not the last step
    return save_every, min(candidates, key=lambda k: abs(k - steps * 5 // 8))


def new_run_dir(directory: Path) -> Path:
    """The next free ``directory/run-NNN``, created (never an existing one)."""
    directory.mkdir(parents=True, exist_ok=True)
    taken = [int(m[1]) for p in directory.iterdir() if (m := re.fullmatch(r"run-(\d{3,})", p.name))]
    n = max(taken, default=0) + 1
    while True:
        try:
            path = directory / f"run-{n:03d}"
            path.mkdir()
            return path
        except FileExistsError:  # another demo took it meanwhile
            n += 1


class Demo:
    """One demo invocation: where it writes, what it prints."""

    def __init__(self, run: Path, out: TextIO) -> None:
        self.run = run
        self.out = out
        self.curves: list[_plot.Curves] = []  # each chapter's losses, drawn at the end

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def heading(self, text: str) -> None:
        self.say()
        self.say(f"== {text} ==")

    def train(self, run_dir: Path, label: str, args: list[str], *, last_step: int, kill_at: int | None = None) -> int:
        """Run the trainer in a child process, showing every ``PROGRESS_EVERY``-th step; its exit status."""
        cmd = [sys.executable, "-m", "portable_ckpt.demo.trainer", str(run_dir), "--threads", str(THREADS), *args]
        if kill_at is not None:
            cmd += ["--kill-at", str(kill_at)]
        started = time.monotonic()
        with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as child:
            assert child.stderr is not None
            for line in child.stderr:
                m = _STEP_LINE.match(line)
                step = int(m[1]) if m else None
                if step is None or step % PROGRESS_EVERY == 0 or step in (last_step, kill_at):
                    self.say(f"  [{label}] {line.rstrip()}")
        status = child.returncode
        self.say(
            f"  [{label}] {'finished' if status == 0 else f'exit status {status}'} "
            f"after {time.monotonic() - started:.1f} s"
        )
        return status

    def resume_chapter(self, name: str, args: list[str], steps: int) -> tuple[bool, Path | None]:
        """Uninterrupted run vs SIGKILL + resume: progress, loss curves, verdict. (identical?, final root or None)"""
        save_every, kill_at = plan(steps)
        args = [*args, "--steps", str(steps), "--save-every", str(save_every)]
        straight, broken = self.run / name / "uninterrupted", self.run / name / "interrupted"
        self.say(
            f"{steps} steps, a checkpoint every {save_every} steps and at the last; "
            f"{THREADS} thread per training process"
        )
        self.say(f"uninterrupted run -> {straight}")
        if self.train(straight, "uninterrupted", args, last_step=steps - 1) != 0:
            self.say("FAILED: the uninterrupted run did not finish")
            return False, None
        self.say(f"interrupted run -> {broken}: SIGKILL at the end of step {kill_at}, between two saves")
        status = self.train(broken, "interrupted", args, last_step=steps - 1, kill_at=kill_at)
        if status != -signal.SIGKILL:
            self.say(f"FAILED: expected death by SIGKILL (exit status {-signal.SIGKILL}), got {status}")
            return False, None
        resume_from = inspect_checkpoint(broken / "checkpoints").step
        self.say(f"killed by SIGKILL after step {kill_at}; newest committed checkpoint: step {resume_from}")
        self.say("resuming in a new process")
        if self.train(broken, "resumed", args, last_step=steps - 1) != 0:
            self.say("FAILED: the resumed run did not finish")
            return False, None
        self.curves.append(
            _plot.Curves(
                title=f"{name}: uninterrupted vs SIGKILL + resume",
                uninterrupted=_trainer.read_loss_log(straight),
                interrupted=_trainer.read_loss_log(broken),
                kill_at=kill_at,
                resume_from=resume_from,
            )
        )
        identical = self.compare(straight, broken, steps=steps, resume_from=resume_from, kill_at=kill_at)
        return identical, broken / "checkpoints"

    def compare(self, straight: Path, broken: Path, *, steps: int, resume_from: int, kill_at: int) -> bool:
        """Print both loss curves side by side and the verdict; True when losses and final state are identical."""
        expected = dict(_trainer.read_loss_log(straight))
        logged: dict[int, list[float]] = {}
        for step, loss in _trainer.read_loss_log(broken):
            logged.setdefault(step, []).append(loss)  # steps after the checkpoint ran twice
        markers = {
            resume_from: "<- newest checkpoint at the kill: the resumed process starts after it",
            resume_from + 1: "<- first step of the resumed process",
            kill_at: "<- SIGKILL after this step",
        }
        if kill_at == resume_from + 1:
            markers[kill_at] = "<- SIGKILL after this step; first step of the resumed process"
        shown = sorted({s for s in range(steps) if s % PROGRESS_EVERY == 0} | {steps - 1} | set(markers))
        self.say(f"  {'step':>5}  {'uninterrupted':>20}  {'interrupted+resumed':>20}")
        for step in shown:
            mine = logged.get(step, [])
            value = repr(mine[-1]) if mine else "missing"
            self.say(
                f"  {step:5d}  {expected.get(step, float('nan'))!r:>20}  {value:>20}  {markers.get(step, '')}".rstrip()
            )
        replayed = f"step {kill_at}" if kill_at == resume_from + 1 else f"steps {resume_from + 1}-{kill_at}"
        self.say(
            f"  (every {PROGRESS_EVERY}th step and the kill and resume points shown; all {steps} are compared, "
            f"{replayed} both times: both processes of the interrupted run ran it)"
        )

        problem = None
        for step in range(steps):
            values = logged.get(step, [])
            if step not in expected or not values or any(v != expected[step] for v in values):
                problem = (
                    f"first difference at step {step}: uninterrupted {expected.get(step)!r}, "
                    f"interrupted+resumed {values or 'missing'}"
                )
                break
        if problem is None:
            a = load_checkpoint(straight / "checkpoints", restore_rng=False)
            b = load_checkpoint(broken / "checkpoints", restore_rng=False)
            problem = (
                first_difference(a.model_state, b.model_state, "model")
                or first_difference(a.optimizer_state, b.optimizer_state, "optimizer")
                or first_difference(a.scheduler_state, b.scheduler_state, "scheduler")
            )
            if problem is None:
                self.say(
                    f"IDENTICAL: all {steps} losses and all final parameters are bit-identical "
                    "(and the optimizer and scheduler state)"
                )
                return True
        self.say(f"DIFFERENT: {problem}")
        return False

    def plot(self) -> None:
        """Draw the loss curves as ``losses.png`` in the run directory, or say how to get the plotting extra."""
        if not self.curves:
            return
        path = self.run / "losses.png"
        if _plot.draw_losses(self.curves, path):
            self.say(f"loss curves: {path}")
        else:
            self.say(f"loss curves not drawn: matplotlib is not installed ({_plot.INSTALL_HINT} adds it)")

    def inspect_and_validate(self, path: Path) -> bool:
        """``portable-ckpt inspect`` (tensor list shortened) and ``validate`` of the newest checkpoint in ``path``."""
        info = inspect_checkpoint(newest(path))  # the checkpoint itself: what the command shown prints
        latest = str(info.path)
        for line in condensed(render_info(info), latest):
            self.say(line)
        self.say(f"$ portable-ckpt validate {latest}")
        report = validate_checkpoint(latest)
        self.out.write(render_validation([report]))
        self.out.flush()
        return report.valid


def condensed(inspect_text: str, path: str, keep: int = 3) -> list[str]:
    """``inspect``'s text with the tensor list cut to its first ``keep`` tensors and the tied names."""
    lines = inspect_text.splitlines()
    head = next((i for i, line in enumerate(lines) if line.startswith("tensors (")), len(lines) - 1)
    end = head + 1
    while end < len(lines) and lines[end].startswith("  "):
        end += 1
    tied = [line for line in lines[head + 1 : end] if line.endswith("(tied)")]
    plain = [line for line in lines[head + 1 : end] if not line.endswith("(tied)")]
    more = [f"  ... {len(plain) - keep} more (portable-ckpt inspect lists every tensor)"] if len(plain) > keep else []
    return [f"$ portable-ckpt inspect {path}", *lines[: head + 1], *plain[:keep], *more, *tied, *lines[end:]]


def first_difference(a: Any, b: Any, where: str) -> str | None:
    """Where two nested states (dicts, lists, tensors, numbers) first differ bit for bit, or None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))
        )
        return None if same else f"{where} differs"
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return f"{where} has keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{where}[{k!r}]"))), None)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return f"{where} has {len(a)} vs {len(b)} items"
        pairs = enumerate(zip(a, b, strict=True))
        return next((d for i, (x, y) in pairs if (d := first_difference(x, y, f"{where}[{i}]"))), None)
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def newest(path: Path) -> Path:
    """The checkpoint directory ``path`` names: itself, or a root's newest committed checkpoint."""
    return Path(inspect_checkpoint(path).path)


def _model_size(path: Path) -> int:
    return (newest(path) / "model.safetensors").stat().st_size


def quantized_chapter(demo: Demo, scheme_name: str, float_root: Path, steps: int) -> bool:
    """PTQ copy (size, eval loss), then LoRA fine-tuning of the quantized model killed and resumed."""
    scheme = SCHEMES[scheme_name]
    granularity = f"groups of {scheme['group_size']}" if scheme["group_size"] else "one scale per channel"
    base = newest(float_root)  # the final float checkpoint
    demo.heading(f"4. Quantize the trained model: {scheme_name}, symmetric, {granularity}")
    demo.say(
        f"{', '.join(_trainer.FLOAT_MODULES)} stay in float32: the head is tied to the embedding, and "
        "quantized copies cannot share one tensor"
    )
    ptq = _trainer.export_ptq(base, demo.run / f"ptq-{scheme_name}", **scheme)
    float_loss, ptq_loss = _trainer.eval_loss(base), _trainer.eval_loss(ptq)
    float_size, ptq_size = _model_size(base), _model_size(ptq)
    demo.say(f"  {'':20} {'float32':>12} {scheme_name + ' (ptq)':>12}")
    demo.say(
        f"  {'model.safetensors':20} {human_size(float_size):>12} {human_size(ptq_size):>12}  "
        f"({ptq_size / float_size:.1%} of float32)"
    )
    demo.say(f"  {'eval loss':20} {float_loss:12.4f} {ptq_loss:12.4f}  ({ptq_loss - float_loss:+.4f})")
    demo.say(f"  ptq checkpoint: {ptq}")

    demo.heading(f"5. LoRA fine-tuning of the {scheme_name} model: uninterrupted vs SIGKILL + resume")
    args = ["--finetune-from", str(base), "--bits", str(scheme["bits"]), "--mode", "lora"]
    if scheme["group_size"]:
        args += ["--group-size", str(scheme["group_size"])]
    identical, final = demo.resume_chapter(f"lora-{scheme_name}", args, steps)
    if final is None:
        return False

    # The integer codes, scales (and zero points) must be those quantization gave at the start
    # (they depend on the base weights and the scheme only, not on the run's step counts).
    cfg = _trainer.finetune_config(_trainer.config_from(load_checkpoint(base, restore_rng=False).config))
    with torch.random.fork_rng(devices=[]):
        start = _trainer.quantized_base(_trainer.finetune_job(base, cfg, mode="lora", **scheme).model)
    end = load_checkpoint(final, restore_rng=False).model_state
    moved = [name for name, t in start.items() if first_difference(t, end.get(name), name)]
    if moved:
        demo.say(f"CHANGED: {len(moved)} frozen integer tensors moved during fine-tuning, e.g. {moved[0]}")
    else:
        roles = sorted({name.rsplit(".", 1)[1] for name in start})
        demo.say(
            f"integer weights frozen: all {len(start)} base tensors ({', '.join(roles)}) are "
            "byte-identical to the start of fine-tuning"
        )
    tuned_loss = _trainer.eval_loss(final)
    demo.say(
        f"eval loss: float32 {float_loss:.4f}, {scheme_name} ptq {ptq_loss:.4f}, "
        f"{scheme_name} + LoRA fine-tuned {tuned_loss:.4f}"
    )

    demo.heading("6. Inspect and validate the fine-tuned checkpoint")
    valid = demo.inspect_and_validate(final)
    return identical and not moved and valid


def run_demo(
    directory: str | os.PathLike[str],
    *,
    quantize: str | None = None,
    out: TextIO = sys.stdout,
    steps: int | None = None,
) -> int:
    """The demonstration; 0 when every comparison is bit-identical and every checkpoint valid, else 1.

    quantize: None, "int8" or "int4" (adds the quantized chapter). steps: float training steps
    (default 60; fine-tuning runs half as many, at least 3).
    """
    if quantize is not None and quantize not in SCHEMES:
        raise ValueError(f"quantize={quantize!r}: use None or one of {sorted(SCHEMES)}")
    steps = FLOAT_STEPS if steps is None else steps
    plan(steps)  # refuses an impossible step count before anything is written
    started = time.monotonic()
    demo = Demo(new_run_dir(Path(directory)), out)
    demo.say(f"portable-ckpt demo: writing into {demo.run}")
    demo.say(
        f"python {sys.version.split()[0]}, torch {torch.__version__}; each run below is a separate process; "
        "bitwise equality needs the same torch build, device and thread count"
    )

    demo.heading("1-2. Train the reference model: uninterrupted vs SIGKILL + resume")
    identical, final = demo.resume_chapter("float", [], steps)
    demo.heading("3. Inspect and validate the final checkpoint")
    valid = final is not None and demo.inspect_and_validate(final)
    ok = identical and valid
    if quantize is not None and ok and final is not None:
        ok = quantized_chapter(demo, quantize, final, max(3, steps // 2))

    demo.plot()
    demo.say()
    demo.say(f"{'PASS' if ok else 'FAIL'}: finished in {time.monotonic() - started:.1f} s; everything is in {demo.run}")
    return 0 if ok else 1
