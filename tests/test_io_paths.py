"""The fast paths of the safetensors codec and the save/load pipeline give the same bytes and values as
the plain ones: small tensors batched into one write, checksums hashed behind the writes and reads,
pieces read on a thread pool, files written on several threads."""

from __future__ import annotations

import io
import threading

import pytest
import torch
import xxhash
from safetensors.torch import save as reference_save

from portable_ckpt import load_checkpoint, save_checkpoint
from portable_ckpt.errors import CheckpointCorruptedError
from portable_ckpt.format import safetensors as st
from portable_ckpt.threads import Trailing, io_threads


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {
        f"small.{i:04d}": torch.randn(int(torch.randint(0, 300, (1,), generator=g)), generator=g) for i in range(600)
    }
    out |= {
        "large": torch.randn(700_000, generator=g),  # above the batching threshold
        "edge": torch.randn((st._SMALL_BYTES // 4) - 1, generator=g),  # just below it
        "ints": torch.randint(0, 100, (40,), generator=g, dtype=torch.int64),
        "half": torch.randn(33, generator=g).half(),
        "flag": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
        "strided": torch.randn(50, 40, generator=g).t(),  # staged through a contiguous copy
        "naïve ünïcode": torch.ones(2),
    }
    return out


class _Sink:
    def __init__(self, limit: int | None = None) -> None:
        self.buf = bytearray()
        self.limit = limit

    def write(self, data: memoryview) -> int:
        part = bytes(data[: self.limit] if self.limit else data)
        self.buf += part
        return len(part)


@pytest.mark.parametrize("limit", [None, 777])  # 777: short writes
def test_write_is_the_reference_library_byte_for_byte(limit):
    tensors = _mixed()
    meta = {"förmat": "pt"}  # one key: the reference library orders metadata by a hash map
    sink = _Sink(limit)
    result = st.write(sink, tensors, meta)
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    assert bytes(sink.buf) == reference_save(contiguous, metadata=meta)
    assert result.size == len(sink.buf)
    assert result.checksum == xxhash.xxh3_128_hexdigest(bytes(sink.buf))
    expected = {
        k: xxhash.xxh3_128_hexdigest(v.numpy().tobytes()) for k, v in contiguous.items() if v.dtype != torch.bfloat16
    }
    assert {k: result.tensor_checksums[k] for k in expected} == expected
    assert list(result.tensor_checksums) == st.layout(tensors, meta)[1]  # file order


class _Source(io.BytesIO):
    def pread_into(self, view: memoryview, offset: int) -> int:
        piece = self.getbuffer()[offset : offset + len(view)]
        view[: len(piece)] = piece
        return len(piece)


@pytest.mark.parametrize("threads", [1, 3])
def test_read_tensors_sequential_and_parallel(threads, monkeypatch):
    monkeypatch.setattr(st, "_PIECE_BYTES", 1 << 20)  # several pieces per large tensor
    tensors = _mixed()
    data = bytes(reference_save({k: v.contiguous() for k, v in tensors.items()}))
    header, raw = st.read_header(_Source(data), len(data), "model.safetensors")
    h = xxhash.xxh3_128()
    h.update(raw)
    f = _Source(data)
    out = st.read_tensors(f, header, "model.safetensors", file_hash=h, threads=threads)  # type: ignore[arg-type]
    assert h.hexdigest() == xxhash.xxh3_128_hexdigest(data)
    assert list(out) == header.names()
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name


@pytest.mark.parametrize("threads", [1, 3])
def test_into_given_destinations(threads):
    tensors = _mixed()
    data = bytes(reference_save({k: v.contiguous() for k, v in tensors.items()}))
    header, _ = st.read_header(_Source(data), len(data), "m")
    targets = {e.name: torch.empty(e.shape, dtype=st.DTYPES[e.dtype]) for e in header.entries}
    out = st.read_tensors(_Source(data), header, "m", destinations=lambda e: targets[e.name], threads=threads)  # type: ignore[arg-type]
    assert all(out[n] is targets[n] for n in targets)
    assert all(torch.equal(targets[n], t) for n, t in tensors.items())


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("cut", ["in a small tensor", "in the large tensor"])
def test_a_file_truncated_while_read_names_the_tensor(threads, cut):
    tensors = {"a.small": torch.ones(10), "b.small": torch.ones(20), "large": torch.ones(200_000)}
    data = bytes(reference_save(tensors))
    header, _ = st.read_header(_Source(data), len(data), "m")
    entry = next(e for e in header.entries if (e.name == "large") == (cut == "in the large tensor"))
    short = data[: entry.start + 4]  # the header still promises the full size
    with pytest.raises(CheckpointCorruptedError, match=f'file ends inside tensor "{entry.name}"'):
        st.read_tensors(_Source(short), header, "m", threads=threads)  # type: ignore[arg-type]


def test_trailing_runs_every_task_in_order():
    done: list[int] = []
    threads: set[str] = set()

    def task(i: int) -> None:
        threads.add(threading.current_thread().name)
        done.append(i)

    with Trailing("test") as behind:
        for i in range(2000):
            behind.put(task, i, inline=i % 3 == 0)
        behind.finish()
    assert done == list(range(2000))


def test_trailing_reraises_a_tasks_error_on_the_callers_thread():
    def fail() -> None:
        raise ValueError("from the helper")

    with Trailing("test") as behind:
        behind.put(fail)
        with pytest.raises(ValueError, match="from the helper"):
            behind.finish()


def test_io_threads_from_the_environment(monkeypatch):
    monkeypatch.setenv("PORTABLE_CKPT_IO_THREADS", "3")
    assert io_threads() == 3
    monkeypatch.setenv("PORTABLE_CKPT_IO_THREADS", "zero")
    assert 1 <= io_threads() <= 4


@pytest.mark.parametrize("threads", ["1", "4"])
def test_save_and_load_on_one_and_several_threads(threads, tmp_path, monkeypatch):
    monkeypatch.setenv("PORTABLE_CKPT_IO_THREADS", threads)
    monkeypatch.setattr(st, "_PIECE_BYTES", 64 << 10)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(6)])
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 128)).sum().backward()
    opt.step()
    path = save_checkpoint(model, opt, {"lr": 1e-3}, None, 3, tmp_path)
    fresh = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(6)])
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    ckpt = load_checkpoint(path, fresh, fresh_opt)
    assert ckpt.step == 3
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(opt.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
