"""``fedsim-report PATH...``: one tidy table, seed statistics, tuned learning rates and plots.

Reads every run folder under the given paths (run folders and Hydra sweep folders, any
nesting: a run folder holds fedsim's ``config.yaml``), and writes beside them (or to ``--out``):

* ``report.csv`` / ``report.md``: a row per run: the swept overrides, task, strategy, adapter,
  compressor, privacy, learning rate, seed, final accuracy and loss (test, and validation when
  the run held one out), total bytes up and down, epsilon, wall time, status (``ok``, ``failed``
  with the reason, ``incomplete`` when a run has no summary: killed or still running);
* ``groups.csv`` / ``groups.md``: runs that differ only in ``sim.seed`` grouped, with the mean
  and a 95% confidence interval (Student's t) of the final accuracy and loss;
* ``tuned.csv`` / ``tuned.md`` (when runs differ in ``sim.lr``): for each configuration, the
  learning rate with the best mean **validation** accuracy, and the **test** results at that
  rate (``sim.validation_fraction`` holds a validation split out of the test set);
* PNG plots (matplotlib, headless): test accuracy against round per configuration, one panel
  per strategy; final accuracy against total bytes (log scale) with the Pareto frontier
  marked; accuracy against epsilon when runs with differential privacy exist.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedsim.results import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE

#: what identifies a configuration, besides the swept overrides (the seed excepted)
IDENTITY = [
    "task",
    "strategy",
    "adapter",
    "r",
    "compressor",
    "feedback",
    "privacy",
    "partition",
    "num_clients",
    "clients_per_round",
    "rounds",
    "lr",
]

#: the columns of ``report.csv`` after the swept overrides, in order
COLUMNS = [
    *IDENTITY,
    "seed",
    "status",
    "rounds_completed",
    "final_accuracy",
    "final_loss",
    "final_val_accuracy",
    "final_val_loss",
    "bytes_up",
    "bytes_down",
    "epsilon",
    "wall_time_s",
    "reason",
    "run",
]

SEED_KEYS = ("sim.seed", "seed")
#: report columns that repeat an override's value (shown once, under the override's name)
ALIASES = {
    "seed": "sim.seed",
    "lr": "sim.lr",
    "r": "adapter.r",
    "num_clients": "sim.num_clients",
    "clients_per_round": "sim.clients_per_round",
    "rounds": "sim.rounds",
}
LR_KEYS = ("sim.lr", "lr")


@dataclass
class Run:
    """One run folder, read."""

    path: Path
    row: dict[str, Any]
    overrides: dict[str, str]
    curve: list[tuple[int, float | None]] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """Run folders under ``paths`` (each a run folder or a folder holding some), sorted."""
    found: set[Path] = set()
    for root in paths:
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
        if root.is_file():
            root = root.parent
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .hydra, .git
            if CONFIG_FILE in files and (METRICS_FILE in files or SUMMARY_FILE in files):
                found.add(Path(folder))
    return sorted(found, key=_natural)


def _natural(path: Path) -> list:
    """Sort key: sweep job folders 2 before 10."""
    return [int(p) if p.isdigit() else p for p in path.parts]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line cut short by a kill
                    break
    except OSError:
        pass
    return rows


def _overrides(folder: Path) -> dict[str, str]:
    """The command-line overrides of a Hydra job (``.hydra/overrides.yaml``), as key: value."""
    path = folder / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return {}
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def read_run(folder: Path) -> Run:
    cfg = {}
    try:
        cfg = yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        pass
    summary = _read_json(folder / SUMMARY_FILE)
    metrics = _read_metrics(folder / METRICS_FILE)
    sim = cfg.get("sim", {}) if isinstance(cfg, dict) else {}
    adapter = cfg.get("adapter", {}) if isinstance(cfg, dict) else {}
    last = metrics[-1] if metrics else {}
    s = summary or {}
    choice = _choices(folder, cfg) if summary is None else {}
    row: dict[str, Any] = {
        "task": s.get("task", choice.get("task")),
        "strategy": s.get("strategy", choice.get("strategy")),
        "adapter": s.get("adapter", choice.get("adapter")),
        "r": adapter.get("r"),
        "compressor": s.get("compressor", choice.get("compressor")),
        "feedback": s.get("feedback", choice.get("feedback")),
        "privacy": s.get("privacy", choice.get("privacy")),
        "partition": s.get("partition", choice.get("partition")),
        "num_clients": s.get("num_clients", sim.get("num_clients")),
        "clients_per_round": s.get("clients_per_round", sim.get("clients_per_round")),
        "rounds": s.get("rounds", sim.get("rounds")),
        "lr": sim.get("lr"),
        "seed": s.get("seed", sim.get("seed")),
        "rounds_completed": s.get("rounds_completed", last.get("round", 0)),
        "final_accuracy": s.get("final_eval_accuracy", last.get("eval_accuracy")),
        "final_loss": s.get("final_eval_loss", last.get("eval_loss")),
        "final_val_accuracy": s.get("final_val_accuracy", last.get("val_accuracy")),
        "final_val_loss": s.get("final_val_loss", last.get("val_loss")),
        "bytes_up": s.get("bytes_up_total", sum(m.get("bytes_up", 0) or 0 for m in metrics)),
        "bytes_down": s.get("bytes_down_total", sum(m.get("bytes_down", 0) or 0 for m in metrics)),
        "epsilon": s.get("epsilon", last.get("epsilon")),
        "wall_time_s": s.get("wall_time_s"),
    }
    if summary is None:
        row["status"] = "incomplete"
        row["reason"] = (
            f"no {SUMMARY_FILE}: killed or still running ({len(metrics)} rounds in {METRICS_FILE})"
        )
    else:
        row["status"] = "ok" if s.get("status") == "ok" else "failed"
        row["reason"] = "" if row["status"] == "ok" else str(s.get("error") or s.get("status"))
    curve = [(int(m["round"]), m.get("eval_accuracy")) for m in metrics if "round" in m]
    return Run(folder, row, _overrides(folder), curve)


def _choices(folder: Path, cfg: Any) -> dict[str, Any]:
    """Config-group choices of a run without a summary: Hydra's record of them
    (``.hydra/hydra.yaml``), else the class each group built."""
    try:
        hydra_cfg = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())
        choices = hydra_cfg["hydra"]["runtime"]["choices"]
        return {k: v for k, v in choices.items() if not k.startswith("hydra/")}
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        pass
    out = {}
    for group, value in cfg.items() if isinstance(cfg, dict) else []:
        if isinstance(value, dict) and "_target_" in value:
            out[group] = str(value["_target_"]).rsplit(".", 1)[-1]
    return out


# ----------------------------------------------------------------------------- tables


def swept_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys whose values differ between runs (all of them for a single run)."""
    keys: dict[str, set[str]] = defaultdict(set)
    for run in runs:
        for k, v in run.overrides.items():
            keys[k].add(v)
    for run in runs:  # a key missing from some runs varies too
        for k in keys:
            if k not in run.overrides:
                keys[k].add("")
    if len(runs) == 1:
        return sorted(keys)
    return sorted(k for k, values in keys.items() if len(values) > 1)


