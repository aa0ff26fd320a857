"""Reading the files of foreign checkpoints: pickles through the format's allowlist, safetensors, JSON, RNG.

Every ``torch.save`` file goes through ``format/pt.py``'s ``load`` (static scan, then ``torch.load``
with ``weights_only=True``). The one exception is a Hugging Face Trainer ``rng_state*.pth``, whose
NumPy generator state pickles a NumPy array: ``load_rng_file`` scans it against the format's allowlist
plus exactly the NumPy globals in ``NUMPY_GLOBALS``, then unpickles it with ``weights_only=True`` and
those globals alone added. ``training_args.bin`` and any other file not named here is never unpickled.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import torch

from portable_ckpt.errors import CheckpointCorruptedError, CheckpointUnsafeError
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import pt as _pt
from portable_ckpt.format import rng as _rng
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.format.hashing import new_hasher

_CHUNK = 1 << 24

# the globals a pickled NumPy array names (numpy 1 spells the module numpy.core, numpy 2 numpy._core)
NUMPY_GLOBALS: dict[str, str] = {
    "numpy.core.multiarray._reconstruct": "a NumPy array (numpy 1)",
    "numpy._core.multiarray._reconstruct": "a NumPy array (numpy 2)",
    "numpy.ndarray": "the class of a NumPy array",
    "numpy.dtype": "the dtype of a NumPy array",
}
_MODULE_NAMES = {"__builtin__": "builtins"}
MAX_RNG_FILE_BYTES = 16 * 1024 * 1024  # a Trainer writes ~10 KB: the generators of one process


def file_checksum(path: Path) -> str:
    """XXH3-128 of a whole file, read in chunks."""
    h = new_hasher()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def load_pt(path: Path) -> Any:
    """A ``torch.save`` file, through the format's allowlist (``CheckpointUnsafeError`` for what it refuses)."""
    return _pt.load(path, str(path), "cpu", mmap=False)


def load_json(path: Path) -> Any:
    size = path.stat().st_size
    if size > _jsonio.MAX_JSON_BYTES:
        raise CheckpointCorruptedError(f"{path}: {size} bytes, over the limit of {_jsonio.MAX_JSON_BYTES}", file=path)
    return _jsonio.loads(path.read_bytes(), str(path))


