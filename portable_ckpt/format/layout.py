"""The model files of a checkpoint: one ``model.safetensors`` (format_version 1) or model parts
``model-IIIII-of-NNNNN.safetensors`` (format_version 3, format_spec/README.md §21).

``model_files`` names them from the manifest's ``files`` and checks the part rules of §21.1;
``split`` is the reference writer's split of a model state into frozen and trainable parts (§21.2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from portable_ckpt.errors import CheckpointCorruptedError
from portable_ckpt.format import names
from portable_ckpt.format.manifest import INCREMENTAL_FORMAT_VERSION

PART_BYTES = 64 << 20  # the reference's default size of a part's tensor data (§21.2)
PART = names.MODEL_PART  # matched whole (fullmatch)


def part_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def model_files(manifest: Mapping[str, Any], label: str) -> list[str]:
    """The names of the files holding the model state, in part order; checks §21.1 rules 1 to 4."""
    files: Mapping[str, Any] = manifest["files"]
    if manifest["format_version"] != INCREMENTAL_FORMAT_VERSION:
        return [names.MODEL]
    parts: dict[int, str] = {}
    counts: set[int] = set()
    for name in files:
        m = PART.fullmatch(name)
        if m is None:
            continue
        index, count = int(m.group(1)), int(m.group(2))
        if name != part_name(index, count):
            canonical = part_name(index, count)
            raise _corrupt(label, f"{name} is not how model part {index} of {count} is named ({canonical})")
        counts.add(count)
        if index in parts:
            raise _corrupt(label, f"{parts[index]} and {name} both name model part {index}")
        parts[index] = name
    if not parts:
        raise _corrupt(label, "format_version 3 lists no model part (model-IIIII-of-NNNNN.safetensors)")
    if len(counts) != 1:
        raise _corrupt(label, f"the model parts disagree on their number: {sorted(counts)}")
    (count,) = counts
    beyond = sorted(i for i in parts if i >= count)
    if beyond:
        raise _corrupt(label, f"{parts[beyond[0]]} is part {beyond[0]}, but there are {count} parts (0 to {count - 1})")
    absent = [i for i in range(count) if i not in parts]
    if absent:
        raise _corrupt(label, f"model part {absent[0]} of {count} ({part_name(absent[0], count)}) is not listed")
    ordered = [parts[i] for i in range(count)]
    owner: dict[str, str] = {}
    for name in ordered:
        table = files[name].get("tensors")
        if table is None:
            raise _corrupt(label, f"{name}: a model part's entry must carry per-tensor checksums (tensors)")
        for tensor in table:
            if tensor in owner:
                raise _corrupt(label, f'tensor "{tensor}" is held by two model parts, {owner[tensor]} and {name}')
            owner[tensor] = name
    return ordered


def _corrupt(label: str, message: str) -> CheckpointCorruptedError:
    return CheckpointCorruptedError(f"{label}: {message}", file=label)


def split(
    tensors: Mapping[str, torch.Tensor], trainable: frozenset[str], part_bytes: int = PART_BYTES
) -> list[list[str]]:
    """The reference split (§21.2): frozen tensors then trainable ones, each kind in the order given (the
    writer's: sorted by name) packed greedily into parts of at most ``part_bytes`` bytes of data (a larger
    tensor alone). Never empty: no tensors make one empty part."""
    parts: list[list[str]] = []
    for kind in (False, True):
        current: list[str] = []
        size = 0
        for name, t in tensors.items():
            if (name in trainable) is not kind:
                continue
            n = t.numel() * t.element_size()
            if current and size + n > part_bytes:
                parts.append(current)
                current, size = [], 0
            current.append(name)
            size += n
        if current:
            parts.append(current)
    return parts or [[]]


def trainable_names(model: Any, stored: Sequence[str]) -> frozenset[str]:
    """The stored names that are parameters requiring gradients (for a plain mapping: none)."""
    params = getattr(model, "named_parameters", None)
    if params is None:
        return frozenset()
    wanted = set(stored)
    return frozenset(n for n, p in params(remove_duplicate=False) if p.requires_grad and n in wanted)
