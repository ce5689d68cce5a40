"""Final accuracy against what it cost (matplotlib, headless), a row per task (runs of
different tasks are never on one frontier):

* ``accuracy_vs_bytes.png``: left, final test accuracy against total bytes (up + down) with
  the Pareto frontier of the row's points; right, the same points side by side, a column per
  strategy and configuration, each with its total bytes written above it;
* ``accuracy_vs_epsilon.png``: final test accuracy against the epsilon spent, with its
  frontier.

A point is a configuration's mean over seeds, its bar the 95% t interval with 3 seeds or more
and the range of the seeds with 2. Points that would be drawn on top of each other are set a
few pixels apart, and the axis label says so."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim.progress import human_bytes
from fedsim.report.figures import (
    bytes_axis,
    label,
    name_every_tick,
    palette,
    pyplot,
    save,
    title_above,
)
from fedsim.report.stats import CI_SEEDS, band
from fedsim.report.tables import SEED_KEYS, bound, varying

COINCIDE = 0.012  # points nearer than this share of the cost axis's span may hide each other
APART = 9.0  # points between points drawn apart


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


class Point:
    """A group's final accuracy (mean, low, high over its seeds) at ``x``."""

    def __init__(self, group: dict[str, Any], x: float) -> None:
        self.group, self.x = group, float(x)
        self.y, self.low, self.high = band(r["final_accuracy"] for r in group["_rows"])
        self.strategy = str(group.get("strategy"))
        self.shift = 0.0  # points to the right, when it would hide another point


def _points(groups, x_of) -> list[Point]:
    out = []
    for g in groups:
        x = x_of(g)
        if x is not None and x > 0:
            p = Point(g, x)
            if p.y is not None:
                out.append(p)
    return out


def _spread(points: Sequence[Point], log: bool) -> int:
    """Set apart the points that would hide each other (about the same cost, and intervals
    that overlap); returns how many were moved."""
    if len(points) < 2:
        return 0
    f = math.log10 if log else float
    xs = [f(p.x) for p in points]
    wx = (max(xs) - min(xs)) or 1.0
    clusters: list[list[int]] = []
    for i in range(len(points)):
        home = next((c for c in clusters if any(_hides(points, xs, wx, i, j) for j in c)), None)
        if home is None:
            clusters.append([i])
        else:
            home.append(i)
    moved = 0
    for c in clusters:
        if len(c) > 1:
            for k, i in enumerate(c):
                points[i].shift = APART * (k - (len(c) - 1) / 2)
            moved += len(c)
    return moved


def _hides(points: Sequence[Point], xs: Sequence[float], wx: float, i: int, j: int) -> bool:
    a, b = points[i], points[j]
    return abs(xs[i] - xs[j]) < COINCIDE * wx and a.low <= b.high and b.low <= a.high


def _errorbar(ax, p: Point, x: float, style, name: str | None, shifted: bool = True) -> None:
    color, marker = style
    bar = p.high > p.low  # no bar (nor one in the legend) for a single seed
    ax.errorbar(
        [x],
        [p.y],
        yerr=[[p.y - p.low], [p.high - p.y]] if bar else None,
        fmt=marker,
        color=color,
        capsize=3 if bar else 0,
        markersize=6,
        label=name,
        transform=ax.transData + _shift(ax, p) if shifted else ax.transData,
    )
    ax.update_datalim([(x, p.low), (x, p.high)])  # a shifted transform updates no limits
    ax.autoscale_view()


def _frontier(ax, points: Sequence[Point]) -> None:
    """The Pareto frontier as a dashed step line, its points circled (where they are drawn)."""
    front = [points[i] for i in pareto_front([(p.x, p.y) for p in points])]
    xs, ys = [p.x for p in front], [p.y for p in front]
    ax.step(xs, ys, where="post", color="black", linestyle="--", linewidth=1, label="Pareto")
    for p in front:
        ax.scatter([p.x], [p.y], s=150, facecolors="none", edgecolors="black", linewidths=0.8,
                   transform=ax.transData + _shift(ax, p))  # fmt: skip


def _shift(ax, p: Point):
    from matplotlib.transforms import ScaledTranslation

    return ScaledTranslation(p.shift / 72, 0, ax.figure.dpi_scale_trans)


def _label_keys(points: Sequence[Point]) -> list[str]:
    rows = [p.group for p in points]
    keys = [k for k, _ in points[0].group["_key"] if k not in (*SEED_KEYS, "strategy", "task")]
    return [k for k in varying(rows, keys) if k not in bound(rows, [*keys, "strategy"])]


def _bars(points: Sequence[Point]) -> str:
    seeds = {len(p.group["_rows"]) for p in points}
    if seeds == {1}:
        return "one seed: no bars"
    return f"mean over seeds; bars: 95% CI with >= {CI_SEEDS} seeds, min-max with 2"


