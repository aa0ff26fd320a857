"""Import a compressed-tensors quantized Hugging Face folder as a quantized portable checkpoint.

compressed-tensors (the layout llm-compressor writes and vLLM serves) marks such a folder with a
``quantization_config`` block in ``config.json``. ``read_scheme`` checks that block against what
``quantization_metadata.json`` can hold (weight-only integer quantization, 4 or 8 bits, per channel or
group, one scheme), before any weight is read; once the Trainer-folder reader (``hf_trainer.py``) has
read the tensors, ``convert`` turns each quantized module into the int8 / int4 layout of
``format_spec/quantization.md`` and returns its metadata document. Codes, scales and zero points are
carried bit for bit; a tensor that disagrees with the scheme is refused naming its file and name.

>>> scheme = read_scheme(Path("llama-w4a16"))  # doctest: +SKIP
>>> scheme.format, scheme.bits, scheme.group_size
('pack-quantized', 4, 128)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from portable_ckpt.convert import hf_trainer as _hf_trainer
from portable_ckpt.convert import sources as _sources
from portable_ckpt.convert.parts import Parts
from portable_ckpt.errors import CheckpointCorruptedError, CheckpointInputError
from portable_ckpt.format.safetensors import DTYPE_NAMES
from portable_ckpt.quant import quantize as _quant
from portable_ckpt.quant.packing import (
    COMPUTE_DTYPE_NAMES,
    INT_RANGES,
    PACKING_FOR_BITS,
    PACKINGS,
    int32_words,
    roles,
    unpack_int32,
    unpack_zero_point,
)

CONFIG_FILE = "config.json"
BLOCK = "quantization_config"
METHOD = "compressed-tensors"  # quantization_metadata.json's method: the codes were chosen by the folder's writer

# quantization_config field -> (its default, the values the importer supports); compared with their JSON type
CONFIG_FIELDS: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "quant_method": (None, ("compressed-tensors",)),
    "quantization_status": (None, ("compressed",)),  # "frozen" and others hold float weights
    "kv_cache_scheme": (None, (None,)),
    "sparsity_config": (None, (None, {})),
    "transform_config": (None, (None, {})),
    "moe_sparsity_config": (None, (None, {})),
}
# config_groups.<group> field -> (default, supported): weight-only quantization
GROUP_FIELDS: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "input_activations": (None, (None,)),
    "output_activations": (None, (None,)),
}
# config_groups.<group>.weights field -> (compressed-tensors' default, supported)
WEIGHT_FIELDS: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "num_bits": (8, tuple(sorted(PACKING_FOR_BITS))),
    "type": ("int", ("int",)),
    "symmetric": (True, (True, False)),
    "dynamic": (False, (False,)),
    "actorder": (None, (None,)),
    "block_structure": (None, (None,)),
}
STRATEGIES = ("channel", "group")
UNSUPPORTED_TARGETS = {"Embedding": "a quantized embedding cannot be told from a linear layer without the model"}


@dataclass(frozen=True, slots=True)
class Layout:
    """How one compressed-tensors format stores a module: its integer roles (the first marks a quantized
    module) and the reader of codes [rows, cols] and zero points [rows, groups] from them."""

    integer_roles: tuple[str, ...]
    read_codes: Callable[[_Module], torch.Tensor]
    read_zero_point: Callable[[_Module], torch.Tensor]
    changed: Mapping[int, str]  # bits -> how the stored layout differs from the folder's, for the report


@dataclass(frozen=True, slots=True)
class Scheme:
    """The one quantization scheme of a folder, as its ``config.json`` states it."""

    format: str
    bits: int
    symmetric: bool
    group_size: int | None  # None: one scale per output channel
    ignore: tuple[str, ...]
    config: dict[str, Any]  # the quantization_config block as found

    @property
    def described(self) -> str:
        return _describe(self.format, self.bits, self.symmetric, self.group_size)


# --------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)[:200]


def _same(value: Any, allowed: tuple[Any, ...]) -> bool:
    return any(type(value) is type(a) and value == a for a in allowed)


def _check_fields(
    doc: Mapping[str, Any], fields: Mapping[str, tuple[Any, tuple[Any, ...]]], at: str, file: Path
) -> None:
    for field, (default, allowed) in fields.items():
        value = doc.get(field, default)
        if not _same(value, allowed):
            _refuse(file, f"{at}.{field}", value, ", ".join(map(_json, allowed)))


def _refuse(file: Path, field: str, found: Any, supported: str) -> NoReturn:
    raise CheckpointInputError(
        f"{file}: {field} is {_json(found)}; the importer supports {supported} (weight-only integer quantization "
        "of 4 or 8 bits, per channel or group: what a portable checkpoint holds)",
        file=file,
    )


def _strategy(weights: Mapping[str, Any]) -> Any:
    """The strategy as compressed-tensors infers it when the field is absent."""
    if weights.get("strategy") is not None:
        return weights["strategy"]
    group_size = weights.get("group_size")
    return "tensor" if group_size is None else ("channel" if group_size == -1 else "group")


def _group_scheme(group: Any, at: str, top_format: Any, file: Path) -> tuple[str, int, bool, int | None]:
    """(format, bits, symmetric, group_size) of one config group, refused where unsupported."""
    if not isinstance(group, dict):
        _refuse(file, at, group, "an object (a quantization scheme)")
    _check_fields(group, GROUP_FIELDS, at, file)
    fmt = group.get("format") or top_format
    if not _same(fmt, tuple(FORMATS)):
        _refuse(file, f"{at}.format" if group.get("format") else f"{BLOCK}.format", fmt, ", ".join(map(_json, FORMATS)))
    targets = group.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        _refuse(file, f"{at}.targets", targets, "a list of module names, classes or re: patterns")
    for target in targets:
        if target in UNSUPPORTED_TARGETS:
            _refuse(file, f"{at}.targets", targets, f"targets without {target!r} ({UNSUPPORTED_TARGETS[target]})")
    weights = group.get("weights")
    if not isinstance(weights, dict):
        _refuse(file, f"{at}.weights", weights, "an object (the weights' quantization)")
    _check_fields(weights, WEIGHT_FIELDS, f"{at}.weights", file)
    strategy = _strategy(weights)
    if not _same(strategy, STRATEGIES):
        _refuse(file, f"{at}.weights.strategy", strategy, ", ".join(map(_json, STRATEGIES)))
    group_size = weights.get("group_size")
    if strategy == "group" and not (type(group_size) is int and group_size > 0):
        _refuse(file, f"{at}.weights.group_size", group_size, "an integer >= 1 with strategy group")
    if strategy == "channel" and not _same(group_size, (None, -1)):
        _refuse(file, f"{at}.weights.group_size", group_size, "null or -1 with strategy channel")
    bits = weights.get("num_bits", WEIGHT_FIELDS["num_bits"][0])
    symmetric = weights.get("symmetric", WEIGHT_FIELDS["symmetric"][0])
    return fmt, bits, symmetric, group_size if strategy == "group" else None


def read_scheme(folder: Path) -> Scheme | None:
    """The scheme of ``folder``'s ``config.json`` ``quantization_config``; None without such a block.

    Raises CheckpointInputError naming the field, what it holds and what is supported, for a block a
    portable checkpoint cannot represent (activation or float quantization, other bit widths or
    strategies, activation ordering, several schemes, another ``quant_method``, ...).
    """
    file = folder / CONFIG_FILE
    if not file.is_file():
        return None
    doc = _sources.load_json(file)
    if not isinstance(doc, dict) or BLOCK not in doc:
        return None
    block = doc[BLOCK]
    if not isinstance(block, dict):
        _refuse(file, BLOCK, block, "an object")
    _check_fields(block, CONFIG_FIELDS, BLOCK, file)
    groups = block.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        _refuse(file, f"{BLOCK}.config_groups", groups, "an object of one or more quantization schemes")
    found = {
        name: _group_scheme(group, f"{BLOCK}.config_groups.{name}", block.get("format"), file)
        for name, group in groups.items()
    }
    if len(set(found.values())) > 1:
        shown = "; ".join(f"{n}: {_describe(*s)}" for n, s in found.items())
        raise CheckpointInputError(
            f"{file}: {BLOCK}.config_groups holds {len(set(found.values()))} different schemes ({shown}); "
            "a portable checkpoint holds one scheme for all its quantized modules",
            file=file,
        )
    ignore = block.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        _refuse(file, f"{BLOCK}.ignore", ignore, "a list of module names or re: patterns")
    fmt, bits, symmetric, group_size = next(iter(found.values()))
    return Scheme(fmt, bits, symmetric, group_size, tuple(ignore), block)


def _describe(fmt: str, bits: int, symmetric: bool, group_size: int | None) -> str:
    granularity = f"group_size {group_size}" if group_size else "per channel"
    return f"{fmt} int{bits} {'symmetric' if symmetric else 'asymmetric'} {granularity}"


# --------------------------------------------------------------------------------------------------
# the tensors of one quantized module
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Module:
    """One quantized module's tensors by role, with what is needed to read them and to name them in errors."""

    name: str
    tensors: dict[str, torch.Tensor]
    scheme: Scheme
    file_of: Callable[[str], str]
    rows: int = 0
    cols: int = 0

    @property
    def groups(self) -> int:
        return self.cols // (self.scheme.group_size or self.cols)

    def fail(self, role: str, problem: str) -> NoReturn:
        name = f"{self.name}.{role}"
        file = self.file_of(name)
        raise CheckpointCorruptedError(f'{file}: tensor "{name}" {problem}', file=file)

    def expect(self, role: str, dtype: torch.dtype, shape: list[int], why: str = "") -> torch.Tensor:
        t = self.tensors[role]
        if t.dtype != dtype or list(t.shape) != shape:
            self.fail(role, f"is {_shown(t)}, expected {DTYPE_NAMES[dtype]} {shape}{why}")
        return t

    def in_range(self, role: str, values: torch.Tensor) -> torch.Tensor:
        qmin, qmax = INT_RANGES[self.scheme.bits]
        bad = ((values < qmin) | (values > qmax)).nonzero()
        if len(bad):
            at = bad[0].tolist()
            self.fail(
                role, f"holds {int(values[tuple(at)])} at {at}, outside [{qmin}, {qmax}] for {self.scheme.bits} bits"
            )
        return values


