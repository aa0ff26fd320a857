"""The demo's loss curves as a PNG, through the optional plotting extra (matplotlib, Agg backend).

Without matplotlib nothing is drawn and ``draw_losses`` says so by returning False; the demo prints
``INSTALL_HINT`` and carries on. One panel per chapter: the uninterrupted run, the interrupted run up
to its SIGKILL, and the resumed process, which (when resume is exact) lies on the first curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "pip install 'portable-ckpt[plot]'"
DPI = 100
WIDTH_PX, PANEL_HEIGHT_PX = 800, 400  # the PNG is WIDTH_PX wide and PANEL_HEIGHT_PX tall per chapter


@dataclass(frozen=True, slots=True)
class Curves:
    """One chapter's losses: ``interrupted`` is the interrupted run's log in order, the killed process's
    steps then the resumed process's (which start again after the checkpoint ``resume_from``)."""

    title: str
    uninterrupted: list[tuple[int, float]]
    interrupted: list[tuple[int, float]]
    kill_at: int
    resume_from: int


def split_processes(log: list[tuple[int, float]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(the killed process's losses, the resumed process's): the log restarts where a step does not increase."""
    for i in range(1, len(log)):
        if log[i][0] <= log[i - 1][0]:
            return log[:i], log[i:]
    return log, []


def draw_losses(chapters: Sequence[Curves], path: Path) -> bool:
    """Draw every chapter's curves into the PNG ``path``; False (nothing drawn) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    figure = Figure(figsize=(WIDTH_PX / DPI, PANEL_HEIGHT_PX * len(chapters) / DPI), dpi=DPI)
    canvas = FigureCanvasAgg(figure)  # no pyplot: no global state, no display needed
    axes = figure.subplots(len(chapters), 1, squeeze=False)[:, 0]
    for ax, chapter in zip(axes, chapters, strict=True):
        killed, resumed = split_processes(chapter.interrupted)
        ax.plot(*_columns(chapter.uninterrupted), color="tab:blue", linewidth=3, alpha=0.5, label="uninterrupted")
        ax.plot(*_columns(killed), color="tab:orange", linestyle="--", label="interrupted, until SIGKILL")
        ax.plot(
            *_columns(resumed),
            color="tab:green",
            linestyle=":",
            marker=".",
            label=f"resumed in a new process from the checkpoint of step {chapter.resume_from}",
        )
        ax.axvline(
            chapter.kill_at, color="tab:red", linewidth=1, linestyle="--", label=f"SIGKILL after step {chapter.kill_at}"
        )
        ax.set_title(chapter.title)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    canvas.print_png(str(path))
    return True


def _columns(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [s for s, _ in points], [v for _, v in points]
