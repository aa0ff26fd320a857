"""One committed checkpoint held open for reading, every file checked against its manifest.

``CheckpointFiles`` reads and checks ``manifest.json`` (size limit, schema, its own checksum, the
step against the directory name), then opens the files it lists, each checked for kind and size,
and (when verifying) checksum. The checks a checkpoint's structure needs beyond one file — the
tensor table, aliases, the quantization metadata — live here too, once, for every reader.
"""

from __future__ import annotations

import contextlib
import io
import mmap
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from portable_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    QuantizationMetadataError,
    UnsupportedFormatVersionError,
)
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import layout as _layout
from portable_ckpt.format import manifest as _manifest
from portable_ckpt.format import names
from portable_ckpt.format import pt as _pt
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.format import schemas as _schemas
from portable_ckpt.format.hashing import checksum, new_hasher
from portable_ckpt.quant import quantize as _quant
from portable_ckpt.storage import ReadFile, Storage

_HASH_CHUNK = 8 << 20
SUMMARY_FIELDS = ("mode", "bits", "symmetric", "granularity", "group_size")


class CheckpointFiles:
    """A checkpoint directory held open (see the module docstring). Use as a context manager."""

    def __init__(self, storage: Storage, verify: bool) -> None:
        self.storage = storage
        self.location = storage.location
        self.verify = verify
        self.dir = storage.open_dir()
        try:
            with contextlib.closing(self.dir.open(names.MANIFEST)) as f:
                if f.size > _jsonio.MAX_JSON_BYTES:
                    raise CheckpointCorruptedError(
                        f"{self.label(names.MANIFEST)}: {f.size} bytes, over the limit of {_jsonio.MAX_JSON_BYTES}",
                        file=self.label(names.MANIFEST),
                    )
                self.manifest = _manifest.parse(f.read(), where=self.location)
            dir_step = names.step_of(self.location.rstrip("/").rsplit("/", 1)[-1])
            if dir_step is not None and dir_step != self.manifest["step"]:
                raise CheckpointCorruptedError(
                    f"{self.label(names.MANIFEST)}: step is {self.manifest['step']} but the directory is named for "
                    f"step {dir_step}",
                    file=self.label(names.MANIFEST),
                )
        except BaseException:
            self.dir.close()
            raise
        self.entries: dict[str, dict[str, Any]] = self.manifest["files"]
        self._model_files: list[str] | None = None

    @property
    def model_files(self) -> list[str]:
        """The files holding the model state: ``model.safetensors``, or the model parts (format_version 3,
        checked as §21.1 says) in part order."""
        if self._model_files is None:
            self._model_files = _layout.model_files(self.manifest, self.label(names.MANIFEST))
        return self._model_files

    def close(self) -> None:
        self.dir.close()

    def __enter__(self) -> CheckpointFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exists(self, name: str) -> bool:
        return self.dir.kind(name) is not None

    def label(self, name: str) -> str:
        return f"{self.location}/{name}"

    def open(self, name: str) -> ReadFile:
        """Open a listed file, checking its kind and its size against the manifest."""
        try:
            f = self.dir.open(name)
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(
                f"{self.label(name)}: {name} is listed in the manifest but missing", file=self.label(name)
            ) from None
        expected = self.entries[name]["size"]
        if f.size != expected:
            f.close()
            raise CheckpointCorruptedError(
                f"{self.label(name)}: size mismatch: the manifest says {expected} bytes, found {f.size}",
                file=self.label(name),
            )
        return f

    @contextlib.contextmanager
    def opened(self, name: str) -> Iterator[ReadFile]:
        f = self.open(name)
        try:
            yield f
        finally:
            f.close()

    def check_digest(self, name: str, digest: str, consequence: str = "") -> None:
        expected = self.entries[name]["checksum"]
        if digest != expected:
            raise CheckpointCorruptedError(
                f"{self.label(name)}: checksum mismatch: the manifest says {expected}, the file hashes to {digest}"
                + consequence,
                file=self.label(name),
            )

    def hash_file(self, f: ReadFile) -> str:
        """The checksum of the whole file: hashed from its pages in place where it can be mapped (no copy
        into a buffer first: the hash then costs what reading memory costs), else read in chunks."""
        h = new_hasher()
        path = f.mmap_path()
        if path is not None and f.size:
            with open(path, "rb") as mapped, mmap.mmap(mapped.fileno(), 0, access=mmap.ACCESS_READ) as pages:
                view = memoryview(pages)
                try:
                    for pos in range(0, len(view), _HASH_CHUNK):
                        h.update(view[pos : pos + _HASH_CHUNK])
                finally:
                    view.release()
            return h.hexdigest()
        f.seek(0)
        buf = bytearray(_HASH_CHUNK)
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
        return h.hexdigest()

    def verify_file(self, name: str) -> None:
        """Check kind and size, and the checksum when verifying."""
        with self.opened(name) as f:
            if self.verify:
                self.check_digest(name, self.hash_file(f))

    def read_bytes(self, name: str) -> bytes:
        with self.opened(name) as f:
            data = f.read()
        if self.verify:
            self.check_digest(name, checksum(data))
        return data

    def read_json(
        self, name: str, kind: str | None, error: type[CheckpointCorruptedError] = CheckpointCorruptedError
    ) -> Any:
        try:
            data = self.read_bytes(name)
        except CheckpointCorruptedError as e:
            raise error(str(e)) from None
        doc = _jsonio.loads(data, self.label(name))
        if kind is not None:
            _schemas.validate(doc, kind, self.label(name), error)
        return doc

    def read_header(self, f: ReadFile, name: str) -> tuple[_safetensors.Header, bytes]:
        return _safetensors.read_header(f, self.entries[name]["size"], self.label(name))

    def read_tensors(self, name: str) -> tuple[_safetensors.Header, dict[str, torch.Tensor]]:
        with self.opened(name) as f:
            header, raw = self.read_header(f, name)
            file_hash = new_hasher() if self.verify else None
            if file_hash is not None:
                file_hash.update(raw)
            tensors = _safetensors.read_tensors(f, header, self.label(name), file_hash=file_hash)
        if file_hash is not None:
            self.check_digest(name, file_hash.hexdigest())
        return header, tensors

    def read_pt(self, name: str, map_location: Any) -> Any:
        """torch.load the very file that was verified (through its descriptor, memory-mapped where the
        backend gives a path to it), with the format's unpickling rules."""
        with self.opened(name) as f:
            if self.verify:
                self.check_digest(name, self.hash_file(f))
            path = f.mmap_path()
            if path is not None:
                return _pt.load(path, self.label(name), map_location)
            f.seek(0)
            return _pt.load(io.BytesIO(f.read()), self.label(name), map_location, mmap=False)


