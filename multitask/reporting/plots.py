"""Report charts as PNG bytes, drawn headless.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot: such figures are never
registered in pyplot's global figure list, so they are freed with their last reference (no
leaked figures across a long training run, no "More than 20 figures" warning) and no GUI
backend is ever selected, whatever ``MPLBACKEND`` says. Each function returns None when there
is nothing worth drawing, so callers can simply leave the chart out.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import warnings
from typing import Any, Callable, Sequence

from matplotlib import colormaps, font_manager, rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from multitask.reporting.model import RunReport, TaskReport

log = logging.getLogger(__name__)
FONT_LOG = logging.getLogger("matplotlib.font_manager")
DPI = 100
# Fonts with CJK glyphs, tried (where installed) for characters the default font lacks, so that Chinese label and
# task names do not draw as empty boxes. Without any of them the charts keep boxes and one log line says why.
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
             "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "Arial Unicode MS")
CJK_FILE_HINTS = ("cjk", "wqy", "sourcehan", "simhei", "msyh", "pingfang", "stheiti", "arialuni")
# Above this many labels a confusion matrix has cells under ~4 px at a readable page width,
# so it is skipped; TREC-fine (50 labels) still fits.
MAX_CONFUSION_LABELS = 60
# Confusion cells get their counts printed only while the digits fit inside them.
MAX_ANNOTATED_LABELS = 15
MAX_TICK_CHARS = 18
SPLIT_STYLES = ("-", "--", ":", "-.")
# The legend under a chart: at most this many columns, as many as fit the axes' width (a row holds about
# LEGEND_ROW_CHARS characters at its font size; each entry's line sample takes about LEGEND_HANDLE_CHARS).
LEGEND_COLUMNS = 3
LEGEND_ROW_CHARS = 120
LEGEND_HANDLE_CHARS = 8


@functools.cache
def font_family() -> tuple[str, ...]:
    """The default sans-serif font, then every installed CJK font, for matplotlib's per-glyph fallback."""
    installed = {entry.name for entry in font_manager.fontManager.ttflist}
    if not installed.intersection(CJK_FONTS):  # matplotlib's font cache predates a font installed since: look again
        for path in font_manager.findSystemFonts():
            if any(hint in path.lower() for hint in CJK_FILE_HINTS):
                font_manager.fontManager.addfont(path)
        installed = {entry.name for entry in font_manager.fontManager.ttflist}
    return ("DejaVu Sans", *(name for name in CJK_FONTS if name in installed))


def with_fonts(draw: Callable[..., bytes | None]) -> Callable[..., bytes | None]:
    """Draw a chart with :func:`font_family` (set while its texts are made: each text keeps the fonts it was made
    with), leaving the caller's matplotlib settings alone."""
    @functools.wraps(draw)
    def drawn(*args: Any, **kwargs: Any) -> bytes | None:
        level = FONT_LOG.level
        FONT_LOG.setLevel(logging.ERROR)  # a CJK font of one weight only is no news ("Failed to find font weight")
        try:
            with rc_context({"font.family": list(font_family())}):
                return draw(*args, **kwargs)
        finally:
            FONT_LOG.setLevel(level)

    return drawn


@with_fonts
def loss_plot(report: RunReport) -> bytes | None:
    """Training loss per task over steps, lightly smoothed, one colour per task."""
    tasks = [t for t in report.tasks.values() if t.loss_history]
    if not tasks:
        return None
    colors = task_colors(report)
    fig, ax = _figure(9, 4.5)
    for task in tasks:
        steps, losses = zip(*sorted(task.loss_history))
        smoothed = smooth(losses)
        if smoothed != list(losses):
            ax.plot(steps, losses, color=colors[task.name], alpha=0.2, linewidth=0.8)
        ax.plot(steps, smoothed, color=colors[task.name], linewidth=1.6, label=task.name)
    all_losses = [loss for t in tasks for _, loss in t.loss_history]
    if min(all_losses) > 0 and max(all_losses) / min(all_losses) > 20:
        ax.set_yscale("log")
        plain_log_ticks(ax)
    _finish(ax, "Training loss", "step", "loss (smoothed)")
    return to_png(fig)


