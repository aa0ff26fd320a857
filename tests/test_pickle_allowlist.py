"""The restricted .pt encoding (format_spec/README.md, "The restricted .pt encoding").

What torch.save writes for the states of torch.optim, torch.optim.lr_scheduler and torch.amp.GradScaler passes
the allowlist; a global or opcode outside it is refused as unsafe before anything is unpickled; a container or
pickle that breaks the rules is refused as corrupted; what torch's unpickler still raises on the rest comes
out as CheckpointCorruptedError naming the file; and the writer refuses a value outside the allowlist before
it writes a byte, naming the value's key path.
"""

from __future__ import annotations

import collections
import enum
import io
import json
import pickle
import struct
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyLM, train_some
from torch import nn

from portable_ckpt import (
    CheckpointCorruptedError,
    CheckpointInputError,
    CheckpointNotFoundError,
    CheckpointUnsafeError,
    load_checkpoint,
    save_checkpoint,
)
from portable_ckpt.format import pt as _pt
from portable_ckpt.format.hashing import checksum
from portable_ckpt.format.manifest import encode
from portable_ckpt.format.safetensors import DTYPES

FILE = "ckpt/optimizer.pt"


class Tagged(torch.Tensor):
    """A tensor subclass: torch.save pickles it with _rebuild_from_type_v2."""


# --------------------------------------------------------------------------------------------------
# real states, as torch.save writes them
# --------------------------------------------------------------------------------------------------


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def _trained(make: Callable[[Any], torch.optim.Optimizer]) -> dict[str, Any]:
    model = _model()
    opt = make(model.parameters())
    for _ in range(2):

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = model(torch.randn(3, 4)).square().mean()
            loss.backward()
            return loss

        opt.step(closure)
    return opt.state_dict()


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1),
    "SGD-momentum-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "Adam": lambda p: torch.optim.Adam(p),
    "Adam-amsgrad": lambda p: torch.optim.Adam(p, amsgrad=True),
    "AdamW": lambda p: torch.optim.AdamW(p, weight_decay=0.1),
    "AdamW-foreach": lambda p: torch.optim.AdamW(p, foreach=True),
    "AdamW-fused": lambda p: torch.optim.AdamW(p, fused=True),
    "AdamW-tensor-lr": lambda p: torch.optim.AdamW(p, lr=torch.tensor(1e-3)),
    "Adadelta": lambda p: torch.optim.Adadelta(p),
    "Adafactor": lambda p: torch.optim.Adafactor(p),
    "Adagrad": lambda p: torch.optim.Adagrad(p),
    "Adamax": lambda p: torch.optim.Adamax(p),
    "ASGD": lambda p: torch.optim.ASGD(p),
    "LBFGS": lambda p: torch.optim.LBFGS(p, history_size=3, max_iter=3),
    "NAdam": lambda p: torch.optim.NAdam(p),
    "RAdam": lambda p: torch.optim.RAdam(p),
    "RMSprop": lambda p: torch.optim.RMSprop(p, momentum=0.5, centered=True),
    "Rprop": lambda p: torch.optim.Rprop(p),
}

_S = torch.optim.lr_scheduler
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "LambdaLR": lambda o: _S.LambdaLR(o, lambda epoch: 0.9**epoch),
    "MultiplicativeLR": lambda o: _S.MultiplicativeLR(o, lambda epoch: 0.95),
    "StepLR": lambda o: _S.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: _S.MultiStepLR(o, milestones=[1, 3]),  # a Counter
    "ConstantLR": lambda o: _S.ConstantLR(o),
    "LinearLR": lambda o: _S.LinearLR(o),
    "ExponentialLR": lambda o: _S.ExponentialLR(o, gamma=0.9),
    "PolynomialLR": lambda o: _S.PolynomialLR(o),
    "CosineAnnealingLR": lambda o: _S.CosineAnnealingLR(o, T_max=10),
    "CosineAnnealingWarmRestarts": lambda o: _S.CosineAnnealingWarmRestarts(o, T_0=3),
    "CyclicLR": lambda o: _S.CyclicLR(o, base_lr=0.01, max_lr=0.1),
    "OneCycleLR": lambda o: _S.OneCycleLR(o, max_lr=1.0, total_steps=10),
    "ReduceLROnPlateau": lambda o: _S.ReduceLROnPlateau(o),
    "SequentialLR": lambda o: _S.SequentialLR(o, [_S.ConstantLR(o), _S.ExponentialLR(o, 0.9)], milestones=[2]),
    "ChainedScheduler": lambda o: _S.ChainedScheduler([_S.ConstantLR(o), _S.ExponentialLR(o, 0.9)]),
}


