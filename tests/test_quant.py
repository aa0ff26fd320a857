"""Quantized models: int8/int4 storage, the ptq/lora/qat modes, metadata, schema and spec agreement."""

from __future__ import annotations

import copy
import itertools
import json
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from torch import nn

from portable_ckpt.errors import (
    QuantizationMetadataError,
    StateMismatchError,
    UnsupportedFormatVersionError,
)
from portable_ckpt.format.safetensors import DTYPE_NAMES
from portable_ckpt.quant.modules import QuantizedModule
from portable_ckpt.quant.packing import (
    INT_RANGES,
    compute_qparams,
    dequantize_values,
    pack_int32,
    pack_zero_point,
    quantize_values,
    unpack_int32,
    unpack_zero_point,
)
from portable_ckpt.quant.quantize import (
    apply_quantization,
    check_metadata,
    is_quantized,
    manifest_summary,
    quantization_metadata,
    quantize,
)

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "schemas" / "quantization_metadata.schema.json").read_text(encoding="utf-8"))
SPEC = (ROOT / "format_spec" / "quantization.md").read_text(encoding="utf-8")

SCHEMES = [
    {"bits": bits, "symmetric": symmetric, "group_size": group_size}
    for bits, symmetric, group_size in itertools.product((8, 4), (True, False), (None, 8))
]
SCHEME_IDS = [f"int{s['bits']}-{'sym' if s['symmetric'] else 'asym'}-{s['group_size'] or 'ch'}" for s in SCHEMES]
MODES = ("ptq", "lora", "qat")
INTEGER_ROLES = ("weight", "weight_packed", "weight_shape", "weight_scale", "weight_zero_point")

# the worked example of format_spec/quantization.md: int4, asymmetric, per channel
EXAMPLE_W = torch.tensor(
    [
        [-2.5, -1.1, 0.0, 0.6, 1.3, 2.2, 3.9, 5.0],
        [0.1, 0.45, 0.8, 1.2, 0.3, 0.9, 1.875, 0.05],
    ]
)
EXAMPLE_Q = [[-8, -5, -3, -2, 0, 1, 5, 7], [-7, -4, -2, 2, -6, -1, 7, -8]]
EXAMPLE_SCALE = [[0.5], [0.125]]
EXAMPLE_ZP = [[-3], [-8]]
EXAMPLE_WORDS = [0xFD986530, 0x0F72A641]
EXAMPLE_ZP_WORD = 0x00000005
EXAMPLE_DEQ = [[-2.5, -1.0, 0.0, 0.5, 1.5, 2.0, 4.0, 5.0], [0.125, 0.5, 0.75, 1.25, 0.25, 0.875, 1.875, 0.0]]


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 13, bias=False))
    return nn.Sequential(nn.Embedding(13, 16), nn.Embedding(11, 24, padding_idx=0))


class Both(nn.Module):
    """An embedding feeding a linear layer, for the training tests."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 16)
        self.fc = nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids))


def run(model: nn.Module, kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    if kind == "linear":
        return model(torch.randn(3, 16, generator=gen))
    ids = torch.randint(0, 11, (2, 5), generator=gen)
    return torch.cat([model[0](ids), model[1](ids)], dim=-1)


def stored(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, list[int]]]:
    return {name: (DTYPE_NAMES[t.dtype], list(t.shape)) for name, t in state.items()}


def quantized_modules(model: nn.Module) -> list[tuple[str, QuantizedModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedModule)]


def expand(per_group: torch.Tensor, cols: int) -> torch.Tensor:
    return per_group.repeat_interleave(cols // per_group.shape[1], dim=1)


def reference_pack(row: list[int]) -> list[int]:
    """The spec's packing rule with Python integers: 8 codes per word, code + 8, lowest nibble first."""
    padded = row + [-8] * (-len(row) % 8)
    words = []
    for k in range(0, len(padded), 8):
        word = sum((padded[k + i] + 8) << (4 * i) for i in range(8))
        words.append(word - (1 << 32) if word >= 1 << 31 else word)
    return words