def _cost_panel(ax, points, x_label: str, style, byte_axis: bool, title: str) -> None:
    """Accuracy against cost, a colour and marker per strategy, the Pareto frontier; the
    legend in a row above the panel."""
    log = bytes_axis(ax.xaxis, [p.x for p in points]) if byte_axis else False
    moved = _spread(points, log)
    keys = _label_keys(points)
    named: set[str] = set()
    for p in sorted(points, key=lambda p: p.strategy):
        first = p.strategy not in named
        named.add(p.strategy)
        _errorbar(ax, p, p.x, style[p.strategy], p.strategy if first else None)
        text = label(p.group, keys)
        if text:
            ax.annotate(  # out of the layout: declutter keeps it inside the axes
                text, (p.x, p.y), xycoords=ax.transData + _shift(ax, p), xytext=(4, 4),
                textcoords="offset points", fontsize=6, color=style[p.strategy][0],
                in_layout=False,
            )  # fmt: skip
    _frontier(ax, points)
    note = f"\n({moved} points at the same cost drawn side by side)" if moved else ""
    ax.set_xlabel(x_label + (" (log scale)" if log else "") + note)
    ax.set_ylabel(f"final test accuracy\n({_bars(points)})", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(
        fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=min(len(named) + 1, 6),
        title=title, title_fontsize=8, frameon=False, alignment="left",
    )  # fmt: skip


def _side_by_side(ax, points, style) -> None:
    """A column per configuration, strategies side by side, each named with its total bytes
    (on one line, turned upright, when there are more than five)."""
    keys = _label_keys(points)
    order = sorted(points, key=lambda p: (p.strategy, label(p.group, keys)))
    for i, p in enumerate(order):
        _errorbar(ax, p, i, style[p.strategy], None, shifted=False)
    many = len(order) > 5
    names = [
        (", " if many else "\n").join(
            [p.strategy, *([label(p.group, keys)] if keys else []), human_bytes(p.x)]
        )
        for p in order
    ]
    ax.set_xticks(range(len(order)), names, fontsize=7, rotation=90 if many else 0)
    name_every_tick(ax.xaxis)
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.set_title("side by side, with total bytes", fontsize=9)
    ax.set_ylabel("final test accuracy", fontsize=8)
    ax.grid(alpha=0.3, axis="y")


def plot_pareto(groups: Sequence[dict[str, Any]], path: Path, rates: str) -> bool:
    """``accuracy_vs_bytes.png`` (module docstring); False, and no file, with no points."""

    def total(g):
        up, down = g.get("bytes_up"), g.get("bytes_down")
        return None if up is None or down is None else up + down

    by_task = _by_task(_points(groups, total))
    if not by_task:
        return False
    style = palette(p.strategy for ps in by_task.values() for p in ps)
    plt = pyplot()
    fig, axes = plt.subplots(
        len(by_task), 2, figsize=(13, 4.8 * len(by_task)), squeeze=False,
        gridspec_kw={"width_ratios": [3, 2]},
    )  # fmt: skip
    for (ax, side), (task, points) in zip(axes, sorted(by_task.items())):
        title = ("" if len(by_task) == 1 else f"task: {task}; ") + "dashed: Pareto frontier"
        _cost_panel(ax, points, "total bytes sent, up + down, whole run", style, True, title)
        _side_by_side(side, points, style)
        side.sharey(ax)
    title = fig.suptitle(
        "Final test accuracy against communication" + (f", {rates}" if rates else "")
    )
    title_above(fig, title)
    save(fig, path, note_ax=axes[-1][0])
    return True


def plot_privacy(groups: Sequence[dict[str, Any]], path: Path, rates: str) -> bool:
    """``accuracy_vs_epsilon.png``: the groups with differential privacy and an epsilon."""
    private = [g for g in groups if g.get("privacy") not in (None, "none", "None")]
    by_task = _by_task(_points(private, lambda g: g.get("epsilon")))
    if not by_task:
        return False
    style = palette(p.strategy for ps in by_task.values() for p in ps)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(by_task), figsize=(7.5 * len(by_task), 5), squeeze=False)
    for ax, (task, points) in zip(axes[0], sorted(by_task.items())):
        title = ("" if len(by_task) == 1 else f"task: {task}; ") + "dashed: frontier"
        x_label = "epsilon spent by the end of the run (smaller: more private)"
        _cost_panel(ax, points, x_label, style, False, title)
    title = fig.suptitle(
        "Final test accuracy against privacy budget" + (f", {rates}" if rates else "")
    )
    title_above(fig, title)
    save(fig, path, note_ax=axes[0][0])
    return True


def _by_task(points: Sequence[Point]) -> dict[str, list[Point]]:
    out: dict[str, list[Point]] = {}
    for p in points:
        out.setdefault(str(p.group.get("task")), []).append(p)
    return out
