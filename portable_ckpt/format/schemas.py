"""The published JSON Schemas (``schemas/``) and validation against them."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from portable_ckpt.errors import CheckpointCorruptedError

# document kind -> schema file; the same files ship in the wheel as portable_ckpt/schemas/
SCHEMA_FILES = {
    "manifest": "manifest.schema.json",
    "vocab": "vocab.schema.json",
    "rng": "rng.schema.json",
    "quantization_metadata": "quantization_metadata.schema.json",
    "legacy_metadata": "legacy_metadata.schema.json",
    "states": "states.schema.json",
    "sharding": "sharding.schema.json",
}


def schema_dir() -> Path:
    """Installed wheels carry the schemas inside the package; a source checkout has them at the top."""
    packaged = Path(str(resources.files("portable_ckpt"))) / "schemas"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "schemas"


@cache
def schema(kind: str) -> dict[str, Any]:
    with open(schema_dir() / SCHEMA_FILES[kind], encoding="utf-8") as f:
        doc: dict[str, Any] = json.load(f)
    return doc


@cache
def _validator(kind: str) -> jsonschema.protocols.Validator:
    return _STRICT(schema(kind))


def _is_plain_integer(checker: Any, value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# JSON Schema counts 3.0 as an integer; a step, a size or a bit count written as 3.0 is refused here:
# the spec requires integers without a fraction or exponent.
_STRICT = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_plain_integer),
)


def _where(path: Any) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def validate(
    doc: Any,
    kind: str,
    filename: str,
    error: type[CheckpointCorruptedError] = CheckpointCorruptedError,
) -> None:
    """Raise ``error`` naming the file, the location and the broken rule when ``doc`` violates its schema."""
    found = jsonschema.exceptions.best_match(_validator(kind).iter_errors(doc))
    if found is not None:
        message = found.message if len(found.message) <= 300 else found.message[:300] + "..."
        raise error(f"{filename}: schema violation at {_where(found.absolute_path)}: {message}", file=filename)