def check_tensor_table(files: CheckpointFiles, header: _safetensors.Header, name: str = names.MODEL) -> None:
    """The manifest's per-tensor checksum table names exactly the tensors of a model file."""
    listed = files.entries[name].get("tensors")
    if listed is not None and set(listed) != set(header.names()):
        missing = sorted(set(listed) - set(header.names()))
        unlisted = sorted(set(header.names()) - set(listed))
        raise CheckpointCorruptedError(
            f"{files.label(name)}: tensors disagree with the manifest: "
            f"listed but absent {missing[:10]}, present but unlisted {unlisted[:10]}",
            file=files.label(name),
        )


ModelFile = tuple[str, ReadFile, _safetensors.Header, bytes]  # name, open file, header, raw header bytes


def open_model_files(files: CheckpointFiles) -> list[ModelFile]:
    """Every model file opened, its header read and checked against its tensor table, in part order; the
    caller closes them (they stay readable after ``files`` is closed). On an error none is left open."""
    opened: list[ModelFile] = []
    try:
        for name in files.model_files:
            f = files.open(name)
            try:
                header, raw = files.read_header(f, name)
                check_tensor_table(files, header, name)
            except BaseException:
                f.close()
                raise
            opened.append((name, f, header, raw))
    except BaseException:
        for _, f, _, _ in opened:
            f.close()
        raise
    return opened


@contextlib.contextmanager
def model_headers(files: CheckpointFiles) -> Iterator[list[ModelFile]]:
    """``open_model_files``, the files open for the block."""
    opened = open_model_files(files)
    try:
        yield opened
    finally:
        for _, f, _, _ in opened:
            f.close()


def merged_header(parts: list[ModelFile]) -> _safetensors.Header:
    """One header listing the tensors of every model file (for the checks on the whole model state)."""
    if len(parts) == 1:
        return parts[0][2]
    return _safetensors.Header(
        entries=tuple(e for _, _, header, _ in parts for e in header.entries), metadata={}, data_start=0
    )


def check_aliases(stored: set[str] | frozenset[str], aliases: Mapping[str, str], filename: str) -> None:
    """Every alias points at a stored tensor and is not itself stored (the one alias rule of §8)."""
    for alias, target in aliases.items():
        if target not in stored:
            raise CheckpointCorruptedError(
                f'{filename}: alias "{alias}" points at "{target}", which is not stored', file=filename
            )
        if alias in stored:
            raise CheckpointCorruptedError(f'{filename}: alias "{alias}" is also stored as a tensor', file=filename)


def with_aliases(
    tensors: dict[str, torch.Tensor], aliases: Mapping[str, str], filename: str
) -> dict[str, torch.Tensor]:
    """The state_dict with every alias resolved to its stored tensor, sorted by name."""
    check_aliases(set(tensors), aliases, filename)
    out = dict(tensors)
    out.update({alias: tensors[target] for alias, target in aliases.items()})
    return dict(sorted(out.items()))


def read_quantization(
    files: CheckpointFiles, manifest: dict[str, Any], header: _safetensors.Header
) -> dict[str, Any] | None:
    """The quantization metadata document the manifest announces, checked against the stored tensors."""
    summary = manifest.get("quantization")
    if summary is None:
        return None
    name = summary["metadata_file"]
    if name not in files.entries:
        raise QuantizationMetadataError(
            f"{files.label(name)}: the quantization metadata file is missing, but the manifest says the model "
            f"is quantized (mode {summary['mode']}, {summary['bits']} bits)",
            file=files.label(name),
        )
    meta = files.read_json(name, None, QuantizationMetadataError)
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if type(version) is int and version > _manifest.FORMAT_VERSION:
        raise UnsupportedFormatVersionError(
            f"{files.label(name)}: format_version {version} is newer than this reader supports "
            f"({_manifest.FORMAT_VERSION}); upgrade portable-ckpt to read it",
            file=files.label(name),
        )
    _schemas.validate(meta, "quantization_metadata", files.label(name), QuantizationMetadataError)
    for key in SUMMARY_FIELDS:  # the manifest's summary copies these from the metadata (quantization.md)
        if key in summary and (type(meta.get(key)) is not type(summary[key]) or meta.get(key) != summary[key]):
            raise QuantizationMetadataError(
                f"{files.label(name)}: {key} is {meta.get(key)!r} but the manifest says {summary[key]!r}",
                file=files.label(name),
            )
    _quant.check_metadata(meta, {e.name: (e.dtype, list(e.shape)) for e in header.entries}, filename=files.label(name))
    return meta