# -- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["linear", "embedding"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_state_dict_round_trip_into_fresh_float_model(tmp_path, scheme, kind, mode):
    model = quantize(make_model(kind), **scheme, mode=mode)
    with torch.no_grad():  # make the trainable state non-trivial before saving
        for _, m in quantized_modules(model):
            if mode == "lora":
                m.lora_B.normal_()
            if mode == "qat":
                m.weight_master.add_(0.01 * torch.randn_like(m.weight_master))
    metadata = quantization_metadata(model)
    state = model.state_dict()
    Draft202012Validator(SCHEMA).validate(metadata)
    check_metadata(metadata, stored(state))
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")

    fresh = make_model(kind, seed=1)
    apply_quantization(fresh, metadata)
    fresh.load_state_dict(safetensors.torch.load_file(tmp_path / "model.safetensors"))

    restored = fresh.state_dict()
    assert restored.keys() == state.keys()
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype, name
        assert torch.equal(restored[name], tensor), name
    assert torch.equal(run(fresh, kind), run(model, kind))
    assert quantization_metadata(fresh) == metadata


@pytest.mark.parametrize("kind", ["linear", "embedding"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_dequantized_weight_within_half_a_step(scheme, kind):
    original = make_model(kind)
    model = quantize(copy.deepcopy(original), **scheme)
    floats = dict(original.named_modules())
    for name, module in quantized_modules(model):
        w = floats[name].weight.detach()
        q, scale, zero_point = module.codes()
        qmin, qmax = INT_RANGES[scheme["bits"]]
        assert q.dtype == torch.int8 and int(q.min()) >= qmin and int(q.max()) <= qmax
        bound = expand(scale, w.shape[1]) / 2 * (1 + 1e-5) + 1e-7
        assert bool(((w - module.dequantized_weight()).abs() <= bound).all()), name
        expected_scale_shape = (w.shape[0], w.shape[1] // (scheme["group_size"] or w.shape[1]))
        assert tuple(scale.shape) == expected_scale_shape
        assert (zero_point is None) == scheme["symmetric"]


def test_outputs_are_deterministic_and_match_dequantized_float_math():
    model = quantize(make_model("linear"), bits=4, symmetric=False, group_size=8)
    x = torch.randn(4, 16)
    first, second = model[0], model[2]
    expected = torch.nn.functional.linear(
        torch.relu(torch.nn.functional.linear(x, first.dequantized_weight(), first.bias)),
        second.dequantized_weight(),
    )
    assert torch.equal(model(x), expected)
    assert torch.equal(model(x), model(x))


def test_bfloat16_model_round_trip():
    model = quantize(make_model("linear").to(torch.bfloat16), bits=4, symmetric=False)
    metadata = quantization_metadata(model)
    assert metadata["compute_dtype"] == "bfloat16"
    assert metadata["modules"][0]["tensors"]["weight_scale"]["dtype"] == "BF16"
    fresh = apply_quantization(make_model("linear", seed=3), metadata)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), model(x))


def test_4bit_rows_not_a_multiple_of_8_columns_pad_the_last_word():
    model = quantize(nn.Sequential(nn.Linear(13, 5)), bits=4, symmetric=False)
    layer = model[0]
    assert layer.weight_packed.shape == (5, 2)
    assert layer.weight_zero_point.shape == (1, 1)
    assert layer.weight_shape.tolist() == [5, 13]
    q, _, zero_point = layer.codes()
    assert layer.weight_packed.tolist() == [reference_pack(row) for row in q.tolist()]
    assert layer.weight_zero_point.tolist() == [reference_pack(zero_point.T.tolist()[0])]


# -- packing and the worked example -------------------------------------------------------------------


def test_worked_example_of_the_spec():
    scale, zero_point = compute_qparams(EXAMPLE_W, bits=4, symmetric=False, group_size=None, scale_dtype=torch.float32)
    q = quantize_values(EXAMPLE_W, scale, zero_point, bits=4)
    assert q.tolist() == EXAMPLE_Q
    assert scale.tolist() == EXAMPLE_SCALE
    assert zero_point.tolist() == EXAMPLE_ZP
    words = pack_int32(q, 4)
    assert words.dtype == torch.int32
    assert [int(w) & 0xFFFFFFFF for w in words.flatten()] == EXAMPLE_WORDS
    assert words.flatten().tolist() == [reference_pack(row)[0] for row in EXAMPLE_Q]
    packed_zp = pack_zero_point(zero_point, 4)
    assert packed_zp.shape == (1, 1) and int(packed_zp) == EXAMPLE_ZP_WORD
    assert torch.equal(unpack_int32(words, 4, 8), q)
    assert unpack_zero_point(packed_zp, 4, 2).tolist() == EXAMPLE_ZP
    assert dequantize_values(q, scale, zero_point, torch.float32).tolist() == EXAMPLE_DEQ
    # the spec states the same numbers
    for word in [*EXAMPLE_WORDS, EXAMPLE_ZP_WORD]:
        assert f"0x{word:08X}" in SPEC
    for row in EXAMPLE_Q:
        assert str(row) in SPEC


@pytest.mark.parametrize("symmetric", [True, False])
def test_scales_are_correctly_rounded_quotients(symmetric):
    # the spec fixes s = span / (qmax or qmax - qmin) in float32; a quotient rounded from float64 is the
    # correctly rounded float32 one, so any conforming implementation (CPU or GPU) gets these bits
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    scale, _ = compute_qparams(weight, bits=8, symmetric=symmetric, group_size=8, scale_dtype=torch.float32)
    grouped = weight.reshape(64, 4, 8)
    low, high = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    span = torch.maximum(-low, high) if symmetric else high - low
    divisor = 127 if symmetric else 255
    expected = torch.tensor([[float(v) / divisor for v in row] for row in span.tolist()], dtype=torch.float32)
    assert torch.equal(scale, expected)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([4, 8]),
    rows=st.integers(1, 4),
    length=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, rows, length, seed):
    qmin, qmax = INT_RANGES[bits]
    q = torch.randint(qmin, qmax + 1, (rows, length), generator=torch.Generator().manual_seed(seed)).to(torch.int8)
    packed = pack_int32(q, bits)
    assert packed.shape == (rows, -(-length // (32 // bits)))
    assert torch.equal(unpack_int32(packed, bits, length), q)
    if bits == 4:
        assert packed.tolist() == [reference_pack(row) for row in q.tolist()]
    assert torch.equal(unpack_zero_point(pack_zero_point(q.T.contiguous(), bits), bits, length), q.T)


def test_pack_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match=r"codes must lie in \[-8, 7\] for 4 bits"):
        pack_int32(torch.tensor([[8]], dtype=torch.int8), 4)


@pytest.mark.parametrize(("bits", "role", "ratio"), [(8, "weight", 4), (4, "weight_packed", 8)])
def test_storage_is_a_quarter_or_an_eighth_of_fp32(bits, role, ratio):
    original = nn.Sequential(nn.Linear(64, 32))
    fp32_bytes = original[0].weight.nelement() * original[0].weight.element_size()
    model = quantize(original, bits=bits)
    tensor = model.state_dict()[f"0.{role}"]
    assert tensor.nelement() * tensor.element_size() * ratio == fp32_bytes


# -- lora ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_lora_training_lowers_the_loss_and_keeps_integer_tensors_byte_identical(scheme):
    torch.manual_seed(0)
    original = Both()
    ptq = quantize(copy.deepcopy(original), **scheme)
    model = quantize(copy.deepcopy(original), **scheme, mode="lora", lora_rank=4, lora_alpha=8)
    ids = torch.randint(0, 13, (16, 6))
    target = torch.randn(16, 6, 8)
    assert torch.equal(model(ids), ptq(ids))  # B is zero: quantizing for lora changes nothing yet

    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[1] in INTEGER_ROLES}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["emb.lora_A", "emb.lora_B", "fc.bias", "fc.lora_A", "fc.lora_B"]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(ids), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    after = model.state_dict()
    for name, tensor in frozen.items():
        assert after[name].dtype == tensor.dtype
        assert after[name].numpy().tobytes() == tensor.numpy().tobytes(), name


