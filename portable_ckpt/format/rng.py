"""Random generator state without pickle: state words as tensors, the rest as JSON.

Sources: Python's ``random``, NumPy's global generator (when NumPy is installed), the torch CPU
generator, and each CUDA device's generator when CUDA has been initialised.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import torch

from portable_ckpt.errors import CheckpointCorruptedError

TENSOR_FILE = "rng.safetensors"
JSON_FILE = "rng.json"


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def capture() -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """(tensors for rng.safetensors, the rng.json document, the manifest's list of sources)."""
    tensors: dict[str, torch.Tensor] = {"torch.cpu": torch.get_rng_state()}
    version, words, gauss_next = random.getstate()
    tensors["python"] = torch.tensor(words, dtype=torch.int64)
    doc: dict[str, Any] = {"python": {"version": version, "gauss_next": gauss_next}, "numpy": None}
    np = _numpy()
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
        doc["numpy"] = {
            "bit_generator": name,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    cuda_devices = 0
    if "torch.cuda" in sys.modules and torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch.cuda.{i}"] = state
        cuda_devices = torch.cuda.device_count()
    doc["torch"] = {"cpu": True, "cuda_devices": cuda_devices}
    return tensors, doc, sorted(tensors)


def _need(
    tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple[int, ...] | None
) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise CheckpointCorruptedError(f'{TENSOR_FILE}: tensor "{name}" is missing but {JSON_FILE} lists it')
    if t.dtype != dtype or (shape is not None and tuple(t.shape) != shape):
        raise CheckpointCorruptedError(
            f'{TENSOR_FILE}: tensor "{name}" is {t.dtype} {list(t.shape)}, expected {dtype} '
            f"{list(shape) if shape else '[n]'}"
        )
    return t


def check(tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
    """Everything ``restore`` needs is present and well-formed (doc already passed its schema)."""
    _need(tensors, "torch.cpu", torch.uint8, None)
    if doc["python"] is not None:
        words = _need(tensors, "python", torch.int64, (625,))
        if not all(0 <= w < 2**32 for w in words[:624].tolist()) or not 0 <= int(words[624]) <= 624:
            raise CheckpointCorruptedError(
                f'{TENSOR_FILE}: tensor "python" holds values outside the MT19937 state range'
            )
    if doc["numpy"] is not None:
        keys = _need(tensors, "numpy", torch.int64, (624,))
        if bool(((keys < 0) | (keys >= 2**32)).any()):
            raise CheckpointCorruptedError(f'{TENSOR_FILE}: tensor "numpy" holds values outside the MT19937 key range')
    for i in range(doc["torch"]["cuda_devices"]):
        _need(tensors, f"torch.cuda.{i}", torch.uint8, None)


def restore(tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
    """Set every generator the checkpoint carries (CUDA ones only where the device exists)."""
    check(tensors, doc)
    try:
        torch.set_rng_state(tensors["torch.cpu"])
    except RuntimeError as e:
        raise CheckpointCorruptedError(
            f'{TENSOR_FILE}: tensor "torch.cpu" is not a valid generator state: {e}'
        ) from None
    if doc["python"] is not None:
        words = tuple(int(w) for w in tensors["python"].tolist())
        random.setstate((doc["python"]["version"], words, doc["python"]["gauss_next"]))
    np = _numpy()
    if np is not None and doc["numpy"] is not None:
        n = doc["numpy"]
        keys = tensors["numpy"].numpy().astype(np.uint32)
        np.random.set_state((n["bit_generator"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    devices = doc["torch"]["cuda_devices"]
    if devices and torch.cuda.is_available():
        for i in range(min(devices, torch.cuda.device_count())):
            torch.cuda.set_rng_state(tensors[f"torch.cuda.{i}"], device=i)
