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
    UnsupportedFormatVersionError,
    load_checkpoint,
    prepare_model,
    quantize,
    save_checkpoint,
)
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import manifest as _manifest
from portable_ckpt.format import names as _names
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.format import schemas as _schemas

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
    found = re.search(r"```python\n(.*?)```", SPEC[start:end], re.S)
    assert found is not None, section
    return found.group(1)


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
    assert spec_reader.STEP_DIR.pattern == _names.STEP_DIR.pattern.replace("(", "").replace(")", "")
    assert f"`{spec_reader.STEP_DIR.pattern}`" in SPEC
    assert spec_reader.TRAILER.pattern == _manifest._TRAILER.pattern
    by_version = {
        rule["if"]["properties"]["format_version"]["const"]: rule["then"]["properties"]["files"]
        for rule in _schemas.schema("manifest")["allOf"]
    }
    assert by_version[1]["maxProperties"] == 64 and by_version[1]["required"] == ["model.safetensors"]
    assert by_version[2]["maxProperties"] == 100_000 and by_version[2]["required"] == ["sharding.json"]
    assert by_version[3]["maxProperties"] == 100_000 and "required" not in by_version[3]  # parts: §21.1's rules
    assert "at most 64 (format_versions 2 and 3: at most 100,000)" in SPEC
    assert f"`{spec_reader.MODEL_PART.pattern}`" in SPEC
    assert spec_reader.MODEL_PART.pattern == _names.MODEL_PART.pattern


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


# what spec_reader does not implement: format 0
_OUT_OF_SCOPE = {"invalid-legacy-hostile-pickle"}


@pytest.mark.parametrize(
    "entry", [e for e in INDEX if not e["valid"] and e["name"] not in _OUT_OF_SCOPE], ids=lambda e: e["name"]
)
def test_spec_reader_refuses_the_invalid_vectors_with_the_listed_class(entry):
    """§18: the class is normative; a reader written from the spec alone raises the one index.json names."""
    with pytest.raises(spec_reader.SpecError) as info:
        spec_reader.load(VECTORS / entry["name"])
    assert info.value.error == entry["error"], str(info.value)


def test_spec_reader_reassembles_valid_sharded_as_load_checkpoint_does():
    """§20: the full tensors spec_reader rebuilds from the chunks are load_checkpoint's, bit for bit; so is the
    optimizer state in torch.optim's form (§20.3), and each tensor is its chunks read by the reference library."""
    path = VECTORS / "valid-sharded"
    manifest, sharded = spec_reader.load_sharded(path)
    ckpt = load_checkpoint(path, restore_rng=False)
    assert manifest == ckpt.manifest and manifest["format_version"] == 2 and ckpt.step == 9
    assert_same_state(sharded.model, ckpt.model_state)
    assert sharded.model.keys() == sharded.state["model"].keys()
    assert all(sharded.state["model"][k] is t for k, t in sharded.model.items())
    optimizer = spec_reader.optimizer_state_dict(sharded.state["optimizer"])
    assert optimizer["param_groups"] == ckpt.optimizer_state["param_groups"]
    assert optimizer["state"].keys() == ckpt.optimizer_state["state"].keys()
    for number, state in optimizer["state"].items():
        assert_same_state(state, ckpt.optimizer_state["state"][number])
    for name, entry in sharded.sharding["entries"].items():
        if "chunks" not in entry:
            continue
        full = sharded.tensors[name]
        assert (spec_reader._dtype_name(full), list(full.shape)) == (entry["dtype"], entry["shape"])
        for chunk in entry["chunks"]:
            with safe_open(str(path / chunk["file"]), framework="pt") as f:
                part = f.get_tensor(chunk["key"])
            region = tuple(slice(o, o + n) for o, n in zip(chunk["offsets"], chunk["sizes"], strict=True))
            assert raw(full[region]) == raw(part), (name, chunk)
    assert spec_reader.load(path)[1].keys() == sharded.model.keys()


def resealed_sharded(tmp_path: Path, sharding=None, manifest=None) -> Path:
    """A copy of valid-sharded with sharding.json and the manifest changed, every size and checksum recomputed
    (with spec_reader's §8 to §10, not the reference's)."""
    path = tmp_path / "sharded"
    shutil.copytree(VECTORS / "valid-sharded", path)
    doc = json.loads((path / "sharding.json").read_bytes())
    if sharding is not None:
        sharding(doc)
    data = spec_reader.canonical(doc)
    (path / "sharding.json").write_bytes(data)
    man = json.loads((path / "manifest.json").read_bytes())
    man["files"]["sharding.json"] = {"size": len(data), "checksum": spec_reader.xxh3(data)}
    if manifest is not None:
        manifest(man, path)
    (path / "manifest.json").write_bytes(spec_reader.manifest_bytes(man))
    return path