def test_lora_adapter_init_follows_the_global_rng():
    def adapters(seed: int) -> nn.Module:
        model = make_model("linear")
        torch.manual_seed(seed)
        return quantize(model, mode="lora", lora_rank=2)[0]

    first, again, other = adapters(5), adapters(5), adapters(6)
    assert torch.equal(first.lora_A, again.lora_A)
    assert not torch.equal(first.lora_A, other.lora_A)
    assert first.lora_A.shape == (2, 16) and first.lora_B.shape == (24, 2)
    assert not torch.any(first.lora_B)
    bound = 1 / 16**0.5  # kaiming-uniform with a=sqrt(5) over fan_in 16, as nn.Linear initialises
    assert bool((first.lora_A.abs() <= bound).all())


def test_lora_embedding_adapter_is_rows_of_b_times_a():
    model = quantize(nn.Sequential(nn.Embedding(6, 8)), mode="lora", lora_rank=2, lora_alpha=4)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    ids = torch.tensor([[0, 5, 3]])
    merged = layer.dequantized_weight() + (layer.lora_B @ layer.lora_A) * 2.0
    torch.testing.assert_close(model(ids), merged[ids], rtol=0, atol=1e-6)


# -- qat ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_qat_forward_weights_are_on_the_grid_at_every_step(scheme):
    torch.manual_seed(0)
    model = quantize(Both(), **scheme, mode="qat")
    ids = torch.randint(0, 13, (16, 6))
    target = torch.randn(16, 6, 8)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    qmin, qmax = INT_RANGES[scheme["bits"]]
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        used = {name: m.dequantized_weight() for name, m in quantized_modules(model)}
        loss = torch.nn.functional.mse_loss(model(ids), target)
        loss.backward()
        losses.append(loss.item())
        state = model.state_dict()  # refreshes the integer tensors from the master weights
        for name, module in quantized_modules(model):
            q, scale, zero_point = module.codes()
            assert q.dtype == torch.int8 and int(q.min()) >= qmin and int(q.max()) <= qmax
            codes = q.to(torch.int32) - (0 if zero_point is None else expand(zero_point, q.shape[1]))
            assert torch.equal(used[name].detach(), codes.to(torch.float32) * expand(scale, q.shape[1]))
            assert torch.equal(state[f"{name}.weight_scale"], scale)
            assert module.weight_master.grad is not None and bool(module.weight_master.grad.any())
        optimizer.step()
    assert losses[-1] < losses[0]