def load_json_nonfinite(path: Path) -> tuple[Any, int]:
    """A JSON file in which NaN and Infinity (what Python's json writes for them: a Trainer's ``grad_norm``
    after an overflow) become null; returns (the document, how many there were)."""
    size = path.stat().st_size
    if size > _jsonio.MAX_JSON_BYTES:
        raise CheckpointCorruptedError(f"{path}: {size} bytes, over the limit of {_jsonio.MAX_JSON_BYTES}", file=path)
    replaced: list[str] = []

    def constant(name: str) -> None:
        replaced.append(name)

    try:
        doc = json.loads(path.read_bytes().decode("utf-8"), parse_constant=constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointCorruptedError(f"{path}: invalid JSON: {str(e)[:200]}", file=path) from None
    return doc, len(replaced)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read and validated by the format's own reader."""
    with open(path, "rb") as f:
        header, _ = _safetensors.read_header(f, os.fstat(f.fileno()).st_size, str(path))
        return _safetensors.read_tensors(f, header, str(path))


def _rng_pickle(raw: bytes, label: str) -> bytes:
    """The data.pkl of a torch.save archive held in memory."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            pickles = [i for i in z.infolist() if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
            if len(pickles) == 1 and pickles[0].file_size <= _pt.MAX_PICKLE_BYTES:
                return z.read(pickles[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError, NotImplementedError) as e:
        # NotImplementedError: a zip feature zipfile cannot read (a newer "version needed to extract")
        raise CheckpointCorruptedError(f"{label}: not a readable torch.save file: {str(e)[:200]}", file=label) from None
    raise CheckpointCorruptedError(f"{label}: not a torch.save archive (expected one <name>/data.pkl)", file=label)


def _scan_rng_pickle(data: bytes, label: str) -> None:
    """Every global and opcode of data.pkl: the format's allowlist and ``NUMPY_GLOBALS``, no more."""
    allowed = set(_pt.GLOBALS) | set(NUMPY_GLOBALS)
    for op, arg, pos in _genops(data, label):
        if op == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            full = f"{_MODULE_NAMES.get(module, module)}.{attr}"
            if full not in allowed:
                raise CheckpointUnsafeError(
                    f"{label}: refused to unpickle, unsafe: data.pkl (byte {pos}) names the global {full[:200]}, "
                    "which an RNG state file may not (tensors, plain containers and NumPy arrays only; no code "
                    "from a checkpoint is ever run); the file may be hostile",
                    file=label,
                )
        elif op not in _pt.OPCODES:
            raise CheckpointUnsafeError(
                f"{label}: refused to unpickle, unsafe: data.pkl (byte {pos}) holds the pickle opcode "
                f"{op}, which an RNG state file may not; the file may be hostile",
                file=label,
            )


def _genops(data: bytes, label: str) -> list[tuple[str, Any, int | None]]:
    """(opcode name, argument, byte offset) of every opcode, parsed without executing anything."""
    try:
        return [(op.name, arg, pos) for op, arg, pos in pickletools.genops(data)]
    except ValueError as e:  # pickletools' word for a malformed pickle
        raise CheckpointCorruptedError(
            f"{label}: data.pkl is not a valid pickle ({str(e)[:200]})", file=label
        ) from None


def _numpy_safe_globals() -> list[Any]:
    import numpy as np  # only an RNG file holding NumPy state gets here

    reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own, whichever module spells it
    names = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
    # torch's unpickler also asks for the class of the uint32 dtype when it rebuilds the dtype (BUILD, not a GLOBAL)
    return [*((reconstruct, n) for n in names), np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_rng_file(path: Path) -> Any:
    """A Trainer ``rng_state*.pth``: the narrow scan above, then ``torch.load(weights_only=True)`` of the very
    bytes scanned (read once into memory: such a file is a few kilobytes)."""
    label = str(path)
    size = path.stat().st_size
    if size > MAX_RNG_FILE_BYTES:
        raise CheckpointCorruptedError(
            f"{label}: {size} bytes, over the limit of {MAX_RNG_FILE_BYTES} for an RNG state file", file=label
        )
    raw = path.read_bytes()
    _scan_rng_pickle(_rng_pickle(raw, label), label)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except ImportError:
        raise CheckpointCorruptedError(f"{label}: holds NumPy state but NumPy is not installed", file=label) from None
    except _pt.TORCH_LOAD_ERRORS as e:
        raise CheckpointCorruptedError(
            f"{label}: not a readable torch.save file: {type(e).__name__}: {str(e)[:300]}", file=label
        ) from None


def _python_state(state: Any) -> tuple[torch.Tensor, dict[str, Any]] | None:
    if not (isinstance(state, tuple) and len(state) == 3 and isinstance(state[1], tuple) and len(state[1]) == 625):
        return None
    version, words, gauss_next = state
    if not isinstance(version, int) or not (gauss_next is None or isinstance(gauss_next, float)):
        return None
    if not all(type(w) is int for w in words):
        return None
    return torch.tensor(words, dtype=torch.int64), {"version": version, "gauss_next": gauss_next}


def _numpy_state(state: Any) -> tuple[torch.Tensor, dict[str, Any]] | None:
    if not (isinstance(state, tuple) and len(state) == 5):
        return None
    name, keys, pos, has_gauss, cached = state
    if name != "MT19937" or type(keys).__module__ != "numpy" or str(getattr(keys, "dtype", "")) != "uint32":
        return None
    if tuple(keys.shape) != (624,) or type(pos) is not int or type(has_gauss) is not int:
        return None
    if not isinstance(cached, float):
        return None
    doc = {"bit_generator": name, "pos": pos, "has_gauss": has_gauss, "cached_gaussian": cached}
    return torch.tensor(keys.astype("int64").tolist(), dtype=torch.int64), doc


def rng_from_trainer(state: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str], list[str]]:
    """(rng tensors, rng.json document, carried keys, keys not carried) from a Trainer RNG dict.

    The result is the very encoding ``format/rng.py`` captures, so ``load_checkpoint(restore_rng=True)``
    sets the generators exactly as the Trainer's own resume would. CUDA states are carried when they
    have the shape of this PyTorch's CUDA generator state.
    """
    if not isinstance(state, dict) or not isinstance(state.get("cpu"), torch.Tensor):
        return {}, {}, [], sorted(map(str, state)) if isinstance(state, dict) else ["(the whole file)"]
    tensors: dict[str, torch.Tensor] = {"torch.cpu": state["cpu"]}
    doc: dict[str, Any] = {"python": None, "numpy": None, "torch": {"cpu": True, "cuda_devices": 0}}
    carried, skipped = ["cpu"], []
    for key, parse in (("python", _python_state), ("numpy", _numpy_state)):
        parsed = parse(state[key]) if key in state else None
        if parsed is not None:
            tensors[key], doc[key] = parsed
            carried.append(key)
        elif key in state:
            skipped.append(key)
    cuda = state.get("cuda")
    cuda_list = [cuda] if isinstance(cuda, torch.Tensor) else cuda
    if (
        isinstance(cuda_list, list)
        and cuda_list
        and all(
            isinstance(t, torch.Tensor) and t.dtype == _rng.CUDA_STATE[0] and tuple(t.shape) == _rng.CUDA_STATE[1]
            for t in cuda_list
        )
    ):
        tensors.update({f"torch.cuda.{i}": t for i, t in enumerate(cuda_list)})
        doc["torch"]["cuda_devices"] = len(cuda_list)
        carried.append("cuda")
    elif "cuda" in state:
        skipped.append("cuda")
    skipped += sorted(str(k) for k in state if k not in {"cpu", "python", "numpy", "cuda"})
    try:
        _rng.check(tensors, doc, sorted(tensors))
    except CheckpointCorruptedError:  # e.g. a CPU state of another PyTorch's generator: not exactly restorable
        return {}, {}, [], sorted(map(str, state))
    return tensors, doc, carried, skipped


__all__ = [
    "MAX_RNG_FILE_BYTES",
    "NUMPY_GLOBALS",
    "file_checksum",
    "load_json",
    "load_json_nonfinite",
    "load_pt",
    "load_rng_file",
    "load_safetensors",
    "rng_from_trainer",
]
