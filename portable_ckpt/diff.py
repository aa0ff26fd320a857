"""diff_checkpoints: what differs between two checkpoints — tensors, JSON documents, other files.

Tensors are read one at a time through ``open_checkpoint`` (each verified against its checksum) and
compared in chunks of ``CHUNK_ELEMENTS``, so the memory a comparison needs beyond the two tensors stays
small. Bitwise-equal tensors are equal; anything else is a change (``-0.0`` against ``0.0`` too).

>>> d = diff_checkpoints("run-a/checkpoints", "run-b/checkpoints")  # doctest: +SKIP
>>> d.identical, [(v.path, v.a, v.b) for v in d.values]  # doctest: +SKIP
(False, [("config['optim']['lr']", 0.1, 0.2)])
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch

from portable_ckpt.files import CheckpointFiles
from portable_ckpt.format import layout as _layout
from portable_ckpt.format import names
from portable_ckpt.reader import CheckpointReader, open_checkpoint
from portable_ckpt.storage import storage_for
from portable_ckpt.types import CheckpointDiff, FileChange, Progress, TensorDiff, TensorInfo, ValueChange

__all__ = ["CHUNK_ELEMENTS", "diff_checkpoints"]

CHUNK_ELEMENTS = 1 << 20  # elements compared at once: a float64 copy of a chunk is 8 MiB

# element size -> the integer dtype whose equality is bitwise equality of the elements
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# files compared in detail (tensors, JSON paths); every other file by its manifest checksum
_DETAILED = frozenset({names.MODEL, names.CONFIG, names.VOCAB})


def diff_checkpoints(
    a: str | os.PathLike[str], b: str | os.PathLike[str], *, progress: Progress | None = None
) -> CheckpointDiff:
    """Compare the checkpoints at ``a`` and ``b`` (checkpoint directories, or roots: their newest).

    progress: called as ``progress(done, total, tensor_name)`` before each tensor is compared.
    Raises ``CheckpointError`` if either cannot be read or a tensor fails its checksum.
    """
    with contextlib.ExitStack() as stack:
        ra = stack.enter_context(open_checkpoint(a))
        rb = stack.enter_context(open_checkpoint(b))
        docs_a, docs_b = _documents(ra), _documents(rb)
        values: list[ValueChange] = []
        for key in docs_a:
            _compare_json(docs_a[key], docs_b[key], key, values)
        return CheckpointDiff(
            a=ra.path,
            b=rb.path,
            a_step=ra.step,
            b_step=rb.step,
            tensors=_tensors(ra, rb, progress),
            values=tuple(values),
            files=_files(ra.manifest["files"], rb.manifest["files"]),
        )


def _documents(reader: CheckpointReader) -> dict[str, Any]:
    """The JSON a checkpoint holds besides its tensors, by the name its paths start with (in report order)."""
    manifest = reader.manifest
    with CheckpointFiles(storage_for(reader.path), verify=True) as files:
        config = files.read_json(names.CONFIG, None) if names.CONFIG in files.entries else {}
        vocab = files.read_json(names.VOCAB, "vocab") if names.VOCAB in files.entries else None
    return {
        "step": manifest["step"],
        "config": config,
        "vocab": vocab,
        "extra": manifest.get("extra"),
        "aliases": dict(manifest.get("aliases") or {}),
        "quantization": manifest.get("quantization"),
    }


def _compare_json(a: Any, b: Any, path: str, out: list[ValueChange]) -> None:
    """Append every difference between two JSON values, down to the leaves, as ``path[key][index]``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            _compare_member(a, b, key, f"{path}[{key!r}]", out)
    elif isinstance(a, list) and isinstance(b, list):
        by_index_a, by_index_b = dict(enumerate(a)), dict(enumerate(b))
        for i in range(max(len(a), len(b))):
            _compare_member(by_index_a, by_index_b, i, f"{path}[{i}]", out)
    elif type(a) is not type(b) or a != b:  # 1 and 1.0, or 1 and true, are different JSON
        out.append(ValueChange(path=path, change="changed", a=a, b=b))