def _scheduled(make: Callable[[torch.optim.Optimizer], Any]) -> dict[str, Any]:
    opt = torch.optim.SGD(_model().parameters(), lr=0.1, momentum=0.9)
    sched = make(opt)
    for _ in range(3):
        opt.step()
        sched.step(1.0) if isinstance(sched, _S.ReduceLROnPlateau) else sched.step()
    return sched.state_dict()


def _scaler(enabled: bool) -> dict[str, Any]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=enabled, growth_interval=1)
    for _ in range(2):
        opt.zero_grad()
        scaler.scale(model(torch.randn(3, 4)).sum()).backward()
        scaler.step(opt)
        scaler.update()
    return scaler.state_dict()


STATES: dict[str, Callable[[], dict[str, Any]]] = {
    **{f"optimizer-{n}": (lambda m=m: _trained(m)) for n, m in OPTIMIZERS.items()},
    **{f"scheduler-{n}": (lambda m=m: _scheduled(m)) for n, m in SCHEDULERS.items()},
    "scaler-GradScaler": lambda: _scaler(True),
    "scaler-GradScaler-disabled": lambda: _scaler(False),
    "model-state_dict": lambda: TinyLM().state_dict(),  # format 0's model.pt: an OrderedDict with _metadata (BUILD)
}


