"""The reference trainer: a small character-level transformer LM that checkpoints and resumes exactly.

It exists to prove the library's central claim: a run killed at any step and resumed from its
newest checkpoint produces bit-identical losses to a run that was never interrupted. Everything
random in a training step draws from the global torch generator (batch sampling and dropout), and
the checkpoint restores that generator, so nothing else needs saving.

Bitwise reproducibility also assumes the same torch build, the same device (CPU) and the same
``torch.get_num_threads()``: the thread count changes how float reductions are split. This module
sets no global torch options; a caller comparing two runs must hold those fixed itself (the
command line's ``--threads``).

``finetune`` continues from a trained checkpoint with a quantized model: integer weights frozen and
LoRA adapters trained (mode "lora"), or float master weights trained through fake quantization
(mode "qat"), checkpointed and resumable exactly like ``train``.

    python -m portable_ckpt.demo.trainer RUN_DIR [--steps N] [--kill-at STEP] [--save-every K] [--threads T]
                                     [--config JSON] [--finetune-from CKPT --bits 8|4 --mode lora|qat]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from portable_ckpt import CheckpointError, CheckpointManager, load_checkpoint, prepare_model, quantize, save_checkpoint
from portable_ckpt.quant.modules import QuantizedModule

LOSSES_FILE = "losses.jsonl"


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Hyperparameters. JSON-compatible only: the checkpoint stores ``dataclasses.asdict(cfg)``."""

    seed: int = 1337
    block_size: int = 64
    batch_size: int = 16
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 96
    dropout: float = 0.1
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 10
    total_steps: int = 60
    grad_clip: float = 1.0
    save_every: int = 10
    keep_last: int = 3

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.save_every < 1 or self.total_steps < 1:
            raise ValueError(f"save_every ({self.save_every}) and total_steps ({self.total_steps}) must be >= 1")


# --- data ---------------------------------------------------------------------------------------


def load_text() -> str:
    """The public-domain training text shipped in ``portable_ckpt/data`` (see its README)."""
    return resources.files("portable_ckpt").joinpath("demo", "data", "shakespeare.txt").read_text(encoding="utf-8")


def build_vocab(text: str) -> list[str]:
    """The sorted unique characters of ``text``; a character's id is its index."""
    return sorted(set(text))


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    """``text`` as a 1-D int64 tensor of character ids."""
    stoi = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([stoi[ch] for ch in text], dtype=torch.long)


def prepare_data(val_fraction: float = 0.1) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(vocab, train ids, validation ids): the text encoded once, its tail held out."""
    text = load_text()
    vocab = build_vocab(text)
    ids = encode(text, vocab)
    n_train = int(len(ids) * (1 - val_fraction))
    return vocab, ids[:n_train], ids[n_train:]


def get_batch(
    data: torch.Tensor, cfg: TrainConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows ``x`` and their next-character targets ``y``, both [B, T].

    ``generator=None`` draws from the global torch generator, which the checkpoint restores.
    """
    starts = torch.randint(len(data) - cfg.block_size, (cfg.batch_size,), generator=generator)
    offsets = torch.arange(cfg.block_size)
    x = data[starts[:, None] + offsets]
    y = data[starts[:, None] + offsets + 1]
    return x, y


# --- model --------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # [B, T, C] -> [B, heads, T, C / heads]
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Token and learned position embeddings, ``n_layer`` blocks, a final LayerNorm and a head.

    The head's weight IS the token embedding's (weight tying), so the state dict holds one tensor
    under two names: ``tok_emb.weight`` and ``lm_head.weight``.
    """

    def __init__(self, cfg: TrainConfig, vocab_size: int) -> None:
        super().__init__()
        self.block_size = cfg.block_size
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        self.apply(_init_weights)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-character logits [B, T, vocab] for the ids ``idx`` [B, T]."""
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}; crop the input")
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the predictions for ``idx`` against ``targets`` [B, T]."""
        return F.cross_entropy(self(idx).flatten(0, 1), targets.flatten())


def _init_weights(module: nn.Module) -> None:
    # GPT-2's init: small normal weights, zero biases (LayerNorm keeps its ones/zeros).
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def make_model(cfg: TrainConfig, vocab_size: int) -> CharTransformer:
    return CharTransformer(cfg, vocab_size)


# --- optimisation -------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices and embeddings, not biases or LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]  # yields the tied tensor once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """The factor on ``cfg.lr`` at ``step``: linear warmup to 1, then cosine decay to 0.1."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    # A plain function, not a callable object: LambdaLR.state_dict then stores no lambda state,
    # only the step counter and learning rates, all of which the checkpoint can hold.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))