def table(runs: Sequence[Run], root: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The report's columns and one row per run."""
    swept = swept_keys(runs)
    rows = []
    for run in runs:
        row = {k: run.overrides.get(k, "") for k in swept}
        row.update(run.row)
        row["run"] = _relative(run.path, root)
        rows.append(row)
    columns = swept + [c for c in COLUMNS if c not in swept and ALIASES.get(c) not in swept]
    return columns, rows


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve())) or "."
    except ValueError:
        return str(path)


def t_quantile(n: int) -> float:
    """The 97.5% quantile of Student's t with ``n - 1`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def mean_ci(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """``(mean, half-width of the 95% confidence interval, n)`` of the finite values (half-width
    None with fewer than two)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None, len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return mean, t_quantile(len(xs)) * sd / math.sqrt(len(xs)), len(xs)


def _identity(row: dict[str, Any], swept: Sequence[str], leave_out: Sequence[str]) -> tuple:
    keys = [k for k in swept if k not in leave_out]
    keys += [k for k in IDENTITY if k not in leave_out and ALIASES.get(k) not in swept]
    return tuple((k, str(row.get(k, ""))) for k in keys)


def group_seeds(
    columns: Sequence[str], rows: Sequence[dict[str, Any]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Finished runs that differ only in the seed, with means and 95% intervals."""
    swept = [c for c in columns if c not in COLUMNS]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["status"] == "ok":
            groups[_identity(row, swept, SEED_KEYS)].append(row)
    out = []
    for key, members in groups.items():
        g = dict(key)
        for metric in ("final_accuracy", "final_loss", "final_val_accuracy", "final_val_loss"):
            mean, half, n = mean_ci(m[metric] for m in members)
            g[f"{metric}_mean"] = mean
            g[f"{metric}_ci95"] = half
        g["seeds"] = len(members)
        g["bytes_up"] = _mean(m["bytes_up"] for m in members)
        g["bytes_down"] = _mean(m["bytes_down"] for m in members)
        g["epsilon"] = _mean(m["epsilon"] for m in members)
        out.append(g)
    keys = [k for k, _ in next(iter(groups))] if groups else []
    stats = [
        "seeds",
        "final_accuracy_mean",
        "final_accuracy_ci95",
        "final_loss_mean",
        "final_loss_ci95",
        "final_val_accuracy_mean",
        "final_val_accuracy_ci95",
        "bytes_up",
        "bytes_down",
        "epsilon",
    ]
    return keys + stats, out


def _mean(values: Iterable[Any]) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def tune(
    group_columns: Sequence[str], groups: Sequence[dict[str, Any]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Per configuration (all but the learning rate), the rate with the best mean validation
    accuracy and the test results at that rate; empty when runs share one rate."""
    lr_key = next((k for k in LR_KEYS if k in group_columns), None)
    rates = {str(g.get(lr_key)) for g in groups} if lr_key else set()
    if len(rates) < 2:
        return [], []
    stats = {c for c in group_columns if c.startswith("final_") or c in ("seeds", "bytes_up")}
    stats |= {"bytes_down", "epsilon"}
    ident = [c for c in group_columns if c not in stats and c not in LR_KEYS]
    by_config: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for g in groups:
        by_config[tuple(str(g.get(k)) for k in ident)].append(g)
    out = []
    for members in by_config.values():
        scored = [g for g in members if g.get("final_val_accuracy_mean") is not None]
        row = {k: members[0].get(k) for k in ident}
        row["rates_tried"] = ", ".join(sorted({str(g.get(lr_key)) for g in members}, key=float))
        if not scored:
            row["selected_lr"] = None
            row["note"] = "no validation split (set sim.validation_fraction): no rate selected"
            out.append(row)
            continue
        best = max(scored, key=lambda g: g["final_val_accuracy_mean"])
        row["selected_lr"] = best.get(lr_key)
        row["val_accuracy"] = best["final_val_accuracy_mean"]
        row["test_accuracy_mean"] = best["final_accuracy_mean"]
        row["test_accuracy_ci95"] = best["final_accuracy_ci95"]
        row["test_loss_mean"] = best["final_loss_mean"]
        row["seeds"] = best["seeds"]
        row["bytes_up"] = best["bytes_up"]
        row["bytes_down"] = best["bytes_down"]
        row["note"] = ""
        out.append(row)
    cols = ident + [
        "rates_tried",
        "selected_lr",
        "val_accuracy",
        "test_accuracy_mean",
        "test_accuracy_ci95",
        "test_loss_mean",
        "seeds",
        "bytes_up",
        "bytes_down",
        "note",
    ]
    return cols, out


# ----------------------------------------------------------------------------- writing


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"
    return str(value)


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in rows:
            w.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    os.replace(tmp, path)


def markdown(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(row.get(c)).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, title: str, columns, rows) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"# {title}\n\n" + markdown(columns, rows), encoding="utf-8")
    os.replace(tmp, path)


def print_table(columns: Sequence[str], rows: Sequence[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for row in rows:
        t.add_row(*(_cell(row.get(c)) for c in columns))
    Console(width=max(120, min(400, 14 * len(columns)))).print(t)


# ----------------------------------------------------------------------------- plots


def varying(rows: Sequence[dict[str, Any]], keys: Iterable[str]) -> list[str]:
    """The ``keys`` whose values differ between ``rows``: what tells configurations apart."""
    return [k for k in keys if len({str(r.get(k, "")) for r in rows}) > 1]


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [c for c in columns if c not in COLUMNS]
    candidates = [k for k, _ in _identity({}, swept, (*SEED_KEYS, "strategy"))]
    by_strategy: dict[str, dict[tuple, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if any(acc is not None for _, acc in run.curve):
            row = {**run.row, **run.overrides}
            key = _identity(row, swept, (*SEED_KEYS, "strategy"))
            by_strategy[str(run.row.get("strategy"))][key].append(run)
    if not by_strategy:
        return False
    names = sorted(by_strategy)
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False, sharey=True
    )
    for ax, name in zip(axes.flat, names):
        label_keys = varying([dict(key) for key in by_strategy[name]], candidates)
        for key, members in sorted(by_strategy[name].items()):
            rounds = sorted({r for m in members for r, acc in m.curve if acc is not None})
            means, lows, highs = [], [], []
            for r in rounds:
                mean, half, _ = mean_ci(dict(m.curve).get(r) for m in members)
                half = half or 0.0  # accuracy is in [0, 1]: so is its band
                means.append(mean)
                lows.append(max(mean - half, 0.0))
                highs.append(min(mean + half, 1.0))
            label = _label(dict(key), label_keys) or name
            if len(members) > 1:
                label += f" ({len(members)} seeds)"
            (line,) = ax.plot(rounds, means, marker="o", markersize=3, label=label)
            if len(members) > 1:
                ax.fill_between(rounds, lows, highs, color=line.get_color(), alpha=0.2)
        ax.set_title(f"strategy: {name}")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (global model)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.18), frameon=False)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("Test accuracy of the global model after each round (mean over seeds)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


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
    candidates = [k for k, _ in _identity({}, swept, (*SEED_KEYS, "strategy"))]
    strategies = sorted({str(g.get("strategy")) for g in points})
    colors = {s: f"C{i % 10}" for i, s in enumerate(strategies)}
    for s in strategies:
        mine = [g for g in points if str(g.get("strategy")) == s]
        label_keys = varying(mine, candidates)  # what tells this strategy's points apart
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
            color=colors[s],
            capsize=3,
            label=s,
        )
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
    if frontier:
        xy = [(g[x_key], g["final_accuracy_mean"]) for g in points]
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
    if log_x:
        import numpy as np
        from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(_bytes))
        ax.xaxis.set_minor_formatter(NullFormatter())
        xs = sorted({g[x_key] for g in points})
        if xs[-1] / xs[0] < 100:  # within two decades: tick the values themselves
            ticks = xs if len(xs) <= 6 else list(np.geomspace(xs[0], xs[-1], 6))
            ax.set_xticks(ticks, [_bytes(t) for t in ticks])
            ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final test accuracy (mean over seeds, 95% CI)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, title="strategy", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


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


# ----------------------------------------------------------------------------- command line


def report(paths: Sequence[Path], out: Path | None = None, plots: bool = True) -> dict[str, Any]:
    """Read the runs under ``paths`` and write the report files; returns what was written."""
    folders = find_runs(paths)
    if not folders:
        raise FileNotFoundError(
            f"no fedsim run folders (with {CONFIG_FILE} and {METRICS_FILE}) under "
            + ", ".join(map(str, paths))
        )
    runs = [read_run(f) for f in folders]
    root = Path(os.path.commonpath([p.resolve() for p in paths]))
    if root.is_file():
        root = root.parent
    out = Path(out) if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = table(runs, root)
    group_cols, groups = group_seeds(columns, rows)
    tuned_cols, tuned = tune(group_cols, groups)
    written = {"runs": len(rows), "files": []}
    write_csv(out / "report.csv", columns, rows)
    write_markdown(out / "report.md", "fedsim report: one row per run", columns, rows)
    write_csv(out / "groups.csv", group_cols, groups)
    write_markdown(out / "groups.md", "Runs grouped over seeds (mean, 95% CI)", group_cols, groups)
    written["files"] += ["report.csv", "report.md", "groups.csv", "groups.md"]
    if tuned:
        write_csv(out / "tuned.csv", tuned_cols, tuned)
        title = "Best learning rate per configuration (by validation accuracy), test results"
        write_markdown(out / "tuned.md", title, tuned_cols, tuned)
        written["files"] += ["tuned.csv", "tuned.md"]
    if plots:
        swept = [c for c in columns if c not in COLUMNS]
        if plot_curves(runs, columns, out / "accuracy_by_round.png"):
            written["files"].append("accuracy_by_round.png")
        if plot_pareto(groups, swept, out / "accuracy_vs_bytes.png"):
            written["files"].append("accuracy_vs_bytes.png")
        if plot_privacy(groups, swept, out / "accuracy_vs_epsilon.png"):
            written["files"].append("accuracy_vs_epsilon.png")
    written.update(columns=columns, rows=rows, group_columns=group_cols, groups=groups)
    written.update(tuned_columns=tuned_cols, tuned=tuned, out=out)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedsim-report",
        description="Tables and plots over fedsim run folders and sweep folders.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or folders holding runs")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write (default: beside the runs, in the folder the paths share)",
    )
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--quiet", action="store_true", help="do not print the tables")
    args = parser.parse_args(argv)
    try:
        done = report(args.paths, args.out, plots=not args.no_plots)
    except FileNotFoundError as e:
        print(f"fedsim-report: error: {e}", file=sys.stderr)
        sys.exit(2)
    if not args.quiet:
        rows = done["rows"]
        always = ["strategy", "status", "final_accuracy", "final_loss", "bytes_up", "bytes_down"]
        always += ["epsilon"] if any(r.get("epsilon") is not None for r in rows) else []
        always += ["wall_time_s", "run"]
        other = [c for c in done["columns"] if c not in always and c != "reason"]
        shown = varying(rows, other) + always
        same = [f"{c}={_cell(rows[0].get(c))}" for c in other if c not in shown]
        same = [x for x in same if not x.endswith("=")]
        title = f"{done['runs']} runs" + (f" (all with {', '.join(same)})" if same else "")
        print_table(list(dict.fromkeys(shown)), rows, title)
        if done["tuned"]:
            print_table(done["tuned_columns"], done["tuned"], "selected learning rates")
    failed = [r for r in done["rows"] if r["status"] != "ok"]
    for r in failed:
        print(f"{r['status']}: {r['run']}: {r['reason']}", file=sys.stderr)
    print(f"wrote {', '.join(done['files'])} to {done['out']}")


if __name__ == "__main__":
    main()
