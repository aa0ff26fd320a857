"""Quantized models: ``quantize`` / ``is_quantized`` and the hooks the checkpoint core calls.

``quantization_metadata`` describes a quantized model for ``quantization_metadata.json``;
``check_metadata`` verifies such a document against the stored tensors; ``apply_quantization`` turns a
float model into the described quantized one so that ``load_state_dict`` restores it exactly.
The format is specified in ``format_spec/quantization.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from portable_ckpt.errors import (
    CheckpointInputError,
    QuantizationMetadataError,
    StateMismatchError,
    UnsupportedFormatVersionError,
)
from portable_ckpt.format.safetensors import DTYPE_NAMES
from portable_ckpt.quant.modules import QuantEmbedding, QuantizedModule, QuantLinear, QuantSpec
from portable_ckpt.quant.packing import (
    COMPUTE,
    COMPUTE_DTYPE_NAMES,
    COMPUTE_DTYPES,
    INT_RANGES,
    MODE_ROLES,
    PACKING_FOR_BITS,
    PACKINGS,
    Geometry,
    role_layout,
    roles,
)

FORMAT_VERSION = 1
METHOD = "portable-ckpt-rtn"  # round to nearest, scales from the min/max of each channel or group
METADATA_FILE = "quantization_metadata.json"

# float module type -> its quantized replacement; exact types, so subclasses with their own forward are kept
REPLACEMENTS: dict[type[nn.Module], type[QuantizedModule]] = {
    nn.Linear: QuantLinear,
    nn.Embedding: QuantEmbedding,
}
FLOAT_KINDS: dict[type[nn.Module], str] = {float_type: q.kind for float_type, q in REPLACEMENTS.items()}
QUANT_KINDS: dict[str, type[QuantizedModule]] = {q.kind: q for q in REPLACEMENTS.values()}
KIND_HAS_BIAS: dict[str, bool] = {"linear": True, "embedding": False}


def is_quantized(model: nn.Module) -> bool:
    """True when any submodule of ``model`` (or the model itself) is a quantized module."""
    return any(isinstance(m, QuantizedModule) for m in model.modules())


def quantize(
    model: nn.Module,
    *,
    bits: int = 8,
    symmetric: bool = True,
    group_size: int | None = None,
    targets: Iterable[type[nn.Module]] = (nn.Linear, nn.Embedding),
    ignore: Iterable[str] = (),
    mode: str = "ptq",
    lora_rank: int = 8,
    lora_alpha: float = 16,
) -> nn.Module:
    """Replace the target modules of ``model`` in place by quantized ones and return ``model``.

    bits: 8 or 4. group_size: None for one scale per output channel (embedding row), else the number
    of input columns sharing a scale. ignore: qualified module names kept in floating point (with
    their submodules). mode: "ptq" (inference), "lora" (frozen integers + trainable adapters) or
    "qat" (float master weights trained through fake quantization).

        model = quantize(model, bits=4, group_size=32, ignore=("lm_head",))
    """
    _check_options(bits=bits, group_size=group_size, mode=mode, lora_rank=lora_rank, lora_alpha=lora_alpha)
    if is_quantized(model):
        raise CheckpointInputError("quantize: the model is already quantized; quantize a floating-point model")
    found = _find_targets(model, tuple(targets), tuple(ignore), group_size)
    dtypes = {module.weight.dtype for _, module in found}
    if len(dtypes) != 1 or next(iter(dtypes)) not in COMPUTE_DTYPE_NAMES:
        raise CheckpointInputError(
            f"quantize: target weights have dtypes {sorted(map(str, dtypes))}; cast the model to one of "
            f"{sorted(COMPUTE_DTYPES)} first (e.g. model.float())"
        )
    spec = QuantSpec(
        bits=bits,
        symmetric=symmetric,
        group_size=group_size,
        mode=mode,
        lora_rank=lora_rank if mode == "lora" else None,
        lora_alpha=lora_alpha if mode == "lora" else None,
        compute_dtype=dtypes.pop(),
    )
    for name, module in found:
        new = REPLACEMENTS[type(module)].like(module, spec)
        new.quantize_from(module.weight)
        if mode == "lora":
            new.init_adapters()
        _replace(model, name, new)
    return model


def _check_options(*, bits: int, group_size: int | None, mode: str, lora_rank: int, lora_alpha: float) -> None:
    problems = {
        f"bits={bits!r}: use one of {sorted(INT_RANGES)}": bits not in INT_RANGES,
        f"mode={mode!r}: use one of {sorted(MODE_ROLES)}": mode not in MODE_ROLES,
        f"group_size={group_size!r}: use None (per channel) or a positive int": group_size is not None
        and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1),
        f"lora_rank={lora_rank!r}: use a positive int": mode == "lora"
        and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1),
        f"lora_alpha={lora_alpha!r}: use a positive number": mode == "lora"
        and (isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not lora_alpha > 0),
    }
    for message, bad in problems.items():
        if bad:
            raise CheckpointInputError(f"quantize: {message}")


def _find_targets(
    model: nn.Module, targets: tuple[type[nn.Module], ...], ignore: tuple[str, ...], group_size: int | None
) -> list[tuple[str, nn.Linear | nn.Embedding]]:
    unknown_targets = [t for t in targets if t not in REPLACEMENTS]
    if unknown_targets:
        raise CheckpointInputError(
            f"quantize: targets {unknown_targets} unsupported; use a subset of (nn.Linear, nn.Embedding)"
        )
    all_names = [name for name, _ in model.named_modules(remove_duplicate=False)]
    unknown_ignore = sorted(set(ignore) - set(all_names))
    if unknown_ignore:
        raise CheckpointInputError(f"quantize: ignore names {unknown_ignore} are not modules of the model")

    def ignored(name: str) -> bool:
        return any(name == i or name.startswith(i + ".") for i in ignore)

    found = [
        (n, m)
        for n, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, (nn.Linear, nn.Embedding)) and type(m) in targets and not ignored(n)
    ]
    if not found:
        raise CheckpointInputError(f"quantize: no module of types {[t.__name__ for t in targets]} left to quantize")
    by_weight: dict[int, list[str]] = {}
    for name, module in found:
        by_weight.setdefault(id(module.weight), []).append(name or "<root>")
    for names in by_weight.values():
        if len(names) > 1:
            raise CheckpointInputError(
                f"quantize: modules {names} share one weight, which quantized copies cannot keep "
                "shared; untie them first, or keep them all in floating point with ignore="
            )
    for name, module in found:
        cols = module.weight.shape[1]
        problems = {
            "the model itself cannot be replaced in place; wrap it in a container module": name == "",
            f"group_size {group_size} does not divide its {cols} input columns; pick a divisor or add it "
            "to ignore=": group_size is not None and cols % group_size != 0,
            "max_norm renormalizes the weight in place, which a quantized table cannot do; add it to ignore=": getattr(
                module, "max_norm", None
            )
            is not None,
        }
        for message, bad in problems.items():
            if bad:
                raise CheckpointInputError(f'quantize: module "{name}": {message}')
    return found


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


# ---------------------------------------------------------------------------------------------------
# hooks for the checkpoint core
# ---------------------------------------------------------------------------------------------------


def quantization_metadata(model: nn.Module) -> dict[str, Any] | None:
    """The ``quantization_metadata.json`` document for ``model``, or None for a float model."""
    quantized = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedModule)]
    if not quantized:
        return None
    specs = {m.spec for _, m in quantized}
    if len(specs) != 1:
        raise CheckpointInputError(
            f"quantization_metadata: modules use {len(specs)} different schemes; one is supported"
        )
    spec = specs.pop()
    modules = []
    for name, module in quantized:
        present = roles(spec.packing, symmetric=spec.symmetric, mode=spec.mode, bias=module.bias is not None)
        tensors = {
            role: {"name": f"{name}.{role}", "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
            for role in present
            for t in [getattr(module, role)]
        }
        shape = [module.geometry.rows, module.geometry.cols]
        modules.append({"name": name, "kind": module.kind, "shape": shape, "tensors": tensors})
    lora = {"rank": spec.lora_rank, "alpha": spec.lora_alpha} if spec.mode == "lora" else None
    return {
        "format_version": FORMAT_VERSION,
        "method": METHOD,
        "mode": spec.mode,
        "bits": spec.bits,
        "symmetric": spec.symmetric,
        "granularity": "group" if spec.group_size else "channel",
        "group_size": spec.group_size,
        "packing": spec.packing,
        "compute_dtype": COMPUTE_DTYPE_NAMES[spec.compute_dtype],
        "lora": lora,
        "modules": modules,
        "ignored_modules": [n for n, m in model.named_modules() if n and type(m) in FLOAT_KINDS],
    }


def manifest_summary(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``quantization`` field for a metadata document."""
    keys = ("mode", "bits", "symmetric", "granularity", "group_size")
    return {**{k: metadata[k] for k in keys}, "metadata_file": METADATA_FILE}


