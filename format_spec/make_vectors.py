"""Generate the committed test vectors in ``format_spec/vectors/`` and their ``index.json``.

    .venv/bin/python format_spec/make_vectors.py            # add the vectors that are missing
    .venv/bin/python format_spec/make_vectors.py NAME ...   # regenerate these
    .venv/bin/python format_spec/make_vectors.py --all      # regenerate every vector

Valid vectors are written by the library itself; invalid ones start from a valid checkpoint and
carry exactly one defect. Defects meant to get past the checksums are crafted as an attacker would:
the file sizes, file checksums, per-tensor checksums and ``manifest_checksum`` are all recomputed,
and hostile safetensors headers are built by hand with ``struct.pack``. ``index.json`` is always
rewritten from the generators.

Output is deterministic for a given torch version and CPU: fixed seeds, ``created_at`` rewritten to
a fixed instant and re-sealed, and the ``.data/serialization_id`` that torch.save draws at random
replaced by a fixed one in every .pt file the generator writes itself. The few trained weights can
differ in their last bit from one CPU to another, which is why committed vectors are kept as they
are unless asked for by name.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import random
import shutil
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from portable_ckpt import save as _save  # noqa: E402
from portable_ckpt.format import jsonio as _jsonio  # noqa: E402
from portable_ckpt.format import manifest as _manifest  # noqa: E402
from portable_ckpt.format import pt as _pt  # noqa: E402
from portable_ckpt.format import safetensors as _safetensors  # noqa: E402
from portable_ckpt.format.hashing import checksum  # noqa: E402

VECTORS = Path(__file__).resolve().parent / "vectors"
CREATED_AT = "2025-01-01T00:00:00.000000Z"
MARKER = "PWNED-portable-ckpt-marker"  # what the hostile pickles would create in the working directory
LEGACY_MARKER = "PWNED-portable-ckpt-legacy-marker"

INDEX: list[dict[str, Any]] = []


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------


class TinyLM(nn.Module):
    """An embedding, a linear layer and a head tied to the embedding."""

    def __init__(self, vocab: int = 8, dim: int = 4, tied: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lin = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin(self.emb(ids))))


def seed(n: int) -> None:
    random.seed(n)
    torch.manual_seed(n)
    try:
        import numpy

        numpy.random.seed(n)
    except ImportError:
        pass


def trained(optimizer_kind: str | None = "adamw", tied: bool = True) -> tuple[TinyLM, torch.optim.Optimizer | None]:
    seed(0)
    model = TinyLM(tied=tied)
    if optimizer_kind is None:
        return model, None
    optimizer: torch.optim.Optimizer = (
        torch.optim.AdamW(model.parameters(), lr=1e-2)
        if optimizer_kind == "adamw"
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = torch.randint(0, 8, (2, 3), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        optimizer.step()
    return model, optimizer


def save(root: Path, model: Any, optimizer: Any, *, step: int, rng: bool = False, **kw: Any) -> Path:
    """A checkpoint written by the library into ``root``; without ``rng`` no RNG files (keeps vectors small)."""
    config = kw.pop("config", {"dim": 4, "lr": 0.01, "name": "tiny"})
    vocab = kw.pop("vocab", ["<pad>", "a", "b", "c", "d", "e", "f", "g"])
    snap = _save.snapshot(model, optimizer, config, vocab, step, **kw)
    if not rng:
        snap = dataclasses.replace(snap, rng_tensors={}, rng_doc=None, rng_sources=[])
    path = _save.write(snap, root)
    edit_manifest(path, lambda m: m.update(created_at=CREATED_AT))
    return path


def checkpoint(name: str, *, optimizer: str | None = None, **kw: Any) -> Path:
    """A fresh checkpoint directory ``vectors/<name>`` holding the tiny model (not a root)."""
    model, opt = trained(optimizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = save(Path(tmp), model, opt, step=kw.pop("step", 5), **kw)
        dst = VECTORS / name
        shutil.move(str(path), dst)
    return dst


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "manifest.json").read_bytes())


def write_manifest(directory: Path, doc: dict[str, Any]) -> None:
    (directory / "manifest.json").write_bytes(_manifest.encode(doc))


def edit_manifest(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    doc = read_manifest(directory)
    change(doc)
    write_manifest(directory, doc)


def header_entries(data: bytes) -> list[tuple[str, int, int]]:
    """(name, begin, end) of each tensor of a safetensors file, absolute positions, as a raw parse."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    return [(k, 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()]


def reseal(directory: Path, *, tensor_table: bool = True) -> None:
    """Recompute every listed file's size and checksum, the per-tensor checksums, and the manifest checksum."""
    doc = read_manifest(directory)
    for name, entry in doc["files"].items():
        path = directory / name
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        entry["size"], entry["checksum"] = len(data), checksum(data)
        if "tensors" in entry and tensor_table:
            entry["tensors"] = {k: checksum(data[b:e]) for k, b, e in sorted(header_entries(data))}
    write_manifest(directory, doc)


def safetensors_bytes(entries: list[tuple[str, str, list[int], int, int]], data: bytes, *, pad: bool = True) -> bytes:
    """A safetensors file built by hand: (name, dtype, shape, begin, end) in the given order, then ``data``."""
    header = {name: {"dtype": dtype, "shape": shape, "data_offsets": [b, e]} for name, dtype, shape, b, e in entries}
    raw = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def hostile_pickle(marker: str) -> bytes:
    """Protocol-0 pickle that calls os.mkdir(marker) when unpickled without restrictions."""
    return b"cos\nmkdir\n(V" + marker.encode() + b"\ntR."


def hostile_torch_file(real: bytes, marker: str) -> bytes:
    """A torch.save zip archive whose data.pkl is replaced by a hostile pickle (other records kept)."""
    src = zipfile.ZipFile(io.BytesIO(real))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            info.CRC = None  # the library saves without zip CRCs (the manifest's XXH3 covers the file): skip the check
            body = hostile_pickle(marker) if info.filename.endswith("/data.pkl") else src.read(info.filename)
            zi = zipfile.ZipInfo(info.filename, date_time=(2025, 1, 1, 0, 0, 0))
            dst.writestr(zi, body)
    return out.getvalue()


SERIALIZATION_ID = b"0" * 40  # torch.save's record of 40 random digits, fixed for reproducible files


def fixed_serialization_id(data: bytes) -> bytes:
    """``data`` (a torch.save archive written without zip CRCs) with its serialization id made fixed."""
    z = zipfile.ZipFile(io.BytesIO(data))
    info = next((i for i in z.infolist() if i.filename.endswith("/.data/serialization_id")), None)
    if info is None:
        return data
    assert info.CRC == 0 and info.compress_size == len(SERIALIZATION_ID)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    return data[:start] + SERIALIZATION_ID + data[start + len(SERIALIZATION_ID) :]


def torch_bytes(obj: Any) -> bytes:
    """torch.save as the library writes it (no zip CRCs), with a fixed serialization id."""
    buf = io.BytesIO()
    with _pt._no_zip_crc():
        torch.save(obj, buf)
    return fixed_serialization_id(buf.getvalue())


def rezip(real: bytes, *, pickle_bytes: bytes | None = None, compress: str | None = None) -> bytes:
    """A torch.save archive rebuilt member by member (fixed dates): data.pkl replaced by ``pickle_bytes``,
    and the member ``compress`` (a record name) deflated."""
    src = zipfile.ZipFile(io.BytesIO(real))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            info.CRC = None  # the library saves without zip CRCs: skip zipfile's check
            body = src.read(info.filename)
            if pickle_bytes is not None and info.filename.endswith("/data.pkl"):
                body = pickle_bytes
            if info.filename.endswith("/.data/serialization_id"):
                body = SERIALIZATION_ID
            method = zipfile.ZIP_DEFLATED if compress and info.filename.endswith("/" + compress) else zipfile.ZIP_STORED
            zi = zipfile.ZipInfo(info.filename, date_time=(2025, 1, 1, 0, 0, 0))
            zi.compress_type = method
            dst.writestr(zi, body)
    return out.getvalue()


