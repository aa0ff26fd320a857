"""Fuzzing the readers with hypothesis: whatever the bytes, a reader raises a CheckpointError subclass or
returns something that keeps the format's promises; it never raises anything else, hangs, or allocates
in proportion to what a header claims rather than to what the file holds.

Also here: objects of remote roots changed between listing and reading, and a ``latest`` naming a step
without a manifest (tests/faults/remote.py), on ``memory://`` (a sample; the stress run tries them all,
on S3 too), and regression tests of the library defects the stress run found.

Targets: manifest.json (``_manifest.parse``), the other JSON documents (``_jsonio.loads`` +
``_schemas.validate``, and ``_quant.check_metadata`` behind them), safetensors headers
(``_safetensors.parse_header``, arbitrary bytes and structured headers claiming huge sizes), legacy
format-0 directories (``_legacy.read``), and whole checkpoints whose files are mutated and re-checksummed.

The default suite runs a fixed, derandomized number of examples per target; ``tests/stress.py`` runs
many more, with random seeds, through :func:`run_target`.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import random
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faults
import faults.remote
import hypothesis
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import portable_ckpt as pc
from portable_ckpt import state as _state
from portable_ckpt.convert import format0 as _legacy
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import layout, names
from portable_ckpt.format import manifest as _manifest
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.format import schemas as _schemas
from portable_ckpt.format import states as _states
from portable_ckpt.quant import quantize as _quant

EXAMPLES = 200  # per target, in the default suite
EXAMPLES_SLOW = 60  # targets that load whole checkpoints or torch.load a file
EXAMPLES_RUN: collections.Counter[str] = collections.Counter()  # examples actually run, per target (stress)

# --- valid documents to start mutations from (built in memory) -------------------------------------


def _manifest_doc() -> dict[str, Any]:
    files = {name: {"size": 10 + i, "checksum": f"{i:032x}"} for i, name in enumerate(faults.FILES[:-1])}
    files["model.safetensors"]["tensors"] = {"emb.weight": "0" * 32, "lin.bias": "1" * 32}
    return _manifest.build(
        step=3,
        files=files,
        aliases={"head.weight": "emb.weight"},
        rng=["python", "torch.cpu"],
        quantization=None,
        extra={"note": "fuzz"},
    )


MANIFEST = _manifest_doc()
QUANT_MODEL = faults.quantized_model()
QUANT_META = _quant.quantization_metadata(QUANT_MODEL)
QUANT_TENSORS = {k: (_safetensors.DTYPE_NAMES[v.dtype], list(v.shape)) for k, v in QUANT_MODEL.state_dict().items()}
RNG_DOC = {
    "python": {"version": 3, "gauss_next": None},
    "numpy": {"bit_generator": "MT19937", "pos": 624, "has_gauss": 0, "cached_gaussian": 0.0},
    "torch": {"cpu": True, "cuda_devices": 0},
}
SAFETENSORS = safetensors.torch.save(
    {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(4, dtype=torch.int64),
        "c": torch.zeros(0),
    }
)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


MODEL_PT = _torch_bytes({"lin.weight": torch.ones(3, 4), "lin.bias": torch.zeros(3)})

# --- strategies -----------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every location in a JSON document (dict keys and list indices)."""
    found = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += _paths(v, (*prefix, i))
    return found


@st.composite
def mutated_doc(draw: st.DrawFn, base: Any) -> Any:
    """``base`` with a few locations replaced by arbitrary JSON values or deleted."""
    doc = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        if not path:
            return draw(json_values)
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return doc


@st.composite
def mutated_bytes(draw: st.DrawFn, blob: bytes) -> bytes:
    """``blob`` with a few bytes changed, maybe cut short, maybe with bytes inserted."""
    data = bytearray(blob)
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    if draw(st.integers(0, 3)) == 0:
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


def json_bytes(base: Any) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        mutated_doc(base).map(lambda v: json.dumps(v).encode()),
        mutated_bytes(json.dumps(base).encode()),
    )


DTYPE_NAMES = [*_safetensors.DTYPES, "F128", "f32", "", "BOOL "]
huge_ints = st.one_of(st.integers(0, 64), st.integers(-5, 2**70), st.sampled_from([2**31, 2**32, 2**60, 2**63, 2**64]))


