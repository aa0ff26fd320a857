"""Integer quantization math and tensor layouts: round-to-nearest with min/max scales, int4-in-int32 packing.

Pure functions on tensors, no modules and no state. The conventions are those of compressed-tensors'
``pack-quantized`` format: int4 tensors are stored as it stores them; int8 codes are stored unpacked and
``convert/export.py`` packs them four to an int32 word on export. The normative description is
``format_spec/quantization.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# bits -> (qmin, qmax) of the signed integer codes, the full two's-complement range
INT_RANGES: dict[int, tuple[int, int]] = {8: (-128, 127), 4: (-8, 7)}

# mode -> what the state carries beyond the integer tensors; the roles are the state_dict suffixes
MODE_ROLES: dict[str, tuple[str, ...]] = {"ptq": (), "lora": ("lora_A", "lora_B"), "qat": ("weight_master",)}
# mode -> roles that are trainable parameters (the integer tensors, scales and zero points never are)
TRAINABLE_ROLES: dict[str, frozenset[str]] = {
    "ptq": frozenset(),
    "lora": frozenset({"lora_A", "lora_B", "bias"}),
    "qat": frozenset({"weight_master", "bias"}),
}
PARAMETER_ROLES = frozenset({"lora_A", "lora_B", "weight_master", "bias"})

# compute dtype name (metadata) -> torch dtype; scales, adapters, master weights and bias use it
COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
COMPUTE_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in COMPUTE_DTYPES.items()}


@dataclass(frozen=True, slots=True)
class Geometry:
    """The logical weight [rows, cols] of one module: rows are output channels (embedding rows)."""

    rows: int
    cols: int
    group_size: int | None
    lora_rank: int | None

    @property
    def groups(self) -> int:
        return self.cols // (self.group_size or self.cols)


ShapeFn = Callable[[Geometry], tuple[int, ...]]
COMPUTE = "compute"  # placeholder dtype: the metadata's compute_dtype


@dataclass(frozen=True, slots=True)
class Packing:
    """How one bit width is stored: its integer tensors and zero point (role -> (dtype, shape)) and codecs.

    ``encode`` turns int8 codes [rows, cols] into the integer tensors by role, ``decode`` reverses it;
    ``encode_zp`` / ``decode_zp`` do the same for signed zero points [rows, groups].
    """

    bits: int
    integer_roles: dict[str, tuple[str, ShapeFn]]
    zero_point: tuple[str, ShapeFn]
    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    decode: Callable[[Mapping[str, torch.Tensor], Geometry], torch.Tensor]
    encode_zp: Callable[[torch.Tensor], torch.Tensor]
    decode_zp: Callable[[torch.Tensor, Geometry], torch.Tensor]
    compressed_tensors_format: str


def _words(n: int) -> int:
    return math.ceil(n / 8)


PACKINGS: dict[str, Packing] = {
    "int8": Packing(
        bits=8,
        integer_roles={"weight": ("I8", lambda g: (g.rows, g.cols))},
        zero_point=("I8", lambda g: (g.rows, g.groups)),
        encode=lambda q: {"weight": q.to(torch.int8)},
        decode=lambda t, g: t["weight"],
        encode_zp=lambda zp: zp.to(torch.int8),
        decode_zp=lambda zp, g: zp,
        compressed_tensors_format="pack-quantized",  # after export repacks the int8 codes into int32 words
    ),
    "int4-in-int32-lsb-first": Packing(
        bits=4,
        integer_roles={
            "weight_packed": ("I32", lambda g: (g.rows, _words(g.cols))),
            "weight_shape": ("I64", lambda g: (2,)),
        },
        # compressed-tensors packs zero points along the rows (dim 0), not the columns
        zero_point=("I32", lambda g: (_words(g.rows), g.groups)),
        encode=lambda q: {
            "weight_packed": pack_int32(q, 4),
            "weight_shape": torch.tensor(q.shape, dtype=torch.int64, device=q.device),
        },
        decode=lambda t, g: unpack_int32(t["weight_packed"], 4, g.cols),
        encode_zp=lambda zp: pack_zero_point(zp, 4),
        decode_zp=lambda zp, g: unpack_zero_point(zp, 4, g.rows),
        compressed_tensors_format="pack-quantized",
    ),
}
PACKING_FOR_BITS: dict[int, str] = {p.bits: name for name, p in PACKINGS.items()}

# roles every layout shares: role -> (dtype, shape)
COMMON_ROLES: dict[str, tuple[str, ShapeFn]] = {
    "weight_scale": (COMPUTE, lambda g: (g.rows, g.groups)),
    "lora_A": (COMPUTE, lambda g: (g.lora_rank or 0, g.cols)),
    "lora_B": (COMPUTE, lambda g: (g.rows, g.lora_rank or 0)),
    "weight_master": (COMPUTE, lambda g: (g.rows, g.cols)),
    "bias": (COMPUTE, lambda g: (g.rows,)),
}


def role_layout(packing: str, role: str) -> tuple[str, ShapeFn] | None:
    """(dtype, shape function) of a tensor role under a packing; None for a role the layout does not know."""
    layout = PACKINGS[packing]
    if role == "weight_zero_point":
        return layout.zero_point
    return layout.integer_roles.get(role) or COMMON_ROLES.get(role)


def roles(packing: str, *, symmetric: bool, mode: str, bias: bool) -> tuple[str, ...]:
    """The state_dict suffixes one quantized module carries, in a fixed order."""
    zero_point = () if symmetric else ("weight_zero_point",)
    return (
        *PACKINGS[packing].integer_roles,
        "weight_scale",
        *zero_point,
        *MODE_ROLES[mode],
        *(("bias",) if bias else ()),
    )


# ---------------------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------------------


def compute_qparams(
    weight: torch.Tensor, *, bits: int, symmetric: bool, group_size: int | None, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales [rows, groups] (``scale_dtype``) and signed zero points (int32, or None when symmetric).

    Symmetric: scale = max|w| / qmax. Asymmetric: the range [min(w, 0), max(w, 0)] maps onto
    [qmin, qmax]: scale = (max - min) / (qmax - qmin), zero_point = round(qmin - min / scale).
    """
    rows, cols = weight.shape
    grouped = weight.detach().to(torch.float32).reshape(rows, -1, group_size or cols)
    low = grouped.amin(dim=-1).clamp(max=0.0)
    high = grouped.amax(dim=-1).clamp(min=0.0)
    qmin, qmax = INT_RANGES[bits]
    span = torch.maximum(-low, high) if symmetric else high - low
    # divide by a tensor, not a Python number: CUDA turns division by a scalar into multiplication by
    # its reciprocal, which is not correctly rounded and would make GPU scales differ from CPU ones
    span = span / torch.full_like(span, qmax if symmetric else qmax - qmin)
    # an all-zero group gets the smallest normal scale instead of 0 (no division by zero)
    scale = span.clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype)
    if symmetric:
        return scale, None
    zero_point = torch.round(qmin - low / scale.to(torch.float32)).clamp(qmin, qmax)
    return scale, zero_point.to(torch.int32)