class _IntegerPersistentId(pickle.Pickler):
    """Pickles the object ``STORAGE`` as the persistent id 0, an integer, where torch.save writes a tuple."""

    def persistent_id(self, obj: Any) -> Any:
        return 0 if obj is STORAGE else None


STORAGE = object()


def integer_persistent_id_pickle() -> bytes:
    buf = io.BytesIO()
    state = {"state": {0: {"momentum_buffer": STORAGE}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    _IntegerPersistentId(buf, protocol=2).dump(state)
    return buf.getvalue()


def record(
    name: str, description: str, *, step: int | None = None, error: str | None = None, message: str | None = None
) -> None:
    INDEX.append(
        {
            "name": name,
            "description": description,
            "valid": error is None,
            "error": error,
            "message_contains": message,
            "step": step,
        }
    )


# --------------------------------------------------------------------------------------------------
# valid vectors
# --------------------------------------------------------------------------------------------------


def valid_full() -> None:
    model, opt = trained("adamw")
    assert opt is not None
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    with tempfile.TemporaryDirectory() as tmp:
        seed(1234)  # the RNG state saved is the state right after these seeds
        path = save(
            Path(tmp),
            model,
            opt,
            step=100,
            rng=True,
            scheduler=scheduler,
            extra={"tokens_seen": 1200, "run": "vectors"},
        )
        shutil.move(str(path), VECTORS / "valid-full")
    record(
        "valid-full",
        "full precision model with a tied head, AdamW optimizer.pt, scheduler.pt, config, vocab list, "
        "RNG state (rng.safetensors + rng.json), extra",
        step=100,
    )


def valid_tied() -> None:
    checkpoint("valid-tied", step=7, vocab={"<pad>": 0, "a": 1, "b": 2})
    assert read_manifest(VECTORS / "valid-tied")["aliases"] == {"head.weight": "emb.weight"}
    record(
        "valid-tied",
        "head.weight tied to emb.weight: stored once, recorded in aliases; vocab as a token -> id object",
        step=7,
    )


def dtype_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out: dict[str, torch.Tensor] = {}
    for name, dtype in _safetensors.DTYPES.items():
        x = torch.randn(2, 3, generator=g) * 50
        if dtype == torch.bool:
            t = x > 0
        elif dtype.is_floating_point or dtype.is_complex:
            t = x.to(dtype)
        else:
            t = x.abs().to(torch.int64).to(dtype)
        out[f"dtype.{name}"] = t
    out["scalar.f32"] = torch.tensor(-2.5)
    out["scalar.bool"] = torch.tensor(True)
    out["empty.f32"] = torch.zeros(0, 4)
    out["empty.i64"] = torch.zeros(3, 0, 2, dtype=torch.int64)
    out["unicode.\u00e9t\u00e9"] = torch.arange(3, dtype=torch.int16)
    return out


def valid_dtypes() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = save(Path(tmp), dtype_tensors(), None, step=3, vocab=None)
        shutil.move(str(path), VECTORS / "valid-dtypes")
    record("valid-dtypes", "every dtype of the dtype table, 0-dim tensors, empty tensors, a non-ASCII name", step=3)


def valid_legacy() -> None:
    model, opt = trained("sgd")
    assert opt is not None
    d = VECTORS / "valid-legacy"
    d.mkdir()
    # format 0 was torch.save(model.state_dict()): tied entries share one storage in the pickle
    (d / "model.pt").write_bytes(torch_bytes(model.state_dict()))
    (d / "optimizer.pt").write_bytes(torch_bytes(opt.state_dict()))
    (d / "metadata.json").write_text('{"step": 42}\n')
    (d / "config.json").write_text('{"dim": 4, "name": "tiny"}\n')
    (d / "vocab.json").write_text('["<pad>", "a", "b", "c", "d", "e", "f", "g"]\n')
    record("valid-legacy", "format 0: model.pt, optimizer.pt, metadata.json, config.json, vocab.json", step=42)


def valid_root() -> None:
    root = VECTORS / "valid-root"
    model, _ = trained(None)
    for step in (10, 20):
        save(root, model, None, step=step)
    # a save that crashed after writing its manifest but before the rename: complete, yet not committed
    crashed = root / ".tmp-step-00000030-99999-0badc0de"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.move(str(save(Path(tmp), model, None, step=30)), crashed)
    # a deletion in progress: renamed away first, then removed
    trash = root / ".trash-step-00000005-0badc0de"
    trash.mkdir()
    shutil.copy(root / "step-00000010" / "model.safetensors", trash / "model.safetensors")
    assert (root / "latest").read_text() == "step-00000020\n" and (root / ".lock").exists()
    record(
        "valid-root",
        "a checkpoints root: latest -> step-00000020, steps 10 and 20, .lock, a crashed "
        ".tmp-step-00000030-* save (with a manifest) and a .trash-* directory, both to be ignored",
        step=20,
    )


def valid_root_stale_latest() -> None:
    root = VECTORS / "valid-root-stale-latest"
    model, _ = trained(None)
    for step in (10, 20):
        save(root, model, None, step=step)
    (root / "latest").write_text("step-00000030\n")
    record(
        "valid-root-stale-latest",
        "latest names step-00000030, which does not exist: readers fall back to the highest committed step",
        step=20,
    )


def valid_root_latest_not_a_file() -> None:
    root = VECTORS / "valid-root-latest-not-a-file"
    model, _ = trained(None)
    for step in (10, 20):
        save(root, model, None, step=step)
    (root / "latest").unlink()
    (root / "latest").mkdir()
    (root / "latest" / "keep").write_text("git keeps no empty directory\n")
    record(
        "valid-root-latest-not-a-file",
        "latest is a directory, not a regular file: readers fall back to the highest committed step",
        step=20,
    )


DEAD_PID = 4194305  # above Linux's largest possible pid (PID_MAX_LIMIT, 2**22): no process ever has it


def valid_root_replaced() -> None:
    root = VECTORS / "valid-root-replaced"
    model, _ = trained(None)
    for step in (10, 20):
        save(root, model, None, step=step)
    # a writer overwriting step 20 moved the old checkpoint aside, then died before renaming the new one into
    # place: the complete checkpoint under .replaced-* is the only copy of step 20, and latest still names it
    (root / "step-00000020").rename(root / f".replaced-step-00000020-{DEAD_PID}-0badc0de")
    assert (root / "latest").read_text() == "step-00000020\n"
    record(
        "valid-root-replaced",
        "a root where an overwrite of step 20 died between its two renames: step-00000010, latest -> "
        f"step-00000020 (missing), and the complete .replaced-step-00000020-{DEAD_PID}-0badc0de (pid of no "
        "process): readers ignore it and load step 10; a writer opening the root (CheckpointManager) renames it "
        "back to step-00000020, after which step 20 loads",
        step=10,
    )


def valid_unknown() -> None:
    d = checkpoint("valid-unknown-fields", step=9)
    (d / "notes.txt").write_text("written by a future writer\n")
    doc = read_manifest(d)
    doc["files"]["notes.txt"] = {"size": 0, "checksum": "0" * 32}
    doc["future_field"] = {"anything": [1, 2.5, "x"]}
    write_manifest(d, doc)
    reseal(d)
    record(
        "valid-unknown-fields",
        "an unknown top-level manifest field and an unknown listed file (verified, otherwise ignored)",
        step=9,
    )


# --------------------------------------------------------------------------------------------------
# invalid vectors: one defect each
# --------------------------------------------------------------------------------------------------

CORRUPTED = "CheckpointCorruptedError"
UNSAFE = "CheckpointUnsafeError"
QUANT = "QuantizationMetadataError"


def flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


def invalid_flipped_tensor_byte() -> None:
    d = checkpoint("invalid-flipped-tensor-byte")
    path = d / "model.safetensors"
    flip(path, header_entries(path.read_bytes())[0][1] + 1)
    record(
        "invalid-flipped-tensor-byte",
        "one bit of tensor data flipped; the manifest is untouched",
        error=CORRUPTED,
        message="checksum mismatch",
    )


def invalid_flipped_manifest_byte() -> None:
    d = checkpoint("invalid-flipped-manifest-byte")
    data = (d / "manifest.json").read_bytes()
    flip(d / "manifest.json", data.index(b'"size":') + len(b'"size":'))  # a digit of a size: still valid JSON
    record(
        "invalid-flipped-manifest-byte",
        "one bit of a file size in manifest.json flipped (still valid JSON and schema)",
        error=CORRUPTED,
        message="manifest_checksum is",
    )


def invalid_truncated() -> None:
    d = checkpoint("invalid-truncated-safetensors")
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    record(
        "invalid-truncated-safetensors",
        "model.safetensors lost its last 4 bytes",
        error=CORRUPTED,
        message="size mismatch",
    )


def invalid_truncated_resealed() -> None:
    d = checkpoint("invalid-truncated-resealed")
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    reseal(d)
    record(
        "invalid-truncated-resealed",
        "model.safetensors truncated by 4 bytes, every checksum and size "
        "recomputed: the header's offsets run past the end",
        error=CORRUPTED,
        message="tensor data ends at byte",
    )


def invalid_missing_file() -> None:
    d = checkpoint("invalid-missing-file", optimizer="sgd")
    (d / "optimizer.pt").unlink()
    record(
        "invalid-missing-file",
        "optimizer.pt is listed in the manifest but absent",
        error="CheckpointNotFoundError",
        message="listed in the manifest but missing",
    )


def invalid_schema() -> None:
    d = checkpoint("invalid-manifest-schema")
    edit_manifest(d, lambda m: m.update(checksum_algorithm="sha256"))
    record(
        "invalid-manifest-schema",
        'checksum_algorithm "sha256" (re-sealed)',
        error=CORRUPTED,
        message="schema violation at $.checksum_algorithm",
    )


def _hand_built(
    name: str, entries: list[tuple[str, str, list[int], int, int]], data: bytes, *, tensor_table: bool = True
) -> Path:
    d = checkpoint(name, vocab=None)
    (d / "model.safetensors").write_bytes(safetensors_bytes(entries, data))
    edit_manifest(d, lambda m: m.update(aliases={}))
    reseal(d, tensor_table=tensor_table)
    return d


_A = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def invalid_unknown_dtype() -> None:
    _hand_built("invalid-unknown-dtype", [("a", "X32", [2], 0, 8), ("b", "F32", [2], 8, 16)], _A)
    record(
        "invalid-unknown-dtype",
        'dtype "X32" in the header; checksums recomputed',
        error=CORRUPTED,
        message="unknown dtype 'X32'",
    )


def invalid_overlap() -> None:
    _hand_built("invalid-overlapping-offsets", [("a", "F32", [2], 0, 8), ("b", "F32", [2], 4, 12)], _A[:12])
    record(
        "invalid-overlapping-offsets",
        "tensor b starts inside tensor a (offsets [0,8] and [4,12]); checksums recomputed",
        error=CORRUPTED,
        message="overlaps the previous tensor",
    )


def invalid_gap() -> None:
    _hand_built("invalid-gap", [("a", "F32", [1], 0, 4), ("b", "F32", [2], 8, 16)], _A)
    record(
        "invalid-gap",
        "4 unaccounted bytes between tensors a and b; checksums recomputed",
        error=CORRUPTED,
        message="leaves a gap before it",
    )


def invalid_wrong_nbytes() -> None:
    _hand_built("invalid-wrong-nbytes", [("a", "F32", [3], 0, 8), ("b", "F32", [2], 8, 16)], _A)
    record(
        "invalid-wrong-nbytes",
        "tensor a is F32 [3] (12 bytes) but its offsets span 8; checksums recomputed",
        error=CORRUPTED,
        message="needs 12 bytes",
    )


def invalid_header_too_large() -> None:
    d = checkpoint("invalid-header-too-large", vocab=None)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 100_000_001) + b"{}" + b" " * 14)
    edit_manifest(d, lambda m: m.update(aliases={}))
    reseal(d, tensor_table=False)
    record(
        "invalid-header-too-large",
        "the header length field says 100000001 bytes (limit 100000000); checksums recomputed",
        error=CORRUPTED,
        message="exceeds the limit of 100000000 bytes",
    )


