"""Text for people: ``inspect`` and ``validate`` results as the ``portable-ckpt`` command prints them.

Every name read from a checkpoint goes through ``escape``, so a hostile file name cannot drive the terminal.

>>> from portable_ckpt import inspect_checkpoint, validate_checkpoint
>>> print(render_info(inspect_checkpoint("checkpoints")), end="")  # doctest: +SKIP
>>> print(render_validation([validate_checkpoint("checkpoints")]), end="")  # doctest: +SKIP
ok       checkpoints
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from portable_ckpt.types import CheckpointInfo, ValidationReport

__all__ = ["escape", "human_size", "render_info", "render_validation"]

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
    """The text of ``portable-ckpt inspect``: one field a line, then every file, tensor and tied name."""
    lines = [
        f"checkpoint      {escape(str(info.path))}",
        f"format_version  {info.format_version}",
        f"step            {info.step}",
    ]
    if info.producer is not None:
        p = info.producer
        lines.append(f"created_at      {info.created_at}")
        lines.append(f"producer        {p['name']} {p['version']}, torch {p.get('torch', '?')}")
    lines.append("files")
    lines += [f"  {escape(f.name):32} {human_size(f.size):>12}" for f in info.files]
    lines.append(f"tensors ({len(info.tensors)})")
    lines += [f"  {escape(t.name):40} {t.dtype:6} {list(t.shape)}" for t in info.tensors]
    lines += [f"  {escape(alias):40} -> {escape(target)} (tied)" for alias, target in info.aliases.items()]
    lines += _quantization_lines(info.quantization)
    return "".join(line + "\n" for line in lines)


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