def check_metadata(
    metadata: Mapping[str, Any],
    tensors: Mapping[str, tuple[str, list[int]]],
    *,
    filename: str = METADATA_FILE,
) -> None:
    """Check a schema-valid metadata document against the stored tensors (name -> (dtype, shape)).

    Raises QuantizationMetadataError naming the file, the module and the problem.
    """

    def fail(message: str) -> None:
        raise QuantizationMetadataError(f"{filename}: {message}", file=filename)

    version = metadata["format_version"]
    if version > FORMAT_VERSION:
        raise UnsupportedFormatVersionError(
            f"{filename}: format_version {version} is newer than this reader's {FORMAT_VERSION}; upgrade portable-ckpt",
            file=filename,
        )
    bits, packing, mode, group_size = (
        metadata["bits"],
        metadata["packing"],
        metadata["mode"],
        metadata["group_size"],
    )
    if bits not in PACKING_FOR_BITS:
        fail(f"bits is {bits}, expected one of {sorted(PACKING_FOR_BITS)}")
    if packing not in PACKINGS:
        fail(f'unknown packing "{packing}"; known: {", ".join(sorted(PACKINGS))}')
    if PACKINGS[packing].bits != bits:
        fail(f'packing "{packing}" stores {PACKINGS[packing].bits}-bit codes but bits is {bits}')
    if (metadata["granularity"] == "group") != (group_size is not None):
        fail(f'granularity "{metadata["granularity"]}" does not match group_size {group_size}')
    if mode not in MODE_ROLES:
        fail(f'unknown mode "{mode}"; known: {", ".join(sorted(MODE_ROLES))}')
    if (mode == "lora") != (metadata["lora"] is not None):
        fail(f'mode "{mode}" with lora {metadata["lora"]}: lora settings are required exactly in mode "lora"')
    if metadata["compute_dtype"] not in COMPUTE_DTYPES:
        fail(f'unknown compute_dtype "{metadata["compute_dtype"]}"; known: {", ".join(sorted(COMPUTE_DTYPES))}')
    names = [m["name"] for m in metadata["modules"]]
    duplicated = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(metadata["ignored_modules"])))
    if duplicated:
        fail(f"modules listed twice or both quantized and ignored: {duplicated}")
    for module in metadata["modules"]:
        problem = _module_problem(metadata, module, tensors)
        if problem:
            fail(f'module "{module["name"]}": {problem}')


