"""The sharded layout (format_version 2) in one process: sharding.json's rules, reassembly, consolidate,
inspect/validate/list/diff, the DCP storage pair without a process group, and remote roots (memory://).

The multi-process behaviour (FSDP2, TP, DDP, resharding, faults) is in test_distributed.py.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import portable_ckpt as pc
from portable_ckpt.cli import main
from portable_ckpt.format import jsonio, sharding
from portable_ckpt.format import schemas as _schemas

VECTORS = Path(__file__).resolve().parent.parent / "format_spec" / "vectors"
SHARDED = VECTORS / "valid-sharded"

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def _doc() -> dict[str, Any]:
    return json.loads((SHARDED / "sharding.json").read_bytes())


def _split(doc: dict[str, Any]) -> dict[str, Any]:
    return next(e for _, e in sorted(doc["entries"].items()) if len(e.get("chunks", ())) == 2)


# every way an entry can break the schema: (what, change)
BROKEN = [
    ("path empty", lambda d: _split(d).update(path=[])),
    ("path bool", lambda d: _split(d).update(path=["model", True])),
    ("path index too large", lambda d: _split(d).update(path=["model", 1_000_001])),
    ("unknown member", lambda d: _split(d).update(extra=1)),
    ("value and dtype", lambda d: _split(d).update(value=1)),
    ("dtype unknown", lambda d: _split(d).update(dtype="F128")),
    ("shape negative", lambda d: _split(d).update(shape=[-1, 4])),
    ("shape float", lambda d: _split(d).update(shape=[2.0, 4])),
    ("chunks empty", lambda d: _split(d).update(chunks=[])),
    ("chunk member missing", lambda d: _split(d)["chunks"][0].pop("key")),
    ("chunk file not safetensors", lambda d: _split(d)["chunks"][0].update(file="model.bin")),
    ("chunk file with a slash", lambda d: _split(d)["chunks"][0].update(file="../x.safetensors")),
    ("chunk file trailing newline", lambda d: _split(d)["chunks"][0].update(file="a.safetensors\n")),
    ("chunk key empty", lambda d: _split(d)["chunks"][0].update(key="")),
    ("chunk offsets bool", lambda d: _split(d)["chunks"][0].update(offsets=[False, 0])),
    ("entry not an object", lambda d: d["entries"].update({"x": 3})),
    ("name empty", lambda d: d["entries"].update({"": {"path": ["x"], "value": 1}})),
]


@pytest.mark.parametrize("what,change", BROKEN, ids=[b[0] for b in BROKEN])
def test_fast_validation_agrees_with_the_schema(what: str, change: Any) -> None:
    doc = _doc()
    change(doc)
    with pytest.raises(pc.CheckpointCorruptedError):  # the published schema (with the spec's integer rule)
        _schemas.validate(doc, "sharding", "sharding.json")
    with pytest.raises(pc.CheckpointCorruptedError, match=r"sharding.json: schema violation at \$\.entries\."):
        sharding.validate(doc, "sharding.json")


def test_fast_validation_accepts_the_valid_vector_as_the_schema_does() -> None:
    doc = _doc()
    jsonschema.validate(doc, _schemas.schema("sharding"))
    sharding.validate(doc, "sharding.json")


def _parse(doc: dict[str, Any]) -> sharding.Table:
    listed = json.loads((SHARDED / "manifest.json").read_bytes())["files"]
    return sharding.parse(jsonio.dumps(doc), "sharding.json", listed)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: _split(d)["chunks"][1].update(offsets=[0, 0]), "overlap"),
        (lambda d: _split(d)["chunks"].pop(), "a chunk is missing"),
        (lambda d: _split(d)["chunks"][0].update(sizes=[9, 9]), "beyond its size"),
        (lambda d: _split(d)["chunks"][0].update(offsets=[0]), "has 1 dimensions"),
        (lambda d: _split(d)["chunks"][0].update(file="zz-00000-of-00002.safetensors"), "not listed in the manifest"),
        (
            lambda d: _split(d)["chunks"][1].update(
                file=_split(d)["chunks"][0]["file"], key=_split(d)["chunks"][0]["key"]
            ),
            "same key of the same file",
        ),
        (lambda d: d["entries"].update({"dup": {"path": _split(d)["path"], "value": 1}}), "same path"),
        (lambda d: d["entries"].update({"pre": {"path": _split(d)["path"][:1], "value": 1}}), "conflicts"),
        (lambda d: d["entries"].update({"idx": {"path": ["model", 0], "value": 1}}), "conflicts"),
    ],
    ids=["overlap", "gap", "beyond", "dims", "unlisted", "dup-key", "dup-path", "prefix-path", "index-vs-name"],
)
def test_table_rules(change: Any, message: str) -> None:
    doc = _doc()
    change(doc)
    with pytest.raises(pc.CheckpointCorruptedError, match=message):
        _parse(doc)


def test_zero_size_chunks_and_scalars_cover() -> None:
    empty = (sharding.Chunk("a.safetensors", "x", (0, 0), (0, 4)), sharding.Chunk("a.safetensors", "y", (0, 0), (0, 4)))
    sharding.check_cover("e", (0, 4), empty, "t")  # empty chunks overlap nothing
    scalar = (sharding.Chunk("a.safetensors", "s", (), ()),)
    sharding.check_cover("s", (), scalar, "t")
    with pytest.raises(pc.CheckpointCorruptedError, match="overlap"):
        sharding.check_cover("s", (), (*scalar, *scalar), "t")  # two chunks of the one element


def test_nest_rebuilds_lists_and_objects() -> None:
    values = {("state", "w", "step"): 3, ("param_groups", 1, "lr"): 0.5, ("param_groups", 0, "lr"): 0.1}
    assert sharding.nest(values, "t") == {
        "state": {"w": {"step": 3}},
        "param_groups": [{"lr": 0.1}, {"lr": 0.5}],
    }


def test_encode_value_refuses_tensors_and_objects() -> None:
    with pytest.raises(pc.CheckpointInputError, match="a tensor inside a non-tensor value"):
        sharding.encode_value({"a": torch.zeros(1)}, "x")
    with pytest.raises(pc.CheckpointInputError, match="without pickle"):
        sharding.encode_value(object(), "x")
    assert sharding.encode_value((0.9, 0.999), "betas") == {"$tuple": [0.9, 0.999]}


# ------------------------------------------------------------------------------------------------
# the DCP storage pair in one process (no process group: DCP's single-process mode)
# ------------------------------------------------------------------------------------------------


def _trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3 * (seed + 1))
    model(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    return model, opt


def test_dcp_pair_round_trip_with_extra_keys(tmp_path: Path) -> None:
    model, opt = _trained(0)
    msd, osd = get_state_dict(model, opt)
    writer = pc.PortableStorageWriter(tmp_path, step=3, config={"lr": 1e-3})
    dcp.save({"model": msd, "optimizer": osd, "app": {"counter": 5, "name": "run"}}, storage_writer=writer)
    assert writer.location == str(tmp_path / "step-00000003")
    assert sorted(p.name for p in (tmp_path / "step-00000003").iterdir()) == [
        "config.json",
        "manifest.json",
        "model-00000-of-00001.safetensors",
        "optimizer-00000-of-00001.safetensors",
        "sharding.json",
    ]
    other, other_opt = _trained(1)
    msd2, osd2 = get_state_dict(other, other_opt)
    state = {"model": msd2, "optimizer": osd2, "app": {"counter": 0, "name": ""}}
    dcp.load(state, storage_reader=pc.PortableStorageReader(tmp_path))
    set_state_dict(other, other_opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    assert state["app"] == {"counter": 5, "name": "run"}
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    sa, sb = opt.state_dict(), other_opt.state_dict()
    assert sb["param_groups"] == sa["param_groups"]
    for i, s in sa["state"].items():
        for k, v in s.items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)


def test_dcp_writer_refuses_a_value_it_cannot_store_without_pickle(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.api import CheckpointException

    writer = pc.PortableStorageWriter(tmp_path, step=1)
    with pytest.raises(CheckpointException) as info:  # DCP wraps every rank's error in its own
        dcp.save({"w": torch.zeros(2), "odd": {1, 2}}, storage_writer=writer)
    ((error, _),) = info.value.failures.values()
    assert isinstance(error, pc.CheckpointInputError) and "odd is a builtins.set" in str(error)
    writer.reset()  # what DCP calls before its next save: the failed save's staging area goes
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def sharded_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(SHARDED, root / "step-00000009")
    return root


def test_load_without_process_group_gives_full_tensors_and_index_keyed_optimizer(sharded_root: Path) -> None:
    ckpt = pc.load_checkpoint(sharded_root, restore_rng=False)
    assert ckpt.format_version == 2 and ckpt.step == 9
    assert {k: tuple(v.shape) for k, v in ckpt.model_state.items()} == {
        "emb.weight": (8, 4),
        "lin.weight": (4, 4),
        "lin.bias": (4,),
        "head.weight": (8, 4),
    }
    opt = ckpt.optimizer_state
    assert opt is not None and opt["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert set(opt["state"]) == {0, 1, 2, 3} and set(opt["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt["param_groups"][0]["betas"] == (0.9, 0.999)


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 8, bias=False)


def test_load_into_a_plain_model_and_optimizer(sharded_root: Path) -> None:
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    ckpt = pc.load_checkpoint(sharded_root, model, opt, restore_rng=False)
    for name, t in model.state_dict().items():
        assert torch.equal(t, ckpt.model_state[name]), name
    assert opt.param_groups[0]["lr"] == 0.01
    assert torch.equal(opt.state[model.emb.weight]["exp_avg"], ckpt.optimizer_state["state"][0]["exp_avg"])


def test_load_into_a_model_with_other_names_is_a_state_mismatch(sharded_root: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(pc.StateMismatchError):
        pc.load_checkpoint(sharded_root, model, restore_rng=False)
    assert torch.isfinite(model[0].weight).all()


def test_consolidate_gives_an_equal_format_1_checkpoint(sharded_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "single"
    path = pc.consolidate_checkpoint(sharded_root, out)
    assert path == out / "step-00000009"
    a = pc.load_checkpoint(sharded_root, restore_rng=False)
    b = pc.load_checkpoint(path, restore_rng=False)
    assert b.format_version == 1 and b.step == 9 and b.config == a.config and b.vocab == a.vocab
    for name, t in a.model_state.items():
        assert torch.equal(t, b.model_state[name]), name
    assert b.optimizer_state is not None and a.optimizer_state is not None
    assert b.optimizer_state["param_groups"] == a.optimizer_state["param_groups"]
    for i, s in a.optimizer_state["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b.optimizer_state["state"][i][k])
    assert b.extra == {
        "consolidated_from": {
            "path": str(sharded_root / "step-00000009"),
            "world_size": 2,
            "per_rank": "rank 0's RNG state and states= objects kept",
        }
    }
    assert (path / "rng.json").exists()  # rank 0's
    assert pc.validate_checkpoint(path).valid


def test_consolidate_cli_and_refusal_of_an_unsharded_source(sharded_root: Path, tmp_path: Path, capsys: Any) -> None:
    assert main(["consolidate", str(sharded_root), str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "c" / "step-00000009")
    assert main(["consolidate", str(tmp_path / "c"), str(tmp_path / "d")]) == 1
    assert "is not sharded; there is nothing to consolidate" in capsys.readouterr().err


def test_inspect_validate_list_and_diff_understand_sharded(sharded_root: Path, capsys: Any) -> None:
    info = pc.inspect_checkpoint(sharded_root)
    assert info.format_version == 2 and info.sharding is not None
    assert info.sharding["world_size"] == 2 and info.sharding["shard_files"] == 4
    assert info.sharding["mesh"] == {"shape": [2], "dim_names": []}
    assert [t.name for t in info.tensors] == ["emb.weight", "head.weight", "lin.bias", "lin.weight"]
    assert info.unknown_files == ()
    assert main(["inspect", str(sharded_root)]) == 0
    assert "sharded         saved by 2 rank(s), mesh [2]: 4 shard files" in capsys.readouterr().out
    assert pc.validate_checkpoint(sharded_root).valid
    listing = pc.list_checkpoints(sharded_root)
    assert [(e.step, e.valid) for e in listing.checkpoints] == [(9, True)]
    same = pc.diff_checkpoints(sharded_root, sharded_root)
    assert same.identical


def _flip_chunk(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_a_corrupted_shard_names_the_file_and_tensor(sharded_root: Path) -> None:
    shard = sharded_root / "step-00000009" / "model-00001-of-00002.safetensors"
    _flip_chunk(shard)
    with pytest.raises(
        pc.CheckpointCorruptedError, match=r"model-00001-of-00002\.safetensors: checksum mismatch in tensor"
    ):
        pc.load_checkpoint(sharded_root, restore_rng=False)
    report = pc.validate_checkpoint(sharded_root)
    assert [p.file for p in report.problems] == [str(shard)]


def test_an_old_reader_refuses_version_2(sharded_root: Path) -> None:
    """What a version-1 reader does: the version check comes before anything else (§15)."""
    doc = json.loads((sharded_root / "step-00000009" / "manifest.json").read_bytes())
    assert doc["format_version"] == 2
    from portable_ckpt.format import manifest

    old = copy.copy(manifest.READ_VERSION)
    try:
        manifest.READ_VERSION = 1
        with pytest.raises(pc.UnsupportedFormatVersionError, match="format_version 2 is newer than this reader"):
            pc.load_checkpoint(sharded_root, restore_rng=False)
    finally:
        manifest.READ_VERSION = old


def test_dcp_pair_on_a_memory_root() -> None:
    model, opt = _trained(2)
    msd, osd = get_state_dict(model, opt)
    root = "memory://test-sharding/dcp"
    dcp.save({"model": msd, "optimizer": osd}, storage_writer=pc.PortableStorageWriter(root, step=4))
    ckpt = pc.load_checkpoint(root, restore_rng=False)
    assert ckpt.step == 4 and ckpt.format_version == 2
    for name, t in model.state_dict().items():
        assert torch.equal(t, ckpt.model_state[name])
    assert pc.validate_checkpoint(root).valid
