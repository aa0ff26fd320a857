"""Hostile checkpoints: pickles that would run code, file names and symlinks leading out of the checkpoint,
named pipes and devices where files should be, and names that would drive a terminal.

Every hostile file carries correct sizes and checksums (``faults.recompute``): the refusals come from the
structural checks alone.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import faults
import pytest
import torch

import portable_ckpt as pc
from portable_ckpt import cli


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return faults.save_step(tmp_path_factory.mktemp("pristine"), 3)


@pytest.fixture
def ckdir(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of a valid checkpoint of step 3, in its own root."""
    copy = tmp_path / "root" / pristine.name
    shutil.copytree(pristine, copy)
    return copy


def validate(path: Path) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with faults.deadline(20):
        code = cli.main(["validate", str(path)], out=out, err=err)
    return code, out.getvalue() + err.getvalue()


def legacy_checkpoint(directory: Path, *, model: bytes | None = None, optimizer: bytes | None = None) -> Path:
    """A format-0 checkpoint: model.pt, metadata.json, optionally optimizer.pt."""
    directory.mkdir(parents=True)
    if model is None:
        buf = io.BytesIO()
        torch.save({"lin.weight": torch.ones(3, 4), "lin.bias": torch.zeros(3)}, buf)
        model = buf.getvalue()
    (directory / "model.pt").write_bytes(model)
    (directory / "metadata.json").write_text('{"step": 5}')
    if optimizer is not None:
        (directory / "optimizer.pt").write_bytes(optimizer)
    return directory


# --- pickles that would run code ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["builtins.exec", "builtins.eval", "os.system"])
def test_the_hostile_pickles_are_live(how: str, tmp_path: Path) -> None:
    """Control: unpickled without restriction, each payload does create its marker (so the refusals below
    are refusals of a real attack, not of a dud)."""
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(faults.payloads(marker)[how]))
    assert marker.exists()
    marker.unlink()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(faults.evil_raw_pickle(marker))
    pickle.loads(raw.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("how", ["builtins.exec", "builtins.eval", "os.system", "raw-pickle"])
@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt"])
@pytest.mark.parametrize("verify", [True, False])
def test_pickle_that_runs_code_is_refused(ckdir: Path, tmp_path: Path, name: str, how: str, verify: bool) -> None:
    marker = tmp_path / "PWNED"
    data = faults.evil_raw_pickle(marker) if how == "raw-pickle" else faults.evil_torch_file(marker, how)
    (ckdir / name).write_bytes(data)
    faults.recompute(ckdir)
    with pytest.raises(pc.CheckpointCorruptedError) as info:
        pc.load_checkpoint(ckdir, verify=verify, restore_rng=False)
    if how == "raw-pickle":  # not a zip: refused as unreadable or by the restricted unpickler, either way
        assert re.match(
            rf"{re.escape(str(ckdir / name))}: (refused to unpickle|not a readable torch.save file)", str(info.value)
        ), str(info.value)
    else:
        assert f"{ckdir}/{name}: refused to unpickle" in str(info.value)
        assert "no code from a checkpoint is ever run" in str(info.value)
        assert type(info.value) is pc.CheckpointUnsafeError  # a CheckpointCorruptedError that says why
    assert not marker.exists()
    code, text = validate(ckdir)
    assert code == 1 and name in text and f"[{type(info.value).__name__}]" in text
    assert not marker.exists()


def test_pickle_that_runs_code_is_refused_through_the_manager(ckdir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    (ckdir / "optimizer.pt").write_bytes(faults.evil_torch_file(marker, "os.system"))
    faults.recompute(ckdir)
    model, opt, sched = faults.make_state(0)
    with pytest.raises(pc.CheckpointCorruptedError, match="refused to unpickle"):
        pc.CheckpointManager(ckdir.parent).restore(model, opt, scheduler=sched)
    assert not marker.exists()
    assert model.lin.bias.detach().tolist() == [0.0, 0.0, 0.0]  # nothing was restored from the hostile checkpoint


@pytest.mark.parametrize("how", ["builtins.exec", "os.system", "raw-pickle"])
@pytest.mark.parametrize("where", ["model.pt", "optimizer.pt"])
def test_legacy_pickle_that_runs_code_is_refused(tmp_path: Path, where: str, how: str) -> None:
    marker = tmp_path / "PWNED"
    like = "model" if where == "model.pt" else "optimizer"
    data = faults.evil_raw_pickle(marker) if how == "raw-pickle" else faults.evil_torch_file(marker, how, like=like)
    legacy = legacy_checkpoint(tmp_path / "old", **{where.removesuffix(".pt"): data})
    with pytest.raises(pc.CheckpointCorruptedError) as info:
        pc.load_checkpoint(legacy)
    reasons = "refused to unpickle|not a readable torch.save file" if how == "raw-pickle" else "refused to unpickle"
    assert re.match(rf"{re.escape(str(legacy / where))}: ({reasons})", str(info.value)), str(info.value)
    code, text = validate(legacy)
    assert code == 1 and where in text
    err = io.StringIO()
    assert cli.main(["convert", str(legacy), str(tmp_path / "new")], out=io.StringIO(), err=err) == 1
    assert re.search(reasons, err.getvalue())
    assert not (tmp_path / "new").exists() or not os.listdir(tmp_path / "new")
    assert not marker.exists()


def test_legacy_checkpoint_loads(tmp_path: Path) -> None:
    """Control for the test above: the same layout with an honest model.pt loads."""
    ckpt = pc.load_checkpoint(legacy_checkpoint(tmp_path / "old"))
    assert (ckpt.format_version, ckpt.step) == (0, 5)
    assert ckpt.model_state["lin.weight"].tolist() == [[1.0] * 4] * 3


# --- names and links leading out of the checkpoint ------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../secret.json",
        "/tmp/secret.json",
        "sub/../../secret.json",
        "..",
        ".secret",
        "a\\..\\secret.json",
        "secret.json\x00",
        "secret.json\n",
        "latest",
        "manifest.json",
        "x" * 129,
    ],
    ids=repr,
)
def test_manifest_file_name_leading_out_is_refused(ckdir: Path, name: str) -> None:
    """An attacker lists a file outside the directory, with its true size and checksum, and reseals."""
    secret = ckdir.parent / "secret.json"
    secret.write_bytes(b'{"token": "hunter2"}')
    doc = faults.read_manifest(ckdir)
    doc["files"][name] = {"size": secret.stat().st_size, "checksum": faults.checksum(secret.read_bytes())}
    faults.write_manifest(ckdir, doc)
    with pytest.raises(pc.CheckpointCorruptedError) as info:
        pc.load_checkpoint(ckdir, restore_rng=False)
    assert "manifest.json" in str(info.value)
    assert validate(ckdir)[0] == 1


