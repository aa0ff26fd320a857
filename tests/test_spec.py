"""The specification, the schemas, the code and the vectors agree.

(a) every ```json example in format_spec/*.md validates, with the independent check-jsonschema CLI,
against the schema its ``<!-- schema: NAME -->`` comment names; (b) the spec's tables and limits match the
code; (c) ``spec_reader``, written only from the spec, reads what ``save_checkpoint`` writes exactly as
``load_checkpoint`` does; (d) our safetensors files are byte-identical to the reference library's.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import spec_reader
import torch
import xxhash
from conftest import TinyLM, train_some
from safetensors import safe_open
from safetensors.torch import save as reference_save

from portable_ckpt import (
    CheckpointCorruptedError,
    StateMismatchError,
    load_checkpoint,
    prepare_model,
    quantize,
    save_checkpoint,
)
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import manifest as _manifest
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.format import schemas as _schemas
from portable_ckpt.storage import local as _layout

ROOT = Path(__file__).resolve().parent.parent
SPEC_DIR = ROOT / "format_spec"
SPEC = (SPEC_DIR / "README.md").read_text(encoding="utf-8")
VECTORS = SPEC_DIR / "vectors"
INDEX = json.loads((VECTORS / "index.json").read_text(encoding="utf-8"))
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"

_BLOCK = re.compile(r"```json\n(.*?)```", re.S)
_COMMENT = re.compile(r"<!--\s*schema:\s*([a-z_]+)\s*-->\s*$")


def json_examples() -> list[tuple[str, str | None, str]]:
    """(where, schema named by the comment before the block or None, block text) for every ```json block."""
    found = []
    for md in sorted(SPEC_DIR.glob("*.md")):
        text = md.read_text(encoding="utf-8")
        for m in _BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            comment = _COMMENT.search(text[: m.start()].rstrip())
            found.append((f"{md.name}:{line}", comment.group(1) if comment else None, m.group(1)))
    return found


EXAMPLES = json_examples()


def spec_manifest_example() -> dict[str, Any]:
    return next(json.loads(text) for _, schema, text in EXAMPLES if schema == "manifest")


def spec_python_block(section: str) -> str:
    """The first ```python block of the spec section whose heading starts with ``section``."""
    start = SPEC.index(f"\n## {section}")
    end = SPEC.index("\n## ", start + 1)
    return re.search(r"```python\n(.*?)```", SPEC[start:end], re.S).group(1)


# --------------------------------------------------------------------------------------------------
# (a) examples validate against their schemas, checked by an independent validator
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "schema", "text"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_json_example_validates_with_check_jsonschema(where: str, schema: str | None, text: str, tmp_path):
    assert schema is not None, f"{where}: a ```json example needs a <!-- schema: NAME --> comment before it"
    assert schema in _schemas.SCHEMA_FILES, f"{where}: unknown schema {schema!r}"
    instance = tmp_path / "example.json"
    instance.write_text(text, encoding="utf-8")
    schema_file = ROOT / "schemas" / _schemas.SCHEMA_FILES[schema]
    run = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--schemafile", str(schema_file), str(instance)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, f"{where}: {run.stdout}{run.stderr}"
    _schemas.validate(json.loads(text), schema, where)  # and the library's validator agrees


def test_spec_has_examples_of_every_format_1_schema():
    named = {schema for _, schema, _ in EXAMPLES}
    assert {"manifest", "rng", "vocab", "legacy_metadata"} <= named


def test_check_jsonschema_refuses_a_broken_manifest(tmp_path):
    bad = dict(spec_manifest_example(), files={"../escape.json": {"size": 1, "checksum": "0" * 32}})
    instance = tmp_path / "bad.json"
    instance.write_text(json.dumps(bad), encoding="utf-8")
    run = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--schemafile", str(ROOT / "schemas" / "manifest.schema.json"), str(instance)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 1


def test_manifest_example_is_the_manifest_of_valid_full_byte_for_byte():
    blocks = [text for _, schema, text in EXAMPLES if schema == "manifest"]
    stored = (VECTORS / "valid-full" / "manifest.json").read_bytes()
    assert blocks[0].encode("utf-8") == stored  # §7.1 shows the file exactly
    doc = json.loads(stored)
    assert all(json.loads(text) == doc for text in blocks[1:])  # the indented rendering: same content
    assert list(doc)[-1] == "manifest_checksum" and stored.endswith(b'"}\n')
    # §10, writer side: the canonical body with the checksum inserted last; the value is the body's checksum
    assert stored == spec_reader.manifest_bytes(doc) == _manifest.encode(doc)
    body = {k: v for k, v in doc.items() if k != "manifest_checksum"}
    assert doc["manifest_checksum"] == xxhash.xxh3_128_hexdigest(spec_reader.canonical(body))
    assert _manifest.seal(body) == doc
    assert spec_reader.read_manifest(VECTORS / "valid-full") == doc
    assert re.search(rf"one line of\s+{len(stored) - 1} bytes, then a line feed", SPEC)
    quoted = re.findall(r'"manifest_checksum": ?"([0-9a-f]{32})"', SPEC)  # §7.1, §9 and §10 quote the vector's
    assert len(quoted) >= 3 and set(quoted) == {doc["manifest_checksum"]}


def test_the_indented_rendering_is_refused_as_the_spec_says(tmp_path):
    indented = [text for _, schema, text in EXAMPLES if schema == "manifest"][1]
    path = tmp_path / "valid-full"
    shutil.copytree(VECTORS / "valid-full", path)
    (path / "manifest.json").write_text(indented, encoding="utf-8")
    with pytest.raises(CheckpointCorruptedError, match="must end with"):
        load_checkpoint(path, restore_rng=False)
    with pytest.raises(spec_reader.SpecError, match="does not end with"):
        spec_reader.read_manifest(path)


def test_the_python_of_section_10_writes_and_checks_manifests():
    code = spec_python_block("10.")
    namespace: dict[str, Any] = {}
    exec(compile(code, "format_spec/README.md §10", "exec"), namespace)  # our own spec's example
    write, check = namespace["manifest_bytes"], namespace["manifest_checksum_ok"]
    refused = {"invalid-flipped-manifest-byte", "invalid-manifest-checksum-not-last"}
    checked = set()
    for entry in INDEX:
        for path in sorted((VECTORS / entry["name"]).rglob("manifest.json")):
            data = path.read_bytes()
            try:
                doc = spec_reader.strict_json(data)
            except spec_reader.SpecError:
                continue  # not JSON by §17: refused before any checksum
            if entry["valid"]:
                assert write(doc) == data, path
            assert check(data, doc) is (entry["name"] not in refused), path
            checked.add(entry["name"])
    assert refused <= checked and "valid-full" in checked


def test_the_quantized_resume_of_section_12_3_runs(tmp_path):
    def build_float_model() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))

    torch.manual_seed(0)
    trained = quantize(build_float_model(), bits=8, mode="lora", lora_rank=2)
    opt = torch.optim.AdamW(p for p in trained.parameters() if p.requires_grad)
    trained(torch.randn(3, 16)).square().sum().backward()
    opt.step()
    path = save_checkpoint(trained, opt, {}, None, 1, tmp_path)

    code = re.search(r"```python\n(.*?)```", SPEC[SPEC.index('<a id="prepare-model">') :], re.S).group(1)
    namespace = {"build_float_model": build_float_model, "path": path, "torch": torch}
    namespace.update(prepare_model=prepare_model, load_checkpoint=load_checkpoint)
    exec(compile(code, "format_spec/README.md §12.3", "exec"), namespace)  # our own spec's example
    model, optimizer = namespace["model"], namespace["optimizer"]
    assert_same_state(dict(model.state_dict()), dict(trained.state_dict()))
    restored, saved = optimizer.state_dict()["state"], opt.state_dict()["state"]
    assert restored.keys() == saved.keys() and len(saved) > 0
    assert all(torch.equal(restored[k]["exp_avg"], saved[k]["exp_avg"]) for k in saved)
    own = {id(q) for q in model.parameters()}
    assert all(id(p) in own for g in optimizer.param_groups for p in g["params"])

    # the optimizer built before the conversion holds the float model's parameters: refused, as §12.3 says
    early = build_float_model()
    with pytest.raises(StateMismatchError, match="prepare_model"):
        load_checkpoint(path, early, torch.optim.AdamW(early.parameters()))


# --------------------------------------------------------------------------------------------------
# (b) the spec's tables and limits are the code's
# --------------------------------------------------------------------------------------------------

_DTYPE_ROW = re.compile(r"^\| (\d+) \| `([A-Z0-9_]+)` \| `torch\.(\w+)` \| (\d+) \|", re.M)


def test_dtype_table_matches_the_code():
    rows = {name: (int(rank), getattr(torch, dtype), int(size)) for rank, name, dtype, size in _DTYPE_ROW.findall(SPEC)}
    assert set(rows) == set(_safetensors.DTYPES), "every dtype the code writes is in the spec's table"
    for rank, (name, dtype) in enumerate(_safetensors.DTYPES.items()):
        assert rows[name] == (rank, dtype, _safetensors.ITEMSIZE[name])
    assert rows == spec_reader.DTYPES


def test_checksum_vectors_in_the_spec():
    rows = re.findall(r'^\| `b"([^"]*)"`[^|]*\| `([0-9a-f]{32})` \|', SPEC, re.M)
    assert len(rows) >= 2
    for text, digest in rows:
        assert xxhash.xxh3_128_hexdigest(text.encode()) == digest
        assert xxhash.xxh3_128(text.encode()).digest().hex() == digest  # canonical big-endian bytes


def test_limits_and_names_in_the_spec_are_the_code_and_schema():
    assert f"{_safetensors.MAX_HEADER_BYTES:,}" in SPEC
    assert _jsonio.MAX_JSON_BYTES == 64 * 1024 * 1024 and "64 MiB (67,108,864 bytes)" in SPEC
    pattern = _schemas.schema("manifest")["$defs"]["file_name"]["pattern"]
    assert f"`{pattern}`" in SPEC
    assert pattern.strip("^$") == spec_reader.FILE_NAME.pattern == _manifest.FILE_NAME.pattern
    assert spec_reader.STEP_DIR.pattern == _layout.STEP_DIR.pattern.replace("(", "").replace(")", "")
    assert f"`{spec_reader.STEP_DIR.pattern}`" in SPEC
    assert spec_reader.TRAILER.pattern == _manifest._TRAILER.pattern
    assert _schemas.schema("manifest")["properties"]["files"]["maxProperties"] == 64


def test_pickle_files_have_no_zip_crc_as_the_spec_says():
    assert "`torch.utils.serialization.config.save.compute_crc32 = False`" in SPEC
    for name in ("optimizer.pt", "scheduler.pt"):
        with zipfile.ZipFile(VECTORS / "valid-full" / name) as z:
            assert {info.CRC for info in z.infolist()} == {0}, name


def test_spec_header_example_is_the_vector_file():
    data = (VECTORS / "valid-full" / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    text = data[8 : 8 + n].rstrip(b" ").decode()
    assert f"`{text}`" in SPEC
    assert f"N = {n}" in SPEC and f"the {len(text)}-byte JSON text" in SPEC and f"{len(data)} bytes long" in SPEC


def test_every_error_class_is_in_the_spec():
    import portable_ckpt

    errors = [n for n in portable_ckpt.__all__ if n.endswith("Error")]
    for name in errors:
        assert f"| `{name}` (`" in SPEC, name


def test_every_anchor_link_resolves():
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', SPEC))
    for target in re.findall(r"\]\(#([^)]+)\)", SPEC):
        assert target in anchors, target


# --------------------------------------------------------------------------------------------------
# (c) an independent reader written from the spec agrees with load_checkpoint
# --------------------------------------------------------------------------------------------------


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    out = {}
    for name, dtype in _safetensors.DTYPES.items():
        x = torch.randn(3, 2, generator=g) * 20
        out[f"d.{name}"] = (
            (x > 0)
            if dtype == torch.bool
            else (x if dtype.is_floating_point or dtype.is_complex else x.abs().to(torch.int64)).to(dtype)
        )
    out["zero_dim"] = torch.tensor(7, dtype=torch.int32)
    out["empty"] = torch.zeros(2, 0)
    out['ü\nname with "quotes"'] = torch.ones(2, dtype=torch.bfloat16)
    return out


def raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        assert raw(a[k]) == raw(b[k]), k


def test_spec_reader_agrees_with_load_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_some(model, optimizer)
    path = save_checkpoint(model, optimizer, {"lr": 1e-2}, ["a", "b"], 12, tmp_path, extra={"x": 1.5e-7})
    manifest, state = spec_reader.load(tmp_path)  # through the root and `latest`
    ckpt = load_checkpoint(path)
    assert manifest == ckpt.manifest and manifest["step"] == 12
    assert_same_state(state, ckpt.model_state)
    assert state["head.weight"] is state["emb.weight"]

    path = save_checkpoint(every_dtype(), None, {}, None, 13, tmp_path / "dtypes")
    assert_same_state(spec_reader.load(path)[1], load_checkpoint(path).model_state)


@pytest.mark.parametrize(
    "entry", [e for e in INDEX if e["valid"] and "legacy" not in e["name"]], ids=lambda e: e["name"]
)
def test_spec_reader_reads_the_valid_vectors(entry):
    manifest, state = spec_reader.load(VECTORS / entry["name"])
    assert manifest["step"] == entry["step"]
    assert_same_state(state, load_checkpoint(VECTORS / entry["name"], restore_rng=False).model_state)


# what spec_reader does not implement: pickles, quantization metadata, config.json, format 0
_OUT_OF_SCOPE = {
    "invalid-hostile-pickle",
    "invalid-legacy-hostile-pickle",
    "invalid-quantized-no-metadata",
    "invalid-config-not-object",
    "invalid-optimizer-not-a-dict",
    "invalid-optimizer-no-param-groups",
}


@pytest.mark.parametrize(
    "entry", [e for e in INDEX if not e["valid"] and e["name"] not in _OUT_OF_SCOPE], ids=lambda e: e["name"]
)
def test_spec_reader_refuses_the_invalid_vectors(entry):
    with pytest.raises(spec_reader.SpecError):
        spec_reader.load(VECTORS / entry["name"])


# --------------------------------------------------------------------------------------------------
# (d) byte identity with the reference safetensors library
# --------------------------------------------------------------------------------------------------


def test_model_file_is_byte_identical_to_the_reference_writer(tmp_path):
    tensors = every_dtype()
    path = save_checkpoint(tensors, None, {}, None, 1, tmp_path)
    ours = (path / "model.safetensors").read_bytes()
    assert ours == reference_save(tensors)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        for name in f.keys():  # noqa: SIM118 -- safe_open is not a mapping
            assert raw(f.get_tensor(name)) == raw(tensors[name]) and f.get_tensor(name).dtype == tensors[name].dtype


def test_reference_library_reads_every_valid_vector():
    files = [p for e in INDEX if e["valid"] for p in (VECTORS / e["name"]).rglob("*.safetensors")]
    assert files
    for p in files:
        data = p.read_bytes()
        with safe_open(str(p), framework="pt") as f:
            ours, _ = spec_reader.parse_safetensors(data)
            assert set(f.keys()) == set(ours)
            for name in f.keys():  # noqa: SIM118
                assert raw(f.get_tensor(name)) == raw(ours[name])
        if p.parent.name != "valid-legacy":
            assert reference_save(dict(ours)) == data  # and re-saving with the reference gives the same bytes
