"""optimizer.pt and the other .pt files are written by our own writer, from the tensors' memory.

The bytes must be torch.save's (CRC-32 left 0, as the format has it), except the 40 digits of
``.data/serialization_id``, which torch derives from hashes of its own; torch.load(weights_only=True)
must read them back, and our static allowlist scan must accept them.
"""

from __future__ import annotations

import collections
import io
import struct
import zipfile

import pytest
import torch
from torch.utils.serialization import config

from portable_ckpt.errors import CheckpointCorruptedError, CheckpointUnsafeError
from portable_ckpt.format import pt
from portable_ckpt.format.hashing import checksum


def _adamw_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.Linear(300, 5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
    return opt.state_dict()


def _scheduler_like() -> dict:
    ordered = collections.OrderedDict(a=1, b=[2.5, None])
    ordered.note = "kept by BUILD"  # type: ignore[attr-defined]
    return {
        "milestones": collections.Counter([10, 10, 20]),
        "ordered": ordered,
        "set": {1, 2},
        "complex": 1 + 2j,
        "bytes": b"\x00\x01",
        "device": torch.device("cpu"),
        "dtype": torch.bfloat16,
        "big": 2**200,
        "nested": [(1, "x"), {"k": True}],
    }


def _tensors() -> dict:
    base = torch.arange(100, dtype=torch.float32)
    return {
        "view": base[10:20],  # shares base's storage: one record, written once
        "base": base,
        "again": base,
        "empty": torch.zeros(0),  # an empty record: no data descriptor
        "scalar": torch.tensor(3.0),
        "u16": torch.zeros(5, dtype=torch.uint16),  # _rebuild_tensor_v3, an UntypedStorage
        "u64": torch.ones(2, dtype=torch.uint64),
        "f8": torch.zeros(3, dtype=torch.float8_e4m3fn),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "bool": torch.tensor([True, False]),
        "large": torch.randn(300_000),  # above the small-record threshold: written straight from memory
        "strided": torch.randn(8, 6).t(),
        "grad": torch.randn(3, requires_grad=True),
    }


STATES = {"adamw": _adamw_state, "scheduler": _scheduler_like, "tensors": _tensors, "empty": dict}


def _torch_save(obj) -> bytes:
    buf = io.BytesIO()
    with config.patch({"save.compute_crc32": False}):
        torch.save(obj, buf)
    return buf.getvalue()


def _ours(obj) -> tuple[bytes, int, str]:
    buf = io.BytesIO()
    size, digest = pt.save(buf, obj)
    return buf.getvalue(), size, digest


def _without_serialization_id(data: bytes) -> bytes:
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo("archive/.data/serialization_id")
    at = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[at + 26 : at + 30])
    start = at + 30 + name_len + extra_len
    assert data[start : start + 40].isdigit()
    return data[:start] + b"#" * 40 + data[start + 40 :]


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(
                a.view(torch.uint8) if a.dtype.itemsize == 1 else a, b.view(torch.uint8) if b.dtype.itemsize == 1 else b
            )
        )
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("kind", sorted(STATES))
def test_bytes_are_torch_saves_but_for_the_serialization_id(kind):
    obj = STATES[kind]()
    ours, size, digest = _ours(obj)
    reference = _torch_save(obj)
    assert len(ours) == len(reference) == size
    assert _without_serialization_id(ours) == _without_serialization_id(reference)
    assert digest == checksum(ours)


@pytest.mark.parametrize("kind", sorted(STATES))
def test_torch_load_and_the_allowlist_scan_read_it(kind, tmp_path):
    obj = STATES[kind]()
    ours, _, _ = _ours(obj)
    pt.check_archive(io.BytesIO(ours), "optimizer.pt")  # raises on anything outside the allowlist
    back = torch.load(io.BytesIO(ours), weights_only=True)
    assert _equal(obj, back)
    path = tmp_path / "optimizer.pt"
    path.write_bytes(ours)
    assert _equal(obj, pt.load(path, "optimizer.pt", "cpu"))  # the reader's own path: scan, then mmap torch.load
    if kind == "tensors":
        assert back["view"].untyped_storage().data_ptr() == back["base"].untyped_storage().data_ptr()


def test_the_serialization_id_is_deterministic():
    obj = _adamw_state()
    assert _ours(obj)[0] == _ours(obj)[0]


def test_archives_that_need_zip64_go_through_torch_save(monkeypatch):
    obj = _tensors()
    monkeypatch.setattr(pt, "_ZIP32_END", 4096)  # as if the file were 4 GiB
    ours, size, digest = _ours(obj)
    assert ours == _torch_save(obj)  # torch.save's own bytes, id included
    assert (size, digest) == (len(ours), checksum(ours))


def test_a_failed_write_is_the_disks_error():
    class Full(io.RawIOBase):
        def write(self, data) -> int:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        pt.save(Full(), _adamw_state())  # type: ignore[arg-type]


def test_short_writes_are_completed():
    class Trickle(io.BytesIO):
        def write(self, data) -> int:
            return super().write(bytes(memoryview(data)[:1000]))

    obj = _tensors()
    sink = Trickle()
    size, digest = pt.save(sink, obj)  # type: ignore[arg-type]
    assert sink.getvalue() == _ours(obj)[0]
    assert (size, digest) == (len(sink.getvalue()), checksum(sink.getvalue()))


def _data_pkl(obj) -> bytes:
    f = io.BytesIO(_ours(obj)[0])
    return pt._read_record(f, zipfile.ZipFile(f).getinfo("archive/data.pkl"), "x")  # CRC-32 is 0: not zipfile's read


def _slow_accepts(data: bytes) -> bool:
    try:
        _full_scan(data)
    except (CheckpointUnsafeError, CheckpointCorruptedError):
        return False
    return True


def _full_scan(data: bytes) -> None:
    fast = pt._fast_scan
    try:
        pt._fast_scan = lambda _: False  # type: ignore[assignment]
        pt._scan_pickle(data, "x")
    finally:
        pt._fast_scan = fast  # type: ignore[assignment]


@pytest.mark.parametrize("kind", sorted(STATES))
def test_the_fast_pickle_scan_accepts_what_torch_save_writes(kind):
    assert pt._fast_scan(_data_pkl(STATES[kind]()))


def test_the_fast_pickle_scan_never_accepts_what_the_full_scan_refuses():
    import random

    rng = random.Random(0)
    valid = [_data_pkl(make()) for make in STATES.values()]
    hostile = [
        b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.",  # a global outside the allowlist
        b"\x80\x02K\x01Q.",  # a persistent id that is not a tuple
        b"\x80\x02K\x01K\x01\x85Q.",  # built by TUPLE1: torch never writes it
        b"\x80\x03K\x01.",  # protocol 3
        b"\x80\x02K\x01.K",  # bytes after STOP
        b"\x80\x02X\x02\x00\x00\x00\xff\xfe.",  # not UTF-8
        b"\x80\x02\x80\x02N.",  # PROTO twice
    ]
    cases = hostile + [bytes(d[:k]) for d in valid for k in range(0, len(d), 7)]
    for _ in range(3000):
        d = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 3)):
            d[rng.randrange(len(d))] = rng.randrange(256)
        cases.append(bytes(d))
    for data in cases:
        if pt._fast_scan(data):
            assert _slow_accepts(data), data[:80]
    assert not any(pt._fast_scan(h) for h in hostile)