@st.composite
def structured_header(draw: st.DrawFn) -> tuple[bytes, int]:
    """A safetensors prefix with a plausible-looking but wrong header; and the file size it claims."""
    header: dict[str, Any] = {}
    offset = 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(DTYPE_NAMES))
        shape = draw(st.lists(huge_ints, max_size=4))
        size = draw(st.one_of(huge_ints, st.just(len(shape) and 4)))
        begin = draw(st.one_of(st.just(offset), huge_ints))
        header[draw(st.text(max_size=6)) or f"t{i}"] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [begin, begin + size],
        }
        offset = begin + size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=4), st.text(max_size=4)), json_values))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    claimed = draw(st.one_of(st.just(8 + len(raw) + offset), huge_ints))
    return struct.pack("<Q", len(raw)) + raw, claimed


# --- targets: name -> (strategy, check(value, workdir)) -------------------------------------------

TARGETS: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any, Path], None]]] = {}


def target(
    name: str, strategy: st.SearchStrategy[Any]
) -> Callable[[Callable[[Any, Path], None]], Callable[[Any, Path], None]]:
    def register(check: Callable[[Any, Path], None]) -> Callable[[Any, Path], None]:
        TARGETS[name] = (strategy, check)
        return check

    return register


@target("manifest-bytes", st.one_of(st.binary(max_size=3000), mutated_bytes(_manifest.encode(MANIFEST))))
def check_manifest_bytes(data: bytes, workdir: Path) -> None:
    try:
        doc = _manifest.parse(data, where="fuzz")
    except pc.CheckpointError:
        return
    check_parsed_manifest(doc)


def check_parsed_manifest(doc: dict[str, Any]) -> None:
    """What a parsed manifest promises the code that uses it."""
    assert type(doc["step"]) is int and doc["step"] >= 0, doc["step"]
    for name, entry in doc["files"].items():
        assert _manifest.FILE_NAME.fullmatch(name), name
        assert type(entry["size"]) is int and entry["size"] >= 0, entry


@target("manifest-sealed", st.tuples(mutated_doc(MANIFEST), st.booleans()))
def check_manifest_sealed(value: tuple[Any, bool], workdir: Path) -> None:
    """An attacker's manifest: arbitrary edits, then (when it can be) sealed with a correct checksum."""
    doc, seal = value
    data = _manifest.encode(_manifest.seal(doc)) if seal and isinstance(doc, dict) else json.dumps(doc).encode()
    check_manifest_bytes(data, workdir)


@target(
    "json-documents",
    st.one_of(
        st.tuples(st.just("quantization_metadata"), json_bytes(QUANT_META)),
        st.tuples(st.just("rng"), json_bytes(RNG_DOC)),
        st.tuples(st.just("vocab"), json_bytes(faults.VOCAB)),
        st.tuples(st.just("vocab"), json_bytes({"a": 0, "b": 1})),
        st.tuples(st.just("legacy_metadata"), json_bytes({"step": 5})),
    ),
)
def check_json_document(value: tuple[str, bytes], workdir: Path) -> None:
    kind, data = value
    try:
        doc = _jsonio.loads(data, f"{kind}.json")
        _schemas.validate(doc, kind, f"{kind}.json")
        if kind == "quantization_metadata":
            _quant.check_metadata(doc, QUANT_TENSORS, filename="quantization_metadata.json")
    except pc.CheckpointError:
        return


class _StateHolder:
    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


# --- user object states (states.json): any document is decoded or refused; any value round-trips or is refused
STATES_DOC, STATES_TENSORS = _states.encode(
    {"loader": _StateHolder({"n": 3, "t": torch.arange(4), "k": {1: (2.5, None)}, "f": float("inf")})}
)
_plain_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-5, 5), st.booleans()), children, max_size=4),
        st.builds(lambda v: {"$tuple": v}, children),
        st.just(frozenset({1})),
    ),
    max_leaves=20,
)


@target("states-json", json_bytes(STATES_DOC))
def check_states_json(data: bytes, workdir: Path) -> None:
    """A damaged or hostile states.json is decoded into plain values or refused as CheckpointCorruptedError."""
    try:
        doc = _jsonio.loads(data, "states.json")
        _schemas.validate(doc, "states", "states.json")
        decoded = _states.decode(doc, STATES_TENSORS, "states.json")
    except pc.CheckpointCorruptedError:
        return
    assert set(decoded) == set(doc["objects"])


