""":func:`report`: read the runs, write the tables and the plots (``fedsim.report``'s docstring
lists what is written)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim.report.paired import baseline_of, differences
from fedsim.report.plots import plot_curves, plot_overlay, plot_time
from fedsim.report.runs import find_runs, read_run
from fedsim.report.scatter import plot_pareto, plot_privacy
from fedsim.report.tables import group_seeds, table, time_to_target
from fedsim.report.tuning import NO_VALIDATION, Tuning, tune
from fedsim.report.writing import write_csv, write_markdown
from fedsim.results import CONFIG_FILE, METRICS_FILE

TITLES = {
    "report": "fedsim report: one row per run",
    "groups": "Runs grouped over seeds (mean, 95% CI; min and max of the seeds)",
    "tuned": "Best learning rate per configuration (by validation accuracy), test results",
    "paired": "Final test accuracy minus the baseline's, paired by seed (mean, 95% t interval)",
    "time_to_target": "Simulated time to each target accuracy (mean over the seeds that "
    "reached it)",
}


def report(
    paths: Sequence[Path],
    out: Path | None = None,
    plots: bool = True,
    all_rates: bool = False,
    baseline: str | None = None,
) -> dict[str, Any]:
    """Read the runs under ``paths`` and write the report files; returns what was written
    (``files``, the tables' columns and rows, ``warnings``: one line each)."""
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
    tuning = tune(group_cols, groups)
    name, warned = baseline_of(tuning.chosen, baseline)
    paired_cols, paired = differences(tuning.chosen, name, tuning.lr_key)
    timed_cols, timed = time_to_target(columns, rows)
    done: dict[str, Any] = {"runs": len(rows), "files": [], "out": out}
    done["warnings"] = tuning.warnings + ([warned] if warned else [])
    tables = {
        "report": (columns, rows),
        "groups": (group_cols, groups),
        "tuned": (tuning.columns, tuning.rows),
        "paired": (paired_cols, paired),
        "time_to_target": (timed_cols, timed),
    }
    for stem, (cols, items) in tables.items():
        if items or stem in ("report", "groups"):
            write_csv(out / f"{stem}.csv", cols, items)
            write_markdown(out / f"{stem}.md", TITLES[stem], cols, items)
            done["files"] += [f"{stem}.csv", f"{stem}.md"]
        key = "" if stem == "report" else f"{stem}_"
        done[f"{key}columns"], done[stem if stem != "report" else "rows"] = cols, items
    done["group_columns"] = group_cols
    done["baseline"] = name if paired else None
    if plots:
        drawn = list(groups) if all_rates else tuning.chosen
        done["files"] += _plots(drawn, out, _rates(tuning, all_rates))
    return done


def _rates(tuning: Tuning, all_rates: bool) -> str:
    """What the plots show of the rates, for their titles (nothing when runs share one)."""
    if tuning.lr_key is None:
        return ""
    if all_rates:
        return "every learning rate tried"
    unscored = [r for r in tuning.rows if r.get("note") == NO_VALIDATION]
    if len(unscored) == len(tuning.rows):
        return "every learning rate tried (no validation split to choose one)"
    if unscored:
        return "each at its rate chosen on validation (every rate where none held out)"
    return "each at its learning rate chosen on validation"


def _plots(groups: Sequence[dict[str, Any]], out: Path, rates: str) -> list[str]:
    written = []
    for name, draw in (
        ("accuracy_by_round.png", lambda p: plot_curves(groups, p, rates)),
        ("accuracy_by_round_overlay.png", lambda p: plot_overlay(groups, p, rates)),
        ("accuracy_vs_time.png", lambda p: plot_time(groups, p, rates)),
        ("accuracy_vs_bytes.png", lambda p: plot_pareto(groups, p, rates)),
        ("accuracy_vs_epsilon.png", lambda p: plot_privacy(groups, p, rates)),
    ):
        if draw(out / name):
            written.append(name)
    return written
