"""fedsim-report with the simulated clock: the ``system`` and ``sim_time_s`` columns, the
time-to-target table against hand computations, the accuracy-against-time plot; runs without
a clock left out of both, alone and mixed with runs that have one. The run folders are written
by hand (config.yaml, .hydra/overrides.yaml, metrics.jsonl, summary.json), so every number is
known."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import yaml

T2 = 4.302652729911275  # Student's t, 97.5%, two degrees of freedom


def write_run(folder, strategy="fedavg", seed=0, system="mobile", times=None, reached=None):
    """A finished run of 3 rounds (accuracies 0.1, 0.3, 0.5, 0.6). ``system``: a profile's name
    (a clock, with ``times``: the simulated seconds at the end of rounds 0-3, and ``reached``:
    summary.json's time_to_accuracy), ``"none"`` (no clock) or None (a run from before the
    clock: no ``system`` in its config)."""
    folder.mkdir(parents=True)
    clock = system not in (None, "none")
    accuracies = [0.1, 0.3, 0.5, 0.6]
    config = {"sim": {"seed": seed, "lr": 0.01, "rounds": 3}, "adapter": {"r": 8}}
    if system is not None:
        config["system"] = {"name": system, "targets": list(reached or {})}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    hydra = folder / ".hydra"
    hydra.mkdir()
    overrides = [f"strategy={strategy}", f"sim.seed={seed}"]
    overrides += [f"system={system}"] if system is not None else []
    (hydra / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    rows = []
    for r, acc in enumerate(accuracies):
        row = {"round": r, "eval_accuracy": acc, "eval_loss": 2.0 - acc, "bytes_up": 100 * (r > 0)}
        if clock:
            row["sim_time_s"] = times[r]
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "status": "ok",
        "task": "synthetic",
        "strategy": strategy,
        "adapter": "lora",
        "compressor": "none",
        "privacy": "none",
        "rounds": 3,
        "rounds_completed": 3,
        "final_eval_accuracy": accuracies[-1],
        "final_eval_loss": 2.0 - accuracies[-1],
        "bytes_up_total": 300,
        "bytes_down_total": 300,
        "seed": seed,
        "wall_time_s": 1.0,
    }
    if clock:
        summary["system"] = {"name": system, "flops_per_example": 1000.0}
        summary["sim_time_s"] = times[-1]
        summary["time_to_accuracy"] = reached
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def clocked(tmp_path):
    """fedavg on mobile over 3 seeds, reaching 0.5 at 10, 20 and 60 s, 0.8 once (at 100 s)
    and 0.9 never; fedavg on datacenter, one seed, reaching 0.5 at 4 ms."""
    root = tmp_path / "sweep"
    for seed, (t05, t08) in enumerate([(10.0, None), (20.0, 100.0), (60.0, None)]):
        times = [0.0, 5.0, t05, 120.0]
        reached = {"0.5": t05, "0.8": t08, "0.9": None}
        write_run(root / str(seed), seed=seed, times=times, reached=reached)
    reached = {"0.5": 0.004, "0.8": None, "0.9": None}
    write_run(root / "3", system="datacenter", times=[0.0, 0.002, 0.004, 0.006], reached=reached)
    return root


def test_time_to_target_by_hand(clocked):
    from fedsim.report import report

    done = report([clocked], clocked / "out", plots=False)
    assert {"time_to_target.csv", "time_to_target.md"} <= set(done["files"])
    rows = read_csv(clocked / "out" / "time_to_target.csv")
    by = {(r["system"], r["target"]): r for r in rows}
    assert len(rows) == 6  # 2 configurations x 3 targets

    mobile = by["mobile", "0.5"]  # 10, 20, 60: mean 30, sd sqrt(700)
    assert (mobile["seeds"], mobile["reached"]) == ("3", "3")
    assert float(mobile["time_s_mean"]) == pytest.approx(30.0)
    assert float(mobile["time_s_ci95"]) == pytest.approx(T2 * math.sqrt(700) / math.sqrt(3))
    assert mobile["time"] == "30 s"
    once = by["mobile", "0.8"]  # one seed of three, at 100 s: its time, said to be one seed's
    assert (once["seeds"], once["reached"], once["time_s_ci95"]) == ("3", "1", "")
    assert float(once["time_s_mean"]) == pytest.approx(100.0)
    assert once["time"] == "1.67 min: reached by 1 of 3 seeds"
    never = by["mobile", "0.9"]  # no number at all, and says so
    assert (never["reached"], never["time_s_mean"], never["time_s_ci95"]) == ("0", "", "")
    assert never["time"] == "not reached (0 of 3 seeds)"

    fast = by["datacenter", "0.5"]
    assert (fast["seeds"], fast["reached"]) == ("1", "1")
    assert float(fast["time_s_mean"]) == pytest.approx(0.004) and fast["time"] == "4 ms"
    assert by["datacenter", "0.8"]["time"] == "not reached"

    text = (clocked / "out" / "time_to_target.md").read_text()
    assert text.count("not reached") == 3 and "reached by 1 of 3 seeds" in text


def test_report_columns_with_a_clock(clocked):
    from fedsim.report import report

    done = report([clocked], clocked / "out", plots=False)
    rows = read_csv(clocked / "out" / "report.csv")
    assert list(rows[0])[:3] == ["sim.seed", "system", "task"]  # swept: shown once
    assert [r["system"] for r in rows] == ["mobile"] * 3 + ["datacenter"]
    assert [float(r["sim_time_s"]) for r in rows] == [120.0, 120.0, 120.0, 0.006]
    header = list(rows[0])
    assert header.index("sim_time_s") == header.index("wall_time_s") - 1
    groups = read_csv(clocked / "out" / "groups.csv")
    assert [(g["system"], g["seeds"]) for g in groups] == [("mobile", "3"), ("datacenter", "1")]
    assert [float(g["sim_time_s"]) for g in groups] == [120.0, 0.006]
    one = report([clocked / "0", clocked / "1"], clocked / "one", plots=False)
    assert one["columns"][:3] == ["sim.seed", "system", "task"]  # not swept: still an identity
    assert done["time_to_target_columns"][-6:] == [
        "target",
        "seeds",
        "reached",
        "time_s_mean",
        "time_s_ci95",
        "time",
    ]


def test_runs_without_a_clock_add_nothing(tmp_path):
    from fedsim.report import report

    for system in ("none", None):  # system=none, and runs from before the clock
        root = tmp_path / str(system)
        write_run(root / "0", system=system)
        write_run(root / "1", seed=1, system=system)
        done = report([root], root / "out")
        for name in ("report.csv", "groups.csv"):
            header = list(read_csv(root / "out" / name)[0])
            assert "system" not in header and "sim_time_s" not in header
        assert not (root / "out" / "time_to_target.csv").exists()
        assert not (root / "out" / "accuracy_vs_time.png").exists()
        assert "accuracy_by_round.png" in done["files"] and done["time_to_target"] == []


def test_a_mix_of_runs_with_and_without_a_clock(clocked, monkeypatch):
    """The runs without a clock keep their rows (no simulated time) and groups, and are left
    out of the time-to-target table and of the time plot."""
    import matplotlib.figure

    from fedsim.report import report

    write_run(clocked / "4", system="none")
    write_run(clocked / "5", seed=1, system="none")
    write_run(clocked / "6", system=None)
    figures = {}
    save = matplotlib.figure.Figure.savefig

    def keep(fig, path, *args, **kwargs):
        figures[path.name] = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    done = report([clocked], clocked / "out")
    rows = {r["run"]: r for r in read_csv(clocked / "out" / "report.csv")}
    assert [rows[r]["system"] for r in "456"] == ["none", "none", ""]
    assert [rows[r]["sim_time_s"] for r in "456"] == ["", "", ""]
    assert rows["3"]["system"] == "datacenter" and rows["3"]["sim_time_s"] == "0.006"
    groups = {(g["system"], g["seeds"]) for g in read_csv(clocked / "out" / "groups.csv")}
    assert groups == {("mobile", "3"), ("datacenter", "1"), ("none", "2"), ("", "1")}
    timed = read_csv(clocked / "out" / "time_to_target.csv")
    assert {r["system"] for r in timed} == {"mobile", "datacenter"} and len(timed) == 6

    assert "accuracy_vs_time.png" in done["files"]
    lines = [label for label in figures["accuracy_vs_time.png"] if not label.startswith("_")]
    assert sorted(lines) == ["system=datacenter", "system=mobile (3 seeds, 95% CI)"]
    by_round = [label for label in figures["accuracy_by_round.png"] if not label.startswith("_")]
    assert len(by_round) == 4  # every run has a round curve: mobile, datacenter, none, pre-clock


def test_the_time_plot_is_written_and_its_axis_readable(clocked):
    import matplotlib.image

    from fedsim.report import report

    report([clocked], clocked / "out")
    path = clocked / "out" / "accuracy_vs_time.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 200


def test_the_time_axis_picks_a_unit_or_a_log_scale():
    from fedsim.report.plots import _TimeAxis
    from fedsim.report.tables import human_time

    def axis(*ends):
        return _TimeAxis([[0.0, end / 2, end] for end in ends])

    assert (axis(0.9).unit, axis(30.0).unit, axis(119.0).unit) == ("ms", "s", "s")
    assert (axis(150.0).unit, axis(7000.0).unit, axis(8000.0).unit) == ("min", "min", "h")
    assert axis(4 * 86400.0).unit == "d" and axis(4 * 86400.0).values([86400.0]) == [1.0]
    assert not axis(1.0, 9.0).log and axis(0.02, 1.8).log  # lines ending > a decade apart
    log = axis(0.02, 1.8)
    assert math.isnan(log.values([0.0, 1.0])[0]) and log.label("t") == "t (log scale)"
    assert [human_time(t) for t in log.TICKS[2:]] == [
        "1 ms",
        "10 ms",
        "100 ms",
        "1 s",
        "10 s",
        "1 min",
        "10 min",
        "1 h",
        "10 h",
        "1 d",
        "10 d",
    ]
    assert human_time(0) == "0 s" and human_time(754.0) == "12.6 min"


def test_the_command_line_prints_the_time_table(clocked, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fedsim.report", str(clocked), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "simulated time to target accuracy" in done.stdout and "not reached" in done.stdout
    assert "time_to_target.csv" in done.stdout and "accuracy_vs_time.png" in done.stdout