@target("states-values", _plain_values)
def check_states_values(value: Any, workdir: Path) -> None:
    """Any value a state_dict() returns is encoded and decoded back equal (types kept), or refused at the call."""
    try:
        doc, tensors = _states.encode({"obj": _StateHolder(value)})
    except pc.CheckpointInputError:
        return
    try:
        _schemas.validate(doc, "states", "states.json")
    except pc.CheckpointCorruptedError:
        return  # save_checkpoint refuses it at the call, as CheckpointInputError (see test_empty_string_key_...)
    back = _states.decode(_jsonio.loads(_jsonio.dumps(doc), "states.json"), tensors, "states.json")
    assert _same(back["obj"]["state"], value), (value, back)


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@target(
    "header-bytes",
    st.tuples(st.one_of(st.binary(max_size=300), mutated_bytes(SAFETENSORS)), st.one_of(st.just(-1), huge_ints)),
)
def check_header_bytes(value: tuple[bytes, int], workdir: Path) -> None:
    data, size = value
    check_header(data, len(data) if size < 0 else size)


@target("header-structured", structured_header())
def check_header_structured(value: tuple[bytes, int], workdir: Path) -> None:
    check_header(*value)


def check_header(prefix: bytes, file_size: int) -> None:
    """parse_header refuses, or returns entries that tile the file exactly as their shapes say."""
    try:
        header = _safetensors.parse_header(prefix, file_size, "fuzz.safetensors")
    except pc.CheckpointCorruptedError:
        return
    cursor = header.data_start
    for e in header.entries:
        numel = 1
        for d in e.shape:
            numel *= d
        assert e.start == cursor and e.end - e.start == numel * _safetensors.ITEMSIZE[e.dtype], e
        cursor = e.end
    assert cursor == file_size


def _write_legacy(directory: Path, metadata: bytes, model: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metadata.json").write_bytes(metadata)
    (directory / "model.pt").write_bytes(model)


@target(
    "legacy-directory",
    st.tuples(json_bytes({"step": 5}), st.one_of(mutated_bytes(MODEL_PT), st.binary(max_size=200), st.just(MODEL_PT))),
)
def check_legacy(value: tuple[bytes, bytes], workdir: Path) -> None:
    directory = workdir / "legacy"
    _write_legacy(directory, *value)
    try:
        ckpt = _legacy.read(directory)
    except pc.CheckpointError:
        return
    assert type(ckpt.step) is int and ckpt.step >= 0
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt.model_state.items())


_PRISTINE: dict[Path, Path] = {}


def _pristine(workdir: Path) -> Path:
    if workdir not in _PRISTINE:
        _PRISTINE[workdir] = faults.save_step(workdir / "pristine", 3)
    return _PRISTINE[workdir]


def _load_mutated(workdir: Path, name: str, data: bytes, recompute: bool) -> None:
    copy = workdir / "mutated" / "step-00000003"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(_pristine(workdir), copy)
    (copy / name).write_bytes(data)
    if recompute:
        faults.recompute(copy)
    for verify in (True, False):
        try:
            with faults.preserved_rng():
                pc.load_checkpoint(copy, verify=verify)
        except pc.CheckpointError:
            continue
        if verify and not recompute:
            assert data == (_pristine(workdir) / name).read_bytes(), "damage loaded with verify=True"


def _model_blob() -> bytes:
    """The bytes of model.safetensors in a checkpoint of ``make_state(3)``: the official library writes
    the same bytes (tied weights stored once)."""
    tensors, _ = _state.model_state(faults.make_state(3)[0])
    return safetensors.torch.save({k: v.detach() for k, v in tensors.items()})


@target("checkpoint-model.safetensors", st.tuples(mutated_bytes(_model_blob()), st.booleans()))
def check_checkpoint_safetensors(value: tuple[bytes, bool], workdir: Path) -> None:
    _load_mutated(workdir, "model.safetensors", *value)


