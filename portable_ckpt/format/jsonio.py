"""Deterministic JSON out, strict and bounded JSON in."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from portable_ckpt.errors import CheckpointCorruptedError, CheckpointInputError

MAX_JSON_BYTES = 64 * 1024 * 1024  # the spec's limit for any JSON file of a checkpoint
MAX_DEPTH = 64  # arrays and objects nested in one another, in any JSON text of a checkpoint
INT_MIN, INT_END = -(2**63), 2**64  # every JSON integer of a checkpoint lies in [INT_MIN, INT_END)
_INT_DIGITS = len(str(INT_END))  # a longer literal is out of range before it is converted
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")  # the only way JSON text can spell a surrogate


def dumps(doc: Any) -> bytes:
    """Canonical bytes: UTF-8, sorted keys, no spaces, one trailing newline."""
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8") + b"\n"


def to_json_value(value: Any, path: str, *, depth: int = 0) -> Any:
    """A plain JSON value equal to ``value`` (tuples become lists, dataclasses dicts), or a clear error.

    ``path`` names the argument in messages, e.g. ``config["optim"]["betas"][0]``. Integers must lie in
    [-2**63, 2**64) and containers nest at most ``MAX_DEPTH`` deep (a cycle is refused that way too).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if _is_numpy_scalar(value):  # np.float32, np.int64, np.bool_, ...: the Python value equal to it
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if not INT_MIN <= value < INT_END:
            raise CheckpointInputError(
                f"{path} is an integer of {value.bit_length()} bits: JSON integers of a checkpoint lie in "
                "[-2**63, 2**64); store it as a string"
            )
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CheckpointInputError(f"{path} is {value!r}: JSON has no NaN or Infinity; store a finite number")
        return float(value)
    if isinstance(value, (Mapping, list, tuple)) and depth >= MAX_DEPTH:
        raise CheckpointInputError(
            f"{path} is nested more than {MAX_DEPTH} containers deep (or holds itself); flatten it"
        )
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointInputError(
                    f"{path} has key {k!r} of type {type(k).__name__}; JSON keys are strings, and a key changed "
                    "to a string would not load back equal: convert the keys yourself ({str(k): v ...}; a Hugging "
                    "Face config does so in to_json_string() and turns id2label's keys back into ints on load)"
                )
            out[k] = to_json_value(v, f"{path}[{k!r}]", depth=depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [to_json_value(v, f"{path}[{i}]", depth=depth + 1) for i, v in enumerate(value)]
    raise CheckpointInputError(
        f"{path} is a {type(value).__module__}.{type(value).__qualname__}, which is not a JSON value "
        "(use dict, list, str, int, float, bool, None, or a NumPy scalar; an array or a tensor belongs in the "
        "model state or in states=, not in a JSON document)"
    )


_NUMPY_KINDS = frozenset("biuf")  # bool, signed, unsigned, float: exact as Python bool, int, float


def _is_numpy_scalar(value: Any) -> bool:
    """A NumPy scalar whose Python value is equal to it (without importing NumPy)."""
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    return type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and kind in _NUMPY_KINDS


def depth(doc: Any) -> int:
    """How deep arrays and objects nest in ``doc`` (a scalar is 0, ``[]`` is 1), without recursion."""
    deepest = 0
    stack = [(doc, 1)] if isinstance(doc, (dict, list)) else []
    while stack:
        value, level = stack.pop()
        deepest = max(deepest, level)
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, level + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)  # a JSON string literal, escapes included
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def nests_deeper(data: bytes, limit: int) -> bool:
    """Whether the valid JSON text ``data`` nests arrays and objects deeper than ``limit``, found from its
    bytes at C speed: drop the strings, keep the brackets, then remove the innermost empty pairs, one level
    per pass (``depth(doc)`` walks every value in Python: 10,000 tensors' header cost it 30 ms)."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKET)
    for _ in range(limit):
        if not brackets:
            return False
        brackets = _EMPTY_PAIR.sub(b"", brackets)
    return bool(brackets)


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def bounded_int(text: str) -> int:
    """parse_int for json.loads: an integer literal in [-2**63, 2**64), refused from its length when longer."""
    value = int(text) if len(text) <= _INT_DIGITS else None
    if value is None or not INT_MIN <= value < INT_END:
        shown = text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"
        raise ValueError(f"integer {shown} is outside [-2**63, 2**64)")
    return value


def has_lone_surrogate(data: bytes, doc: Any) -> bool:
    """Whether a string of ``doc`` (parsed from ``data``) holds a lone surrogate, which has no UTF-8 form."""
    if _SURROGATE_ESCAPE.search(data) is None:  # no \uD800-\uDFFF escape: no surrogate at all
        return False
    try:
        dumps(doc)
    except UnicodeEncodeError:
        return True
    return False


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
        raise CheckpointCorruptedError(
            f"{filename}: {len(data)} bytes exceeds the JSON limit of {MAX_JSON_BYTES}", file=filename
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointCorruptedError(f"{filename}: not UTF-8 (byte {e.start})", file=filename) from None
    try:
        doc = json.loads(
            text,
            parse_constant=reject_constant,
            parse_float=_finite_float,
            parse_int=bounded_int,
            object_pairs_hook=unique_keys,
        )
    except json.JSONDecodeError as e:
        raise CheckpointCorruptedError(
            f"{filename}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}", file=filename
        ) from None
    except (ValueError, RecursionError) as e:
        raise CheckpointCorruptedError(f"{filename}: invalid JSON: {e}", file=filename) from None
    # cheap first: fewer brackets than the limit cannot nest deeper than it
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH and nests_deeper(data, MAX_DEPTH):
        raise CheckpointCorruptedError(
            f"{filename}: invalid JSON: arrays and objects nest deeper than the limit of {MAX_DEPTH}", file=filename
        )
    if has_lone_surrogate(data, doc):
        raise CheckpointCorruptedError(f"{filename}: invalid JSON: a string holds a lone surrogate", file=filename)
    return doc
