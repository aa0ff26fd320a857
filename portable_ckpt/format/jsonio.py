"""Deterministic JSON out, strict and bounded JSON in."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from portable_ckpt.errors import CheckpointCorruptedError, CheckpointInputError

MAX_JSON_BYTES = 64 * 1024 * 1024  # the spec's limit for any JSON document of a checkpoint


def dumps(doc: Any) -> bytes:
    """Canonical bytes: UTF-8, sorted keys, no spaces, one trailing newline."""
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8") + b"\n"


def to_json_value(value: Any, path: str) -> Any:
    """A plain JSON value equal to ``value`` (tuples become lists, dataclasses dicts), or a clear error.

    ``path`` names the argument in messages, e.g. ``config["optim"]["betas"][0]``.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CheckpointInputError(f"{path} is {value!r}: JSON has no NaN or Infinity; store a finite number")
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointInputError(f"{path} has key {k!r} of type {type(k).__name__}; JSON keys are strings")
            out[k] = to_json_value(v, f"{path}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_json_value(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise CheckpointInputError(
        f"{path} is a {type(value).__module__}.{type(value).__qualname__}, which is not a JSON value "
        "(use dict, list, str, int, float, bool or None)"
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook for json.loads that refuses duplicate keys (two readers could pick different ones)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {duplicate!r}")
    return out


def loads(data: bytes, filename: str) -> Any:
    """Parse one JSON document of a checkpoint; every failure is a CheckpointCorruptedError naming the file."""
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointCorruptedError(f"{filename}: {len(data)} bytes exceeds the JSON limit of {MAX_JSON_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointCorruptedError(f"{filename}: not UTF-8 (byte {e.start})") from None
    try:
        doc = json.loads(
            text, parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=unique_keys
        )
        dumps(doc)  # refuses what cannot be written back: lone surrogates ("\\ud800")
        return doc
    except json.JSONDecodeError as e:
        raise CheckpointCorruptedError(
            f"{filename}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except UnicodeEncodeError:
        raise CheckpointCorruptedError(f"{filename}: invalid JSON: a string holds a lone surrogate") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointCorruptedError(f"{filename}: invalid JSON: {e}") from None
