"""The report's curves (matplotlib, headless): test accuracy against round and against simulated
time, one panel per strategy (and task) with a line per configuration, and the overlay of all
strategies on shared axes, a panel per task. A line is the mean over seeds; its band is the
95% t interval with 3 seeds or more, the range of the seeds with 2 (the legend says which),
kept in [0, 1]. Rounds are ticked in whole numbers. (Final accuracy against bytes and epsilon:
:mod:`fedsim.report.scatter`.)"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from fedsim.report.figures import MARKERS, integer_axis, label, palette, pyplot, save
from fedsim.report.runs import Run
from fedsim.report.stats import band, band_name
from fedsim.report.tables import LR_KEYS, SEED_KEYS, bound, human_time, varying

Points = Callable[[Run], dict[int, tuple[float, float]]]


def by_round(run: Run) -> dict[int, tuple[float, float]]:
    return {r: (r, acc) for r, acc in run.curve if acc is not None}


def by_time(run: Run) -> dict[int, tuple[float, float]]:
    return {r: (t, acc) for r, t, acc in run.time_curve if acc is not None}


def mean_curve(runs: Sequence[Run], points: Points) -> tuple[list[float], ...]:
    """Per round: the mean x over the seeds that have the round, and the mean accuracy with its
    band (:func:`fedsim.report.stats.band`)."""
    per_run = [points(m) for m in runs]
    xs, means, lows, highs = [], [], [], []
    for r in sorted({r for p in per_run for r in p}):
        here = [p[r] for p in per_run if r in p]
        mean, low, high = band(acc for _, acc in here)
        if mean is None:
            continue
        xs.append(sum(x for x, _ in here) / len(here))
        means.append(mean)
        lows.append(low)
        highs.append(high)
    return xs, means, lows, highs


class Line:
    """A configuration's curve: its group, runs, and mean with band."""

    def __init__(self, group: dict[str, Any], points: Points) -> None:
        self.group = group
        self.runs = [r["_run"] for r in group["_rows"] if points(r["_run"])]
        self.xs, self.means, self.lows, self.highs = mean_curve(self.runs, points)

    @property
    def seeds(self) -> int:
        return len(self.runs)

    def name(self, keys: Sequence[str], fallback: str) -> str:
        text = label(self.group, keys) or fallback
        kind = band_name(self.seeds)
        return f"{text} ({kind})" if kind else text


def _lines(groups: Sequence[dict[str, Any]], points: Points) -> list[Line]:
    return [line for line in (Line(g, points) for g in groups) if line.runs and line.xs]


def _label_keys(lines: Sequence[Line], leave_out: Sequence[str]) -> list[str]:
    """What tells the lines apart (less ``leave_out`` and what follows from the strategy);
    the strategy first."""
    rows = [ln.group for ln in lines]
    keys = [k for k, _ in lines[0].group["_key"] if k not in (*SEED_KEYS, *leave_out)]
    rate = [k for k in keys if k == LR_KEYS[0]]  # a swept rate, always: it was chosen
    keys = [k for k in varying(rows, keys) if k not in bound(rows, keys) and k not in rate]
    return sorted(keys, key=lambda k: k != "strategy") + rate


def _title(text: str, lines: Sequence[Line]) -> str:
    return text + (" (mean over seeds)" if any(ln.seeds > 1 for ln in lines) else "")


def _draw(ax, line: Line, xs, name: str, color=None, marker="o", style="-", band=True):
    (drawn,) = ax.plot(
        xs, line.means, marker=marker, markersize=3, label=name, color=color, linestyle=style
    )
    if band and line.seeds > 1:
        ax.fill_between(xs, line.lows, line.highs, color=drawn.get_color(), alpha=0.18)


def _grid(plt, n: int, width: float = 5.2, height: float = 3.8, cols: int = 3, sharey=True):
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width * cols, height * rows), squeeze=False, sharey=sharey
    )
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)


def plot_curves(groups: Sequence[dict[str, Any]], path: Path, rates: str = "") -> bool:
    """Test accuracy against round: a panel per strategy (and task), a line per configuration."""
    title = "Test accuracy of the global model by round" + (f", {rates}" if rates else "")
    return _panels(groups, path, by_round, "round", title)


def plot_time(groups: Sequence[dict[str, Any]], path: Path, rates: str = "") -> bool:
    """Test accuracy against simulated time, as :func:`plot_curves` (a point per round at the
    simulated time it ended, averaged over seeds); runs without a clock are left out. The axis
    is in one unit (ms, s, min, h or d), or on a log scale ticked in readable durations when
    the lines end more than a decade apart."""
    title = "Test accuracy of the global model against simulated time"
    title += f", {rates}" if rates else ""
    return _panels(groups, path, by_time, "simulated time", title, time_axis=True)


