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
* ``time_to_target.csv`` / ``time_to_target.md`` (when runs have a simulated clock with target
  accuracies, ``system.targets``): per configuration and target, how many seeds reached it and
  the mean simulated seconds over those that did;
* PNG plots (matplotlib, headless): test accuracy against round per configuration, one panel
  per strategy, and against simulated time for the runs with a clock; final accuracy against
  total bytes (log scale) with the Pareto frontier marked; accuracy against epsilon when runs
  with differential privacy exist.

With a simulated clock (``system=mobile`` ...), ``report.csv`` gains the columns ``system`` (the
profile's name, which then tells configurations apart as a swept override does) and
``sim_time_s``, and ``groups.csv`` the mean ``sim_time_s``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim.report.plots import pareto_front, plot_curves, plot_pareto, plot_privacy, plot_time
from fedsim.report.runs import Run, find_runs, read_run
from fedsim.report.tables import (
    ALIASES,
    CLOCK_COLUMNS,
    COLUMNS,
    IDENTITY,
    LR_KEYS,
    SEED_KEYS,
    TARGET_STATS,
    _cell,
    group_seeds,
    markdown,
    mean_ci,
    print_table,
    swept_keys,
    t_quantile,
    table,
    time_to_target,
    tune,
    varying,
    write_csv,
    write_markdown,
)
from fedsim.results import CONFIG_FILE, METRICS_FILE

__all__ = [
    "ALIASES",
    "CLOCK_COLUMNS",
    "COLUMNS",
    "IDENTITY",
    "LR_KEYS",
    "SEED_KEYS",
    "TARGET_STATS",
    "Run",
    "find_runs",
    "group_seeds",
    "main",
    "markdown",
    "mean_ci",
    "pareto_front",
    "plot_curves",
    "plot_pareto",
    "plot_privacy",
    "plot_time",
    "print_table",
    "read_run",
    "report",
    "swept_keys",
    "t_quantile",
    "table",
    "time_to_target",
    "tune",
    "varying",
    "write_csv",
    "write_markdown",
]


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
    timed_cols, timed = time_to_target(columns, rows)
    if timed:
        write_csv(out / "time_to_target.csv", timed_cols, timed)
        title = "Simulated time to each target accuracy (mean over the seeds that reached it)"
        write_markdown(out / "time_to_target.md", title, timed_cols, timed)
        written["files"] += ["time_to_target.csv", "time_to_target.md"]
    if plots:
        swept = [c for c in columns if c not in COLUMNS]
        if plot_curves(runs, columns, out / "accuracy_by_round.png"):
            written["files"].append("accuracy_by_round.png")
        if plot_time(runs, columns, out / "accuracy_vs_time.png"):
            written["files"].append("accuracy_vs_time.png")
        if plot_pareto(groups, swept, out / "accuracy_vs_bytes.png"):
            written["files"].append("accuracy_vs_bytes.png")
        if plot_privacy(groups, swept, out / "accuracy_vs_epsilon.png"):
            written["files"].append("accuracy_vs_epsilon.png")
    written.update(columns=columns, rows=rows, group_columns=group_cols, groups=groups)
    written.update(tuned_columns=tuned_cols, tuned=tuned, out=out)
    written.update(time_to_target_columns=timed_cols, time_to_target=timed)
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
        always += ["sim_time_s"] if "sim_time_s" in done["columns"] else []
        always += ["wall_time_s", "run"]
        other = [c for c in done["columns"] if c not in always and c != "reason"]
        shown = varying(rows, other) + always
        same = [f"{c}={_cell(rows[0].get(c))}" for c in other if c not in shown]
        same = [x for x in same if not x.endswith("=")]
        title = f"{done['runs']} runs" + (f" (all with {', '.join(same)})" if same else "")
        print_table(list(dict.fromkeys(shown)), rows, title)
        if done["tuned"]:
            print_table(done["tuned_columns"], done["tuned"], "selected learning rates")
        if done["time_to_target"]:
            timed = [c for c in done["time_to_target_columns"] if c not in TARGET_STATS]
            timed = varying(done["time_to_target"], timed)
            timed += ["target", "seeds", "reached", "time"]
            print_table(timed, done["time_to_target"], "simulated time to target accuracy")
    failed = [r for r in done["rows"] if r["status"] != "ok"]
    for r in failed:
        print(f"{r['status']}: {r['run']}: {r['reason']}", file=sys.stderr)
    print(f"wrote {', '.join(done['files'])} to {done['out']}")
