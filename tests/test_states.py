"""User object states and generators (``states=``): exact round trips without pickle, and clear refusals."""

from __future__ import annotations

import enum
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from portable_ckpt import (
    CheckpointCorruptedError,
    CheckpointInputError,
    CheckpointManager,
    StateMismatchError,
    load_checkpoint,
    save_checkpoint,
)
from portable_ckpt.format import jsonio, names
from portable_ckpt.format.hashing import checksum
from portable_ckpt.format.manifest import encode


class Holder:
    """A stateful object that returns a fixed state and records what it is given."""

    def __init__(self, state: Any = None) -> None:
        self.state = state
        self.loaded: Any = None

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.loaded = state


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types, all the way down (tuples stay tuples, NaN equals NaN, dtypes kept)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):  # JSON objects keep no member order
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


STATES = {
    "plain": {"epoch": 3, "lr": 0.25, "name": "run", "flags": [True, False, None]},
    "tuples and odd keys": {"shape": (2, 3), 7: "int key", (1, "a"): 1.5, None: 0, "$marker": "kept"},
    "non-finite": {"best": math.inf, "worst": -math.inf, "nan": math.nan},
    "tensors": {"ema": {"w": torch.arange(6, dtype=torch.float16).reshape(2, 3)}, "count": torch.tensor(5)},
    "nested": [[{"a": (1, [2, {"b": ()}])}]],
    "big ints": {"seed": 2**63 - 1, "neg": -(2**63)},
}


@pytest.mark.parametrize("state", list(STATES.values()), ids=list(STATES))
def test_states_round_trip_exactly(tmp_path, state):
    path = save_checkpoint(nn.Linear(2, 2), None, {}, None, 1, tmp_path, states={"obj": Holder(state)})
    target = Holder()
    ckpt = load_checkpoint(path, states={"obj": target})
    assert same(target.loaded, state)
    assert same(ckpt.states["obj"], state)
    doc = json.loads((Path(path) / names.STATES_JSON).read_text())
    assert doc["format_version"] == 1 and doc["objects"]["obj"]["kind"] == "stateful"


def test_generators_are_restored_to_the_saved_state(tmp_path):
    g = torch.Generator().manual_seed(11)
    torch.rand(5, generator=g)
    path = save_checkpoint(nn.Linear(2, 2), None, {}, None, 1, tmp_path, states={"shuffle": g})
    expected = torch.rand(4, generator=g)  # what g draws next after the save
    fresh = torch.Generator().manual_seed(0)
    load_checkpoint(path, states={"shuffle": fresh})
    assert torch.equal(torch.rand(4, generator=fresh), expected)


def test_async_saves_carry_states_copied_at_the_call(tmp_path):
    holder = Holder({"t": torch.zeros(3)})
    with CheckpointManager(tmp_path) as manager:
        handle = manager.save(nn.Linear(2, 2), None, {}, None, 1, states={"obj": holder}, blocking=False)
        holder.state["t"].add_(1)  # training goes on: the checkpoint holds the state at the call
        handle.wait()
        target = Holder()
        manager.restore(states={"obj": target})
    assert torch.equal(target.loaded["t"], torch.zeros(3))


class Mode(enum.Enum):
    A = 1


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        (
            {"obj": Holder({"mode": Mode.A})},
            r"states\['obj'\].state_dict\(\)\['mode'\] is a \S*test_states.Mode, which a checkpoint stores without pickle",
        ),
        ({"obj": Holder({"s": {1, 2}})}, r"\['s'\] is a builtins.set"),
        ({"obj": Holder({"n": 2**64})}, r"\['n'\] is 18446744073709551616, outside int64"),
        ({"../x": Holder({})}, r"states: name '../x' is not allowed"),
        ({"obj": object()}, r"states\['obj'\] is a object; pass objects with state_dict\(\) and load_state_dict\(\)"),
        ({"obj": Holder({"sparse": torch.eye(2).to_sparse()})}, r"a tensor has layout torch.sparse_coo"),
    ],
    ids=["enum", "set", "int65", "name", "no-state-dict", "sparse"],
)
def test_states_the_format_cannot_hold_are_refused_at_save(tmp_path, objects, message):
    with pytest.raises(CheckpointInputError, match=message):
        save_checkpoint(nn.Linear(2, 2), None, {}, None, 1, tmp_path, states=objects)
    assert list(tmp_path.iterdir()) == []


def test_asking_for_a_state_that_was_not_saved_changes_nothing(tmp_path):
    torch.manual_seed(0)
    path = save_checkpoint(nn.Linear(2, 2), None, {}, None, 1, tmp_path, states={"a": Holder({"x": 1})})
    model = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StateMismatchError, match=r"states.json: no saved state for \['b'\] \(saved: \['a'\]\)"):
        load_checkpoint(path, model, states={"b": Holder()})
    with pytest.raises(StateMismatchError, match=r"states\['a'\] was saved as a stateful, but a Generator"):
        load_checkpoint(path, model, states={"a": torch.Generator()})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def rewrite(ckdir: Path, name: str, data: bytes) -> None:
    """Replace one file and re-seal the manifest, so only the format's own checks can catch the edit."""
    (ckdir / name).write_bytes(data)
    doc = json.loads((ckdir / names.MANIFEST).read_text())
    doc["files"][name] = {"size": len(data), "checksum": checksum(data)}
    (ckdir / names.MANIFEST).write_bytes(encode(doc))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["objects"]["a"]["state"]["t"].update({"$tensor": "a/9"}), r'tensor "a/9" is not in states'),
        (lambda d: d["objects"]["a"]["state"].update({"u": {"$float": "huge"}}), r"schema violation"),
        (lambda d: d["objects"]["a"]["state"].update({"u": {"$tuple": [], "x": 1}}), r"schema violation"),
        (lambda d: d["objects"]["a"].update({"kind": "pickle"}), r"schema violation"),
        (lambda d: d["objects"].pop("a"), r"tensors \['a/0'\] of states.safetensors are referenced by no object"),
    ],
    ids=["dangling", "bad-float", "marker-with-member", "kind", "orphan-tensor"],
)
def test_damaged_states_json_is_refused_naming_the_file(tmp_path, edit, message):
    path = Path(
        save_checkpoint(nn.Linear(2, 2), None, {}, None, 1, tmp_path, states={"a": Holder({"t": torch.ones(2)})})
    )
    doc = json.loads((path / names.STATES_JSON).read_text())
    edit(doc)
    rewrite(path, names.STATES_JSON, jsonio.dumps(doc))
    with pytest.raises(CheckpointCorruptedError, match=message) as info:
        load_checkpoint(path)
    assert info.value.file == f"{path}/{names.STATES_JSON}"
