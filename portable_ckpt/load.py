"""load_checkpoint: find, verify and read a checkpoint, then restore live objects from it.

Everything is read and checked before anything is restored, so a damaged checkpoint never leaves
a model half loaded.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from portable_ckpt.convert import format0 as _legacy
from portable_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    QuantizationMetadataError,
    StateMismatchError,
    UnsupportedFormatVersionError,
)
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import manifest as _manifest
from portable_ckpt.format import pt as _pt
from portable_ckpt.format import rng as _rng
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.format import schemas as _schemas
from portable_ckpt.format.hashing import checksum, new_hasher
from portable_ckpt.quant import quantize as _quant
from portable_ckpt.save import (
    CONFIG_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    QUANT_FILE,
    SCALER_FILE,
    SCHEDULER_FILE,
    VOCAB_FILE,
)
from portable_ckpt.state import Stateful, check_model_match, check_optimizer_match, load_into, with_aliases
from portable_ckpt.storage import local as _layout
from portable_ckpt.types import Checkpoint

_HASH_CHUNK = 8 << 20
_RESOLVE_ATTEMPTS = 3


def resolve(path: str | os.PathLike[str]) -> Path:
    """The checkpoint directory ``path`` names: itself, or a root's newest committed checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"{p}: no such checkpoint or directory")
    if not p.is_dir():
        raise CheckpointNotFoundError(f"{p}: not a directory; pass a checkpoint directory or a checkpoints root")
    if (p / _manifest.MANIFEST).exists() or _legacy.is_legacy(p):
        return p
    if _layout.step_of(p.name) is not None or (p / MODEL_FILE).exists():
        raise CheckpointNotFoundError(
            f"{p / _manifest.MANIFEST}: manifest.json is missing; the checkpoint is incomplete"
        )
    latest = _layout.read_latest(p)
    if latest is None:
        raise CheckpointNotFoundError(
            f"{p}: no committed checkpoint here (expected manifest.json, or step-NNNNNNNN directories with one)"
        )
    return latest


class _Files:
    """One checkpoint directory, held open: its manifest, and the files it lists, each checked for
    kind, size and (when verifying) checksum. Every file is opened through the directory's
    descriptor, so a concurrent overwrite or retention cannot mix two checkpoints."""

    def __init__(self, directory: Path, verify: bool) -> None:
        self.dir = directory
        self.verify = verify
        self.fd = _layout.open_dir(directory)
        try:
            with _layout.open_regular(directory / _manifest.MANIFEST, _manifest.MANIFEST, dir_fd=self.fd) as f:
                size = os.fstat(f.fileno()).st_size
                if size > _jsonio.MAX_JSON_BYTES:
                    raise CheckpointCorruptedError(
                        f"{directory}/{_manifest.MANIFEST}: {size} bytes, over the limit of {_jsonio.MAX_JSON_BYTES}"
                    )
                self.manifest = _manifest.parse(f.read(), where=str(directory))
            dir_step = _layout.step_of(directory.name)
            if dir_step is not None and dir_step != self.manifest["step"]:
                raise CheckpointCorruptedError(
                    f"{directory}/manifest.json: step is {self.manifest['step']} but the directory is named for "
                    f"step {dir_step}"
                )
        except BaseException:
            os.close(self.fd)
            raise
        self.entries: dict[str, dict[str, Any]] = self.manifest["files"]

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def label(self, name: str) -> str:
        return f"{self.dir}/{name}"

    def open(self, name: str) -> io.BufferedReader:
        path = self.dir / name
        f = _layout.open_regular(path, name, missing=f"{name} is listed in the manifest but missing", dir_fd=self.fd)
        size = os.fstat(f.fileno()).st_size
        expected = self.entries[name]["size"]
        if size != expected:
            f.close()
            raise CheckpointCorruptedError(f"{path}: size mismatch: the manifest says {expected} bytes, found {size}")
        return f

    def check_digest(self, name: str, digest: str, consequence: str = "") -> None:
        expected = self.entries[name]["checksum"]
        if digest != expected:
            raise CheckpointCorruptedError(
                f"{self.label(name)}: checksum mismatch: the manifest says {expected}, the file hashes to {digest}"
                + consequence
            )

    def verify_file(self, name: str) -> None:
        """Check kind and size, and the checksum when verifying."""
        with self.open(name) as f:
            if not self.verify:
                return
            h = new_hasher()
            buf = bytearray(_HASH_CHUNK)
            while n := f.readinto(buf):
                h.update(memoryview(buf)[:n])
        self.check_digest(name, h.hexdigest())

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
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
        try:
            doc = _jsonio.loads(data, self.label(name))
            if kind is not None:
                _schemas.validate(doc, kind, self.label(name), error)
        except CheckpointCorruptedError as e:
            raise error(str(e)) from None
        return doc

    def read_tensors(self, name: str) -> tuple[_safetensors.Header, dict[str, torch.Tensor]]:
        with self.open(name) as f:
            size = self.entries[name]["size"]
            header, raw = _safetensors.read_header(f, size, self.label(name))
            file_hash = new_hasher() if self.verify else None
            if file_hash is not None:
                file_hash.update(raw)
            tensors = _safetensors.read_tensors(f, header, self.label(name), file_hash=file_hash)
        if file_hash is not None:
            self.check_digest(name, file_hash.hexdigest())
        return header, tensors

    def read_pt(self, name: str, map_location: Any) -> Any:
        """torch.load the very file that was verified (through its descriptor), memory-mapped."""
        with self.open(name) as f:
            if self.verify:
                h = new_hasher()
                buf = bytearray(_HASH_CHUNK)
                while n := f.readinto(buf):
                    h.update(memoryview(buf)[:n])
                self.check_digest(name, h.hexdigest())
            proc = f"/proc/self/fd/{f.fileno()}"
            if os.path.exists(proc):
                return _pt.load(proc, self.label(name), map_location)
            f.seek(0)
            return _pt.load(f, self.label(name), map_location, mmap=False)


