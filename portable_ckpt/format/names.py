"""Every name the format gives to a file or directory, in one table (format_spec/README.md §3)."""

from __future__ import annotations

import re

MANIFEST = "manifest.json"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
SCALER = "scaler.pt"
CONFIG = "config.json"
VOCAB = "vocab.json"
RNG_TENSORS = "rng.safetensors"
RNG_JSON = "rng.json"
QUANTIZATION = "quantization_metadata.json"
STATES_JSON = "states.json"
STATES_TENSORS = "states.safetensors"
MODEL_PART = re.compile(r"model-([0-9]{5,})-of-([0-9]{5,})\.safetensors")  # format_version 3 (§21); fullmatch

# the files of format 1 this library writes and reads, by role
FILES: dict[str, str] = {
    "manifest": MANIFEST,
    "model": MODEL,
    "optimizer": OPTIMIZER,
    "scheduler": SCHEDULER,
    "scaler": SCALER,
    "config": CONFIG,
    "vocab": VOCAB,
    "rng_tensors": RNG_TENSORS,
    "rng_json": RNG_JSON,
    "quantization": QUANTIZATION,
    "states_json": STATES_JSON,
    "states_tensors": STATES_TENSORS,
}
KNOWN_FILES = frozenset(FILES.values()) - {MANIFEST}
PT_FILES = (OPTIMIZER, SCHEDULER, SCALER)  # optional torch.save states, in this order

# the checkpoints root
LATEST = "latest"
LATEST_MAX_BYTES = 4096
LOCK = ".lock"
TMP_PREFIX = ".tmp-"  # a save in progress (or crashed)
TRASH_PREFIX = ".trash-"  # a checkpoint being deleted
REPLACED_PREFIX = ".replaced-"  # a complete checkpoint moved aside by an overwrite, until the new one is in place
PENDING_PREFIX = ".pending-"  # manifest-last commits: marks a step directory a live writer is still filling
STEP_DIR = re.compile(r"step-([0-9]{8,})")  # matched whole (fullmatch): "$" would accept a trailing newline


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    """The step a directory name denotes, or None; only the canonical spelling (``step_name``) counts."""
    m = STEP_DIR.fullmatch(name)
    if m is None:
        return None
    step = int(m.group(1))
    return step if step_name(step) == name else None