def invalid_duplicate_header_key() -> None:
    d = checkpoint("invalid-duplicate-header-key", vocab=None)
    raw = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}'
    raw += b" " * (-len(raw) % 8)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + _A[:4])
    edit_manifest(d, lambda m: m.update(aliases={}))
    reseal(d)
    record(
        "invalid-duplicate-header-key",
        'the header names tensor "a" twice (F32 and I32 over the same bytes); checksums recomputed',
        error=CORRUPTED,
        message="duplicate key 'a'",
    )


def invalid_tensor_table() -> None:
    _hand_built("invalid-tensor-table", [("a", "F32", [2], 0, 8), ("b", "F32", [2], 8, 16)], _A, tensor_table=False)
    record(
        "invalid-tensor-table",
        "model.safetensors holds tensors a and b, the manifest's tensor table lists "
        "the original model's; file checksums recomputed",
        error=CORRUPTED,
        message="tensors disagree with the manifest",
    )


def invalid_version_4() -> None:
    d = checkpoint("invalid-format-version-4")
    edit_manifest(d, lambda m: m.update(format_version=4))
    record(
        "invalid-format-version-4",
        "format_version 4 (re-sealed)",
        error="UnsupportedFormatVersionError",
        message="format_version 4 is newer",
    )


def invalid_quantized_without_metadata() -> None:
    from portable_ckpt import quantize

    seed(0)
    model = quantize(nn.Sequential(nn.Linear(8, 4)), bits=8)
    with tempfile.TemporaryDirectory() as tmp:
        path = save(Path(tmp), model, None, step=5, vocab=None)
        shutil.move(str(path), VECTORS / "invalid-quantized-no-metadata")
    d = VECTORS / "invalid-quantized-no-metadata"
    (d / "quantization_metadata.json").unlink()
    edit_manifest(d, lambda m: m["files"].pop("quantization_metadata.json"))
    record(
        "invalid-quantized-no-metadata",
        "the manifest says quantized (int8 ptq) but quantization_metadata.json is gone (and unlisted; re-sealed)",
        error="QuantizationMetadataError",
        message="quantization metadata file is missing",
    )


def valid_symlinked_file() -> None:
    d = checkpoint("valid-symlinked-file")
    (d / "model.safetensors").rename(d / "payload.bin")
    os.symlink("payload.bin", d / "model.safetensors")
    record(
        "valid-symlinked-file",
        "model.safetensors is a symlink to an unlisted file with the right bytes (readers follow links, §4)",
        step=5,
    )


def invalid_dangling_symlink() -> None:
    d = checkpoint("invalid-dangling-symlink")
    (d / "model.safetensors").unlink()
    os.symlink("nowhere.bin", d / "model.safetensors")
    record(
        "invalid-dangling-symlink",
        "model.safetensors is a symlink to nothing",
        error="CheckpointNotFoundError",
        message="listed in the manifest but missing",
    )


