"""The public API: what portable_ckpt exports, signatures that agree, typed results, one version."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import io
import json
import shutil
import typing
from pathlib import Path

import pytest
import tomllib
import torch

import portable_ckpt
from portable_ckpt import (
    CheckpointInfo,
    CheckpointManager,
    FileInfo,
    Problem,
    SaveHandle,
    TensorInfo,
    ValidationReport,
    inspect_checkpoint,
    load_checkpoint,
    save_checkpoint,
    validate_checkpoint,
)
from portable_ckpt import save as _save
from portable_ckpt.cli import main
from portable_ckpt.format.manifest import LIBRARY_VERSION
from portable_ckpt.report import human_size, render_info, render_validation

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "format_spec" / "vectors"

# Options with a default that may also be passed by position, each on purpose: where the checkpoint
# goes (save_checkpoint's directory, the manager's root), what it is loaded into (model, optimizer),
# and the timeout of a SaveHandle, as concurrent.futures.Future.result takes it.
POSITIONAL_OPTIONS = {
    "save_checkpoint": {"directory"},
    "load_checkpoint": {"model", "optimizer"},
    "CheckpointManager": {"root"},
    "CheckpointManager.restore": {"model", "optimizer"},
    "SaveHandle.wait": {"timeout"},
    "SaveHandle.result": {"timeout"},
}

# The three ways to save take the same state; each may add only its own options.
SAVE_ONLY = {
    # where, whether an existing step may be replaced, and whether to save incrementally (a manager's
    # constructor option: every save of its root is incremental or none is)
    "save_checkpoint": {"directory", "overwrite", "incremental", "part_bytes"},
    "CheckpointManager.save": {"blocking"},  # the manager owns the root; it may write in the background
    "snapshot": {"pool", "incremental", "part_bytes"},  # host buffers a non-blocking save copies into; the split
}


def public_callables() -> dict[str, typing.Callable[..., object]]:
    """Every public function, the constructors of the classes users build, and their public methods."""
    found: dict[str, typing.Callable[..., object]] = {}
    for name in portable_ckpt.__all__:
        obj = getattr(portable_ckpt, name)
        if inspect.isfunction(obj):
            found[name] = obj
        elif inspect.isclass(obj) and not issubclass(obj, BaseException) and not dataclasses.is_dataclass(obj):
            if name not in ("CheckpointReader", "SaveHandle"):  # built by open_checkpoint and save, not by users
                found[name] = obj
            for attr, member in vars(obj).items():
                inherited = any(attr in vars(base) for base in obj.__mro__[1:])  # a base's protocol (DCP's)
                if inspect.isfunction(member) and not attr.startswith("_") and not inherited:
                    found[f"{name}.{attr}"] = member
    return found


def parameters(fn: typing.Callable[..., object]) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(fn).parameters.items() if n != "self"}


def test_every_exported_name_exists_and_none_is_private():
    names = portable_ckpt.__all__
    assert len(names) == len(set(names))
    missing = [n for n in names if not hasattr(portable_ckpt, n)]
    assert missing == []
    assert [n for n in names if n.startswith("_") and n != "__version__"] == []
    defined = {n for n, v in vars(portable_ckpt).items() if not n.startswith("_") and not inspect.ismodule(v)}
    defined |= portable_ckpt._LAZY  # the DCP storage pair: imported on first use (torch.distributed.checkpoint)
    assert defined == set(names) - {"__version__"}  # nothing public-looking that __all__ forgets


def test_public_options_are_keyword_only():
    callables = public_callables()
    assert {"save_checkpoint", "load_checkpoint", "inspect_checkpoint", "CheckpointManager.save"} <= set(callables)
    wrong = {}
    for name, fn in callables.items():
        for p in parameters(fn).values():
            assert p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD), f"{name}(*{p.name}) hides its options"
            if p.default is not p.empty and p.kind != p.KEYWORD_ONLY and p.name not in POSITIONAL_OPTIONS.get(name, ()):
                wrong.setdefault(name, []).append(p.name)
    assert wrong == {}


def test_the_three_save_signatures_agree():
    signatures = {
        "save_checkpoint": parameters(save_checkpoint),
        "CheckpointManager.save": parameters(CheckpointManager.save),
        "snapshot": parameters(_save.snapshot),
    }
    shared = {
        name: {n: p for n, p in params.items() if n not in SAVE_ONLY[name]} for name, params in signatures.items()
    }
    reference = shared["save_checkpoint"]
    assert list(reference)[:5] == ["model", "optimizer", "config", "vocab", "step"]
    for name, params in shared.items():
        # same names, kinds, defaults and annotations; keyword-only ones in any order
        assert {n: (p.kind, p.default, p.annotation) for n, p in params.items()} == {
            n: (p.kind, p.default, p.annotation) for n, p in reference.items()
        }, name
        positional = [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
        assert positional == ["model", "optimizer", "config", "vocab", "step"], name
    for name, only in SAVE_ONLY.items():
        assert only <= set(signatures[name]), name  # the documented differences are really there
    assert signatures["save_checkpoint"]["directory"].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(
        signatures[name][n].kind == inspect.Parameter.KEYWORD_ONLY
        for name in SAVE_ONLY
        for n in SAVE_ONLY[name]
        if n != "directory"
    )


def test_manager_save_overloads_type_the_handle():
    overloads = typing.get_overloads(CheckpointManager.save)
    returns = {
        inspect.signature(f).parameters["blocking"].annotation: inspect.signature(f).return_annotation
        for f in overloads
    }
    assert returns == {"Literal[True]": "Path | str", "Literal[False]": "SaveHandle", "bool": "Path | str | SaveHandle"}
    implementation = parameters(CheckpointManager.save)
    for f in overloads:  # the overloads take exactly the implementation's parameters
        params = parameters(f)
        assert {n: (p.kind, p.annotation) for n, p in params.items() if n != "blocking"} == {
            n: (p.kind, p.annotation) for n, p in implementation.items() if n != "blocking"
        }
    assert inspect.signature(SaveHandle.result).return_annotation == "Path | str"


def test_manager_save_returns_a_path_or_a_handle(tmp_path, trained):
    model, optimizer = trained
    with CheckpointManager(tmp_path / "root") as manager:
        path = manager.save(model, optimizer, {"lr": 0.1}, ["a"], 1)
        assert path == manager.latest() == tmp_path / "root" / "step-00000001"
        handle = manager.save(model, optimizer, {"lr": 0.1}, ["a"], 2, blocking=False)
        assert isinstance(handle, SaveHandle)
        assert handle.result() == tmp_path / "root" / "step-00000002" and handle.done()
        assert manager.latest() == handle.result()
    assert load_checkpoint(handle.result(), restore_rng=False).step == 2


def test_one_version_everywhere(tmp_path):
    source = (ROOT / "portable_ckpt" / "version.py").read_text()
    assert f'\n__version__ = "{portable_ckpt.__version__}"\n' in source
    assert LIBRARY_VERSION is portable_ckpt.__version__  # what manifests record as the producer version
    assert importlib.metadata.version("portable-ckpt") == portable_ckpt.__version__
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["hatch"]["version"]["path"] == "portable_ckpt/version.py"
    path = save_checkpoint({"w": torch.ones(2)}, None, {}, None, 0, tmp_path)
    producer = json.loads((path / "manifest.json").read_text())["producer"]
    assert (producer["name"], producer["version"]) == ("portable-ckpt", portable_ckpt.__version__)


@pytest.fixture
def ckpt(tmp_path, trained) -> Path:
    model, optimizer = trained
    return save_checkpoint(model, optimizer, {"lr": 0.1}, ["a", "b"], 12, tmp_path / "root")


def test_inspect_checkpoint_returns_typed_values(ckpt):
    info = inspect_checkpoint(ckpt.parent)  # a root: its newest checkpoint
    assert isinstance(info, CheckpointInfo)
    assert (info.path, info.format_version, info.step) == (ckpt, 1, 12)
    assert info.producer is not None and info.producer["version"] == portable_ckpt.__version__
    assert info.created_at is not None and info.created_at.endswith("Z")
    assert [f.name for f in info.files] == [
        "config.json",
        "model.safetensors",
        "optimizer.pt",
        "rng.json",
        "rng.safetensors",
        "vocab.json",
    ]
    assert FileInfo("config.json", (ckpt / "config.json").stat().st_size) in info.files
    assert TensorInfo("lin.weight", "F32", (6, 6)) in info.tensors
    assert TensorInfo("count", "I64", ()) in info.tensors
    assert info.aliases == {"head.weight": "emb.weight"}
    assert "torch.cpu" in info.rng and info.quantization is None and info.unknown_files == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.step = 13  # type: ignore[misc]
    assert not hasattr(info, "__dict__")  # slots


def test_inspect_to_json_is_the_cli_json(ckpt):
    out = io.StringIO()
    assert main(["inspect", "--json", str(ckpt)], out=out) == 0
    assert inspect_checkpoint(ckpt).to_json() == json.loads(out.getvalue())
    assert set(json.loads(out.getvalue())) == {
        "path",
        "format_version",
        "step",
        "created_at",
        "producer",
        "files",
        "tensors",
        "aliases",
        "rng",
        "quantization",
        "unknown_files",
    }


def test_inspect_format0_keeps_its_json_keys(tmp_path):
    src = tmp_path / "legacy"
    shutil.copytree(VECTORS / "valid-legacy", src)
    info = inspect_checkpoint(src)
    assert (info.format_version, info.step, info.created_at, info.producer, info.rng) == (0, 42, None, None, ())
    assert info.to_json() == {
        "path": str(src),
        "format_version": 0,
        "step": 42,
        "files": [
            {"name": name, "size": (src / name).stat().st_size}
            for name in ("config.json", "metadata.json", "model.pt", "optimizer.pt", "vocab.json")
        ],
        "tensors": [
            {"name": "emb.weight", "dtype": "F32", "shape": [8, 4]},
            {"name": "head.weight", "dtype": "F32", "shape": [8, 4]},
            {"name": "lin.bias", "dtype": "F32", "shape": [4]},
            {"name": "lin.weight", "dtype": "F32", "shape": [4, 4]},
        ],
        "aliases": {},
        "quantization": None,
    }


def test_validate_checkpoint_reports_values(ckpt):
    report = validate_checkpoint(ckpt)
    assert report == ValidationReport(path=ckpt, problems=()) and report.valid
    assert validate_checkpoint(str(ckpt)).path == str(ckpt)  # the path as the caller named it
    (ckpt / "vocab.json").unlink()
    report = validate_checkpoint(ckpt)
    assert not report.valid
    assert report.problems == (
        Problem(
            file=f"{ckpt}/vocab.json",
            message="vocab.json is listed in the manifest but missing",
            error="CheckpointNotFoundError",
        ),
    )
    assert report.to_json() == {
        "path": str(ckpt),
        "valid": False,
        "problems": [
            {
                "file": f"{ckpt}/vocab.json",
                "message": "vocab.json is listed in the manifest but missing",
                "error": "CheckpointNotFoundError",
            }
        ],
    }


def test_validate_never_raises_for_a_missing_path(tmp_path):
    report = validate_checkpoint(tmp_path / "nowhere")
    assert [(p.file, p.error) for p in report.problems] == [(str(tmp_path / "nowhere"), "CheckpointNotFoundError")]


def test_render_validation_lines(ckpt, tmp_path):
    missing = tmp_path / "missing\x1b[2J"
    text = render_validation([validate_checkpoint(ckpt), validate_checkpoint(missing)])
    escaped = str(missing).replace("\x1b", "\\x1b")
    assert text == (
        f"ok       {ckpt}\nINVALID  {escaped}: {escaped}: no such checkpoint or directory [CheckpointNotFoundError]\n"
    )
    assert render_validation([]) == ""


def test_render_info_text(tmp_path):
    path = save_checkpoint(
        {"b": torch.zeros(3, dtype=torch.float16), "a": torch.ones(2, 2)}, None, {}, None, 5, tmp_path
    )
    info = inspect_checkpoint(path)
    sizes = {f.name: human_size(f.size) for f in info.files}
    assert render_info(info).splitlines() == [
        f"checkpoint      {path}",
        "format_version  1",
        "step            5",
        f"created_at      {info.created_at}",
        f"producer        portable-ckpt {portable_ckpt.__version__}, torch {torch.__version__}",
        "files",
        *(f"  {name:32} {size:>12}" for name, size in sizes.items()),
        "tensors (2)",
        "  a                                        F32    [2, 2]",
        "  b                                        F16    [3]",
        "quantization    none (full precision)",
    ]


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (8384, "8.2 KiB"), (3 << 29, "1.5 GiB"), (5 << 40, "5120.0 GiB")],
)
def test_human_size(n, text):
    assert human_size(n) == text
