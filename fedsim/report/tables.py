"""The report's tables: one row per run, runs grouped over seeds (mean and 95% interval), and
the simulated time to each target accuracy. (The learning rate chosen on the validation split:
:mod:`fedsim.report.tuning`; differences paired by seed: :mod:`fedsim.report.paired`; writing:
:mod:`fedsim.report.writing`.)"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fedsim.report.runs import Run
from fedsim.report.stats import mean, mean_ci

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
    "aggregation_error_max",
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
#: plug-in aggregators' metrics (``metrics.jsonl``): columns after ``aggregation_error_max``
AGGREGATOR = "aggregator_"
#: columns present only when some run has a value
OPTIONAL = ("aggregation_error_max",)


def swept_of(columns: Sequence[str]) -> list[str]:
    """The swept overrides among a table's ``columns`` (those before the known columns)."""
    return [c for c in columns if c not in COLUMNS and not c.startswith(AGGREGATOR)]


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
        row["_run"] = run  # not a column: the plots'
        rows.append(row)
    clock = any(run.row.get("sim_time_s") is not None for run in runs)
    known = [c for c in COLUMNS if clock or c not in CLOCK_COLUMNS]
    known = [c for c in known if c not in swept and ALIASES.get(c) not in swept]
    known = [c for c in known if c not in OPTIONAL or any(r.get(c) is not None for r in rows)]
    plugin = sorted({k for r in rows for k in r if k.startswith(AGGREGATOR)})
    at = known.index("epsilon") + 1 + ("aggregation_error_max" in known)
    known[at:at] = plugin
    return swept + (["system"] if clock and "system" not in swept else []) + known, rows


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve())) or "."
    except ValueError:
        return str(path)


def _identity(row: dict[str, Any], swept: Sequence[str], leave_out: Sequence[str]) -> tuple:
    keys = [k for k in swept if k not in leave_out]
    keys += [k for k in IDENTITY if k not in leave_out and ALIASES.get(k) not in swept]
    return tuple((k, str(row.get(k, ""))) for k in keys)


def varying(rows: Sequence[dict[str, Any]], keys: Iterable[str]) -> list[str]:
    """The ``keys`` whose values differ between ``rows``: what tells configurations apart."""
    return [k for k in keys if len({str(r.get(k, "")) for r in rows}) > 1]


def bound(rows: Sequence[dict[str, Any]], keys: Iterable[str], by: str = "strategy") -> list[str]:
    """The ``keys`` whose value follows from ``by``'s (each strategy one value, the strategies
    not all the same: ``adapter`` when only ``strategy`` was swept): they say nothing the
    strategy's name does not, and go with it. Never the learning rate: a rate chosen per
    strategy is worth showing."""
    out = []
    for k in keys:
        if k == by or k in LR_KEYS:
            continue
        values: dict[str, set[str]] = defaultdict(set)
        for r in rows:
            values[str(r.get(by))].add(str(r.get(k, "")))
        if all(len(v) == 1 for v in values.values()) and len(set().union(*values.values())) > 1:
            out.append(k)
    return out


def group_seeds(
    columns: Sequence[str], rows: Sequence[dict[str, Any]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Finished runs that differ only in the seed, with means and 95% intervals (and, not
    columns, ``_key``: the identity, ``_rows``: the runs' rows)."""
    swept = swept_of(columns)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["status"] == "ok":
            groups[_identity(row, swept, SEED_KEYS)].append(row)
    extra = [c for c in columns if c.startswith(AGGREGATOR) or c in OPTIONAL]
    extra += [c for c in ("sim_time_s",) if c in columns]
    out = []
    for key, members in groups.items():
        g: dict[str, Any] = {**dict(key), "_key": key, "_rows": members}
        for metric in ("final_accuracy", "final_loss", "final_val_accuracy", "final_val_loss"):
            g[f"{metric}_mean"], g[f"{metric}_ci95"], _ = mean_ci(m[metric] for m in members)
        accuracies = [m["final_accuracy"] for m in members if m["final_accuracy"] is not None]
        g["final_accuracy_min"] = min(accuracies, default=None)
        g["final_accuracy_max"] = max(accuracies, default=None)
        g["seeds"] = len(members)
        for c in ("bytes_up", "bytes_down", "epsilon", *extra):
            values = [m.get(c) for m in members]
            g[c] = max(_numbers(values), default=None) if c in OPTIONAL else mean(values)
        out.append(g)
    keys = [k for k, _ in next(iter(groups))] if groups else []
    return keys + GROUP_STATS + extra, out


#: the columns of ``groups.csv`` after the configuration's (then ``aggregation_error_max``,
#: the largest over the seeds, the means of ``aggregator_*`` metrics, and ``sim_time_s``)
GROUP_STATS = [
    "seeds",
    "final_accuracy_mean",
    "final_accuracy_ci95",
    "final_accuracy_min",
    "final_accuracy_max",
    "final_loss_mean",
    "final_loss_ci95",
    "final_val_accuracy_mean",
    "final_val_accuracy_ci95",
    "bytes_up",
    "bytes_down",
    "epsilon",
]


def _numbers(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float))]


def time_to_target(
    columns: Sequence[str], rows: Sequence[dict[str, Any]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Per configuration (finished runs grouped over seeds, as :func:`group_seeds`) and per
    target accuracy in the runs' ``time_to_accuracy``: how many seeds reached it and the mean
    simulated seconds over those that did (none when none did: never a made-up number)."""
    swept = swept_of(columns)
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
            average, half, reached = mean_ci(times)
            seeds = len(times)
            out.append(
                {
                    **dict(key),
                    "target": target,
                    "seeds": seeds,
                    "reached": reached,
                    "time_s_mean": average,
                    "time_s_ci95": half,
                    "time": _reached(average, reached, seeds),
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


#: the config groups whose name labels and terminal headers leave off (``sim.lr``: ``lr``)
SHORTENED = ("sim.", "task.", "adapter.")


def short(key: str) -> str:
    """``key`` less its group when that is one of :data:`SHORTENED`."""
    return key.split(".", 1)[1] if key.startswith(SHORTENED) else key


def human_time(seconds: float) -> str:
    """Simulated seconds, readable to three significant digits: 2.5 ms, 42.1 s, 12.6 min,
    3.2 h, 2.1 d."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0), ("s", 1.0)):
        if abs(seconds) >= size:
            return f"{seconds / size:.3g} {unit}"
    return "0 s" if seconds == 0 else f"{seconds * 1000:.3g} ms"