@with_fonts
def metric_plot(report: RunReport) -> bytes | None:
    """Each task's main metric over steps: colour per task, line style per split."""
    tasks = [t for t in report.tasks.values() if t.metric_history]
    if not tasks:
        return None
    colors = task_colors(report)
    styles = {s: SPLIT_STYLES[i % len(SPLIT_STYLES)] for i, s in enumerate(_history_splits(tasks))}
    fig, ax = _figure(9, 4.5)
    for task in tasks:
        for split, style in styles.items():
            points = sorted((step, value) for step, s, value in task.metric_history if s == split)
            if points:
                steps, values = zip(*points)
                ax.plot(steps, [100 * v for v in values], color=colors[task.name], linestyle=style,
                        marker="o" if len(points) <= 30 else None, markersize=3,
                        label=f"{task.name} ({split}, {task.main_metric})")
    best = report.meta.get("best_step")
    if isinstance(best, (int, float)):
        ax.axvline(best, color="0.5", linestyle=":", linewidth=1, label=f"best step ({best})")
    _finish(ax, "Main metric over training", "step", "score (%)")
    return to_png(fig)


@with_fonts
def confusion_plot(task: TaskReport, split: str) -> bytes | None:
    """Confusion-matrix heatmap for one split, coloured by row share and annotated with counts.

    Colouring by the share of each true label keeps rare classes visible next to frequent ones.
    None when the split has no matrix or more than ``MAX_CONFUSION_LABELS`` labels.
    """
    labels, matrix = confusion_data(task, split)
    n = len(labels)
    if not n or n > MAX_CONFUSION_LABELS:
        return None
    shares = [[c / (sum(row) or 1) for c in row] for row in matrix]
    cell = 0.5 if n <= MAX_ANNOTATED_LABELS else 0.22
    side = max(4.0, 1.5 + cell * n)
    fig, ax = _figure(side + 1.2, side)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true label")
    ticks = [_short(label) for label in labels]
    font = 9 if n <= MAX_ANNOTATED_LABELS else 7
    ax.set_xticks(range(n), ticks, rotation=45 if n <= 6 else 90, ha="right" if n <= 6 else "center",
                  fontsize=font)
    ax.set_yticks(range(n), ticks, fontsize=font)
    if n <= MAX_ANNOTATED_LABELS:
        _annotate_counts(ax, matrix, shares)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{task.name}: confusion matrix ({split})")
    return to_png(fig)


@with_fonts
def entity_f1_plot(task: TaskReport, split: str) -> bytes | None:
    """Horizontal bars of F1 per entity type (best on top), with support in the tick labels."""
    per_type = task.splits[split].details.get("per_type") if split in task.splits else None
    if not isinstance(per_type, dict) or not per_type:
        return None
    rows = sorted(per_type.items(), key=lambda item: item[1].get("f1", 0.0))
    fig, ax = _figure(7, 1.2 + 0.35 * len(rows))
    f1s = [100 * stats.get("f1", 0.0) for _, stats in rows]
    ax.barh(range(len(rows)), f1s, color=colormaps["tab10"](0))
    ticks = [f"{_short(name)} (n={stats.get('support', '?')})" for name, stats in rows]
    ax.set_yticks(range(len(rows)), ticks)
    for y, value in enumerate(f1s):
        inside = value > 85  # no room right of a long bar: print the value inside it instead
        ax.text(value - 1 if inside else value + 1, y, f"{value:.2f}", va="center", fontsize=8,
                ha="right" if inside else "left", color="white" if inside else "black")
    ax.set_xlim(0, 100)
    ax.set_xlabel("F1 (%)")
    ax.set_title(f"{task.name}: F1 per entity type ({split})")
    ax.grid(axis="x", alpha=0.3)
    return to_png(fig)


