"""Figures for reports: pure functions, data in, a matplotlib ``Figure`` out (nothing shown or written).

Figures are built on :class:`matplotlib.figure.Figure` directly, never through pyplot, and rendered
by the Agg canvas in :func:`to_png`: no global backend is switched and no figure registry grows, so
this is safe in any process (a training run, a notebook with its own backend). matplotlib is
imported on first use only. Accuracies are fractions in [0, 1] and drawn in percent.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_LINES = 20  # a per-task figure of a longer stream shows the mean and SHOWN_TASKS tasks
SHOWN_TASKS = 5
ANNOTATE_MAX = 10  # heat maps of at most this many tasks print their values in the cells
CMAP = "viridis"

Stat = Mapping[str, Any]  # {"mean", "std", "ci95", "n"}: one figure over seeds
BAR_METRICS = (("acc", "ACC (%)", 100.0), ("bwt", "BWT (pt)", 100.0), ("train_seconds", "training time (s)", 1.0))


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def to_png(fig: Figure, dpi: int = 80) -> bytes:
    """The figure as PNG bytes, rendered by Agg (without matplotlib's ``Software`` stamp)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def shown_tasks(num_tasks: int, max_lines: int = MAX_LINES, shown: int = SHOWN_TASKS) -> list[int]:
    """Every task of a short stream; of a longer one, ``shown`` tasks evenly spread, first and last included."""
    if num_tasks <= max_lines:
        return list(range(num_tasks))
    return sorted({int(round(x)) for x in np.linspace(0, num_tasks - 1, shown)})


def _task_ticks(ax: Axes, num_tasks: int, axis: str = "x") -> None:
    from matplotlib.ticker import MaxNLocator

    locator = MaxNLocator(nbins=min(num_tasks, 10), integer=True)
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(locator)


def _heat_map(fig: Figure, ax: Axes, values: np.ndarray, vmax: float, label: str, fmt: str) -> None:
    image = ax.imshow(values, vmin=0, vmax=vmax, cmap=CMAP, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label, shrink=0.85)
    n = len(values)
    if n <= ANNOTATE_MAX:
        for i in range(n):
            for j in range(values.shape[1]):
                light = values[i, j] < 0.6 * vmax
                ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=7, color="white" if light else "black")
    _task_ticks(ax, n, "x")
    _task_ticks(ax, n, "y")


def _task_colours(indices: Sequence[int], num_tasks: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps[CMAP]
    return [cmap(0.8 * i / max(num_tasks - 1, 1)) for i in indices]


def draw_acc_matrix(fig: Figure, ax: Axes, acc_matrix: Sequence[Sequence[float]]) -> None:
    """Heat map of ``R[i][j]``: row i after training task i, column j the task evaluated."""
    _heat_map(fig, ax, 100 * np.asarray(acc_matrix, dtype=float), 100.0, "accuracy (%)", ".0f")
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    ax.set_title("accuracy matrix")


def draw_over_stream(ax: Axes, acc_matrix: Sequence[Sequence[float]], task_names: Sequence[str] | None = None) -> None:
    """Each task's accuracy after every training step of the stream: solid once trained, dotted before
    (zero-shot); a long stream shows a few tasks and the mean over the tasks trained so far."""
    r = 100 * np.asarray(acc_matrix, dtype=float)
    n = len(r)
    x = np.arange(n)
    tasks = shown_tasks(n)
    for j, colour in zip(tasks, _task_colours(tasks, n)):
        name = task_names[j] if task_names is not None and len(tasks) <= 8 else f"task {j}"
        ax.plot(x[j:], r[j:, j], color=colour, lw=1.4, marker="o" if n <= 12 else None, ms=3, label=name)
        if j > 0:
            ax.plot(x[: j + 1], r[: j + 1, j], color=colour, lw=0.8, ls=":", alpha=0.7)
    mean = [r[i, : i + 1].mean() for i in range(n)]
    ax.plot(x, mean, color="black", lw=2.2, ls="--", label="mean of trained tasks")
    ax.set_xlabel("after training task")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 102)
    _task_ticks(ax, n)
    title = "accuracy of each task over the stream" if len(tasks) == n else f"{len(tasks)} of {n} tasks and the mean"
    ax.set_title(title + " (dotted: not yet trained)", fontsize=9)
    if len(tasks) + 1 <= 12:
        ax.legend(fontsize=7, loc="lower left", ncol=2 if len(tasks) > 5 else 1)


def acc_matrix_figure(acc_matrix: Sequence[Sequence[float]]) -> Figure:
    """The accuracy matrix as a heat map."""
    n = len(acc_matrix)
    side = 3.6 if n <= 10 else 4.4
    fig = _figure(side + 0.9, side)
    draw_acc_matrix(fig, fig.add_subplot(), acc_matrix)
    return fig


def over_stream_figure(acc_matrix: Sequence[Sequence[float]], task_names: Sequence[str] | None = None) -> Figure:
    """Each task's accuracy over the stream (see :func:`draw_over_stream`)."""
    fig = _figure(6.4, 3.6)
    draw_over_stream(fig.add_subplot(), acc_matrix, task_names)
    return fig


def learning_curves_figure(curves: Sequence[Sequence[Sequence[float]]], task_names: Sequence[str] | None = None) -> Figure:
    """Accuracy on each task while it trains, against its training steps (``curves[t]`` is
    ``[(steps, accuracy), ...]``); a long stream shows a few tasks."""
    fig = _figure(6.4, 3.4)
    ax = fig.add_subplot()
    tasks = [t for t in shown_tasks(len(curves)) if curves[t]]
    for t, colour in zip(tasks, _task_colours(tasks, len(curves))):
        steps, acc = np.asarray(curves[t], dtype=float).T
        name = task_names[t] if task_names is not None and len(tasks) <= 8 else f"task {t}"
        ax.plot(steps, 100 * acc, color=colour, lw=1.3, marker="." if len(steps) <= 30 else None, label=name)
    ax.set_xlabel("training steps on the task")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 102)
    shown = "" if len(tasks) == len(curves) else f" ({len(tasks)} of {len(curves)} tasks)"
    ax.set_title("learning curves" + shown, fontsize=9)
    if len(tasks) <= 10:
        ax.legend(fontsize=7, loc="lower right", ncol=2 if len(tasks) > 5 else 1)
    return fig