def _module_problem(
    metadata: Mapping[str, Any], module: Mapping[str, Any], tensors: Mapping[str, tuple[str, list[int]]]
) -> str | None:
    rows, cols = module["shape"]
    group_size, packing = metadata["group_size"], metadata["packing"]
    if group_size and cols % group_size:
        return f"its {cols} columns do not split into groups of {group_size}"
    listed: Mapping[str, Mapping[str, Any]] = module["tensors"]
    if "bias" in listed and not KIND_HAS_BIAS[module["kind"]]:
        return f"a {module['kind']} module has no bias"
    expected = roles(packing, symmetric=metadata["symmetric"], mode=metadata["mode"], bias="bias" in listed)
    missing = [r for r in expected if r not in listed]
    if missing:
        return f"missing tensor {', '.join(missing)}"
    unexpected = [r for r in listed if r not in expected]
    if unexpected:
        return f"unexpected tensor {', '.join(unexpected)} for this scheme"
    lora = metadata["lora"] or {}
    geometry = Geometry(rows, cols, group_size, lora.get("rank"))
    compute = DTYPE_NAMES[COMPUTE_DTYPES[metadata["compute_dtype"]]]
    scheme = f"group_size {group_size}" if group_size else "per-channel"
    for role in expected:
        entry = listed[role]
        layout = role_layout(packing, role)
        assert layout is not None  # roles() only yields roles of the layout
        dtype, shape = compute if layout[0] == COMPUTE else layout[0], list(layout[1](geometry))
        name = f"{module['name']}.{role}"
        problem = {
            f'{role} is named "{entry["name"]}", expected "{name}"': entry["name"] != name,
            f"{role} has dtype {entry['dtype']}, expected {dtype}": entry["dtype"] != dtype,
            f"{role} has shape {entry['shape']}, expected {shape} ({scheme})": entry["shape"] != shape,
            f'{role}: tensor "{name}" is not in the model file': name not in tensors,
        }
        for message, bad in problem.items():
            if bad:
                return message
        stored_dtype, stored_shape = tensors[name]
        if stored_dtype != dtype or list(stored_shape) != shape:
            found = f"{stored_dtype} {list(stored_shape)}"
            return f'{role}: tensor "{name}" is stored as {found}, listed as {dtype} {shape}'
    return None


