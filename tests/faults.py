"""Shared helpers for the fault-tolerance tests and ``tests/stress.py``.

- a tiny model whose whole training state is a function of the step (weights == step), and a checker
  that says what in a loaded checkpoint disagrees with that;
- an attacker's tools: recompute every size and checksum of a damaged checkpoint and reseal its manifest,
  hand-built safetensors files (``struct.pack``), pickles that would run code;
- the corruption catalog (one :class:`Case` per damage) and :func:`run_case`, which tries a case with and
  without verification, with and without recomputed checksums, and through ``portable-ckpt validate``;
- fault injection: failing ``os.write``/``os.fsync``/... at a chosen call, a deadline (SIGALRM), the peak
  resident memory of a block;
- child-process roles (``python tests/faults.py ROLE ...``) for the crash, disk-full and concurrency tests.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import traceback
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import portable_ckpt as pc
from portable_ckpt import cli
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import manifest as _manifest
from portable_ckpt.format.hashing import checksum

FAULTS_PY = Path(__file__).resolve()
STEP_DIR = re.compile(r"^step-[0-9]{8,}$")
VOCAB = ["<pad>", "a", "b", "c", "d", "e"]
WRITER_OFFSETS = {"main": 0.0, "A": 0.0, "B": 0.5}  # writer name -> value - step of its checkpoints

# the files of a checkpoint of TinyModel, in the order save writes them (manifest last)
FILES = (
    "model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng.safetensors",
    "rng.json",
    "config.json",
    "vocab.json",
    "manifest.json",
)
QUANT_FILE = "quantization_metadata.json"


# ---------------------------------------------------------------------------------------------------
# a training state that is a function of the step
# ---------------------------------------------------------------------------------------------------


class TinyModel(nn.Module):
    """Embedding tied to the output head (an alias), a linear layer, an int64 and a bf16 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(len(VOCAB), 4)
        self.lin = nn.Linear(4, 3)
        self.head = nn.Linear(4, len(VOCAB), bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("seen", torch.zeros(2, dtype=torch.int64))
        self.register_buffer("scale", torch.zeros(2, dtype=torch.bfloat16))


def make_state(step: int, writer: str = "main") -> tuple[TinyModel, torch.optim.Optimizer, Any]:
    """Model, optimizer and scheduler whose every value is ``step`` (+ the writer's offset)."""
    value = step + WRITER_OFFSETS[writer]
    model = TinyModel()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model.seen.fill_(step)
        model.scale.fill_(value)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.full_like(p, value)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1000)
    sched.last_epoch = step
    return model, opt, sched


def config_for(step: int, writer: str = "main") -> dict[str, Any]:
    return {"step": step, "writer": writer, "value": step + WRITER_OFFSETS[writer]}


def save_step(
    target: str | os.PathLike[str] | pc.CheckpointManager, step: int, writer: str = "main", *, overwrite: bool = False
) -> Path:
    """Save the state of ``step`` into a root (save_checkpoint) or through a manager."""
    model, opt, sched = make_state(step, writer)
    with preserved_rng():
        seed_rng(config_for(step, writer)["value"])  # the RNG state saved is a function of the step too
        if isinstance(target, pc.CheckpointManager):
            path: Path = target.save(model, opt, config_for(step, writer), VOCAB, step, scheduler=sched)
            return path
        return pc.save_checkpoint(
            model, opt, config_for(step, writer), VOCAB, step, target, scheduler=sched, overwrite=overwrite
        )


def seed_rng(value: float) -> None:
    seed = round(value * 2)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_problems(value: float) -> list[str]:
    """How the global generators differ from the state ``seed_rng(value)`` gives them (after a restore)."""
    now = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    with preserved_rng():
        seed_rng(value)
        expected = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    same = (now[0] == expected[0], bool((now[1] == expected[1]).all()), torch.equal(now[2], expected[2]))
    return [
        f"{name} generator state is not the saved one"
        for name, ok in zip(("python", "numpy", "torch"), same, strict=True)
        if not ok
    ]


def _same(t: Any, value: float) -> bool:
    return isinstance(t, torch.Tensor) and torch.equal(t, torch.full_like(t, value))


def state_problems(ckpt: pc.Checkpoint) -> list[str]:
    """What in ``ckpt`` is not the state ``make_state(ckpt.step, writer)`` saved (empty when all is right)."""
    step, config = ckpt.step, ckpt.config
    writer = config.get("writer") if isinstance(config, dict) else None
    if writer not in WRITER_OFFSETS or config.get("step") != step:
        return [f"config {config!r} does not describe step {step}"]
    value = step + WRITER_OFFSETS[writer]
    problems = []
    expected = {
        "emb.weight": value,
        "head.weight": value,
        "lin.weight": value,
        "lin.bias": value,
        "seen": step,
        "scale": value,
    }
    if set(ckpt.model_state) != set(expected):
        problems.append(f"model tensors {sorted(ckpt.model_state)}")
    problems += [
        f"model {k}" for k, v in expected.items() if k in ckpt.model_state and not _same(ckpt.model_state[k], v)
    ]
    opt = ckpt.optimizer_state or {}
    buffers = [s.get("momentum_buffer") for s in opt.get("state", {}).values()]
    if len(buffers) != 3 or not all(_same(b, value) for b in buffers):
        problems.append("optimizer momentum buffers")
    if (ckpt.scheduler_state or {}).get("last_epoch") != step:
        problems.append("scheduler last_epoch")
    if ckpt.vocab != VOCAB:
        problems.append("vocab")
    return problems


def load_values(path: str | os.PathLike[str], *, verify: bool = True) -> tuple[int, list[str]]:
    """Load ``path`` (a checkpoint or a root); (its step, what is wrong with its values, RNG state included)."""
    with preserved_rng():
        ckpt = pc.load_checkpoint(path, verify=verify, restore_rng=True)
        problems = state_problems(ckpt)
        if not problems:
            problems = rng_problems(ckpt.config["value"])
    return ckpt.step, problems


def leftovers(root: Path) -> list[str]:
    """Temporaries (``.tmp-*``, ``.trash-*``) in a root."""
    try:
        return sorted(n for n in os.listdir(root) if n.startswith((".tmp-", ".trash-")))
    except FileNotFoundError:
        return []


def latest_name(root: Path) -> str | None:
    try:
        return (root / "latest").read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Put the global random generators back as they were (a load with restore_rng changes them)."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


def quantized_model() -> nn.Module:
    """A small model with its linear layers quantized to int8 (ptq)."""
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 8))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.linspace(-1, 1, p.numel()).reshape(p.shape) * (i + 1))
    return pc.quantize(model, bits=8)


