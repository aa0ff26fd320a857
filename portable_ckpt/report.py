"""Text for people: ``inspect``, ``validate``, ``list`` and ``diff`` results as the ``portable-ckpt``
command prints them, and ``ProgressLine``, the progress line it draws on a terminal.

Every name read from a checkpoint goes through ``escape``, so a hostile file name cannot drive the terminal.

>>> from portable_ckpt import inspect_checkpoint, validate_checkpoint
>>> print(render_info(inspect_checkpoint("checkpoints")), end="")  # doctest: +SKIP
>>> print(render_validation([validate_checkpoint("checkpoints")]), end="")  # doctest: +SKIP
ok       checkpoints
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from portable_ckpt.types import (
    CheckpointDiff,
    CheckpointEntry,
    CheckpointInfo,
    CheckpointListing,
    CommittedStep,
    TensorDiff,
    TensorInfo,
    ValidationReport,
    ValueChange,
)

__all__ = [
    "ProgressLine",
    "escape",
    "human_size",
    "render_diff",
    "render_info",
    "render_listing",
    "render_validation",
]

_UNITS = ("B", "KiB", "MiB", "GiB")


def escape(text: str) -> str:
    """``text`` with control and other non-printable characters shown as Python escapes (``\\x1b``, ``\\n``)."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


def human_size(n: int) -> str:
    """A byte count for people: ``"512 B"``, ``"8.2 KiB"``, ``"1.5 GiB"`` (binary units, GiB at most)."""
    size = float(n)
    for unit in _UNITS:
        if size < 1024 or unit == _UNITS[-1]:
            break
        size /= 1024
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"


def render_info(info: CheckpointInfo) -> str:
    """The text of ``portable-ckpt inspect``: one field a line, then every file, tensor and tied name.
    Given a root, its committed checkpoints come first, the newest (the one described) marked latest."""
    lines = _root_lines(str(info.path).rstrip("/").rsplit("/", 1)[0], info.checkpoints)
    lines += [
        f"checkpoint      {escape(str(info.path))}",
        f"format_version  {info.format_version}",
        f"step            {info.step}",
    ]
    if info.producer is not None:
        p = info.producer
        lines.append(f"created_at      {info.created_at}")
        lines.append(f"producer        {p['name']} {p['version']}, torch {p.get('torch', '?')}")
    if info.sharding is not None:
        sh = info.sharding
        mesh = f", mesh {sh['mesh']['shape']}" if sh.get("mesh") else ""
        lines.append(
            f"sharded         saved by {sh['world_size']} rank(s){mesh}: {sh['shard_files']} shard files, "
            f"{sh['chunks']} chunks; loads at any world size"
        )
    lines.append("files")
    lines += [f"  {escape(f.name):32} {human_size(f.size):>12}" for f in info.files]
    lines.append(f"tensors ({len(info.tensors)})")
    lines += [f"  {escape(t.name):40} {t.dtype:6} {list(t.shape)}" for t in info.tensors]
    lines += [f"  {escape(alias):40} -> {escape(target)} (tied)" for alias, target in info.aliases.items()]
    lines += _quantization_lines(info.quantization)
    return "".join(line + "\n" for line in lines)


def _root_lines(root: str, checkpoints: tuple[CommittedStep, ...] | None) -> list[str]:
    if checkpoints is None:
        return []
    count = f"{len(checkpoints)} committed checkpoint{'s' if len(checkpoints) != 1 else ''}"
    lines = [f"root            {escape(root)}: {count}"]
    for c in checkpoints:
        lines.append(f"  {c.name:16} step {c.step}{'  latest: described below' if c.latest else ''}")
    return lines


def _quantization_lines(q: dict[str, Any] | None) -> list[str]:
    if q is None:
        return ["quantization    none (full precision)"]
    ratio = q["quantized_bytes"] / q["float32_bytes"] if q.get("float32_bytes") else float("nan")
    symmetry = "symmetric" if q.get("symmetric") else "asymmetric"
    groups = "" if not q.get("group_size") else f" {q['group_size']}"
    return [
        f"quantization    {q['mode']}, int{q['bits']}, {symmetry}, {q.get('granularity')}{groups}",
        f"                quantized layers {human_size(q['quantized_bytes'])} vs "
        f"{human_size(q['float32_bytes'])} in fp32 ({ratio:.1%})",
    ]


def render_validation(reports: Iterable[ValidationReport]) -> str:
    """The text of ``portable-ckpt validate``: ``ok       PATH`` for a valid checkpoint, else one
    ``INVALID  PATH: FILE: message [ErrorClass]`` line per problem."""
    lines = []
    for report in reports:
        path = escape(str(report.path))
        if report.valid:
            lines.append(f"ok       {path}")
        lines += [f"INVALID  {path}: {escape(p.file)}: {escape(p.message)} [{p.error}]" for p in report.problems]
    return "".join(line + "\n" for line in lines)


def _quantized(q: dict[str, Any] | None) -> str:
    return "no" if q is None else f"{q.get('mode')} int{q.get('bits')}"


