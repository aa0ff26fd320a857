"""An attacker's editing tools: read and write a manifest (resealed or not), take a safetensors file apart
and build one by hand (``struct.pack``), and recompute every size and checksum of a damaged checkpoint so
that only the reader's own checks can refuse it.
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Any

from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import manifest as _manifest
from portable_ckpt.format.hashing import checksum

__all__ = ["checksum", "read_manifest", "recompute", "st_pack", "st_split", "tensor_table", "write_manifest"]


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
