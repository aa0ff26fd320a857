"""Quantized replacements for ``nn.Linear`` and ``nn.Embedding`` in the modes ptq, lora and qat.

Every module holds the compressed-tensors named integer tensors (``weight`` or ``weight_packed`` +
``weight_shape``, ``weight_scale``, ``weight_zero_point``) as buffers, and computes in floating point:
the weight is dequantized, then ``F.linear`` / ``F.embedding`` run as usual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from portable_ckpt.format.safetensors import DTYPES
from portable_ckpt.quant.packing import (
    COMPUTE,
    PACKING_FOR_BITS,
    PACKINGS,
    PARAMETER_ROLES,
    TRAINABLE_ROLES,
    Geometry,
    compute_qparams,
    dequantize_values,
    quantize_values,
    role_layout,
    roles,
)


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """One quantization scheme; the same for every module of a model."""

    bits: int
    symmetric: bool
    group_size: int | None
    mode: str
    lora_rank: int | None  # set only in mode "lora"
    lora_alpha: float | None
    compute_dtype: torch.dtype

    @property
    def packing(self) -> str:
        return PACKING_FOR_BITS[self.bits]


class QuantizedModule(nn.Module):
    """Base of the quantized modules: the tensors, (de)quantization and the forward skeleton."""

    kind: ClassVar[str]
    # registered per instance by role (see _qpack.roles); declared for type checkers
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    weight_master: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, spec: QuantSpec, rows: int, cols: int, *, bias: bool, device: torch.device) -> None:
        super().__init__()
        self.spec = spec
        self.geometry = Geometry(rows, cols, spec.group_size, spec.lora_rank)
        trainable = TRAINABLE_ROLES[spec.mode]
        for role in roles(spec.packing, symmetric=spec.symmetric, mode=spec.mode, bias=bias):
            layout = role_layout(spec.packing, role)
            assert layout is not None  # roles() only yields roles of the layout
            dtype_name, shape = layout
            dtype = spec.compute_dtype if dtype_name == COMPUTE else DTYPES[dtype_name]
            tensor = torch.zeros(shape(self.geometry), dtype=dtype, device=device)
            if role in PARAMETER_ROLES:
                self.register_parameter(role, nn.Parameter(tensor, requires_grad=role in trainable))
            else:
                self.register_buffer(role, tensor)
        if not bias:
            self.register_parameter("bias", None)
        # a consistent all-zero weight until real values are quantized in or loaded
        ones = torch.ones(rows, self.geometry.groups, dtype=spec.compute_dtype, device=device)
        zero_point = None if spec.symmetric else torch.zeros_like(ones, dtype=torch.int32)
        self._store(torch.zeros(rows, cols, dtype=torch.int8, device=device), ones, zero_point)
        if spec.mode == "qat":
            # the integer tensors in a state_dict always match the master weight saved beside them
            self.register_state_dict_pre_hook(_refresh_before_state_dict)

    # -- the integer tensors -----------------------------------------------------------------------

    @torch.no_grad()
    def _store(self, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        packing = PACKINGS[self.spec.packing]
        for role, tensor in packing.encode(q).items():
            getattr(self, role).copy_(tensor)
        self.weight_scale.copy_(scale)
        if zero_point is not None:
            self.weight_zero_point.copy_(packing.encode_zp(zero_point))

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The stored quantization, unpacked: int8 codes [rows, cols], scales, int zero points or None."""
        packing = PACKINGS[self.spec.packing]
        tensors = dict(self.named_buffers(recurse=False))
        zero_point = None if self.spec.symmetric else packing.decode_zp(self.weight_zero_point, self.geometry)
        return packing.decode(tensors, self.geometry), self.weight_scale, zero_point

    @torch.no_grad()
    def quantize_from(self, weight: torch.Tensor) -> None:
        """Round ``weight`` [rows, cols] to the grid and store it (and, in qat, keep it as the master)."""
        spec = self.spec
        scale, zero_point = self._qparams(weight)
        self._store(quantize_values(weight, scale, zero_point, bits=spec.bits), scale, zero_point)
        if spec.mode == "qat" and weight is not self.weight_master:
            self.weight_master.copy_(weight)

    def _qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        spec = self.spec
        return compute_qparams(
            weight, bits=spec.bits, symmetric=spec.symmetric, group_size=spec.group_size, scale_dtype=spec.compute_dtype
        )

    def init_adapters(self) -> None:
        """LoRA start: A kaiming-uniform from the global RNG (as nn.Linear), B zero: output unchanged."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # -- forward -----------------------------------------------------------------------------------

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: always exactly (q - zero_point) * scale."""
        if self.spec.mode != "qat":
            q, scale, zero_point = self.codes()
            return dequantize_values(q, scale, zero_point, self.spec.compute_dtype)
        master = self.weight_master
        spec = self.spec
        scale, zero_point = self._qparams(master)
        grid = dequantize_values(
            quantize_values(master, scale, zero_point, bits=spec.bits), scale, zero_point, spec.compute_dtype
        )
        # straight-through estimator: the value is exactly `grid` (master - master.detach() is exactly 0),
        # the gradient flows to the master weight unchanged
        return grid + (master - master.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._lookup(x, self.dequantized_weight())
        if self.spec.mode == "lora":
            assert self.spec.lora_rank is not None and self.spec.lora_alpha is not None
            out = out + self._adapter(x) * (self.spec.lora_alpha / self.spec.lora_rank)
        return out

    @classmethod
    def like(cls, module: nn.Module, spec: QuantSpec) -> QuantizedModule:
        """An empty quantized twin of a float module: same geometry and options, weight not yet quantized."""
        raise NotImplementedError

    def _lookup(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        s = self.spec
        group = f"group_size={s.group_size}" if s.group_size else "per-channel"
        sym = "symmetric" if s.symmetric else "asymmetric"
        return f"{self.geometry.rows}x{self.geometry.cols}, int{s.bits} {sym} {group}, mode={s.mode}"


def _refresh_before_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    assert isinstance(module, QuantizedModule)
    module.quantize_from(module.weight_master)


class QuantLinear(QuantizedModule):
    """y = x W^T + b with W dequantized; lora adds (x A^T B^T) * alpha / rank."""

    kind = "linear"

    def __init__(
        self, spec: QuantSpec, in_features: int, out_features: int, *, bias: bool, device: torch.device
    ) -> None:
        super().__init__(spec, out_features, in_features, bias=bias, device=device)
        self.in_features = in_features
        self.out_features = out_features

    @classmethod
    def like(cls, module: nn.Module, spec: QuantSpec) -> QuantLinear:
        """An empty quantized twin of an ``nn.Linear`` (bias copied, weight not yet quantized)."""
        assert isinstance(module, nn.Linear)
        new = cls(
            spec,
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=module.weight.device,
        )
        if module.bias is not None and new.bias is not None:
            with torch.no_grad():
                new.bias.copy_(module.bias)
        return new

    def _lookup(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.bias)

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)


class QuantEmbedding(QuantizedModule):
    """Row lookup in the dequantized table; lora adds (B[ids] A) * alpha / rank, i.e. rows of B A."""

    kind = "embedding"

    def __init__(
        self,
        spec: QuantSpec,
        num_embeddings: int,
        embedding_dim: int,
        *,
        device: torch.device,
        padding_idx: int | None = None,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
    ) -> None:
        super().__init__(spec, num_embeddings, embedding_dim, bias=False, device=device)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.scale_grad_by_freq = scale_grad_by_freq
        self.sparse = sparse

    @classmethod
    def like(cls, module: nn.Module, spec: QuantSpec) -> QuantEmbedding:
        """An empty quantized twin of an ``nn.Embedding`` (lookup options copied)."""
        assert isinstance(module, nn.Embedding)
        return cls(
            spec,
            module.num_embeddings,
            module.embedding_dim,
            device=module.weight.device,
            padding_idx=module.padding_idx,
            scale_grad_by_freq=module.scale_grad_by_freq,
            sparse=module.sparse,
        )

    def _lookup(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        # padding_idx keeps B's padding row out of training, so the padding output stays the base row
        rows = F.embedding(x, self.lora_B, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)
        return rows @ self.lora_A