def torch_save(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def pickle_of(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b or (a != a and b != b)  # NaN equals NaN here


@pytest.mark.parametrize("name", sorted(STATES))
def test_what_torch_save_writes_for_every_state_passes_the_allowlist(name: str):
    state = STATES[name]()
    data = torch_save(state)  # torch.save itself, zip CRCs and all
    _pt.check_archive(io.BytesIO(data), FILE)
    _pt.check_state(state, name)
    buf = io.BytesIO()
    size, _ = _pt.save(buf, state, what=name)
    assert size == len(buf.getvalue())
    buf.seek(0)
    assert_same(_pt.load(buf, FILE, "cpu"), state)


def test_every_state_kind_through_a_checkpoint(tmp_path: Path):
    """SGD, AdamW and Adam with amsgrad, with LambdaLR, StepLR and OneCycleLR, and a GradScaler."""
    for i, (opt_name, sched_name) in enumerate(
        [("SGD", "LambdaLR"), ("AdamW", "StepLR"), ("Adam-amsgrad", "OneCycleLR")]
    ):
        torch.manual_seed(0)
        model = TinyLM()
        opt = OPTIMIZERS[opt_name](model.parameters())
        sched = SCHEDULERS[sched_name](opt)
        scaler = torch.amp.GradScaler("cpu")
        train_some(model, opt)
        sched.step()
        path = save_checkpoint(model, opt, {}, None, i, tmp_path / "root", scheduler=sched, scaler=scaler)
        fresh = TinyLM()
        opt2 = OPTIMIZERS[opt_name](fresh.parameters())
        sched2, scaler2 = SCHEDULERS[sched_name](opt2), torch.amp.GradScaler("cpu")
        load_checkpoint(path, fresh, opt2, scheduler=sched2, scaler=scaler2, restore_rng=False)
        assert_same(opt2.state_dict(), opt.state_dict())
        saved, restored = sched.state_dict(), sched2.state_dict()
        assert {k: v for k, v in saved.items() if k != "lr_lambdas"} == {
            k: v for k, v in restored.items() if k != "lr_lambdas"
        }
        assert scaler2.state_dict() == scaler.state_dict()


# --------------------------------------------------------------------------------------------------
# archives built by hand
# --------------------------------------------------------------------------------------------------

STORAGE = struct.pack("<3f", 1.0, 2.0, 3.0)
_REAL = torch_save({"w": torch.ones(3)})


def archive(
    pickle_bytes: bytes,
    *,
    members: list[tuple[str, bytes]] | None = None,
    method: int = zipfile.ZIP_STORED,
    compress: str = "",
) -> bytes:
    """A torch.save-shaped archive: data.pkl, data/0 (3 floats), byteorder, version; ``members`` replace them."""
    if members is None:
        members = [
            ("archive/data.pkl", pickle_bytes),
            ("archive/byteorder", b"little"),
            ("archive/data/0", STORAGE),
            ("archive/version", b"3\n"),
        ]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a duplicate member name, when a test asks for one
        for name, body in members:
            info = zipfile.ZipInfo(name, date_time=(2025, 1, 1, 0, 0, 0))
            info.compress_type = method if name.endswith(compress) and compress else zipfile.ZIP_STORED
            z.writestr(info, body)
    return out.getvalue()


def tensor_pickle(
    pid_items: bytes = b"X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x03t",
) -> bytes:
    """{"w": tensor} as torch.save pickles it, with the persistent id's MARK...TUPLE given as ``pid_items``."""
    return (
        b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02((" + pid_items + b"Q"
        b"K\x00K\x03\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs."
    )


def test_the_hand_built_archive_is_a_valid_torch_file():
    """Control for the tests below: the builder itself makes a file that passes and loads."""
    data = archive(tensor_pickle())
    _pt.check_archive(io.BytesIO(data), FILE)
    assert torch.equal(_pt.load(io.BytesIO(data), FILE, "cpu")["w"], torch.tensor([1.0, 2.0, 3.0]))


UNSAFE_PICKLES = {
    "os.system": b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.",
    "builtins.eval": b"\x80\x02c__builtin__\neval\nX\x01\x00\x00\x001\x85R.",
    "builtins.getattr": b"\x80\x02c__builtin__\ngetattr\n.",
    "torch.load": b"\x80\x02ctorch\nload\n.",
    "torch.Size": pickle_of(torch_save({"s": torch.Size([2])})),
    "torch._utils._rebuild_parameter": pickle_of(torch_save({"p": nn.Parameter(torch.ones(1))})),
    "builtins.bytearray": pickle_of(torch_save({"b": bytearray(b"x")})),
    "builtins.bytes": pickle_of(torch_save({"b": b""})),
    "builtins.frozenset": pickle_of(torch_save({"f": frozenset([1])})),
    "torch.complex128": pickle_of(torch_save({"d": torch.complex128})),
    "torch._utils._rebuild_sparse_tensor": pickle_of(torch_save({"s": torch.ones(2).to_sparse()})),
    "torch._tensor._rebuild_from_type_v2": pickle_of(torch_save({"t": torch.ones(2).as_subclass(Tagged)})),
    "NEWOBJ": b"\x80\x02ccollections\nOrderedDict\n)\x81.",
    "STACK_GLOBAL": b"\x80\x02X\x02\x00\x00\x00osX\x06\x00\x00\x00system\x93.",
    "INST": b"\x80\x02(ios\nsystem\n.",
    "OBJ": b"\x80\x02(ccollections\nOrderedDict\no.",
    "EMPTY_SET": b"\x80\x02\x8f.",
    "SHORT_BINBYTES": b"\x80\x02C\x01x.",
    "FRAME": b"\x80\x02\x95\x01\x00\x00\x00\x00\x00\x00\x00N.",
    "LONG4": b"\x80\x02\x8b\x01\x00\x00\x00\x01.",
    "POP": b"\x80\x02N0N.",
    "NEWOBJ_EX": b"\x80\x02N)}\x92.",
}


@pytest.mark.parametrize("what", sorted(UNSAFE_PICKLES))
def test_a_global_or_opcode_outside_the_allowlist_is_unsafe(what: str, tmp_path: Path):
    marker = tmp_path / "PWNED"
    data = archive(UNSAFE_PICKLES[what])
    with pytest.raises(CheckpointUnsafeError) as info:
        _pt.load(io.BytesIO(data), FILE, "cpu")
    message = str(info.value)
    assert message.startswith(f"{FILE}: refused to unpickle, unsafe: data.pkl (byte ")
    assert what in message.replace("posix.system", "os.system")
    assert not marker.exists()


def test_the_unsafe_error_names_the_file_when_loading_a_checkpoint(tmp_path: Path):
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = save_checkpoint(model, opt, {}, None, 1, tmp_path / "root")
    data = archive(UNSAFE_PICKLES["os.system"])
    (path / "optimizer.pt").write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_bytes())
    manifest["files"]["optimizer.pt"] = {"size": len(data), "checksum": checksum(data)}  # as an attacker would
    (path / "manifest.json").write_bytes(encode(manifest))
    with pytest.raises(
        CheckpointUnsafeError, match=rf"^{path}/optimizer\.pt: refused to unpickle, unsafe: .* os\.system"
    ):
        load_checkpoint(path, restore_rng=False)


def integer_persistent_id() -> bytes:
    """{"w": <persistent id 0>}: an integer where torch.save writes a tuple."""
    return b"\x80\x02}q\x00X\x01\x00\x00\x00wK\x00Qs."


def test_an_integer_persistent_id_is_corrupted_not_an_assertion():
    """Regression: torch's weights_only unpickler lets an integer persistent id through, and torch.load then
    fails with a bare AssertionError ('saved_id must be a tuple, got int'). The static check refuses it first."""
    data = archive(integer_persistent_id())
    with pytest.raises(AssertionError, match="saved_id must be a tuple, got int"):
        torch.load(io.BytesIO(data), weights_only=True)  # the bug this guards against
    with pytest.raises(CheckpointCorruptedError, match=rf"^{FILE}: .*a persistent id that is not a tuple") as info:
        _pt.load(io.BytesIO(data), FILE, "cpu")
    assert type(info.value) is CheckpointCorruptedError


def _local_name_changed(data: bytes) -> bytes:
    """data.pkl, the first member, named otherwise in its local header than in the central directory."""
    assert data[30:46] == b"archive/data.pkl"
    return data[:30] + b"archive/data.pkx" + data[46:]


def _flag_encrypted(data: bytes) -> bytes:
    cd = data.rindex(b"PK\x01\x02")
    flags = struct.unpack("<H", data[cd + 8 : cd + 10])[0] | 1
    return data[: cd + 8] + struct.pack("<H", flags) + data[cd + 10 :]


CORRUPTED_FILES: dict[str, tuple[bytes, str]] = {
    "not a zip": (tensor_pickle(), "not a zip archive"),
    "empty": (b"", "not a zip archive"),
    "compressed data.pkl": (
        archive(tensor_pickle(), method=zipfile.ZIP_DEFLATED, compress="data.pkl"),
        "is compressed",
    ),
    "compressed storage": (archive(tensor_pickle(), method=zipfile.ZIP_DEFLATED, compress="data/0"), "is compressed"),
    "encrypted": (_flag_encrypted(archive(tensor_pickle())), "is encrypted"),
    "bytes before": (b"\0" * 16 + archive(tensor_pickle()), "does not start at the first byte"),
    "bytes after": (archive(tensor_pickle()) + b"\0", "end-of-central-directory"),
    "no data.pkl": (archive(b"", members=[("archive/version", b"3\n")]), "has no archive/data.pkl"),
    "two data.pkl": (
        archive(b"", members=[("archive/data.pkl", tensor_pickle()), ("archive/data.pkl", tensor_pickle())]),
        "appears twice",
    ),
    "TorchScript": (
        archive(b"", members=[("archive/data.pkl", tensor_pickle()), ("archive/constants.pkl", b"\x80\x02N.")]),
        "unexpected member",
    ),
    "two archives": (
        archive(b"", members=[("archive/data.pkl", tensor_pickle()), ("other/data/0", STORAGE)]),
        "not in the archive's one directory",
    ),
    "a leading zero": (
        archive(b"", members=[("archive/data.pkl", tensor_pickle()), ("archive/data/00", STORAGE)]),
        "unexpected member",
    ),
    "big-endian": (
        archive(b"", members=[("archive/data.pkl", tensor_pickle()), ("archive/byteorder", b"big")]),
        "byteorder is not 'little'",
    ),
    "long record": (
        archive(b"", members=[("archive/data.pkl", tensor_pickle()), ("archive/version", b"3" * 65)]),
        "over its limit of 64",
    ),
    "local header": (_local_name_changed(archive(tensor_pickle())), "local header disagrees"),
    "protocol 4": (archive(b"\x80\x04N."), "must begin with PROTO 2"),
    "no PROTO": (archive(b"N."), "must begin with PROTO 2"),
    "two PROTO": (archive(b"\x80\x02\x80\x02N."), "must begin with PROTO 2"),
    "after STOP": (archive(b"\x80\x02N.N."), "bytes after its STOP"),
    "no STOP": (archive(b"\x80\x02N"), "not a valid pickle"),
    "unknown opcode": (archive(b"\x80\x02\xff."), "not a valid pickle"),
    "truncated string": (archive(b"\x80\x02X\xff\x00\x00\x00ab."), "not a valid pickle"),
    "integer persistent id": (archive(integer_persistent_id()), "a persistent id that is not a tuple"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTED_FILES))
def test_a_broken_container_or_pickle_is_corrupted(case: str):
    data, reason = CORRUPTED_FILES[case]
    with pytest.raises(CheckpointCorruptedError) as info:
        _pt.load(io.BytesIO(data), FILE, "cpu")
    assert type(info.value) is CheckpointCorruptedError
    assert str(info.value).startswith(f"{FILE}: not a readable torch.save file: ")
    assert reason in str(info.value)


# pickles that pass the static check (every opcode and global allowed) and still make torch.load fail
TORCH_FAILURES = {
    "RuntimeError": tensor_pickle(
        b"X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x02\x00\x00\x0099X\x03\x00\x00\x00cpuK\x03t"
    ),
    "ValueError": tensor_pickle(b"X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000t"),
    "IndexError": tensor_pickle(b"t"),
    "LookupError": b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x07\x00\x00\x00no-such\x86R.",
    "KeyError": b"\x80\x02h\x07.",
    "UnpicklingError": b"\x80\x02}K\x01a.",
    "TypeError": b"\x80\x02ctorch\ndevice\nK\x01K\x02K\x03\x87R.",
}


@pytest.mark.parametrize("error", sorted(TORCH_FAILURES))
def test_what_torch_load_raises_after_the_check_is_corrupted_naming_the_file(error: str):
    data = archive(TORCH_FAILURES[error])
    _pt.check_archive(io.BytesIO(data), FILE)  # the static check lets it through ...
    with pytest.raises(Exception) as raw:
        torch.load(io.BytesIO(data), weights_only=True)  # ... torch.load alone raises a bare exception ...
    assert not isinstance(raw.value, CheckpointCorruptedError)
    with pytest.raises(CheckpointCorruptedError, match=rf"^{FILE}: ") as info:  # ... which the codec names
        _pt.load(io.BytesIO(data), FILE, "cpu")
    assert error in str(info.value) or "refused to unpickle" in str(info.value)


@pytest.mark.parametrize(
    "raised",
    [
        AssertionError("saved_id must be a tuple, got int"),
        MemoryError(),
        RecursionError("maximum recursion depth exceeded"),
        SystemError("error return without exception set"),
        BufferError("memoryview has 1 exported buffer"),
        pickle.UnpicklingError("Unsupported operand 149"),
        zipfile.BadZipFile("Bad magic number for file header"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_error_torch_load_may_raise_becomes_corrupted(raised: BaseException, monkeypatch: pytest.MonkeyPatch):
    """What no real byte sequence reaches once the static check passed is still mapped, never re-raised bare."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise raised

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(CheckpointCorruptedError, match=rf"^{FILE}: "):
        _pt.load(io.BytesIO(_REAL), FILE, "cpu")


def test_a_file_removed_before_it_is_read_is_not_found(tmp_path: Path):
    with pytest.raises(CheckpointNotFoundError, match="removed while the checkpoint was being read"):
        _pt.load(tmp_path / "gone.pt", FILE, "cpu")


def test_a_path_is_checked_and_loaded_through_one_open_file(tmp_path: Path):
    path = tmp_path / "state.pt"
    path.write_bytes(_REAL)
    assert torch.equal(_pt.load(path, FILE, "cpu")["w"], torch.ones(3))
    path.write_bytes(archive(UNSAFE_PICKLES["os.system"]))
    with pytest.raises(CheckpointUnsafeError):
        _pt.load(path, FILE, "cpu", mmap=False)


# --------------------------------------------------------------------------------------------------
# the writer: values outside the allowlist are refused before a byte is written
# --------------------------------------------------------------------------------------------------


class Mode(enum.Enum):
    FAST = "fast"


def _with_attribute() -> torch.Tensor:
    t = torch.ones(2)
    t.note = "x"  # type: ignore[attr-defined]
    return t


def _od_with(value: Any) -> collections.OrderedDict[str, int]:
    od: collections.OrderedDict[str, int] = collections.OrderedDict(a=1)
    od.extra = value  # type: ignore[attr-defined]
    return od


REFUSED: dict[str, tuple[Any, str]] = {
    "enum": (
        {"state": {}, "param_groups": [{"lr": 0.1, "mode": Mode.FAST, "params": [0]}]},
        "optimizer.param_groups[0]['mode'] is a test_pickle_allowlist.Mode",
    ),
    "enum key": (
        {"state": {Mode.FAST: 1}},
        "optimizer.state (the key <Mode.FAST: 'fast'>) is a test_pickle_allowlist.Mode",
    ),
    "int subclass": ({"n": type("Count", (int,), {})(3)}, "optimizer.n is a test_pickle_allowlist.Count"),
    "float subclass": ({"lr": type("Rate", (float,), {})(0.1)}, "optimizer.lr is a test_pickle_allowlist.Rate"),
    "defaultdict": ({"d": collections.defaultdict(int)}, "optimizer.d is a collections.defaultdict"),
    "frozenset": ({"s": frozenset([1])}, "optimizer.s is a builtins.frozenset"),
    "bytearray": ({"b": bytearray(b"x")}, "optimizer.b is a builtins.bytearray"),
    "empty bytes": ({"b": b""}, "optimizer.b is an empty bytes object"),
    "huge int": ({"n": 2**2039}, "optimizer.n is an integer of 2040 bits"),
    "size": ({"shape": torch.Size([2])}, "optimizer.shape is a torch.Size"),
    "parameter": ({"p": [nn.Parameter(torch.ones(1))]}, "optimizer.p[0] is a torch.nn.parameter.Parameter"),
    "complex128": ({"t": torch.ones(1, dtype=torch.complex128)}, "optimizer.t is a tensor of dtype torch.complex128"),
    "dtype": ({"d": torch.qint8}, "optimizer.d is the dtype torch.qint8"),
    "meta": ({"t": torch.empty(2, device="meta")}, "optimizer.t is a tensor on device meta"),
    "sparse": ({"t": torch.ones(2).to_sparse()}, "optimizer.t is a torch.sparse_coo tensor"),
    "subclass": ({"t": torch.ones(2).as_subclass(Tagged)}, "optimizer.t is a test_pickle_allowlist.Tagged"),
    "attribute": ({"t": _with_attribute()}, "optimizer.t is a tensor carrying Python attributes ['note']"),
    "OrderedDict attribute": (
        {"od": _od_with(Mode.FAST)},
        "optimizer.od.__dict__['extra'] is a test_pickle_allowlist.Mode",
    ),
    "function": ({"fn": len}, "optimizer.fn is a builtins.builtin_function_or_method"),
    "deep": ({"a": [[{"b": (1, object())}]]}, "optimizer.a[0][0]['b'][1] is a builtins.object"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_the_writer_refuses_a_value_outside_the_allowlist_naming_its_path(case: str):
    obj, start = REFUSED[case]
    buf = io.BytesIO()
    with pytest.raises(CheckpointInputError) as info:
        _pt.save(buf, obj, what="optimizer")
    assert str(info.value).startswith(start), str(info.value)
    assert "convert the value" in str(info.value)  # the remedy
    assert buf.getvalue() == b""  # nothing written


def test_the_writer_accepts_everything_the_allowlist_can_rebuild():
    shared = torch.arange(6.0)
    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    obj = {
        "tensors": [torch.zeros(2, dtype=d) for d in DTYPES.values()],
        "views": [shared[1:4], shared.view(2, 3).t(), shared],  # shared storage, non-contiguous
        "grad": torch.ones(2, requires_grad=True),
        "dtypes": list(DTYPES.values()),
        "device": torch.device("cpu"),
        "containers": (collections.OrderedDict(a=1), collections.Counter("aab"), {1, 2}, [None, True, 1.5]),
        "numbers": [2**2039 - 1, -(2**2039), 1 + 2j, float("nan"), float("inf"), -0.0],
        "strings": ["", "é", b"bytes"],
        "od": _od_with([1, 2]),
        "cyclic": cyclic,
        7: "an integer key",
    }
    buf = io.BytesIO()
    _pt.save(buf, obj, what="state")
    buf.seek(0)
    back = _pt.load(buf, FILE, "cpu")
    assert back["od"].extra == [1, 2] and back["cyclic"][1] is back["cyclic"]
    assert back["numbers"][0] == 2**2039 - 1 and torch.equal(back["views"][1], shared.view(2, 3).t())
    assert [t.dtype for t in back["tensors"]] == list(DTYPES.values())


def test_save_checkpoint_refuses_an_enum_in_a_param_group_and_commits_nothing(tmp_path: Path):
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters())
    opt.param_groups[0]["mode"] = Mode.FAST
    with pytest.raises(CheckpointInputError, match=r"param_groups\[0\]\['mode'\] is a test_pickle_allowlist\.Mode"):
        save_checkpoint(model, opt, {}, None, 1, tmp_path / "root")
    root = tmp_path / "root"
    assert not root.exists() or not [p for p in root.iterdir() if p.name.startswith(("step-", ".tmp-"))]


def test_save_checkpoint_names_the_optimizer_in_the_key_path(tmp_path: Path):
    """The key path starts with the object's name (save.py passes ``what`` to ``pt.save``)."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters())
    opt.param_groups[0]["mode"] = Mode.FAST
    with pytest.raises(CheckpointInputError, match=r"^optimizer\.param_groups\[0\]\['mode'\] is a "):
        save_checkpoint(model, opt, {}, None, 1, tmp_path / "root")


def test_the_writers_check_is_cheap_for_thousands_of_tensors():
    """One walk over metadata: no pickling, no hashing, no tensor data read."""
    n = 10_000
    state = {
        "state": {
            i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4)} for i in range(n)
        },
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(n))}],
    }
    start = time.perf_counter()
    _pt.check_state(state, "optimizer")
    assert time.perf_counter() - start < 2.0  # ~0.03 s here: 30,000 tensors