def _entries(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["entries"]


def _set_value(value: Any):
    return lambda doc: _entries(doc)["optimizer.param_groups.0.amsgrad"].update(value=value)


def _rewrite(name: str, data: bytes):
    def change(man: dict[str, Any], path: Path) -> None:
        (path / name).write_bytes(data)
        man["files"][name] = {"size": len(data), "checksum": spec_reader.xxh3(data)}

    return change


_RNG_NUMPY_NULL = b'{"numpy":null,"python":{"gauss_next":null,"version":3},"torch":{"cpu":true,"cuda_devices":0}}'
_EMB, _BIAS, _STEP = "model.emb.weight", "model.lin.bias", "optimizer.state.lin.bias.step"

# (what changes sharding.json, what changes the manifest and the files): each a single defect of §20
SHARDED_DEFECTS: dict[str, tuple[Any, Any]] = {
    "path-prefix": (lambda d: _entries(d).update(x={"path": ["model", "emb.weight", "x"], "value": 1}), None),
    "path-int-and-str": (
        lambda d: _entries(d).update(x={"path": ["optimizer", "param_groups", "x"], "value": 1}),
        None,
    ),
    "path-equal": (lambda d: _entries(d).update(x=dict(_entries(d)["optimizer.param_groups.0.lr"])), None),
    "same-file-and-key": (
        lambda d: _entries(d)["model.head.weight"].update(chunks=json.loads(json.dumps(_entries(d)[_EMB]["chunks"]))),
        None,
    ),
    "chunk-rank": (lambda d: _entries(d)[_EMB]["chunks"][0].update(offsets=[0]), None),
    "chunk-shape-not-stored": (
        lambda d: _entries(d)[_BIAS].update(
            chunks=[
                dict(_entries(d)[_BIAS]["chunks"][0], sizes=[3]),
                dict(_entries(d)[_BIAS]["chunks"][1], offsets=[3], sizes=[1]),
            ]
        ),
        None,
    ),
    "chunk-key-not-in-file": (lambda d: _entries(d)[_EMB]["chunks"][0].update(key="nope"), None),
    "zero-dim-twice": (
        lambda d: _entries(d)[_STEP]["chunks"].append(
            dict(_entries(d)[_STEP]["chunks"][0], key="optimizer.state.lin.weight.step")
        ),
        None,
    ),
    "value-dict-duplicate-key": (_set_value({"$dict": [[1, 2], [1, 3]]}), None),
    "value-dict-list-key": (_set_value({"$dict": [[[1], 2]]}), None),
    "value-float-spelling": (_set_value({"$float": "NaN"}), None),
    "value-typed-with-member": (_set_value({"$tuple": [], "x": 1}), None),
    "value-unknown-typed": (_set_value({"$foo": 1}), None),
    "rank-rng-of-another-world": (None, lambda m, p: _rank_file_of_another_world(m, p)),
    "sharding-unknown-member": (lambda d: d.update(ranks=2), None),
    "tensor-list-extra-name": (
        None,
        lambda m, p: m["files"]["model-00000-of-00002.safetensors"]["tensors"].update(bogus="0" * 32),
    ),
    "manifest-rng": (None, lambda m, p: m.update(rng=["numpy", "torch.cpu"])),
    "rank-rng-json-alone": (None, lambda m, p: m["files"].pop("rng-00001-of-00002.safetensors")),
    "rank-rng-disagrees-with-its-json": (None, _rewrite("rng-00001-of-00002.json", _RNG_NUMPY_NULL)),
    "alias-to-nothing": (None, lambda m, p: m.update(aliases={"tied.weight": "nothing"})),
    "quantization-in-version-2": (
        None,
        lambda m, p: m.update(quantization={"mode": "ptq", "bits": 8, "metadata_file": "quantization_metadata.json"}),
    ),
    "model-entry-not-a-tensor": (lambda d: _entries(d).update(x={"path": ["model", "x"], "value": 1}), None),
    "model-entry-path-of-three": (lambda d: _entries(d)[_BIAS].update(path=["model", "lin", "bias"]), None),
    "other-key-chunk-not-in-file": (
        lambda d: _entries(d).update(
            x={
                "path": ["x"],
                "dtype": "F32",
                "shape": [0, 4],
                "chunks": [
                    {"file": "model-00000-of-00002.safetensors", "key": "nope", "offsets": [0, 0], "sizes": [0, 4]}
                ],
            }
        ),
        None,
    ),
}


@pytest.mark.parametrize("case", list(SHARDED_DEFECTS))
def test_spec_reader_refuses_sharded_defects(case: str, tmp_path: Path):
    """§20.2's rules beyond the vectors, each a CheckpointCorruptedError."""
    path = resealed_sharded(tmp_path, *SHARDED_DEFECTS[case])
    with pytest.raises(spec_reader.SpecError) as info:
        spec_reader.load(path)
    assert info.value.error == "CheckpointCorruptedError", str(info.value)


@pytest.mark.parametrize("case", list(SHARDED_DEFECTS))
def test_load_checkpoint_refuses_sharded_defects_as_spec_reader_does(case: str, tmp_path: Path):
    path = resealed_sharded(tmp_path, *SHARDED_DEFECTS[case])
    with pytest.raises(CheckpointCorruptedError):
        load_checkpoint(path, restore_rng=False)


def test_a_newer_sharding_table_is_unsupported_for_both_readers(tmp_path: Path):
    path = resealed_sharded(tmp_path, lambda d: d.update(format_version=3), None)
    with pytest.raises(spec_reader.SpecError) as info:
        spec_reader.load(path)
    assert info.value.error == "UnsupportedFormatVersionError"
    with pytest.raises(UnsupportedFormatVersionError, match=r"sharding\.json: format_version 3 is newer"):
        load_checkpoint(path, restore_rng=False)


def _rank_file_of_another_world(man: dict[str, Any], path: Path) -> None:
    for suffix in ("json", "safetensors"):  # a whole, valid pair, named for rank 2 of 3 in a 2-rank checkpoint
        shutil.copy(path / f"rng-00001-of-00002.{suffix}", path / f"rng-00002-of-00003.{suffix}")
        man["files"][f"rng-00002-of-00003.{suffix}"] = man["files"][f"rng-00001-of-00002.{suffix}"]


def _drop_rank_rng(man: dict[str, Any], path: Path) -> None:
    for name in [n for n in man["files"] if n.startswith("rng-")]:
        del man["files"][name]
    man["rng"] = []


SHARDED_ACCEPTED: dict[str, tuple[Any, Any]] = {
    "shard-tensor-no-chunk-names": (lambda d: _entries(d).pop("model.head.weight"), None),
    "no-entries": (lambda d: d.update(entries={}), None),
    "entry-name-not-the-joined-path": (
        lambda d: _entries(d).update(whatever=_entries(d).pop("optimizer.param_groups.0.lr")),
        None,
    ),
    "value-forms": (
        _set_value({"a": [{"$tuple": []}], "b": {"$dict": [[{"$tuple": [1, None]}, {"$float": "-inf"}]]}}),
        None,
    ),
    "no-rank-rng-files": (None, _drop_rank_rng),
    "unknown-listed-file": (None, _rewrite("notes.txt", b"hello")),
}


@pytest.mark.parametrize("case", list(SHARDED_ACCEPTED))
def test_spec_reader_and_load_checkpoint_accept_sharded_variants(case: str, tmp_path: Path):
    path = resealed_sharded(tmp_path, *SHARDED_ACCEPTED[case])
    manifest, state = spec_reader.load(path)
    assert manifest["step"] == 9
    assert_same_state(state, load_checkpoint(path, restore_rng=False).model_state)


def test_spec_reader_decodes_sharded_values():
    """§20.2: values in the typed encoding of states.json (§4), decoded; §20.3: the nested state."""
    assert spec_reader.decode_value({"$dict": [[{"$tuple": [1, None]}, {"$float": "-inf"}]]}, "x") == {
        (1, None): float("-inf")
    }
    assert spec_reader.decode_value({"a": [{"$tuple": []}, 2**64 - 1]}, "x") == {"a": [(), 2**64 - 1]}
    nan = spec_reader.decode_value({"$float": "nan"}, "x")
    assert nan != nan
    assert spec_reader._rebuild([(["a", 2], 1), (["a", 0, "b"], 2), (["c"], 3)]) == {"a": [{"b": 2}, None, 1], "c": 3}


def resealed_incremental(tmp_path: Path, manifest=None) -> Path:
    """A copy of valid-incremental (format_version 3) with the manifest and the files changed by ``manifest``,
    the manifest re-sealed with spec_reader's §10."""
    path = tmp_path / "incremental"
    shutil.copytree(VECTORS / "valid-incremental", path)
    man = json.loads((path / "manifest.json").read_bytes())
    if manifest is not None:
        manifest(man, path)
    (path / "manifest.json").write_bytes(spec_reader.manifest_bytes(man))
    return path


def _part(i: int, n: int = 3) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _rename_part(old: str, new: str):
    def change(man: dict[str, Any], path: Path) -> None:
        (path / old).rename(path / new)
        man["files"][new] = man["files"].pop(old)

    return change


def _copy_part(old: str, new: str):
    def change(man: dict[str, Any], path: Path) -> None:
        shutil.copy(path / old, path / new)
        man["files"][new] = dict(man["files"][old])

    return change


# what changes the manifest and the files of valid-incremental: each a single defect of §21.1
INCREMENTAL_DEFECTS: dict[str, Any] = {
    "index-not-below-count": _rename_part(_part(2), _part(3)),
    "two-names-for-one-index": _copy_part(_part(1), "model-000001-of-00003.safetensors"),
    "too-few-digits-is-no-part": _rename_part(_part(0), "model-0-of-00003.safetensors"),
    "tensor-table-extra-name": lambda m, p: m["files"][_part(1)]["tensors"].update(bogus="0" * 32),
    "tensor-table-missing-name": lambda m, p: m["files"][_part(0)].update(tensors={}),
    "alias-to-nothing": lambda m, p: m.update(aliases={"head.weight": "nothing"}),
    "alias-is-a-stored-name": lambda m, p: m.update(aliases={"lin.bias": "emb.weight"}),
    "empty-part-count": _rename_part(_part(0), "model-00000-of-00000.safetensors"),
}


@pytest.mark.parametrize("case", list(INCREMENTAL_DEFECTS))
def test_spec_reader_refuses_incremental_defects(case: str, tmp_path: Path):
    """§21.1's rules beyond the vectors, each a CheckpointCorruptedError."""
    path = resealed_incremental(tmp_path, INCREMENTAL_DEFECTS[case])
    with pytest.raises(spec_reader.SpecError) as info:
        spec_reader.load(path)
    assert info.value.error == "CheckpointCorruptedError", str(info.value)


@pytest.mark.parametrize("case", list(INCREMENTAL_DEFECTS))
def test_load_checkpoint_refuses_incremental_defects_as_spec_reader_does(case: str, tmp_path: Path):
    path = resealed_incremental(tmp_path, INCREMENTAL_DEFECTS[case])
    with pytest.raises(CheckpointCorruptedError):
        load_checkpoint(path, restore_rng=False)


INCREMENTAL_ACCEPTED: dict[str, Any] = {
    # §21.1: a listed model.safetensors is an unknown file in format_version 3, verified and otherwise ignored
    "unknown-model-safetensors": _rewrite("model.safetensors", b"not a safetensors file"),
    "unknown-listed-file": _rewrite("notes.txt", b"hello"),
    # a name that is no model part (fewer than five digits) is an unknown file
    "unknown-part-like-name": _copy_part(_part(1), "model-1-of-3.safetensors"),
}


@pytest.mark.parametrize("case", list(INCREMENTAL_ACCEPTED))
def test_spec_reader_and_load_checkpoint_accept_incremental_variants(case: str, tmp_path: Path):
    path = resealed_incremental(tmp_path, INCREMENTAL_ACCEPTED[case])
    manifest, state = spec_reader.load(path)
    assert manifest["step"] == 11 and manifest["format_version"] == 3
    assert_same_state(state, load_checkpoint(path, restore_rng=False).model_state)
    assert state.keys() == {"emb.weight", "head.weight", "lin.bias", "lin.weight"}


def test_spec_reader_reads_what_an_incremental_save_writes(tmp_path: Path):
    """§21: the union of the parts is the state a format_version 1 save of the same model holds."""
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_some(model, optimizer)
    full = save_checkpoint(model, optimizer, {}, None, 3, tmp_path / "full")
    parts = save_checkpoint(model, optimizer, {}, None, 3, tmp_path / "parts", incremental=True, part_bytes=16)
    manifest, state = spec_reader.load(parts)
    assert manifest["format_version"] == 3
    assert len([n for n in manifest["files"] if spec_reader.MODEL_PART.fullmatch(n)]) >= 3
    assert_same_state(state, spec_reader.load(full)[1])
    assert_same_state(state, load_checkpoint(parts).model_state)
    assert manifest["aliases"] == spec_reader.load(full)[0]["aliases"]


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


# --------------------------------------------------------------------------------------------------
# (e) the decisions of the second review: each rule, in the spec, the schemas, the code and spec_reader
# --------------------------------------------------------------------------------------------------


def spec_section(anchor: str) -> str:
    """The text of the spec from the anchor ``<a id="anchor">`` to the next heading of its level or above."""
    start = SPEC.index(f'<a id="{anchor}"></a>')
    heading = SPEC.rfind("\n", 0, start)
    level = len(SPEC[heading + 1 :].split(" ", 1)[0])
    end = min(
        (i for i in (SPEC.find("\n" + "#" * n + " ", start) for n in range(1, level + 1)) if i != -1),
        default=len(SPEC),
    )
    return SPEC[start:end]


def table_after(text: str, header: str) -> list[list[str]]:
    """The rows (cells) of the markdown table whose header row starts with ``header``."""
    lines = text[text.index(header) :].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_the_pt_allowlist_in_the_spec_is_the_code_and_spec_readers():
    from portable_ckpt.format import pt as _pt

    section = spec_section("pt-encoding")
    opcodes = {op for row in table_after(section, "| opcodes |") for op in ticked(row[0])}
    assert opcodes == set(_pt.OPCODES) == spec_reader.PT_OPCODES
    globals_ = {g for row in table_after(section, "| global |") for g in ticked(row[0])}
    assert globals_ == set(_pt.GLOBALS) == spec_reader.PT_GLOBALS
    records = {}
    for row in table_after(section, "| record |"):
        limit = int(row[2].split()[0].replace(",", "")) if row[2][0].isdigit() else None
        records.update({name: limit for name in ticked(row[0])})
    assert records.pop("data/<key>") is None
    assert records == _pt.RECORDS == spec_reader.PT_RECORDS
    # the storage classes named for each dtype are the ones torch.save writes for it
    assert set(_pt.STORAGE_CLASSES) == set(_safetensors.DTYPES)
    for name, dtype in _safetensors.DTYPES.items():
        data = io_bytes({"t": torch.zeros(2, dtype=dtype)})
        written = written_globals(data)
        expected = f"torch.{_pt.STORAGE_CLASSES[name]}" if _pt.STORAGE_CLASSES[name] else "torch.storage.UntypedStorage"
        assert expected in written and written <= set(_pt.GLOBALS), (name, written)


def io_bytes(obj: Any) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def written_globals(data: bytes) -> set[str]:
    import io
    import pickletools

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    found = set()
    for op, arg, _ in pickletools.genops(pkl):
        if op.name == "GLOBAL":
            module, _, name = str(arg).partition(" ")
            found.add(f"{'builtins' if module == '__builtin__' else module}.{name}")
    return found


def schema_nodes(node: Any, where: str = "$") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((where, node))
        for k, v in node.items():
            out.extend(schema_nodes(v, f"{where}.{k}"))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(schema_nodes(v, f"{where}[{i}]"))
    return out


ALL_SCHEMAS = sorted((ROOT / "schemas").glob("*.schema.json"))


@pytest.mark.parametrize("path", ALL_SCHEMAS, ids=lambda p: p.name)
def test_every_pattern_ending_in_dollar_has_a_guard_no_engine_reads_differently(path: Path):
    """§1: `$` matches before a final line feed in some engines; a `not` pattern of the excluded characters,
    or a `maxLength` with no `$` at all, means the same everywhere."""
    for where, node in schema_nodes(json.loads(path.read_text())):
        pattern = node.get("pattern")
        if not isinstance(pattern, str) or not pattern.endswith("$") or where.endswith(".not"):
            continue
        guards = [node.get("not", {})] + [sub.get("not", {}) for sub in node.get("allOf", [])]
        assert any("pattern" in g for g in guards), f"{path.name} {where}: {pattern} has no guard"


@pytest.mark.parametrize("path", ALL_SCHEMAS, ids=lambda p: p.name)
def test_integer_enums_and_consts_are_typed_integer(path: Path):
    """§1: JSON Schema finds 8.0 equal to 8; typed "integer", the strict type refuses it."""
    for where, node in schema_nodes(json.loads(path.read_text())):
        values = node.get("enum", []) + ([node["const"]] if "const" in node else [])
        if ".if." not in where + "." and any(type(v) is int for v in values):
            assert node.get("type") == "integer", f"{path.name} {where}: {values} not typed integer"


LINE_FEED_CASES = [
    ("manifest", lambda d: d["files"].update({"notes.txt\n": {"size": 1, "checksum": "0" * 32}})),
    ("manifest", lambda d: d.update(created_at=d["created_at"] + "\n")),
    ("manifest", lambda d: d.update(rng=["numpy", "python\n", "torch.cpu"])),
    ("manifest", lambda d: d["files"]["config.json"].update(checksum="0" * 32 + "\n")),
    ("manifest", lambda d: d.update(manifest_checksum=d["manifest_checksum"] + "\n")),
]


@pytest.mark.parametrize("variant", ["default", "python"])
@pytest.mark.parametrize("case", range(len(LINE_FEED_CASES)))
def test_a_trailing_line_feed_fails_the_schema_in_every_regex_engine(case: int, variant: str, tmp_path: Path):
    schema, change = LINE_FEED_CASES[case]
    doc = json.loads((VECTORS / "valid-full" / "manifest.json").read_bytes())
    change(doc)
    instance = tmp_path / "instance.json"
    instance.write_text(json.dumps(doc), encoding="utf-8")
    run = subprocess.run(
        [
            str(CHECK_JSONSCHEMA),
            "--regex-variant",
            variant,
            "--schemafile",
            str(ROOT / "schemas" / f"{schema}.schema.json"),
            str(instance),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 1, run.stdout
    with pytest.raises(CheckpointCorruptedError, match="schema violation"):
        _schemas.validate(doc, schema, "instance")
    with pytest.raises(spec_reader.SpecError):
        spec_reader.validate(doc, schema)


def test_quantization_names_with_a_line_feed_fail_the_schema():
    meta = next(json.loads(text) for _, schema, text in EXAMPLES if schema == "quantization_metadata")
    for change in (
        lambda m: m["modules"][0].update(name="proj\n"),
        lambda m: m["modules"][0]["tensors"]["weight_scale"].update(name="proj.weight_scale\n"),
        lambda m: m.update(method="portable-ckpt-rtn\n"),
        lambda m: m.update(bits=4.0),
    ):
        doc = json.loads(json.dumps(meta))
        change(doc)
        with pytest.raises(CheckpointCorruptedError, match="schema violation"):
            _schemas.validate(doc, "quantization_metadata", "q")


JSON_TEXTS = [
    (b'{"a":' + b"[" * 63 + b"]" * 63 + b"}", True),  # 64 deep: the limit
    (b'{"a":' + b"[" * 64 + b"]" * 64 + b"}", False),  # 65 deep
    (b"[" * 2000 + b"]" * 2000, False),  # deeper than Python's own recursion
    (b'{"n":18446744073709551615}', True),  # 2**64 - 1
    (b'{"n":18446744073709551616}', False),  # 2**64
    (b'{"n":-9223372036854775808}', True),  # -2**63
    (b'{"n":-9223372036854775809}', False),
    (b'{"n":' + b"1" * 5000 + b"}", False),  # refused by its length
    (b'{"n":00}', False),
    (b'{"x":1e400}', False),
    (b'{"x":-1e400}', False),
    (b'{"x":1e-400}', True),  # rounds to 0.0
    (b'{"x":NaN}', False),
    (b'{"x":"\\ud800"}', False),
    (b'{"\\udfff":1}', False),
    (b'{"x":"\\ud83d\\ude00"}', True),  # a pair
    (b'{"x":"\\\\ud800"}', True),  # an escaped backslash, then text
    (b'{"a":1,"a":1}', False),
    (b"\xef\xbb\xbf{}", False),  # a byte order mark
]


@pytest.mark.parametrize(("text", "ok"), JSON_TEXTS, ids=[t[:24].decode("latin-1") for t, _ in JSON_TEXTS])
def test_the_json_rules_of_section_4_in_the_code_and_spec_reader(text: bytes, ok: bool):
    if ok:
        assert _jsonio.loads(text, "x.json") == spec_reader.strict_json(text)
    else:
        with pytest.raises(CheckpointCorruptedError, match=r"^x\.json: "):
            _jsonio.loads(text, "x.json")
        with pytest.raises(spec_reader.SpecError):
            spec_reader.strict_json(text)


def header_file(header: bytes, data: bytes = b"") -> bytes:
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data


HEADERS = [
    b'{"__metadata__":{"a":NaN}}',
    b'{"\\ud800":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}',
    b'{"a":{"dtype":"F32","shape":[' + b"9" * 30 + b'],"data_offsets":[0,0]}}',
    b'{"a":{"dtype":"F32","shape":[' + b"[" * 100 + b"]" * 100 + b'],"data_offsets":[0,0]}}',
]


@pytest.mark.parametrize("header", HEADERS, ids=range(len(HEADERS)))
def test_safetensors_headers_follow_the_json_rules_too(header: bytes):
    data = header_file(header)
    with pytest.raises(CheckpointCorruptedError, match=r"^h\.safetensors: "):
        _safetensors.parse_header(data, len(data), "h.safetensors")
    with pytest.raises(spec_reader.SpecError):
        spec_reader.parse_safetensors(data)


STEP_NAMES = [
    ("step-00000010", 10),
    ("step-123456789", 123456789),
    ("step-99999999", 99999999),
    ("step-000000010", None),  # a ninth digit: not the one spelling of step 10
    ("step-0123456789", None),
    ("step-0000001", None),
    ("step-00000010\n", None),
    ("step-0000001O", None),
    ("Step-00000010", None),
]


@pytest.mark.parametrize(("name", "step"), STEP_NAMES)
def test_a_step_has_one_directory_name(name: str, step: int | None):
    assert _names.step_of(name) == spec_reader.step_of(name) == step


def root_with_steps(root: Path, steps: tuple[int, ...] = (10, 20)) -> Path:
    torch.manual_seed(0)
    for step in steps:
        save_checkpoint(TinyLM(), None, {}, None, step, root)
    return root


LATEST = [
    (b"step-00000010\n", 10),
    (b"step-00000010\r\n", 10),
    (b" \tstep-00000010 \n\n", 10),
    (b"step-00000010", 10),
    (b"step-00000010\n" + b" " * (4096 - 14), 10),  # 4096 bytes: the limit
    (b"step-00000010\n" + b" " * (4097 - 14), 20),  # 4097 bytes: names nothing
    (b"step-00000010\x0c\n", 20),  # a form feed is not JSON whitespace
    (b"step-00000010\x0b", 20),
    ("step-00000010\u00a0".encode(), 20),  # nor is a no-break space
    ("step-00000010\u0085".encode(), 20),
    (b"\xffstep-00000010", 20),
    (b"step-000000010\n", 20),
    (b"", 20),
]


@pytest.mark.parametrize(("content", "step"), LATEST, ids=[repr(c[:20]) + str(len(c)) for c, _ in LATEST])
def test_latest_whitespace_and_size(content: bytes, step: int, tmp_path: Path):
    root = root_with_steps(tmp_path / "root")
    (root / "latest").write_bytes(content)
    assert spec_reader.load(root)[0]["step"] == step
    assert load_checkpoint(root, restore_rng=False).step == step


def test_what_a_path_names(tmp_path: Path):
    """§3.5, rule by rule, in the reference and in spec_reader."""
    from portable_ckpt import CheckpointNotFoundError

    root = root_with_steps(tmp_path / "root")
    cases: list[tuple[Path, type[Exception] | int]] = []
    # rule 2: manifest.json of any kind makes a checkpoint directory, refused when it is not a regular file
    dangling = tmp_path / "dangling"
    shutil.copytree(root / "step-00000010", dangling)
    (dangling / "manifest.json").unlink()
    (dangling / "manifest.json").symlink_to(tmp_path / "nowhere.json")
    cases.append((dangling, CheckpointNotFoundError))  # a link is followed: what it names is missing
    as_dir = tmp_path / "manifest-dir"
    shutil.copytree(root / "step-00000010", as_dir)
    (as_dir / "manifest.json").unlink()
    (as_dir / "manifest.json").mkdir()
    cases.append((as_dir, CheckpointCorruptedError))
    # a checkpoint directory that also holds step directories is the checkpoint itself
    both = tmp_path / "both"
    shutil.copytree(root / "step-00000020", both)
    shutil.copytree(root / "step-00000010", both / "step-00000010")
    cases.append((both, 20))
    # rule 4: incomplete checkpoints
    incomplete = tmp_path / "step-00000030"
    incomplete.mkdir()
    cases.append((incomplete, CheckpointNotFoundError))
    model_only = tmp_path / "model-only"
    shutil.copytree(root / "step-00000010", model_only)
    (model_only / "manifest.json").unlink()
    cases.append((model_only, CheckpointNotFoundError))
    # rule 5: a root
    cases.append((root, 20))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((empty, CheckpointNotFoundError))
    cases.append((tmp_path / "missing", CheckpointNotFoundError))
    for path, expected in cases:
        if isinstance(expected, int):
            assert load_checkpoint(path, restore_rng=False).step == expected, path
            assert spec_reader.load(path)[0]["step"] == expected, path
        else:
            with pytest.raises(expected):
                load_checkpoint(path, restore_rng=False)
            with pytest.raises(spec_reader.SpecError) as info:
                spec_reader.load(path)
            assert info.value.error == expected.__name__, (path, info.value)


def test_a_directory_with_another_spelling_of_a_step_is_no_step_directory(tmp_path: Path):
    """Given directly, step-000000010 is a checkpoint directory like any other name: no step check."""
    root = root_with_steps(tmp_path / "root", (7,))
    odd = tmp_path / "step-000000010"
    shutil.copytree(root / "step-00000007", odd)
    assert load_checkpoint(odd, restore_rng=False).step == 7
    assert spec_reader.load(odd)[0]["step"] == 7


def test_a_model_entry_without_tensor_table_refuses_verified_partial_reads():
    from portable_ckpt import CheckpointInputError, open_checkpoint

    path = VECTORS / "valid-no-tensor-table"
    assert "tensors" not in json.loads((path / "manifest.json").read_bytes())["files"]["model.safetensors"]
    full = load_checkpoint(path, restore_rng=False).model_state
    with open_checkpoint(path) as reader:
        with pytest.raises(CheckpointInputError, match="verify=False"):
            reader.tensor("lin.weight")
        assert torch.equal(reader.tensor("lin.weight", verify=False), full["lin.weight"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step": 2**64}, r"step must be an int in \[0, 2\*\*64\)"),
        ({"config": {"seed": 2**64}}, r"config\['seed'\] is an integer of 65 bits"),
        ({"config": {"seed": -(2**63) - 1}}, r"config\['seed'\] is an integer"),
        (
            {"extra": {"a": [[[[[]]]]] * 1, "b": eval("[" * 64 + "]" * 64)}},
            r"extra\['b'\]" + r"(\[0\])*" + " is nested more than 64",
        ),
    ],
    ids=["step", "config-int", "config-negative-int", "extra-depth"],
)
def test_the_writer_refuses_what_readers_would_refuse_and_commits_nothing(kwargs: dict[str, Any], match: str, tmp_path):
    from portable_ckpt import CheckpointInputError

    args: dict[str, Any] = {"step": 1, "config": {}, **kwargs}
    step, config = args.pop("step"), args.pop("config")
    with pytest.raises(CheckpointInputError, match=match):
        save_checkpoint(TinyLM(), None, config, None, step, tmp_path / "root", **args)
    assert not (tmp_path / "root").exists() or not [
        p for p in (tmp_path / "root").iterdir() if p.name.startswith(("step-", ".tmp-"))
    ]


def test_the_writer_accepts_64_deep_and_refuses_a_config_that_holds_itself(tmp_path):
    from portable_ckpt import CheckpointInputError

    deep: Any = []
    for _ in range(62):
        deep = [deep]  # 63 lists in the config object: 64 deep
    path = save_checkpoint(TinyLM(), None, {"deep": deep}, None, 1, tmp_path / "root")
    assert load_checkpoint(path, restore_rng=False).config == {"deep": deep}
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    with pytest.raises(CheckpointInputError, match="nested more than 64"):
        save_checkpoint(TinyLM(), None, cyclic, None, 2, tmp_path / "root")


def test_a_format_0_step_directory_agrees_with_its_metadata(tmp_path: Path):
    """§16: named like a step directory, a format-0 directory holds that step (given directly; in a root it is
    never a candidate, see the vector valid-root-format-0-ignored)."""
    import io

    for step, ok in ((42, True), (41, False)):
        d = tmp_path / str(step) / "step-00000042"
        d.mkdir(parents=True)
        buf = io.BytesIO()
        torch.save({"w": torch.ones(2)}, buf)
        (d / "model.pt").write_bytes(buf.getvalue())
        (d / "metadata.json").write_text(json.dumps({"step": step}))
        if ok:
            assert load_checkpoint(d).step == 42
        else:
            with pytest.raises(CheckpointCorruptedError, match="step"):
                load_checkpoint(d)


@pytest.mark.parametrize(("nbytes", "ok"), [(16, True), (15, False)])
def test_a_cuda_generator_state_is_16_bytes(nbytes: int, ok: bool, tmp_path: Path):
    """§14, checked whether or not the machine has the device (and before any object is restored)."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(SPEC_DIR))
    try:
        import make_vectors
    finally:
        sys.path.remove(str(SPEC_DIR))
    path = tmp_path / "ckpt"
    shutil.copytree(VECTORS / "valid-full", path)
    tensors = load_file(path / "rng.safetensors")
    tensors["torch.cuda.0"] = torch.zeros(nbytes, dtype=torch.uint8)
    (path / "rng.safetensors").unlink()
    with open(path / "rng.safetensors", "wb") as f:
        _safetensors.write(f, tensors)
    doc = json.loads((path / "rng.json").read_bytes())
    doc["torch"]["cuda_devices"] = 1
    (path / "rng.json").write_bytes(_jsonio.dumps(doc))
    manifest = json.loads((path / "manifest.json").read_bytes())
    manifest["rng"] = sorted(tensors)
    (path / "manifest.json").write_bytes(_manifest.encode(manifest))
    make_vectors.reseal(path)
    if ok:
        assert load_checkpoint(path, restore_rng=False).step == 100
        assert spec_reader.load(path)[0]["step"] == 100
    else:
        with pytest.raises(CheckpointCorruptedError, match=r"torch\.cuda\.0"):
            load_checkpoint(path, restore_rng=False)
        with pytest.raises(spec_reader.SpecError):
            spec_reader.load(path)


def test_every_error_class_is_public():
    import portable_ckpt
    from portable_ckpt import errors

    classes = [n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, errors.CheckpointError)]
    assert set(classes) <= set(portable_ckpt.__all__)
    assert issubclass(errors.CheckpointUnsafeError, errors.CheckpointCorruptedError)