def _check_tensor_table(files: _Files, header: _safetensors.Header) -> None:
    listed = files.entries[MODEL_FILE].get("tensors")
    if listed is not None and set(listed) != set(header.names()):
        missing = sorted(set(listed) - set(header.names()))
        unlisted = sorted(set(header.names()) - set(listed))
        raise CheckpointCorruptedError(
            f"{files.label(MODEL_FILE)}: tensors disagree with the manifest: "
            f"listed but absent {missing[:10]}, present but unlisted {unlisted[:10]}"
        )


def _check_aliases(files: _Files, header: _safetensors.Header, aliases: Mapping[str, str]) -> None:
    stored = set(header.names())
    for alias, target in aliases.items():
        if target not in stored:
            raise CheckpointCorruptedError(
                f'{files.label(MODEL_FILE)}: alias "{alias}" points at "{target}", which is not stored'
            )
        if alias in stored:
            raise CheckpointCorruptedError(f'{files.label(MODEL_FILE)}: alias "{alias}" is also stored as a tensor')


def _quantization(files: _Files, manifest: dict[str, Any], header: _safetensors.Header) -> dict[str, Any] | None:
    summary = manifest.get("quantization")
    if summary is None:
        return None
    name = summary["metadata_file"]
    if name not in files.entries or not files.exists(name):
        raise QuantizationMetadataError(
            f"{files.label(name)}: the quantization metadata file is missing, but the manifest says the model "
            f"is quantized (mode {summary['mode']}, {summary['bits']} bits)"
        )
    meta = files.read_json(name, None, QuantizationMetadataError)
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if type(version) is int and version > _manifest.FORMAT_VERSION:
        raise UnsupportedFormatVersionError(
            f"{files.label(name)}: format_version {version} is newer than this reader supports "
            f"({_manifest.FORMAT_VERSION}); upgrade portable-ckpt to read it"
        )
    _schemas.validate(meta, "quantization_metadata", files.label(name), QuantizationMetadataError)
    for key in ("mode", "bits"):
        if meta.get(key) != summary[key]:
            raise QuantizationMetadataError(
                f"{files.label(name)}: {key} is {meta.get(key)!r} but the manifest says {summary[key]!r}"
            )
    _quant.check_metadata(meta, {e.name: (e.dtype, list(e.shape)) for e in header.entries}, filename=files.label(name))
    return meta


def _destinations(
    model: nn.Module | None, header: _safetensors.Header
) -> Callable[[_safetensors.TensorEntry], torch.Tensor | None] | None:
    """Read straight into the model's own CPU tensors where dtype and shape agree: no second copy."""
    if model is None:
        return None
    own = model.state_dict(keep_vars=True)

    def target(entry: _safetensors.TensorEntry) -> torch.Tensor | None:
        t = own.get(entry.name)
        if (
            t is None
            or t.device.type != "cpu"
            or t.dtype != _safetensors.DTYPES[entry.dtype]
            or tuple(t.shape) != entry.shape
            or not t.is_contiguous()
        ):
            return None
        return t

    return target


