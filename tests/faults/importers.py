"""Importers under fault injection: every source kind ``import_checkpoint`` reads (a torch.save state_dict,
a nanoGPT dict, a Lightning ``.ckpt``, a bare safetensors file, Hugging Face Trainer folders: one
``model.safetensors``, a sharded index, a ``pytorch_model.bin``), built valid here, then damaged or made
hostile: truncated zips, wrong pickles (globals outside the allowlist, a persistent id of the wrong
type, giant shapes and storage sizes, deep nesting, memo tricks), path tricks inside the zip (``../``,
absolute and duplicate members), symlinks out of a Trainer folder, a sharded index naming a missing
shard or a file outside the folder, a damaged ``trainer_state.json``.

The promise, checked by :func:`import_problems` for every case and every random mutation
(:func:`fuzz_example`): the import either succeeds, and what it wrote validates and loads (with the
source's values, for the cases that must import), or raises a ``CheckpointError`` subclass whose
message names the file; never another exception, never a hang, never code from the source run (each
hostile pickle would create a marker file), and never a committed checkpoint left by a failed import.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import random
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

import portable_ckpt as pc
from faults.hostile import evil_raw_pickle, evil_torch_file, payloads
from faults.inject import Hang, deadline
from faults.states import leftovers, make_state, preserved_rng

IMPORT_SECONDS = 30  # the longest one import may take before it counts as a hang

# --------------------------------------------------------------------------------------------------
# valid sources, one per kind the importer knows
# --------------------------------------------------------------------------------------------------


def model_state(step: int = 3) -> dict[str, torch.Tensor]:
    """The weights of ``make_state(step)``: every value is the step (the tied head is its own copy here)."""
    return {k: v.detach().clone().contiguous() for k, v in make_state(step)[0].state_dict().items()}


def _optimizer_state(step: int = 3) -> dict[str, Any]:
    return make_state(step)[1].state_dict()


def _scheduler_state(step: int = 3) -> dict[str, Any]:
    return make_state(step)[2].state_dict()


def _rng_state() -> dict[str, Any]:
    with preserved_rng():
        import random as _random

        _random.seed(5)
        np.random.seed(6)
        torch.manual_seed(7)
        return {"python": _random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}


def _write_state_dict(folder: Path) -> Path:
    torch.save(model_state(), folder / "weights.pt")
    return folder / "weights.pt"


def _write_nanogpt(folder: Path) -> Path:
    obj = {
        "model": {"_orig_mod." + k: v for k, v in model_state().items()},
        "optimizer": _optimizer_state(),
        "model_args": {"n_layer": 1, "n_embd": 4},
        "iter_num": 3,
        "best_val_loss": torch.tensor(1.25),
        "config": {"learning_rate": 6e-4},
    }
    torch.save(obj, folder / "ckpt.pt")
    return folder / "ckpt.pt"


def _write_lightning(folder: Path) -> Path:
    obj = {
        "state_dict": model_state(),
        "optimizer_states": [_optimizer_state()],
        "lr_schedulers": [_scheduler_state()],
        "global_step": 3,
        "epoch": 0,
        "pytorch-lightning_version": "2.4.0",
        "hyper_parameters": {"lr": 0.1},
    }
    torch.save(obj, folder / "last.ckpt")
    return folder / "last.ckpt"


def _write_safetensors(folder: Path) -> Path:
    safetensors.torch.save_file(model_state(), folder / "weights.safetensors")
    return folder / "weights.safetensors"


def _trainer_common(folder: Path, marker: Path) -> None:
    torch.save(_optimizer_state(), folder / "optimizer.pt")
    torch.save(_scheduler_state(), folder / "scheduler.pt")
    scaler = {
        "scale": 1024.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 3,
    }
    torch.save(scaler, folder / "scaler.pt")
    state = {"global_step": 3, "epoch": 0.5, "log_history": [{"loss": 2.5, "step": 2}]}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 4}))
    (folder / "tokenizer.json").write_text("{}")
    torch.save(_rng_state(), folder / "rng_state.pth")
    torch.save({"args": payloads(marker)["builtins.exec"]}, folder / "training_args.bin")  # never unpickled


def _write_trainer(folder: Path, marker: Path) -> Path:
    trainer = folder / "checkpoint-3"
    trainer.mkdir()
    safetensors.torch.save_file(model_state(), trainer / "model.safetensors")
    _trainer_common(trainer, marker)
    return trainer


def _write_trainer_sharded(folder: Path, marker: Path) -> Path:
    trainer = folder / "checkpoint-3"
    trainer.mkdir()
    weights = model_state()
    keys = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": keys[:3], "model-00002-of-00002.safetensors": keys[3:]}
    for shard, names in shards.items():
        safetensors.torch.save_file({k: weights[k] for k in names}, trainer / shard)
    index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, names in shards.items() for k in names}}
    (trainer / "model.safetensors.index.json").write_text(json.dumps(index))
    _trainer_common(trainer, marker)
    return trainer


def _write_trainer_bin(folder: Path, marker: Path) -> Path:
    trainer = folder / "checkpoint-3"
    trainer.mkdir()
    torch.save(model_state(), trainer / "pytorch_model.bin")
    _trainer_common(trainer, marker)
    return trainer


# source kind -> writes a valid source into an empty folder (a marker path for hostile extras); returns it
SOURCES: dict[str, Callable[[Path, Path], Path]] = {
    "state_dict": lambda folder, marker: _write_state_dict(folder),
    "nanogpt": lambda folder, marker: _write_nanogpt(folder),
    "lightning": lambda folder, marker: _write_lightning(folder),
    "safetensors": lambda folder, marker: _write_safetensors(folder),
    "hf-trainer": _write_trainer,
    "hf-sharded": _write_trainer_sharded,
    "hf-bin": _write_trainer_bin,
}
TRAINER_KINDS = ("hf-trainer", "hf-sharded", "hf-bin")
SINGLE_FILE_KINDS = ("state_dict", "nanogpt", "lightning", "safetensors")
STEP = 3  # every source records step 3 (the bare state_dict and safetensors none: 0)

# --------------------------------------------------------------------------------------------------
# hand-built pickles and zips (struct.pack): what torch.save never writes
# --------------------------------------------------------------------------------------------------


def op_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def op_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_tensor(
    numel: int, size: list[int], stride: list[int], *, key: str = "0", offset: int = 0, storage: bytes | None = None
) -> bytes:
    """``_rebuild_tensor_v2(persistent id, offset, size, stride, False, OrderedDict())`` by hand."""
    storage_type = op_global("torch", "FloatStorage") if storage is None else storage
    persid = b"(" + op_str("storage") + storage_type + op_str(key) + op_str("cpu") + op_int(numel) + b"tQ"
    size_t = b"(" + b"".join(op_int(d) for d in size) + b"t"
    stride_t = b"(" + b"".join(op_int(d) for d in stride) + b"t"
    hooks = op_global("collections", "OrderedDict") + b")R"
    args = b"(" + persid + op_int(offset) + size_t + stride_t + b"\x89" + hooks + b"t"
    return op_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def deep_list(depth: int) -> bytes:
    """A list nested ``depth`` deep, built with a flat run of opcodes (no recursion in the pickle)."""
    return b"]" * depth + b"a" * (depth - 1)


def pickle_dict(items: list[tuple[bytes, bytes]]) -> bytes:
    """Protocol 2: a dict of the given (key opcodes, value opcodes), then STOP."""
    body = b"".join(k + v + b"s" for k, v in items)
    return b"\x80\x02}" + body + b"."


def zip_members(members: list[tuple[str, bytes]]) -> bytes:
    """A stored zip holding ``members`` in order (duplicates allowed: zipfile warns and writes them)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z, _quiet():
        for name, data in members:
            z.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


