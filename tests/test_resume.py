"""Exact resume: a training process SIGKILLed at any point and resumed in a new process is bit-identical.

Every run here is a separate process (``python -m portable_ckpt.demo.trainer`` or a small probe script)
with one torch thread, so all of them split float reductions the same way. One uninterrupted run per
module is the reference; each test kills another run with SIGKILL at a chosen step, checks what the
checkpoints hold at that moment, resumes it in a new process and compares every loss and tensor.
"""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from portable_ckpt import CheckpointManager, load_checkpoint, prepare_model, validate_checkpoint
from portable_ckpt.demo.trainer import (
    TrainConfig,
    build_vocab,
    eval_loss,
    export_ptq,
    finetune_config,
    finetune_job,
    load_text,
    make_model,
    new_job,
    quantized_base,
    read_loss_log,
)
from portable_ckpt.quant.modules import QuantizedModule

pytestmark = pytest.mark.slow

# Saves at steps 0, 4, 8, 12 and 15 (the last); a step takes a few milliseconds.
SMALL = TrainConfig(
    block_size=16,
    batch_size=4,
    n_layer=1,
    n_head=2,
    n_embd=32,
    warmup_steps=2,
    total_steps=16,
    save_every=4,
    keep_last=2,
)
# Fine-tuning: saves at 0, 4, 8 and 11. int4 groups of 16 divide every width of the small model.
TUNE = dataclasses.replace(finetune_config(SMALL), total_steps=12, save_every=4, lr=3e-3)
LORA = {"bits": 4, "mode": "lora", "group_size": 16, "symmetric": True}
QAT = {"bits": 8, "mode": "qat", "group_size": None, "symmetric": False}

# Runs the reference loop like the trainer's command line, and at every save step writes the state a
# checkpoint of that step must hold: taken in the process that saves it, just before the save.
PROBE = r"""
import json, random, re, sys
import numpy as np, torch
from portable_ckpt.demo import trainer as _trainer

run_dir, config, kill_at, capture = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
cfg = _trainer.TrainConfig(**config)
job = _trainer.new_job(cfg)

def probe(line):
    m = re.match(r"step\s+(\d+)\s", line)
    if m and (int(m[1]) % cfg.save_every == 0 or int(m[1]) == cfg.total_steps - 1):
        name, keys, pos, has_gauss, cached = np.random.get_state()
        torch.save({"step": int(m[1]), "model": job.model.state_dict(), "optimizer": job.optimizer.state_dict(),
                    "scheduler": job.scheduler.state_dict(), "torch": torch.get_rng_state(),
                    "python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, cached)},
                   f"{capture}/step-{m[1]}.pt")

_trainer.run(run_dir, job, kill_at=kill_at, log=probe)
"""


def trainer_command(run_dir: Path, cfg: TrainConfig, *extra: str, kill_at: int | None = None) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "portable_ckpt.demo.trainer",
        str(run_dir),
        "--threads",
        "1",
        "--config",
        json.dumps(dataclasses.asdict(cfg)),
        *extra,
    ]
    return cmd if kill_at is None else [*cmd, "--kill-at", str(kill_at)]


def trainer(run_dir: Path, cfg: TrainConfig, *extra: str, kill_at: int | None = None) -> int:
    """Run the trainer's command line to the end (or to ``kill_at``); its exit status."""
    return subprocess.run(
        trainer_command(run_dir, cfg, *extra, kill_at=kill_at), capture_output=True, check=False
    ).returncode


def concurrently(*commands: list[str]) -> list[int]:
    """Independent runs side by side (one thread each); their exit statuses."""
    children = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for cmd in commands]
    return [child.wait() for child in children]