def _entry_lines(c: CheckpointEntry) -> list[str]:
    check = ("valid" if c.verified else "manifest ok") if c.valid else "INVALID"
    size = "?" if c.size is None else human_size(c.size)
    created, quantized = escape(c.created_at or "?"), escape(_quantized(c.quantization))
    row = f"  {c.step:>8}  {created:27}  {size:>10}  {quantized:10}  {check:11}"
    lines = [(row + ("  latest" if c.latest else "")).rstrip()]
    lines += [f"      {escape(p.file)}: {escape(p.message)} [{p.error}]" for p in c.problems]
    return lines


def render_listing(listing: CheckpointListing) -> str:
    """The text of ``portable-ckpt list``: one line per checkpoint (its problems below it), then what
    in the root is not a checkpoint."""
    n = len(listing.checkpoints)
    lines = [f"root {escape(str(listing.root))}: {n} committed checkpoint{'s' if n != 1 else ''}"]
    if n:
        lines.append(f"  {'STEP':>8}  {'CREATED':27}  {'SIZE':>10}  {'QUANTIZED':10}  CHECK")
    for c in listing.checkpoints:
        lines += _entry_lines(c)
    if listing.leftovers:
        lines.append("not checkpoints (uncommitted leftovers):")
        lines += [f"  {escape(x.name):40} {x.reason}" for x in listing.leftovers]
    return "".join(line + "\n" for line in lines)


def _json_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _layout(t: TensorInfo) -> str:
    return f"{t.dtype} {list(t.shape)}"


def _tensor_line(t: TensorDiff, width: int) -> str:
    name = f"{escape(t.name):{width}}"
    a, b = "-" if t.a is None else _layout(t.a), "-" if t.b is None else _layout(t.b)
    if t.change == "added":
        return f"  added    {name}  {b}"
    if t.change == "removed":
        return f"  removed  {name}  {a}"
    if t.differing is None or t.a is None:  # not compared value by value: the layout changed
        return f"  changed  {name}  {a} -> {b}"
    worst = "inf (a NaN or an infinity differs)" if t.max_abs_diff == math.inf else f"{t.max_abs_diff:.6g}"
    return (
        f"  changed  {name}  {a}: {t.differing} of {math.prod(t.a.shape)} elements differ, max abs difference {worst}"
    )


def _value_line(v: ValueChange) -> str:
    a = "(absent)" if v.change == "added" else _json_text(v.a)
    b = "(absent)" if v.change == "removed" else _json_text(v.b)
    return f"{escape(v.path)}: {escape(a)} -> {escape(b)}"


def render_diff(diff: CheckpointDiff) -> str:
    """The text of ``portable-ckpt diff``: tensor changes (equal ones counted), JSON differences as
    ``config['optim']['lr']: 0.1 -> 0.2``, other files that differ, and a last line with the verdict."""
    lines = [f"a  {escape(str(diff.a))} (step {diff.a_step})", f"b  {escape(str(diff.b))} (step {diff.b_step})"]
    counts = {
        kind: sum(1 for t in diff.tensors if t.change == kind) for kind in ("equal", "changed", "added", "removed")
    }
    lines.append("tensors: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    changes = [t for t in diff.tensors if t.change != "equal"]
    width = min(40, max((len(escape(t.name)) for t in changes), default=0))
    lines += [_tensor_line(t, width) for t in changes]
    lines += [_value_line(v) for v in diff.values]
    lines += [f"file {escape(f.name)}: {f.change}" for f in diff.files]
    lines.append("identical" if diff.identical else "different")
    return "".join(line + "\n" for line in lines)


class ProgressLine:
    """A progress callback that draws one updating line (``\\r``) on a terminal and clears it at the end.

    It draws nothing when ``stream`` is not a terminal, nor during the first ``delay`` seconds (quick work
    shows no flicker), and redraws at most every ``interval`` seconds. Use it as a context manager, or
    call ``close()``, which clears the line.

    >>> with ProgressLine(sys.stderr, prefix="validate") as progress:  # doctest: +SKIP
    ...     validate_checkpoint("checkpoints", progress=progress)
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        prefix: str = "",
        delay: float = 0.5,
        interval: float = 0.1,
        width: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        isatty = getattr(stream, "isatty", None)
        self.active = bool(isatty is not None and isatty())
        self.stream, self.prefix, self.delay, self.interval, self.clock = stream, prefix, delay, interval, clock
        self.width = width if width is not None else shutil.get_terminal_size((80, 24)).columns
        self.started = clock()
        self.drawn_at: float | None = None
        self.shown = 0  # characters on the line now

    def __call__(self, done: int, total: int, label: str) -> None:
        if not self.active:
            return
        now = self.clock()
        if now - self.started < self.delay or (self.drawn_at is not None and now - self.drawn_at < self.interval):
            return
        text = " ".join(part for part in (self.prefix, f"{done}/{total}", escape(label)) if part)
        text = text[: max(1, self.width - 1)]  # never wrap: \r returns to the start of this line only
        self.stream.write("\r" + text + " " * max(0, self.shown - len(text)))
        self.stream.flush()
        self.shown, self.drawn_at = len(text), now

    def close(self) -> None:
        """Clear the line, if one was drawn."""
        if self.shown:
            self.stream.write("\r" + " " * self.shown + "\r")
            self.stream.flush()
            self.shown = 0

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
