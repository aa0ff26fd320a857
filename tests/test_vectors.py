"""Every committed test vector loads, or fails, exactly as format_spec/vectors/index.json says.

Each vector is copied to ``tmp_path`` (symlinks kept) and read there with the working directory also in
``tmp_path``, so a hostile pickle that ran would leave its marker where the test looks for it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import portable_ckpt
from portable_ckpt import convert_format0, errors, load_checkpoint
from portable_ckpt.cli import main
from portable_ckpt.format.hashing import checksum
from portable_ckpt.format.manifest import encode
from portable_ckpt.format.safetensors import DTYPES
from portable_ckpt.inspect import validate_checkpoint

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "format_spec" / "vectors"
INDEX: list[dict[str, Any]] = json.loads((VECTORS / "index.json").read_text(encoding="utf-8"))
BY_NAME = {entry["name"]: entry for entry in INDEX}
MARKERS = ("PWNED-portable-ckpt-marker", "PWNED-portable-ckpt-legacy-marker")
HOSTILE = {"invalid-hostile-pickle": "optimizer.pt", "invalid-legacy-hostile-pickle": "model.pt"}


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def copy_vector(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / "vectors" / name
    shutil.copytree(VECTORS / name, dst, symlinks=True)
    return dst


def assert_no_marker(*places: Path) -> None:
    for place in (*places, ROOT, VECTORS):
        for marker in MARKERS:
            assert not (place / marker).exists(), f"a hostile pickle ran: {place / marker} exists"


def test_index_lists_every_vector_once():
    names = [entry["name"] for entry in INDEX]
    assert len(names) == len(set(names))
    on_disk = sorted(p.name for p in VECTORS.iterdir() if p.is_dir())
    assert sorted(names) == on_disk
    for entry in INDEX:
        assert set(entry) == {"name", "description", "valid", "error", "message_contains", "step"}
        if entry["valid"]:
            assert entry["error"] is None and type(entry["step"]) is int
        else:
            assert isinstance(getattr(errors, entry["error"]), type) and entry["message_contains"]


def test_vectors_are_small_and_survive_a_git_clone():
    total = 0
    for path in VECTORS.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            # git stores no empty directories: each one must hold a file for the vector to survive a clone
            assert any(p.is_file() or p.is_symlink() for p in path.rglob("*")), f"{path} is empty"
        else:
            total += path.stat().st_size
    assert total < 450_000  # 82 vectors; the sharded ones (format 2) hold two ranks each


def expected_format_version(name: str) -> int:
    return 0 if "legacy" in name else 2 if "sharded" in name else 3 if "incremental" in name else 1


@pytest.mark.parametrize("entry", INDEX, ids=[e["name"] for e in INDEX])
def test_load_checkpoint(entry: dict[str, Any], tmp_path: Path, cwd: Path):
    path = copy_vector(entry["name"], tmp_path)
    if entry["valid"]:
        ckpt = load_checkpoint(path, restore_rng=False)
        assert ckpt.step == entry["step"]
        assert ckpt.format_version == expected_format_version(entry["name"])
    else:
        expected = getattr(errors, entry["error"])
        with pytest.raises(expected) as info:
            load_checkpoint(path, restore_rng=False)
        assert type(info.value).__name__ == entry["error"]
        assert entry["message_contains"] in str(info.value)
    assert_no_marker(cwd, path)


@pytest.mark.parametrize("entry", INDEX, ids=[e["name"] for e in INDEX])
def test_cli_validate(entry: dict[str, Any], tmp_path: Path, cwd: Path):
    path = copy_vector(entry["name"], tmp_path)
    out, err = io.StringIO(), io.StringIO()
    rc = main(["validate", "--json", str(path)], out=out, err=err)
    doc = json.loads(out.getvalue())
    assert rc == (0 if entry["valid"] else 1), err.getvalue()
    assert doc["valid"] is entry["valid"]
    problems = doc["checkpoints"][0]["problems"]
    if entry["valid"]:
        assert problems == []
    else:
        assert any(p["error"] == entry["error"] and entry["message_contains"] in p["message"] for p in problems), (
            problems
        )
    text = io.StringIO()
    assert main(["validate", str(path)], out=text, err=io.StringIO()) == rc
    assert text.getvalue().startswith("ok " if entry["valid"] else "INVALID ")
    assert_no_marker(cwd, path)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_pickles_would_run_code_and_never_do(name: str, tmp_path: Path, cwd: Path):
    path = copy_vector(name, tmp_path)
    for args in (["validate", str(path)], ["inspect", str(path)]):
        main(args, out=io.StringIO(), err=io.StringIO())
    with pytest.raises(portable_ckpt.CheckpointCorruptedError, match="refused to unpickle"):
        load_checkpoint(path)
    assert_no_marker(cwd, path)
    # the vector has teeth: an unrestricted unpickler creates the marker in the working directory
    with zipfile.ZipFile(path / HOSTILE[name]) as z:
        payload = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    pickle.loads(payload)
    assert any((cwd / marker).is_dir() for marker in MARKERS)


def test_the_pt_vectors_have_teeth():
    """What the format refuses, torch alone does not: torch.load(weights_only=True) accepts the Parameter, and
    fails on the integer persistent id with a bare AssertionError (the regression the static check guards)."""
    state = torch.load(VECTORS / "invalid-pt-global-not-allowed" / "optimizer.pt", weights_only=True)
    assert isinstance(state["state"][0]["momentum_buffer"], torch.nn.Parameter)
    with pytest.raises(AssertionError, match="saved_id must be a tuple, got int"):
        torch.load(VECTORS / "invalid-pt-persistent-id-int" / "optimizer.pt", weights_only=True)
    with zipfile.ZipFile(VECTORS / "invalid-pt-compressed-member" / "optimizer.pt") as z:
        methods = {i.filename.rsplit("/", 1)[-1]: i.compress_type for i in z.infolist()}
    assert methods["data.pkl"] == zipfile.ZIP_DEFLATED
    assert {m for name, m in methods.items() if name != "data.pkl"} == {zipfile.ZIP_STORED}


def _move_checksum_last(path: Path) -> None:
    (path / "manifest.json").write_bytes(encode(json.loads((path / "manifest.json").read_bytes())))


def _rename_listed(path: Path) -> None:
    doc = json.loads((path / "manifest.json").read_bytes())
    doc["files"]["notes.txt"] = doc["files"].pop("notes.txt\n")
    (path / "manifest.json").write_bytes(encode(doc))


def _fix_checksum(path: Path) -> None:
    doc = json.loads((path / "manifest.json").read_bytes())
    doc["files"]["quantization_metadata.json"]["checksum"] = checksum(
        (path / "quantization_metadata.json").read_bytes()
    )
    (path / "manifest.json").write_bytes(encode(doc))


def _summary_as_metadata(path: Path) -> None:
    doc = json.loads((path / "manifest.json").read_bytes())
    doc["quantization"]["symmetric"] = json.loads((path / "quantization_metadata.json").read_bytes())["symmetric"]
    (path / "manifest.json").write_bytes(encode(doc))


def _rng_list_from_file(path: Path) -> None:
    from safetensors import safe_open

    doc = json.loads((path / "manifest.json").read_bytes())
    with safe_open(str(path / "rng.safetensors"), framework="pt") as f:
        doc["rng"] = sorted(f.keys())
    (path / "manifest.json").write_bytes(encode(doc))


REPAIRS = {
    "invalid-manifest-checksum-not-last": _move_checksum_last,  # the checksum's value is already right
    "invalid-file-name-newline": _rename_listed,
    "invalid-unused-file-checksum": _fix_checksum,  # listed while quantization is null: verified, then ignored
    "invalid-quantization-summary-mismatch": _summary_as_metadata,
    "invalid-rng-manifest-list": _rng_list_from_file,
}


@pytest.mark.parametrize("name", sorted(REPAIRS))
def test_repairing_the_one_defect_makes_the_vector_load(name: str, tmp_path: Path):
    path = copy_vector(name, tmp_path)
    REPAIRS[name](path)
    assert load_checkpoint(path, restore_rng=False).step == 5


def test_validate_reports_one_problem_per_damaged_file_else_the_first_structural_one(tmp_path: Path):
    path = copy_vector("valid-full", tmp_path)
    for name in ("optimizer.pt", "vocab.json"):
        data = bytearray((path / name).read_bytes())
        data[-2] ^= 0x01
        (path / name).write_bytes(bytes(data))
    problems = validate_checkpoint(path).problems
    assert [(Path(p.file).name, p.error) for p in problems] == [
        ("optimizer.pt", "CheckpointCorruptedError"),
        ("vocab.json", "CheckpointCorruptedError"),
    ]
    assert all("checksum mismatch" in p.message for p in problems)
    # files intact, structure broken: the first structural problem, as a load reports it
    problems = validate_checkpoint(copy_vector("invalid-alias-target", tmp_path)).problems
    assert len(problems) == 1 and "which is not stored" in problems[0].message


def test_valid_dtypes_holds_every_dtype(tmp_path: Path):
    state = load_checkpoint(copy_vector("valid-dtypes", tmp_path)).model_state
    assert {t.dtype for t in state.values()} == set(DTYPES.values())
    assert any(t.dim() == 0 for t in state.values())
    assert any(t.numel() == 0 for t in state.values())
    assert state["scalar.bool"].item() is True and state["scalar.f32"].item() == -2.5


def test_valid_tied_restores_the_tie(tmp_path: Path):
    state = load_checkpoint(copy_vector("valid-tied", tmp_path)).model_state
    assert state["head.weight"] is state["emb.weight"]


def test_valid_full_restores_model_optimizer_scheduler_and_rng(tmp_path: Path):
    sys.path.insert(0, str(ROOT / "format_spec"))
    try:
        import make_vectors
    finally:
        sys.path.remove(str(ROOT / "format_spec"))
    path = copy_vector("valid-full", tmp_path)
    model = make_vectors.TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    saved = (torch.get_rng_state(), random.getstate())
    try:
        ckpt = load_checkpoint(path, model, optimizer, scheduler=scheduler)
        from safetensors.torch import load_file

        rng = load_file(path / "rng.safetensors")
        assert torch.equal(torch.get_rng_state(), rng["torch.cpu"])
        assert list(random.getstate()[1]) == rng["python"].tolist()
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
    assert model.head.weight is model.emb.weight
    assert torch.equal(model.lin.weight, ckpt.model_state["lin.weight"])
    assert optimizer.param_groups[0]["lr"] == 0.01 and len(optimizer.state) == 3
    assert scheduler.state_dict()["step_size"] == 10
    assert ckpt.config == {"dim": 4, "lr": 0.01, "name": "tiny"} and ckpt.vocab[0] == "<pad>"
    assert ckpt.extra == {"run": "vectors", "tokens_seen": 1200}


def test_valid_legacy_converts_to_format_1(tmp_path: Path):
    src = copy_vector("valid-legacy", tmp_path)
    old = load_checkpoint(src)
    new = load_checkpoint(convert_format0(src, tmp_path / "converted"))
    assert (old.format_version, new.format_version, new.step) == (0, 1, 42)
    assert new.model_state.keys() == old.model_state.keys()
    assert all(torch.equal(new.model_state[k], v) for k, v in old.model_state.items())
    assert new.manifest["aliases"] == {"head.weight": "emb.weight"}
    assert new.extra["converted_from"]["format_version"] == 0


def test_valid_root_replaced_is_put_back_when_a_manager_opens_the_root(tmp_path: Path):
    root = copy_vector("valid-root-replaced", tmp_path)
    (replaced,) = [p for p in root.iterdir() if p.name.startswith(".replaced-")]
    assert load_checkpoint(root, restore_rng=False).step == 10  # a plain reader ignores .replaced-*
    assert validate_checkpoint(root).problems == ()
    portable_ckpt.CheckpointManager(root).close()  # its writer's pid names no process: step 20 goes back
    assert not replaced.exists() and (root / "step-00000020" / "manifest.json").is_file()
    assert (root / "latest").read_text() == "step-00000020\n"
    assert load_checkpoint(root, restore_rng=False).step == 20


def test_a_replaced_checkpoint_is_removed_when_its_step_exists_again(tmp_path: Path):
    root = copy_vector("valid-root-replaced", tmp_path)
    (replaced,) = [p for p in root.iterdir() if p.name.startswith(".replaced-")]
    shutil.copytree(root / "step-00000010", root / "step-00000020")  # a newer copy of step 20 is in place
    data = json.loads((root / "step-00000020" / "manifest.json").read_bytes())
    data["step"] = 20
    (root / "step-00000020" / "manifest.json").write_bytes(encode(data))
    portable_ckpt.CheckpointManager(root).close()
    assert not replaced.exists()
    ckpt = load_checkpoint(root, restore_rng=False)
    assert ckpt.step == 20 and ckpt.manifest["files"] == data["files"]


def test_a_replaced_checkpoint_of_a_live_writer_is_left_alone(tmp_path: Path):
    root = copy_vector("valid-root-replaced", tmp_path)
    (replaced,) = [p for p in root.iterdir() if p.name.startswith(".replaced-")]
    live = replaced.with_name(f".replaced-step-00000020-{os.getppid()}-0badc0de")  # our parent is alive
    replaced.rename(live)
    portable_ckpt.CheckpointManager(root).close()
    assert live.is_dir() and not (root / "step-00000020").exists()
    assert load_checkpoint(root, restore_rng=False).step == 10


def test_valid_incremental_loads_as_the_union_of_its_parts(tmp_path: Path):
    """§21.1: the model state is the union of the parts; the alias refers to a tensor of a part; the optimizer
    restores; frozen part first (§21.2)."""
    from safetensors.torch import load_file

    path = copy_vector("valid-incremental", tmp_path)
    ckpt = load_checkpoint(path, restore_rng=False)
    parts = sorted(n for n in ckpt.manifest["files"] if n.startswith("model-"))
    assert parts == [f"model-0000{i}-of-00003.safetensors" for i in range(3)]
    assert "model.safetensors" not in ckpt.manifest["files"]
    union: dict[str, torch.Tensor] = {}
    for name in parts:
        union.update(load_file(path / name))
    assert set(load_file(path / parts[0])) == {"emb.weight"}  # the frozen embedding
    assert ckpt.model_state.keys() == {*union, "head.weight"}
    assert all(torch.equal(ckpt.model_state[k], t) for k, t in union.items())
    assert ckpt.model_state["head.weight"] is ckpt.model_state["emb.weight"]
    sys.path.insert(0, str(ROOT / "format_spec"))
    try:
        import make_vectors
    finally:
        sys.path.remove(str(ROOT / "format_spec"))
    model = make_vectors.TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    load_checkpoint(path, model, optimizer, restore_rng=False)
    assert model.head.weight is model.emb.weight and torch.equal(model.emb.weight, union["emb.weight"])
    assert optimizer.param_groups[0]["lr"] == 0.01 and len(optimizer.state) == 3


def test_valid_incremental_quantized_restores_a_quantized_lora_model(tmp_path: Path):
    path = copy_vector("valid-incremental-quantized", tmp_path)
    ckpt = load_checkpoint(path, restore_rng=False)
    assert ckpt.format_version == 3 and ckpt.manifest["quantization"]["bits"] == 4
    model = portable_ckpt.prepare_model(path, torch.nn.Sequential(torch.nn.Linear(8, 4)))
    load_checkpoint(path, model, restore_rng=False)
    state = model.state_dict()
    assert state.keys() == ckpt.model_state.keys()
    assert all(torch.equal(state[k], t) for k, t in ckpt.model_state.items())
    assert portable_ckpt.is_quantized(model)


def test_a_flipped_byte_of_a_part_names_that_part(tmp_path: Path):
    path = copy_vector("invalid-incremental-flipped-part-byte", tmp_path)
    with pytest.raises(portable_ckpt.CheckpointCorruptedError, match="checksum mismatch") as info:
        load_checkpoint(path, restore_rng=False)
    assert "model-00000-of-00003.safetensors" in str(info.value)
    (problem,) = validate_checkpoint(path).problems
    assert Path(problem.file).name == "model-00000-of-00003.safetensors"
