"""list_checkpoints and diff_checkpoints, and their commands: values, exit codes, stable JSON."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

import portable_ckpt
from portable_ckpt import (
    CheckpointCorruptedError,
    CheckpointDiff,
    CheckpointInputError,
    CheckpointListing,
    CheckpointNotFoundError,
    FileChange,
    Leftover,
    TensorDiff,
    TensorInfo,
    ValueChange,
    diff_checkpoints,
    list_checkpoints,
    quantize,
    save_checkpoint,
)
from portable_ckpt import diff as _diff
from portable_ckpt.cli import main
from portable_ckpt.report import human_size, render_diff, render_listing
from portable_ckpt.storage import storage_for


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)


def _files_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


@pytest.fixture
def root(tmp_path, trained) -> Path:
    """Steps 10 and 20 in full precision, 30 quantized (int8 ptq), and some leftovers."""
    model, optimizer = trained
    root = tmp_path / "root"
    save_checkpoint(model, optimizer, {"lr": 0.1}, ["a", "b"], 10, root)
    save_checkpoint(model, optimizer, {"lr": 0.1}, ["a", "b"], 20, root)
    save_checkpoint(quantize(_net(), bits=8), None, {}, None, 30, root)
    (root / ".tmp-step-00000040-999999999-0badf00d").mkdir()  # a save that crashed
    (root / "step-00000050").mkdir()  # a step directory that never got its manifest
    (root / "step-00000050" / "model.safetensors").write_bytes(b"x")
    (root / ".trash-step-00000005-0123abcd").mkdir()
    (root / "step-12").mkdir()  # not a canonical step name: not ours, not listed
    (root / "notes.txt").write_text("mine\n")
    return root


# --- list ----------------------------------------------------------------------------------------


def test_list_checkpoints_reports_each_checkpoint_and_the_leftovers(root):
    listing = list_checkpoints(root)
    assert isinstance(listing, CheckpointListing) and listing.root == root
    assert [(c.step, c.name, c.path, c.latest, c.valid, c.verified) for c in listing.checkpoints] == [
        (10, "step-00000010", root / "step-00000010", False, True, True),
        (20, "step-00000020", root / "step-00000020", False, True, True),
        (30, "step-00000030", root / "step-00000030", True, True, True),
    ]
    for c in listing.checkpoints:
        manifest = json.loads((root / c.name / "manifest.json").read_text())
        assert c.created_at == manifest["created_at"]
        assert c.size == _files_size(root / c.name)  # every file listed, and the manifest itself
        assert c.problems == ()
    assert [c.quantization for c in listing.checkpoints[:2]] == [None, None]
    q = listing.checkpoints[2].quantization
    assert q is not None and (q["mode"], q["bits"]) == ("ptq", 8)
    assert listing.leftovers == (
        Leftover(
            ".tmp-step-00000040-999999999-0badf00d",
            root / ".tmp-step-00000040-999999999-0badf00d",
            "temporary",
            "temporary of a save in progress, or left by one that crashed",
        ),
        Leftover(
            ".trash-step-00000005-0123abcd",
            root / ".trash-step-00000005-0123abcd",
            "temporary",
            "a checkpoint being deleted",
        ),
        Leftover(
            "step-00000050",
            root / "step-00000050",
            "uncommitted",
            "step directory without manifest.json: a save that never committed",
        ),
    )
    assert listing.latest is listing.checkpoints[2] and listing.valid
    with pytest.raises(dataclasses.FrozenInstanceError):
        listing.checkpoints[0].step = 1  # type: ignore[misc]


def test_list_marks_what_latest_names(root):
    (root / "latest").write_text("step-00000010\n")  # an older step, still committed: what loads resolve to
    assert [c.step for c in list_checkpoints(root).checkpoints if c.latest] == [10]
    (root / "latest").write_text("step-00000099\n")  # stale: the highest committed step
    assert [c.step for c in list_checkpoints(root).checkpoints if c.latest] == [30]


def test_list_verifies_every_file_unless_fast(root):
    _flip(root / "step-00000020" / "model.safetensors", -1)
    listing = list_checkpoints(root)
    bad = listing.checkpoints[1]
    assert not listing.valid and not bad.valid and bad.verified
    assert [(p.file, p.error) for p in bad.problems] == [
        (f"{root}/step-00000020/model.safetensors", "CheckpointCorruptedError")
    ]
    assert bad.problems[0].message.startswith("checksum mismatch: the manifest says ")
    fast = list_checkpoints(root, verify=False)  # only manifests: the damaged tensor goes unseen
    assert fast.valid and [c.verified for c in fast.checkpoints] == [False, False, False]


def test_list_reports_a_damaged_manifest_even_when_fast(root):
    (root / "step-00000010" / "manifest.json").write_text("{")
    for verify in (True, False):
        entry = list_checkpoints(root, verify=verify).checkpoints[0]
        assert (entry.step, entry.valid, entry.created_at, entry.size) == (10, False, None, None)
        assert entry.problems[0].file == f"{root}/step-00000010/manifest.json"
        assert "invalid JSON" in entry.problems[0].message


def test_list_in_memory(tmp_path):
    url = f"memory://list-{uuid.uuid4().hex}"
    save_checkpoint({"w": torch.ones(3)}, None, {}, None, 1, url)
    save_checkpoint({"w": torch.ones(3)}, None, {}, None, 2, url)
    storage_for(url).write_small("step-00000003/model.safetensors", b"x")  # a writer that died mid-save
    listing = list_checkpoints(url)
    assert listing.root == url
    assert [(c.step, c.path, c.latest, c.valid) for c in listing.checkpoints] == [
        (1, f"{url}/step-00000001", False, True),
        (2, f"{url}/step-00000002", True, True),
    ]
    assert [(x.name, x.kind) for x in listing.leftovers] == [("step-00000003", "uncommitted")]


def test_list_refuses_what_is_not_a_root(root, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no such directory; pass a checkpoints root"):
        list_checkpoints(tmp_path / "missing")
    with pytest.raises(CheckpointInputError, match=r"a checkpoint directory, not a checkpoints root; list its root"):
        list_checkpoints(root / "step-00000010")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert list_checkpoints(empty) == CheckpointListing(root=empty, checkpoints=(), leftovers=())


def test_list_command_text(root):
    code, out, err = run(["list", str(root)])
    assert (code, err) == (0, "")
    entries = list_checkpoints(root).checkpoints
    rows = [
        f"  {c.step:>8}  {c.created_at:27}  {human_size(c.size or 0):>10}  {q:10}  {'valid':11}{tail}".rstrip()
        for c, q, tail in zip(entries, ["no", "no", "ptq int8"], ["", "", "  latest"], strict=True)
    ]
    assert out.splitlines() == [
        f"root {root}: 3 committed checkpoints",
        "      STEP  CREATED                            SIZE  QUANTIZED   CHECK",
        *rows,
        "not checkpoints (uncommitted leftovers):",
        "  .tmp-step-00000040-999999999-0badf00d    temporary of a save in progress, or left by one that crashed",
        "  .trash-step-00000005-0123abcd            a checkpoint being deleted",
        "  step-00000050                            step directory without manifest.json: a save that never committed",
    ]


def test_list_command_json_and_exit_status(root):
    code, out, _ = run(["list", "--json", str(root)])
    doc = json.loads(out)
    assert code == 0 and doc == list_checkpoints(root).to_json()
    assert set(doc) == {"root", "valid", "latest", "checkpoints", "uncommitted"}
    assert (doc["root"], doc["valid"], doc["latest"]) == (str(root), True, 30)
    first = doc["checkpoints"][0]
    assert set(first) == {
        "step",
        "name",
        "path",
        "created_at",
        "size",
        "quantization",
        "latest",
        "verified",
        "valid",
        "problems",
    }
    assert (first["step"], first["path"], first["quantization"], first["latest"]) == (
        10,
        str(root / "step-00000010"),
        None,
        False,
    )
    assert doc["checkpoints"][2]["quantization"]["bits"] == 8
    assert [x["name"] for x in doc["uncommitted"]] == [
        ".tmp-step-00000040-999999999-0badf00d",
        ".trash-step-00000005-0123abcd",
        "step-00000050",
    ]
    _flip(root / "step-00000020" / "optimizer.pt", 100)
    code, out, _ = run(["list", str(root)])
    assert code == 1 and "INVALID" in out
    assert f"      {root}/step-00000020/optimizer.pt: checksum mismatch" in out
    code, out, _ = run(["list", "--fast", "--json", str(root)])
    assert code == 0 and json.loads(out)["checkpoints"][1]["verified"] is False


def test_list_command_errors(root, tmp_path):
    code, out, err = run(["list", str(root / "step-00000010")])
    assert code == 1 and out == "" and "CheckpointInputError" in err and "not a checkpoints root" in err
    code, out, err = run(["list", str(tmp_path / "nope")])
    assert (code, out) == (1, "") and err == (
        f"portable-ckpt list: CheckpointNotFoundError: {tmp_path / 'nope'}: no such directory; pass a checkpoints root\n"
    )
    assert run(["list"])[0] == 2


def test_list_escapes_hostile_leftover_names(root):
    (root / ".tmp-\x1b[2Jevil").mkdir()
    text = render_listing(list_checkpoints(root))
    assert "\x1b" not in text and ".tmp-\\x1b[2Jevil" in text


# --- diff ----------------------------------------------------------------------------------------


def _save(state, directory, *, config=None, vocab=("a", "b"), step=1, extra=None, optimizer=None):
    return save_checkpoint(state, optimizer, config or {}, list(vocab), step, directory, extra=extra)


def test_identical_checkpoints_local_and_in_memory(tmp_path, trained):
    model, optimizer = trained
    a = save_checkpoint(model, optimizer, {"lr": 0.1}, ["a", "b"], 12, tmp_path / "a")
    b = save_checkpoint(model, optimizer, {"lr": 0.1}, ["a", "b"], 12, f"memory://diff-{uuid.uuid4().hex}")
    d = diff_checkpoints(a, b)
    assert isinstance(d, CheckpointDiff) and d.identical
    assert (d.a, d.b, d.a_step, d.b_step) == (a, b, 12, 12)
    names = sorted([*model.state_dict()])  # every name, the tied head included
    assert [t.name for t in d.tensors] == names
    assert {t.change for t in d.tensors} == {"equal"} and d.values == () and d.files == ()
    assert all(t.differing is None and t.max_abs_diff is None for t in d.tensors)
    code, out, err = run(["diff", str(a), b])
    assert (code, err) == (0, "")
    assert out == (
        f"a  {a} (step 12)\nb  {b} (step 12)\ntensors: {len(names)} equal, 0 changed, 0 added, 0 removed\nidentical\n"
    )


def test_tensor_changes(tmp_path):
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    a = _save(
        {
            "w": w,
            "zero": torch.zeros(2),
            "nan": torch.ones(2),
            "d": torch.ones(2),
            "s": torch.ones(4),
            "gone": torch.ones(1),
        },
        tmp_path / "a",
    )
    changed = w.clone()
    changed[0, 1] += 0.5
    changed[2, 3] -= 2.0
    b_state = {
        "w": changed,
        "zero": torch.tensor([0.0, -0.0]),  # equal as numbers, not as bits
        "nan": torch.tensor([1.0, float("nan")]),
        "d": torch.ones(2, dtype=torch.float16),
        "s": torch.ones(2, 2),
        "new": torch.ones(3, dtype=torch.int64),
    }
    b = _save(b_state, tmp_path / "b")
    d = {t.name: t for t in diff_checkpoints(a, b).tensors}
    assert d["w"] == TensorDiff("w", "changed", TensorInfo("w", "F32", (3, 4)), TensorInfo("w", "F32", (3, 4)), 2, 2.0)
    assert (d["zero"].change, d["zero"].differing, d["zero"].max_abs_diff) == ("changed", 1, 0.0)
    assert (d["nan"].change, d["nan"].differing, d["nan"].max_abs_diff) == ("changed", 1, math.inf)
    assert (d["d"].change, d["d"].a, d["d"].b, d["d"].differing) == (
        "changed",
        TensorInfo("d", "F32", (2,)),
        TensorInfo("d", "F16", (2,)),
        None,
    )
    assert (d["s"].a.shape, d["s"].b.shape, d["s"].differing) == ((4,), (2, 2), None)  # type: ignore[union-attr]
    assert d["gone"] == TensorDiff("gone", "removed", TensorInfo("gone", "F32", (1,)), None)
    assert d["new"] == TensorDiff("new", "added", None, TensorInfo("new", "I64", (3,)))
    text = render_diff(diff_checkpoints(a, b))
    assert text.splitlines()[2:10] == [
        "tensors: 0 equal, 5 changed, 1 added, 1 removed",
        "  changed  d     F32 [2] -> F16 [2]",
        "  removed  gone  F32 [1]",
        "  changed  nan   F32 [2]: 1 of 2 elements differ, max abs difference inf (a NaN or an infinity differs)",
        "  added    new   I64 [3]",
        "  changed  s     F32 [4] -> F32 [2, 2]",
        "  changed  w     F32 [3, 4]: 2 of 12 elements differ, max abs difference 2",
        "  changed  zero  F32 [2]: 1 of 2 elements differ, max abs difference 0",
    ]
    doc = diff_checkpoints(a, b).to_json()
    nan = next(t for t in doc["tensors"] if t["name"] == "nan")
    assert nan["max_abs_diff"] is None and nan["differing_elements"] == 1  # JSON has no infinity
    w_doc = next(t for t in doc["tensors"] if t["name"] == "w")
    assert w_doc == {
        "name": "w",
        "change": "changed",
        "a": {"dtype": "F32", "shape": [3, 4]},
        "b": {"dtype": "F32", "shape": [3, 4]},
        "differing_elements": 2,
        "max_abs_diff": 2.0,
    }


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int8,
        torch.uint8,
        torch.int32,
        torch.int64,
        torch.bool,
        torch.complex64,
        torch.float8_e4m3fn,
        torch.uint16,
    ],
)
def test_value_differences_in_chunks_for_every_dtype(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(_diff, "CHUNK_ELEMENTS", 4)  # 10 elements: three chunks, differences in two of them
    base = torch.zeros(10, dtype=torch.float32)
    other = base.clone()
    other[1], other[9] = 1.0, 3.0 if dtype != torch.bool else 1.0
    a = _save({"t": base.to(dtype)}, tmp_path / "a")
    b = _save({"t": other.to(dtype)}, tmp_path / "b")
    (t,) = diff_checkpoints(a, b).tensors
    assert (t.change, t.differing, t.max_abs_diff) == ("changed", 2, 1.0 if dtype == torch.bool else 3.0)
    (same,) = diff_checkpoints(a, a).tensors
    assert (same.change, same.differing) == ("equal", None)


def test_tied_weights(tmp_path, trained):
    model, _ = trained
    state = model.state_dict()
    tied = save_checkpoint(model, None, {}, None, 1, tmp_path / "tied")
    untied = {k: v.clone() for k, v in state.items()}  # the head stored on its own, same values
    plain = save_checkpoint(untied, None, {}, None, 1, tmp_path / "untied")
    d = diff_checkpoints(tied, plain)
    assert {t.change for t in d.tensors} == {"equal"}
    assert d.values == (ValueChange("aliases['head.weight']", "removed", "emb.weight", None),)
    assert not d.identical


def test_json_differences_as_paths(tmp_path):
    t = {"w": torch.ones(2)}
    a = _save(
        t, tmp_path / "a", config={"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "old": 1, "n": 1}, extra={"epoch": 1}
    )
    b = _save(
        t,
        tmp_path / "b",
        config={"optim": {"lr": 0.2, "betas": [0.9, 0.999, 1]}, "new": "x", "n": 1.0},
        vocab=("a", "c", "d"),
        step=2,
        extra=None,
    )
    d = diff_checkpoints(a, b)
    assert d.values == (
        ValueChange("step", "changed", 1, 2),
        ValueChange("config['n']", "changed", 1, 1.0),  # 1 and 1.0 are different JSON
        ValueChange("config['new']", "added", None, "x"),
        ValueChange("config['old']", "removed", 1, None),
        ValueChange("config['optim']['betas'][1]", "changed", 0.99, 0.999),
        ValueChange("config['optim']['betas'][2]", "added", None, 1),
        ValueChange("config['optim']['lr']", "changed", 0.1, 0.2),
        ValueChange("vocab[1]", "changed", "b", "c"),
        ValueChange("vocab[2]", "added", None, "d"),
        ValueChange("extra", "changed", {"epoch": 1}, None),
    )
    assert render_diff(d).splitlines()[3:-1] == [
        "step: 1 -> 2",
        "config['n']: 1 -> 1.0",
        "config['new']: (absent) -> \"x\"",
        "config['old']: 1 -> (absent)",
        "config['optim']['betas'][1]: 0.99 -> 0.999",
        "config['optim']['betas'][2]: (absent) -> 1",
        "config['optim']['lr']: 0.1 -> 0.2",
        'vocab[1]: "b" -> "c"',
        'vocab[2]: (absent) -> "d"',
        'extra: {"epoch": 1} -> null',
    ]
    assert d.to_json()["values"][6] == {"path": "config['optim']['lr']", "change": "changed", "a": 0.1, "b": 0.2}


def test_quantization_summary_and_other_files(tmp_path):
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 32)).sum().backward()
    optimizer.step()
    a = save_checkpoint(net, optimizer, {}, None, 1, tmp_path / "a")
    b8 = save_checkpoint(quantize(_net(), bits=8), None, {}, None, 1, tmp_path / "b8")
    b4 = save_checkpoint(quantize(_net(), bits=4, group_size=16), None, {}, None, 1, tmp_path / "b4")
    d = diff_checkpoints(b8, b4)
    assert [(v.path, v.a, v.b) for v in d.values] == [
        ("quantization['bits']", 8, 4),
        ("quantization['granularity']", "channel", "group"),
        ("quantization['group_size']", None, 16),
    ]
    assert d.files == (FileChange("quantization_metadata.json", "changed"),)
    d = diff_checkpoints(a, b8)
    assert [v.path for v in d.values] == ["quantization"]
    assert d.files == (FileChange("optimizer.pt", "removed"), FileChange("quantization_metadata.json", "added"))


def test_other_files_compared_by_checksum(tmp_path):
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 32)).sum().backward()
    optimizer.step()
    a = save_checkpoint(net.state_dict(), optimizer, {}, None, 1, tmp_path / "a")
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer.step()  # the momentum moves on; the weights saved are those of a
    b = save_checkpoint(weights, optimizer, {}, None, 1, tmp_path / "b")
    d = diff_checkpoints(a, b)
    assert {t.change for t in d.tensors} == {"equal"} and d.values == ()
    assert d.files == (FileChange("optimizer.pt", "changed"),) and not d.identical
    assert render_diff(d).splitlines()[-2:] == ["file optimizer.pt: changed", "different"]


def test_diff_of_roots_compares_their_newest(tmp_path):
    _save({"w": torch.ones(2)}, tmp_path / "a", step=1)
    _save({"w": torch.zeros(2)}, tmp_path / "a", step=2)
    _save({"w": torch.zeros(2)}, tmp_path / "b", step=2)
    d = diff_checkpoints(tmp_path / "a", tmp_path / "b")
    assert d.identical and d.a == tmp_path / "a" / "step-00000002"


def test_diff_reads_verified_tensors(tmp_path):
    a = _save({"w": torch.ones(4)}, tmp_path / "a")
    b = _save({"w": torch.ones(4)}, tmp_path / "b")
    _flip(b / "model.safetensors", -1)  # a byte of the tensor's data: only its checksum can tell
    with pytest.raises(CheckpointCorruptedError, match=r'tensor "w" .* is damaged'):
        diff_checkpoints(a, b)
    code, out, err = run(["diff", str(a), str(b)])
    assert code == 2 and out == ""  # trouble, not "different": as diff(1)
    assert err.startswith(f'portable-ckpt diff: CheckpointCorruptedError: {b}/model.safetensors: tensor "w"')


def test_diff_command_exit_status_and_json(tmp_path):
    a = _save({"w": torch.ones(2)}, tmp_path / "a", config={"lr": 0.1})
    b = _save({"w": torch.ones(2)}, tmp_path / "b", config={"lr": 0.2})
    code, out, err = run(["diff", str(a), str(b)])
    assert (code, err) == (1, "")
    assert out == (
        f"a  {a} (step 1)\nb  {b} (step 1)\ntensors: 1 equal, 0 changed, 0 added, 0 removed\n"
        "config['lr']: 0.1 -> 0.2\ndifferent\n"
    )
    code, out, _ = run(["diff", "--json", str(a), str(b)])
    assert code == 1 and json.loads(out) == {
        "a": {"path": str(a), "step": 1},
        "b": {"path": str(b), "step": 1},
        "identical": False,
        "tensors": [
            {
                "name": "w",
                "change": "equal",
                "a": {"dtype": "F32", "shape": [2]},
                "b": {"dtype": "F32", "shape": [2]},
                "differing_elements": None,
                "max_abs_diff": None,
            }
        ],
        "values": [{"path": "config['lr']", "change": "changed", "a": 0.1, "b": 0.2}],
        "files": [],
    }
    assert run(["diff", str(a), str(a)])[0] == 0
    assert run(["diff", str(a)])[0] == 2
    code, _, err = run(["diff", str(a), str(tmp_path / "missing")])
    assert code == 2 and "CheckpointNotFoundError" in err


def test_diff_help_says_its_exit_status():
    code, out, _ = run(["diff", "--help"])
    assert code == 0 and "exit status: 0 identical, 1 different, 2 usage error or unreadable checkpoint" in out


def test_diff_escapes_hostile_names(tmp_path):
    a = _save({"evil\x1b[31m": torch.ones(1)}, tmp_path / "a", config={"k\x07": "v\x1b"})
    b = _save({"evil\x1b[31m": torch.zeros(1)}, tmp_path / "b", config={"k\x07": "w"})
    code, out, _ = run(["diff", str(a), str(b)])
    assert code == 1 and "\x1b" not in out and "\x07" not in out
    assert "evil\\x1b[31m" in out and "config['k\\x07']" in out


def test_progress_callbacks(tmp_path, root):
    a = _save({"x": torch.ones(1), "y": torch.ones(1)}, tmp_path / "a")
    calls: list[tuple[int, int, str]] = []
    diff_checkpoints(a, a, progress=lambda *c: calls.append(c))
    assert calls == [(0, 2, "x"), (1, 2, "y")]
    calls.clear()
    portable_ckpt.validate_checkpoint(a, progress=lambda *c: calls.append(c))
    files = sorted(json.loads((a / "manifest.json").read_text())["files"])
    assert calls == [(i, len(files), name) for i, name in enumerate(files)]
    calls.clear()
    list_checkpoints(root, progress=lambda *c: calls.append(c))
    assert calls[0] == (0, 3, "step-00000010: manifest.json") and calls[-1][:2] == (2, 3)
    assert {c[2].split(": ")[0] for c in calls} == {"step-00000010", "step-00000020", "step-00000030"}