def invalid_symlink_to_directory() -> None:
    d = checkpoint("invalid-symlink-to-directory")
    (d / "blobs").mkdir()  # a directory that holds the right file, so git keeps it
    (d / "model.safetensors").rename(d / "blobs" / "model.safetensors")
    os.symlink("blobs", d / "model.safetensors")
    record(
        "invalid-symlink-to-directory",
        "model.safetensors is a symlink to a directory",
        error=CORRUPTED,
        message="is not a regular file",
    )


def invalid_dotdot() -> None:
    d = checkpoint("invalid-dotdot-file-name")
    (d / "escape.json").write_text("{}\n")
    data = (d / "escape.json").read_bytes()
    edit_manifest(d, lambda m: m["files"].update({"../escape.json": {"size": len(data), "checksum": checksum(data)}}))
    record(
        "invalid-dotdot-file-name",
        'the manifest lists "../escape.json" (re-sealed)',
        error=CORRUPTED,
        message="schema violation at $.files",
    )


def invalid_hostile_pickle() -> None:
    d = checkpoint("invalid-hostile-pickle", optimizer="sgd")
    path = d / "optimizer.pt"
    path.write_bytes(hostile_torch_file(path.read_bytes(), MARKER))
    reseal(d)
    record(
        "invalid-hostile-pickle",
        f"optimizer.pt whose data.pkl calls os.mkdir({MARKER!r}); checksums recomputed; "
        "refused for safety, the error names the refused global",
        error=UNSAFE,
        message="os.mkdir",
    )


def invalid_legacy_hostile_pickle() -> None:
    d = VECTORS / "invalid-legacy-hostile-pickle"
    d.mkdir()
    model, _ = trained(None)
    (d / "model.pt").write_bytes(hostile_torch_file(torch_bytes(model.state_dict()), LEGACY_MARKER))
    (d / "metadata.json").write_text('{"step": 1}\n')
    record(
        "invalid-legacy-hostile-pickle",
        f"format 0 model.pt whose data.pkl calls os.mkdir({LEGACY_MARKER!r}); refused for safety, the error "
        "names the refused global",
        error=UNSAFE,
        message="os.mkdir",
    )


def _raw_manifest(name: str, edit: Callable[[bytes], bytes]) -> None:
    d = checkpoint(name)
    (d / "manifest.json").write_bytes(edit((d / "manifest.json").read_bytes()))


def invalid_manifest_duplicate_key() -> None:
    _raw_manifest("invalid-manifest-duplicate-key", lambda b: b.replace(b'"step":5', b'"step":5,"step":6'))
    record(
        "invalid-manifest-duplicate-key",
        'manifest.json has "step" twice',
        error=CORRUPTED,
        message="duplicate key 'step'",
    )


def invalid_manifest_nan() -> None:
    _raw_manifest("invalid-manifest-nan", lambda b: b.replace(b'"extra":null', b'"extra":{"loss":NaN}'))
    record(
        "invalid-manifest-nan",
        "manifest.json holds NaN, which JSON does not have",
        error=CORRUPTED,
        message="NaN is not valid JSON",
    )


def invalid_lone_surrogate() -> None:
    _raw_manifest("invalid-lone-surrogate", lambda b: b.replace(b'"extra":null', b'"extra":{"note":"\\ud800"}'))
    record(
        "invalid-lone-surrogate",
        'manifest.json holds the string "\\ud800" (a lone surrogate, which has no UTF-8 encoding)',
        error=CORRUPTED,
        message="invalid JSON: a string holds a lone surrogate",
    )


def invalid_number_overflow() -> None:
    _raw_manifest("invalid-number-overflow", lambda b: b.replace(b'"extra":null', b'"extra":{"loss":1e400}'))
    record(
        "invalid-number-overflow",
        "manifest.json holds 1e400, beyond the range of a double",
        error=CORRUPTED,
        message="invalid JSON: number 1e400 is out of range",
    )


def invalid_step_mismatch() -> None:
    root = VECTORS / "invalid-step-mismatch"
    model, _ = trained(None)
    path = save(root, model, None, step=5)
    edit_manifest(path, lambda m: m.update(step=6))
    record(
        "invalid-step-mismatch",
        "a root whose step-00000005 holds a manifest for step 6 (re-sealed)",
        error=CORRUPTED,
        message="named for step 5",
    )


def invalid_alias_target() -> None:
    d = checkpoint("invalid-alias-target")
    edit_manifest(d, lambda m: m.update(aliases={"head.weight": "missing.weight"}))
    record(
        "invalid-alias-target",
        'alias "head.weight" points at a tensor that is not stored (re-sealed)',
        error=CORRUPTED,
        message="which is not stored",
    )


def invalid_config_not_object() -> None:
    d = checkpoint("invalid-config-not-object")
    (d / "config.json").write_bytes(b"[1,2]\n")
    reseal(d)
    record(
        "invalid-config-not-object",
        "config.json is a JSON array (checksums recomputed)",
        error=CORRUPTED,
        message="expected a JSON object",
    )


def invalid_unknown_file_checksum() -> None:
    d = checkpoint("invalid-unknown-file-checksum")
    (d / "notes.txt").write_text("written by a future writer\n")
    edit_manifest(d, lambda m: m["files"].update({"notes.txt": {"size": 27, "checksum": "0" * 32}}))
    record(
        "invalid-unknown-file-checksum",
        "an unknown listed file whose checksum does not match",
        error=CORRUPTED,
        message="checksum mismatch",
    )


def invalid_unused_known_file_checksum() -> None:
    d = checkpoint("invalid-unused-file-checksum")
    (d / "quantization_metadata.json").write_text("{}\n")
    # listed, but unused: the manifest's quantization is null, so no reader consults the file
    edit_manifest(d, lambda m: m["files"].update({"quantization_metadata.json": {"size": 3, "checksum": "0" * 32}}))
    record(
        "invalid-unused-file-checksum",
        "a full-precision checkpoint also lists quantization_metadata.json, which no reader uses (quantization "
        "is null), with a wrong checksum: every listed file is verified (re-sealed)",
        error=CORRUPTED,
        message="checksum mismatch",
    )


def invalid_checksum_not_last() -> None:
    d = checkpoint("invalid-manifest-checksum-not-last")
    doc = _manifest.seal(read_manifest(d))  # the right checksum ...
    (d / "manifest.json").write_bytes(_jsonio.dumps(doc))  # ... at its sorted position, not last
    record(
        "invalid-manifest-checksum-not-last",
        "manifest.json with the correct manifest_checksum, but written with sorted keys, so the checksum is not "
        "the last member (as drafts of this format wrote it)",
        error=CORRUPTED,
        message="must end with",
    )


def invalid_integer_with_fraction() -> None:
    _raw_manifest("invalid-integer-with-fraction", lambda b: b.replace(b'"step":5,', b'"step":5.0,'))
    d = VECTORS / "invalid-integer-with-fraction"
    write_manifest(d, read_manifest(d))  # re-sealed: the checksum covers the bytes "5.0"
    assert b'"step":5.0,' in (d / "manifest.json").read_bytes()
    record(
        "invalid-integer-with-fraction",
        'manifest.json says "step":5.0 (re-sealed): JSON Schema counts 5.0 as an integer, this format does not',
        error=CORRUPTED,
        message="schema violation at $.step",
    )


def invalid_optimizer_not_a_dict() -> None:
    d = checkpoint("invalid-optimizer-not-a-dict", optimizer="sgd")
    (d / "optimizer.pt").write_bytes(torch_bytes([1, 2, 3]))
    reseal(d)
    record(
        "invalid-optimizer-not-a-dict",
        "optimizer.pt holds a list, not a state_dict (checksums recomputed)",
        error=CORRUPTED,
        message="expected a state_dict",
    )