def apply_quantization(model: nn.Module, metadata: Mapping[str, Any]) -> nn.Module:
    """Quantize the modules of a float ``model`` as ``metadata`` describes (empty values), in place.

    ``model.load_state_dict(stored_state)`` then restores the quantized model exactly. A model already
    quantized this way is left as it is. No float weight is read and no random number is drawn.
    Raises StateMismatchError listing every module that is missing or differs in kind, shape, bias or scheme.
    """
    lora = metadata["lora"] or {}
    spec = QuantSpec(
        bits=metadata["bits"],
        symmetric=metadata["symmetric"],
        group_size=metadata["group_size"],
        mode=metadata["mode"],
        lora_rank=lora.get("rank"),
        lora_alpha=lora.get("alpha"),
        compute_dtype=COMPUTE_DTYPES[metadata["compute_dtype"]],
    )
    present = dict(model.named_modules())
    listed = {entry["name"] for entry in metadata["modules"]}
    problems = [
        f'module "{n}": quantized in the model but not listed'
        for n, m in present.items()
        if isinstance(m, QuantizedModule) and n not in listed
    ]
    todo: list[tuple[str, str, nn.Module]] = []
    for entry in metadata["modules"]:
        module = present.get(entry["name"])
        problem = "not found in the model" if module is None else _apply_problem(module, entry, spec)
        if problem:
            problems.append(f'module "{entry["name"]}": {problem}')
        elif module is not None and not isinstance(module, QuantizedModule):
            todo.append((entry["name"], entry["kind"], module))
    if problems:
        raise StateMismatchError(f"model does not match {METADATA_FILE}: " + "; ".join(problems))
    for name, kind, module in todo:
        _replace(model, name, QUANT_KINDS[kind].like(module, spec))
    return model


def _apply_problem(module: nn.Module, entry: Mapping[str, Any], spec: QuantSpec) -> str | None:
    kind, shape, bias = entry["kind"], list(entry["shape"]), "bias" in entry["tensors"]
    if isinstance(module, QuantizedModule):
        found = (module.kind, [module.geometry.rows, module.geometry.cols], module.bias is not None)
    elif isinstance(module, (nn.Linear, nn.Embedding)) and type(module) in FLOAT_KINDS:
        found = (
            FLOAT_KINDS[type(module)],
            list(module.weight.shape),
            getattr(module, "bias", None) is not None,
        )
    else:
        return f"expected a {kind} module, found {type(module).__name__}"
    want = (kind, shape, bias)
    if found != want:
        return f"expected {_describe(*want)}, found {_describe(*found)}"
    if isinstance(module, QuantizedModule) and module.spec != spec:
        return f"already quantized another way ({module.extra_repr()})"
    if getattr(module, "max_norm", None) is not None:
        return "max_norm is set, which a quantized embedding does not support"
    return None


def _describe(kind: str, shape: list[int], bias: bool) -> str:
    return f"{kind} {shape}" + (" with bias" if bias else " without bias") * KIND_HAS_BIAS[kind]
