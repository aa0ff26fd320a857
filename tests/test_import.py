"""import_checkpoint and `portable-ckpt import`: every foreign layout built here by hand, values checked bitwise."""

from __future__ import annotations

import io
import json
import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
from safetensors.torch import save_file
from torch import nn

from portable_ckpt import (
    CheckpointCorruptedError,
    CheckpointExistsError,
    CheckpointInputError,
    CheckpointNotFoundError,
    CheckpointUnsafeError,
    ImportEntry,
    ImportReport,
    import_checkpoint,
    load_checkpoint,
    validate_checkpoint,
)
from portable_ckpt.cli import main
from portable_ckpt.root import resolve
from tests.conftest import TinyLM, train_some


class _Evil:
    """Pickles as a call of builtins.exec that would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _trained() -> tuple[TinyLM, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train_some(model, optimizer)
    return model, optimizer


def _fresh() -> tuple[TinyLM, torch.optim.Optimizer]:
    torch.manual_seed(123)  # other values than the trained model's
    model = TinyLM()
    return model, torch.optim.AdamW(model.parameters(), lr=0.5)


def _assert_same_tensors(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _assert_same_optimizer(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert sorted(a["state"]) == sorted(b["state"])
    for i, state in a["state"].items():
        _assert_same_tensors(state, b["state"][i])


def _entries(entries: tuple[Any, ...]) -> list[str]:
    return [e.entry for e in entries]


def _origin(path: Path | str) -> dict[str, Any]:
    return json.loads((Path(path) / "manifest.json").read_text())["extra"]["imported_from"]


# ---------------------------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_state_dict_file(tmp_path: Path, suffix: str) -> None:
    model, _ = _trained()
    src = tmp_path / f"weights{suffix}"
    torch.save(model.state_dict(), src)
    report = import_checkpoint(src, tmp_path / "ckpts")
    assert isinstance(report, ImportReport)
    assert (report.kind, report.step, report.path) == ("state_dict", 0, tmp_path / "ckpts" / "step-00000000")
    assert report.not_carried == ()
    assert validate_checkpoint(report.path).valid
    fresh, _ = _fresh()
    load_checkpoint(report.path, fresh)
    _assert_same_tensors(fresh.state_dict(), model.state_dict())
    assert fresh.head.weight is fresh.emb.weight  # still tied
    digest = xxhash.xxh3_128_hexdigest(src.read_bytes())
    assert _origin(report.path) == {"kind": "state_dict", "source": src.name, "source_checksum": digest}
    assert report.source_checksum == digest


def test_step_given_overrides(tmp_path: Path) -> None:
    model, _ = _trained()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    report = import_checkpoint(tmp_path / "w.pt", tmp_path / "ckpts", step=42)
    assert report.step == 42 and load_checkpoint(report.path).step == 42


def test_bare_safetensors(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int16)}
    save_file(tensors, tmp_path / "w.safetensors")
    report = import_checkpoint(tmp_path / "w.safetensors", tmp_path / "ckpts", step=3)
    assert report.kind == "safetensors"
    _assert_same_tensors(load_checkpoint(report.path).model_state, tensors)


# ---------------------------------------------------------------------------------------------- nanoGPT


def _nanogpt(model: nn.Module, optimizer: torch.optim.Optimizer, prefix: str = "") -> dict[str, Any]:
    return {
        "model": {prefix + k: v for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "model_args": {"n_layer": 1, "n_head": 1, "n_embd": 6, "block_size": 5, "bias": True, "vocab_size": 11},
        "iter_num": 250,
        "best_val_loss": torch.tensor(1.25),
        "config": {"learning_rate": 6e-4, "dataset": "shakespeare_char", "compile": bool(prefix)},
    }


@pytest.mark.parametrize("prefix", ["", "_orig_mod."])
def test_nanogpt(tmp_path: Path, prefix: str) -> None:
    model, optimizer = _trained()
    torch.save(_nanogpt(model, optimizer, prefix), tmp_path / "ckpt.pt")
    report = import_checkpoint(tmp_path / "ckpt.pt", tmp_path / "out")
    assert (report.kind, report.step) == ("nanogpt", 250)
    assert report.not_carried == ()
    assert validate_checkpoint(report.path).valid
    fresh, fresh_opt = _fresh()
    ckpt = load_checkpoint(report.path, fresh, fresh_opt)
    _assert_same_tensors(fresh.state_dict(), model.state_dict())
    _assert_same_optimizer(fresh_opt.state_dict(), optimizer.state_dict())
    assert ckpt.step == 250
    assert ckpt.config["model_args"]["n_embd"] == 6
    assert ckpt.config["config"] == {"learning_rate": 6e-4, "dataset": "shakespeare_char", "compile": bool(prefix)}
    assert ckpt.extra is not None and ckpt.extra["best_val_loss"] == 1.25
    assert ckpt.extra["imported_from"]["kind"] == "nanogpt"


# ---------------------------------------------------------------------------------------------- HF Trainer


def _hf_folder(tmp_path: Path, *, sharded: bool, marker: Path) -> tuple[Path, TinyLM, torch.optim.Optimizer, Any]:
    model, optimizer = _trained()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    with warnings.catch_warnings():  # "step() before optimizer.step()": the optimizer stepped before the scheduler
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    folder = tmp_path / "checkpoint-12"
    folder.mkdir()
    weights = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    if sharded:
        names = sorted(weights)
        shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
        for shard, keys in shards.items():
            save_file({k: weights[k] for k in keys}, folder / shard)
        weight_map = {k: shard for shard, keys in shards.items() for k in keys}
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(weights, folder / "model.safetensors")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    scaler = {
        "scale": 1024.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 3,
    }
    torch.save(scaler, folder / "scaler.pt")
    trainer_state = {"global_step": 12, "epoch": 0.5, "log_history": [{"loss": 2.5, "step": 10}]}
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state))
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 6}))
    (folder / "tokenizer.json").write_text("{}")
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    torch.save(rng, folder / "rng_state.pth")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    torch.save({"args": _Evil(marker)}, folder / "training_args.bin")
    return folder, model, optimizer, (scheduler.state_dict(), scaler, expected)


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_trainer_folder(tmp_path: Path, sharded: bool) -> None:
    marker = tmp_path / "pwned"
    folder, model, optimizer, (sched_state, scaler, expected) = _hf_folder(tmp_path, sharded=sharded, marker=marker)
    report = import_checkpoint(folder, tmp_path / "ckpts")
    assert not marker.exists()
    assert (report.kind, report.step) == ("hf-trainer", 12)
    assert _entries(report.not_carried) == ["training_args.bin", "tokenizer.json"]
    assert "never unpickled" in report.not_carried[0].detail
    assert "rng_state.pth" in _entries(report.carried)
    assert validate_checkpoint(report.path).valid

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    fresh, fresh_opt = _fresh()
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=5)
    ckpt = load_checkpoint(report.path, fresh, fresh_opt, scheduler=fresh_sched, restore_rng=True)
    assert random.random() == expected[0]  # the generators continue where the Trainer's would
    assert float(np.random.rand()) == expected[1]
    assert torch.equal(torch.rand(3), expected[2])
    _assert_same_tensors(fresh.state_dict(), model.state_dict())
    _assert_same_optimizer(fresh_opt.state_dict(), optimizer.state_dict())
    assert fresh_sched.state_dict() == sched_state
    assert ckpt.config == {"model_type": "tiny", "hidden_size": 6}
    assert ckpt.extra is not None and ckpt.extra["trainer_state"]["log_history"] == [{"loss": 2.5, "step": 10}]
    origin = ckpt.extra["imported_from"]
    files = {p.name: xxhash.xxh3_128_hexdigest(p.read_bytes()) for p in folder.iterdir()}
    assert origin["files"] == files and origin["source"] == "checkpoint-12"
    assert (Path(report.path) / "scaler.pt").is_file()
    assert torch.load(Path(report.path) / "scaler.pt", weights_only=True) == scaler


def test_hf_extra_rng_files_listed(tmp_path: Path) -> None:
    folder, *_ = _hf_folder(tmp_path, sharded=False, marker=tmp_path / "pwned")
    (folder / "rng_state.pth").rename(folder / "rng_state_0.pth")
    torch.save({"cpu": torch.random.get_rng_state()}, folder / "rng_state_1.pth")
    report = import_checkpoint(folder, tmp_path / "ckpts")
    assert "rng_state_0.pth" in _entries(report.carried)
    assert "rng_state_1.pth" in _entries(report.not_carried)


# ---------------------------------------------------------------------------------------------- Lightning


class _Module(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = TinyLM()


def test_lightning(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = _Module()
    opt1 = torch.optim.AdamW(module.parameters(), lr=1e-2)
    opt2 = torch.optim.SGD(module.parameters(), lr=0.1)
    train_some(module.model, opt1)
    sched = torch.optim.lr_scheduler.StepLR(opt1, step_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sched.step()
    ckpt_dict = {
        "epoch": 2,
        "global_step": 30,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": module.state_dict(),
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val'}": {"best_model_score": torch.tensor(0.5), "dirpath": "x"}},
        "optimizer_states": [opt1.state_dict(), opt2.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.01, "device": torch.device("cpu")},
    }
    torch.save(ckpt_dict, tmp_path / "epoch=2-step=30.ckpt")
    report = import_checkpoint(tmp_path / "epoch=2-step=30.ckpt", tmp_path / "ckpts")
    assert (report.kind, report.step) == ("lightning", 30)
    assert _entries(report.not_carried) == ["optimizer_states[1]", "hyper_parameters"]
    assert "not JSON" in report.not_carried[1].detail
    assert validate_checkpoint(report.path).valid
    torch.manual_seed(9)
    fresh = _Module()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=7)
    ckpt = load_checkpoint(report.path, fresh, fresh_opt, scheduler=fresh_sched)
    _assert_same_tensors(fresh.state_dict(), module.state_dict())
    _assert_same_optimizer(fresh_opt.state_dict(), opt1.state_dict())
    assert fresh_sched.state_dict() == sched.state_dict()
    assert ckpt.extra is not None
    assert ckpt.extra["epoch"] == 2 and ckpt.extra["loops"] == ckpt_dict["loops"]
    assert ckpt.extra["callbacks"] == {"ModelCheckpoint{'monitor': 'val'}": {"best_model_score": 0.5, "dirpath": "x"}}
    assert ckpt.config == {}


def test_lightning_json_hyper_parameters_become_config(tmp_path: Path) -> None:
    module = _Module()
    torch.save(
        {"global_step": 4, "state_dict": module.state_dict(), "hyper_parameters": {"lr": 0.1}}, tmp_path / "a.ckpt"
    )
    report = import_checkpoint(tmp_path / "a.ckpt", tmp_path / "ckpts")
    assert load_checkpoint(report.path).config == {"lr": 0.1}
    assert report.not_carried == ()


# ---------------------------------------------------------------------------------------------- hostile input


def test_evil_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model": _Evil(marker), "iter_num": 1}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointUnsafeError, match=r"ckpt\.pt: refused to unpickle, unsafe.*builtins\.exec"):
        import_checkpoint(tmp_path / "ckpt.pt", tmp_path / "ckpts")
    assert not marker.exists() and not (tmp_path / "ckpts").exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth", "model.safetensors"])
def test_evil_file_in_trainer_folder(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    folder, *_ = _hf_folder(tmp_path, sharded=False, marker=marker)
    if name == "model.safetensors":  # a pickle where safetensors bytes belong: refused as damage, never unpickled
        (folder / name).write_bytes(pickle.dumps(_Evil(marker)))
        error: type[Exception] = CheckpointCorruptedError
    else:
        torch.save({"x": _Evil(marker)}, folder / name)
        error = CheckpointUnsafeError
    with pytest.raises(error, match=name.replace(".", r"\.")):
        import_checkpoint(folder, tmp_path / "ckpts")
    assert not marker.exists() and not (tmp_path / "ckpts").exists()


def test_truncated_zip(tmp_path: Path) -> None:
    model, _ = _trained()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    (tmp_path / "w.pt").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(CheckpointCorruptedError, match=r"w\.pt: not a readable torch\.save file"):
        import_checkpoint(tmp_path / "w.pt", tmp_path / "ckpts")


def test_directory_without_known_file(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointNotFoundError, match=r"src: a directory without any file the importer knows"):
        import_checkpoint(tmp_path / "src", tmp_path / "ckpts")


def test_unknown_layout_and_missing_source(tmp_path: Path) -> None:
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointInputError, match=r"odd\.pt: a torch\.save file holding a dict with keys 'weights'"):
        import_checkpoint(tmp_path / "odd.pt", tmp_path / "ckpts")
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        import_checkpoint(tmp_path / "absent.pt", tmp_path / "ckpts")


def test_existing_step_needs_overwrite(tmp_path: Path) -> None:
    model, _ = _trained()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    import_checkpoint(tmp_path / "w.pt", tmp_path / "ckpts")
    with pytest.raises(CheckpointExistsError):
        import_checkpoint(tmp_path / "w.pt", tmp_path / "ckpts")
    assert import_checkpoint(tmp_path / "w.pt", tmp_path / "ckpts", overwrite=True).step == 0


def test_foreign_file_message_points_at_import(tmp_path: Path) -> None:
    torch.save({}, tmp_path / "w.pt")
    with pytest.raises(CheckpointNotFoundError, match=r"import it with `portable-ckpt import SRC DST`"):
        resolve(tmp_path / "w.pt")


# ---------------------------------------------------------------------------------------------- the CLI


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_import(tmp_path: Path) -> None:
    folder, *_ = _hf_folder(tmp_path, sharded=False, marker=tmp_path / "pwned")
    code, out, err = _run(["import", str(folder), str(tmp_path / "ckpts")])
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == str(tmp_path / "ckpts" / "step-00000012")
    assert lines[1] == f"imported hf-trainer {folder} at step 12"
    assert "not carried over: 2" in lines
    assert any(line.startswith("  training_args.bin: never unpickled") for line in lines)
    assert any(line.startswith("  tokenizer.json: a file the importer does not know") for line in lines)

    code, out, err = _run(["import", "--json", "--step", "13", str(folder), str(tmp_path / "ckpts")])
    doc = json.loads(out)
    assert (code, doc["step"], doc["kind"]) == (0, 13, "hf-trainer")
    assert [e["entry"] for e in doc["not_carried"]] == ["training_args.bin", "tokenizer.json"]

    code, out, err = _run(["import", str(folder), str(tmp_path / "ckpts")])
    assert code == 1 and "CheckpointExistsError" in err
    assert _run(["import", "--overwrite", str(folder), str(tmp_path / "ckpts")])[0] == 0


def test_cli_import_refuses_hostile_and_usage(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save(_Evil(marker), tmp_path / "evil.pt")
    code, out, err = _run(["import", str(tmp_path / "evil.pt"), str(tmp_path / "ckpts")])
    assert (code, out) == (1, "")
    assert err.startswith("portable-ckpt import: CheckpointUnsafeError: ") and "builtins.exec" in err
    assert not marker.exists()
    assert _run(["import", str(tmp_path / "evil.pt")])[0] == 2
    assert _run(["import", "--step", "x", "a", "b"])[0] == 2


def test_rng_allowlist_is_narrow(tmp_path: Path) -> None:
    folder, *_ = _hf_folder(tmp_path, sharded=False, marker=tmp_path / "pwned")
    torch.save({"cpu": torch.random.get_rng_state(), "numpy": np.float64(0.5)}, folder / "rng_state.pth")
    with pytest.raises(
        CheckpointUnsafeError, match=r"rng_state\.pth: .* names the global numpy\._?core\.multiarray\.scalar"
    ):
        import_checkpoint(folder, tmp_path / "ckpts")


def test_second_copy_of_weights_listed(tmp_path: Path) -> None:
    folder, model, *_ = _hf_folder(tmp_path, sharded=False, marker=tmp_path / "pwned")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    report = import_checkpoint(folder, tmp_path / "ckpts")
    assert report.not_carried[0] == ImportEntry(
        "pytorch_model.bin", "another copy of the weights; model.safetensors was imported"
    )


def test_help_lists_import() -> None:
    code, out, _ = _run(["--help"])
    line = "  import       a foreign checkpoint as format 1         portable-ckpt import out/ckpt.pt checkpoints\n"
    assert code == 0 and line in out
    code, out, _ = _run(["import", "--help"])
    assert code == 0 and "training_args.bin" in out and "exit status: 0 imported" in out


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors"])
def test_index_naming_a_file_outside_the_folder(tmp_path: Path, shard: str) -> None:
    folder, *_ = _hf_folder(tmp_path, sharded=True, marker=tmp_path / "pwned")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["lin.bias"] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointCorruptedError, match=r"index\.json: shard .* is not a file name of this folder"):
        import_checkpoint(folder, tmp_path / "ckpts")


def test_portable_checkpoint_is_not_imported(tmp_path: Path) -> None:
    model, _ = _trained()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    report = import_checkpoint(tmp_path / "w.pt", tmp_path / "ckpts")
    with pytest.raises(CheckpointInputError, match=r"already a portable checkpoint \(it has manifest\.json\)"):
        import_checkpoint(report.path, tmp_path / "again")


@pytest.mark.parametrize("damage", ["truncated", "not a zip"])
def test_damaged_rng_file(tmp_path: Path, damage: str) -> None:
    folder, *_ = _hf_folder(tmp_path, sharded=False, marker=tmp_path / "pwned")
    raw = (folder / "rng_state.pth").read_bytes()
    (folder / "rng_state.pth").write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\x80\x02N.")
    with pytest.raises(CheckpointCorruptedError, match=r"rng_state\.pth: not a (readable )?torch\.save"):
        import_checkpoint(folder, tmp_path / "ckpts")
    assert not (tmp_path / "ckpts").exists()


def test_trainer_state_with_nan(tmp_path: Path) -> None:
    folder, *_ = _hf_folder(tmp_path, sharded=False, marker=tmp_path / "pwned")
    state = {"global_step": 12, "log_history": [{"grad_norm": float("nan"), "loss": 2.0}]}
    (folder / "trainer_state.json").write_text(json.dumps(state))  # Python's json writes NaN
    report = import_checkpoint(folder, tmp_path / "ckpts")
    assert report.step == 12
    assert (
        ImportEntry(
            "trainer_state.json (NaN, Infinity)", "1 non-finite numbers, which JSON cannot hold: stored as null"
        )
        in report.not_carried
    )
    extra = load_checkpoint(report.path).extra
    assert extra is not None and extra["trainer_state"]["log_history"] == [{"grad_norm": None, "loss": 2.0}]


def test_bad_step_fails_before_reading(tmp_path: Path) -> None:
    with pytest.raises(CheckpointInputError, match="step must be an integer >= 0"):
        import_checkpoint(tmp_path / "absent.pt", tmp_path / "ckpts", step=-1)