def prepare_model(path: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Convert ``model`` to the quantized form the checkpoint at ``path`` describes (no-op if full precision).

    Call it before building the optimizer when resuming a quantized run, so the optimizer holds
    the quantized model's parameters; then ``load_checkpoint(path, model, optimizer)``.
    """
    directory = resolve(path)
    if not (directory / _manifest.MANIFEST).exists():
        return model  # format 0 has no quantization
    with _Files(directory, verify=True) as files:
        manifest = files.manifest
        if manifest.get("quantization") is None:
            return model
        with files.open(MODEL_FILE) as f:
            header, _ = _safetensors.read_header(f, files.entries[MODEL_FILE]["size"], files.label(MODEL_FILE))
        quant = _quantization(files, manifest, header)
    if quant is not None:
        _quant.apply_quantization(model, quant)
    return model


def _check_optimizer_params(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Converting a float model to quantized modules replaces its parameters: an optimizer must be
    built on the quantized model. Checked before the model is touched, and again after conversion."""
    if optimizer is None:
        return
    fix = (
        "build the optimizer after quantize(model, ...) or portable_ckpt.prepare_model(path, model), "
        "so it holds the quantized model's parameters"
    )
    if not _quant.is_quantized(model):
        raise StateMismatchError(
            f"the checkpoint is quantized but the model is not: the optimizer holds the float model's parameters, "
            f"which loading would replace; {fix}"
        )
    own = {id(p) for p in model.parameters()}
    foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in own)
    if foreign:
        raise StateMismatchError(f"the optimizer holds {foreign} parameter(s) that are not the model's; {fix}")


def read_checkpoint(
    directory: Path,
    *,
    map_location: Any = "cpu",
    verify: bool = True,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    strict: bool = True,
) -> tuple[Checkpoint, dict[str, Any] | None]:
    """Read and check a format-1 checkpoint directory; returns it with its RNG documents (or None).

    Every other file is read and checked before the model's tensors. Given ``model``, it is
    converted to the checkpoint's quantized form if needed, matched against the stored names and
    shapes, and its CPU tensors are filled in place as the bytes arrive.
    """
    with _Files(directory, verify) as files:
        return _read(files, map_location=map_location, model=model, optimizer=optimizer, strict=strict)


def _read(
    files: _Files, *, map_location: Any, model: nn.Module | None, optimizer: torch.optim.Optimizer | None, strict: bool
) -> tuple[Checkpoint, dict[str, Any] | None]:
    directory, manifest, verify = files.dir, files.manifest, files.verify
    listed = files.entries
    config = files.read_json(CONFIG_FILE, None) if CONFIG_FILE in listed else {}
    if not isinstance(config, dict):
        raise CheckpointCorruptedError(f"{files.label(CONFIG_FILE)}: expected a JSON object")
    vocab = files.read_json(VOCAB_FILE, "vocab") if VOCAB_FILE in listed else None
    rng = None
    if _rng.JSON_FILE in listed:
        doc = files.read_json(_rng.JSON_FILE, "rng")
        _, rng_tensors = files.read_tensors(_rng.TENSOR_FILE) if _rng.TENSOR_FILE in listed else (None, {})
        _rng.check(rng_tensors, doc)
        rng = {"doc": doc, "tensors": rng_tensors}
    consumed = {CONFIG_FILE, VOCAB_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE, MODEL_FILE}
    if rng is not None:
        consumed |= {_rng.JSON_FILE, _rng.TENSOR_FILE}
    if manifest.get("quantization") is not None:
        consumed.add(manifest["quantization"]["metadata_file"])
    optional_pt = {
        name: files.read_pt(name, map_location) if name in listed else None
        for name in (OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE)
    }
    for name, state in optional_pt.items():
        if state is not None and not isinstance(state, dict):
            raise CheckpointCorruptedError(
                f"{files.label(name)}: expected a state_dict (a dict), found {type(state).__name__}"
            )
    opt_state = optional_pt[OPTIMIZER_FILE]
    if opt_state is not None and not {"state", "param_groups"} <= set(opt_state):
        raise CheckpointCorruptedError(
            f"{files.label(OPTIMIZER_FILE)}: an optimizer state_dict needs 'state' and 'param_groups'"
        )
    for name in sorted(set(listed) - consumed):
        files.verify_file(name)  # listed but not used by this reader: still verified, otherwise ignored

    with files.open(MODEL_FILE) as f:
        header, raw = _safetensors.read_header(f, listed[MODEL_FILE]["size"], files.label(MODEL_FILE))
        _check_tensor_table(files, header)
        aliases = manifest.get("aliases", {})
        _check_aliases(files, header, aliases)
        quant = _quantization(files, manifest, header)
        if model is not None:
            if quant is not None:
                _check_optimizer_params(model, optimizer)  # before the model is converted
                _quant.apply_quantization(model, quant)
                _check_optimizer_params(model, optimizer)
            shapes = {e.name: e.shape for e in header.entries}
            shapes.update({alias: shapes[target] for alias, target in aliases.items() if target in shapes})
            check_model_match(model, shapes, str(directory / MODEL_FILE), strict=strict)
        if optimizer is not None and opt_state is not None:
            check_optimizer_match(optimizer, opt_state, files.label(OPTIMIZER_FILE))
        file_hash = new_hasher() if verify else None
        if file_hash is not None:
            file_hash.update(raw)
        tensors = _safetensors.read_tensors(
            f, header, files.label(MODEL_FILE), file_hash=file_hash, destinations=_destinations(model, header)
        )
    if file_hash is not None:
        in_place = "; the model's tensors were filled in place and hold unverified values" if model else ""
        files.check_digest(MODEL_FILE, file_hash.hexdigest(), in_place)
    state = with_aliases(tensors, aliases, files.label(MODEL_FILE))
    if str(map_location) != "cpu":
        state = {k: v.to(map_location) for k, v in state.items()}
    ckpt = Checkpoint(
        path=directory,
        format_version=manifest["format_version"],
        step=manifest["step"],
        config=config,
        vocab=vocab,
        model_state=state,
        optimizer_state=optional_pt[OPTIMIZER_FILE],
        quantization=quant,
        manifest=manifest,
        extra=manifest.get("extra"),
        scheduler_state=optional_pt[SCHEDULER_FILE],
        scaler_state=optional_pt[SCALER_FILE],
    )
    return ckpt, rng


