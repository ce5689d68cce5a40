"""benchmarks/robust_table.py: the robust_vs_attacks sweep pivoted into rule x attack tables,
checked on hand-made run folders against numbers computed here."""

from __future__ import annotations

import json
import math

import yaml

from benchmarks.robust_table import collect, tables


def _run(folder, rule, settings, attack, fraction, seed, accuracy, errors, status="ok"):
    folder.mkdir(parents=True)
    byz = {"attack": attack, "fraction": fraction, "attackers": [1]} if attack else None
    summary = {"status": status, "robust": rule, "seed": seed, "final_eval_accuracy": accuracy}
    if byz:
        summary["byzantine"] = byz
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(yaml.safe_dump({"robust": {"_target_": "x", **settings}}))
    lines = [{"round": 0, "eval_accuracy": 0.1}]
    lines += [{"round": i + 1, "aggregation_error": e} for i, e in enumerate(errors)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_cells_hold_the_mean_interval_and_mean_error_over_seeds(tmp_path):
    accs, errs = [0.5, 0.6, 0.7], [[1.0, 3.0], [2.0, 2.0], [0.0, 6.0]]
    for seed, (a, e) in enumerate(zip(accs, errs)):
        _run(tmp_path / f"k{seed}", "krum", {"f": 6}, "alie", 0.3, seed, a, e)
    _run(tmp_path / "m0", "median", {}, "alie", 0.3, 0, 0.4, [0.5])
    _run(tmp_path / "bad", "median", {}, "alie", 0.3, 1, 0.9, [9.0], status="failed")
    _run(tmp_path / "clean", "none", {}, None, None, 0, 0.8, [0.25])
    cells = collect([tmp_path])
    assert len(cells[("krum", "`krum` (f = 6)", 0.3, "alie")]) == 3
    assert len(cells[("median", "`median`", 0.3, "alie")]) == 1  # the failed run left out
    text = tables(cells)
    # mean 0.6, sd 0.1, t(0.975, 2) = 4.302652729911275
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert f"| `krum` (f = 6) | 30% | 0.600 ± {half:.3f} |" in text
    assert "| `median` | 30% | 0.400 |" in text
    # error: per-run round means 2, 2, 3 -> 2.33
    assert "| `krum` (f = 6) | 30% | 2.33 |" in text
    assert "Without attackers (`faults=none`): `none`: 0.800." in text
    assert "| robust | attackers | `alie` |" in text