def test_qat_state_dict_matches_the_master_even_without_a_forward():
    model = quantize(make_model("linear"), bits=4, symmetric=False, group_size=8, mode="qat")
    layer = model[0]
    with torch.no_grad():
        layer.weight_master.mul_(3.0)
    state = model.state_dict()
    reference = quantize(nn.Sequential(nn.Linear(16, 24)), bits=4, symmetric=False, group_size=8)
    with torch.no_grad():
        reference[0].quantize_from(layer.weight_master)
    for role in ("weight_packed", "weight_scale", "weight_zero_point"):
        assert torch.equal(state[f"0.{role}"], getattr(reference[0], role))


# -- metadata, summary, schema ------------------------------------------------------------------------


def test_metadata_document_for_a_lora_model():
    model = quantize(make_model("linear"), bits=4, group_size=8, mode="lora", lora_rank=4, ignore=("2",))
    metadata = quantization_metadata(model)
    assert {k: v for k, v in metadata.items() if k != "modules"} == {
        "format_version": 1,
        "method": "portable-ckpt-rtn",
        "mode": "lora",
        "bits": 4,
        "symmetric": True,
        "granularity": "group",
        "group_size": 8,
        "packing": "int4-in-int32-lsb-first",
        "compute_dtype": "float32",
        "lora": {"rank": 4, "alpha": 16},
        "ignored_modules": ["2"],
    }
    assert metadata["modules"] == [
        {
            "name": "0",
            "kind": "linear",
            "shape": [24, 16],
            "tensors": {
                "weight_packed": {"name": "0.weight_packed", "dtype": "I32", "shape": [24, 2]},
                "weight_shape": {"name": "0.weight_shape", "dtype": "I64", "shape": [2]},
                "weight_scale": {"name": "0.weight_scale", "dtype": "F32", "shape": [24, 2]},
                "lora_A": {"name": "0.lora_A", "dtype": "F32", "shape": [4, 16]},
                "lora_B": {"name": "0.lora_B", "dtype": "F32", "shape": [24, 4]},
                "bias": {"name": "0.bias", "dtype": "F32", "shape": [24]},
            },
        }
    ]
    assert isinstance(model[2], nn.Linear) and is_quantized(model)
    assert quantization_metadata(make_model("linear")) is None
    assert not is_quantized(make_model("linear"))


