"""open_checkpoint: lazy reads return load_checkpoint's values, read only the tensor asked for, verify it alone."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from conftest import TinyLM

from portable_ckpt import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointInputError,
    CheckpointNotFoundError,
    load_checkpoint,
    save_checkpoint,
)
from portable_ckpt.reader import open_checkpoint


def _offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte ranges of each tensor, parsed from the safetensors header independently of the library."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {name: (8 + n + e["data_offsets"][0], 8 + n + e["data_offsets"][1]) for name, e in header.items()}


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def saved(tmp_path, trained) -> Path:
    model, optimizer = trained
    return save_checkpoint(model, optimizer, {"lr": 0.01}, ["a", "b"], 7, tmp_path / "ckpts")


@pytest.fixture
def big(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Two 4 MiB tensors around a small one: large enough that reading the wrong bytes would show."""
    g = torch.Generator().manual_seed(1)
    state = {
        "a": torch.randn(1024, 1024, generator=g),
        "b": torch.randn(1024, 1024, generator=g),
        "small": torch.arange(10, dtype=torch.int64),
    }
    return save_checkpoint(state, None, {}, None, 3, tmp_path / "big"), state


def test_values_equal_load_checkpoint(saved):
    ckpt = load_checkpoint(saved)
    with open_checkpoint(saved) as reader:
        assert reader.keys() == sorted(ckpt.model_state)
        for name, expected in ckpt.model_state.items():
            got = reader.tensor(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got, expected), name


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool],
    ids=str,
)
def test_dtypes_and_info(tmp_path, dtype):
    t = (torch.arange(12) % 3).to(dtype).reshape(3, 4)
    path = save_checkpoint({"t": t, "z": torch.zeros(0, 2, dtype=dtype)}, None, {}, None, 0, tmp_path)
    with open_checkpoint(path) as reader:
        dtype_name, shape = reader.info("t")
        assert shape == (3, 4) and isinstance(dtype_name, str)
        assert torch.equal(reader.tensor("t"), t)
        assert reader.tensor("z").shape == (0, 2)


def test_info_names_the_safetensors_dtype(saved):
    with open_checkpoint(saved) as reader:
        assert reader.info("lin.weight") == ("F32", (6, 6))
        assert reader.info("b16") == ("BF16", (7,))


def test_metadata_attributes_and_root_resolution(saved):
    root = saved.parent
    with open_checkpoint(root) as reader:  # a root resolves to its newest checkpoint
        assert reader.path == saved
        assert reader.step == 7
        assert reader.manifest["step"] == 7
        assert "model.safetensors" in reader.manifest["files"]


def test_aliases_resolve(saved):
    with open_checkpoint(saved) as reader:
        assert {"head.weight", "emb.weight"} <= set(reader.keys())
        assert reader.info("head.weight") == reader.info("emb.weight")
        assert torch.equal(reader.tensor("head.weight"), reader.tensor("emb.weight"))
    model = TinyLM()
    assert torch.equal(load_checkpoint(saved, model).model_state["head.weight"], model.head.weight.detach())


def test_reads_only_the_tensors_bytes(big, monkeypatch):
    path, state = big
    ranges = _offsets(path / "model.safetensors")
    reads: list[tuple[int, int]] = []
    real = os.preadv

    def spy(fd, buffers, offset, *args):
        n = real(fd, buffers, offset, *args)
        reads.append((offset, offset + n))
        return n

    monkeypatch.setattr(os, "preadv", spy)
    with open_checkpoint(path) as reader:
        assert reads == []  # opening reads no tensor data
        got = reader.tensor("b")
    assert torch.equal(got, state["b"])
    assert sum(end - start for start, end in reads) == 4 << 20
    assert all(ranges["b"][0] <= start and end <= ranges["b"][1] for start, end in reads)


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_total_bytes_read_are_about_the_tensors(big):
    """Every read of the process counted (rchar): open reads metadata only; tensor() reads ~its own size."""

    def rchar() -> int:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))

    path, _ = big
    before = rchar()
    with open_checkpoint(path) as reader:
        opened = rchar()
        reader.tensor("small")
        small = rchar()
        reader.tensor("a")
        after = rchar()
    # generous slack for the /proc reads themselves and the manifest; far below one 4 MiB tensor
    assert opened - before < 256 << 10
    assert small - opened < 16 << 10
    assert (4 << 20) <= after - small < (4 << 20) + (16 << 10)