@target(
    "checkpoint-optimizer.pt",
    st.tuples(mutated_bytes(_torch_bytes(faults.make_state(3)[1].state_dict())), st.booleans()),
)
def check_checkpoint_optimizer(value: tuple[bytes, bool], workdir: Path) -> None:
    _load_mutated(workdir, "optimizer.pt", *value)


SHARDED = Path(__file__).resolve().parent.parent / "format_spec" / "vectors" / "valid-sharded"
SHARDING_DOC = json.loads((SHARDED / "sharding.json").read_bytes())


@target("sharding-table", st.one_of(mutated_doc(SHARDING_DOC), mutated_bytes(_jsonio.dumps(SHARDING_DOC))))
def check_sharding_table(value: Any, workdir: Path) -> None:
    """sharding.json parsed by itself: refused by name, or every tensor covered exactly by chunks in bounds."""
    from portable_ckpt.format import sharding as _sharding

    data = value if isinstance(value, bytes) else json.dumps(value).encode()
    listed = json.loads((SHARDED / "manifest.json").read_bytes())["files"]
    try:
        table = _sharding.parse(data, "sharding.json", listed)
    except pc.CheckpointError:
        return
    for e in table.entries.values():
        if e.is_tensor:
            assert sum(math.prod(c.sizes) for c in e.chunks) == math.prod(e.shape), e.name
            for c in e.chunks:
                assert c.file in listed and all(
                    o + s <= n for o, s, n in zip(c.offsets, c.sizes, e.shape, strict=True)
                ), c


def _mutated_copies(base: Path, copy: Path, name: str, data: bytes, recompute: bool) -> Iterator[pc.Checkpoint]:
    """``base`` copied to ``copy`` with its file ``name`` replaced by ``data`` (and, as an attacker would,
    re-checksummed when ``recompute``), loaded with and without verification: yields each checkpoint that
    loads (a CheckpointError is a refusal), after checking that damage never loads verified."""
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(base, copy)
    (copy / name).write_bytes(data)
    if recompute:
        faults.recompute(copy)
    for verify in (True, False):
        try:
            ckpt = pc.load_checkpoint(copy, verify=verify, restore_rng=False)
        except pc.CheckpointError:
            continue
        if verify and not recompute and name != "manifest.json":
            assert data == (base / name).read_bytes(), "damage loaded with verify=True"
        assert all(isinstance(t, torch.Tensor) for t in ckpt.model_state.values())
        yield ckpt


@target(
    "checkpoint-sharded",
    st.sampled_from(
        ["sharding.json", "model-00001-of-00002.safetensors", "optimizer-00000-of-00002.safetensors"]
    ).flatmap(lambda name: st.tuples(st.just(name), mutated_bytes((SHARDED / name).read_bytes()), st.booleans())),
)
def check_checkpoint_sharded(value: tuple[str, bytes, bool], workdir: Path) -> None:
    """A sharded checkpoint with one file replaced: refused by name, or whole tensors; damage never verified."""
    for _ in _mutated_copies(SHARDED, workdir / "sharded" / "step-00000009", *value):
        pass


INCREMENTAL = SHARDED.parent / "valid-incremental"
INCREMENTAL_MANIFEST = json.loads((INCREMENTAL / "manifest.json").read_bytes())
INCREMENTAL_PARTS = sorted(n for n in INCREMENTAL_MANIFEST["files"] if n.startswith("model-"))


def _sealed(doc: Any) -> bytes:
    """A mutated manifest as an attacker would write it: re-sealed when it is still an object."""
    if isinstance(doc, dict):
        return _manifest.encode(doc)
    return json.dumps(doc).encode()


@target(
    "checkpoint-incremental",
    st.one_of(
        st.tuples(st.just("manifest.json"), mutated_doc(INCREMENTAL_MANIFEST).map(_sealed), st.just(False)),
        st.sampled_from(INCREMENTAL_PARTS).flatmap(
            lambda name: st.tuples(st.just(name), mutated_bytes((INCREMENTAL / name).read_bytes()), st.booleans())
        ),
    ),
)
def check_checkpoint_incremental(value: tuple[str, bytes, bool], workdir: Path) -> None:
    """A format-3 checkpoint (format_spec §21) with its manifest mutated and re-sealed (part names, counts,
    tables, aliases) or one model part damaged (and maybe re-checksummed): refused by name, or a model state
    that is the union of the listed parts' tensors, damage never loaded with verify=True."""
    for ckpt in _mutated_copies(INCREMENTAL, workdir / "incremental" / "step-00000007", *value):
        stored = {t for n, e in ckpt.manifest["files"].items() if layout.PART.fullmatch(n) for t in e["tensors"]}
        assert set(ckpt.model_state) == stored | set(ckpt.manifest.get("aliases") or {})


