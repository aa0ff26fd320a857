"""The corruption sweep: every file of a checkpoint, the manifest included, damaged in every way of the
catalog in ``faults/corruption.py`` (truncations, byte flips, deletion, invalid JSON, schema violations,
wrong types, hostile safetensors headers, hostile pickles, symlinks).

Each case is tried as damaged and, when the damage is structural, again with every size and checksum
recomputed the way an attacker would; each variant is loaded with verify=True (must raise
CheckpointCorruptedError or CheckpointNotFoundError naming the file), with verify=False (must raise a
CheckpointError, or load a value only checksums could tell from the original) and run through
``portable-ckpt validate`` (must exit 1).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import faults
import pytest

import portable_ckpt as pc
from portable_ckpt import cli

PLAIN = faults.corruption_cases(["emb.weight"])
QUANTIZED = faults.corruption_cases(quantized=True)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """Undamaged checkpoints of step 3: {quantized: directory}."""
    base = tmp_path_factory.mktemp("pristine")
    plain = faults.save_step(base / "plain", 3)
    quantized = pc.save_checkpoint(faults.quantized_model(), None, {"bits": 8}, faults.VOCAB, 3, base / "quantized")
    return {False: plain, True: quantized}


def test_pristine_checkpoints_load_and_validate(pristine: dict[bool, Path]) -> None:
    """The sweep starts from checkpoints that are valid; otherwise every refusal below proves nothing."""
    step, problems = faults.load_values(pristine[False])
    assert (step, problems) == (3, [])
    ckpt = pc.load_checkpoint(pristine[True], restore_rng=False)
    assert ckpt.quantization is not None and ckpt.quantization["bits"] == 8
    for path in pristine.values():
        out = io.StringIO()
        assert cli.main(["validate", str(path)], out=out, err=io.StringIO()) == 0, out.getvalue()


def test_the_sweep_covers_every_file(pristine: dict[bool, Path]) -> None:
    plain_files = {*faults.read_manifest(pristine[False])["files"], "manifest.json"}
    assert {c.file for c in PLAIN} == plain_files
    assert faults.QUANT_FILE in faults.read_manifest(pristine[True])["files"]
    assert {c.file for c in QUANTIZED} == {faults.QUANT_FILE}


def test_the_attacker_variant_is_consistent(pristine: dict[bool, Path], tmp_path: Path) -> None:
    """Recomputing the checksums of an undamaged checkpoint changes nothing: the attacker's tools are right."""
    copy = tmp_path / pristine[False].name
    shutil.copytree(pristine[False], copy)
    before = (copy / "manifest.json").read_bytes()
    faults.recompute(copy)
    assert (copy / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("case", PLAIN + QUANTIZED, ids=lambda c: c.id)
def test_damage_is_refused(case: faults.Case, pristine: dict[bool, Path], tmp_path: Path) -> None:
    outcomes = faults.run_case(case, pristine[case.quantized], tmp_path)
    assert any(o.variant.endswith("verify=True") and o.result == "refused" for o in outcomes)
    failures = [f"{o.variant}: {o.result}: {o.detail}" for o in outcomes if not o.ok]
    assert not failures, "\n".join(failures)


def test_a_flipped_data_byte_loads_the_flipped_value_without_verify(pristine: dict[bool, Path], tmp_path: Path) -> None:
    """verify=False skips only the checksums: the damage shows up in the values, and verify=True refuses."""
    copy = tmp_path / pristine[False].name
    shutil.copytree(pristine[False], copy)
    blob = bytearray((copy / "model.safetensors").read_bytes())
    header, data = faults.st_split(bytes(blob))
    begin = len(blob) - len(data) + header["lin.bias"]["data_offsets"][0]
    blob[begin + 3] ^= 0x80  # the sign bit of lin.bias[0] (float32, little-endian)
    (copy / "model.safetensors").write_bytes(bytes(blob))
    ckpt = pc.load_checkpoint(copy, verify=False, restore_rng=False)
    assert ckpt.model_state["lin.bias"].tolist() == [-3.0, 3.0, 3.0]
    with pytest.raises(pc.CheckpointCorruptedError, match=r"model\.safetensors: checksum mismatch"):
        pc.load_checkpoint(copy, restore_rng=False)