KNOWN_FILES = {
    MODEL_FILE,
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    SCALER_FILE,
    CONFIG_FILE,
    VOCAB_FILE,
    QUANT_FILE,
    _rng.JSON_FILE,
    _rng.TENSOR_FILE,
}


def _filled_in_place(model: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    """Every tensor was read into the model's own memory and no module customizes loading: then
    load_state_dict would only copy each tensor onto itself (it costs ~1 ms per 100 tensors)."""
    own = model.state_dict(keep_vars=True)
    if own.keys() != state.keys() or any(state[k] is not t for k, t in own.items()):
        return False
    return all(
        type(m)._load_from_state_dict is nn.Module._load_from_state_dict
        and not m._load_state_dict_pre_hooks
        and not m._load_state_dict_post_hooks
        for m in model.modules()
    )


def _restore(name: str, obj: Stateful | None, state: Any, source: Path) -> None:
    if obj is None:
        return
    if state is None:
        raise StateMismatchError(f"{source}: the checkpoint holds no {name} state, but a {name} was passed to restore")
    load_into(obj, state, name, str(source))


def apply(
    ckpt: Checkpoint,
    rng: Mapping[str, Any] | None,
    *,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Stateful | None,
    scaler: Stateful | None,
    strict: bool,
    restore_rng: bool,
) -> None:
    """Restore live objects from a checkpoint that has been fully read and checked."""
    if model is not None:
        if ckpt.format_version == 0:  # format 1 matched and converted the model while reading
            shapes = {k: tuple(v.shape) for k, v in ckpt.model_state.items()}
            check_model_match(model, shapes, str(ckpt.path / "model.pt"), strict=strict)
        if not _filled_in_place(model, ckpt.model_state):
            model.load_state_dict(ckpt.model_state, strict=strict)
    _restore("optimizer", optimizer, ckpt.optimizer_state, ckpt.path / OPTIMIZER_FILE)
    _restore("scheduler", scheduler, ckpt.scheduler_state, ckpt.path / SCHEDULER_FILE)
    _restore("scaler", scaler, ckpt.scaler_state, ckpt.path / SCALER_FILE)
    if restore_rng and rng is not None:
        _rng.restore(rng["tensors"], rng["doc"])


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    map_location: Any = "cpu",
    strict: bool = True,
    verify: bool = True,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    restore_rng: bool = True,
) -> Checkpoint:
    """Load a checkpoint directory, or the newest committed one under a checkpoints root.

    Given ``model``/``optimizer``/``scheduler``/``scaler``, their state is restored in place, and
    with ``restore_rng`` the random generators too. ``verify`` checks every file's size and
    checksum against the manifest before anything is used.
    """
    for attempt in range(_RESOLVE_ATTEMPTS):
        directory = resolve(path)
        if not (directory / _manifest.MANIFEST).exists():
            ckpt = _legacy.read(directory, map_location=map_location)
            rng = None
            break
        try:
            ckpt, rng = read_checkpoint(
                directory, map_location=map_location, verify=verify, model=model, optimizer=optimizer, strict=strict
            )
            break
        except CheckpointNotFoundError:
            # A root's newest checkpoint can be retired by a concurrent writer's retention after we
            # resolved it (it vanishes whole: renamed away first): resolve again.
            if directory == Path(path) or directory.exists() or attempt == _RESOLVE_ATTEMPTS - 1:
                raise
    apply(
        ckpt,
        rng,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        strict=strict,
        restore_rng=restore_rng,
    )
    return ckpt