SLOW = {
    "checkpoint-model.safetensors",
    "checkpoint-optimizer.pt",
    "legacy-directory",
    "checkpoint-sharded",
    "checkpoint-incremental",
}


def run_target(name: str, examples: int, workdir: Path, *, seed: int | None = None) -> None:
    """Run one fuzz target for ``examples`` examples: derandomized (the default suite), or from ``seed``."""
    strategy, check = TARGETS[name]
    workdir.mkdir(parents=True, exist_ok=True)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=seed is None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    @given(strategy)
    def fuzz(value: Any) -> None:
        EXAMPLES_RUN[name] += 1
        with faults.deadline(30):
            check(value, workdir)

    if seed is not None:
        fuzz = hypothesis.seed(seed)(fuzz)
    fuzz()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz(name: str, tmp_path: Path) -> None:
    run_target(name, EXAMPLES_SLOW if name in SLOW else EXAMPLES, tmp_path)


def test_empty_string_key_round_trips(tmp_path: Path) -> None:
    """Found by the states-values target (stress run): a dict with the key "" is a plain Python state."""
    model = torch.nn.Linear(2, 2)
    path = pc.save_checkpoint(model, None, {}, None, 1, tmp_path, states={"loader": _StateHolder({"": None})})
    holder = _StateHolder(None)
    pc.load_checkpoint(path, states={"loader": holder})
    assert holder.state == {"": None}


# --- explicit hostile headers: bounded time and memory ----------------------------------------------


@pytest.mark.parametrize("claim", [[2**30, 2**30], [2**60], [2**31] * 3, [1] * 10_000])
def test_header_claiming_a_huge_tensor_allocates_nothing(tmp_path: Path, claim: list[int]) -> None:
    """A checkpoint whose header claims an exabyte tensor, with every checksum recomputed: refused, quickly,
    without the memory the claim would need."""
    ckdir = faults.save_step(tmp_path / "root", 3)
    header, data = faults.st_split((ckdir / "model.safetensors").read_bytes())
    first = min(header, key=lambda n: header[n]["data_offsets"])
    numel = 1
    for d in claim:
        numel *= d
    header[first] = {"dtype": "F32", "shape": claim, "data_offsets": [0, 4 * numel]}
    (ckdir / "model.safetensors").write_bytes(faults.st_pack(header, data))
    faults.recompute(ckdir)
    with faults.peak_rss() as grew, faults.deadline(5):
        for verify in (True, False):
            with pytest.raises(pc.CheckpointCorruptedError, match=r"model\.safetensors"):
                pc.load_checkpoint(ckdir, verify=verify, restore_rng=False)
    assert grew[0] < 64 << 20, f"peak memory grew by {grew[0] >> 20} MiB"


def test_header_with_many_huge_dimensions_is_refused_quickly() -> None:
    """300 dimensions of 4,000 digits each (a 1.2 MB header, far under the 100 MB limit): the product has
    1.2 million digits. Refusing it must not cost that multiplication, nor fail on printing it."""
    dims = ",".join(["9" * 4000] * 300)
    raw = f'{{"a":{{"dtype":"F32","shape":[{dims}],"data_offsets":[0,4]}}}}'.encode()
    prefix = faults.st_pack(raw, b"")
    with faults.deadline(1), pytest.raises(pc.CheckpointCorruptedError, match=r"fuzz\.safetensors"):
        _safetensors.parse_header(prefix, len(prefix) + 4, "fuzz.safetensors")


_JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(alphabet='ab"\\[]{}\u00e9\n', max_size=6)
)
_JSON_VALUES = st.recursive(
    _JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='k"[}\\', max_size=3), inner, max_size=3)
    ),
    max_leaves=80,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_JSON_VALUES, limit=st.integers(0, 70), ascii_only=st.booleans())