def quantize_values(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, *, bits: int
) -> torch.Tensor:
    """q = clamp(round(w / scale + zero_point), qmin, qmax) as int8 [rows, cols]; round half to even."""
    rows, cols = weight.shape
    grouped = weight.detach().to(torch.float32).reshape(rows, scale.shape[1], -1)
    codes = grouped / scale.to(torch.float32).unsqueeze(-1)
    if zero_point is not None:
        codes = codes + zero_point.to(torch.float32).unsqueeze(-1)
    qmin, qmax = INT_RANGES[bits]
    return torch.round(codes).clamp(qmin, qmax).to(torch.int8).reshape(rows, cols)


def dequantize_values(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """w = (q - zero_point) * scale, computed in ``dtype`` (the integer difference is exact first)."""
    rows, cols = q.shape
    codes = q.to(torch.int32).reshape(rows, scale.shape[1], -1)
    if zero_point is not None:
        codes = codes - zero_point.to(torch.int32).unsqueeze(-1)
    return (codes.to(dtype) * scale.to(dtype).unsqueeze(-1)).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------------
# packing: 32 // bits codes per int32 word along the last dimension, lowest bits first
# ---------------------------------------------------------------------------------------------------


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed codes [..., n] into int32 [..., ceil(n / (32 // bits))].

    Each code is offset by 2**(bits-1) to unsigned; code j of a row lands in word j // k at bit
    position bits * (j % k), k = 32 // bits; missing codes at the end of a row are zero bits.
    """
    qmin, qmax = INT_RANGES[bits]
    if q.numel() and (int(q.min()) < qmin or int(q.max()) > qmax):
        raise ValueError(f"pack_int32: codes must lie in [{qmin}, {qmax}] for {bits} bits")
    per_word = 32 // bits
    unsigned = q.to(torch.int64) - qmin
    unsigned = F.pad(unsigned, (0, (-q.shape[-1]) % per_word))
    shifts = torch.arange(per_word, dtype=torch.int64, device=q.device) * bits
    words = (unsigned.unflatten(-1, (-1, per_word)) << shifts).sum(dim=-1)
    # reinterpret the unsigned 32-bit value as two's complement int32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 [..., words] -> int8 codes [..., length]."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64, device=packed.device) * bits
    unsigned = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    codes = unsigned.flatten(-2)[..., :length] + INT_RANGES[bits][0]
    return codes.to(torch.int8)


def pack_zero_point(zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors packs zero points [rows, groups] along the rows: int32 [ceil(rows / 8), groups]."""
    return pack_int32(zero_point.T, bits).T.contiguous()


def unpack_zero_point(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    return unpack_int32(packed.T, bits, rows).T.contiguous()


# ---------------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized: codes of every bit width in int32 words (export writes it, import reads it)
# ---------------------------------------------------------------------------------------------------


def int32_words(n: int, bits: int) -> int:
    """How many int32 words hold ``n`` codes of ``bits`` bits: ceil(n / (32 // bits))."""
    return math.ceil(n / (32 // bits))


def pack_quantized(q: torch.Tensor, zero_point: torch.Tensor | None, bits: int) -> dict[str, torch.Tensor]:
    """compressed-tensors ``pack-quantized`` integer tensors by role, from codes [rows, cols] and zero points
    [rows, groups] (None when symmetric): ``weight_packed`` int32 [rows, int32_words(cols)] (:func:`pack_int32`),
    ``weight_shape`` int64 [rows, cols], ``weight_zero_point`` int32 [int32_words(rows), groups] packed along
    the rows (:func:`pack_zero_point`). The inverses are :func:`unpack_int32` and :func:`unpack_zero_point`."""
    out = {
        "weight_packed": pack_int32(q, bits),
        "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64, device=q.device),
    }
    if zero_point is not None:
        out["weight_zero_point"] = pack_zero_point(zero_point, bits)
    return out