def invalid_optimizer_no_param_groups() -> None:
    d = checkpoint("invalid-optimizer-no-param-groups", optimizer="sgd")
    (d / "optimizer.pt").write_bytes(torch_bytes({"state": {}}))
    reseal(d)
    record(
        "invalid-optimizer-no-param-groups",
        "optimizer.pt holds a dict without param_groups (checksums recomputed)",
        error=CORRUPTED,
        message="needs 'state' and 'param_groups'",
    )


def invalid_dimension_too_large() -> None:
    _hand_built("invalid-dimension-too-large", [("a", "F32", [2**64, 0], 0, 0), ("b", "F32", [4], 0, 16)], _A)
    record(
        "invalid-dimension-too-large",
        "tensor a has shape [18446744073709551616, 0] (a dimension of 2**64, though no elements), an integer "
        "outside the range of every JSON text; checksums recomputed",
        error=CORRUPTED,
        message="integer 18446744073709551616 is outside [-2**63, 2**64)",
    )


def invalid_element_count_too_large() -> None:
    _hand_built(
        "invalid-element-count-too-large",
        [("a", "F32", [2**32, 2**32, 0], 0, 0), ("b", "F32", [4], 0, 16)],
        _A,
    )
    record(
        "invalid-element-count-too-large",
        "tensor a has shape [4294967296, 4294967296, 0]: each dimension fits in 64 bits, the running element "
        "count reaches 2**64 before the 0; checksums recomputed",
        error=CORRUPTED,
        message="2**64 elements or more",
    )


def invalid_file_name_newline() -> None:
    d = checkpoint("invalid-file-name-newline")
    data = b"written by a future writer\n"
    (d / "notes.txt").write_bytes(data)  # a reader that trimmed the name would find these bytes
    edit_manifest(d, lambda m: m["files"].update({"notes.txt\n": {"size": len(data), "checksum": checksum(data)}}))
    record(
        "invalid-file-name-newline",
        'the manifest lists "notes.txt\\n", a file name ending in a line feed (re-sealed; notes.txt exists with '
        "the listed size and checksum): the schema refuses it in every regex engine",
        error=CORRUPTED,
        message="schema violation at $.files",
    )


# --------------------------------------------------------------------------------------------------
# vectors of the second review: each decides one question the first text left open
# --------------------------------------------------------------------------------------------------


def valid_no_tensor_table() -> None:
    d = checkpoint("valid-no-tensor-table")
    edit_manifest(d, lambda m: m["files"]["model.safetensors"].pop("tensors"))
    record(
        "valid-no-tensor-table",
        "the model.safetensors entry has no per-tensor checksums (re-sealed): a full load verifies the file "
        "checksum and accepts it; verified reads of single tensors are refused",
        step=5,
    )


def valid_root_noncanonical_step() -> None:
    root = VECTORS / "valid-root-noncanonical-step"
    model, _ = trained(None)
    save(root, model, None, step=10)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.move(str(save(Path(tmp), model, None, step=20)), root / "step-000000020")
    (root / "latest").write_text("step-000000020\n")
    record(
        "valid-root-noncanonical-step",
        "step-00000010 and a committed step 20 under the name step-000000020 (nine digits, not the one spelling "
        "of step 20, so not a step directory), which latest names: readers ignore it and load step 10",
        step=10,
    )


def valid_root_latest_form_feed() -> None:
    root = VECTORS / "valid-root-latest-form-feed"
    model, _ = trained(None)
    for step in (10, 20):
        save(root, model, None, step=step)
    (root / "latest").write_bytes(b"step-00000010\x0c\n")
    record(
        "valid-root-latest-form-feed",
        "latest is step-00000010 followed by a form feed and a line feed: only JSON whitespace is stripped, so it "
        "names nothing and readers load the highest committed step",
        step=20,
    )


def valid_root_latest_too_long() -> None:
    root = VECTORS / "valid-root-latest-too-long"
    model, _ = trained(None)
    for step in (10, 20):
        save(root, model, None, step=step)
    (root / "latest").write_bytes(b"step-00000010\n" + b" " * 4083)  # 4097 bytes
    record(
        "valid-root-latest-too-long",
        "latest is step-00000010 and a line feed padded with spaces to 4097 bytes, one over the limit: it names "
        "nothing and readers load the highest committed step",
        step=20,
    )


def valid_root_format_0_ignored() -> None:
    root = VECTORS / "valid-root-format-0-ignored"
    model, _ = trained(None)
    save(root, model, None, step=10)
    legacy = root / "step-00000020"
    legacy.mkdir()
    (legacy / "model.pt").write_bytes(torch_bytes(model.state_dict()))
    (legacy / "metadata.json").write_text('{"step": 20}\n')
    (root / "latest").write_text("step-00000020\n")
    record(
        "valid-root-format-0-ignored",
        "a root with step-00000010 and a format-0 directory step-00000020 (model.pt, metadata.json), which latest "
        "names: format-0 directories are never committed checkpoints of a root, so readers load step 10",
        step=10,
    )


def invalid_pt_global_not_allowed() -> None:
    d = checkpoint("invalid-pt-global-not-allowed", optimizer="sgd")
    state = {
        "state": {0: {"momentum_buffer": nn.Parameter(torch.zeros(2))}},
        "param_groups": [{"lr": 0.1, "params": [0]}],
    }
    (d / "optimizer.pt").write_bytes(torch_bytes(state))
    reseal(d)
    record(
        "invalid-pt-global-not-allowed",
        "optimizer.pt holds an nn.Parameter, pickled with torch._utils._rebuild_parameter: torch.load(weights_only="
        "True) accepts it, the format's allowlist does not (checksums recomputed)",
        error=UNSAFE,
        message="torch._utils._rebuild_parameter",
    )


def invalid_pt_compressed_member() -> None:
    d = checkpoint("invalid-pt-compressed-member", optimizer="sgd")
    path = d / "optimizer.pt"
    path.write_bytes(rezip(path.read_bytes(), compress="data.pkl"))
    reseal(d)
    record(
        "invalid-pt-compressed-member",
        "optimizer.pt with its data.pkl deflated (zip method 8): every member must be stored (checksums recomputed)",
        error=CORRUPTED,
        message="is compressed (method 8)",
    )


def invalid_pt_persistent_id_int() -> None:
    d = checkpoint("invalid-pt-persistent-id-int", optimizer="sgd")
    path = d / "optimizer.pt"
    path.write_bytes(rezip(path.read_bytes(), pickle_bytes=integer_persistent_id_pickle()))
    reseal(d)
    record(
        "invalid-pt-persistent-id-int",
        "optimizer.pt whose data.pkl gives a persistent id that is the integer 0, not a storage tuple (torch's "
        "weights_only unpickler lets it through and torch.load then fails an assertion); checksums recomputed",
        error=CORRUPTED,
        message="a persistent id that is not a tuple",
    )


def invalid_json_too_deep() -> None:
    d = checkpoint("invalid-json-too-deep")
    (d / "config.json").write_bytes(b'{"a":' + b"[" * 64 + b"]" * 64 + b"}\n")  # 65 deep
    reseal(d)
    record(
        "invalid-json-too-deep",
        "config.json nests arrays 65 deep (an object around 64 arrays); the limit is 64 (checksums recomputed)",
        error=CORRUPTED,
        message="nest deeper than the limit of 64",
    )


def invalid_integer_out_of_range() -> None:
    d = checkpoint("invalid-integer-out-of-range")
    (d / "config.json").write_bytes(b'{"seed":18446744073709551616}\n')
    reseal(d)
    record(
        "invalid-integer-out-of-range",
        "config.json holds the integer 2**64, outside [-2**63, 2**64), the range of every JSON integer of a "
        "checkpoint (checksums recomputed)",
        error=CORRUPTED,
        message="is outside [-2**63, 2**64)",
    )


