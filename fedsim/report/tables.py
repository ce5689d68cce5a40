"""The report's tables: one row per run, runs grouped over seeds (mean and 95% interval),
the learning rate selected on the validation split, the simulated time to each target accuracy;
and writing them as CSV, Markdown and a printed table."""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fedsim.report.runs import Run

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

#: the columns of ``report.csv`` after the swept overrides, in order (``sim_time_s`` only when
#: a run has a simulated clock; ``system`` then comes first, as a swept override would)
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
    "sim_time_s",
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
#: the columns a simulated clock adds (``system``: the profile's name, an identity key)
CLOCK_COLUMNS = ("system", "sim_time_s")
#: the columns of ``time_to_target.csv`` after the configuration's
TARGET_STATS = ["target", "seeds", "reached", "time_s_mean", "time_s_ci95", "time"]


def swept_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys whose values differ between runs (all of them for a single run)."""
    keys: dict[str, set[str]] = defaultdict(set)
    for run in runs:
        for k in run.overrides:
            keys[k]
    for run in runs:  # a run without the override ran at its configuration's value
        for k in keys:
            keys[k].add(run.setting(k))
    if len(runs) == 1:
        return sorted(keys)
    return sorted(k for k, values in keys.items() if len(values) > 1)


def table(runs: Sequence[Run], root: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The report's columns and one row per run (``system`` and ``sim_time_s`` only when a run
    has a simulated clock)."""
    swept = swept_keys(runs)
    rows = []
    for run in runs:
        row = {k: run.setting(k) for k in swept}
        row.update(run.row)
        row["run"] = _relative(run.path, root)
        row["time_to_accuracy"] = run.time_to_accuracy  # not a column: time_to_target's
        rows.append(row)
    clock = any(run.row.get("sim_time_s") is not None for run in runs)
    known = [c for c in COLUMNS if clock or c not in CLOCK_COLUMNS]
    known = [c for c in known if c not in swept and ALIASES.get(c) not in swept]
    return swept + (["system"] if clock and "system" not in swept else []) + known, rows


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


def varying(rows: Sequence[dict[str, Any]], keys: Iterable[str]) -> list[str]:
    """The ``keys`` whose values differ between ``rows``: what tells configurations apart."""
    return [k for k in keys if len({str(r.get(k, "")) for r in rows}) > 1]


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
        if "sim_time_s" in columns:
            g["sim_time_s"] = _mean(m["sim_time_s"] for m in members)
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
    return keys + stats + [c for c in ("sim_time_s",) if c in columns], out


def _rate(text: str) -> tuple[float, str]:
    """Learning rates in numeric order (a value that is not a number last, by its text)."""
    try:
        return float(text), ""
    except ValueError:
        return float("inf"), text


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
    stats |= {"bytes_down", "epsilon", "sim_time_s"}
    ident = [c for c in group_columns if c not in stats and c not in LR_KEYS]
    by_config: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for g in groups:
        by_config[tuple(str(g.get(k)) for k in ident)].append(g)
    out = []
    for members in by_config.values():
        scored = [g for g in members if g.get("final_val_accuracy_mean") is not None]
        row = {k: members[0].get(k) for k in ident}
        row["rates_tried"] = ", ".join(sorted({str(g.get(lr_key)) for g in members}, key=_rate))
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


def time_to_target(
    columns: Sequence[str], rows: Sequence[dict[str, Any]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Per configuration (finished runs grouped over seeds, as :func:`group_seeds`) and per
    target accuracy in the runs' ``time_to_accuracy``: how many seeds reached it and the mean
    simulated seconds over those that did (none when none did: never a made-up number)."""
    swept = [c for c in columns if c not in COLUMNS]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["status"] == "ok" and row.get("time_to_accuracy"):
            groups[_identity(row, swept, SEED_KEYS)].append(row)
    out = []
    for key, members in groups.items():
        targets = {t for m in members for t in m["time_to_accuracy"]}
        for target in sorted(targets, key=float):
            tracked = [m["time_to_accuracy"] for m in members if target in m["time_to_accuracy"]]
            times = [t[target] for t in tracked]  # None: not reached
            mean, half, reached = mean_ci(times)
            seeds = len(times)
            out.append(
                {
                    **dict(key),
                    "target": target,
                    "seeds": seeds,
                    "reached": reached,
                    "time_s_mean": mean,
                    "time_s_ci95": half,
                    "time": _reached(mean, reached, seeds),
                }
            )
    keys = [k for k, _ in next(iter(groups))] if groups else []
    return keys + TARGET_STATS, out


def _reached(mean: float | None, reached: int, seeds: int) -> str:
    if mean is None:
        return "not reached" + (f" (0 of {seeds} seeds)" if seeds > 1 else "")
    if reached == seeds:
        return human_time(mean)
    mean_of = f" (the mean of those {reached})" if reached > 1 else ""
    return f"{human_time(mean)}: reached by {reached} of {seeds} seeds{mean_of}"


def human_time(seconds: float) -> str:
    """Simulated seconds, readable to three significant digits: 2.5 ms, 42.1 s, 12.6 min,
    3.2 h, 2.1 d."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0), ("s", 1.0)):
        if abs(seconds) >= size:
            return f"{seconds / size:.3g} {unit}"
    return "0 s" if seconds == 0 else f"{seconds * 1000:.3g} ms"


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