def test_manifest_summary():
    metadata = quantization_metadata(quantize(make_model("linear"), bits=8, symmetric=False))
    assert manifest_summary(metadata) == {
        "mode": "ptq",
        "bits": 8,
        "symmetric": False,
        "granularity": "channel",
        "group_size": None,
        "metadata_file": "quantization_metadata.json",
    }


def test_schema_is_valid_and_rejects_bad_documents():
    Draft202012Validator.check_schema(SCHEMA)
    validator = Draft202012Validator(SCHEMA)
    good = quantization_metadata(quantize(make_model("embedding"), bits=8, group_size=8, mode="qat"))
    validator.validate(good)
    bad_documents = {
        "packing of the other width": {"packing": "int4-in-int32-lsb-first"},
        "group granularity without a size": {"group_size": None},
        "channel granularity with a size": {"granularity": "channel"},
        "lora settings outside lora mode": {"lora": {"rank": 2, "alpha": 4}},
        "unknown field": {"extra": 1},
        "bits out of range": {"bits": 3},
        "unknown dtype": {
            "modules": [
                {
                    **good["modules"][0],
                    "tensors": {"weight": {"name": "0.weight", "dtype": "F64", "shape": [2]}},
                }
            ]
        },
        "bad module name": {"ignored_modules": [".x"]},
    }
    for why, change in bad_documents.items():
        assert not validator.is_valid({**good, **change}), why


def test_spec_examples_validate_against_schema_and_check():
    blocks = re.findall(r"```json\n(.*?)```", SPEC, flags=re.S)
    assert blocks
    for block in blocks:
        doc = json.loads(block)
        Draft202012Validator(SCHEMA).validate(doc)
        tensors = {t["name"]: (t["dtype"], t["shape"]) for m in doc["modules"] for t in m["tensors"].values()}
        check_metadata(doc, tensors)


def test_code_writes_only_schema_dtypes_and_roles():
    tensor_def = SCHEMA["$defs"]["tensor"]["properties"]
    roles = set(SCHEMA["$defs"]["module"]["properties"]["tensors"]["propertyNames"]["enum"])
    for scheme, mode in itertools.product(SCHEMES, MODES):
        metadata = quantization_metadata(quantize(Both(), **scheme, mode=mode))
        for module in metadata["modules"]:
            assert set(module["tensors"]) <= roles
            assert {t["dtype"] for t in module["tensors"].values()} <= set(tensor_def["dtype"]["enum"])


