"""What an importer found in a foreign checkpoint, filled in as it reads, and each entry's fate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from portable_ckpt import save as _save
from portable_ckpt.errors import CheckpointCorruptedError, CheckpointInputError
from portable_ckpt.format import jsonio as _jsonio
from portable_ckpt.format import pt as _pt


@dataclass(frozen=True, slots=True)
class ImportEntry:
    """One entry of the source: ``entry`` names it (a file or a key), ``detail`` says where it went or why not."""

    entry: str
    detail: str


@dataclass(slots=True)
class Parts:
    """What a reader found, filled in as it goes."""

    label: str
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    vocab: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    step: int | None = None
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    carried: list[ImportEntry] = field(default_factory=list)
    skipped: list[ImportEntry] = field(default_factory=list)

    def carry(self, entry: str, detail: str) -> None:
        self.carried.append(ImportEntry(entry, detail))

    def skip(self, entry: str, reason: str) -> None:
        self.skipped.append(ImportEntry(entry, reason))

    def set_model(self, state: Any, entry: str, strip: str = "") -> None:
        if not isinstance(state, dict):
            raise CheckpointCorruptedError(
                f"{self.label}: {entry} is a {type(state).__name__}, expected a state_dict (str -> tensor)",
                file=self.label,
            )
        for key, value in state.items():
            if isinstance(key, str) and isinstance(value, torch.Tensor):
                self.model[key.removeprefix(strip) if strip else key] = value
            else:
                self.skip(f"{entry}[{key!r}]", f"a {type(value).__name__}, not a tensor: a model state holds tensors")
        stripped = strip and any(isinstance(k, str) and k.startswith(strip) for k in state)
        note = f", the prefix {strip!r} of torch.compile removed" if stripped else ""
        self.carry(entry, f"model state ({len(self.model)} tensors{note})")

    def set_state(self, slot: str, state: Any, entry: str) -> None:
        """optimizer, scheduler or scaler: a dict the format's .pt encoding can hold, else listed."""
        if not isinstance(state, dict):
            self.skip(entry, f"a {type(state).__name__}, expected a {slot} state_dict (a dict)")
            return
        if slot == "optimizer" and not {"state", "param_groups"} <= set(state):
            self.skip(entry, "an optimizer state_dict needs 'state' and 'param_groups' (what saves must load)")
            return
        try:
            _pt.check_state(state, slot)
        except CheckpointInputError as e:
            self.skip(entry, str(e))
            return
        setattr(self, slot, state)
        self.carry(entry, f"the {slot} state ({slot}.pt)")

    def set_step(self, value: Any, entry: str) -> None:
        try:
            self.step = _save.as_step(value)
            if self.step >= _jsonio.INT_END:
                raise CheckpointInputError(entry)
        except CheckpointInputError:
            raise CheckpointCorruptedError(
                f"{self.label}: {entry} is {str(value)[:40]}, expected the step as an integer in [0, 2**64)",
                file=self.label,
            ) from None
        self.carry(entry, f"step {self.step}")

    def set_json(self, target: dict[str, Any], key: str, value: Any, entry: str, where: str) -> None:
        """``target[key] = value`` when it is JSON (0-d tensors become numbers), else listed with the reason."""
        try:
            target[key] = _jsonio.to_json_value(plain(value), entry)
        except CheckpointInputError as e:
            self.skip(entry, f"not JSON, so not in {where}: {e}")
            return
        self.carry(entry, f"{where}[{key!r}]")


def plain(value: Any, depth: int = 0) -> Any:
    """``value`` with each 0-d real tensor replaced by the Python number equal to it (exact). Containers
    deeper than JSON's limit are left as they are (``to_json_value`` then refuses them by name)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        return value.item()
    if depth > _jsonio.MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {k: plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    return value


__all__ = ["ImportEntry", "Parts", "plain"]