# ---------------------------------------------------------------------------------------------------
# the attacker: recompute checksums, reseal, hand-built files
# ---------------------------------------------------------------------------------------------------


def read_manifest(ckdir: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((ckdir / "manifest.json").read_bytes())
    return doc


def write_manifest(ckdir: Path, doc: Any, *, seal: bool = True) -> None:
    """Write ``doc`` as the manifest, sealed with a correct ``manifest_checksum`` when ``seal``."""
    if seal and isinstance(doc, dict):
        (ckdir / "manifest.json").write_bytes(_manifest.encode(doc))
        return
    (ckdir / "manifest.json").write_bytes(_jsonio.dumps(doc))


def st_split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """(header object, data bytes) of a well-formed safetensors file."""
    (n,) = struct.unpack("<Q", blob[:8])
    header: dict[str, Any] = json.loads(blob[8 : 8 + n])
    return header, blob[8 + n :]


def st_pack(header: dict[str, Any] | bytes, data: bytes, *, length: int | None = None, pad: bool = True) -> bytes:
    """A safetensors file built by hand: ``<Q length>``, the header (padded to 8), the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def tensor_table(blob: bytes) -> dict[str, str] | None:
    """Per-tensor checksums as an attacker computes them from a (possibly hostile) header, or None."""
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + n])
        table = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            table[name] = checksum(blob[8 + n + begin : 8 + n + end])
    except (struct.error, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None
    return table


def recompute(ckdir: Path, *, files: bool = True) -> None:
    """Make a damaged checkpoint's manifest agree with its files again, as an attacker would.

    With ``files``: every listed file that exists gets its size, checksum and (safetensors) per-tensor
    checksums recomputed; then ``manifest_checksum`` is recomputed with ``_manifest.seal``.
    """
    try:
        doc = json.loads((ckdir / "manifest.json").read_bytes())
    except (OSError, ValueError, RecursionError):
        return  # no manifest, or not JSON: nothing an attacker could seal
    if not isinstance(doc, dict):
        return
    entries = doc.get("files")
    if files and isinstance(entries, dict):
        for name, entry in entries.items():
            path = ckdir / name
            if not isinstance(entry, dict) or "/" in name or not path.is_file():
                continue
            blob = path.read_bytes()
            entry["size"], entry["checksum"] = len(blob), checksum(blob)
            if "tensors" in entry:
                entry["tensors"] = tensor_table(blob) or entry["tensors"]
    with contextlib.suppress(ValueError):  # a document canonical JSON cannot hold (1e400 read as inf)
        write_manifest(ckdir, doc)


class RunsCode:
    """Pickles as ``func(arg)``: what a malicious checkpoint uses to run code on ``pickle.load``."""

    def __init__(self, func: Callable[[str], Any], arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return self.func, (self.arg,)


def marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def payloads(marker: Path) -> dict[str, RunsCode]:
    """Objects whose unpickling creates ``marker``, by way of different globals."""
    import builtins

    return {
        "os.system": RunsCode(os.system, f"touch '{marker}'"),
        "builtins.exec": RunsCode(builtins.exec, marker_code(marker)),
        "builtins.eval": RunsCode(builtins.eval, marker_code(marker)),
    }


def evil_torch_file(marker: Path, how: str = "builtins.exec", *, like: str = "optimizer") -> bytes:
    """A torch.save zip file whose pickle calls ``how`` to create ``marker`` when unpickled."""
    payload = payloads(marker)[how]
    if like == "optimizer":
        obj: Any = {"state": {0: {"momentum_buffer": payload}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    else:  # a model state_dict (legacy model.pt)
        obj = {"lin.weight": torch.ones(3, 4), "lin.bias": payload}
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def evil_raw_pickle(marker: Path) -> bytes:
    """Protocol 2, by hand: GLOBAL builtins.exec, one string argument, REDUCE (a legacy, non-zip .pt file)."""
    code = marker_code(marker).encode()
    return b"\x80\x02" + b"cbuiltins\nexec\n" + b"X" + struct.pack("<I", len(code)) + code + b"\x85" + b"R" + b"."


# ---------------------------------------------------------------------------------------------------
# deadlines, memory, injected I/O failures
# ---------------------------------------------------------------------------------------------------


class Hang(Exception):
    """Raised by :func:`deadline` when the block runs past its time."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` inside the block if it runs longer than ``seconds`` (main thread only)."""

    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _vm_hwm() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


@contextlib.contextmanager
def peak_rss() -> Iterator[list[int]]:
    """Yields a list that receives the growth of peak resident memory (bytes) over the block.

    Resets the kernel's high-water mark first (``/proc/self/clear_refs`` = 5), so the figure is this
    block's own peak, even in a long-lived process.
    """
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    with open("/proc/self/status", encoding="ascii") as f:
        base = int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024
    out: list[int] = []
    try:
        yield out
    finally:
        out.append(_vm_hwm() - base)


def fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


# os functions a save calls that can fail on a full or broken disk; each maps a call to the path it acts on
IO_OPS: dict[str, Callable[..., str]] = {
    "write": lambda fd, *a, **k: fd_path(fd),
    "fsync": lambda fd, *a, **k: fd_path(fd),
    "open": lambda path, flags, *a, **k: os.fspath(path) if flags & os.O_CREAT else "",
    "mkdir": lambda path, *a, **k: os.fspath(path),
    "rename": lambda src, dst, *a, **k: f"{os.fspath(src)} -> {os.fspath(dst)}",
    "replace": lambda src, dst, *a, **k: f"{os.fspath(src)} -> {os.fspath(dst)}",
}
IO_ERRNO = {
    "write": errno.ENOSPC,
    "fsync": errno.EIO,
    "open": errno.ENOSPC,
    "mkdir": errno.EDQUOT,
    "rename": errno.EIO,
    "replace": errno.EIO,
}


@dataclass
class Injector:
    """Counts the I/O calls of ``ops`` whose path matches the regex ``match``, and fails one of them (or
    kills the process there).

    ``fail_at``: the 1-based number of the matching call that raises ``OSError(errno)``; 0 never fails.
    ``partial``: a failing ``write`` first writes half its bytes and returns short; the next call raises.
    ``kill_at``: SIGKILL this process just before that call (crash tests).
    """

    ops: Sequence[str] = tuple(IO_OPS)
    match: str = ""
    fail_at: int = 0
    errno: int | None = None
    partial: bool = False
    kill_at: int = 0
    calls: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def _wrap(self, op: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            where = IO_OPS[op](*args, **kwargs)
            if not where or not re.search(self.match, where):
                return real(*args, **kwargs)
            self.calls.append(f"{op} {where}")
            n = len(self.calls)
            if n == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if n == self.fail_at or (self.partial and n == self.fail_at + 1 and self.failed):
                if op == "write" and self.partial and not self.failed:
                    self.failed.append(self.calls[-1])
                    data = memoryview(args[1]).cast("B")
                    return real(args[0], data[: max(1, len(data) // 2)])
                self.failed.append(self.calls[-1])
                code = self.errno if self.errno is not None else IO_ERRNO[op]
                raise OSError(code, os.strerror(code), where)
            return real(*args, **kwargs)

        return wrapper

    @contextlib.contextmanager
    def installed(self) -> Iterator[Injector]:
        saved = {op: getattr(os, op) for op in self.ops}
        try:
            for op, real in saved.items():
                setattr(os, op, self._wrap(op, real))
            yield self
        finally:
            for op, real in saved.items():
                setattr(os, op, real)


@contextlib.contextmanager
def after_open(name: str, action: Callable[[], None], nth: int = 1) -> Iterator[list[str]]:
    """Run ``action`` once, right after this process touches a file called ``name`` for the ``nth`` time
    (``os.open``; the builtin ``open`` and ``os.path.getsize``, which torch.load uses before it maps the
    file): a deterministic stand-in for another process acting at that instant (retention, an overwrite).
    Yields the paths touched so far."""
    import builtins

    real_os_open, real_open, real_getsize = os.open, builtins.open, os.path.getsize
    opened: list[str] = []

    def seen(path: Any) -> None:
        if isinstance(path, (str, os.PathLike)) and os.path.basename(os.fspath(path)) == name:
            opened.append(os.fspath(path))
            if len(opened) == nth:
                action()

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd: int = real_os_open(path, flags, *args, **kwargs)
        seen(path)
        return fd

    def builtin_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, *args, **kwargs)
        seen(file)
        return f

    def getsize(path: Any) -> int:
        size = real_getsize(path)
        seen(path)
        return size

    os.open, builtins.open, os.path.getsize = os_open, builtin_open, getsize
    try:
        yield opened
    finally:
        os.open, builtins.open, os.path.getsize = real_os_open, real_open, real_getsize


def retire(ckdir: Path) -> None:
    """What retention does to a checkpoint: rename it away, then delete it."""
    trash = ckdir.with_name(f".trash-{ckdir.name}-{os.getpid()}")
    os.rename(ckdir, trash)
    shutil.rmtree(trash)


def replace_with(ckdir: Path, replacement: Path) -> None:
    """What save_checkpoint(overwrite=True) does to a checkpoint: rename it away, rename the new one into
    place, delete the old one."""
    trash = ckdir.with_name(f".trash-{ckdir.name}-{os.getpid()}")
    os.rename(ckdir, trash)
    os.rename(replacement, ckdir)
    shutil.rmtree(trash)


# ---------------------------------------------------------------------------------------------------
# the corruption catalog
# ---------------------------------------------------------------------------------------------------

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


def _pos(spec: str, blob: bytes) -> int:
    """A position in ``blob``: a number ("8"), a byte of the safetensors length field ("len3"), or a named
    place ("half", "hdr-mid", "data-first", "end-22", ...); clamped into the file."""
    n = len(blob)
    header_end = 8 + struct.unpack("<Q", blob[:8])[0] if blob[:1] != b"{" and n >= 8 else 0
    table = {
        "third": n // 3,
        "half": n // 2,
        "2third": 2 * n // 3,
        "end-22": n - 22,
        "end-2": n - 2,
        "end-1": n - 1,
        "hdr-first": 8,
        "hdr-mid": (8 + header_end) // 2,
        "hdr-last": header_end - 1,
        "data-first": header_end,
        "data-mid": (header_end + n) // 2,
        "data-last": n - 1,
    }
    number = spec.removeprefix("len")
    at = int(number) if number.isdigit() else table[spec]
    return min(max(at, 0), max(n - 1, 0))


def edit_bytes(name: str, edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(ckdir: Path) -> None:
        path = ckdir / name
        path.write_bytes(edit(path.read_bytes()))

    return apply


def _flip(spec: str, mask: int) -> Callable[[bytes], bytes]:
    def edit(blob: bytes) -> bytes:
        i = _pos(spec, blob)
        return blob[:i] + bytes([blob[i] ^ mask]) + blob[i + 1 :]

    return edit


def _truncate(spec: str) -> Callable[[bytes], bytes]:
    return lambda blob: blob[: _pos(spec, blob)]


def _delete(name: str) -> Callable[[Path], None]:
    return lambda ckdir: (ckdir / name).unlink()


def _replace(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda ckdir: (ckdir / name).write_bytes(content)


def _edit_manifest(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    """Change the manifest's content (not resealed here; the attacker variant reseals it)."""

    def apply(ckdir: Path) -> None:
        doc = read_manifest(ckdir)
        result = edit(doc)
        write_manifest(ckdir, doc if result is None else result, seal=False)

    return apply


def _edit_json(name: str, edit: Callable[[Any], Any]) -> Callable[[Path], None]:
    def apply(ckdir: Path) -> None:
        doc = json.loads((ckdir / name).read_bytes())
        result = edit(doc)
        (ckdir / name).write_bytes(_jsonio.dumps(doc if result is None else result))

    return apply


def _edit_st(name: str, edit: Callable[[dict[str, Any], bytes], bytes]) -> Callable[[Path], None]:
    def apply(ckdir: Path) -> None:
        header, data = st_split((ckdir / name).read_bytes())
        (ckdir / name).write_bytes(edit(header, data))

    return apply


def _symlink_out(name: str) -> Callable[[Path], None]:
    """Replace ``name`` by a symlink to an identical copy outside the checkpoint directory."""

    def apply(ckdir: Path) -> None:
        outside = ckdir.parent / f"outside-{ckdir.name}-{name}"
        shutil.copyfile(ckdir / name, outside)
        (ckdir / name).unlink()
        (ckdir / name).symlink_to(outside)

    return apply


def _set(path: Sequence[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return edit


_DELETE = object()


def _first(header: dict[str, Any]) -> str:
    return min((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])


def _st_attacks() -> dict[str, Callable[[dict[str, Any], bytes], bytes]]:
    """Hostile safetensors files built from a real one: header and data, then packed by hand."""

    def entry_set(key: str, value: Any) -> Callable[[dict[str, Any], bytes], bytes]:
        def edit(h: dict[str, Any], d: bytes) -> bytes:
            h[_first(h)][key] = value
            return st_pack(h, d)

        return edit

    def overlap(h: dict[str, Any], d: bytes) -> bytes:
        names = sorted((n for n in h if n != "__metadata__"), key=lambda n: h[n]["data_offsets"])
        a, b = h[names[0]]["data_offsets"], h[names[1]]["data_offsets"]
        shift = min(4, b[0] - a[0])  # the second tensor starts inside the first; the file keeps its size
        h[names[1]]["data_offsets"] = [b[0] - shift, b[1] - shift]
        return st_pack(h, d)

    def past_end(h: dict[str, Any], d: bytes) -> bytes:
        last = max((n for n in h if n != "__metadata__"), key=lambda n: h[n]["data_offsets"])
        b, e = h[last]["data_offsets"]
        h[last]["data_offsets"] = [b + 64, e + 64]
        return st_pack(h, d)

    def gap(h: dict[str, Any], d: bytes) -> bytes:
        for n in h:
            if n != "__metadata__" and h[n]["data_offsets"][0] > 0:
                b, e = h[n]["data_offsets"]
                h[n]["data_offsets"] = [b + 8, e + 8]
        return st_pack(h, d + bytes(8))

    def shape_mismatch(h: dict[str, Any], d: bytes) -> bytes:
        h[_first(h)]["shape"] = [*h[_first(h)]["shape"], 2]
        return st_pack(h, d)

    def other_itemsize(h: dict[str, Any], d: bytes) -> bytes:
        entry = h[_first(h)]
        entry["dtype"] = "I8" if entry["dtype"] not in ("U8", "I8", "BOOL") else "F32"
        return st_pack(h, d)

    def header_len(n: int) -> Callable[[dict[str, Any], bytes], bytes]:
        return lambda h, d: st_pack(h, d, length=n)

    def raw_header(text: bytes) -> Callable[[dict[str, Any], bytes], bytes]:
        return lambda h, d: st_pack(text, d)

    def duplicate(h: dict[str, Any], d: bytes) -> bytes:
        first = _first(h)
        text = json.dumps(h, separators=(",", ":"))
        dup = json.dumps({first: h[first]}, separators=(",", ":"))[1:-1]
        return st_pack(text[:-1].encode() + b"," + dup.encode() + b"}", d)

    def huge_claim(h: dict[str, Any], d: bytes) -> bytes:
        first = _first(h)
        b = h[first]["data_offsets"][0]
        h[first]["shape"] = [2**31, 2**31, 2**31]
        h[first]["data_offsets"] = [b, b + 2**93 * 4]
        return st_pack(h, d)

    def trailing(h: dict[str, Any], d: bytes) -> bytes:
        return st_pack(h, d + b"\0" * 8)

    def non_utf8(h: dict[str, Any], d: bytes) -> bytes:
        first = _first(h)
        text = json.dumps(h, separators=(",", ":")).encode()
        return st_pack(text.replace(first.encode(), first.encode()[:-1] + b"\xff", 1), d)

    def metadata(value: Any) -> Callable[[dict[str, Any], bytes], bytes]:
        def edit(h: dict[str, Any], d: bytes) -> bytes:
            return st_pack({"__metadata__": value, **h}, d)

        return edit

    def rename_empty(h: dict[str, Any], d: bytes) -> bytes:
        first = _first(h)
        h[""] = h.pop(first)
        return st_pack(h, d)

    def big_int_shape(h: dict[str, Any], d: bytes) -> bytes:
        first = _first(h)
        text = json.dumps(h, separators=(",", ":"))
        shape = json.dumps(h[first]["shape"], separators=(",", ":"))
        return st_pack(text.replace(f'"shape":{shape}', '"shape":[' + "9" * 5000 + "]", 1).encode(), d)

    def many_huge_dims(h: dict[str, Any], d: bytes) -> bytes:
        first = _first(h)
        text = json.dumps(h, separators=(",", ":"))
        shape = json.dumps(h[first]["shape"], separators=(",", ":"))
        dims = ",".join(["9" * 4000] * 60)
        return st_pack(text.replace(f'"shape":{shape}', f'"shape":[{dims}]', 1).encode(), d)

    return {
        "overlapping-offsets": overlap,
        "offsets-past-end": past_end,
        "gap-between-tensors": gap,
        "trailing-bytes": trailing,
        "offsets-reversed": entry_set("data_offsets", [8, 0]),
        "offsets-negative": entry_set("data_offsets", [-4, 0]),
        "offsets-three": entry_set("data_offsets", [0, 4, 8]),
        "offsets-float": entry_set("data_offsets", [0.0, 4.0]),
        "offsets-huge": entry_set("data_offsets", [0, 2**64]),
        "unknown-dtype": entry_set("dtype", "F128"),
        "lowercase-dtype": entry_set("dtype", "f32"),
        "dtype-not-string": entry_set("dtype", 7),
        "shape-x-dtype-disagree": shape_mismatch,
        "dtype-x-span-disagree": other_itemsize,
        "shape-negative": entry_set("shape", [-1, 4]),
        "shape-bool": entry_set("shape", [True]),
        "shape-float": entry_set("shape", [2.0]),
        "shape-string": entry_set("shape", "2x4"),
        "shape-claims-2**93-bytes": huge_claim,
        "shape-5000-digit-int": big_int_shape,
        "shape-60-dims-of-4000-digits": many_huge_dims,
        "entry-missing-key": lambda h, d: (h[_first(h)].pop("dtype"), st_pack(h, d))[1],
        "entry-extra-key": entry_set("crc", 0),
        "entry-not-object": lambda h, d: (h.__setitem__(_first(h), [1, 2]), st_pack(h, d))[1],
        "empty-tensor-name": rename_empty,
        "duplicate-tensor-name": duplicate,
        "metadata-not-strings": metadata({"a": 1}),
        "metadata-not-object": metadata(["a"]),
        "header-len-past-eof": header_len(10**6),
        "header-len-over-limit": header_len(100_000_001),
        "header-len-2**64-1": header_len(2**64 - 1),
        "header-len-zero": header_len(0),
        "header-non-utf8": non_utf8,
        "header-invalid-json": raw_header(b'{"a":{"dtype":"F32",'),
        "header-json-array": raw_header(b"[1,2,3]"),
        "header-deep-nesting": raw_header(b"[" * 100_000 + b"]" * 100_000),
        "header-nan": raw_header(b'{"a":NaN}'),
    }


def _manifest_edits(model_names: Sequence[str]) -> dict[str, tuple[Callable[[dict[str, Any]], Any], tuple[str, ...]]]:
    """Manifest edits: id -> (edit, file names a refusal may name besides manifest.json)."""
    st = "model.safetensors"
    tensor = model_names[0]
    return {
        "format-other": (_set(["format"], "safetensors"), ()),
        "format_version-0": (_set(["format_version"], 0), ()),
        "format_version-string": (_set(["format_version"], "1"), ()),
        "format_version-missing": (_set(["format_version"], _DELETE), ()),
        "step-negative": (_set(["step"], -1), ()),
        "step-string": (_set(["step"], "3"), ()),
        "step-float": (_set(["step"], 3.0), ()),
        "step-bool": (_set(["step"], True), ()),
        "step-other-than-dir": (_set(["step"], 4), ()),
        "created_at-bad": (_set(["created_at"], "yesterday"), ()),
        "producer-missing": (_set(["producer"], _DELETE), ()),
        "checksum_algorithm-md5": (_set(["checksum_algorithm"], "md5"), ()),
        "manifest_checksum-missing": (_set(["manifest_checksum"], _DELETE), ()),
        "manifest_checksum-upper": (lambda d: _set(["manifest_checksum"], d["manifest_checksum"].upper())(d), ()),
        "files-not-object": (_set(["files"], [st]), ()),
        "files-model-missing": (_set(["files", st], _DELETE), ()),
        "files-size-string": (lambda d: _set(["files", st, "size"], str(d["files"][st]["size"]))(d), ()),
        "files-size-float": (lambda d: _set(["files", st, "size"], float(d["files"][st]["size"]))(d), ()),
        "files-size-wrong": (lambda d: _set(["files", st, "size"], d["files"][st]["size"] + 1)(d), (st,)),
        "files-size-negative": (_set(["files", st, "size"], -1), ()),
        "files-checksum-wrong": (_set(["files", st, "checksum"], "0" * 32), (st,)),
        "files-checksum-short": (_set(["files", st, "checksum"], "0" * 31), ()),
        "files-checksum-upper": (lambda d: _set(["files", st, "checksum"], d["files"][st]["checksum"].upper())(d), ()),
        "files-entry-extra-key": (_set(["files", st, "mode"], 420), ()),
        "files-tensor-table-missing-name": (_set(["files", st, "tensors", tensor], _DELETE), (st,)),
        "files-tensor-table-extra-name": (_set(["files", st, "tensors", "ghost"], "0" * 32), (st,)),
        "files-unlisted-missing-file": (
            _set(["files", "extra.bin"], {"size": 1, "checksum": "0" * 32}),
            ("extra.bin",),
        ),
        "files-too-many": (
            lambda d: d["files"].update({f"f{i}.bin": {"size": 0, "checksum": "0" * 32} for i in range(70)}),
            (),
        ),
        "files-name-dotdot": (_set(["files", "../config.json"], {"size": 8, "checksum": "0" * 32}), ()),
        "files-name-absolute": (_set(["files", "/etc/passwd"], {"size": 8, "checksum": "0" * 32}), ()),
        "files-name-subdir": (_set(["files", "a/b.json"], {"size": 8, "checksum": "0" * 32}), ()),
        "files-name-hidden": (_set(["files", ".hidden"], {"size": 8, "checksum": "0" * 32}), ()),
        "files-name-manifest": (_set(["files", "manifest.json"], {"size": 8, "checksum": "0" * 32}), ()),
        "files-name-control-char": (_set(["files", "a\x1bb"], {"size": 8, "checksum": "0" * 32}), ()),
        "aliases-target-missing": (_set(["aliases", "x.weight"], "ghost"), (st,)),
        "aliases-shadow-tensor": (_set(["aliases", tensor], tensor), (st,)),
        "aliases-not-object": (_set(["aliases"], ["x"]), ()),
        "rng-bogus-source": (_set(["rng"], ["dice"]), ()),
        "quantization-claimed": (
            _set(["quantization"], {"mode": "ptq", "bits": 8, "metadata_file": QUANT_FILE}),
            (QUANT_FILE,),
        ),
        "extra-not-object": (_set(["extra"], [1]), ()),
        "not-an-object": (lambda d: [d], ()),
    }


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
    "rng.json": {"cuda-devices-absent": (_set(["torch", "cuda_devices"], 2), ("rng.safetensors",))},
    QUANT_FILE: {
        "bits-4-vs-manifest": (lambda d: d.update(bits=4, packing="int4-in-int32-lsb-first"), ()),
        "mode-qat-vs-manifest": (_set(["mode"], "qat"), ()),
        "module-shape-wrong": (lambda d: _set(["shape"], [7, 7])(d["modules"][0]), ()),
        "module-tensor-missing": (
            lambda d: d["modules"][0]["tensors"].update(
                weight={"name": "ghost.weight", "dtype": "I8", "shape": [1, 1]}
            ),
            (),
        ),
        "bits-3": (_set(["bits"], 3), ()),
        "format_version-string": (_set(["format_version"], "1"), ()),
        "unknown-field": (_set(["signed_by"], "me"), ()),
        "modules-empty": (_set(["modules"], []), ()),
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
        add(name, "deleted", _delete(name), "files")
        if name != "manifest.json":
            add(name, "symlink-out", _symlink_out(name), "files")
        for t in _TRUNCATIONS:
            if name == "manifest.json" and t == "end-1":
                continue  # drops only the final newline: the same manifest
            structural = not (is_json and t == "end-1")
            add(name, f"truncated@{t}", edit_bytes(name, _truncate(t)), "files" if structural else None)
        add(name, "appended-byte", edit_bytes(name, lambda b: b + b"\0"), "files" if not is_pt else None)
        positions = _FLIPS_ST if is_st else _FLIPS_PT if is_pt else _FLIPS_GENERIC
        for p in positions:
            structural = is_st and p.startswith("len")
            add(name, f"flip@{p}^01", edit_bytes(name, _flip(p, 0x01)), "files" if structural else None)
        for p in ("hdr-mid",) if is_st else ("half",) if is_json else ():
            add(name, f"flip@{p}^80", edit_bytes(name, _flip(p, 0x80)), "files")  # not UTF-8 any more
        if is_json:
            for kind, content in _INVALID_JSON.items():
                add(name, f"invalid-json:{kind}", _replace(name, content), "files")
            for kind, doc in _WRONG_JSON.get(name, {}).items():
                add(name, f"wrong:{kind}", _replace(name, _jsonio.dumps(doc)), "files")
            for kind, (edit, names) in _SEMANTIC_JSON.get(name, {}).items():
                add(name, f"semantic:{kind}", _edit_json(name, edit), "files", names)
        if is_st:
            for kind, edit in _st_attacks().items():
                add(name, f"st:{kind}", _edit_st(name, edit), "files")
        if is_pt:
            add(name, "pt:not-a-zip", _replace(name, b"PK\x03\x04" + bytes(60)), "files")
            add(name, "pt:zip-without-pickle", _replace(name, _zip_of({"archive/version": b"3\n"})), "files")
            add(name, "pt:list-not-dict", _replace(name, _torch_bytes([1, 2, 3])), "files")
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
        for kind, (edit, names) in _manifest_edits(model_names).items():
            if kind.startswith("manifest_checksum"):  # resealing would repair it: only the plain variant
                add("manifest.json", f"edit:{kind}", _edit_manifest(edit), None, names, checksum_only=False)
            else:
                add(
                    "manifest.json",
                    f"edit:{kind}",
                    _edit_manifest(edit),
                    "seal",
                    names,
                    checksum_only=kind == "files-checksum-wrong",
                )
    return cases


def _zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


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


# ---------------------------------------------------------------------------------------------------
# crash trials (SIGKILL of a saving child)
# ---------------------------------------------------------------------------------------------------


def writer_loop(root: Path, steps: int, *, report: Callable[[str], None] = lambda line: None) -> None:
    """Save the next ``steps`` steps through CheckpointManager(root, keep_last=2), reporting each."""
    manager = pc.CheckpointManager(root, keep_last=2)
    done = manager.steps()
    first = done[-1] + 1 if done else 1
    for step in range(first, first + steps):
        report(f"begin {step}")
        save_step(manager, step)
        report(f"committed {step}")
    manager.close()


def count_ops(root: Path, steps: int) -> int:
    """How many I/O calls ``writer_loop`` makes for ``steps`` steps (run here, in a scratch root; the
    fsync calls are counted but skipped: a count needs no durability)."""
    real_fsync = os.fsync
    os.fsync = lambda fd: None
    try:
        with Injector(match=re.escape(str(root))).installed() as inj:
            writer_loop(root, steps)
    finally:
        os.fsync = real_fsync
    return len(inj.calls)


@dataclass
class TrialResult:
    mode: str
    committed: list[int]
    loaded: int | None
    lost: list[str] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # leftovers, a failed resume

    @property
    def ok(self) -> bool:
        return not (self.lost or self.silent or self.unexpected or self.other)


def spawn(*args: str, stderr: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    """Start ``python tests/faults.py ARGS`` (one thread per BLAS/OpenMP pool: the tests run many at once)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(FAULTS_PY), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
    )


class ForkServer:
    """A child process that imports torch and the library once, then forks worker processes on request, so
    that a worker costs a fork rather than an interpreter start and a torch import (seconds of CPU each).

    Workers are real, separate processes: they run the roles of ``main`` (writers, readers, the disk-full
    writer) or a crash-trial writer, and die, or are killed, on their own.
    """

    def __init__(self) -> None:
        self.log = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.proc = spawn("fork-server", stderr=self.log)
        self._expect("ready")

    def _send(self, request: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def _expect(self, word: str) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith(word):
            raise RuntimeError(f"fork server said {line!r}, expected {word!r}: {self.errors()}")
        rest = line[len(word) :].strip()
        return json.loads(rest) if rest else None

    def errors(self) -> str:
        """What the server and its workers wrote to stderr (tracebacks)."""
        self.log.seek(0)
        return self.log.read()[-4000:]

    def run(
        self, jobs: Sequence[Sequence[str]], workdir: Path, *, stop_file: Path | None = None
    ) -> list[tuple[int, list[str]]]:
        """Fork one worker per job (a role of ``main`` and its arguments), release them all at once, and
        wait for them; returns (exit status, output lines) per job. Readers are waited for last, after
        ``stop_file`` is created (so a reader ends even if it never sees what it waits for)."""
        workdir.mkdir(parents=True, exist_ok=True)
        outs = [workdir / f"worker{i}.out" for i in range(len(jobs))]
        self._send(
            {
                "jobs": [list(j) for j in jobs],
                "outs": [str(o) for o in outs],
                "stop": str(stop_file) if stop_file else None,
            }
        )
        statuses = self._expect("statuses")
        return [
            (status, out.read_text(encoding="utf-8").splitlines()) for status, out in zip(statuses, outs, strict=True)
        ]

    def trial(self, root: Path, rng: random.Random, *, kind: str, steps: int, ops_per_run: int) -> TrialResult:
        """One crash trial: a forked writer saves ``steps`` steps through CheckpointManager(root, keep_last=2),
        reporting each step on a named pipe, and is killed with SIGKILL at a random moment; then the root
        is checked from this process (:func:`check_root_after_crash`).

        ``kind`` "op": the writer kills itself just before a random one of its I/O calls (every phase of a
        save is reachable: a write, an fsync, the commit rename, the replacement of ``latest``, a retention
        delete). "begin": this process kills it as soon as it reports beginning a random step, wherever it
        has got to by the time the signal lands.
        """
        kill_op = rng.randint(1, ops_per_run) if kind == "op" else 0
        target = f"begin {rng.randint(1, steps)}"
        mode = f"kill@op{kill_op}" if kind == "op" else f"kill@{target.replace(' ', '')}"
        fifo = root.parent / f"{root.name}.progress"
        os.mkfifo(fifo)
        self._send({"trial": {"root": str(root), "steps": steps, "kill_op": kill_op, "fifo": str(fifo)}})
        pid = self._expect("pid")
        lines = []
        with open(fifo, encoding="utf-8") as progress:  # EOF when the writer is dead
            for line in progress:
                lines.append(line.strip())
                if kind == "begin" and lines[-1] in (target, "finished"):
                    os.kill(pid, signal.SIGKILL)
        fifo.unlink()
        self._send({"wait": pid})
        status = self._expect("status")
        result = TrialResult(mode, [int(x.split()[1]) for x in lines if x.startswith("committed")], None)
        if status != -signal.SIGKILL:
            result.other.append(f"writer ended with status {status}, not SIGKILL: {self.errors()}")
        check_root_after_crash(root, result)
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.log.close()


_SERVER: list[ForkServer] = []


def fork_server() -> ForkServer:
    """The fork server of this process (started on first use, closed at exit)."""
    if not _SERVER or _SERVER[0].proc.poll() is not None:
        _SERVER[:] = [ForkServer()]
        atexit.register(_SERVER[0].close)
    return _SERVER[0]


def _worker(body: Callable[[], None], *, stdin_fd: int | None = None, stdout_path: str | None = None) -> None:
    """The life of a forked worker: rewire stdin/stdout, run ``body``, and exit without returning."""
    code = 0
    try:
        if stdin_fd is not None:
            os.dup2(stdin_fd, 0)
            sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 - lives as long as the process
        if stdout_path is not None:
            fd = os.open(stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        body()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # a worker reports every failure on stderr, then exits
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _crash_writer(root: Path, steps: int, kill_op: int, fifo: str) -> None:
    with open(fifo, "w", encoding="utf-8") as progress:

        def report(line: str) -> None:
            progress.write(line + "\n")
            progress.flush()

        kill = Injector(kill_at=kill_op, match=re.escape(str(root))).installed()  # calls on the root only
        with kill if kill_op else contextlib.nullcontext():
            writer_loop(root, steps, report=report)
        if kill_op:
            os.kill(os.getpid(), signal.SIGKILL)  # the kill point lay past the last save: die now
        report("finished")
        signal.pause()  # "begin" mode: wait for the parent's SIGKILL


def _fork_jobs(request: dict[str, Any]) -> list[int]:
    """Fork the workers of a "jobs" request, release them together, wait; their exit statuses."""
    workers = []
    for argv, out in zip(request["jobs"], request["outs"], strict=True):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            _worker(lambda argv=argv: main(argv), stdin_fd=r, stdout_path=out)
        os.close(r)
        workers.append((pid, w, argv[0] == "reader"))
    for _, w, _ in workers:  # every worker is forked and waits for this line: release them together
        os.write(w, b"go\n")
        os.close(w)
    statuses = {}
    for pid, _, reader in workers:
        if not reader:
            statuses[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if request["stop"]:
        Path(request["stop"]).touch()
    for pid, _, reader in workers:
        if reader:
            statuses[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return [statuses[pid] for pid, _, _ in workers]


def role_fork_server(args: argparse.Namespace) -> None:
    # warm up: the first save and load of a process import and initialise parts of torch lazily (about a
    # second); done once here, every forked worker inherits them. No thread outlives this warm-up.
    with tempfile.TemporaryDirectory() as scratch:
        load_values(save_step(Path(scratch), 1))
    _say("ready")
    for line in sys.stdin:
        request = json.loads(line)
        if "jobs" in request:
            _say(f"statuses {json.dumps(_fork_jobs(request))}")
        elif "wait" in request:
            _say(f"status {os.waitstatus_to_exitcode(os.waitpid(request['wait'], 0)[1])}")
        else:
            t = request["trial"]
            pid = os.fork()
            if pid == 0:
                _worker(lambda t=t: _crash_writer(Path(t["root"]), t["steps"], t["kill_op"], t["fifo"]))
            _say(f"pid {pid}")


def check_root_after_crash(root: Path, result: TrialResult) -> None:
    """The promises after a crash: the newest reported commit is there, every value right, temporaries
    never taken for checkpoints and removed by the next CheckpointManager, and saving resumes."""
    last = result.committed[-1] if result.committed else 0
    try:
        ckpt = pc.load_checkpoint(root, restore_rng=False)
        result.loaded = ckpt.step
        if not STEP_DIR.match(ckpt.path.name):
            result.silent.append(f"loaded {ckpt.path.name}, which is not a committed step directory")
        if ckpt.step < last:
            result.lost.append(f"loaded step {ckpt.step}, but step {last} had been committed")
        result.silent += [f"step {ckpt.step}: {p}" for p in state_problems(ckpt)]
    except pc.CheckpointNotFoundError as e:
        if last:
            result.lost.append(f"step {last} had been committed, but loading the root says: {e}")
    except pc.CheckpointError as e:
        result.lost.append(f"loading the root: {type(e).__name__}: {e}")
    except Exception as e:  # anything else is a finding
        result.unexpected.append(f"loading the root: {type(e).__module__}.{type(e).__qualname__}: {e}")
    for name in sorted(os.listdir(root)):
        if STEP_DIR.match(name) and (root / name / "manifest.json").is_file():
            try:
                step, problems = load_values(root / name)
                result.silent += [f"{name}: {p}" for p in problems]
            except pc.CheckpointError as e:
                result.lost.append(f"{name}: {type(e).__name__}: {e}")
            except Exception as e:  # anything else is a finding
                result.unexpected.append(f"{name}: {type(e).__module__}.{type(e).__qualname__}: {e}")
    try:
        manager = pc.CheckpointManager(root, keep_last=2)
        left = leftovers(root)
        if left:
            result.other.append(f"temporaries left after CheckpointManager opened the root: {left}")
        steps = manager.steps()
        nxt = (steps[-1] if steps else 0) + 1
        save_step(manager, nxt)
        step, problems = load_values(root)
        if step != nxt or problems or len(manager.steps()) != min(2, len(steps) + 1):
            result.other.append(f"resume: saved {nxt}, loaded {step} {problems}, kept {manager.steps()}")
    except pc.CheckpointError as e:
        result.other.append(f"resume failed: {type(e).__name__}: {e}")


def overwrite_ops(template: Path, scratch: Path) -> list[str]:
    """The I/O calls of ``save_checkpoint(step 2, overwrite=True)`` into a copy of ``template`` (steps 1, 2)."""
    shutil.copytree(template, scratch)
    with Injector(match=re.escape(str(scratch))).installed() as counter:
        save_step(scratch, 2, "B", overwrite=True)
    return counter.calls


def overwrite_kill_problems(template: Path, where: Path, kill_op: int) -> list[str]:
    """Kill a process overwriting step 2 (writer B over writer main) just before its ``kill_op``-th I/O call;
    then open the root with a CheckpointManager, as the next run would. Step 2 must still be there, whole
    (the old or the new), step 1 untouched, the root loading step 2, no temporaries left."""
    root = where / "root"
    shutil.copytree(template, root)
    server = fork_server()
    [(status, _)] = server.run(
        [["kill-writer", str(root), "--step", "2", "--name", "B", "--overwrite", "--kill-op", str(kill_op)]],
        where / "worker",
    )
    problems = []
    if status not in (-signal.SIGKILL, 0):
        problems.append(f"the writer failed ({status}): {server.errors()}")
    pc.CheckpointManager(root)
    for step in (1, 2):
        try:
            _, wrong = load_values(root / f"step-{step:08d}")
            problems += [f"step {step}: {p}" for p in wrong]
        except pc.CheckpointError as e:
            problems.append(f"step {step} lost: {type(e).__name__}: {e}")
    try:
        step, _ = load_values(root)
        if step != 2:
            problems.append(f"the root loads step {step}, not the newest, step 2")
    except pc.CheckpointError as e:
        problems.append(f"loading the root: {type(e).__name__}: {e}")
    if leftovers(root):
        problems.append(f"temporaries left after CheckpointManager opened the root: {leftovers(root)}")
    return problems


# ---------------------------------------------------------------------------------------------------
# child-process roles
# ---------------------------------------------------------------------------------------------------


def _say(line: str) -> None:
    print(line, flush=True)


def _wait_for_go() -> None:
    """Block until the fork server releases every worker of a run at once."""
    if sys.stdin.readline().strip() != "go":
        raise SystemExit(3)


def role_rlimit_writer(args: argparse.Namespace) -> None:
    """For each per-file size limit, in a fresh copy of a root holding steps 1 and 2: save step 3 with the
    limit in force (so some write fails with EFBIG), then report what the root looks like."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us instead of failing write
    base = Path(args.root)
    pristine = base / "pristine"
    manager = pc.CheckpointManager(pristine, keep_last=2)
    for step in (1, 2):
        save_step(manager, step)
    sizes = {n: (pristine / "step-00000002" / n).stat().st_size for n in FILES}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limits = sorted({0, 1, 7, 8, 100} | {s - 1 for s in sizes.values()} | {s // 2 for s in sizes.values()})
    for limit in (x for x in limits if x < max(sizes.values())):
        root = base / f"limit-{limit}"
        shutil.copytree(pristine, root)
        manager = pc.CheckpointManager(root, keep_last=2)
        record: dict[str, Any] = {"limit": limit}
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            save_step(manager, 3)
            record["outcome"] = "saved"
        except pc.CheckpointWriteError as e:
            record.update(outcome="CheckpointWriteError", errno=e.errno, message=str(e))
        except Exception as e:  # reported to the parent, which fails the test
            record.update(outcome=f"{type(e).__module__}.{type(e).__qualname__}", message=str(e)[:300])
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        record["steps"] = manager.steps()
        record["latest"] = latest_name(root)
        record["leftovers"] = leftovers(root)
        try:
            record["loaded"], record["problems"] = load_values(root)
        except pc.CheckpointError as e:
            record["loaded"], record["problems"] = None, [f"{type(e).__name__}: {e}"]
        _say(json.dumps(record))
    _say("done")


def role_writer(args: argparse.Namespace) -> None:
    """Saves the given steps (save_checkpoint, or a manager with retention) once the parent says go."""
    root = Path(args.root)
    steps = [int(s) for s in args.steps.split(",")]
    manager = pc.CheckpointManager(root, keep_last=args.keep_last) if args.keep_last else None
    _wait_for_go()
    for step in steps:
        try:
            save_step(manager if manager is not None else root, step, args.name, overwrite=args.overwrite)
            _say(json.dumps({"step": step, "outcome": "saved"}))
        except pc.CheckpointError as e:
            _say(json.dumps({"step": step, "outcome": type(e).__name__, "message": str(e)}))
        except Exception as e:  # reported to the parent, which fails the test
            _say(
                json.dumps(
                    {
                        "step": step,
                        "outcome": f"unexpected {type(e).__module__}.{type(e).__qualname__}",
                        "message": str(e),
                    }
                )
            )
    _say("done")


def role_kill_writer(args: argparse.Namespace) -> None:
    """Saves one step (save_checkpoint) and SIGKILLs itself just before its ``--kill-op``-th I/O call."""
    root = Path(args.root)
    with Injector(kill_at=args.kill_op, match=re.escape(str(root))).installed() as inj:
        save_step(root, args.step, args.name, overwrite=args.overwrite)
    _say(json.dumps(inj.calls))


def role_reader(args: argparse.Namespace) -> None:
    """Loads ``root`` (a root, or one checkpoint) in a loop until it sees ``--until-step`` or the stop file
    appears; prints counts: complete loads, CheckpointNotFoundError, and everything else ("bad")."""
    root = Path(args.root)
    counts: dict[str, Any] = {"loaded": 0, "not_found": 0, "latest_checked": 0, "bad": [], "steps": []}
    _wait_for_go()
    while True:
        if args.check_latest:  # without retention, `latest` must always name a complete checkpoint
            name = latest_name(root)
            if name:
                counts["latest_checked"] += 1
                try:
                    _, problems = load_values(root / name)
                    if problems:
                        counts["bad"].append(f"latest -> {name}: {'; '.join(problems)}")
                except Exception as e:  # every failure here is a finding
                    counts["bad"].append(f"latest -> {name}: {type(e).__module__}.{type(e).__qualname__}: {e}")
        try:
            step, problems = load_values(root, verify=not args.no_verify)
            counts["loaded"] += 1
            counts["steps"].append(step)
            if problems:  # one entry per load
                counts["bad"].append(f"step {step}: {'; '.join(problems)}")
            if args.until_step is not None and step >= args.until_step:
                break
        except pc.CheckpointNotFoundError:
            counts["not_found"] += 1
        except Exception as e:  # every other failure is a finding
            counts["bad"].append(f"{type(e).__module__}.{type(e).__qualname__}: {e}")
        if os.path.exists(args.stop_file):
            break
    counts["distinct_steps"] = len(set(counts.pop("steps")))
    _say(json.dumps(counts))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="faults.py", description="child processes of the fault tests")
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("fork-server")
    p.set_defaults(run=role_fork_server)
    p = sub.add_parser("rlimit-writer")
    p.add_argument("root")
    p.set_defaults(run=role_rlimit_writer)
    p = sub.add_parser("writer")
    p.add_argument("root")
    p.add_argument("--steps", required=True)
    p.add_argument("--name", default="main", choices=sorted(WRITER_OFFSETS))
    p.add_argument("--keep-last", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=role_writer)
    p = sub.add_parser("kill-writer")
    p.add_argument("root")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--name", default="main", choices=sorted(WRITER_OFFSETS))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--kill-op", type=int, required=True)
    p.set_defaults(run=role_kill_writer)
    p = sub.add_parser("reader")
    p.add_argument("root")
    p.add_argument("--until-step", type=int, default=None)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--check-latest", action="store_true")
    p.add_argument("--no-verify", action="store_true")
    p.set_defaults(run=role_reader)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
