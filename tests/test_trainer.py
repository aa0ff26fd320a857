"""The reference trainer: data, model, schedule, determinism, and the checkpointed run's bookkeeping."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from importlib import resources
from pathlib import Path

import pytest
import torch

from portable_ckpt import CheckpointManager
from portable_ckpt.demo.trainer import (
    LOSSES_FILE,
    TrainConfig,
    build_vocab,
    encode,
    evaluate,
    get_batch,
    load_text,
    lr_multiplier,
    main,
    make_model,
    make_optimizer,
    make_scheduler,
    prepare_data,
    read_losses,
    train,
    train_steps,
)

# Small enough that a step takes a few milliseconds.
TINY = TrainConfig(
    block_size=16,
    batch_size=4,
    n_layer=1,
    n_head=2,
    n_embd=32,
    warmup_steps=2,
    total_steps=5,
    save_every=2,
    keep_last=2,
)


def fresh_losses(cfg: TrainConfig, steps: int) -> list[float]:
    torch.manual_seed(cfg.seed)
    vocab, train_data, _ = prepare_data()
    model = make_model(cfg, len(vocab))
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    return [loss for _, loss in train_steps(model, optimizer, scheduler, train_data, cfg, range(steps))]


DATA = resources.files("portable_ckpt") / "demo" / "data"
SIZE_ROW = re.compile(
    r"([0-9,]+) bytes, ([0-9,]+) lines, ([0-9]+) distinct characters, plain ASCII, `\\n` line endings, "
    r"ends with a newline"
)


def readme_table() -> dict[str, str]:
    """The rows of the data README's two-column table: first cell -> second cell."""
    rows = {}
    for line in (DATA / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and cells[0] and set(cells[0]) != {"-"}:
            rows[cells[0]] = cells[1]
    return rows


def test_shipped_text_is_what_its_readme_promises() -> None:
    """SHA-256, size, line and character counts of shakespeare.txt, read from the README's table (the two
    cannot drift apart), and the trainer reads exactly those bytes."""
    table = readme_table()
    digest = re.fullmatch(r"`([0-9a-f]{64})`", table["SHA-256"])
    size = SIZE_ROW.fullmatch(table["Size"])
    source = re.search(r"The first ([0-9,]+) characters", table["Source"])
    assert digest and size and source, table
    blob = (DATA / "shakespeare.txt").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == digest.group(1)
    assert len(blob) == int(size.group(1).replace(",", "")) == int(source.group(1).replace(",", ""))
    assert blob.count(b"\n") == int(size.group(2).replace(",", ""))
    assert blob.isascii() and b"\r" not in blob and blob.endswith(b"\n")
    assert len(set(blob)) == int(size.group(3))
    text = load_text()
    assert text == blob.decode("ascii")
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    assert text.endswith("as one would set up a top.\n")


def test_vocab_is_sorted_unique_characters_and_encode_uses_its_indices() -> None:
    assert build_vocab("hello, hi") == [" ", ",", "e", "h", "i", "l", "o"]
    vocab = build_vocab("abca")
    assert encode("cab", vocab).tolist() == [2, 0, 1]
    assert encode("cab", vocab).dtype == torch.int64


def test_prepare_data_splits_the_encoded_text() -> None:
    vocab, train_data, val_data = prepare_data()
    text = load_text()
    assert vocab == build_vocab(text)
    assert len(vocab) == 61
    assert len(train_data) + len(val_data) == len(text)
    assert "".join(vocab[i] for i in train_data[:14].tolist()) == "First Citizen:"


def test_forward_gives_logits_per_position() -> None:
    model = make_model(TINY, vocab_size=61)
    idx = torch.randint(61, (3, TINY.block_size))
    assert model(idx).shape == (3, TINY.block_size, 61)
    assert model(idx[:, :5]).shape == (3, 5, 61)


def test_forward_rejects_a_sequence_longer_than_block_size() -> None:
    model = make_model(TINY, vocab_size=61)
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size 16; crop the input"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_lm_head_is_tied_to_the_token_embedding() -> None:
    model = make_model(TINY, vocab_size=61)
    assert model.lm_head.weight is model.tok_emb.weight
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["tok_emb.weight"].data_ptr()


def test_default_model_size() -> None:
    model = make_model(TrainConfig(), vocab_size=61)
    assert sum(p.numel() for p in model.parameters()) == 235_872


def test_batches_are_next_character_windows_from_the_given_generator() -> None:
    data = torch.arange(1000)
    before = torch.get_rng_state()
    x, y = get_batch(data, TINY, torch.Generator().manual_seed(5))
    x2, _ = get_batch(data, TINY, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), before)
    assert x.shape == y.shape == (TINY.batch_size, TINY.block_size)
    assert torch.equal(y, x + 1)  # data[i] == i, so the target is the next id
    assert torch.equal(x, x2)