@contextlib.contextmanager
def _quiet() -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def pt_of(data_pkl: bytes, storages: dict[str, bytes] | None = None, *, archive: str = "archive") -> bytes:
    """A torch.save-like archive: ``data.pkl``, version, byteorder and the storage records."""
    members = [(f"{archive}/data.pkl", data_pkl), (f"{archive}/version", b"3\n"), (f"{archive}/byteorder", b"little")]
    members += [(f"{archive}/data/{k}", v) for k, v in (storages or {"0": bytes(16)}).items()]
    return zip_members(members)


def _members(blob: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def renamed_members(blob: bytes, rename: Callable[[str], str]) -> bytes:
    """The archive ``blob`` (torch.save's) with every member renamed by ``rename``."""
    return zip_members([(rename(n), d) for n, d in _members(blob)])


def with_member(blob: bytes, name: str, data: bytes) -> bytes:
    return zip_members([*_members(blob), (name, data)])


def duplicate_pickle(blob: bytes, other: bytes) -> bytes:
    """Two ``data.pkl`` members: the archive's own, then ``other`` under the same name."""
    members = _members(blob)
    pkl = next(n for n, _ in members if n.endswith("/data.pkl"))
    return zip_members([*members, (pkl, other)])


# --------------------------------------------------------------------------------------------------
# the catalog
# --------------------------------------------------------------------------------------------------

Expect = str  # "imported": must import with the source's values; "refused": a CheckpointError; "either"


@dataclass(frozen=True)
class ImportCase:
    """One damage: ``damage(src, marker)`` edits the valid source ``src`` of ``kind`` in place (``src`` is
    the file, or the Trainer folder); ``names``: a file the error message must name (one of them)."""

    name: str
    kind: str
    damage: Callable[[Path, Path], None]
    expect: Expect
    names: tuple[str, ...]
    group: str = ""  # the damage, for those tried on every file that can take it (a sample keeps some)


def _file_of(kind: str) -> str:
    """The file of a single-file source, or the weights file of a Trainer folder."""
    return {
        "state_dict": "weights.pt",
        "nanogpt": "ckpt.pt",
        "lightning": "last.ckpt",
        "safetensors": "weights.safetensors",
        "hf-trainer": "model.safetensors",
        "hf-sharded": "model.safetensors.index.json",
        "hf-bin": "pytorch_model.bin",
    }[kind]


def _target(src: Path, file: str) -> Path:
    return src / file if src.is_dir() else src


def _edit(file: str, edit: Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
    def damage(src: Path, marker: Path) -> None:
        path = _target(src, file)
        path.write_bytes(edit(path.read_bytes()))

    return damage


def _replace(file: str, make: Callable[[Path], bytes]) -> Callable[[Path, Path], None]:
    def damage(src: Path, marker: Path) -> None:
        _target(src, file).write_bytes(make(marker))

    return damage


def _tensor_pt(body: bytes, storages: dict[str, bytes] | None = None) -> bytes:
    return pt_of(pickle_dict([(op_str("w"), body)]), storages)


# wrong pickles, each a whole .pt file, for any file the importer unpickles -> must be refused
WRONG_PICKLES: dict[str, Callable[[Path], bytes]] = {
    **{f"evil {how}": functools.partial(evil_torch_file, how=how) for how in payloads(Path("x"))},
    "evil raw pickle (no zip)": evil_raw_pickle,
    "evil global, hand-built": lambda marker: pt_of(
        b"\x80\x02" + op_global("builtins", "exec") + op_str(f"open({str(marker)!r}, 'w').close()") + b"\x85R."
    ),
    "persistent id an int": lambda marker: pt_of(pickle_dict([(op_str("w"), op_int(5) + b"Q")])),
    "persistent id a string": lambda marker: pt_of(pickle_dict([(op_str("w"), op_str("0") + b"Q")])),
    "persistent id a short tuple": lambda marker: pt_of(pickle_dict([(op_str("w"), b"(" + op_str("storage") + b"tQ")])),
    "persistent id naming a dtype as storage": lambda marker: _tensor_pt(
        op_tensor(4, [4], [1], storage=op_global("torch", "float32"))
    ),
    "storage of 2**40 elements, 16 bytes stored": lambda marker: _tensor_pt(op_tensor(2**40, [4], [1])),
    "storage of 2**62 elements": lambda marker: _tensor_pt(op_tensor(2**62, [2**20], [1])),
    "shape [2**40] over 4 elements": lambda marker: _tensor_pt(op_tensor(4, [2**40], [1])),
    "shape [2**31, 2**31]": lambda marker: _tensor_pt(op_tensor(4, [2**31, 2**31], [1, 1])),
    "shape of 64 dimensions of 2**16": lambda marker: _tensor_pt(op_tensor(4, [2**16] * 64, [1] * 64)),
    "negative stride": lambda marker: _tensor_pt(op_tensor(4, [4], [-1])),
    "negative size": lambda marker: _tensor_pt(op_tensor(4, [-4], [1])),
    "offset 2**40": lambda marker: _tensor_pt(op_tensor(4, [4], [1], offset=2**40)),
    "storage record missing": lambda marker: _tensor_pt(op_tensor(4, [4], [1], key="7")),
    "list nested 100,000 deep": lambda marker: pt_of(pickle_dict([(op_str("w"), deep_list(100_000))])),
    "list nested 990 deep": lambda marker: pt_of(pickle_dict([(op_str("w"), deep_list(990))])),
    "memo reference never stored": lambda marker: pt_of(pickle_dict([(op_str("w"), b"h\x07")])),
    "OrderedDict of an int": lambda marker: pt_of(
        pickle_dict([(op_str("w"), op_global("collections", "OrderedDict") + b"(" + op_int(5) + b"tR")])
    ),
    "_codecs.encode, unknown codec": lambda marker: pt_of(
        pickle_dict([(op_str("w"), op_global("_codecs", "encode") + b"(" + op_str("x") + op_str("rot99") + b"tR")])
    ),
    "torch.device('nonsense')": lambda marker: pt_of(
        pickle_dict([(op_str("w"), op_global("torch", "device") + b"(" + op_str("nonsense") + b"tR")])
    ),
    "set of a list (unhashable)": lambda marker: pt_of(
        pickle_dict([(op_str("w"), op_global("builtins", "set") + b"(]" + op_int(1) + b"a" + b"\x85" + b"tR")])
    ),
    "a dict key that is a list": lambda marker: pt_of(b"\x80\x02}](" + op_int(1) + b"l" + op_int(2) + b"s."),
    "protocol 4 with FRAME": lambda marker: b"\x80\x04\x95\x03\x00\x00\x00\x00\x00\x00\x00}\x94.",
    "STACK_GLOBAL of os.system": lambda marker: pt_of(
        b"\x80\x02" + op_str("os") + op_str("system") + b"\x93" + op_str(f"touch {marker}") + b"\x85R."
    ),
    "two pickles, no STOP between": lambda marker: pt_of(b"\x80\x02}.\x80\x02}."),
    "empty data.pkl": lambda marker: pt_of(b""),
}

# zip-level damage of a valid torch.save archive -> must be refused
ZIP_DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "empty file": lambda b: b"",
    "cut to 21 bytes": lambda b: b[:21],
    "cut in half": lambda b: b[: len(b) // 2],
    "last byte cut": lambda b: b[:-1],
    "end record cut": lambda b: b[:-22],
    "zeros past the end": lambda b: b + bytes(64),
    "member '../archive/data.pkl'": lambda b: renamed_members(b, lambda n: "../" + n),
    "members under '/'": lambda b: renamed_members(b, lambda n: "/" + n),
    "members under '..'": lambda b: renamed_members(b, lambda n: ".." + n[n.index("/") :]),
    "member 'archive/../../evil.py' added": lambda b: with_member(b, "archive/../../evil.py", b"import os\n"),
    "member with a backslash": lambda b: renamed_members(b, lambda n: n.replace("/", "\\", 1)),
    "member in a second directory": lambda b: with_member(b, "other/data.pkl", b"\x80\x02}."),
    "data.pkl twice (the second hostile)": lambda b: duplicate_pickle(
        b, b"\x80\x02cbuiltins\nexec\nX\x01\x00\x00\x001\x85R."
    ),
    "data.pkl compressed": lambda b: _compressed(b),
    "a 70 MB data.pkl claimed": lambda b: _claim_size(b, 70 << 20),
    "version needed to extract 24.6": lambda b: _extract_version(b, 246),
}


def _extract_version(blob: bytes, version: int) -> bytes:
    """The first central directory entry claims a zip version needed to extract that zipfile refuses."""
    data = bytearray(blob)
    struct.pack_into("<H", data, data.find(b"PK\x01\x02") + 6, version)
    return bytes(data)


def _compressed(blob: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in _members(blob):
            z.writestr(name, data)
    return buf.getvalue()


def _claim_size(blob: bytes, size: int) -> bytes:
    """The central directory entry of data.pkl claims ``size`` bytes (both sizes), the data unchanged."""
    data = bytearray(blob)
    at = data.rfind(b"PK\x01\x02", 0, len(data))
    while at >= 0:
        (name_len,) = struct.unpack_from("<H", data, at + 28)
        if data[at + 46 : at + 46 + name_len].endswith(b"/data.pkl"):
            struct.pack_into("<II", data, at + 20, size, size)
            break
        at = data.rfind(b"PK\x01\x02", 0, at)
    return bytes(data)


# damage of a safetensors file -> must be refused
SAFETENSORS_DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "empty file": lambda b: b"",
    "cut to 7 bytes": lambda b: b[:7],
    "cut in half": lambda b: b[: len(b) // 2],
    "last byte cut": lambda b: b[:-1],
    "header length 2**63": lambda b: struct.pack("<Q", 2**63) + b[8:],
    "header length past the end": lambda b: struct.pack("<Q", len(b)) + b[8:],
    "a tensor of shape [2**40, 2**40]": lambda b: _reshaped(b, [2**40, 2**40]),
    "a tensor of 1,000 dimensions of 1": lambda b: _reshaped(b, [1] * 1000 + [2**30]),
    "a pickle in its place": lambda b: evil_raw_pickle(Path("/nonexistent/marker")),
}


def _reshaped(blob: bytes, shape: list[int]) -> bytes:
    (n,) = struct.unpack_from("<Q", blob)
    header = json.loads(blob[8 : 8 + n])
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    header[first]["shape"] = shape
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + blob[8 + n :]


def _symlink(file: str, make_target: Callable[[Path, Path], Path | str]) -> Callable[[Path, Path], None]:
    """``file`` of the folder replaced by a symlink to what ``make_target(outside folder, marker)`` returns."""

    def damage(src: Path, marker: Path) -> None:
        outside = src.parent.parent / "outside"
        outside.mkdir(exist_ok=True)
        target = make_target(outside, marker)
        link = src / file
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(target)

    return damage


def _symlink_to_own(file: str) -> Callable[[Path, Path], None]:
    def damage(src: Path, marker: Path) -> None:
        outside = src.parent.parent / "outside"
        outside.mkdir(exist_ok=True)
        target = outside / file
        shutil.move(src / file, target)
        (src / file).symlink_to(target)

    return damage


def _write_outside(data: bytes) -> Callable[[Path, Path], Path]:
    def make(outside: Path, marker: Path) -> Path:
        path = outside / "target"
        path.write_bytes(data)
        return path

    return make


def _fifo_outside(outside: Path, marker: Path) -> Path:
    path = outside / "fifo"
    if not path.exists():
        os.mkfifo(path)
    return path


def _itself(outside: Path, marker: Path, *, file: str) -> Path:
    """The symlink's own path (``outside`` is beside the source folder): a loop."""
    return outside.parent / "src" / "checkpoint-3" / file


def _index_edit(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path, Path], None]:
    def damage(src: Path, marker: Path) -> None:
        path = src / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        edit(index)
        path.write_text(json.dumps(index))

    return damage


def _set_map(tensor: str | None, shard: Any) -> Callable[[dict[str, Any]], None]:
    def edit(index: dict[str, Any]) -> None:
        key = tensor if tensor is not None else sorted(index["weight_map"])[0]
        index["weight_map"][key] = shard

    return edit


def _trainer_state(doc: Any = None, raw: bytes | None = None) -> Callable[[Path, Path], None]:
    def damage(src: Path, marker: Path) -> None:
        (src / "trainer_state.json").write_bytes(raw if raw is not None else json.dumps(doc).encode())

    return damage


def _to_directory(file: str) -> Callable[[Path, Path], None]:
    def damage(src: Path, marker: Path) -> None:
        (src / file).unlink()
        (src / file).mkdir()

    return damage


def _copy_of(other: str, file: str) -> Callable[[Path, Path], None]:
    def damage(src: Path, marker: Path) -> None:
        shutil.copy(src / other, src / file)

    return damage


def _sparse(file: str, size: int) -> Callable[[Path, Path], None]:
    def damage(src: Path, marker: Path) -> None:
        with open(src / file, "r+b") as f:
            f.truncate(size)

    return damage


# damage a file may survive, by file: a Trainer's RNG file is read by torch.load after a narrower scan
# (no archive checks of the format's own .pt files), so the same content in another zip still imports
TOLERATED: dict[str, tuple[str, ...]] = {
    "rng_state.pth": (
        "zeros past the end",
        "members under '..'",
        "data.pkl compressed",
        "two pickles, no STOP between",
    ),
}


def _pickle_files(kind: str) -> list[str]:
    """The files of a source the importer unpickles."""
    if kind in ("state_dict", "nanogpt", "lightning"):
        return [_file_of(kind)]
    if kind == "hf-trainer":
        return ["optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth"]
    if kind == "hf-bin":
        return ["pytorch_model.bin"]
    return []


def catalog() -> list[ImportCase]:
    """Every damage of every source kind, and whether it must import, be refused, or may do either."""
    cases: list[ImportCase] = []
    for kind in SOURCES:
        for file in _pickle_files(kind):
            for what, make in WRONG_PICKLES.items():
                expect = "either" if what in TOLERATED.get(file, ()) or what.startswith("list nested") else "refused"
                cases.append(ImportCase(f"{kind} {file}: {what}", kind, _replace(file, make), expect, (file,), what))
            for what, edit in ZIP_DAMAGE.items():
                expect = "either" if what in TOLERATED.get(file, ()) else "refused"
                cases.append(ImportCase(f"{kind} {file}: {what}", kind, _edit(file, edit), expect, (file,), what))
    st_files = {
        "safetensors": ["weights.safetensors"],
        "hf-trainer": ["model.safetensors"],
        "hf-sharded": ["model-00002-of-00002.safetensors"],
    }
    for kind, files in st_files.items():
        for file in files:
            for what, edit in SAFETENSORS_DAMAGE.items():
                cases.append(ImportCase(f"{kind} {file}: {what}", kind, _edit(file, edit), "refused", (file,), what))
    # a sharded index
    index = "model.safetensors.index.json"
    shard2 = "model-00002-of-00002.safetensors"
    for what, edit, names, expect in [
        ("a missing shard", _set_map(None, "model-00003-of-00003.safetensors"), ("model-00003-of-00003",), "refused"),
        ("a shard '../outside.safetensors'", _set_map(None, "../outside.safetensors"), (index,), "refused"),
        ("a shard '/etc/passwd'", _set_map(None, "/etc/passwd"), (index,), "refused"),
        ("a shard 'sub/x.safetensors'", _set_map(None, "sub/x.safetensors"), (index,), "refused"),
        ("a shard '..'", _set_map(None, ".."), (index,), "refused"),
        ("a shard named by a number", _set_map(None, 7), (index,), "refused"),
        ("a tensor in no shard", _set_map("ghost.weight", shard2), (index,), "refused"),
        ("weight_map a list", lambda i: i.update(weight_map=[1, 2]), (index,), "refused"),
        ("no weight_map", lambda i: i.pop("weight_map"), (index,), "refused"),
    ]:
        cases.append(ImportCase(f"hf-sharded {index}: {what}", "hf-sharded", _index_edit(edit), expect, names))
    cases += [
        ImportCase(
            "hf-sharded: the index is a JSON list", "hf-sharded", _replace(index, lambda m: b"[1]"), "refused", (index,)
        ),
        ImportCase(
            "hf-sharded: the index cut", "hf-sharded", _edit(index, lambda b: b[: len(b) // 2]), "refused", (index,)
        ),
        ImportCase(
            "hf-sharded: a shard holding a tensor the index maps elsewhere",
            "hf-sharded",
            _index_edit(_set_map(None, shard2)),
            "refused",
            ("model-0000",),
        ),
        ImportCase(
            "hf-sharded: a shard symlinked outside the folder",
            "hf-sharded",
            _symlink_to_own(shard2),
            "either",
            (shard2,),
        ),
        ImportCase(
            "hf-sharded: a shard symlinked to a directory",
            "hf-sharded",
            _symlink(shard2, lambda outside, m: outside),
            "refused",
            (shard2,),
        ),
    ]
    # symlinks in a Trainer folder
    for file in ("model.safetensors", "optimizer.pt", "config.json", "trainer_state.json", "rng_state.pth"):
        cases.append(
            ImportCase(
                f"hf-trainer: {file} symlinked outside the folder",
                "hf-trainer",
                _symlink_to_own(file),
                "either",
                (file,),
            )
        )
    for file in ("optimizer.pt", "config.json", "trainer_state.json", "model.safetensors", "scaler.pt"):
        cases += [
            ImportCase(
                f"hf-trainer: {file} a symlink to an outside file of junk",
                "hf-trainer",
                _symlink(file, _write_outside(b"root:x:0:0:root:/root:/bin/sh\n")),
                "refused",
                (file,),
            ),
            ImportCase(
                f"hf-trainer: {file} a symlink to an outside FIFO",
                "hf-trainer",
                _symlink(file, _fifo_outside),
                "either",
                (file,),
            ),
            ImportCase(
                f"hf-trainer: {file} a dangling symlink",
                "hf-trainer",
                _symlink(file, lambda o, m: o / "gone"),
                "either",
                (file,),
            ),
            ImportCase(
                f"hf-trainer: {file} a symlink to itself (a loop)",
                "hf-trainer",
                _symlink(file, functools.partial(_itself, file=file)),
                "either",
                (file,),
            ),
        ]
    cases.append(
        ImportCase(
            "hf-trainer: optimizer.pt a symlink to an outside hostile pickle",
            "hf-trainer",
            _symlink("optimizer.pt", lambda o, m: _write_outside(evil_torch_file(m))(o, m)),
            "refused",
            ("optimizer.pt",),
        )
    )
    cases.append(
        ImportCase(
            "hf-trainer: model.safetensors a symlink to /dev/zero",
            "hf-trainer",
            _symlink("model.safetensors", lambda o, m: "/dev/zero"),
            "either",
            ("model.safetensors",),
        )
    )
    # trainer_state.json damaged
    ts = "trainer_state.json"
    for what, damage, expect in [
        ("cut in half", _edit(ts, lambda b: b[: len(b) // 2]), "refused"),
        ("empty", _trainer_state(raw=b""), "refused"),
        ("not UTF-8", _trainer_state(raw=b'{"global_step": 3, "x": "\xff\xfe"}'), "refused"),
        ("a UTF-16 BOM", _trainer_state(raw='{"global_step": 3}'.encode("utf-16")), "refused"),
        ("global_step -1", _trainer_state({"global_step": -1}), "refused"),
        ("global_step '3'", _trainer_state({"global_step": "3"}), "refused"),
        ("global_step 3.5", _trainer_state({"global_step": 3.5}), "refused"),
        ("global_step true", _trainer_state({"global_step": True}), "refused"),
        ("global_step 2**70", _trainer_state({"global_step": 2**70}), "refused"),
        ("global_step null", _trainer_state({"global_step": None}), "refused"),
        (
            "nested 100,000 deep",
            _trainer_state(raw=b'{"global_step": 3, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
            "refused",
        ),
        ("nested 990 deep", _trainer_state(raw=b'{"global_step": 3, "x": ' + b"[" * 990 + b"]" * 990 + b"}"), "either"),
        ("a JSON list", _trainer_state([1, 2, 3]), "either"),
        ("NaN and Infinity", _trainer_state(raw=b'{"global_step": 3, "grad_norm": NaN, "x": -Infinity}'), "either"),
        ("an integer of 400 digits", _trainer_state(raw=b'{"global_step": 3, "x": ' + b"9" * 400 + b"}"), "either"),
        ("an integer of 5,000 digits", _trainer_state(raw=b'{"global_step": 3, "x": ' + b"9" * 5000 + b"}"), "either"),
        ("duplicate keys", _trainer_state(raw=b'{"global_step": 3, "global_step": 4}'), "either"),
        ("70 MB (sparse)", _sparse(ts, 70 << 20), "refused"),
        ("a directory", _to_directory(ts), "either"),
    ]:
        cases.append(ImportCase(f"hf-trainer {ts}: {what}", "hf-trainer", damage, expect, (ts,)))
    cases += [
        ImportCase(
            "hf-trainer config.json: nested 100,000 deep",
            "hf-trainer",
            _replace("config.json", lambda m: b"[" * 100_000 + b"]" * 100_000),
            "refused",
            ("config.json",),
        ),
        ImportCase(
            "hf-trainer config.json: a JSON list",
            "hf-trainer",
            _replace("config.json", lambda m: b"[1]"),
            "either",
            ("config.json",),
        ),
        ImportCase(
            "hf-trainer rng_state.pth: a NumPy scalar (outside the narrow allowlist)",
            "hf-trainer",
            _replace(
                "rng_state.pth", lambda m: _torch_bytes({"cpu": torch.random.get_rng_state(), "numpy": np.float64(0.5)})
            ),
            "refused",
            ("rng_state.pth",),
        ),
        ImportCase(
            "hf-trainer rng_state.pth: a NumPy object array of hostile objects",
            "hf-trainer",
            _replace(
                "rng_state.pth",
                lambda m: _torch_bytes(
                    {"cpu": torch.random.get_rng_state(), "numpy": np.array([payloads(m)["os.system"]], dtype=object)}
                ),
            ),
            "refused",
            ("rng_state.pth",),
        ),
        ImportCase(
            "hf-trainer rng_state.pth: 17 MB (sparse)",
            "hf-trainer",
            _sparse("rng_state.pth", 17 << 20),
            "refused",
            ("rng_state.pth",),
        ),
        ImportCase(
            "hf-trainer training_args.bin: hostile (never unpickled)",
            "hf-trainer",
            _replace("training_args.bin", lambda m: evil_torch_file(m, "os.system")),
            "imported",
            (),
        ),
        ImportCase(
            "hf-trainer: the folder's weights a directory",
            "hf-trainer",
            _to_directory("model.safetensors"),
            "refused",
            ("checkpoint-3",),
        ),
        ImportCase("hf-trainer: a pristine copy", "hf-trainer", lambda src, m: None, "imported", ()),
        ImportCase("hf-sharded: a pristine copy", "hf-sharded", lambda src, m: None, "imported", ()),
        ImportCase("hf-bin: a pristine copy", "hf-bin", lambda src, m: None, "imported", ()),
        *[
            ImportCase(f"{kind}: a pristine copy", kind, lambda src, m: None, "imported", ())
            for kind in SINGLE_FILE_KINDS
        ],
    ]
    return cases + layout_cases()


def sample(
    cases: list[ImportCase], every: int = 3, keep: Callable[[ImportCase], bool] = lambda c: False
) -> list[ImportCase]:
    """Every case of its own, and one in ``every`` of each damage tried on many files (rotating, so each
    file gets some); ``keep`` names cases kept regardless."""
    groups: dict[str, list[ImportCase]] = {}
    for c in cases:
        if c.group:
            groups.setdefault(c.group, []).append(c)
    chosen = {
        id(c)
        for g, (name, members) in enumerate(sorted(groups.items()))
        for i, c in enumerate(members)
        if (i + g) % every == 0
    }
    return [c for c in cases if not c.group or id(c) in chosen or keep(c)]


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


PLACEHOLDER = "@@placeholder@@"


def placeholder_pt(obj: Any, ops: bytes) -> bytes:
    """torch.save(``obj``) with the string ``PLACEHOLDER`` in its pickle replaced by the opcodes ``ops``
    (what torch.save cannot write itself: a list nested deeper than its pickler recurses)."""
    members = _members(_torch_bytes(obj))
    out = []
    for name, data in members:
        if name.endswith("/data.pkl"):
            data = data.replace(op_str(PLACEHOLDER), ops, 1)
        out.append((name, data))
    return zip_members(out)


def _layout(
    kind: str, change: Callable[[dict[str, Any]], None], ops: bytes | None = None
) -> Callable[[Path, Path], None]:
    """Rewrite a single-file source of ``kind`` with its dict changed by ``change`` (and a placeholder
    replaced by ``ops``)."""

    def damage(src: Path, marker: Path) -> None:
        obj = torch.load(src, weights_only=True)
        change(obj)
        src.write_bytes(_torch_bytes(obj) if ops is None else placeholder_pt(obj, ops))

    return damage


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda obj: obj.__setitem__(key, value)


def _deep_state(marker: Path, *, depth: int) -> bytes:
    return placeholder_pt({"state": {}, "param_groups": [], "x": PLACEHOLDER}, deep_list(depth))


def layout_cases() -> list[ImportCase]:
    """Damage inside a known layout: a step out of range, values nested deeper than anything recurses."""
    cases = []
    for kind, step_key, json_key in (
        ("nanogpt", "iter_num", "config"),
        ("lightning", "global_step", "hyper_parameters"),
    ):
        file = _file_of(kind)
        for value in (-1, 2**64, 2**70, "3", 3.0, None, True):
            cases.append(
                ImportCase(
                    f"{kind} {file}: {step_key} {value!r}",
                    kind,
                    _layout(kind, _set(step_key, value)),
                    "refused",
                    (file,),
                )
            )
        for depth in (990, 5000, 100_000):
            cases.append(
                ImportCase(
                    f"{kind} {file}: {json_key} a list nested {depth} deep",
                    kind,
                    _layout(kind, _set(json_key, PLACEHOLDER), deep_list(depth)),
                    "either",
                    (file,),
                )
            )
            cases.append(
                ImportCase(
                    f"{kind} {file}: an extra key nested {depth} deep",
                    kind,
                    _layout(kind, _set("extra_key", PLACEHOLDER), deep_list(depth)),
                    "either",
                    (file,),
                )
            )
        cases.append(
            ImportCase(f"{kind} {file}: an integer key", kind, _layout(kind, _set("x", {1: 2})), "either", (file,))
        )
        cases.append(
            ImportCase(f"{kind} {file}: a NaN", kind, _layout(kind, _set("x", float("nan"))), "either", (file,))
        )
    cases.append(
        ImportCase(
            "nanogpt ckpt.pt: model nested 100000 deep",
            "nanogpt",
            _layout("nanogpt", _set("model", PLACEHOLDER), deep_list(100_000)),
            "refused",
            ("ckpt.pt",),
        )
    )
    for file in ("optimizer.pt", "scheduler.pt", "scaler.pt"):
        for depth in (990, 100_000):
            cases.append(
                ImportCase(
                    f"hf-trainer {file}: a state with a list nested {depth} deep",
                    "hf-trainer",
                    _replace(
                        file,
                        functools.partial(_deep_state, depth=depth),
                    ),
                    "either",
                    (file,),
                )
            )
    for file, other in (
        ("optimizer.pt", "scaler.pt"),
        ("optimizer.pt", "scheduler.pt"),
        ("scheduler.pt", "optimizer.pt"),
        ("scaler.pt", "optimizer.pt"),
    ):
        cases.append(
            ImportCase(
                f"hf-trainer {file}: holding what {other} holds",
                "hf-trainer",
                _copy_of(other, file),
                "either",
                (file,),
            )
        )
    cases.append(
        ImportCase(
            "hf-trainer optimizer.pt: an empty dict",
            "hf-trainer",
            _replace("optimizer.pt", lambda m: _torch_bytes({})),
            "either",
            ("optimizer.pt",),
        )
    )
    return cases


# --------------------------------------------------------------------------------------------------
# the promise
# --------------------------------------------------------------------------------------------------

# finding kind (as tests/stress.py tallies them) -> its finding texts
Findings = dict[str, list[str]]
KINDS = ("silent corruptions", "unexpected exceptions", "other broken promises")


def committed(dst: Path) -> list[str]:
    """Committed checkpoints under ``dst`` (step directories with a manifest)."""
    return sorted(p.parent.name for p in dst.glob("step-*/manifest.json")) if dst.exists() else []


def import_problems(
    src: Path,
    dst: Path,
    marker: Path,
    *,
    expect: Expect,
    names: tuple[str, ...],
    expected_model: dict[str, torch.Tensor] | None = None,
) -> tuple[str, Findings]:
    """Import ``src`` into the fresh root ``dst`` and check the promise; returns (outcome, findings).

    outcome: "imported", "refused" (a CheckpointError naming the file), or what else happened.
    """
    found: Findings = {k: [] for k in KINDS}
    outcome = "imported"
    report = None
    try:
        with deadline(IMPORT_SECONDS), _quiet():
            report = pc.import_checkpoint(src, dst)
    except pc.CheckpointError as e:
        outcome = "refused"
        text = str(e)
        if not any(n in text for n in (*names, str(src))):
            found["other broken promises"].append(
                f"{type(e).__name__} names none of {[*names, src.name]}: {text[:300]}"
            )
        if expect == "imported":
            found["other broken promises"].append(
                f"refused a source that must import: {type(e).__name__}: {text[:300]}"
            )
    except Hang as e:
        outcome = "hang"
        found["other broken promises"].append(f"the import hung: {e}")
    except Exception as e:  # anything else is the finding
        outcome = "unexpected"
        found["unexpected exceptions"].append(f"{type(e).__module__}.{type(e).__qualname__}: {str(e)[:300]}")
    if marker.exists():
        found["silent corruptions"].append("code from the source ran: the marker file was created")
        marker.unlink()
    if outcome != "imported":
        if committed(dst):
            found["other broken promises"].append(f"a failed import left committed checkpoints {committed(dst)}")
        if leftovers(dst):
            found["other broken promises"].append(f"a failed import left temporaries {leftovers(dst)}")
        return outcome, found
    if expect == "refused":
        found["other broken promises"].append(f"imported a source that must be refused (kind {report and report.kind})")
    assert report is not None
    try:
        with deadline(IMPORT_SECONDS):
            result = pc.validate_checkpoint(report.path)
            if not result.valid:
                found["silent corruptions"].append(f"the imported checkpoint does not validate: {result}")
            with preserved_rng():
                ckpt = pc.load_checkpoint(report.path, restore_rng=False)
    except pc.CheckpointError as e:
        found["silent corruptions"].append(f"the imported checkpoint does not load: {type(e).__name__}: {e}")
        return outcome, found
    except Exception as e:  # anything else is the finding
        found["unexpected exceptions"].append(
            f"loading the imported checkpoint: {type(e).__module__}.{type(e).__qualname__}: {str(e)[:300]}"
        )
        return outcome, found
    if expected_model is not None:
        wrong = sorted(
            k for k, v in expected_model.items() if k not in ckpt.model_state or not torch.equal(ckpt.model_state[k], v)
        )
        if wrong or set(ckpt.model_state) != set(expected_model):
            found["silent corruptions"].append(
                f"imported weights differ from the source's: {wrong or sorted(ckpt.model_state)}"
            )
    return outcome, found


_CACHE: list[tempfile.TemporaryDirectory[str]] = []  # pristine sources, built once per process


def build_source(kind: str, where: Path) -> tuple[Path, Path]:
    """A valid source of ``kind`` in the fresh folder ``where``/src; (the source, the marker path).

    Copied from a pristine source built once per process (the marker its training_args.bin would
    create is the same path relative to the copy, so the cache holds a hostile pickle naming a path
    in the cache; it is never unpickled, and :func:`import_problems` checks the copy's own marker)."""
    if not _CACHE:
        _CACHE.append(tempfile.TemporaryDirectory(prefix="import-sources-"))
    cache = Path(_CACHE[0].name) / kind
    if not cache.exists():
        (cache / "src").mkdir(parents=True)
        SOURCES[kind](cache / "src", cache / "pwned")
    folder = where / "src"
    shutil.copytree(cache / "src", folder, symlinks=True)
    marker = where / "pwned"
    (name,) = os.listdir(folder)
    return folder / name, marker


def run_import_case(case: ImportCase, where: Path) -> tuple[str, Findings]:
    """Build the source of ``case`` in the empty folder ``where``, damage it, import it, check the promise."""
    src, marker = build_source(case.kind, where)
    case.damage(src, marker)
    expected = model_state() if case.expect == "imported" else None
    return import_problems(
        src, where / "dst", marker, expect=case.expect, names=(*case.names, src.name), expected_model=expected
    )


# --------------------------------------------------------------------------------------------------
# fuzzing: random byte flips, insertions and truncations of valid source files
# --------------------------------------------------------------------------------------------------


def mutate(rng: random.Random, blob: bytes) -> bytes:
    """``blob`` with a few bytes flipped, maybe bytes inserted, maybe cut short (at least one change)."""
    data = bytearray(blob)
    how = rng.randrange(4)
    if how in (0, 3) or not data:
        for _ in range(rng.randint(1, 4)):
            if data:
                data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    if how in (1, 3):
        at = rng.randrange(len(data) + 1)
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    if how == 2 or (how == 3 and rng.random() < 0.3):
        del data[rng.randrange(len(data) + 1) if data else 0 :]
    return bytes(data)


@dataclass
class FuzzSources:
    """Pristine sources of every kind, and the bytes of each of their files, to mutate from."""

    root: Path
    sources: dict[str, Path]
    files: dict[str, dict[str, bytes]]  # kind -> file name (relative to the source) -> bytes


def fuzz_sources(root: Path) -> FuzzSources:
    sources, files = {}, {}
    for kind in SOURCES:
        src, _ = build_source(kind, root / kind)
        sources[kind] = src
        if src.is_dir():
            files[kind] = {p.name: p.read_bytes() for p in sorted(src.iterdir()) if p.name != "training_args.bin"}
        else:
            files[kind] = {src.name: src.read_bytes()}
    return FuzzSources(root, sources, files)


def fuzz_example(rng: random.Random, pristine: FuzzSources, scratch: Path) -> tuple[str, str, Findings]:
    """One random mutation of one file of one source kind, imported; (kind, file, findings)."""
    kind = rng.choice(sorted(pristine.files))
    file = rng.choice(sorted(pristine.files[kind]))
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    original = pristine.sources[kind]
    if original.is_dir():
        src = scratch / original.name
        shutil.copytree(original, src)
        target = src / file
    else:
        src = target = scratch / original.name
    target.write_bytes(mutate(rng, pristine.files[kind][file]))
    names = (file, src.name, *(pristine.files[kind] if original.is_dir() else ()))
    _, found = import_problems(src, scratch / "dst", scratch / "pwned", expect="either", names=names)
    return kind, file, found


__all__ = [
    "SOURCES",
    "FuzzSources",
    "ImportCase",
    "build_source",
    "catalog",
    "fuzz_example",
    "fuzz_sources",
    "import_problems",
    "mutate",
    "run_import_case",
    "sample",
]