# -- check_metadata errors ----------------------------------------------------------------------------


@pytest.fixture
def saved() -> tuple[dict, dict]:
    model = quantize(make_model("linear"), bits=8, symmetric=False)
    return quantization_metadata(model), stored(model.state_dict())


def _module(metadata: dict, index: int = 0) -> dict:
    return metadata["modules"][index]


def test_check_metadata_accepts_what_was_written(saved):
    check_metadata(*saved)


def test_check_metadata_missing_scale(saved):
    metadata, tensors = saved
    del _module(metadata)["tensors"]["weight_scale"]
    with pytest.raises(QuantizationMetadataError) as err:
        check_metadata(metadata, tensors)
    assert str(err.value) == 'quantization_metadata.json: module "0": missing tensor weight_scale'


def test_check_metadata_scale_not_stored(saved):
    metadata, tensors = saved
    del tensors["0.weight_scale"]
    with pytest.raises(QuantizationMetadataError) as err:
        check_metadata(metadata, tensors, filename="ckpt/quantization_metadata.json")
    assert str(err.value) == (
        'ckpt/quantization_metadata.json: module "0": weight_scale: tensor "0.weight_scale" is not in the model file'
    )


def test_check_metadata_wrong_scale_shape(saved):
    metadata, tensors = saved
    _module(metadata)["tensors"]["weight_scale"]["shape"] = [24, 2]
    with pytest.raises(QuantizationMetadataError) as err:
        check_metadata(metadata, tensors)
    assert str(err.value) == (
        'quantization_metadata.json: module "0": weight_scale has shape [24, 2], expected [24, 1] (per-channel)'
    )


def test_check_metadata_stored_tensor_disagrees_with_listing(saved):
    metadata, tensors = saved
    tensors["2.weight"] = ("I32", [13, 24])
    with pytest.raises(QuantizationMetadataError) as err:
        check_metadata(metadata, tensors)
    assert str(err.value) == (
        'quantization_metadata.json: module "2": weight: tensor "2.weight" is stored as I32 [13, 24], '
        "listed as I8 [13, 24]"
    )


def test_check_metadata_bits_out_of_range(saved):
    metadata, tensors = saved
    metadata["bits"] = 3
    with pytest.raises(QuantizationMetadataError) as err:
        check_metadata(metadata, tensors)
    assert str(err.value) == "quantization_metadata.json: bits is 3, expected one of [4, 8]"


def test_check_metadata_unknown_packing(saved):
    metadata, tensors = saved
    metadata["packing"] = "int4-msb-first"
    with pytest.raises(QuantizationMetadataError) as err:
        check_metadata(metadata, tensors)
    assert str(err.value) == (
        'quantization_metadata.json: unknown packing "int4-msb-first"; known: int4-in-int32-lsb-first, int8'
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"packing": "int4-in-int32-lsb-first"},
            'packing "int4-in-int32-lsb-first" stores 4-bit codes but bits is 8',
        ),
        ({"granularity": "group"}, 'granularity "group" does not match group_size None'),
        ({"lora": {"rank": 2, "alpha": 2}}, 'mode "ptq" with lora'),
        ({"ignored_modules": ["0"]}, "modules listed twice or both quantized and ignored: ['0']"),
    ],
)
def test_check_metadata_inconsistent_fields(saved, change, message):
    metadata, tensors = saved
    with pytest.raises(QuantizationMetadataError, match=re.escape(message)):
        check_metadata({**metadata, **change}, tensors)


