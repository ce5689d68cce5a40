"""Writing the report's tables: CSV (every column, plain numbers: bytes as integers), Markdown
and the terminal. Markdown and the terminal fold the columns that hold one value in every row
into a line above the table; bytes read ``799,920`` in Markdown and ``799.9 kB`` on the
terminal (:func:`fedsim.progress.human_bytes`, as the plots' axes)."""

from __future__ import annotations

import csv
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim.progress import human_bytes
from fedsim.report.tables import AGGREGATOR, human_time, short

#: the terminal's headers for the long column names (others: as named, less ``sim.``)
SHORT = {
    "final_accuracy": "acc",
    "final_val_accuracy": "val acc",
    "final_loss": "loss",
    "final_val_loss": "val loss",
    "final_accuracy_mean": "acc",
    "final_accuracy_ci95": "±95%",
    "final_accuracy_min": "acc min",
    "final_accuracy_max": "acc max",
    "final_val_accuracy_mean": "val acc",
    "final_loss_mean": "loss",
    "test_accuracy_mean": "test acc",
    "test_accuracy_ci95": "±95%",
    "val_accuracy": "val acc",
    "test_loss_mean": "loss",
    "bytes_up": "up",
    "bytes_down": "down",
    "bytes_total": "bytes",
    "wall_time_s": "wall s",
    "sim_time_s": "sim time",
    "aggregation_error_max": "agg err",
    "rounds_completed": "done",
    "clients_per_round": "k",
    "num_clients": "N",
    "mean_difference": "mean diff",
    "rates_tried": "rates",
    "selected_lr": "chosen lr",
}
#: differences, shown with their sign
SIGNED = ("mean_difference", "ci95_low", "ci95_high")
#: the terminal's width, when the table fits
WIDTH = 120


def is_bytes(column: str) -> bool:
    return column.startswith("bytes_")


def cell(value: Any, column: str = "", style: str = "md") -> str:
    """A value as Markdown (``style='md'``) or the terminal (``'term'``) shows it: bytes as
    integers with thousands separators or in human units, other numbers to 4 significant
    digits (large ones whole, with separators), nothing for a missing or non-finite one."""
    if value is None or isinstance(value, bool):
        return "" if value is None else str(value).lower()
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            return ""
        if is_bytes(column):
            return human_bytes(value) if style == "term" else f"{round(value):,}"
        if column == "sim_time_s" and style == "term":
            return human_time(float(value))
        if isinstance(value, int) or abs(value) >= 1e5:
            return f"{value:,.0f}" if abs(value) >= 1e4 else str(value)
        if column.startswith("aggregation_error") and style == "term":
            return f"{value:.2g}"
        if column in SIGNED:
            return f"{value:+.4f}"
        return f"{value:.4g}"
    return str(value)


def fold(
    columns: Sequence[str], rows: Sequence[dict[str, Any]], style: str = "md", keep=("run",)
) -> tuple[list[str], list[str]]:
    """The columns to show and the ``key=value`` of those that hold one value in every row
    (empty columns are left out without a word, ``keep`` always shown). A table of one row
    folds only its settings (values that are not numbers), never its measurements."""
    if not rows:
        return list(columns), []
    shown, same = [], []
    for c in columns:
        values = {cell(r.get(c), c, style) for r in rows}
        number = any(isinstance(r.get(c), (int, float)) for r in rows)
        if len(values) > 1 or c in keep or (len(rows) == 1 and number):
            shown.append(c)
        elif values != {""}:
            same.append(f"{header(c) if style == 'term' else c}={values.pop()}")
    return shown, same


def header(column: str) -> str:
    """A column's terminal header."""
    if column.startswith(AGGREGATOR):
        return "aggr." + column[len(AGGREGATOR) :]
    return SHORT.get(column, short(column))


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in rows:
            w.writerow([_plain(row.get(c), c) for c in columns])
    os.replace(tmp, path)


def _plain(value: Any, column: str) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if is_bytes(column) and isinstance(value, (int, float)):
        return round(value)
    return value


def markdown(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [cell(row.get(c), c).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, title: str, columns, rows) -> None:
    """``# title``, the line of the values every row shares, and the table of the others."""
    shown, same = fold(columns, rows)
    text = f"# {title}\n\n" + (f"In every row: {', '.join(same)}.\n\n" if same else "")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + markdown(shown, rows), encoding="utf-8")
    os.replace(tmp, path)


#: the terminal leaves these off first when a table would be wider than :data:`WIDTH`
DROP_FIRST = (
    "wall_time_s",
    "final_loss",
    "final_loss_mean",
    "test_loss_mean",
    "rounds_completed",
    "adapter",
    "final_val_accuracy",
    "rates_tried",
    "bytes_down",
)


def terminal_width() -> int:
    """:data:`WIDTH`, or the terminal's width (``COLUMNS`` when set) where that is wider."""
    return max(WIDTH, shutil.get_terminal_size((WIDTH, 24)).columns)


def fit(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The columns that fit :func:`terminal_width` (each as wide as its widest cell or
    header, plus 2) and those left off, in the order of :data:`DROP_FIRST`."""
    width = {c: 2 + max([len(header(c))] + [len(cell(r.get(c), c, "term")) for r in rows])
             for c in columns}  # fmt: skip
    shown, dropped, room = list(columns), [], terminal_width()
    for c in DROP_FIRST:
        if sum(width[k] for k in shown) <= room:
            break
        if c in shown:
            shown.remove(c)
            dropped.append(c)
    return shown, dropped


def print_table(columns: Sequence[str], rows: Sequence[dict[str, Any]], title: str) -> None:
    """The title, the values every row shares on one line, and the other columns, with short
    headers, bytes in human units, at most :func:`terminal_width` wide when leaving off the
    columns of :data:`DROP_FIRST` is enough (the line under the table names them)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    shown, same = fold(columns, rows, style="term")
    shown, dropped = fit(shown, rows)
    console = Console(width=terminal_width(), highlight=False, soft_wrap=False)
    console.print(f"{title}" + (f" (all with {', '.join(same)})" if same else ""), markup=False)
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    for c in shown:
        numeric = any(isinstance(r.get(c), (int, float)) for r in rows)
        t.add_column(header(c), overflow="fold", justify="right" if numeric else "left")
    for row in rows:
        t.add_row(*(cell(row.get(c), c, "term") for c in shown))
    console.print(t)
    if dropped:
        names = ", ".join(header(c) for c in dropped)
        console.print(f"(left off to fit: {names}; every column is in the .md and .csv files)")
