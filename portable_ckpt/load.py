"""load_checkpoint: find, verify and read a checkpoint, then restore live objects from it.

Every other file is read and checked before the model's tensors. Those are then read straight
into the model's own tensors as their bytes arrive (no second copy), so if model.safetensors fails
its checksum at the end, the model holds unverified values: the error says so, and
``CheckpointManager.restore`` can be asked for an older checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from portable_ckpt import threads as _threads
from portable_ckpt.convert import format0 as _legacy
from portable_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    StateMismatchError,
)
from portable_ckpt.files import (
    CheckpointFiles,
    check_aliases,
    merged_header,
    model_headers,
    read_quantization,
    with_aliases,
)
from portable_ckpt.format import names
from portable_ckpt.format import rng as _rng
from portable_ckpt.format import safetensors as _safetensors
from portable_ckpt.format import states as _states
from portable_ckpt.format.hashing import new_hasher
from portable_ckpt.quant import quantize as _quant
from portable_ckpt.restore import absent_state, apply, placement
from portable_ckpt.root import display, resolve
from portable_ckpt.save import distributed
from portable_ckpt.sharded import is_sharded, read_sharded
from portable_ckpt.state import Stateful, check_model_match, check_optimizer_match, compare_shapes, unwrap
from portable_ckpt.storage import ReadFile, Storage, storage_for
from portable_ckpt.types import Checkpoint

_HASH_CHUNK = 8 << 20
_RESOLVE_ATTEMPTS = 3


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
            or not t.is_cpu
            or t.dtype is not _safetensors.DTYPES[entry.dtype]
            or t.shape != entry.shape
            or not t.is_contiguous()
            or t.is_conj()  # its memory holds the conjugate of what it shows: load_state_dict copies right
            or t.is_neg()
        ):
            return None
        return t

    return target


def _read_threads(f: ReadFile, verify: bool) -> int:
    """Threads for reading a file's tensors: ``threads.io_threads()`` for a local file (one that can be
    mapped: positional reads of it are cheap and independent), one fewer when verifying, which leaves
    a core to the checksum (one stream, hashed in file order behind the reads; measured on 2 busy cores,
    2 readers and the hasher were slower than 1 and the hasher); else 1 (ranged reads of a remote object
    already run concurrently inside the backend)."""
    if f.mmap_path() is None:
        return 1
    threads = _threads.io_threads()
    return max(1, threads - 1) if verify else threads


def prepare_model(path: str | os.PathLike[str] | Storage, model: nn.Module) -> nn.Module:
    """Convert ``model`` to the quantized form the checkpoint at ``path`` describes (no-op if full precision).

    Call it before building the optimizer when resuming a quantized run, so the optimizer holds
    the quantized model's parameters; then ``load_checkpoint(path, model, optimizer)``.
    """
    directory = resolve(path)
    if directory.kind(names.MANIFEST) is None:
        return model  # format 0 has no quantization
    with CheckpointFiles(directory, verify=True) as files:
        manifest = files.manifest
        if manifest.get("quantization") is None:
            return model
        with model_headers(files) as parts:
            quant = read_quantization(files, manifest, merged_header(parts))
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
    directory: Storage,
    *,
    map_location: Any = "cpu",
    verify: bool = True,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    strict: bool = True,
    wanted: frozenset[str] = frozenset(),
    wanted_states: Mapping[str, Any] | None = None,
) -> tuple[Checkpoint, dict[str, Any] | None]:
    """Read and check a format-1 checkpoint directory; returns it with its RNG documents (or None).

    ``wanted``: the ``.pt`` files the caller will restore objects from; their absence is an error
    raised before anything is modified.

    Every other file is read and checked before the model's tensors. Given ``model``, it is
    converted to the checkpoint's quantized form if needed, matched against the stored names and
    shapes, and its CPU tensors are filled in place as the bytes arrive.
    """
    with CheckpointFiles(directory, verify) as files:
        if is_sharded(files.manifest):
            return read_sharded(files, map_location=map_location, model=model, strict=strict)
        return _read(
            files,
            map_location=map_location,
            model=model,
            optimizer=optimizer,
            strict=strict,
            wanted=wanted,
            wanted_states=wanted_states or {},
        )


def _read(
    files: CheckpointFiles,
    *,
    map_location: Any,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    strict: bool,
    wanted: frozenset[str],
    wanted_states: Mapping[str, Any],
) -> tuple[Checkpoint, dict[str, Any] | None]:
    manifest, verify = files.manifest, files.verify
    listed = files.entries
    for name in sorted(wanted - set(listed)):
        raise absent_state(name.removesuffix(".pt"), files.label(name))
    config = files.read_json(names.CONFIG, None) if names.CONFIG in listed else {}
    if not isinstance(config, dict):
        raise CheckpointCorruptedError(
            f"{files.label(names.CONFIG)}: expected a JSON object", file=files.label(names.CONFIG)
        )
    vocab = files.read_json(names.VOCAB, "vocab") if names.VOCAB in listed else None
    rng = None
    _rng.check_listed(listed, manifest.get("rng", []), files.label(names.MANIFEST))
    if names.RNG_JSON in listed:
        doc = files.read_json(names.RNG_JSON, "rng")
        _, rng_tensors = files.read_tensors(names.RNG_TENSORS) if names.RNG_TENSORS in listed else (None, {})
        _rng.check(rng_tensors, doc, manifest.get("rng", []))
        rng = {"doc": doc, "tensors": rng_tensors}
    user_states: dict[str, dict[str, Any]] = {}
    if names.STATES_JSON in listed:
        doc = files.read_json(names.STATES_JSON, "states")
        _, state_tensors = files.read_tensors(names.STATES_TENSORS) if names.STATES_TENSORS in listed else (None, {})
        user_states = _states.decode(doc, state_tensors, files.label(names.STATES_JSON))
    missing_states = sorted(set(wanted_states) - set(user_states))
    if missing_states:
        raise StateMismatchError(
            f"{files.label(names.STATES_JSON)}: no saved state for {missing_states} (saved: {sorted(user_states)}); "
            "pass only the names saved with states=..., or load a checkpoint that has them (nothing was modified)",
            file=files.label(names.STATES_JSON),
        )
    for name, obj in wanted_states.items():
        kind = "generator" if isinstance(obj, torch.Generator) else "stateful"
        if user_states[name]["kind"] != kind:
            raise StateMismatchError(
                f"{files.label(names.STATES_JSON)}: states[{name!r}] was saved as a {user_states[name]['kind']}, "
                f"but a {type(obj).__qualname__} was passed to restore it (nothing was modified)",
                file=files.label(names.STATES_JSON),
            )
    consumed = {
        names.CONFIG,
        names.VOCAB,
        names.OPTIMIZER,
        names.SCHEDULER,
        names.SCALER,
        *files.model_files,
        names.STATES_JSON,
        names.STATES_TENSORS,
    }
    if rng is not None:
        consumed |= {names.RNG_JSON, names.RNG_TENSORS}
    if manifest.get("quantization") is not None:
        consumed.add(manifest["quantization"]["metadata_file"])
    optional_pt = {
        name: files.read_pt(name, map_location) if name in listed else None
        for name in (names.OPTIMIZER, names.SCHEDULER, names.SCALER)
    }
    for name, state in optional_pt.items():
        if state is not None and not isinstance(state, dict):
            raise CheckpointCorruptedError(
                f"{files.label(name)}: expected a state_dict (a dict), found {type(state).__name__}",
                file=files.label(name),
            )
    opt_state = optional_pt[names.OPTIMIZER]
    if opt_state is not None and not {"state", "param_groups"} <= set(opt_state):
        raise CheckpointCorruptedError(
            f"{files.label(names.OPTIMIZER)}: an optimizer state_dict needs 'state' and 'param_groups'",
            file=files.label(names.OPTIMIZER),
        )
    for name in sorted(set(listed) - consumed):
        files.verify_file(name)  # listed but not used by this reader: still verified, otherwise ignored

    missing: list[str] = []
    unexpected: list[str] = []
    with model_headers(files) as parts:
        header = merged_header(parts)
        label = files.label(parts[0][0]) if len(parts) == 1 else files.label(names.MANIFEST)
        aliases = manifest.get("aliases", {})
        check_aliases(set(header.names()), aliases, label)
        quant = read_quantization(files, manifest, header)
        if model is not None:
            shapes = {e.name: e.shape for e in header.entries}
            shapes.update({alias: shapes[target] for alias, target in aliases.items() if target in shapes})
            if quant is not None:
                _check_optimizer_params(model, optimizer)  # before the model is converted
                # the names outside the quantized modules must match before any module is replaced
                inside = tuple(m["name"] + "." for m in quant["modules"])
                own = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(inside)}
                kept = {k: s for k, s in shapes.items() if not k.startswith(inside)}
                compare_shapes(own, kept, label, strict=strict)
                _quant.apply_quantization(model, quant)
                _check_optimizer_params(model, optimizer)
            missing, unexpected = check_model_match(model, shapes, label, strict=strict)
        if optimizer is not None and opt_state is not None:
            check_optimizer_match(optimizer, opt_state, files.label(names.OPTIMIZER))
        tensors: dict[str, torch.Tensor] = {}
        for name, f, part_header, raw in parts:
            file_hash = new_hasher() if verify else None
            if file_hash is not None:
                file_hash.update(raw)
            tensors.update(
                _safetensors.read_tensors(
                    f,
                    part_header,
                    files.label(name),
                    file_hash=file_hash,
                    destinations=_destinations(model, part_header),
                    threads=_read_threads(f, verify),
                )
            )
            if file_hash is not None:
                in_place = (
                    "; the model's tensors were filled in place and hold unverified values" if model is not None else ""
                )
                files.check_digest(name, file_hash.hexdigest(), in_place)
    state = with_aliases(tensors, aliases, label)
    _, move = placement(map_location)
    state = {k: move(v) for k, v in state.items()}
    ckpt = Checkpoint(
        path=display(files.storage),
        format_version=manifest["format_version"],
        step=manifest["step"],
        config=config,
        vocab=vocab,
        model_state=state,
        optimizer_state=optional_pt[names.OPTIMIZER],
        quantization=quant,
        manifest=manifest,
        extra=manifest.get("extra"),
        scheduler_state=optional_pt[names.SCHEDULER],
        scaler_state=optional_pt[names.SCALER],
        states={name: entry["state"] for name, entry in user_states.items()},
        missing_keys=tuple(missing),
        unexpected_keys=tuple(unexpected),
    )
    return ckpt, rng


def load_checkpoint(
    path: str | os.PathLike[str] | Storage,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    map_location: Any = "cpu",
    strict: bool = True,
    verify: bool = True,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    states: Mapping[str, Any] | None = None,
    restore_rng: bool = True,
) -> Checkpoint:
    """Load a checkpoint directory, or the newest committed one under a checkpoints root.

    Given ``model``/``optimizer``/``scheduler``/``scaler``, their state is restored in place, and
    with ``restore_rng`` the random generators too. ``verify`` checks every file's size and
    checksum against the manifest before anything is used.
    """
    if distributed():  # every rank calls this and fills its own shards (format_spec §20)
        from portable_ckpt.dcp import collective

        return collective.load(
            path,
            model,
            optimizer,
            strict=strict,
            verify=verify,
            scheduler=scheduler,
            scaler=scaler,
            states=states,
            restore_rng=restore_rng,
        )
    map_location, _ = placement(map_location)
    model = None if model is None else unwrap(model)
    for attempt in range(_RESOLVE_ATTEMPTS):
        directory = resolve(path)
        if directory.kind(names.MANIFEST) is None:
            ckpt = _legacy.read(directory, map_location=map_location)
            rng = None
            break
        try:
            ckpt, rng = read_checkpoint(
                directory,
                map_location=map_location,
                verify=verify,
                model=model,
                optimizer=optimizer,
                strict=strict,
                wanted=frozenset(
                    n for n, o in zip(names.PT_FILES, (optimizer, scheduler, scaler), strict=True) if o is not None
                ),
                wanted_states=states,
            )
            break
        except CheckpointNotFoundError:
            # A root's newest checkpoint can be retired by a concurrent writer's retention after we
            # resolved it (it vanishes whole: renamed away first): resolve again.
            named = directory.location == storage_for(path).location
            if named or directory.kind() is not None or attempt == _RESOLVE_ATTEMPTS - 1:
                raise
    apply(
        ckpt,
        rng,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        states=states,
        strict=strict,
        restore_rng=restore_rng,
    )
    return ckpt
