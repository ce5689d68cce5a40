"""``fedsim-report PATH...``: tables, seed statistics, rates chosen on validation, plots.

Reads every run folder under the given paths (run folders and Hydra sweep folders, any
nesting, mixed overrides: a run folder holds fedsim's ``config.yaml``), and writes beside them
(or to ``--out``). Runs of different tasks are never averaged together nor put on one Pareto
frontier; failed and incomplete runs are listed in ``report.csv`` and left out of the rest.

* ``report.csv`` / ``report.md``: a row per run: the swept overrides, task, strategy, adapter,
  compressor, privacy, learning rate, seed, final accuracy and loss (test, and validation when
  the run held one out), total bytes up and down, epsilon, ``aggregation_error_max`` (when
  measured) and a plug-in aggregator's ``aggregator_*`` metrics (their last logged values),
  wall time, status (``ok``, ``failed`` with the reason, ``incomplete`` when a run has no
  summary: killed or still running);
* ``groups.csv`` / ``groups.md``: finished runs that differ only in ``sim.seed`` grouped, with
  the mean and a 95% confidence interval (Student's t) of the final accuracy and loss, the
  seeds' lowest and highest accuracy, mean bytes and ``aggregator_*`` metrics, and the largest
  ``aggregation_error_max``;
* ``tuned.csv`` / ``tuned.md`` (when runs differ in ``sim.lr``): for each configuration, the
  learning rate with the best mean **validation** accuracy, and the **test** results at that
  rate (``sim.validation_fraction`` holds a validation split out of the test set); a warning
  line (and the row's note) when the chosen rate is the smallest or largest tried, and one
  for the configurations without a validation split (no rate chosen for them);
* ``paired.csv`` / ``paired.md`` (when two strategies share seeds): per setting, each
  strategy's final test accuracy minus the baseline's (``--baseline``, default ``fedavg`` when
  present, else the first by name) seed by seed, each at its chosen rate, with the mean
  difference, its 95% t interval (n >= 2) and n;
* ``time_to_target.csv`` / ``time_to_target.md`` (when runs have a simulated clock with target
  accuracies, ``system.targets``): per configuration and target, how many seeds reached it and
  the mean simulated seconds over those that did;
* PNG plots (matplotlib, headless), by default of each configuration at its rate chosen on
  validation (``--all-rates``: every rate): ``accuracy_by_round.png`` (a panel per strategy, a
  line per configuration), ``accuracy_by_round_overlay.png`` (all strategies on shared axes, a
  panel per task), ``accuracy_vs_time.png`` (runs with a clock), ``accuracy_vs_bytes.png``
  (against total bytes with the Pareto frontier, and the strategies side by side, a row per
  task), ``accuracy_vs_epsilon.png`` (runs with differential privacy).

Markdown and the terminal fold the columns that hold one value in every row into the line
above the table; bytes read ``799,920`` in Markdown, ``799.9 kB`` on the terminal and on the
plots' axes, ``799920`` in CSV. With a simulated clock (``system=mobile`` ...),
``report.csv`` gains the columns ``system`` (the profile's name, which then tells
configurations apart as a swept override does) and ``sim_time_s``, and ``groups.csv`` the mean
``sim_time_s``.
"""

from __future__ import annotations

from fedsim.report.cli import main
from fedsim.report.make import report
from fedsim.report.paired import baseline_of, differences
from fedsim.report.plots import plot_curves, plot_overlay, plot_time
from fedsim.report.runs import Run, find_runs, read_run
from fedsim.report.scatter import pareto_front, plot_pareto, plot_privacy
from fedsim.report.stats import band, mean_ci, paired, t_quantile
from fedsim.report.tables import (
    ALIASES,
    CLOCK_COLUMNS,
    COLUMNS,
    IDENTITY,
    LR_KEYS,
    SEED_KEYS,
    TARGET_STATS,
    group_seeds,
    swept_keys,
    table,
    time_to_target,
    varying,
)
from fedsim.report.tuning import Tuning, tune
from fedsim.report.writing import fold, markdown, print_table, write_csv, write_markdown

__all__ = [
    "ALIASES",
    "CLOCK_COLUMNS",
    "COLUMNS",
    "IDENTITY",
    "LR_KEYS",
    "SEED_KEYS",
    "TARGET_STATS",
    "Run",
    "Tuning",
    "band",
    "baseline_of",
    "differences",
    "find_runs",
    "fold",
    "group_seeds",
    "main",
    "markdown",
    "mean_ci",
    "paired",
    "pareto_front",
    "plot_curves",
    "plot_overlay",
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
