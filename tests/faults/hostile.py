"""Hostile pickles: objects whose unpickling runs code, torch.save files and raw pickles that carry them,
and the hand-built zip and torch.save files the corruption catalog puts where a ``.pt`` file should be.
"""

from __future__ import annotations

import builtins
import io
import os
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


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


def zip_of(members: dict[str, bytes]) -> bytes:
    """A zip archive (stored, not compressed) holding ``members``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def torch_bytes(obj: Any) -> bytes:
    """What ``torch.save(obj)`` writes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