def per_task_runs_figure(zero_shot: Mapping[str, Sequence[float]], just_trained: Mapping[str, Sequence[float]]) -> Figure:
    """Per task, the zero-shot accuracy (before training it) and the accuracy just after training it,
    one line per run (the method and its reference runs on the same stream)."""
    fig = _figure(8.0, 3.2)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (title, series) in zip(axes, (("zero-shot (before training the task)", zero_shot), ("just trained", just_trained))):
        for name, values in series.items():
            n = len(values)
            ax.plot(range(n), 100 * np.asarray(values, dtype=float), marker="o" if n <= 30 else None, ms=3, lw=1.2, label=name)
        _task_ticks(ax, max(len(v) for v in series.values()))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("task")
        ax.set_ylim(0, 102)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7, loc="lower left")
    return fig


def draw_overlap(fig: Figure, ax: Axes, overlap: Sequence[Sequence[float]]) -> None:
    """Heat map of the masks' pairwise overlap (IoU) between tasks."""
    _heat_map(fig, ax, np.asarray(overlap, dtype=float), 1.0, "IoU", ".2f")
    ax.set_xlabel("task")
    ax.set_ylabel("task")
    ax.set_title("mask overlap (IoU)")


def masks_figure(density: Sequence[float], overlap: Sequence[Sequence[float]] | None = None) -> Figure:
    """A gating method's masks: the density (fraction of units on) per task, and their pairwise overlap."""
    fig = _figure(8.6 if overlap is not None else 4.6, 3.6)
    axes = fig.subplots(1, 2, width_ratios=[1, 1.1]) if overlap is not None else [fig.add_subplot()]
    ax = axes[0]
    ax.bar(range(len(density)), density, color="#3b6ea5")
    ax.set_xlabel("task")
    ax.set_ylabel("fraction of units on")
    ax.set_title("mask density")
    _task_ticks(ax, len(density))
    if overlap is not None:
        draw_overlap(fig, axes[1], overlap)
    return fig


def run_overview_figure(acc_matrix: Sequence[Sequence[float]], mask_overlap: Sequence[Sequence[float]] | None = None) -> Figure:
    """One run at a glance: accuracy matrix, accuracy over the stream and, for gating methods, the masks' overlap."""
    panels = 3 if mask_overlap is not None else 2
    fig = _figure(4.0 * panels + 1.0, 3.4)
    fig.get_layout_engine().set(wspace=0.12)  # room between a colour bar's label and the next panel's axis label
    axes = fig.subplots(1, panels, width_ratios=[1.0, 1.3, 1.0][:panels])
    draw_acc_matrix(fig, axes[0], acc_matrix)
    draw_over_stream(axes[1], acc_matrix)
    if mask_overlap is not None:
        draw_overlap(fig, axes[2], mask_overlap)
    return fig


def ci_bounds(stat: Stat) -> tuple[float, float] | None:
    """The 95% confidence interval of a figure as (low, high): ``ci95`` is a half-width around the
    mean or a ``[low, high]`` pair; ``None`` where it is absent."""
    ci, mean = stat.get("ci95"), stat.get("mean")
    if ci is None or mean is None:
        return None
    if isinstance(ci, (int, float)):
        return mean - ci, mean + ci
    low, high = ci
    return None if low is None or high is None else (float(low), float(high))


def summary_bars_figure(summary: Mapping[str, Mapping[str, Any]], metrics: Sequence[tuple[str, str, float]] = BAR_METRICS) -> Figure:
    """Per method label, a bar of each figure's mean over seeds with ± std error bars and, where the
    summary has one, the 95% confidence interval beside it; ``n/a`` where no run gave the figure."""
    labels = list(summary)
    fig = _figure(max(7.5, 1.0 + 0.55 * len(labels) * len(metrics)), 3.4)
    axes = fig.subplots(1, len(metrics))
    x = np.arange(len(labels))
    for ax, (key, title, scale) in zip(np.atleast_1d(axes), metrics):
        stats = [summary[label].get(key) or {} for label in labels]
        means = [scale * s["mean"] if s.get("mean") is not None else 0.0 for s in stats]
        stds = [scale * (s.get("std") or 0.0) for s in stats]
        ax.bar(x, means, color=_task_colours(range(len(labels)), len(labels)), alpha=0.85)
        ax.errorbar(x, means, yerr=stds, fmt="none", ecolor="black", capsize=4, lw=1.2, label="± std")
        cis = [ci_bounds(s) for s in stats]
        if any(c is not None for c in cis):
            for i, c in enumerate(cis):
                if c is not None:
                    ax.vlines(i + 0.22, scale * c[0], scale * c[1], color="#c0392b", lw=1.2)
                    ax.plot([i + 0.22] * 2, [scale * c[0], scale * c[1]], "_", color="#c0392b", ms=6)
            ax.plot([], [], color="#c0392b", lw=1.2, label="95% CI")
        for i, s in enumerate(stats):
            if s.get("mean") is None:
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xticks(x, labels, rotation=30 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center", fontsize=8)
        ax.set_title(title, fontsize=9)
    handles, names = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside upper right", fontsize=7, ncol=2, frameon=False)
    return fig
