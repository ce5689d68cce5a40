"""The report's plots (matplotlib, headless): test accuracy against round and against
simulated time, final accuracy against total bytes with the Pareto frontier, and against
epsilon."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedsim.report.runs import Run
from fedsim.report.tables import (
    COLUMNS,
    SEED_KEYS,
    _cell,
    _identity,
    human_time,
    mean_ci,
    varying,
)


def _label(row: dict[str, Any], keys: Sequence[str]) -> str:
    parts = [f"{_short(k)}={_cell(row.get(k))}" for k in keys]
    return ", ".join(parts)


def _short(key: str) -> str:
    return key.split(".", 1)[1] if key.startswith(("sim.", "task.")) else key


def _bytes(value: float, _pos=None) -> str:
    from fedsim.progress import human_bytes

    return human_bytes(value)


def plot_curves(runs: Sequence[Run], columns: Sequence[str], path: Path) -> bool:
    """Test accuracy against round: one panel per strategy, a line per configuration (the
    mean over seeds, with a 95% band when there are several)."""

    def points(run: Run) -> dict[int, tuple[float, float]]:
        return {r: (r, acc) for r, acc in run.curve if acc is not None}

    return _panels(
        runs,
        columns,
        path,
        points,
        "round",
        "Test accuracy of the global model after each round (mean over seeds)",
    )


def plot_time(runs: Sequence[Run], columns: Sequence[str], path: Path) -> bool:
    """Test accuracy against simulated time, as :func:`plot_curves` (a point per round at the
    simulated time it ended, both averaged over seeds); runs without a clock are left out.
    The axis is in one unit (ms, s, min, h or d), or on a log scale ticked in readable
    durations when the lines end more than a decade apart."""

    def points(run: Run) -> dict[int, tuple[float, float]]:
        return {r: (t, acc) for r, t, acc in run.time_curve if acc is not None}

    return _panels(
        runs,
        columns,
        path,
        points,
        "simulated time",
        "Test accuracy of the global model against simulated time (mean over seeds)",
        time_axis=True,
    )


Points = Callable[[Run], dict[int, tuple[float, float]]]


def _mean_curve(members: Sequence[Run], points: Points) -> tuple[list[float], ...]:
    """Per round: the mean x over the seeds that have the round, and the mean accuracy with its
    95% band (kept in [0, 1], as accuracy is)."""
    per_run = [points(m) for m in members]
    xs, means, lows, highs = [], [], [], []
    for r in sorted({r for p in per_run for r in p}):
        here = [p[r] for p in per_run if r in p]
        mean, half, _ = mean_ci(acc for _, acc in here)
        half = half or 0.0
        xs.append(sum(x for x, _ in here) / len(here))
        means.append(mean)
        lows.append(max(mean - half, 0.0))
        highs.append(min(mean + half, 1.0))
    return xs, means, lows, highs


def _grouped(runs: Sequence[Run], columns: Sequence[str], points: Points):
    """The runs with points, ``{strategy: {configuration: curve}}``, and the keys that can
    label a configuration."""
    swept = [c for c in columns if c not in COLUMNS]
    candidates = [k for k, _ in _identity({}, swept, (*SEED_KEYS, "strategy"))]
    by_strategy: dict[str, dict[tuple, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if points(run):
            row = {**run.row, **run.overrides}
            key = _identity(row, swept, (*SEED_KEYS, "strategy"))
            by_strategy[str(run.row.get("strategy"))][key].append(run)
    curves = {
        name: {key: (len(ms), _mean_curve(ms, points)) for key, ms in sorted(lines.items())}
        for name, lines in by_strategy.items()
    }
    return curves, candidates


def _panels(runs, columns, path: Path, points: Points, xlabel: str, title: str, time_axis=False):
    """One panel per strategy, a line per configuration (a 95% band with several seeds);
    False, and no file, when no run has points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, candidates = _grouped(runs, columns, points)
    if not curves:
        return False
    xs_all = [c[1][0] for lines in curves.values() for c in lines.values()]
    scale = _TimeAxis(xs_all) if time_axis else None
    names = sorted(curves)
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False, sharey=True
    )
    for ax, name in zip(axes.flat, names):
        label_keys = varying([dict(key) for key in curves[name]], candidates)
        for key, (seeds, (xs, means, lows, highs)) in curves[name].items():
            xs = scale.values(xs) if scale else xs
            label = _label(dict(key), label_keys) or name
            if seeds > 1:
                label += f" ({seeds} seeds)"
            (line,) = ax.plot(xs, means, marker="o", markersize=3, label=label)
            if seeds > 1:
                ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2)
        ax.set_title(f"strategy: {name}")
        ax.set_xlabel(scale.label(xlabel) if scale else xlabel)
        ax.set_ylabel("test accuracy (global model)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.18), frameon=False)
        if scale:
            scale.ticks(ax)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


class _TimeAxis:
    """The x axis of simulated time: in the largest unit that the longest line spans twice, or,
    when the lines end more than a decade apart, on a log scale in seconds ticked at
    readable durations (1 ms, 10 ms, ..., 1 s, 10 s, 1 min, 10 min, 1 h, ...; round 0, at 0 s,
    then left off)."""

    UNITS = (("d", 86400.0), ("h", 3600.0), ("min", 60.0), ("s", 1.0), ("ms", 1e-3))
    TICKS = (1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0, 36000.0, 86400.0, 864e3)

    def __init__(self, lines: Sequence[Sequence[float]]) -> None:
        ends = [max(xs) for xs in lines if xs and max(xs) > 0]
        self.log = bool(ends) and max(ends) / min(ends) > 10
        top = max(ends, default=0.0)
        unit = next(((u, size) for u, size in self.UNITS if top / size >= 2), self.UNITS[-1])
        self.unit, self.size = ("s", 1.0) if self.log else unit

    def values(self, xs: Sequence[float]) -> list[float]:
        if self.log:
            return [x if x > 0 else math.nan for x in xs]
        return [x / self.size for x in xs]

    def label(self, xlabel: str) -> str:
        return f"{xlabel} (log scale)" if self.log else f"{xlabel} ({self.unit})"

    def ticks(self, ax) -> None:
        from matplotlib.ticker import NullFormatter

        if not self.log:
            return
        ax.set_xscale("log")
        low, high = ax.get_xlim()
        ticks = [t for t in self.TICKS if low <= t <= high]
        ax.set_xticks(ticks, [human_time(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (fewer or equal bytes and higher or equal
    accuracy, one of them strictly), in order of bytes."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _scatter(
    groups: Sequence[dict[str, Any]],
    x_key: str,
    path: Path,
    xlabel: str,
    title: str,
    log_x: bool,
    frontier: bool,
    swept: Sequence[str],
) -> bool:
    """Final accuracy (mean over seeds, 95% interval) of each group against ``x_key``: a colour
    per strategy, the Pareto frontier marked when ``frontier``, a log-scale axis in bytes when
    ``log_x``. False, and no file, when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [
        g for g in groups if g.get(x_key) is not None and g.get("final_accuracy_mean") is not None
    ]
    if log_x:
        points = [g for g in points if g[x_key] > 0]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 5))
    _draw_strategies(ax, points, x_key, swept)
    if frontier:
        _draw_frontier(ax, [(g[x_key], g["final_accuracy_mean"]) for g in points])
    if log_x:
        _log_bytes_axis(ax, sorted({g[x_key] for g in points}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final test accuracy (mean over seeds, 95% CI)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, title="strategy", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def _draw_strategies(
    ax, points: Sequence[dict[str, Any]], x_key: str, swept: Sequence[str]
) -> None:
    """A colour per strategy: its points with their intervals, each labelled with what tells it
    apart from the strategy's other points."""
    candidates = [k for k, _ in _identity({}, swept, (*SEED_KEYS, "strategy"))]
    strategies = sorted({str(g.get("strategy")) for g in points})
    colors = {s: f"C{i % 10}" for i, s in enumerate(strategies)}
    for s in strategies:
        mine = [g for g in points if str(g.get("strategy")) == s]
        label_keys = varying(mine, candidates)  # what tells this strategy's points apart
        _errorbars(ax, mine, x_key, color=colors[s], label=s)
        _annotate(ax, mine, x_key, label_keys)


def _errorbars(ax, mine: Sequence[dict[str, Any]], x_key: str, color: str, label: str) -> None:
    means = [g["final_accuracy_mean"] for g in mine]
    halves = [g["final_accuracy_ci95"] or 0.0 for g in mine]
    ax.errorbar(
        [g[x_key] for g in mine],
        means,
        yerr=[  # accuracy is in [0, 1]: so is its interval
            [min(h, m) for m, h in zip(means, halves)],
            [min(h, 1.0 - m) for m, h in zip(means, halves)],
        ],
        fmt="o",
        color=color,
        capsize=3,
        label=label,
    )


def _annotate(ax, mine: Sequence[dict[str, Any]], x_key: str, label_keys: Sequence[str]) -> None:
    for g in mine:
        text = _label(g, label_keys)
        if text:
            ax.annotate(
                text,
                (g[x_key], g["final_accuracy_mean"]),
                fontsize=6,
                alpha=0.7,
                xytext=(3, 3),
                textcoords="offset points",
            )


def _draw_frontier(ax, xy: Sequence[tuple[float, float]]) -> None:
    """The Pareto frontier of ``xy`` as a dashed step line, its points circled."""
    front = pareto_front(xy)
    ax.step(
        [xy[i][0] for i in front],
        [xy[i][1] for i in front],
        where="post",
        color="black",
        linestyle="--",
        linewidth=1,
        label="Pareto frontier",
    )
    ax.scatter(
        [xy[i][0] for i in front],
        [xy[i][1] for i in front],
        s=140,
        facecolors="none",
        edgecolors="black",
    )


def _log_bytes_axis(ax, xs: Sequence[float]) -> None:
    """A log-scale x axis labelled in bytes; ``xs`` (the sorted values plotted) ticked
    themselves when they span less than two decades."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_bytes))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if xs[-1] / xs[0] < 100:  # within two decades: tick the values themselves
        ticks = xs if len(xs) <= 6 else list(np.geomspace(xs[0], xs[-1], 6))
        ax.set_xticks(ticks, [_bytes(t) for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())


def plot_pareto(groups, swept, path: Path) -> bool:
    for g in groups:
        up, down = g.get("bytes_up"), g.get("bytes_down")
        g["bytes_total"] = None if up is None or down is None else up + down
    return _scatter(
        groups,
        "bytes_total",
        path,
        "total bytes sent, up + down, whole run (log scale)",
        "Accuracy against communication\n(dashed: the Pareto frontier; no configuration is both "
        "cheaper and better than a circled one)",
        log_x=True,
        frontier=True,
        swept=swept,
    )


def plot_privacy(groups, swept, path: Path) -> bool:
    private = [g for g in groups if g.get("privacy") not in (None, "none") and g.get("epsilon")]
    return _scatter(
        private,
        "epsilon",
        path,
        "epsilon spent by the end of the run (smaller is more private)",
        "Accuracy against privacy budget",
        log_x=False,
        frontier=True,
        swept=swept,
    )