@pytest.mark.parametrize("name", [*faults.FILES])
def test_files_read_through_symlinks_and_their_bytes_are_still_verified(ckdir: Path, name: str) -> None:
    """A copy made of links to blobs (a hub cache, DVC, git-annex) reads like the original; a link to
    other bytes is caught by the checksum, naming the file."""
    expected = pc.load_checkpoint(ckdir, restore_rng=False)
    outside = ckdir.parent.parent / f"outside-{name}"
    shutil.copyfile(ckdir / name, outside)
    (ckdir / name).unlink()
    (ckdir / name).symlink_to(outside)
    loaded = pc.load_checkpoint(ckdir, restore_rng=False)
    assert loaded.step == expected.step and loaded.config == expected.config
    assert all(torch.equal(loaded.model_state[k], v) for k, v in expected.model_state.items())
    assert validate(ckdir)[0] == 0
    data = bytearray(outside.read_bytes())
    data[len(data) // 2] ^= 0x01
    outside.write_bytes(bytes(data))
    with pytest.raises(pc.CheckpointCorruptedError) as info:
        pc.load_checkpoint(ckdir, restore_rng=False)
    assert name in str(info.value)
    assert validate(ckdir)[0] == 1


def test_symlink_to_a_device_is_refused_without_reading_it(ckdir: Path) -> None:
    (ckdir / "model.safetensors").unlink()
    (ckdir / "model.safetensors").symlink_to("/dev/zero")
    with faults.deadline(10), pytest.raises(pc.CheckpointCorruptedError, match=r"model\.safetensors"):
        pc.load_checkpoint(ckdir, verify=False, restore_rng=False)


def test_legacy_files_read_through_symlinks_and_a_dangling_one_is_missing(tmp_path: Path) -> None:
    legacy = legacy_checkpoint(tmp_path / "old")
    expected = pc.load_checkpoint(legacy).model_state
    outside = tmp_path / "outside.pt"
    (legacy / "model.pt").rename(outside)
    (legacy / "model.pt").symlink_to(outside)
    loaded = pc.load_checkpoint(legacy).model_state
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], v) for k, v in expected.items())
    outside.unlink()
    with pytest.raises(pc.CheckpointNotFoundError, match=r"no committed checkpoint here"):
        pc.load_checkpoint(legacy)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "manifest.json"])