def _quantized(name: str) -> Path:
    from portable_ckpt import quantize

    seed(0)
    model = quantize(nn.Sequential(nn.Linear(8, 4)), bits=8)
    with tempfile.TemporaryDirectory() as tmp:
        path = save(Path(tmp), model, None, step=5, vocab=None)
        shutil.move(str(path), VECTORS / name)
    return VECTORS / name


def invalid_quantization_bits_float() -> None:
    d = _quantized("invalid-quantization-bits-float")
    meta = d / "quantization_metadata.json"
    data = meta.read_bytes()
    assert b'"bits":8,' in data
    meta.write_bytes(data.replace(b'"bits":8,', b'"bits":8.0,'))
    reseal(d)
    record(
        "invalid-quantization-bits-float",
        'quantization_metadata.json says "bits":8.0 (checksums recomputed): JSON Schema finds 8.0 equal to the '
        "enum's 8, this format refuses it",
        error=QUANT,
        message="schema violation at $.bits",
    )


def invalid_quantization_summary_mismatch() -> None:
    d = _quantized("invalid-quantization-summary-mismatch")
    edit_manifest(d, lambda m: m["quantization"].update(symmetric=not m["quantization"]["symmetric"]))
    record(
        "invalid-quantization-summary-mismatch",
        "the manifest's quantization summary says symmetric false, the metadata says true (re-sealed)",
        error=QUANT,
        message="symmetric is True but the manifest says False",
    )


def invalid_quantized_metadata_missing() -> None:
    d = _quantized("invalid-quantized-metadata-missing")
    (d / "quantization_metadata.json").unlink()
    record(
        "invalid-quantized-metadata-missing",
        "quantization_metadata.json is listed in the manifest (quantized, int8 ptq) but absent: a missing listed "
        "file, like any other",
        error="CheckpointNotFoundError",
        message="listed in the manifest but missing",
    )


def _with_rng(name: str) -> Path:
    model, _ = trained(None)
    with tempfile.TemporaryDirectory() as tmp:
        seed(1234)
        path = save(Path(tmp), model, None, step=5, rng=True, vocab=None)
        shutil.move(str(path), VECTORS / name)
    return VECTORS / name


