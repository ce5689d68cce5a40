"""The ``fedsim-report`` command: writes the report, prints its tables (at most about 120
characters wide: short headers, bytes in human units, the values every row shares on the
title line), the warnings and the failed runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim.report.make import report
from fedsim.report.tables import TARGET_STATS, varying
from fedsim.report.writing import cell, print_table

#: above this many runs the terminal shows the groups over seeds instead of every run
MAX_ROWS = 40
#: columns left off the terminal (they stay in the files)
HIDDEN = {
    "reason",
    "final_val_loss",
    "final_loss_ci95",
    "final_accuracy_min",
    "final_accuracy_max",
    "final_val_accuracy_ci95",
    "ci95_low",
    "ci95_high",
    "ci95_half",
    "test_loss_mean",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedsim-report",
        description="Tables and plots over fedsim run folders and sweep folders.",
    )
    p.add_argument("paths", nargs="+", type=Path, help="run folders or folders holding runs")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write (default: beside the runs, in the folder the paths share)",
    )
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--quiet", action="store_true", help="do not print the tables")
    p.add_argument(
        "--all-rates",
        action="store_true",
        help="plot every learning rate tried (default: each configuration at its rate "
        "chosen on validation accuracy)",
    )
    p.add_argument(
        "--baseline",
        metavar="NAME",
        default=None,
        help="the strategy paired.csv subtracts (default: fedavg when present, else the "
        "first by name)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        done = report(
            args.paths,
            args.out,
            plots=not args.no_plots,
            all_rates=args.all_rates,
            baseline=args.baseline,
        )
    except FileNotFoundError as e:
        print(f"fedsim-report: error: {e}", file=sys.stderr)
        sys.exit(2)
    if not args.quiet:
        show(done)
    for line in done["warnings"]:
        print(line, file=sys.stderr)
    for r in done["rows"]:
        if r["status"] != "ok":
            print(f"{r['status']}: {r['run']}: {r['reason']}", file=sys.stderr)
    print(f"wrote {', '.join(done['files'])} to {done['out']}")


def _terminal(columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c not in HIDDEN]


def show(done: dict[str, Any]) -> None:
    """Print the report's tables."""
    rows, groups = done["rows"], done["groups"]
    if len(rows) <= MAX_ROWS or not groups:
        print_table(
            _terminal(done["columns"]), rows, f"{len(rows)} run" + ("s" if len(rows) != 1 else "")
        )
    else:
        title = f"{len(rows)} runs in {len(groups)} configurations (every run: report.md)"
        print_table(_terminal(done["group_columns"]), groups, title)
    if done["tuned"]:
        print_table(_terminal(done["tuned_columns"]), done["tuned"], "selected learning rates")
    if done["paired"]:
        for row in done["paired"]:
            low, high = row["ci95_low"], row["ci95_high"]
            row["95% CI"] = (
                "" if low is None else f"[{cell(low, 'ci95_low')}, {cell(high, 'ci95_high')}]"
            )
        title = f"paired by seed: final accuracy minus {done['baseline']}'s"
        print_table([*_terminal(done["paired_columns"]), "95% CI"], done["paired"], title)
    if done["time_to_target"]:
        timed = [c for c in done["time_to_target_columns"] if c not in TARGET_STATS]
        timed = varying(done["time_to_target"], timed)
        timed += ["target", "seeds", "reached", "time"]
        print_table(timed, done["time_to_target"], "simulated time to target accuracy")
