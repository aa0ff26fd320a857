"""manifest.json: build, seal with its own checksum, parse and check."""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path
from typing import Any

import torch

from portable_ckpt.errors import CheckpointCorruptedError, CheckpointInputError, UnsupportedFormatVersionError
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import schemas as _schemas
from portable_ckpt.format.hashing import ALGORITHM, checksum
from portable_ckpt.storage import local as _layout
from portable_ckpt.version import __version__

FORMAT = "portable-ckpt"
FORMAT_VERSION = 1  # what a one-process save writes
SHARDED_FORMAT_VERSION = 2  # what a save under a process group writes (format_spec/README.md §20)
INCREMENTAL_FORMAT_VERSION = 3  # an incremental save: the model state in parts (§21)
READ_VERSION = INCREMENTAL_FORMAT_VERSION  # the newest format_version this reader reads
MANIFEST = "manifest.json"
LIBRARY_VERSION = __version__  # the producer version written into every manifest


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# The file ends with its checksum as the top-level object's last member, so a reader checks the
# exact bytes it read: body = everything before this trailer, plus "}\n".
_TRAILER = re.compile(rb',"manifest_checksum":"([0-9a-f]{32})"\}\n\Z')
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")  # the schema's pattern, matched whole


def seal(doc: dict[str, Any]) -> dict[str, Any]:
    """Add ``manifest_checksum``: XXH3-128 of the canonical bytes of every other field."""
    body = {k: v for k, v in doc.items() if k != "manifest_checksum"}
    return {**body, "manifest_checksum": checksum(_jsonio.dumps(body))}


def encode(doc: dict[str, Any]) -> bytes:
    """The bytes of manifest.json: the canonical body, its checksum appended as the last member."""
    body = _jsonio.dumps({k: v for k, v in doc.items() if k != "manifest_checksum"})
    return body[:-2] + b',"manifest_checksum":"' + checksum(body).encode("ascii") + b'"}\n'


_CHECKSUM = re.compile(r"[0-9a-f]{32}")


def validate(doc: Any, label: str) -> None:
    """The manifest schema, with the per-tensor checksum tables checked here by the schema's own rule.

    jsonschema spends ~15 us per table entry; a checkpoint of 10,000 tensors would pay that twice.
    """
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict):
        _schemas.validate(doc, "manifest", label)
        return
    tables = {n: e["tensors"] for n, e in files.items() if isinstance(e, dict) and "tensors" in e}
    slim = {n: ({k: v for k, v in e.items() if k != "tensors"} if n in tables else e) for n, e in files.items()}
    _schemas.validate({**doc, "files": slim}, "manifest", label)
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise CheckpointCorruptedError(
                f"{label}: schema violation at $.files.{name}.tensors: not an object", file=label
            )
        for tensor, digest in table.items():
            if not (isinstance(digest, str) and _CHECKSUM.fullmatch(digest)):
                raise CheckpointCorruptedError(
                    f"{label}: schema violation at $.files.{name}.tensors.{tensor}: {digest!r} is not 32 lowercase "
                    "hex digits",
                    file=label,
                )


def build(
    *,
    step: int,
    files: dict[str, dict[str, Any]],
    aliases: dict[str, str],
    rng: list[str],
    quantization: dict[str, Any] | None,
    extra: dict[str, Any] | None,
    version: int = FORMAT_VERSION,
) -> dict[str, Any]:
    if type(step) is not int or not 0 <= step < _jsonio.INT_END:
        raise CheckpointInputError(f"step must be an int in [0, 2**64), found {step!r}")
    doc: dict[str, Any] = {
        "format": FORMAT,
        "format_version": version,
        "step": step,
        "created_at": now(),
        "producer": {"name": "portable-ckpt", "version": LIBRARY_VERSION, "torch": torch.__version__},
        "checksum_algorithm": ALGORITHM,
        "files": files,
        "aliases": aliases,
        "rng": rng,
        "quantization": quantization,
        "extra": extra,
    }
    doc = seal(doc)
    validate(doc, MANIFEST)
    return doc


def read_regular(path: Path, filename: str, limit: int | None = None) -> bytes:
    """Read a file of a checkpoint, refusing symlinks and anything but regular files."""
    with _layout.open_regular(path, filename) as f:
        st = os.fstat(f.fileno())
        if limit is not None and st.st_size > limit:
            raise CheckpointCorruptedError(
                f"{path}: {filename} is {st.st_size} bytes, over the limit of {limit}", file=path
            )
        return f.read()


def parse(data: bytes, *, where: str) -> dict[str, Any]:
    """Parse and check a manifest: format, version, schema, then its own checksum."""
    label = f"{where}/{MANIFEST}" if where else MANIFEST
    doc = _jsonio.loads(data, label)
    if not isinstance(doc, dict):
        raise CheckpointCorruptedError(f"{label}: expected a JSON object, found {type(doc).__name__}", file=label)
    version = doc.get("format_version")
    if doc.get("format") == FORMAT and type(version) is int and version > READ_VERSION:
        raise UnsupportedFormatVersionError(
            f"{label}: format_version {version} is newer than this reader supports ({READ_VERSION}); "
            "upgrade portable-ckpt to read it",
            file=label,
        )
    validate(doc, label)
    trailer = _TRAILER.search(data)
    if trailer is None or trailer.group(1).decode("ascii") != doc["manifest_checksum"]:
        raise CheckpointCorruptedError(
            f'{label}: the file must end with ,"manifest_checksum":"<32 hex digits>"}} and a newline '
            "(the checksum is the last member); the manifest was modified or damaged",
            file=label,
        )
    expected = checksum(data[: trailer.start()] + b"}\n")
    if doc["manifest_checksum"] != expected:
        raise CheckpointCorruptedError(
            f"{label}: manifest_checksum is {doc['manifest_checksum']} but the manifest's content hashes to "
            f"{expected}; the manifest was modified or damaged",
            file=label,
        )
    for name in doc["files"]:
        if not FILE_NAME.fullmatch(name):
            raise CheckpointCorruptedError(
                f"{label}: file name {name!r} is not allowed (expected {FILE_NAME.pattern})", file=label
            )
    return doc
