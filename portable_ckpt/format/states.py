"""The state of user objects (data loaders, samplers, EMAs, callbacks) and user-held ``torch.Generator``s,
without pickle: ``states.json`` holds every value in a typed JSON encoding, ``states.safetensors`` the
tensors it refers to (format_spec/README.md §10a).

Encoding of a value (``encode``/``decode`` are exact inverses):

- ``null``, booleans, strings, finite numbers: themselves (integers within int64);
- a list: a JSON array of encoded items;
- a dict whose keys are strings not starting with ``$``: a JSON object of encoded values;
- ``{"$tuple": [...]}``, ``{"$dict": [[key, value], ...]}`` (any other keys: int, float, bool, None, str, tuple),
  ``{"$float": "nan" | "inf" | "-inf"}``, ``{"$tensor": "<name in states.safetensors>"}``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from portable_ckpt.errors import CheckpointCorruptedError, CheckpointInputError

FORMAT_VERSION = 1
OBJECT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")  # matched whole
KINDS = ("stateful", "generator")
_INT64 = (-(2**63), 2**63)
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_MAX_DEPTH = 64


def _float_key(value: float) -> str | None:
    return next((k for k, v in _FLOATS.items() if v == value or (math.isnan(v) and math.isnan(value))), None)


class _Encoder:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.tensors: dict[str, torch.Tensor] = {}

    def tensor(self, t: torch.Tensor) -> dict[str, str]:
        name = f"{self.owner}/{len(self.tensors)}"
        if t.layout != torch.strided:
            raise CheckpointInputError(f"states[{self.owner!r}]: a tensor has layout {t.layout}; store it dense")
        self.tensors[name] = t.detach().resolve_conj().resolve_neg()
        return {"$tensor": name}

    def value(self, v: Any, path: str, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise CheckpointInputError(f"{path}: nested deeper than {_MAX_DEPTH} levels; flatten the state")
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            if not _INT64[0] <= v < _INT64[1]:
                raise CheckpointInputError(f"{path} is {v}, outside int64; store it as a string")
            return int(v)
        if isinstance(v, float):
            key = _float_key(v) if not math.isfinite(v) else None
            return {"$float": key} if key is not None else float(v)
        if isinstance(v, torch.Tensor):
            return self.tensor(v)
        if isinstance(v, tuple):
            return {"$tuple": [self.value(x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [self.value(x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v)]
        if isinstance(v, Mapping):
            if all(isinstance(k, str) and not k.startswith("$") for k in v):
                return {k: self.value(x, f"{path}[{k!r}]", depth + 1) for k, x in v.items()}
            return {"$dict": [[self.key(k, path), self.value(x, f"{path}[{k!r}]", depth + 1)] for k, x in v.items()]}
        raise CheckpointInputError(
            f"{path} is a {type(v).__module__}.{type(v).__qualname__}, which a checkpoint stores without pickle "
            "only as None, bool, int, float, str, list, tuple, dict or torch.Tensor; convert it in the object's "
            "state_dict()"
        )

    def key(self, k: Any, path: str) -> Any:
        if k is None or isinstance(k, (bool, int, float, str, tuple)):
            return self.value(k, f"{path} key {k!r}")
        raise CheckpointInputError(f"{path} has key {k!r} of type {type(k).__name__}; keys must be plain values")


def encode(objects: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the states.json document, the tensors of states.safetensors) for name -> Stateful or Generator."""
    doc: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, obj in objects.items():
        if not isinstance(name, str) or not OBJECT_NAME.fullmatch(name):
            raise CheckpointInputError(
                f"states: name {name!r} is not allowed (letters, digits, '_', '.', '-'; at most 200; "
                "not starting with '.' or '-')"
            )
        enc = _Encoder(name)
        if isinstance(obj, torch.Generator):
            doc[name] = {"kind": "generator", "device": str(obj.device), "state": enc.tensor(obj.get_state())}
        elif callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
            doc[name] = {"kind": "stateful", "state": enc.value(obj.state_dict(), f"states[{name!r}].state_dict()")}
        else:
            raise CheckpointInputError(
                f"states[{name!r}] is a {type(obj).__qualname__}; pass objects with state_dict() and "
                "load_state_dict(), or torch.Generator objects"
            )
        tensors.update(enc.tensors)
    return {"format_version": FORMAT_VERSION, "objects": doc}, tensors