def test_check_metadata_wrong_dtype_and_unexpected_role(saved):
    metadata, tensors = saved
    _module(metadata)["tensors"]["weight"]["dtype"] = "I32"
    with pytest.raises(QuantizationMetadataError, match=r'module "0": weight has dtype I32, expected I8$'):
        check_metadata(metadata, tensors)
    _module(metadata)["tensors"]["weight"]["dtype"] = "I8"
    _module(metadata)["tensors"]["lora_A"] = {"name": "0.lora_A", "dtype": "F32", "shape": [8, 16]}
    with pytest.raises(QuantizationMetadataError, match=r'module "0": unexpected tensor lora_A for this scheme$'):
        check_metadata(metadata, tensors)


def test_check_metadata_newer_version(saved):
    metadata, tensors = saved
    with pytest.raises(UnsupportedFormatVersionError, match="format_version 2 is newer"):
        check_metadata({**metadata, "format_version": 2}, tensors)


# -- apply_quantization -------------------------------------------------------------------------------


def test_apply_quantization_lists_every_mismatch():
    metadata = quantization_metadata(quantize(make_model("linear"), bits=4))
    wrong = nn.Sequential(nn.Linear(16, 20), nn.ReLU())
    with pytest.raises(StateMismatchError) as err:
        apply_quantization(wrong, metadata)
    assert str(err.value) == (
        "model does not match quantization_metadata.json: "
        'module "0": expected linear [24, 16] with bias, found linear [20, 16] with bias; '
        'module "2": not found in the model'
    )
    other_kind = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Embedding(13, 24))
    with pytest.raises(
        StateMismatchError,
        match=r'module "2": expected linear \[13, 24\] without bias, found'
        r" embedding \[13, 24\]$",
    ):
        apply_quantization(other_kind, metadata)


def test_apply_quantization_is_a_no_op_on_a_model_quantized_the_same_way():
    model = quantize(make_model("linear"), bits=4)
    layers = [model[0], model[2]]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    apply_quantization(model, quantization_metadata(model))
    assert [model[0], model[2]] == layers
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    other = quantization_metadata(quantize(make_model("linear"), bits=8))
    with pytest.raises(StateMismatchError, match=r'module "0": already quantized another way \(24x16, int4'):
        apply_quantization(model, other)


def test_apply_quantization_draws_no_random_numbers():
    metadata = quantization_metadata(quantize(make_model("linear"), mode="lora"))
    fresh = make_model("linear", seed=2)
    rng = torch.get_rng_state()
    apply_quantization(fresh, metadata)
    assert torch.equal(torch.get_rng_state(), rng)


# -- quantize() misuse --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 3}, "quantize: bits=3: use one of [4, 8]"),
        ({"mode": "int8"}, "quantize: mode='int8': use one of ['lora', 'ptq', 'qat']"),
        ({"group_size": 0}, "quantize: group_size=0: use None (per channel) or a positive int"),
        ({"mode": "lora", "lora_rank": 0}, "quantize: lora_rank=0: use a positive int"),
        ({"group_size": 5}, 'quantize: module "0": group_size 5 does not divide its 16 input columns'),
        ({"ignore": ("nope",)}, "quantize: ignore names ['nope'] are not modules of the model"),
        ({"targets": (nn.Conv1d,)}, "quantize: targets"),
    ],
)
def test_quantize_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError) as err:
        quantize(make_model("linear"), **kwargs)
    assert str(err.value).startswith(message)


def test_quantize_refuses_twice_tied_weights_and_the_root():
    model = quantize(make_model("linear"))
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model)
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match=r"modules \['0', '1'\] share one weight"):
        quantize(tied)
    with pytest.raises(ValueError, match="the model itself cannot be replaced"):
        quantize(nn.Linear(4, 4))


def test_ignore_keeps_a_subtree_in_float():
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), nn.Linear(8, 8))
    quantize(model, ignore=("0",))
    assert [type(m).__name__ for m in (model[0][0], model[0][1], model[1])] == [
        "Linear",
        "Linear",
        "QuantLinear",
    ]
    assert quantization_metadata(model)["ignored_modules"] == ["0.0", "0.1"]