def _shown(t: torch.Tensor) -> str:
    return f"{DTYPE_NAMES.get(t.dtype, str(t.dtype))} {list(t.shape)}"


def _packed_codes(m: _Module) -> torch.Tensor:
    shape = m.tensors["weight_shape"]
    if shape.dtype not in (torch.int32, torch.int64) or list(shape.shape) != [2] or int(shape.min()) < 1:
        m.fail("weight_shape", f"is {_shown(shape)} {shape.tolist()[:4]}, expected an integer [rows, cols] >= 1")
    m.rows, m.cols = shape.tolist()
    bits = m.scheme.bits
    why = f' for weight_shape [{m.rows}, {m.cols}] ("{m.name}.weight_shape") at {bits} bits'
    packed = m.expect("weight_packed", torch.int32, [m.rows, int32_words(m.cols, bits)], why)
    return unpack_int32(packed, bits, m.cols)  # every field of a word is a valid code


def _packed_zero_point(m: _Module) -> torch.Tensor:
    bits = m.scheme.bits
    zp = m.expect("weight_zero_point", torch.int32, [int32_words(m.rows, bits), m.groups], " (packed along the rows)")
    return unpack_zero_point(zp, bits, m.rows)


def _naive_codes(m: _Module) -> torch.Tensor:
    weight = m.tensors["weight"]
    if weight.dtype != torch.int8 or weight.dim() != 2 or 0 in weight.shape:
        m.fail("weight", f"is {_shown(weight)}, expected I8 [rows, cols] (the codes)")
    m.rows, m.cols = weight.shape
    return m.in_range("weight", weight)


