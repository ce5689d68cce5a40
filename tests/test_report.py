"""fedsim-report over a small synthetic sweep: rows, seed statistics, learning-rate selection on
the validation split, plots; and its parts against hand computations."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import tiny


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 strategies x 2 learning rates x 2 seeds, with a validation split (8 tiny jobs)."""
    root = tmp_path_factory.mktemp("report")
    folder = root / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim",
            "-m",
            *tiny(
                "strategy=fedavg,fedsb",
                "sim.lr=0.003,0.03",
                "sim.seed=0,1",
                "sim.validation_fraction=0.5",
            ),
            f"hydra.sweep.dir={folder}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a killed run: its summary never written
    killed = root / "killed"
    shutil.copytree(folder / "0", killed)
    (killed / "summary.json").unlink()
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_rows_groups_tuning_and_plots(sweep, monkeypatch):
    from fedsim.report import report
    from fedsim.report.figures import overlaps
    from tests.test_report_plots import _figures

    figures = _figures(monkeypatch)
    out = sweep / "out"
    done = report([sweep / "sweep"], out)
    rows = read_csv(out / "report.csv")
    assert len(rows) == 8 and done["runs"] == 8
    header = list(rows[0])
    for key in ("strategy", "sim.lr", "sim.seed", "final_accuracy", "bytes_up", "status"):
        assert key in header
    assert "seed" not in header and "lr" not in header  # shown once, as the override
    assert {r["status"] for r in rows} == {"ok"}
    summaries = {
        r["run"]: json.loads((sweep / "sweep" / r["run"] / "summary.json").read_text())
        for r in rows
    }
    for r in rows:
        s = summaries[r["run"]]
        assert float(r["final_accuracy"]) == pytest.approx(s["final_eval_accuracy"])
        assert float(r["final_val_accuracy"]) == pytest.approx(s["final_val_accuracy"])
        assert int(r["bytes_up"]) == s["bytes_up_total"]
        assert float(r["aggregation_error_max"]) == pytest.approx(s["aggregation_error_max"])

    groups = read_csv(out / "groups.csv")
    assert len(groups) == 4 and {g["seeds"] for g in groups} == {"2"}
    t = 12.706204736174707  # Student's t, 97.5%, one degree of freedom
    for g in groups:
        pair = [
            float(r["final_accuracy"])
            for r in rows
            if r["strategy"] == g["strategy"] and r["sim.lr"] == g["sim.lr"]
        ]
        assert float(g["final_accuracy_mean"]) == pytest.approx(sum(pair) / 2)
        assert float(g["final_accuracy_ci95"]) == pytest.approx(t * abs(pair[0] - pair[1]) / 2)

    tuned = read_csv(out / "tuned.csv")
    assert sorted(t["strategy"] for t in tuned) == ["fedavg", "fedsb"]
    for row in tuned:
        mine = [g for g in groups if g["strategy"] == row["strategy"]]
        best = max(mine, key=lambda g: float(g["final_val_accuracy_mean"]))
        assert row["selected_lr"] == best["sim.lr"]  # chosen on validation, not test
        assert float(row["test_accuracy_mean"]) == pytest.approx(float(best["final_accuracy_mean"]))
        assert row["rates_tried"] == "0.003, 0.03"

    paired = read_csv(out / "paired.csv")  # fedsb against fedavg, each at its chosen rate
    (fedsb,) = paired
    assert (fedsb["strategy"], fedsb["baseline"], fedsb["n"]) == ("fedsb", "fedavg", "2")
    chosen = {t["strategy"]: t["selected_lr"] for t in tuned}
    final = {
        (r["strategy"], r["sim.seed"]): float(r["final_accuracy"])
        for r in rows
        if r["sim.lr"] == chosen[r["strategy"]]
    }
    diffs = [final["fedsb", s] - final["fedavg", s] for s in ("0", "1")]
    assert float(fedsb["mean_difference"]) == pytest.approx(sum(diffs) / 2)
    assert fedsb["by_seed"] == f"0: {diffs[0]:+.4f}, 1: {diffs[1]:+.4f}"
    assert float(fedsb["ci95_half"]) == pytest.approx(t * abs(diffs[0] - diffs[1]) / 2)

    import matplotlib.image

    drawn = ["accuracy_by_round.png", "accuracy_by_round_overlay.png", "accuracy_vs_bytes.png"]
    assert [f for f in done["files"] if f.endswith(".png")] == drawn
    for name in drawn:
        assert overlaps(figures[name]) == [], name
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 200
    assert not (out / "accuracy_vs_epsilon.png").exists()  # no DP runs
    table = [ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith("|")]
    assert len(table) == 2 + 8 and "strategy" in table[0]


def test_a_run_without_summary_is_reported_incomplete(sweep):
    from fedsim.report import report

    done = report([sweep / "sweep", sweep / "killed"], sweep / "out2", plots=False)
    killed = [r for r in done["rows"] if r["run"] == "killed"]
    assert len(killed) == 1 and killed[0]["status"] == "incomplete"
    assert "killed or still running (3 rounds" in killed[0]["reason"]
    assert killed[0]["strategy"] == "fedavg"  # from Hydra's record of the choices
    assert len([g for g in done["groups"] if g["seeds"] == 2]) == 4  # not counted in groups


def test_the_command_line_prints_and_refuses_a_missing_path(sweep, tmp_path):
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim.report",
            str(sweep / "sweep"),
            "--out",
            str(tmp_path),
            "--no-plots",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "8 runs" in ok.stdout and "selected learning rates" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "fedsim.report", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_pareto_front_by_hand():
    from fedsim.report import pareto_front

    points = [(10, 0.5), (20, 0.7), (15, 0.4), (40, 0.7), (30, 0.9), (5, 0.1), (10, 0.6)]
    # by bytes: (5, .1) yes; (10, .6) yes, (10, .5) no; (15, .4) no; (20, .7) yes;
    # (30, .9) yes; (40, .7) no
    assert pareto_front(points) == [5, 6, 1, 4]


def test_mean_and_interval_by_hand():
    from fedsim.report import mean_ci

    xs = [0.61, 0.65, 0.58, 0.70]
    mean, half, n = mean_ci([*xs, None, float("nan")])
    sd = math.sqrt(sum((x - np.mean(xs)) ** 2 for x in xs) / 3)
    assert n == 4 and mean == pytest.approx(np.mean(xs))
    assert half == pytest.approx(3.182446305284263 * sd / 2)  # t(0.975, 3)
    assert mean_ci([0.5]) == (0.5, None, 1) and mean_ci([]) == (None, None, 0)


def test_a_run_at_the_default_rate_is_reported_at_it(sweep, tmp_path):
    """Two runs, one setting sim.lr and one keeping its default (no override): the report
    reads the second's rate from its configuration instead of crashing on an empty one."""
    import yaml

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(sweep / "sweep" / "0", a)
    shutil.copytree(sweep / "sweep" / "0", b)
    overrides = b / ".hydra" / "overrides.yaml"
    kept = [o for o in yaml.safe_load(overrides.read_text()) if not o.startswith("sim.lr=")]
    overrides.write_text(yaml.safe_dump(kept))
    cfg = yaml.safe_load((b / "config.yaml").read_text())
    cfg["sim"]["lr"] = 0.01
    (b / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim.report", str(a), str(b), "--out", str(out), "--no-plots"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rates = {row["run"]: row["sim.lr"] for row in read_csv(out / "report.csv")}
    assert sorted(rates.values()) == ["0.003", "0.01"]
    assert read_csv(out / "tuned.csv")[0]["rates_tried"] == "0.003, 0.01"
