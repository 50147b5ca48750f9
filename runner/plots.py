"""Figures of runs with matplotlib, headless: learning curves, test confusion matrices, overlays.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so no
display, GUI backend or global figure state is involved (and nothing leaks between calls).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 90
ROW_HEIGHT_IN = 3.3
ANNOTATE_UP_TO_CLASSES = 15  # beyond this the counts in the cells become unreadable
LABEL_UP_TO_CLASSES = 40
SPLIT_STYLES = (("train", "--"), ("val", "-"))


@dataclass
class RunPlotData:
    run_id: str
    name: str
    curves: Any | None  # DataFrame indexed by epoch, one column per metric; None without epochs
    class_names: list[str]
    confusion: list[list[int]] | None  # rows: true class, columns: predicted class

    @property
    def label(self) -> str:
        return f"{self.name} ({self.run_id[:8]})"


def new_figure(width_in: float, height_in: float) -> Figure:
    figure = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _margins(figure: Figure, rows: int, left_in: float = 0.8) -> None:
    """Fixed margins in inches: the constrained layout engine would double the drawing time of a report."""
    width, height = figure.get_size_inches()
    figure.subplots_adjust(left=left_in / width, right=1 - 0.2 / width, top=1 - 0.35 / height, bottom=0.55 / height,
                           wspace=0.28, hspace=0.75 / (ROW_HEIGHT_IN - 0.9) if rows > 1 else 0.2)


def figure_bytes(figure: Figure, fmt: str = "png") -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt)
    return buffer.getvalue()


def _nothing(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", color="0.4", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _epoch_axes(ax: Any, title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def draw_learning_curves(ax_loss: Any, ax_accuracy: Any, curves: Any | None) -> None:
    """Loss and accuracy per epoch, train (dashed) against validation (solid)."""
    for ax, metric in ((ax_loss, "loss"), (ax_accuracy, "accuracy")):
        columns = [(split, style) for split, style in SPLIT_STYLES if curves is not None and f"{split}_{metric}" in curves]
        if not columns:
            _nothing(ax, "no epochs recorded")
            ax.set_title(metric)
            continue
        for split, style in columns:
            ax.plot(curves.index, curves[f"{split}_{metric}"], style, marker="o", markersize=3, label=split)
        _epoch_axes(ax, metric)
        ax.legend(loc="best", fontsize="small")


def draw_confusion(ax: Any, confusion: Sequence[Sequence[int]] | None, class_names: Sequence[str]) -> None:
    """The test split's confusion matrix: rows are true classes, columns predictions."""
    ax.set_title("test confusion matrix")
    if not confusion:
        _nothing(ax, "no test confusion matrix")
        return
    import numpy as np

    matrix = np.asarray(confusion)
    ax.imshow(matrix, cmap="Blues", vmin=0)
    size = matrix.shape[0]
    if size <= LABEL_UP_TO_CLASSES:
        names = list(class_names) if len(class_names) == size else [str(i) for i in range(size)]
        ax.set_xticks(range(size), names, rotation=90 if size > 10 else 0, fontsize="small")
        ax.set_yticks(range(size), names, fontsize="small")
    if size <= ANNOTATE_UP_TO_CLASSES:
        threshold = matrix.max() / 2
        for (row, column), count in np.ndenumerate(matrix):
            ax.text(column, row, str(count), ha="center", va="center", fontsize="small",
                    color="white" if count > threshold else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")


def runs_figure(runs: Sequence[RunPlotData]) -> Figure:
    """One row per run: loss curves, accuracy curves, test confusion matrix."""
    figure = new_figure(13, ROW_HEIGHT_IN * max(1, len(runs)))
    axes = figure.subplots(max(1, len(runs)), 3, squeeze=False, gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    for row, run in zip(axes, runs):
        draw_learning_curves(row[0], row[1], run.curves)
        draw_confusion(row[2], run.confusion, run.class_names)
        row[0].set_ylabel(run.label, fontsize="medium", fontweight="bold")
    _margins(figure, len(runs))
    return figure


def overlay_figure(runs: Sequence[RunPlotData]) -> Figure:
    """Every run's curves on one pair of axes: a colour per run, train dashed, validation solid."""
    figure = new_figure(13, 4.5)
    ax_loss, ax_accuracy = figure.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, metric in ((ax_loss, "loss"), (ax_accuracy, "accuracy")):
        drawn = False
        for run, color in zip(runs, colors):
            present = [split for split, _ in SPLIT_STYLES if run.curves is not None and f"{split}_{metric}" in run.curves]
            legend_split = "val" if "val" in present else present[0] if present else None  # no val curve when all its values are null
            for split, style in SPLIT_STYLES:
                if split in present:
                    ax.plot(run.curves.index, run.curves[f"{split}_{metric}"], style, color=color, marker="o", markersize=3,
                            label=run.label if split == legend_split else None)
                    drawn = True
        if drawn:
            _epoch_axes(ax, f"{metric} (solid: validation, dashed: train)")
            ax.legend(loc="best", fontsize="small")
        else:
            _nothing(ax, "no epochs recorded")
    _margins(figure, 1, left_in=0.6)
    return figure


# ------------------------------------------------------------------------------------------
# Sweeps: a metric against each swept key


MAX_SWEEP_LINES = 8  # configurations of the other keys drawn in one panel


def _positions(values: Sequence[Any]) -> tuple[list[float], list[str] | None, bool]:
    """Where each value goes on the x axis: the number itself (log scale when positive values span
    a factor of 10 or more), else its place in order of appearance with the value as tick label."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        numbers = [float(v) for v in values]
        positive = [n for n in numbers if n > 0]
        return numbers, None, len(positive) == len(numbers) and max(positive) >= 10 * min(positive)
    labels = list(dict.fromkeys(str(v) for v in values))
    return [float(labels.index(str(v))) for v in values], labels, False


def sweep_figure(groups: Any, keys: Sequence[str], metric: str) -> Figure:
    """One panel per swept key: the mean of ``metric`` (``<metric>_mean`` of a grouped report) against
    the key's values, ± its 95% confidence half-width, one line per configuration of the other keys."""
    figure = new_figure(4.6 * len(keys), ROW_HEIGHT_IN)
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        others = [k for k in keys if k != key]
        lines = groups.groupby([groups[k].astype(str) for k in others], sort=False) if others else [((), groups)]
        for n, (label, part) in enumerate(lines):
            if n == MAX_SWEEP_LINES:
                break
            part = part.sort_values(key, key=lambda s: s.astype(str) if s.dtype == object else s)
            x, ticks, log = _positions(part[key].tolist())
            ci = part[f"{metric}_ci95"].fillna(0).to_numpy(dtype=float)
            name = ", ".join(f"{k}={v}" for k, v in zip(others, label if isinstance(label, tuple) else (label,))) or None
            ax.errorbar(x, part[f"{metric}_mean"].to_numpy(dtype=float), yerr=ci, marker="o", capsize=3, label=name)
            if ticks is not None:
                ax.set_xticks(range(len(ticks)), ticks)
            if log:
                ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{metric} (mean ± 95% CI)")
        ax.grid(alpha=0.3)
        if others:
            ax.legend(fontsize="small")
    _margins(figure, 1)
    return figure