def confusion_data(task: TaskReport, split: str) -> tuple[list[str], list[list[int]]]:
    """(labels, matrix) of a split, or empty lists when absent or not square in the labels."""
    result = task.splits.get(split)
    confusion = result.details.get("confusion_matrix") if result else None
    if not isinstance(confusion, dict):
        return [], []
    labels = [str(label) for label in confusion.get("labels", [])]
    matrix = confusion.get("matrix", [])
    if len(matrix) != len(labels) or any(len(row) != len(labels) for row in matrix):
        return [], []
    return labels, matrix


def task_colors(report: RunReport) -> dict[str, Any]:
    """One fixed colour per task, so a task looks the same in the loss and the metric chart."""
    palette = colormaps["tab10" if len(report.tasks) <= 10 else "tab20"]
    return {name: palette(i % palette.N) for i, name in enumerate(report.tasks)}


def smooth(values: Sequence[float]) -> list[float]:
    """Exponential moving average spanning ~4% of the series; short series are left untouched.

    Per-step losses are noisy enough to hide the trend, but heavy smoothing would hide spikes.
    """
    span = len(values) / 25
    if span <= 1:
        return list(values)
    alpha = 2 / (span + 1)
    out, current = [], values[0]
    for value in values:
        current = alpha * value + (1 - alpha) * current
        out.append(current)
    return out


def plain_log_ticks(ax: Axes) -> None:
    """Label a log y axis '0.2, 0.5, 1, 2' instead of matplotlib's '2 x 10^-1' (people read losses as decimals):
    every power of ten, and the 2s and 5s between them."""

    def major(value: float, _position: int) -> str:
        return f"{value:g}"

    def minor(value: float, _position: int) -> str:
        if value <= 0:
            return ""
        mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
        return f"{value:g}" if any(abs(mantissa - m) < 1e-6 for m in (2, 5)) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(major))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _history_splits(tasks: list[TaskReport]) -> list[str]:
    return list(dict.fromkeys(split for task in tasks for _, split, _ in task.metric_history))


def _annotate_counts(ax: Axes, matrix: list[list[int]], shares: list[list[float]]) -> None:
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if shares[i][j] > 0.5 else "black")


def _short(label: str) -> str:
    return label if len(label) <= MAX_TICK_CHARS else label[: MAX_TICK_CHARS - 1] + "…"


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), dpi=DPI)
    return fig, fig.add_subplot()


def _finish(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    """Shared styling for line charts. The legend sits under the axes, so it never hides a curve and the image is
    no wider than the chart: a page narrower than the image scales it down less, and its words stay readable."""
    ax.set_title(title, fontsize=13)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.tick_params(labelsize=10)
    ax.tick_params(which="minor", labelsize=9)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    widest = max((len(label) for label in labels), default=0) + LEGEND_HANDLE_CHARS
    columns = max(1, min(LEGEND_COLUMNS, len(labels), LEGEND_ROW_CHARS // widest))
    # matplotlib fills a legend column by column; reorder so it reads line by line, in plotting order.
    order = [i for column in range(columns) for i in range(column, len(labels), columns)]
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper center",
              bbox_to_anchor=(0.5, -0.16), ncol=columns, fontsize=10, frameon=False)


def to_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(buffer, format="png", bbox_inches="tight")
    missing = [w for w in caught if "missing from font" in str(w.message)]
    for other in (w for w in caught if w not in missing):
        warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    if missing:
        _no_font_for_glyphs(str(missing[0].message))
    return buffer.getvalue()


@functools.cache
def _no_font_for_glyphs(example: str) -> None:
    """Once per process: matplotlib would warn once per character and chart."""
    log.warning("charts: no installed font draws some characters of the label or task names (%s), so they show as "
                "boxes in the charts (the report's tables show them); install a CJK font such as Debian's "
                "fonts-noto-cjk", example)