def _compare_member(a: dict[Any, Any], b: dict[Any, Any], key: Any, path: str, out: list[ValueChange]) -> None:
    if key not in b:
        out.append(ValueChange(path=path, change="removed", a=a[key], b=None))
    elif key not in a:
        out.append(ValueChange(path=path, change="added", a=None, b=b[key]))
    else:
        _compare_json(a[key], b[key], path, out)


def _info(reader: CheckpointReader, name: str) -> TensorInfo:
    dtype, shape = reader.info(name)
    return TensorInfo(name, dtype, shape)


def _tensors(ra: CheckpointReader, rb: CheckpointReader, progress: Progress | None) -> tuple[TensorDiff, ...]:
    keys_a, keys_b = set(ra.keys()), set(rb.keys())
    aliases_a = ra.manifest.get("aliases") or {}
    aliases_b = rb.manifest.get("aliases") or {}
    every = sorted(keys_a | keys_b)
    compared: dict[tuple[str, str], tuple[str, int | None, float | None]] = {}  # tied names are read once
    out = []
    for done, name in enumerate(every):
        if progress is not None:
            progress(done, len(every), name)
        if name not in keys_b:
            out.append(TensorDiff(name=name, change="removed", a=_info(ra, name), b=None))
            continue
        if name not in keys_a:
            out.append(TensorDiff(name=name, change="added", a=None, b=_info(rb, name)))
            continue
        stored = (aliases_a.get(name, name), aliases_b.get(name, name))
        if stored not in compared:
            compared[stored] = _compare_tensor(ra, rb, *stored)
        change, differing, worst = compared[stored]
        out.append(TensorDiff(name, change, _info(ra, name), _info(rb, name), differing, worst))
    return tuple(out)


def _compare_tensor(
    ra: CheckpointReader, rb: CheckpointReader, name_a: str, name_b: str
) -> tuple[str, int | None, float | None]:
    """(change, differing elements, max abs difference); values are compared only at equal dtype and shape."""
    if ra.info(name_a) != rb.info(name_b):
        return "changed", None, None
    differing, worst = _value_difference(ra.tensor(name_a), rb.tensor(name_b))
    return ("equal", None, None) if differing == 0 else ("changed", differing, worst)


def _value_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """(elements whose bytes differ, their largest absolute difference) of two tensors of one dtype and
    shape, ``CHUNK_ELEMENTS`` at a time. The difference is ``inf`` when a NaN or an infinity differs."""
    flat_a, flat_b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    bits = _BITS[a.element_size()]
    wide = torch.complex128 if a.is_complex() else torch.float64
    differing, worst = 0, 0.0
    for start in range(0, flat_a.numel(), CHUNK_ELEMENTS):
        ca, cb = flat_a[start : start + CHUNK_ELEMENTS], flat_b[start : start + CHUNK_ELEMENTS]
        if torch.equal(ca.view(bits), cb.view(bits)):
            continue
        mask = ca.view(bits) != cb.view(bits)
        differing += int(mask.sum())
        delta = (ca.to(wide)[mask] - cb.to(wide)[mask]).abs()
        worst = max(worst, math.inf if bool(delta.isnan().any()) else float(delta.max()))
    return differing, worst


def _files(a: dict[str, Any], b: dict[str, Any]) -> tuple[FileChange, ...]:
    out = []
    for name in sorted((set(a) | set(b)) - _DETAILED):
        if _layout.PART.fullmatch(name):  # model parts (format_version 3): compared tensor by tensor
            continue
        if name not in b:
            out.append(FileChange(name, "removed"))
        elif name not in a:
            out.append(FileChange(name, "added"))
        elif (a[name]["size"], a[name]["checksum"]) != (b[name]["size"], b[name]["checksum"]):
            out.append(FileChange(name, "changed"))
    return tuple(out)