def finetune_args(base: Path, scheme: dict[str, Any]) -> list[str]:
    args = ["--finetune-from", str(base), "--bits", str(scheme["bits"]), "--mode", scheme["mode"]]
    if scheme["group_size"]:
        args += ["--group-size", str(scheme["group_size"])]
    return args if scheme["symmetric"] else [*args, "--asymmetric"]


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two nested states differ; tensors are compared bit for bit (dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = (
            a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))
        )
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}[{k!r}]")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def final_state(run_dir: Path) -> dict[str, Any]:
    ckpt = load_checkpoint(run_dir / "checkpoints", restore_rng=False)
    return {
        "step": ckpt.step,
        "model": ckpt.model_state,
        "optimizer": ckpt.optimizer_state,
        "scheduler": ckpt.scheduler_state,
    }


def assert_same_run(resumed: Path, reference: Path, steps: int) -> None:
    """Every loss the interrupted run logged (replayed steps included) and its final state equal the reference's."""
    expected = dict(read_loss_log(reference))
    logged = read_loss_log(resumed)
    assert sorted(expected) == list(range(steps))
    assert {s for s, _ in logged} == set(expected)
    assert [(s, loss) for s, loss in logged if loss != expected[s]] == []  # float ==: bit for bit
    assert differences(final_state(resumed), final_state(reference)) == []


@pytest.fixture
def keep_global_rng() -> Iterator[None]:
    """Restoring a checkpoint in this process sets the global generators; put them back afterwards."""
    state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    yield
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted float run."""
    run_dir = tmp_path_factory.mktemp("reference")
    assert trainer(run_dir, SMALL) == 0
    return run_dir


@pytest.mark.parametrize(
    ("kill_at", "newest"),
    [(8, 8), (11, 8), (6, 4)],
    ids=["right-after-a-save", "just-before-a-save", "mid-interval"],
)
def test_sigkill_and_resume_is_bit_identical(
    reference: Path, tmp_path: Path, kill_at: int, newest: int, keep_global_rng: None
) -> None:
    run_dir, capture = tmp_path / "run", tmp_path / "capture"
    capture.mkdir()
    killed = subprocess.run(
        [sys.executable, "-c", PROBE, str(run_dir), json.dumps(dataclasses.asdict(SMALL)), str(kill_at), str(capture)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    # What the killed process left: losses up to kill_at, `latest` naming a complete checkpoint,
    # exactly keep_last checkpoints.
    assert [s for s, _ in read_loss_log(run_dir)] == list(range(kill_at + 1))
    manager = CheckpointManager(run_dir / "checkpoints", keep_last=SMALL.keep_last)
    assert manager.steps() == [newest - SMALL.save_every, newest]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{newest:08d}"
    assert validate_checkpoint(run_dir / "checkpoints").problems == ()

    # Restored into fresh objects here, a new process: everything equals what the killed process held
    # when it saved.
    saved = torch.load(capture / f"step-{newest}.pt", weights_only=False)
    job = new_job(SMALL)
    ckpt = manager.restore(job.model, job.optimizer, scheduler=job.scheduler)
    assert ckpt is not None
    assert (ckpt.step, ckpt.config, ckpt.vocab) == (newest, dataclasses.asdict(SMALL), build_vocab(load_text()))
    numpy_state: Any = np.random.get_state()
    name, keys, pos, has_gauss, cached = numpy_state
    restored = {
        "step": ckpt.step,
        "model": job.model.state_dict(),
        "optimizer": job.optimizer.state_dict(),
        "scheduler": job.scheduler.state_dict(),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, cached),
    }
    assert differences(restored, saved) == []
    assert job.optimizer.state_dict()["state"]  # Adam moments really were restored, not empty on both sides

    assert trainer(run_dir, SMALL) == 0  # resume in a new process
    assert_same_run(run_dir, reference, SMALL.total_steps)
    assert manager.steps() == [12, 15]
    assert validate_checkpoint(run_dir / "checkpoints").problems == ()


def test_killed_at_the_last_step_resumes_to_nothing_left(reference: Path, tmp_path: Path) -> None:
    last = SMALL.total_steps - 1
    assert trainer(tmp_path, SMALL, kill_at=last) == -signal.SIGKILL
    assert trainer(tmp_path, SMALL) == 0
    assert [s for s, _ in read_loss_log(tmp_path)] == list(range(SMALL.total_steps))
    assert_same_run(tmp_path, reference, SMALL.total_steps)


# --- quantized fine-tuning -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(reference: Path) -> Path:
    """The reference run's final float checkpoint, which every fine-tuning run starts from."""
    return load_checkpoint(reference / "checkpoints", restore_rng=False, verify=False).path