def test_directory_in_place_of_a_file_is_refused(ckdir: Path, name: str) -> None:
    (ckdir / name).unlink()
    (ckdir / name).mkdir()
    with faults.deadline(10), pytest.raises(pc.CheckpointCorruptedError, match=re.escape(name)):
        pc.load_checkpoint(ckdir, restore_rng=False)
    assert validate(ckdir)[0] == 1


@pytest.mark.parametrize("name", ["config.json", "optimizer.pt", "manifest.json"])
def test_named_pipe_in_place_of_a_file_does_not_hang(ckdir: Path, name: str) -> None:
    """Opening a FIFO for reading blocks until a writer appears: a reader must refuse it, not wait forever
    (a correct reader answers in milliseconds; the deadline only stops a hang)."""
    (ckdir / name).unlink()
    os.mkfifo(ckdir / name)
    with faults.deadline(1.5), pytest.raises(pc.CheckpointCorruptedError, match=re.escape(name)):
        pc.load_checkpoint(ckdir, restore_rng=False)
    assert validate(ckdir)[0] == 1


def test_named_pipe_as_latest_does_not_hang(ckdir: Path) -> None:
    root = ckdir.parent
    os.mkfifo(root / "latest")
    with faults.deadline(1.5):
        step, problems = faults.load_values(root)
    assert (step, problems) == (3, [])


def test_legacy_named_pipe_does_not_hang(tmp_path: Path) -> None:
    legacy = legacy_checkpoint(tmp_path / "old")
    (legacy / "metadata.json").unlink()
    os.mkfifo(legacy / "metadata.json")
    with faults.deadline(1.5), pytest.raises(pc.CheckpointError):
        pc.load_checkpoint(legacy)


def test_newer_format_version_is_refused_as_unsupported(ckdir: Path) -> None:
    doc = faults.read_manifest(ckdir)
    doc["format_version"] = 4
    faults.write_manifest(ckdir, doc)
    with pytest.raises(pc.UnsupportedFormatVersionError, match="format_version 4 is newer"):
        pc.load_checkpoint(ckdir, restore_rng=False)
    assert validate(ckdir)[0] == 1


# --- names that would drive a terminal -------------------------------------------------------------

HOSTILE_NAMES = ["\x1b[31mred", "bell\x07", "cr\rover", "rtl\u202eevil", "nul\x00byte", "del\x7f", "tab\tname"]


def test_inspect_escapes_control_characters_in_tensor_names(tmp_path: Path) -> None:
    tensors = {name: torch.full((2,), float(i)) for i, name in enumerate(HOSTILE_NAMES)}
    tensors["tied.\x1b[2J"] = tensors["\x1b[31mred"]  # an alias with a hostile name too
    path = pc.save_checkpoint(tensors, None, {}, None, 1, tmp_path / "root")
    ckpt = pc.load_checkpoint(path, restore_rng=False)
    assert set(ckpt.model_state) == set(tensors)  # the names themselves survive a round trip
    out = io.StringIO()
    assert cli.main(["inspect", str(path)], out=out, err=io.StringIO()) == 0
    text = out.getvalue()
    assert all(c == "\n" or c.isprintable() for c in text), repr(text)
    for escaped in [
        "\\x1b[31mred",
        "bell\\x07",
        "cr\\rover",
        "rtl\\u202eevil",
        "nul\\x00byte",
        "del\\x7f",
        "tab\\tname",
        "tied.\\x1b[2J",
    ]:
        assert escaped in text
    out = io.StringIO()
    assert cli.main(["inspect", "--json", str(path)], out=out, err=io.StringIO()) == 0
    names = {t["name"] for t in json.loads(out.getvalue())["tensors"]}
    assert names | set(json.loads(out.getvalue())["aliases"]) == set(tensors)
    assert all(c == "\n" or c.isprintable() for c in out.getvalue())


def test_validate_escapes_control_characters_in_paths_and_messages(ckdir: Path, tmp_path: Path) -> None:
    hostile = tmp_path / "root" / "evil\x1b[2Jdir"
    ckdir.rename(hostile)
    (hostile / "vocab.json").write_bytes(b'["\x1b[31m"')
    code, text = validate(hostile)
    assert code == 1
    assert "\x1b" not in text and "evil\\x1b[2Jdir" in text
    err = io.StringIO()
    assert cli.main(["inspect", str(tmp_path / "missing\x1b[2J")], out=io.StringIO(), err=err) == 1
    assert "\x1b" not in err.getvalue() and "missing\\x1b[2J" in err.getvalue()