def _panels(groups, path: Path, points: Points, xlabel: str, title: str, time_axis=False):
    """One panel per (task, strategy), a line per configuration; False, and no file, when no
    run has points."""
    lines = _lines(groups, points)
    if not lines:
        return False
    panels: dict[tuple[str, str], list[Line]] = defaultdict(list)
    for line in lines:
        panels[str(line.group.get("task")), str(line.group.get("strategy"))].append(line)
    tasks = {task for task, _ in panels}
    scale = _TimeAxis([ln.xs for ln in lines]) if time_axis else None
    plt = pyplot()
    fig, axes = _grid(plt, len(panels))
    for ax, (task, strategy) in zip(axes, sorted(panels)):
        mine = panels[task, strategy]
        keys = _label_keys(mine, ("strategy", "task"))
        for line in mine:
            _draw(ax, line, scale.values(line.xs) if scale else line.xs, line.name(keys, strategy))
        ax.set_title(f"{task}: {strategy}" if len(tasks) > 1 else f"strategy: {strategy}")
        ax.set_xlabel(scale.label(xlabel) if scale else xlabel)
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("test accuracy (global model)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.2), frameon=False)
        if scale:
            scale.ticks(ax)
        else:
            integer_axis(ax.xaxis)
    fig.suptitle(_title(title, lines))
    fig.tight_layout()
    save(fig, path)
    return True


#: the most lines of an overlay panel drawn with their bands (more would hide each other)
BANDS = 6
#: the line styles of one strategy's configurations on the overlay
DASHES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))


def config_style(marker: str, k: int, taken: Collection[str] = ()) -> tuple[Any, str]:
    """The line style and marker of a strategy's ``k``-th configuration on the overlay: the
    strategy's marker with each of :data:`DASHES`, then each dash again with the next of
    :data:`MARKERS` (so 7 or more configurations of one strategy stay distinct), first those
    no strategy on the panel has (``taken``: the panel's strategies' markers)."""
    dash = DASHES[k % len(DASHES)]
    turn = k // len(DASHES)
    if turn == 0:
        return dash, marker
    free = [m for m in MARKERS if m not in taken and m != marker]
    others = free + [m for m in MARKERS if m in taken and m != marker]
    return dash, others[(turn - 1) % len(others)]


def plot_overlay(groups: Sequence[dict[str, Any]], path: Path, rates: str) -> bool:
    """All strategies on shared axes, a panel (row) per task: test accuracy by round, the mean
    over seeds with its band (up to :data:`BANDS` lines), a colour and marker per strategy, a
    line style per configuration when a strategy has several; the legend on the right."""
    lines = _lines(groups, by_round)
    if not lines:
        return False
    style = palette(str(ln.group.get("strategy")) for ln in lines)
    tasks = sorted({str(ln.group.get("task")) for ln in lines})
    most = max(sum(str(ln.group.get("task")) == t for ln in lines) for t in tasks)
    ncol = 1 if most <= 14 else 2
    plt = pyplot()
    fig, axes = _grid(plt, len(tasks), width=7.0 + 3.4 * ncol, height=4.6, cols=1, sharey=False)
    for ax, task in zip(axes, tasks):
        mine = [ln for ln in lines if str(ln.group.get("task")) == task]
        keys = _label_keys(mine, ("task",))
        seen: dict[str, int] = defaultdict(int)
        taken = {style[str(ln.group.get("strategy"))][1] for ln in mine}
        for line in sorted(mine, key=lambda ln: label(ln.group, keys)):
            strategy = str(line.group.get("strategy"))
            color, marker = style[strategy]
            dash, marker = config_style(marker, seen[strategy], taken)
            seen[strategy] += 1
            name = line.name(keys, strategy)
            _draw(ax, line, line.xs, name, color, marker, dash, band=len(mine) <= BANDS)
        title = f"task: {task}" if len(tasks) > 1 else "strategies compared"
        crowded = len(mine) > BANDS and any(ln.seeds > 1 for ln in mine)
        ax.set_title(title + (f" (no seed bands: over {BANDS} lines)" if crowded else ""))
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (global model)")
        ax.grid(alpha=0.3)
        integer_axis(ax.xaxis)
        ax.legend(  # handles long enough to show each line's dash pattern
            fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=ncol, handlelength=4
        )
    fig.suptitle(_title("Test accuracy by round" + (f", {rates}" if rates else ""), lines))
    _fit_legends(fig, axes[: len(tasks)])
    fig.tight_layout()
    save(fig, path)
    return True


#: the overlay's axes width in inches, kept whatever the legend beside them needs
AXES_WIDTH = 6.0


def _fit_legends(fig, axes) -> None:
    """Widen ``fig`` so the widest legend to the right of ``axes`` fits beside axes
    :data:`AXES_WIDTH` wide (long labels would otherwise squeeze the axes to a sliver)."""
    renderer = fig.canvas.get_renderer()
    widest = max(ax.get_legend().get_window_extent(renderer).width for ax in axes) / fig.dpi
    labels = 1.2  # the y label and tick labels, and the margins
    fig.set_size_inches(max(fig.get_figwidth(), AXES_WIDTH + widest + labels), fig.get_figheight())


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
