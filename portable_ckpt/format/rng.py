"""Random generator state without pickle: state words as tensors, the rest as JSON.

Sources: Python's ``random``, NumPy's global generator (when NumPy is installed), the torch CPU
generator, and each CUDA device's generator when CUDA has been initialised.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Collection
from typing import Any

import torch

from portable_ckpt.errors import CheckpointCorruptedError, CheckpointInputError

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
    try:  # at the save, not at a later load: a generator whose state format 1 cannot hold
        check(tensors, doc, sorted(tensors))
    except CheckpointCorruptedError as e:
        raise CheckpointInputError(
            f"this PyTorch's random generator state does not fit format 1 ({e}); "
            "upgrade portable-ckpt to a version that knows this PyTorch"
        ) from None
    return tensors, doc, sorted(tensors)


# tensor -> (dtype, shape) of rng.safetensors; torch.cuda.<i> like CUDA_STATE (format_spec §14)
CPU_STATE = (torch.uint8, (5056,))  # torch.get_rng_state(): the Mersenne Twister generator
CUDA_STATE = (torch.uint8, (16,))  # torch.cuda.get_rng_state(i): the Philox generator's seed and offset
TENSORS: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
    "torch.cpu": CPU_STATE,
    "python": (torch.int64, (625,)),
    "numpy": (torch.int64, (624,)),
}


def expected_tensors(doc: dict[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The tensors rng.safetensors must hold, exactly, for the rng.json document ``doc``."""
    out = {"torch.cpu": TENSORS["torch.cpu"]}
    for source in ("python", "numpy"):
        if doc[source] is not None:
            out[source] = TENSORS[source]
    out.update({f"torch.cuda.{i}": CUDA_STATE for i in range(doc["torch"]["cuda_devices"])})
    return out


def _need(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise CheckpointCorruptedError(
            f'{TENSOR_FILE}: tensor "{name}" is missing but {JSON_FILE} lists it', file=TENSOR_FILE
        )
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise CheckpointCorruptedError(
            f'{TENSOR_FILE}: tensor "{name}" is {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}',
            file=TENSOR_FILE,
        )
    return t


def check(tensors: dict[str, torch.Tensor], doc: dict[str, Any], sources: list[str] | None = None) -> None:
    """Everything ``restore`` needs is present and well-formed (doc already passed its schema).

    rng.safetensors holds exactly the tensors ``doc`` calls for, each of its dtype and shape; given the
    manifest's ``rng`` list as ``sources``, that list names exactly those tensors, sorted.
    """
    expected = expected_tensors(doc)
    for name, (dtype, shape) in expected.items():
        _need(tensors, name, dtype, shape)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointCorruptedError(
            f"{TENSOR_FILE}: holds {', '.join(repr(n) for n in extra[:5])}, which {JSON_FILE} does not call for "
            f"(expected exactly {sorted(expected)})",
            file=TENSOR_FILE,
        )
    if sources is not None and sources != sorted(expected):
        raise CheckpointCorruptedError(
            f"manifest.json: rng is {sources[:10]!r} but {TENSOR_FILE} holds {sorted(expected)!r}", file="manifest.json"
        )
    if doc["python"] is not None:
        words = tensors["python"]
        if not all(0 <= w < 2**32 for w in words[:624].tolist()) or not 0 <= int(words[624]) <= 624:
            raise CheckpointCorruptedError(
                f'{TENSOR_FILE}: tensor "python" holds values outside the MT19937 state range', file=TENSOR_FILE
            )
    if doc["numpy"] is not None:
        keys = tensors["numpy"]
        if bool(((keys < 0) | (keys >= 2**32)).any()):
            raise CheckpointCorruptedError(
                f'{TENSOR_FILE}: tensor "numpy" holds values outside the MT19937 key range', file=TENSOR_FILE
            )


def check_listed(listed: Collection[str], sources: list[str], label: str = "manifest.json") -> None:
    """The manifest lists rng.json and rng.safetensors both or neither, and with neither its ``rng`` is empty.

    ``listed``: the names of the manifest's ``files``; ``sources``: its ``rng`` list (``[]`` when absent).
    With both listed, ``check(tensors, doc, sources)`` then compares ``sources`` with the tensors.
    """
    present = [name for name in (JSON_FILE, TENSOR_FILE) if name in listed]
    if len(present) == 1:
        (absent,) = {JSON_FILE, TENSOR_FILE} - set(present)
        raise CheckpointCorruptedError(
            f"{label}: lists {present[0]} but not {absent}; the two RNG files go together", file=label
        )
    if not present and sources:
        raise CheckpointCorruptedError(f"{label}: rng is {sources[:10]!r} but the RNG files are not listed", file=label)


def restore(tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
    """Set every generator the checkpoint carries (CUDA ones only where the device exists)."""
    check(tensors, doc)
    try:
        torch.set_rng_state(tensors["torch.cpu"])
    except RuntimeError as e:
        raise CheckpointCorruptedError(
            f'{TENSOR_FILE}: tensor "torch.cpu" is not a valid generator state: {e}', file=TENSOR_FILE
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