def _naive_zero_point(m: _Module) -> torch.Tensor:
    return m.in_range("weight_zero_point", m.expect("weight_zero_point", torch.int8, [m.rows, m.groups]))


# compressed-tensors format -> how it stores a module
FORMATS: dict[str, Layout] = {
    "pack-quantized": Layout(
        ("weight_packed", "weight_shape"),
        _packed_codes,
        _packed_zero_point,
        {8: "int8 codes and zero points unpacked to I8 (weight_shape becomes the module's shape)"},
    ),
    "naive-quantized": Layout(
        ("weight",),
        _naive_codes,
        _naive_zero_point,
        {4: "int4 codes and zero points packed eight to an int32 word (weight_packed, weight_shape)"},
    ),
}


def _module_tensors(state: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and "." not in k[len(prefix) :]}


def _convert_module(m: _Module) -> dict[str, torch.Tensor]:
    """Our tensors by role for one module, after checking every tensor the scheme needs against the others."""
    scheme, layout = m.scheme, FORMATS[m.scheme.format]
    needed = (*layout.integer_roles, "weight_scale", *(() if scheme.symmetric else ("weight_zero_point",)))
    for role in needed:
        if role not in m.tensors:
            m.fail(role, f"is missing: a {scheme.described} module holds {', '.join(needed)}")
    for role in m.tensors:
        if role not in (*needed, "bias"):
            m.fail(role, f"is not a tensor a {scheme.described} module holds ({', '.join(needed)}, bias)")
    q = layout.read_codes(m)
    if scheme.group_size and m.cols % scheme.group_size:
        m.fail(
            "weight_scale",
            f"groups {m.cols} columns by {scheme.group_size}, which leaves a partial group; a portable "
            "checkpoint holds whole groups only",
        )
    scale = m.tensors["weight_scale"]
    if scale.dtype not in COMPUTE_DTYPE_NAMES:
        m.fail(
            "weight_scale",
            f"is {_shown(scale)}, expected one of {', '.join(DTYPE_NAMES[d] for d in COMPUTE_DTYPE_NAMES)}",
        )
    m.expect("weight_scale", scale.dtype, [m.rows, m.groups], f" ({scheme.described})")
    zp = None if scheme.symmetric else layout.read_zero_point(m)
    packing = PACKINGS[PACKING_FOR_BITS[scheme.bits]]
    out = {**packing.encode(q), "weight_scale": scale}
    if zp is not None:
        out["weight_zero_point"] = packing.encode_zp(zp)
    if "bias" in m.tensors:
        out["bias"] = m.expect("bias", scale.dtype, [m.rows], " (the scales' dtype)")
    return out


