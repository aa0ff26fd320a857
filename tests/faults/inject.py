"""Fault injection and limits: failing ``os.write``/``os.fsync``/``os.link``/... at a chosen call (or SIGKILL
there), another process's retention or overwrite acting right after a file is opened, a deadline (SIGALRM),
and the peak resident memory of a block.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    # an incremental save's hard link of a part of the previous checkpoint (format_spec §21.3); the source is
    # a name relative to the source directory's descriptor, the target a path in the staging directory
    "link": lambda src, dst, *a, **k: f"{os.fspath(src)} -> {os.fspath(dst)}",
}
IO_ERRNO = {
    "write": errno.ENOSPC,
    "fsync": errno.EIO,
    "open": errno.ENOSPC,
    "mkdir": errno.EDQUOT,
    "rename": errno.EIO,
    "replace": errno.EIO,
    "link": errno.EXDEV,
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