def test_nesting_found_from_the_bytes_equals_the_walk(doc: Any, limit: int, ascii_only: bool) -> None:
    """The loader's byte-level nesting check (strings dropped, innermost pairs removed level by level) says
    what walking the parsed value says, for strings full of brackets, quotes and escapes."""
    data = json.dumps(doc, ensure_ascii=ascii_only).encode()
    assert _jsonio.nests_deeper(data, limit) == (_jsonio.depth(doc) > limit)
    deep = b"[" * (limit + 1) + b"]" * (limit + 1)
    assert _jsonio.nests_deeper(deep, limit) and not _jsonio.nests_deeper(deep[1:-1], limit)


@pytest.mark.parametrize("depth", [100, 900, 990, 1000, 1100, 5000, 200_000])
def test_deeply_nested_json_is_refused_or_read(depth: int) -> None:
    """Nesting around Python's recursion limit, in a manifest's `extra` (where the schema allows any
    object), in a safetensors header and in a JSON document: a CheckpointError or a value, nothing else."""
    nested = "[" * depth + "]" * depth
    doc = _manifest_doc()
    text = _jsonio.dumps({k: v for k, v in doc.items() if k != "manifest_checksum"}).decode()
    body = text.replace('"extra":{"note":"fuzz"}', f'"extra":{{"deep":{nested}}}').encode()
    sealed = body[:-2] + b',"manifest_checksum":"' + faults.checksum(body).encode() + b'"}\n'
    for parse in (
        lambda: _manifest.parse(sealed, where="fuzz"),
        lambda: _jsonio.loads(nested.encode(), "deep.json"),
        lambda: _safetensors.parse_header(
            faults.st_pack(f'{{"a":{nested}}}'.encode(), b""), 8 + len(nested) + 8, "deep.safetensors"
        ),
    ):
        with contextlib.suppress(pc.CheckpointError):
            parse()


# --- remote roots: objects changed between listing and reading, a latest naming no manifest -----------
# (tests/faults/remote.py; tests/stress.py --only remote-reads runs every case, on memory:// and on S3)

_MEMORY_READS = faults.remote.read_fault_cases("memory")


@pytest.mark.parametrize(
    ("hook", "file", "mutation"),
    _MEMORY_READS[::3],
    ids=[f"{h}-{f}-{m}" for h, f, m in _MEMORY_READS[::3]],
)
def test_object_changed_between_listing_and_reading(hook: str, file: str, mutation: str) -> None:
    with faults.deadline(60):
        found = faults.remote.read_fault_problems("memory", None, hook, file, mutation, random.Random(0), "suite")
    assert not any(found.values()), found


@pytest.mark.parametrize("case", sorted(faults.remote.LATEST_CASES))
def test_latest_naming_a_step_without_a_manifest(case: str) -> None:
    with faults.deadline(60):
        found = faults.remote.latest_fault_problems("memory", None, case, "suite")
    assert not any(found.values()), found


@contextlib.contextmanager
def _s3() -> Iterator[Any]:
    pytest.importorskip("s3fs", reason="the s3 extra is not installed")
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    with faults.remote.s3_server() as s3:
        yield s3


def test_an_empty_latest_on_s3_falls_back_to_the_scan() -> None:
    with faults.deadline(120), _s3() as s3:
        found = faults.remote.latest_fault_problems("s3", s3, "latest is empty", "suite")
    assert not any(found.values()), found


def test_an_object_emptied_before_its_first_read_on_s3_is_named() -> None:
    with faults.deadline(120), _s3() as s3:
        found = faults.remote.read_fault_problems(
            "s3", s3, "first-read", names.RNG_JSON, "truncated to 0 bytes", random.Random(0), "suite"
        )
    assert not any(found.values()), found


def test_a_zip_version_zipfile_cannot_read_is_refused(tmp_path: Path) -> None:
    ckdir = faults.save_step(tmp_path / "root", 3)
    data = bytearray((ckdir / "optimizer.pt").read_bytes())
    struct.pack_into("<H", data, data.find(b"PK\x01\x02") + 6, 246)
    (ckdir / "optimizer.pt").write_bytes(bytes(data))
    faults.recompute(ckdir)
    with pytest.raises(pc.CheckpointCorruptedError, match=r"optimizer\.pt"):
        pc.load_checkpoint(ckdir, restore_rng=False)