def train_step(
    model: CharTransformer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
) -> float:
    """One update: forward, backward, clip, step, advance the schedule. Returns the batch loss."""
    model.train()
    loss = model.loss(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.item()


def train_steps(
    model: CharTransformer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: torch.Tensor,
    cfg: TrainConfig,
    steps: Iterable[int],
    *,
    after_step: Callable[[int, float], None] | None = None,
) -> list[tuple[int, float]]:
    """Run the given step numbers in memory; batches come from the global generator.

    ``after_step(step, loss)`` runs after each update (``train`` logs, saves and kills there).
    """
    history = []
    for step in steps:
        x, y = get_batch(data, cfg)
        loss = train_step(model, optimizer, scheduler, x, y, cfg)
        history.append((step, loss))
        if after_step is not None:
            after_step(step, loss)
    return history


@torch.no_grad()
def evaluate(model: CharTransformer, data: torch.Tensor, cfg: TrainConfig, *, batches: int = 4, seed: int = 0) -> float:
    """Mean loss over ``batches`` fixed batches, in eval mode; leaves the global generator untouched."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    losses = [model.loss(*get_batch(data, cfg, generator)).item() for _ in range(batches)]
    model.train(was_training)
    return sum(losses) / len(losses)


# --- the checkpointed run -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Job:
    """What a run trains, freshly built: ``run`` restores it from the newest checkpoint, then trains it."""

    cfg: TrainConfig
    model: CharTransformer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    vocab: list[str]
    data: torch.Tensor
    config: dict[str, Any]  # what each checkpoint stores as its config


def new_job(cfg: TrainConfig) -> Job:
    """A model trained from scratch: seed, data, model, optimizer, schedule (in that order)."""
    torch.manual_seed(cfg.seed)
    vocab, train_data, _ = prepare_data()
    model = make_model(cfg, len(vocab))
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    return Job(cfg, model, optimizer, scheduler, vocab, train_data, dataclasses.asdict(cfg))


def run(
    run_dir: str | Path, job: Job, *, kill_at: int | None = None, log: Callable[[str], None] | None = None
) -> list[tuple[int, float]]:
    """Train ``job`` to ``cfg.total_steps``, resuming from the newest checkpoint in ``run_dir/checkpoints``.

    Each step appends ``{"step", "loss"}`` to ``run_dir/losses.jsonl`` (fsync'd) and saves when
    ``step % save_every == 0`` or it is the last step. ``kill_at=K`` SIGKILLs this process at the
    very end of step K: after K's loss line is durable and after K's save, if K saves. So
    ``kill_at=K`` with K a save step dies just after a commit, ``K = save step - 1`` dies just
    before one, anything else mid-interval. Returns the (step, loss) pairs this process computed.
    """
    run_dir = Path(run_dir)
    cfg = job.cfg
    with (
        CheckpointManager(run_dir / "checkpoints", keep_last=cfg.keep_last) as manager,
        open(run_dir / LOSSES_FILE, "a", encoding="utf-8") as losses,
    ):
        # Restores weights, optimizer, schedule and the global RNGs, so the next batch and dropout
        # mask are the ones the uninterrupted run would draw.
        ckpt = manager.restore(job.model, job.optimizer, scheduler=job.scheduler)
        start = ckpt.step + 1 if ckpt is not None else 0
        if log is not None:
            log(f"resuming after step {start - 1}" if ckpt is not None else "starting from scratch")

        def after_step(step: int, loss: float) -> None:
            losses.write(json.dumps({"step": step, "loss": loss}) + "\n")
            losses.flush()
            os.fsync(losses.fileno())
            if log is not None:
                log(f"step {step:5d}  loss {loss:.4f}  lr {job.scheduler.get_last_lr()[0]:.2e}")
            if step % cfg.save_every == 0 or step == cfg.total_steps - 1:
                manager.save(job.model, job.optimizer, job.config, job.vocab, step, scheduler=job.scheduler)
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        return train_steps(
            job.model, job.optimizer, job.scheduler, job.data, cfg, range(start, cfg.total_steps), after_step=after_step
        )


def train(
    run_dir: str | Path,
    cfg: TrainConfig = TrainConfig(),
    *,
    kill_at: int | None = None,
    log: Callable[[str], None] | None = None,
) -> list[tuple[int, float]]:
    """Train from scratch (or resume) in ``run_dir``; see ``run`` for the logging, saving and ``kill_at``."""
    return run(run_dir, new_job(cfg), kill_at=kill_at, log=log)


def read_losses(run_dir: str | Path) -> dict[int, float]:
    """step -> loss from ``run_dir/losses.jsonl``; a step logged twice keeps its last (resumed) value."""
    return dict(read_loss_log(run_dir))


def read_loss_log(run_dir: str | Path) -> list[tuple[int, float]]:
    """Every (step, loss) line of ``run_dir/losses.jsonl`` in order, steps a resumed run repeated included."""
    out: list[tuple[int, float]] = []
    with open(Path(run_dir) / LOSSES_FILE, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # a line torn by a crash mid-write; every complete line ends in "\n"
            record = json.loads(line)
            out.append((record["step"], record["loss"]))
    return out


# --- quantized fine-tuning ----------------------------------------------------------------------

# The head shares the token embedding's weight, and two quantized modules cannot share one tensor,
# so both stay in floating point (a common choice anyway: they are small here and sensitive).
FLOAT_MODULES = ("tok_emb", "lm_head")


def config_from(doc: Mapping[str, Any]) -> TrainConfig:
    """The TrainConfig in a checkpoint's config (other keys, like ``finetune``, are ignored)."""
    return TrainConfig(**{f.name: doc[f.name] for f in dataclasses.fields(TrainConfig) if f.name in doc})


def finetune_config(base: TrainConfig) -> TrainConfig:
    """The fine-tuning defaults on ``base``'s architecture: 30 steps at a lower rate, fresh batches."""
    return dataclasses.replace(base, seed=base.seed + 1, lr=1e-3, warmup_steps=3, total_steps=30, save_every=10)


def finetune_job(
    base: str | Path,
    cfg: TrainConfig,
    *,
    bits: int = 8,
    mode: str = "lora",
    group_size: int | None = None,
    symmetric: bool = True,
) -> Job:
    """The float model with ``base``'s weights, quantized for training in ``mode``; optimizer built after.

    mode "lora": only the adapters and the quantized modules' biases train; everything else
    (integers, scales, the float embedding and LayerNorms) stays as loaded. mode "qat": every
    parameter trains, the quantized modules' float master weights through fake quantization.
    """
    torch.manual_seed(cfg.seed)
    vocab, train_data, _ = prepare_data()
    model = make_model(cfg, len(vocab))
    load_checkpoint(base, model, restore_rng=False)
    quantize(model, bits=bits, mode=mode, group_size=group_size, symmetric=symmetric, ignore=FLOAT_MODULES)
    if mode == "lora":
        for module in model.modules():
            if not isinstance(module, QuantizedModule):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    settings = {"base": str(base), "bits": bits, "mode": mode, "group_size": group_size, "symmetric": symmetric}
    return Job(cfg, model, optimizer, scheduler, vocab, train_data, {**dataclasses.asdict(cfg), "finetune": settings})


def finetune(
    run_dir: str | Path,
    base: str | Path,
    cfg: TrainConfig,
    *,
    bits: int = 8,
    mode: str = "lora",
    group_size: int | None = None,
    symmetric: bool = True,
    kill_at: int | None = None,
    log: Callable[[str], None] | None = None,
) -> list[tuple[int, float]]:
    """Fine-tune the checkpoint ``base`` quantized (see ``finetune_job``) in ``run_dir``, resuming if possible.

    A resumed run rebuilds the same quantized model from ``base``, then the checkpoint overwrites
    every tensor of it; logging, saving and ``kill_at`` are those of ``run``.
    """
    job = finetune_job(base, cfg, bits=bits, mode=mode, group_size=group_size, symmetric=symmetric)
    return run(run_dir, job, kill_at=kill_at, log=log)


def quantized_base(model: nn.Module) -> dict[str, torch.Tensor]:
    """The integer codes, scales and zero points of ``model``'s quantized modules (what LoRA keeps frozen)."""
    return {
        f"{name}.{role}": tensor
        for name, module in model.named_modules()
        if isinstance(module, QuantizedModule)
        for role, tensor in module.named_buffers(recurse=False)
    }


def export_ptq(
    src: str | Path, directory: str | Path, *, bits: int = 8, group_size: int | None = None, symmetric: bool = True
) -> Path:
    """Save a post-training-quantized (inference) copy of the float checkpoint ``src`` under ``directory``."""
    ckpt = load_checkpoint(src, restore_rng=False)
    vocab = list(ckpt.vocab or [])
    with torch.random.fork_rng(devices=[]):  # building a model draws initial weights
        model = make_model(config_from(ckpt.config), len(vocab))
    model.load_state_dict(ckpt.model_state)
    quantize(model, bits=bits, group_size=group_size, symmetric=symmetric, ignore=FLOAT_MODULES)
    return Path(save_checkpoint(model, None, ckpt.config, vocab, ckpt.step, directory))


def eval_loss(path: str | Path, *, batches: int = 8) -> float:
    """Validation loss of the checkpoint at ``path`` (float or quantized), on ``batches`` fixed batches."""
    ckpt = load_checkpoint(path, restore_rng=False)
    cfg = config_from(ckpt.config)
    _, _, val_data = prepare_data()
    with torch.random.fork_rng(devices=[]):
        model = make_model(cfg, len(ckpt.vocab or []))
    prepare_model(ckpt.path, model)
    model.load_state_dict(ckpt.model_state)
    return evaluate(model, val_data, cfg, batches=batches)


# --- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Train, or fine-tune, one run (resuming if possible); progress to stderr, a JSON summary line to stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m portable_ckpt.demo.trainer",
        description="Train the reference char-level LM, resuming if possible.",
    )
    parser.add_argument("run_dir", type=Path, help="holds checkpoints/ and losses.jsonl")
    parser.add_argument(
        "--steps", type=int, default=None, metavar="N", help="total steps (default 60; 30 when fine-tuning)"
    )
    parser.add_argument(
        "--kill-at",
        type=int,
        default=None,
        metavar="STEP",
        help="SIGKILL this process at the end of STEP (after its loss line and its save)",
    )
    parser.add_argument(
        "--save-every",
        type=int,
        default=None,
        metavar="K",
        help="save when step %% K == 0 and at the last step (default 10)",
    )
    parser.add_argument(
        "--config",
        type=json.loads,
        default={},
        metavar="JSON",
        help="other TrainConfig fields as a JSON object, e.g. '{\"n_layer\": 1}'",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="T",
        help="torch intra-op threads; runs compared bit for bit need the same count",
    )
    tune = parser.add_argument_group("quantized fine-tuning")
    tune.add_argument(
        "--finetune-from",
        type=Path,
        default=None,
        metavar="CKPT",
        help="fine-tune this float checkpoint (or checkpoints root), quantized",
    )
    tune.add_argument("--bits", type=int, choices=[8, 4], default=8)
    tune.add_argument("--mode", choices=["lora", "qat"], default="lora")
    tune.add_argument("--group-size", type=int, default=None, metavar="G", help="default: one scale per channel")
    tune.add_argument("--asymmetric", action="store_true", help="use zero points")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    defaults = TrainConfig()
    if args.finetune_from is not None:
        try:
            defaults = finetune_config(config_from(load_checkpoint(args.finetune_from, restore_rng=False).config))
        except CheckpointError as e:
            parser.error(f"--finetune-from: {e}")
    overrides = {"total_steps": args.steps, "save_every": args.save_every}
    try:
        if not isinstance(args.config, dict):
            raise ValueError(f"--config must be a JSON object, found {args.config!r}")
        cfg = dataclasses.replace(defaults, **args.config, **{k: v for k, v in overrides.items() if v is not None})
    except (TypeError, ValueError) as e:
        parser.error(str(e))

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.finetune_from is None:
        history = train(args.run_dir, cfg, kill_at=args.kill_at, log=log)
    else:
        history = finetune(
            args.run_dir,
            args.finetune_from,
            cfg,
            bits=args.bits,
            mode=args.mode,
            group_size=args.group_size,
            symmetric=not args.asymmetric,
            kill_at=args.kill_at,
            log=log,
        )
    last_step, last_loss = history[-1] if history else (None, None)
    print(
        json.dumps(
            {"run_dir": str(args.run_dir), "steps_run": len(history), "last_step": last_step, "last_loss": last_loss}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