class _Decoder:
    def __init__(self, tensors: Mapping[str, torch.Tensor], filename: str) -> None:
        self.tensors = tensors
        self.filename = filename
        self.used: set[str] = set()

    def bad(self, what: str) -> CheckpointCorruptedError:
        return CheckpointCorruptedError(f"{self.filename}: {what}", file=self.filename)

    def value(self, v: Any, path: str, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise self.bad(f"{path}: nested deeper than {_MAX_DEPTH} levels")
        if v is None or isinstance(v, (bool, str, int, float)):
            return v
        if isinstance(v, list):
            return [self.value(x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v)]
        if not isinstance(v, dict):
            raise self.bad(f"{path}: not a JSON value")
        marker = next((k for k in v if k.startswith("$")), None)
        if marker is None:
            return {k: self.value(x, f"{path}.{k}", depth + 1) for k, x in v.items()}
        if len(v) != 1:
            raise self.bad(f"{path}: an object with {marker!r} must have no other member")
        body = v[marker]
        if marker == "$tensor" and isinstance(body, str):
            if body not in self.tensors:
                raise self.bad(f'{path}: tensor "{body}" is not in states.safetensors')
            self.used.add(body)
            return self.tensors[body]
        if marker == "$tuple" and isinstance(body, list):
            return tuple(self.value(x, f"{path}[{i}]", depth + 1) for i, x in enumerate(body))
        if marker == "$float" and body in _FLOATS:
            return _FLOATS[body]
        if marker == "$dict" and isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body):
            out = {}
            for i, (k, x) in enumerate(body):
                key = self.value(k, f"{path}[{i}][0]", depth + 1)
                try:
                    out[key] = self.value(x, f"{path}[{i}][1]", depth + 1)
                except TypeError:  # an unhashable key (a list)
                    raise self.bad(f"{path}[{i}][0]: a key must be a plain value or a tuple") from None
            if len(out) != len(body):
                raise self.bad(f"{path}: duplicate keys")
            return out
        raise self.bad(f"{path}: {marker!r} with a body of type {type(body).__name__} is not a known encoding")


def decode(doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], filename: str) -> dict[str, dict[str, Any]]:
    """name -> {"kind", "state"} (and "device" for generators), with every tensor reference resolved.

    ``doc`` has passed the schema; every tensor of states.safetensors must be referenced exactly once.
    """
    dec = _Decoder(tensors, filename)
    out: dict[str, dict[str, Any]] = {}
    for name, entry in doc["objects"].items():
        decoded = {**entry, "state": dec.value(entry["state"], f"$.objects.{name}.state")}
        if entry["kind"] == "generator":
            state = decoded["state"]
            if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
                raise dec.bad(f"$.objects.{name}.state: a generator state must be a 1-d uint8 tensor")
        out[name] = decoded
    unused = sorted(set(tensors) - dec.used)
    if unused:
        raise dec.bad(f"tensors {unused[:5]} of states.safetensors are referenced by no object")
    return out


class _NoTensors(_Encoder):
    def tensor(self, t: torch.Tensor) -> dict[str, str]:
        raise CheckpointInputError(f"{self.owner}: a tensor inside a non-tensor value; make it its own state entry")


def encode_value(value: Any, path: str) -> Any:
    """One value without tensors in the typed JSON encoding (the non-tensor entries of sharding.json)."""
    return _NoTensors(path).value(value, path)


def decode_value(doc: Any, path: str, filename: str) -> Any:
    """The inverse of ``encode_value``; a ``$tensor`` reference is refused (there is no tensor file)."""
    return _Decoder({}, filename).value(doc, path)
