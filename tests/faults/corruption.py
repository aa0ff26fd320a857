"""The corruption catalog (one :class:`Case` per damage, for every file of a checkpoint) and
:func:`run_case`, which tries a case with and without verification, with and without recomputed
checksums, and through ``portable-ckpt validate``, and classifies what happened.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import portable_ckpt as pc
from faults.damage import (
    delete_file,
    edit_bytes,
    edit_json,
    edit_manifest,
    edit_st,
    flip,
    manifest_edits,
    replace_file,
    set_field,
    st_attacks,
    symlink_out,
    truncate,
)
from faults.files import recompute
from faults.hostile import evil_raw_pickle, evil_torch_file, torch_bytes, zip_of
from faults.inject import Hang, deadline
from faults.states import FILES, QUANT_FILE, preserved_rng
from portable_ckpt import cli
from portable_ckpt.format import jsonio as _jsonio

REFUSALS: tuple[type[BaseException], ...] = (pc.CheckpointCorruptedError, pc.CheckpointNotFoundError)


@dataclass(frozen=True)
class Case:
    """One way to damage one file of a checkpoint.

    ``attacker``: how an attacker would make the damaged checkpoint consistent again, tried as a second
    variant: "files" (recompute every size and checksum, reseal the manifest), "seal" (reseal the edited
    manifest only), or None (nothing to recompute). ``checksum_only``: only the checksums can see this
    damage (a flipped data byte), so with verify=False loading it is allowed; every other case must be
    refused in every variant. ``names``: a refusal must name one of these files.
    """

    id: str
    file: str
    apply: Callable[[Path], None]
    attacker: str | None
    names: tuple[str, ...]
    quantized: bool = False
    checksum_only: bool = False


_INVALID_JSON = {
    "empty": b"",
    "whitespace": b" \n",
    "unterminated": b'{"a": ',
    "single-quotes": b"{'a': 1}",
    "trailing-comma": b'{"a": 1,}',
    "nan": b'{"a": NaN}',
    "infinity": b'{"a": -Infinity}',
    "beyond-binary64": b'{"a": 1e400}',
    "duplicate-keys": b'{"a": 1, "a": 2}',
    "non-utf8": b'{"a": "\xff"}',
    "utf8-bom": b'\xef\xbb\xbf{"a": 1}',
    "lone-surrogate": b'{"a": "\\ud800"}',
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
    "two-documents": b"{} {}",
}

# JSON file -> valid JSON that is wrong for it (schema violations, wrong types)
_WRONG_JSON: dict[str, dict[str, Any]] = {
    "config.json": {"array": [1, 2], "string": "lr=3e-4", "null": None, "number": 3},
    "vocab.json": {
        "negative-id": {"a": -1},
        "string-id": {"a": "1"},
        "float-id": {"a": 1.5},
        "bool-id": {"a": True},
        "int-tokens": [1, 2],
        "nested": [["a"]],
        "string": "abc",
    },
    "rng.json": {
        "empty": {},
        "python-version-2": {
            "python": {"version": 2, "gauss_next": None},
            "numpy": None,
            "torch": {"cpu": True, "cuda_devices": 0},
        },
        "numpy-pos-625": {
            "python": None,
            "numpy": {"bit_generator": "MT19937", "pos": 625, "has_gauss": 0, "cached_gaussian": 0.0},
            "torch": {"cpu": True, "cuda_devices": 0},
        },
        "cuda-devices-string": {"python": None, "numpy": None, "torch": {"cpu": True, "cuda_devices": "2"}},
        "array": [1],
    },
    QUANT_FILE: {"empty": {}, "array": [], "null": None},
}

# semantic damage to JSON that stays schema-valid but disagrees with another file
_SEMANTIC_JSON: dict[str, dict[str, tuple[Callable[[Any], Any], tuple[str, ...]]]] = {
    "rng.json": {"cuda-devices-absent": (set_field(["torch", "cuda_devices"], 2), ("rng.safetensors",))},
    QUANT_FILE: {
        "bits-4-vs-manifest": (lambda d: d.update(bits=4, packing="int4-in-int32-lsb-first"), ()),
        "mode-qat-vs-manifest": (set_field(["mode"], "qat"), ()),
        "module-shape-wrong": (lambda d: set_field(["shape"], [7, 7])(d["modules"][0]), ()),
        "module-tensor-missing": (
            lambda d: d["modules"][0]["tensors"].update(
                weight={"name": "ghost.weight", "dtype": "I8", "shape": [1, 1]}
            ),
            (),
        ),
        "bits-3": (set_field(["bits"], 3), ()),
        "format_version-string": (set_field(["format_version"], "1"), ()),
        "unknown-field": (set_field(["signed_by"], "me"), ()),
        "modules-empty": (set_field(["modules"], []), ()),
        "duplicate-module": (lambda d: d["modules"].append(d["modules"][0]), ()),
    },
}

_FLIPS_GENERIC = ("0", "1", "8", "third", "half", "2third", "end-2", "end-1")
_FLIPS_ST = ("len0", "len1", "len3", "len7", "hdr-first", "hdr-mid", "hdr-last", "data-first", "data-mid", "data-last")
_FLIPS_PT = ("0", "4", "30", "third", "half", "2third", "end-22", "end-2", "end-1")
_TRUNCATIONS = ("0", "1", "7", "8", "third", "half", "end-2", "end-1")


def corruption_cases(model_names: Sequence[str] = ("emb.weight",), *, quantized: bool = False) -> list[Case]:
    """Every damage, for every file of a TinyModel checkpoint (or, with ``quantized``, of a quantized one).

    ``model_names``: tensor names of the checkpoint (the first is used by tensor-table edits).
    """
    cases: list[Case] = []

    def add(
        file: str,
        kind: str,
        apply: Callable[[Path], None],
        attacker: str | None,
        names: tuple[str, ...] = (),
        checksum_only: bool | None = None,
    ) -> None:
        only = attacker is None if checksum_only is None else checksum_only
        cases.append(
            Case(f"{'q:' if quantized else ''}{file}:{kind}", file, apply, attacker, (file, *names), quantized, only)
        )

    files = (QUANT_FILE,) if quantized else FILES
    for name in files:
        is_json, is_st, is_pt = name.endswith(".json"), name.endswith(".safetensors"), name.endswith(".pt")
        add(name, "deleted", delete_file(name), "files")
        if name != "manifest.json":
            # a link to other bytes: for safetensors data only the checksum can tell (links are followed)
            add(name, "symlink-out", symlink_out(name), None, checksum_only=is_st)
        for t in _TRUNCATIONS:
            if name == "manifest.json" and t == "end-1":
                continue  # drops only the final newline: the same manifest
            structural = not (is_json and t == "end-1")
            add(name, f"truncated@{t}", edit_bytes(name, truncate(t)), "files" if structural else None)
        add(name, "appended-byte", edit_bytes(name, lambda b: b + b"\0"), "files" if not is_pt else None)
        positions = _FLIPS_ST if is_st else _FLIPS_PT if is_pt else _FLIPS_GENERIC
        for p in positions:
            structural = is_st and p.startswith("len")
            add(name, f"flip@{p}^01", edit_bytes(name, flip(p, 0x01)), "files" if structural else None)
        for p in ("hdr-mid",) if is_st else ("half",) if is_json else ():
            add(name, f"flip@{p}^80", edit_bytes(name, flip(p, 0x80)), "files")  # not UTF-8 any more
        if is_json:
            for kind, content in _INVALID_JSON.items():
                add(name, f"invalid-json:{kind}", replace_file(name, content), "files")
            for kind, doc in _WRONG_JSON.get(name, {}).items():
                add(name, f"wrong:{kind}", replace_file(name, _jsonio.dumps(doc)), "files")
            for kind, (edit, names) in _SEMANTIC_JSON.get(name, {}).items():
                add(name, f"semantic:{kind}", edit_json(name, edit), "files", names)
        if is_st:
            for kind, edit in st_attacks().items():
                add(name, f"st:{kind}", edit_st(name, edit), "files")
        if is_pt:
            add(name, "pt:not-a-zip", replace_file(name, b"PK\x03\x04" + bytes(60)), "files")
            add(name, "pt:zip-without-pickle", replace_file(name, zip_of({"archive/version": b"3\n"})), "files")
            add(name, "pt:list-not-dict", replace_file(name, torch_bytes([1, 2, 3])), "files")
            add(
                name,
                "pt:evil-exec",
                lambda d, name=name: (d / name).write_bytes(evil_torch_file(d.parent / "PWNED")),
                "files",
            )
            add(
                name,
                "pt:evil-raw-pickle",
                lambda d, name=name: (d / name).write_bytes(evil_raw_pickle(d.parent / "PWNED")),
                "files",
            )
    if not quantized:
        for kind, (edit, names) in manifest_edits(model_names).items():
            if kind.startswith("manifest_checksum"):  # resealing would repair it: only the plain variant
                add("manifest.json", f"edit:{kind}", edit_manifest(edit), None, names, checksum_only=False)
            else:
                add(
                    "manifest.json",
                    f"edit:{kind}",
                    edit_manifest(edit),
                    "seal",
                    names,
                    checksum_only=kind == "files-checksum-wrong",
                )
    return cases


# what a try of a case may end in: "refused" and "loaded-unverified" keep the promises; "silent" (damage
# loaded), "unexpected" (an exception outside CheckpointError), "wrong-error", "unnamed" (the message does
# not name the file), "hang", "cli" (validate did not exit 1) and "code-ran" (a pickle ran code) break them
ALLOWED = ("refused", "loaded-unverified")


@dataclass(frozen=True)
class Outcome:
    variant: str
    result: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.result in ALLOWED


def _try_load(ckdir: Path, case: Case, *, verify: bool) -> tuple[str, str]:
    """Load once; classify what happened."""
    try:
        with deadline(20), preserved_rng():
            pc.load_checkpoint(ckdir, verify=verify)
    except REFUSALS as e:
        if not any(n in str(e) for n in case.names):
            return "unnamed", f"{type(e).__name__}: {e}"
        return "refused", f"{type(e).__name__}: {str(e)[:200]}"
    except pc.CheckpointError as e:
        if verify:
            return "wrong-error", f"{type(e).__name__}: {e}"
        return "refused", f"{type(e).__name__}: {str(e)[:200]}"
    except Hang as e:
        return "hang", str(e)
    except Exception as e:  # anything else is a finding, reported with its type
        return "unexpected", f"{type(e).__module__}.{type(e).__qualname__}: {str(e)[:300]}"
    if verify or not case.checksum_only:
        return "silent", "loaded without an error"
    return "loaded-unverified", "loaded (damage only checksums can see, verify=False)"


def _try_cli(ckdir: Path) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        with deadline(20):
            code = cli.main(["validate", str(ckdir)], out=out, err=err)
    except Hang as e:
        return "hang", f"validate: {e}"
    except Exception as e:  # anything else is a finding
        return "unexpected", f"validate raised {type(e).__module__}.{type(e).__qualname__}: {str(e)[:300]}"
    if code != 1:
        return "cli", f"validate exited {code}: {out.getvalue()[:200]}{err.getvalue()[:200]}"
    return "refused", out.getvalue().strip()[:200]


def run_case(case: Case, pristine: Path, work: Path) -> list[Outcome]:
    """Try ``case`` on a fresh copy of ``pristine`` (a checkpoint directory named step-NNNNNNNN).

    Variants: as damaged, then (when the damage is structural) with every checksum recomputed; each loaded
    with verify=True and verify=False and run through ``portable-ckpt validate``.
    """
    outcomes = []
    marker = work / "PWNED"
    for attacker in (False, True) if case.attacker else (False,):
        tag = ("attacker+" if attacker else "") + case.id
        copy = work / ("attacker" if attacker else "plain") / pristine.name
        if copy.parent.exists():
            shutil.rmtree(copy.parent)
        copy.parent.mkdir(parents=True)
        shutil.copytree(pristine, copy)
        case.apply(copy)
        if attacker:
            recompute(copy, files=case.attacker == "files")
        marker = copy.parent / "PWNED"
        for verify in (True, False):
            result, detail = _try_load(copy, case, verify=verify)
            outcomes.append(Outcome(f"{tag} verify={verify}", result, detail))
        result, detail = _try_cli(copy)
        outcomes.append(Outcome(f"{tag} cli", result, detail))
        if marker.exists():
            outcomes.append(Outcome(f"{tag} pickle", "code-ran", f"{marker} was created"))
    return outcomes