@pytest.fixture(scope="module")
def lora_reference(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora")
    assert trainer(run_dir, TUNE, *finetune_args(base, LORA)) == 0
    return run_dir


def start_of_finetuning(base: Path, scheme: dict[str, Any]) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        return quantized_base(finetune_job(base, TUNE, **scheme).model)


def test_lora_finetuning_lowers_the_loss_and_never_moves_the_integer_weights(
    base: Path, lora_reference: Path, tmp_path: Path
) -> None:
    start = start_of_finetuning(base, LORA)
    assert {name.rsplit(".", 1)[1] for name in start} == {"weight_packed", "weight_shape", "weight_scale"}
    final = load_checkpoint(lora_reference / "checkpoints", restore_rng=False)
    assert final.quantization is not None and final.quantization["mode"] == "lora"
    assert differences({k: final.model_state[k] for k in start}, start) == []
    assert final.config["finetune"] == {"base": str(base), **LORA}

    # The first step sees the unchanged quantized model (LoRA B starts at zero): the ptq copy.
    before = eval_loss(export_ptq(base, tmp_path / "ptq", bits=4, group_size=16))
    assert eval_loss(final.path) < before


def test_lora_finetuning_killed_and_resumed_is_bit_identical(base: Path, lora_reference: Path, tmp_path: Path) -> None:
    args = finetune_args(base, LORA)
    assert trainer(tmp_path, TUNE, *args, kill_at=6) == -signal.SIGKILL
    assert CheckpointManager(tmp_path / "checkpoints").steps() == [0, 4]
    assert trainer(tmp_path, TUNE, *args) == 0
    assert_same_run(tmp_path, lora_reference, TUNE.total_steps)
    start = start_of_finetuning(base, LORA)
    final = load_checkpoint(tmp_path / "checkpoints", restore_rng=False)
    assert differences({k: final.model_state[k] for k in start}, start) == []


def test_qat_finetuning_killed_and_resumed_is_bit_identical_with_weights_on_the_grid(
    base: Path, tmp_path: Path
) -> None:
    args = finetune_args(base, QAT)
    assert concurrently(
        trainer_command(tmp_path / "reference", TUNE, *args), trainer_command(tmp_path / "run", TUNE, *args, kill_at=9)
    ) == [0, -signal.SIGKILL]
    assert trainer(tmp_path / "run", TUNE, *args) == 0
    assert_same_run(tmp_path / "run", tmp_path / "reference", TUNE.total_steps)

    path = tmp_path / "run" / "checkpoints"
    with torch.random.fork_rng(devices=[]):
        model = make_model(SMALL, len(build_vocab(load_text())))
    prepare_model(path, model)
    load_checkpoint(path, model, restore_rng=False)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedModule)]
    assert len(quantized) == 5  # pos_emb, qkv, proj, two MLP layers; tok_emb/lm_head stay float
    for module in quantized:
        weight = module.dequantized_weight().detach()  # recomputed from the master weight
        codes, scale, zero_point = module.codes()  # as stored in the checkpoint
        assert zero_point is not None  # asymmetric
        # per channel: row r is (q[r] - z[r]) * s[r], exactly: on the grid, and the stored codes are current
        assert torch.equal(weight, (codes.to(torch.int32) - zero_point).to(torch.float32) * scale)
        assert not torch.equal(weight, module.weight_master)  # the master weight itself is off the grid
