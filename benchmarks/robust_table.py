"""Every robust rule against every attack: the ``robust_vs_attacks`` sweep as two Markdown
tables (rule x attackers' share in rows, attacks in columns).

    python benchmarks/robust_table.py results/robust_vs_attacks        # any folders of runs

It reads every run folder under the paths (``summary.json``, ``config.yaml``,
``metrics.jsonl``), groups the finished runs by rule (with its ``f`` / ``beta``), attackers'
share and attack, and prints for each cell over the seeds:

- the final test accuracy of the global model, mean and half-width of the 95% interval
  (Student's t with n - 1 degrees of freedom, as ``fedsim-report``);
- the aggregation error (``docs/results.md``), averaged over the rounds of each run, then
  over the seeds: how far the rule's aggregate is from the mean of every reply the server
  took, the attackers' included. It is 0 for the plain mean (up to FedIT's inexactness of
  factor means) and large where a rule departs from a poisoned mean.

Runs without Byzantine clients (``faults=none``) fill a "no attack" column. ``fedsim-report``
gives the same accuracies one row per configuration; this script only pivots them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedsim.report.runs import find_runs  # noqa: E402
from fedsim.report.tables import mean_ci  # noqa: E402

RULES = ("none", "median", "trimmed_mean", "krum", "multikrum", "bulyan")
ATTACKS = ("sign_flip", "scaled", "gaussian", "alie", "label_flip")
NO_ATTACK = "no attack"


def read_cell(folder: Path) -> dict[str, Any] | None:
    """One finished run: its rule (with settings), attackers' share, attack, final accuracy
    and mean aggregation error; None for a failed or unfinished run."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("status") != "ok":
        return None
    cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    rule = summary.get("robust", "none")
    settings = {k: v for k, v in (cfg.get("robust") or {}).items() if k in ("f", "beta", "m")}
    settings = {k: v for k, v in settings.items() if v is not None}
    byz = summary.get("byzantine") or {}
    errors = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("round", 0) > 0 and row.get("aggregation_error") is not None:
            errors.append(float(row["aggregation_error"]))
    return {
        "rule": rule,
        "settings": settings,
        "fraction": float(byz["fraction"]) if byz else 0.0,
        "attack": byz.get("attack", NO_ATTACK) if byz else NO_ATTACK,
        "accuracy": summary.get("final_eval_accuracy"),
        "agg_error": sum(errors) / len(errors) if errors else None,
        "seed": summary.get("seed"),
    }


def label(rule: str, settings: dict[str, Any]) -> str:
    extra = ", ".join(f"{k} = {v}" for k, v in sorted(settings.items()))
    return f"`{rule}`" + (f" ({extra})" if extra else "")


def collect(paths: Sequence[Path]) -> dict[tuple, list[dict[str, Any]]]:
    """Finished runs grouped by (rule label, fraction, attack)."""
    cells: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for folder in find_runs(paths):
        cell = read_cell(folder)
        if cell is not None:
            key = (cell["rule"], label(cell["rule"], cell["settings"]), cell["fraction"])
            cells[(*key, cell["attack"])].append(cell)
    return cells


def _fmt(values: list[float | None], digits: int, ci: bool) -> str:
    mean, half, n = mean_ci(values)
    if mean is None:
        return ""
    text = f"{mean:.{digits}f}"
    if ci and half is not None:
        text += f" ± {half:.{digits}f}"
    return text


def tables(cells: dict[tuple, list[dict[str, Any]]]) -> str:
    """The two Markdown tables (accuracy, aggregation error)."""
    attacks = [a for a in ATTACKS if any(k[3] == a for k in cells)]
    plain = sorted({k[:2] for k in cells if k[3] == NO_ATTACK}, key=lambda k: RULES.index(k[0]))
    rows = sorted(
        {k[:3] for k in cells if k[3] != NO_ATTACK},
        key=lambda k: (k[2], RULES.index(k[0]) if k[0] in RULES else 99, k[1]),
    )
    seeds = sorted({len(v) for v in cells.values()})
    out = [f"Seeds per cell: {', '.join(map(str, seeds))}.", ""]
    for title, metric, digits, ci in (
        ("final test accuracy, mean ± 95% interval over seeds", "accuracy", 3, True),
        ("aggregation error, mean over rounds and seeds", "agg_error", 2, False),
    ):
        out += [f"**{title}**", ""]
        head = ["robust", "attackers", *[f"`{a}`" for a in attacks]]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for rule, name, fraction in rows:
            vals = [
                _fmt([c[metric] for c in cells.get((rule, name, fraction, a), [])], digits, ci)
                for a in attacks
            ]
            out.append(f"| {name} | {fraction:.0%} | " + " | ".join(vals) + " |")
        if plain:
            vals = []
            for rule, name in plain:
                runs = cells[(rule, name, 0.0, NO_ATTACK)]
                vals.append(f"{name}: {_fmt([c[metric] for c in runs], digits, ci)}")
            out += ["", "Without attackers (`faults=none`): " + "; ".join(vals) + "."]
        out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="folders holding run folders")
    args = parser.parse_args(argv)
    cells = collect(args.paths)
    if not cells:
        sys.exit("no finished runs under " + " ".join(map(str, args.paths)))
    print(tables(cells))


if __name__ == "__main__":
    main()