def test_two_fresh_runs_give_bit_identical_losses() -> None:
    first = fresh_losses(TINY, 6)
    second = fresh_losses(TINY, 6)
    assert first == second
    assert first[-1] < first[0]


def test_lr_schedule_warms_up_linearly_then_decays_to_a_tenth() -> None:
    cfg = TrainConfig(warmup_steps=10, total_steps=60)
    assert [lr_multiplier(s, cfg) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_multiplier(10, cfg) == 1.0
    assert lr_multiplier(35, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_multiplier(60, cfg) == pytest.approx(0.1)
    assert lr_multiplier(1000, cfg) == pytest.approx(0.1)
    decay = [lr_multiplier(s, cfg) for s in range(10, 61)]
    assert decay == sorted(decay, reverse=True)


def test_scheduler_follows_lr_multiplier() -> None:
    cfg = TrainConfig(warmup_steps=3, total_steps=8)
    model = make_model(TINY, vocab_size=61)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    seen = []
    for _ in range(8):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([cfg.lr * lr_multiplier(s, cfg) for s in range(8)])
    assert math.isclose(seen[2], cfg.lr)


def test_weight_decay_skips_biases_and_layernorm() -> None:
    model = make_model(TINY, vocab_size=61)
    decay, no_decay = make_optimizer(model, TINY).param_groups
    assert decay["weight_decay"] == TINY.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_evaluate_is_repeatable_and_leaves_rng_and_mode_alone() -> None:
    torch.manual_seed(0)
    model = make_model(TINY, vocab_size=61)
    data = torch.randint(61, (500,))
    before = torch.get_rng_state()
    first = evaluate(model, data, TINY)
    assert evaluate(model, data, TINY) == first
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training
    assert first == pytest.approx(math.log(61), rel=0.05)  # untrained: near uniform


def test_train_logs_every_step_saves_and_then_has_nothing_left(tmp_path: Path) -> None:
    lines: list[str] = []
    history = train(tmp_path, TINY, log=lines.append)
    assert [s for s, _ in history] == [0, 1, 2, 3, 4]
    assert history == [(s, loss) for s, loss in zip(range(5), fresh_losses(TINY, 5), strict=True)]
    assert read_losses(tmp_path) == dict(history)
    assert lines[0] == "starting from scratch"
    manager = CheckpointManager(tmp_path / "checkpoints")
    assert manager.steps() == [2, 4]  # saved 0, 2, 4 (every 2nd and the last); keep_last=2
    ckpt = manager.restore(restore_rng=False)
    assert ckpt is not None
    assert (ckpt.step, ckpt.config, ckpt.vocab) == (4, dataclasses.asdict(TINY), build_vocab(load_text()))

    assert train(tmp_path, TINY) == []


def test_read_losses_keeps_the_last_value_and_skips_a_torn_line(tmp_path: Path) -> None:
    (tmp_path / LOSSES_FILE).write_text(
        '{"step": 0, "loss": 4.5}\n{"step": 1, "loss": 4.0}\n{"step": 1, "loss": 3.5}\n{"step": 2, "lo'
    )
    assert read_losses(tmp_path) == {0: 4.5, 1: 3.5}


def test_config_rejects_heads_that_do_not_divide_the_width() -> None:
    with pytest.raises(ValueError, match=r"n_embd \(96\) must be a multiple of n_head \(5\)"):
        TrainConfig(n_head=5)


def test_cli_rejects_a_zero_save_interval(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--save-every", "0"])
    assert exit_info.value.code == 2
    assert "save_every (0) and total_steps (60) must be >= 1" in capsys.readouterr().err