def test_damage_is_detected_in_that_tensor_only(big):
    path, state = big
    file = path / "model.safetensors"
    start, end = _offsets(file)["a"]
    _flip(file, (start + end) // 2)
    with open_checkpoint(path) as reader:  # opening does not hash tensor data
        assert torch.equal(reader.tensor("b"), state["b"])
        assert torch.equal(reader.tensor("small"), state["small"])
        with pytest.raises(CheckpointCorruptedError) as e:
            reader.tensor("a")
        unverified = reader.tensor("a", verify=False)
    message = str(e.value)
    assert message.startswith(f'{path}/model.safetensors: tensor "a" (bytes {start}..{end}) is damaged')
    assert "the manifest says checksum" in message
    assert not torch.equal(unverified, state["a"])
    assert (unverified != state["a"]).sum() == 1


def test_unknown_name_suggests_close_names(saved):
    with open_checkpoint(saved) as reader:
        with pytest.raises(CheckpointInputError) as e:
            reader.tensor("lin.wieght")
        assert "close names: 'lin.weight'" in str(e.value)
        assert "model.safetensors" in str(e.value)
        with pytest.raises(CheckpointInputError, match="no name is close"):
            reader.info("zzzzzzzz")
    assert isinstance(e.value, CheckpointError) and isinstance(e.value, ValueError)


def test_closed_reader_refuses_reads_but_keeps_names(saved):
    with open_checkpoint(saved) as reader:
        pass
    with pytest.raises(CheckpointInputError, match="this reader is closed"):
        reader.tensor("lin.weight")
    assert reader.info("lin.weight") == ("F32", (6, 6))
    reader.close()  # closing twice is harmless
    assert "closed" in repr(reader)


def test_open_checks_the_manifest(saved):
    manifest = saved / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["step"] = 8
    manifest.write_text(json.dumps(doc))
    with pytest.raises(CheckpointCorruptedError, match="manifest_checksum"):
        open_checkpoint(saved)


def test_open_checks_the_file_size(saved):
    with open(saved / "model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointCorruptedError, match="size mismatch"):
        open_checkpoint(saved)


def test_open_checks_the_header(saved):
    file = saved / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8] = ord("[")  # the header's opening brace
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptedError, match=r"model\.safetensors: header is not"):
        open_checkpoint(saved)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        open_checkpoint(tmp_path / "nope")


def test_legacy_checkpoint_is_refused_with_a_remedy(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    (tmp_path / "metadata.json").write_text('{"step": 1}')
    with pytest.raises(CheckpointInputError, match="convert"):
        open_checkpoint(tmp_path)


def test_without_per_tensor_checksums_only_unverified_reads(saved):
    from portable_ckpt.format import manifest as _manifest

    manifest = saved / "manifest.json"
    doc = json.loads(manifest.read_text())
    del doc["files"]["model.safetensors"]["tensors"]
    manifest.write_bytes(_manifest.encode(doc))
    expected = load_checkpoint(saved).model_state["lin.weight"]
    with open_checkpoint(saved) as reader:
        assert torch.equal(reader.tensor("lin.weight", verify=False), expected)
        with pytest.raises(CheckpointInputError, match="no per-tensor checksums"):
            reader.tensor("lin.weight")


def test_alias_to_a_missing_tensor_is_refused(saved):
    from portable_ckpt.format import manifest as _manifest

    manifest = saved / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["aliases"]["ghost"] = "not.stored"
    manifest.write_bytes(_manifest.encode(doc))
    with pytest.raises(CheckpointCorruptedError, match=r'alias "ghost" points at "not\.stored", which is not stored'):
        open_checkpoint(saved)