# --------------------------------------------------------------------------------------------------
# the folder
# --------------------------------------------------------------------------------------------------


def _natural(name: str) -> list[Any]:
    """Numbers compared as numbers: layers.2 before layers.10 (the order a model lists its modules)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _file_of(folder: Path) -> Callable[[str], str]:
    """tensor name -> the path of the file holding it (a shard of a sharded folder)."""
    name, sharded = next((n, s) for n, s in _hf_trainer.HF_WEIGHTS if (folder / n).is_file())
    if not sharded:
        return lambda tensor: str(folder / name)
    weight_map = _sources.load_json(folder / name)["weight_map"]  # checked by hf_trainer.read_folder
    return lambda tensor: str(folder / weight_map.get(tensor, name))


def _ignored(scheme: Scheme, candidates: set[str]) -> list[str]:
    """The float modules ``ignore`` names (exactly, or by a ``re:`` pattern as compressed-tensors matches them)."""
    found = {
        c
        for entry in scheme.ignore
        for c in candidates
        if (re.match(entry[3:], c) if entry.startswith("re:") else c == entry)
    }
    return sorted(found, key=_natural)


def _quantized_names(state: Mapping[str, torch.Tensor], marker: str) -> list[str]:
    """Modules with a scale, or with integer codes under the format's marking role (one lacking the other fails
    later, naming what is missing)."""
    found = set()
    for key, t in state.items():
        name, _, role = key.rpartition(".")
        if role == "weight_scale" or (role == marker and not t.is_floating_point()):
            found.add(name)
    return sorted(found, key=_natural)


def _entry(name: str, shape: list[int], ours: Mapping[str, torch.Tensor], scheme: Scheme) -> dict[str, Any]:
    listed = roles(PACKING_FOR_BITS[scheme.bits], symmetric=scheme.symmetric, mode="ptq", bias="bias" in ours)
    tensors = {
        r: {"name": f"{name}.{r}", "dtype": DTYPE_NAMES[ours[r].dtype], "shape": list(ours[r].shape)} for r in listed
    }
    return {"name": name, "kind": "linear", "shape": shape, "tensors": tensors}


def convert(folder: Path, scheme: Scheme, parts: Parts) -> dict[str, Any]:
    """Rewrite the quantized modules of ``parts.model`` (as compressed-tensors stored them) in portable-ckpt's
    layout, in place, and return the ``quantization_metadata.json`` document; ``parts.config`` loses its
    ``quantization_config``. Raises CheckpointCorruptedError naming the file and tensor that disagree."""
    file_of = _file_of(folder)
    state = parts.model
    marker = FORMATS[scheme.format].integer_roles[0]
    names = _quantized_names(state, marker)
    if not names:
        file = file_of("")
        raise CheckpointCorruptedError(
            f"{file}: no quantized module (no tensors <module>.{marker} and <module>.weight_scale), although "
            f"{CONFIG_FILE} has a {BLOCK} of format {scheme.format}",
            file=file,
        )
    modules: list[dict[str, Any]] = []
    compute: tuple[torch.dtype, str] | None = None  # the scales' dtype, and the module that set it
    for name in names:
        m = _Module(name, _module_tensors(state, name), scheme, file_of)
        ours = _convert_module(m)
        dtype = ours["weight_scale"].dtype
        compute = compute or (dtype, name)
        if dtype != compute[0]:
            m.fail(
                "weight_scale",
                f'is {DTYPE_NAMES[dtype]} but the scales of "{compute[1]}" are {DTYPE_NAMES[compute[0]]}: '
                "a portable checkpoint has one compute dtype",
            )
        for role in m.tensors:
            del state[f"{name}.{role}"]
        state.update({f"{name}.{role}": t for role, t in ours.items()})
        modules.append(_entry(name, [m.rows, m.cols], ours, scheme))
    assert compute is not None  # names is not empty
    floats = {k.removesuffix(".weight") for k, t in state.items() if k.endswith(".weight") and t.is_floating_point()}
    metadata = {
        "format_version": _quant.FORMAT_VERSION,
        "method": METHOD,
        "mode": "ptq",
        "bits": scheme.bits,
        "symmetric": scheme.symmetric,
        "granularity": "group" if scheme.group_size else "channel",
        "group_size": scheme.group_size,
        "packing": PACKING_FOR_BITS[scheme.bits],
        "compute_dtype": COMPUTE_DTYPE_NAMES[compute[0]],
        "lora": None,
        "modules": modules,
        "ignored_modules": _ignored(scheme, floats - set(names)),
    }
    # the document and the tensors agree by construction; checked here as a loader checks them
    _quant.check_metadata(metadata, {k: (DTYPE_NAMES[t.dtype], list(t.shape)) for k, t in state.items()})
    parts.config.pop(BLOCK, None)
    change = FORMATS[scheme.format].changed.get(scheme.bits, "")
    parts.carry(
        f"{CONFIG_FILE}[{BLOCK!r}]",
        f"quantization_metadata.json: {len(modules)} linear modules, {scheme.described}; codes, "
        f"scales and zero points as stored{'; ' if change else ''}{change}; the block itself in "
        f"extra['imported_from'][{BLOCK!r}]",
    )
    return metadata


__all__ = ["FORMATS", "METHOD", "Scheme", "convert", "read_scheme"]