def _rewrite_rng_tensors(d: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    from safetensors.torch import load_file

    tensors = load_file(d / "rng.safetensors")
    change(tensors)
    (d / "rng.safetensors").unlink()
    with open(d / "rng.safetensors", "wb") as f:
        _safetensors.write(f, tensors)


def invalid_rng_version_float() -> None:
    d = _with_rng("invalid-rng-version-float")
    data = (d / "rng.json").read_bytes()
    assert b'"version":3}' in data
    (d / "rng.json").write_bytes(data.replace(b'"version":3}', b'"version":3.0}'))
    reseal(d)
    record(
        "invalid-rng-version-float",
        'rng.json says "version":3.0 for Python\'s generator (checksums recomputed): const 3 is a plain integer',
        error=CORRUPTED,
        message="schema violation at $.python",
    )


def invalid_rng_extra_tensor() -> None:
    d = _with_rng("invalid-rng-extra-tensor")
    _rewrite_rng_tensors(d, lambda t: t.update({"torch.cuda.0": torch.zeros(16, dtype=torch.uint8)}))
    edit_manifest(d, lambda m: m.update(rng=sorted([*m["rng"], "torch.cuda.0"])))
    reseal(d)
    record(
        "invalid-rng-extra-tensor",
        "rng.safetensors also holds torch.cuda.0 (and the manifest's rng lists it) while rng.json says "
        "cuda_devices 0 (checksums recomputed)",
        error=CORRUPTED,
        message="which rng.json does not call for",
    )


def invalid_rng_cpu_length() -> None:
    d = _with_rng("invalid-rng-cpu-length")
    _rewrite_rng_tensors(d, lambda t: t.update({"torch.cpu": t["torch.cpu"][:-1].clone()}))
    reseal(d)
    record(
        "invalid-rng-cpu-length",
        "rng.safetensors's torch.cpu is 5055 bytes, one short of the generator's 5056 (checksums recomputed)",
        error=CORRUPTED,
        message="expected torch.uint8 [5056]",
    )


def invalid_rng_manifest_list() -> None:
    d = _with_rng("invalid-rng-manifest-list")
    edit_manifest(d, lambda m: m.update(rng=[n for n in m["rng"] if n != "numpy"]))
    record(
        "invalid-rng-manifest-list",
        "the manifest's rng omits numpy, whose state rng.safetensors holds (re-sealed)",
        error=CORRUPTED,
        message="but rng.safetensors holds",
    )


def invalid_rng_tensors_without_json() -> None:
    d = _with_rng("invalid-rng-tensors-without-json")
    (d / "rng.json").unlink()
    edit_manifest(d, lambda m: m["files"].pop("rng.json"))
    record(
        "invalid-rng-tensors-without-json",
        "the manifest lists rng.safetensors but not rng.json (removed; re-sealed): the two go together",
        error=CORRUPTED,
        message="go together",
    )


# --------------------------------------------------------------------------------------------------
# sharded vectors (format_version 2, §20): written by two gloo ranks through the library's DCP writer
# --------------------------------------------------------------------------------------------------

SHARDED_STEP = 9


def _sharded_rank(rank: int, world: int, port: int, root: str) -> None:
    import datetime

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        model, _ = trained(None, tied=False)  # the same weights on every rank (seed 0)
        fully_shard(model.lin)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            ids = torch.randint(0, 8, (2, 3), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
            opt.step()
        seed(1234 + rank)  # each rank's RNG state differs: one rng file per rank
        _save.save_checkpoint(
            model, opt, {"dim": 4, "lr": 0.01, "name": "tiny"}, ["<pad>", "a", "b", "c"], SHARDED_STEP, root
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def valid_sharded() -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_sharded_rank, args=(2, _free_port(), tmp), nprocs=2, join=True)
        path = Path(tmp) / f"step-{SHARDED_STEP:08d}"
        edit_manifest(path, lambda m: m.update(created_at=CREATED_AT))
        shutil.move(str(path), VECTORS / "valid-sharded")
    record(
        "valid-sharded",
        "format_version 2: a 2-rank FSDP2 save (TinyLM untied, AdamW): model-0000R-of-00002 and "
        "optimizer-0000R-of-00002 shard files, sharding.json, one RNG file pair per rank",
        step=SHARDED_STEP,
    )


def _sharded(name: str) -> Path:
    """A copy of valid-sharded without its RNG files (they are large and these vectors test other parts)."""
    dst = VECTORS / name
    shutil.copytree(VECTORS / "valid-sharded", dst)
    for path in dst.glob("rng-*"):
        path.unlink()

    def drop(m: dict[str, Any]) -> None:
        m["files"] = {n: e for n, e in m["files"].items() if not n.startswith("rng-")}
        m["rng"] = []

    edit_manifest(dst, drop)
    return dst


def _edit_sharding(d: Path, change: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads((d / "sharding.json").read_bytes())
    change(doc)
    (d / "sharding.json").write_bytes(_jsonio.dumps(doc))
    reseal(d)


def _split_entry(doc: dict[str, Any]) -> dict[str, Any]:
    """The first entry sharded into two chunks (along dimension 0)."""
    return next(e for _, e in sorted(doc["entries"].items()) if len(e.get("chunks", ())) == 2)


def invalid_sharded_overlap() -> None:
    d = _sharded("invalid-sharded-overlap")
    _edit_sharding(d, lambda doc: _split_entry(doc)["chunks"][1].update(offsets=[0] * len(_split_entry(doc)["shape"])))
    record(
        "invalid-sharded-overlap",
        "sharding.json: the second chunk of a tensor moved onto the first (re-sealed): chunks overlap",
        error=CORRUPTED,
        message="overlap",
    )


def invalid_sharded_gap() -> None:
    d = _sharded("invalid-sharded-gap")
    _edit_sharding(d, lambda doc: _split_entry(doc)["chunks"].pop())
    record(
        "invalid-sharded-gap",
        "sharding.json: one chunk of a sharded tensor removed from the table (re-sealed): a region is missing",
        error=CORRUPTED,
        message="a chunk is missing",
    )


def invalid_sharded_beyond() -> None:
    def change(doc: dict[str, Any]) -> None:
        chunk = _split_entry(doc)["chunks"][1]
        chunk["offsets"] = [chunk["offsets"][0] + 1, *chunk["offsets"][1:]]

    d = _sharded("invalid-sharded-beyond")
    _edit_sharding(d, change)
    record(
        "invalid-sharded-beyond",
        "sharding.json: a chunk's offset moved so that it ends beyond the tensor's shape (re-sealed)",
        error=CORRUPTED,
        message="beyond its size",
    )


def invalid_sharded_unlisted_file() -> None:
    d = _sharded("invalid-sharded-unlisted-file")
    _edit_sharding(d, lambda doc: _split_entry(doc)["chunks"][0].update(file="model-00007-of-00002.safetensors"))
    record(
        "invalid-sharded-unlisted-file",
        "sharding.json: a chunk names a shard file the manifest does not list (re-sealed)",
        error=CORRUPTED,
        message="not listed in the manifest",
    )


def invalid_sharded_dtype() -> None:
    d = _sharded("invalid-sharded-dtype")
    _edit_sharding(d, lambda doc: _split_entry(doc).update(dtype="F16"))
    record(
        "invalid-sharded-dtype",
        "sharding.json: a tensor's dtype says F16 while its chunks are stored as F32 (re-sealed)",
        error=CORRUPTED,
        message="but sharding.json says",
    )


def invalid_sharded_value_tensor() -> None:
    def change(doc: dict[str, Any]) -> None:
        entry = next(e for _, e in sorted(doc["entries"].items()) if "value" in e)
        entry["value"] = {"$tensor": "x"}

    d = _sharded("invalid-sharded-value-tensor")
    _edit_sharding(d, change)
    record(
        "invalid-sharded-value-tensor",
        "sharding.json: a non-tensor value refers to a tensor ($tensor), which values cannot (re-sealed)",
        error=CORRUPTED,
        message="is not in",
    )


def invalid_sharded_missing_shard() -> None:
    d = _sharded("invalid-sharded-missing-shard")
    (d / "model-00001-of-00002.safetensors").unlink()
    record(
        "invalid-sharded-missing-shard",
        "model-00001-of-00002.safetensors, listed in the manifest and named by chunks, is missing",
        error="CheckpointNotFoundError",
        message="listed in the manifest but missing",
    )


def invalid_sharded_flipped_chunk_byte() -> None:
    d = _sharded("invalid-sharded-flipped-chunk-byte")
    data = (d / "model-00001-of-00002.safetensors").read_bytes()
    _, begin, _ = sorted(header_entries(data), key=lambda e: e[1])[0]
    flip(d / "model-00001-of-00002.safetensors", begin)
    record(
        "invalid-sharded-flipped-chunk-byte",
        "one bit of a chunk's data in model-00001-of-00002.safetensors flipped (not re-sealed)",
        error=CORRUPTED,
        message="checksum mismatch",
    )


def invalid_sharded_tensor_list() -> None:
    d = _sharded("invalid-sharded-tensor-list")
    edit_manifest(d, lambda m: m["files"]["optimizer-00000-of-00002.safetensors"].pop("tensors"))
    record(
        "invalid-sharded-tensor-list",
        "the manifest's entry of a shard file has no per-tensor checksum list (re-sealed): shard files need one",
        error=CORRUPTED,
        message="per-tensor checksum list",
    )


# --------------------------------------------------------------------------------------------------
# incremental vectors (format_version 3, §21): the model state in frozen and trainable model parts
# --------------------------------------------------------------------------------------------------

INCREMENTAL_STEP = 11


def part_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def valid_incremental() -> None:
    model, opt = trained("adamw")
    model.emb.weight.requires_grad_(False)  # frozen after training (and with it the tied head): a frozen part
    with tempfile.TemporaryDirectory() as tmp:
        path = save(Path(tmp), model, opt, step=INCREMENTAL_STEP, incremental=True, part_bytes=64)
        shutil.move(str(path), VECTORS / "valid-incremental")
    doc = read_manifest(VECTORS / "valid-incremental")
    assert doc["format_version"] == 3 and doc["aliases"] == {"head.weight": "emb.weight"}
    parts = {n: sorted(e["tensors"]) for n, e in doc["files"].items() if n.startswith("model-")}
    assert parts == {
        part_name(0, 3): ["emb.weight"],
        part_name(1, 3): ["lin.bias"],  # the reference packs each kind in the order of the names
        part_name(2, 3): ["lin.weight"],
    }, parts
    record(
        "valid-incremental",
        "format_version 3: TinyLM (head tied to the embedding, which is frozen), AdamW, saved incrementally with "
        "part_bytes 64: the frozen part model-00000-of-00003 (emb.weight), then the trainable parts "
        "model-00001-of-00003 (lin.bias) and model-00002-of-00003 (lin.weight); head.weight an alias",
        step=INCREMENTAL_STEP,
    )


def valid_incremental_quantized() -> None:
    from portable_ckpt import quantize

    seed(0)
    model = quantize(nn.Sequential(nn.Linear(8, 4)), bits=4, group_size=4, mode="lora", lora_rank=2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # the adapters move away from their initial (zero) lora_B
        opt.zero_grad()
        model(torch.randn(3, 8, generator=g)).square().mean().backward()
        opt.step()
    with tempfile.TemporaryDirectory() as tmp:
        path = save(Path(tmp), model, None, step=INCREMENTAL_STEP, vocab=None, incremental=True, part_bytes=48)
        shutil.move(str(path), VECTORS / "valid-incremental-quantized")
    doc = read_manifest(VECTORS / "valid-incremental-quantized")
    assert doc["format_version"] == 3 and doc["quantization"]["bits"] == 4
    parts = [sorted(e["tensors"]) for n, e in sorted(doc["files"].items()) if n.startswith("model-")]
    assert len(parts) >= 3 and "0.weight_packed" in parts[0] and "0.lora_A" in parts[-2] + parts[-1], parts
    record(
        "valid-incremental-quantized",
        f"format_version 3: an int4 LoRA model (group size 4, rank 2), saved incrementally with part_bytes 48: "
        f"{len(parts)} parts, the frozen packed weights, shape and scales first, then the trainable adapters and "
        "bias; quantization_metadata.json describes the union of the parts",
        step=INCREMENTAL_STEP,
    )


def _incremental(name: str) -> Path:
    """A copy of valid-incremental without its optimizer.pt (these vectors test the model parts), for a defect."""
    dst = VECTORS / name
    shutil.copytree(VECTORS / "valid-incremental", dst)
    (dst / "optimizer.pt").unlink()
    edit_manifest(dst, lambda m: m["files"].pop("optimizer.pt"))
    return dst


def invalid_incremental_no_part() -> None:
    from safetensors.torch import load_file

    d = _incremental("invalid-incremental-no-part")
    union: dict[str, torch.Tensor] = {}
    for i in range(3):
        union.update(load_file(d / part_name(i, 3)))
        (d / part_name(i, 3)).unlink()
    with open(d / "model.safetensors", "wb") as f:
        _safetensors.write(f, union)

    def change(m: dict[str, Any]) -> None:
        for i in range(3):
            m["files"].pop(part_name(i, 3))
        m["files"]["model.safetensors"] = {"size": 0, "checksum": "0" * 32, "tensors": {}}

    edit_manifest(d, change)
    reseal(d)
    record(
        "invalid-incremental-no-part",
        "format_version 3 whose model parts are merged into one model.safetensors (listed with its tensors, "
        "re-sealed): it lists no model part, and model.safetensors is an unknown file in version 3",
        error=CORRUPTED,
        message="lists no model part",
    )


def invalid_incremental_missing_part() -> None:
    d = _incremental("invalid-incremental-missing-part")
    edit_manifest(d, lambda m: m["files"].pop(part_name(1, 3)))
    record(
        "invalid-incremental-missing-part",
        "model-00001-of-00003.safetensors is no longer listed (the file is still there; re-sealed): a part of "
        "0 .. n-1 is missing",
        error=CORRUPTED,
        message="model part 1 of 3 (model-00001-of-00003.safetensors) is not listed",
    )


def invalid_incremental_count_mismatch() -> None:
    d = _incremental("invalid-incremental-count-mismatch")
    (d / part_name(2, 3)).rename(d / part_name(2, 4))
    edit_manifest(d, lambda m: m["files"].update({part_name(2, 4): m["files"].pop(part_name(2, 3))}))
    record(
        "invalid-incremental-count-mismatch",
        "the last part renamed model-00002-of-00004.safetensors (re-sealed): the parts disagree on their count",
        error=CORRUPTED,
        message="the model parts disagree on their number",
    )


def invalid_incremental_duplicate_tensor() -> None:
    from safetensors.torch import load_file

    d = _incremental("invalid-incremental-duplicate-tensor")
    tensors = load_file(d / part_name(1, 3))
    tensors.update(load_file(d / part_name(2, 3)))  # lin.weight, also in part 2
    (d / part_name(1, 3)).unlink()
    with open(d / part_name(1, 3), "wb") as f:
        _safetensors.write(f, tensors)
    reseal(d)
    record(
        "invalid-incremental-duplicate-tensor",
        "model-00001-of-00003.safetensors also holds lin.weight, the tensor of model-00002-of-00003 (its tensor "
        "table too; checksums recomputed): a tensor name in two parts",
        error=CORRUPTED,
        message="is held by two model parts",
    )


def invalid_incremental_no_tensor_table() -> None:
    d = _incremental("invalid-incremental-no-tensor-table")
    edit_manifest(d, lambda m: m["files"][part_name(0, 3)].pop("tensors"))
    record(
        "invalid-incremental-no-tensor-table",
        "the manifest's entry of model-00000-of-00003.safetensors has no tensors (re-sealed): per-tensor "
        "checksums are Mandatory for model parts",
        error=CORRUPTED,
        message="a model part's entry must carry per-tensor checksums",
    )


def invalid_incremental_flipped_part_byte() -> None:
    d = _incremental("invalid-incremental-flipped-part-byte")
    path = d / part_name(0, 3)
    flip(path, header_entries(path.read_bytes())[0][1] + 1)
    record(
        "invalid-incremental-flipped-part-byte",
        "one bit of emb.weight's data in the frozen part model-00000-of-00003.safetensors flipped (not re-sealed)",
        error=CORRUPTED,
        message="checksum mismatch",
    )


GENERATORS: list[Callable[[], None]] = [
    valid_full,
    valid_tied,
    valid_dtypes,
    valid_legacy,
    valid_root,
    valid_root_stale_latest,
    valid_root_latest_not_a_file,
    valid_root_replaced,
    valid_unknown,
    invalid_flipped_tensor_byte,
    invalid_flipped_manifest_byte,
    invalid_truncated,
    invalid_truncated_resealed,
    invalid_missing_file,
    invalid_schema,
    invalid_unknown_dtype,
    invalid_overlap,
    invalid_gap,
    invalid_wrong_nbytes,
    invalid_header_too_large,
    invalid_duplicate_header_key,
    invalid_tensor_table,
    invalid_version_4,
    invalid_quantized_without_metadata,
    valid_symlinked_file,
    invalid_dangling_symlink,
    invalid_symlink_to_directory,
    invalid_dotdot,
    invalid_hostile_pickle,
    invalid_legacy_hostile_pickle,
    invalid_manifest_duplicate_key,
    invalid_manifest_nan,
    invalid_lone_surrogate,
    invalid_number_overflow,
    invalid_step_mismatch,
    invalid_alias_target,
    invalid_config_not_object,
    invalid_unknown_file_checksum,
    invalid_unused_known_file_checksum,
    invalid_checksum_not_last,
    invalid_file_name_newline,
    invalid_integer_with_fraction,
    invalid_optimizer_not_a_dict,
    invalid_optimizer_no_param_groups,
    invalid_dimension_too_large,
    invalid_element_count_too_large,
    valid_no_tensor_table,
    valid_root_noncanonical_step,
    valid_root_latest_form_feed,
    valid_root_latest_too_long,
    valid_root_format_0_ignored,
    invalid_pt_global_not_allowed,
    invalid_pt_compressed_member,
    invalid_pt_persistent_id_int,
    invalid_json_too_deep,
    invalid_integer_out_of_range,
    invalid_quantization_bits_float,
    invalid_quantization_summary_mismatch,
    invalid_quantized_metadata_missing,
    invalid_rng_version_float,
    invalid_rng_extra_tensor,
    invalid_rng_cpu_length,
    invalid_rng_manifest_list,
    invalid_rng_tensors_without_json,
    valid_sharded,
    invalid_sharded_overlap,
    invalid_sharded_gap,
    invalid_sharded_beyond,
    invalid_sharded_unlisted_file,
    invalid_sharded_dtype,
    invalid_sharded_value_tensor,
    invalid_sharded_missing_shard,
    invalid_sharded_flipped_chunk_byte,
    invalid_sharded_tensor_list,
    valid_incremental,
    valid_incremental_quantized,
    invalid_incremental_no_part,
    invalid_incremental_missing_part,
    invalid_incremental_count_mismatch,
    invalid_incremental_duplicate_tensor,
    invalid_incremental_no_tensor_table,
    invalid_incremental_flipped_part_byte,
]


def main(argv: list[str]) -> None:
    global VECTORS
    committed = VECTORS
    committed.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        VECTORS = Path(tmp) / "vectors"  # every generator writes here; then the chosen vectors are copied
        VECTORS.mkdir()
        for generate in GENERATORS:
            generate()
        names = [entry["name"] for entry in INDEX]
        unknown = sorted(set(argv) - {"--all", *names})
        if unknown:
            raise SystemExit(f"no vector named {', '.join(unknown)}")
        missing = [n for n in names if n in argv or not (committed / n).exists()]
        chosen = names if "--all" in argv else missing
        for name in chosen:
            if (committed / name).exists():
                shutil.rmtree(committed / name)
            shutil.copytree(VECTORS / name, committed / name, symlinks=True)
        VECTORS = committed
    for stale in sorted(p for p in committed.iterdir() if p.is_dir() and p.name not in names):
        shutil.rmtree(stale)
    text = json.dumps(INDEX, indent=2, ensure_ascii=False) + "\n"
    (committed / "index.json").write_text(text, encoding="utf-8")
    total = sum(p.stat().st_size for p in committed.rglob("*") if p.is_file() and not p.is_symlink())
    valid = sum(v["valid"] for v in INDEX)
    print(
        f"{len(INDEX)} vectors ({valid} valid, {len(INDEX) - valid} invalid), {total} bytes in {committed}; "
        f"written: {', '.join(chosen) or 'none'}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
