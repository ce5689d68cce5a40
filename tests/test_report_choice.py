"""fedsim-report over run folders written by hand (every number known): the rate chosen on
validation and the warnings at the grid's edge or without a validation split, the plots drawn
at the chosen rates (every rate on request), differences paired by seed against hand
computations, runs of different tasks kept apart, failed and incomplete runs left out of the
statistics, plug-in aggregators' metrics and the aggregation error in the tables, folded
constant columns and one byte format."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

T1 = 12.706204736174707  # Student's t, 97.5%, one degree of freedom
T2 = 4.302652729911275  # two


def write_run(
    folder,
    strategy="fedavg",
    lr=0.01,
    seed=0,
    acc=0.5,
    val=None,
    task="synthetic",
    up=1000,
    down=2000,
    status="ok",
    summary=True,
    rounds=3,
    error=None,
    aggregator=None,
    extra=(),
    config=None,
    choices=None,
):
    """A run of ``rounds`` rounds whose test accuracy rises linearly to ``acc`` (validation:
    ``val``, none when None); ``aggregator``: the values of ``aggregator_trimmed`` by round;
    ``error``: the aggregation errors by round (round 0 null). ``summary=False``: killed.
    ``config``: more of ``config.yaml``; ``choices``: Hydra's record of the group choices."""
    folder.mkdir(parents=True)
    resolved = {"sim": {"seed": seed, "lr": lr, "rounds": rounds, "num_clients": 4}}
    resolved["adapter"] = {"r": 8}
    resolved.update(config or {})
    (folder / "config.yaml").write_text(yaml.safe_dump(resolved))
    (folder / ".hydra").mkdir()
    if choices is not None:
        record = {"hydra": {"runtime": {"choices": {"hydra/launcher": "basic", **choices}}}}
        (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(record))
    overrides = [f"task={task}", f"strategy={strategy}", f"sim.lr={lr}", f"sim.seed={seed}"]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, *extra]))
    errors = error or [0.1 * r for r in range(rounds + 1)]
    rows = []
    for r in range(rounds + 1):
        row = {"round": r, "eval_accuracy": 0.1 + (acc - 0.1) * r / rounds, "eval_loss": 1.0}
        row.update(bytes_up=up // rounds * (r > 0), bytes_down=down // rounds * (r > 0))
        row["aggregation_error"] = errors[r] if r else None
        if val is not None:
            row["val_accuracy"] = 0.1 + (val - 0.1) * r / rounds
        if aggregator is not None and r:
            row["aggregator_trimmed"] = aggregator[r - 1]
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if not summary:
        return folder
    s = {"status": status, "task": task, "strategy": strategy, "adapter": "lora"}
    s.update(compressor="none", privacy="none", rounds=rounds, rounds_completed=rounds)
    s.update(final_eval_accuracy=acc, final_eval_loss=1.0, bytes_up_total=up)
    s.update(bytes_down_total=down, seed=seed, wall_time_s=1.0)
    s["aggregation_error_max"] = max(errors[1:])
    if val is not None:
        s["final_val_accuracy"] = val
    if status != "ok":
        s["error"] = "RuntimeError: diverged"
    (folder / "summary.json").write_text(json.dumps(s))
    return folder


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


#: (strategy, lr): per seed (test accuracy, validation accuracy). fedavg's best validation is
#: at its largest rate, its best test at 0.01: the choice must follow validation.
GRID = {
    ("fedavg", 0.001): [(0.30, 0.31), (0.32, 0.33), (0.31, 0.30)],
    ("fedavg", 0.01): [(0.90, 0.50), (0.91, 0.52), (0.92, 0.51)],
    ("fedavg", 0.1): [(0.60, 0.70), (0.62, 0.71), (0.64, 0.69)],
    ("fedsb", 0.001): [(0.40, 0.40), (0.41, 0.41), (0.42, 0.42)],
    ("fedsb", 0.01): [(0.70, 0.80), (0.76, 0.81), (0.73, 0.79)],
    ("fedsb", 0.1): [(0.50, 0.50), (0.52, 0.51), (0.51, 0.52)],
}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("choice") / "sweep"
    job = 0
    for (strategy, lr), seeds in GRID.items():
        for seed, (acc, val) in enumerate(seeds):
            up = 4_000_000 if strategy == "fedavg" else 1_234_567
            write_run(root / str(job), strategy, lr, seed, acc, val, up=up, down=up)
            job += 1
    return root


def test_the_rate_is_chosen_on_validation_and_a_rate_at_the_edge_is_warned(grid, tmp_path, capsys):
    from fedsim.report import main, report

    done = report([grid], tmp_path, plots=False)
    tuned = {r["strategy"]: r for r in read_csv(tmp_path / "tuned.csv")}
    assert tuned["fedavg"]["selected_lr"] == "0.1"  # best validation; 0.01 is best on test
    assert float(tuned["fedavg"]["test_accuracy_mean"]) == pytest.approx(0.62)
    assert tuned["fedsb"]["selected_lr"] == "0.01"
    assert tuned["fedavg"]["note"] == "largest rate tried" and tuned["fedsb"]["note"] == ""
    assert done["warnings"] == [
        "warning: fedavg: the chosen sim.lr=0.1 is the largest rate tried (0.001 to 0.1); "
        "the best rate may lie beyond the grid"
    ]
    main([str(grid), "--out", str(tmp_path / "cli"), "--no-plots"])
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "largest rate tried" in err


def test_a_grid_tried_on_one_seed_is_compared_on_that_seed(tmp_path):
    """Rates tried on seed 0, then seeds 1 and 2 run at one rate: the rates are compared on
    seed 0 (0.6 at 0.01 beats 0.55 at 0.1; the mean over three seeds at 0.01, 0.467, would
    lose to seed 0's 0.55 at 0.1), the test accuracy is over all three seeds at that rate."""
    from fedsim.report import report

    root = tmp_path / "runs"
    for lr, val in ((0.001, 0.3), (0.01, 0.6), (0.1, 0.55)):
        write_run(root / f"s0_{lr}", lr=lr, seed=0, acc=val + 0.05, val=val)
    for seed in (1, 2):
        write_run(root / f"s{seed}", lr=0.01, seed=seed, acc=0.5, val=0.4)
    report([root], tmp_path / "out", plots=False)
    (row,) = read_csv(tmp_path / "out" / "tuned.csv")
    assert row["selected_lr"] == "0.01" and row["seeds"] == "3"
    assert float(row["val_accuracy"]) == pytest.approx(0.6)  # what chose it: seed 0's
    assert float(row["test_accuracy_mean"]) == pytest.approx((0.65 + 0.5 + 0.5) / 3)
    assert row["note"] == "rate chosen on seed 0 (those every rate ran)"
    write_run(root / "s1_0.1", lr=0.1, seed=1, acc=0.5, val=0.3)  # now 0.1 has seeds 0, 1
    report([root], tmp_path / "out2", plots=False)
    (row,) = read_csv(tmp_path / "out2" / "tuned.csv")
    assert row["note"] == "rate chosen on seed 0 (those every rate ran)"
    assert row["selected_lr"] == "0.01"


def test_rates_that_all_tie_on_validation_are_said_to_tie(tmp_path):
    """A model that predicts one class at every rate scores that class's share at each: no
    rate is better, and the report says so instead of calling the smallest a choice."""
    from fedsim.report import report

    root = tmp_path / "runs"
    for lr, acc in ((0.001, 0.53), (0.01, 0.47), (0.1, 0.53)):
        write_run(root / str(lr), lr=lr, acc=acc, val=0.592)
    write_run(root / "other", "fedsb", lr=0.01, acc=0.7, val=0.6)
    write_run(root / "other2", "fedsb", lr=0.1, acc=0.6, val=0.5)
    done = report([root], tmp_path / "out", plots=False)
    rows = {r["strategy"]: r for r in read_csv(tmp_path / "out" / "tuned.csv")}
    assert rows["fedavg"]["selected_lr"] == "0.001"
    assert rows["fedavg"]["note"] == "every rate tied on validation"
    assert rows["fedsb"]["note"] == "smallest rate tried"
    (tie,) = [w for w in done["warnings"] if "fedavg" in w]
    assert "every sim.lr tried (0.001 to 0.1) gave the same validation accuracy (0.592)" in tie


def test_the_smallest_rate_is_warned_too(tmp_path):
    from fedsim.report import report

    for job, (lr, val) in enumerate([(0.001, 0.9), (0.01, 0.5)]):
        write_run(tmp_path / "runs" / str(job), lr=lr, acc=0.5, val=val)
    done = report([tmp_path / "runs"], tmp_path / "out", plots=False)
    assert (
        len(done["warnings"]) == 1
        and "smallest rate tried (0.001 to 0.01)" in (done["warnings"][0])
    )


def _drawn_labels(monkeypatch):
    """The labels of the lines each saved figure holds, by file name."""
    import matplotlib.figure

    figures = {}
    save = matplotlib.figure.Figure.savefig

    def keep(fig, path, *args, **kwargs):
        labels = [ln.get_label() for ax in fig.axes for ln in ax.get_lines()]
        figures[path.name] = [x for x in labels if not x.startswith("_")]
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return figures


def test_plots_show_the_chosen_rates_and_every_rate_on_request(grid, tmp_path, monkeypatch):
    from fedsim.report import report

    figures = _drawn_labels(monkeypatch)
    report([grid], tmp_path / "chosen")
    assert sorted(figures["accuracy_by_round.png"]) == [
        "lr=0.01 (3 seeds, 95% CI)",
        "lr=0.1 (3 seeds, 95% CI)",
    ]
    assert sorted(figures["accuracy_by_round_overlay.png"]) == [
        "fedavg, lr=0.1 (3 seeds, 95% CI)",
        "fedsb, lr=0.01 (3 seeds, 95% CI)",
    ]
    report([grid], tmp_path / "all", all_rates=True)
    assert len(figures["accuracy_by_round.png"]) == 6
    assert len(figures["accuracy_by_round_overlay.png"]) == 6


def test_without_a_validation_split_no_rate_is_chosen_and_the_plots_keep_every_rate(
    tmp_path, monkeypatch
):
    from fedsim.report import report

    for job, lr in enumerate([0.001, 0.01, 0.1]):
        write_run(tmp_path / "runs" / str(job), lr=lr, acc=0.3 + lr)
    figures = _drawn_labels(monkeypatch)
    done = report([tmp_path / "runs"], tmp_path / "out")
    assert [r["selected_lr"] for r in done["tuned"]] == [None]
    assert done["warnings"] == [
        "warning: no validation split for the runs: no rate chosen (set "
        "sim.validation_fraction), so the plots show every rate tried"
    ]
    assert len(figures["accuracy_by_round.png"]) == 3


PAIRS = {  # strategy: final test accuracy by seed (validation equal, one rate)
    "fedavg": [0.50, 0.60, 0.70],
    "plugin": [0.55, 0.58, 0.80],
    "fedsb": [0.40, None, None],  # seed 0 only
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs") / "runs"
    job = 0
    for strategy, accs in PAIRS.items():
        for seed, acc in enumerate(accs):
            if acc is not None:
                write_run(root / str(job), strategy, seed=seed, acc=acc, val=acc)
                job += 1
    return root


def test_differences_paired_by_seed_by_hand(pairs, tmp_path):
    from fedsim.report import report

    report([pairs], tmp_path, plots=False)
    rows = {r["strategy"]: r for r in read_csv(tmp_path / "paired.csv")}
    assert set(rows) == {"plugin", "fedsb"} and {r["baseline"] for r in rows.values()} == {"fedavg"}
    d = [0.05, -0.02, 0.10]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    plugin = rows["plugin"]
    assert plugin["n"] == "3" and plugin["by_seed"] == "0: +0.0500, 1: -0.0200, 2: +0.1000"
    assert float(plugin["mean_difference"]) == pytest.approx(mean)
    assert float(plugin["ci95_half"]) == pytest.approx(T2 * sd / math.sqrt(3))
    assert float(plugin["ci95_low"]) == pytest.approx(mean - T2 * sd / math.sqrt(3))
    one = rows["fedsb"]  # one shared seed: a difference, no interval
    assert (one["n"], one["ci95_half"], one["ci95_low"]) == ("1", "", "")
    assert float(one["mean_difference"]) == pytest.approx(-0.10)
    text = (tmp_path / "paired.md").read_text()
    assert "+0.0433" in text and "baseline=fedavg" in text


def test_the_baseline_can_be_chosen_and_an_unknown_one_is_warned(pairs, tmp_path):
    from fedsim.report import report

    done = report([pairs], tmp_path / "a", plots=False, baseline="plugin")
    assert {r["strategy"] for r in done["paired"]} == {"fedavg", "fedsb"}
    fedavg = next(r for r in done["paired"] if r["strategy"] == "fedavg")
    assert fedavg["mean_difference"] == pytest.approx(-mean_of([0.05, -0.02, 0.10]))
    done = report([pairs], tmp_path / "b", plots=False, baseline="nope")
    assert done["baseline"] == "fedavg"
    assert done["warnings"] == [
        "warning: --baseline nope: no finished run of it (strategies: fedavg, fedsb, plugin); "
        "differences are against fedavg"
    ]


def mean_of(xs):
    return sum(xs) / len(xs)


def test_tasks_apart_failed_and_incomplete_runs_listed_not_counted(tmp_path, monkeypatch):
    import matplotlib.figure

    from fedsim.report import report

    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root / f"a{seed}", seed=seed, acc=0.6 + seed / 10, val=0.5, task="news")
        write_run(root / f"b{seed}", seed=seed, acc=0.2 + seed / 10, val=0.5)
    write_run(root / "failed", seed=2, acc=0.99, val=0.99, status="failed")
    write_run(root / "killed", seed=3, acc=0.99, val=0.99, summary=False)
    axes = {}
    save = matplotlib.figure.Figure.savefig

    def keep(fig, path, *args, **kwargs):
        axes[path.name] = fig.axes
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    done = report([root], tmp_path / "out")
    status = {r["run"]: r["status"] for r in read_csv(tmp_path / "out" / "report.csv")}
    assert status["failed"] == "failed" and status["killed"] == "incomplete"
    groups = {g["task"]: g for g in read_csv(tmp_path / "out" / "groups.csv")}
    assert set(groups) == {"news", "synthetic"}  # never averaged together
    assert float(groups["news"]["final_accuracy_mean"]) == pytest.approx(0.65)
    assert float(groups["synthetic"]["final_accuracy_mean"]) == pytest.approx(0.25)  # no 0.99
    assert groups["synthetic"]["seeds"] == "2"
    assert len(axes["accuracy_vs_bytes.png"]) == 4  # a row of two panels per task
    assert len(axes["accuracy_by_round_overlay.png"]) == 2  # a panel per task
    assert {g["seeds"] for g in done["groups"]} == {2}


def test_runs_that_differ_only_in_their_threads_are_one_configuration(tmp_path):
    """engine.num_threads sets the machine's resources (two jobs of a sweep at a time run on
    one thread each): the report groups such runs over seeds as one configuration."""
    from fedsim.report import report

    root = tmp_path / "runs"
    write_run(root / "a", seed=0, acc=0.4, extra=["engine.num_threads=1"])
    write_run(root / "b", seed=1, acc=0.6, extra=["engine.num_threads=auto"])
    write_run(root / "c", seed=2, acc=0.8)
    write_run(root / "d", seed=0, acc=0.9, extra=["sim.clients_per_round=2"])
    report([root], tmp_path / "out", plots=False)
    groups = read_csv(tmp_path / "out" / "groups.csv")
    assert sorted(g["seeds"] for g in groups) == ["1", "3"]
    assert all("engine.num_threads" not in g for g in groups)
    three = next(g for g in groups if g["seeds"] == "3")
    assert float(three["final_accuracy_mean"]) == pytest.approx(0.6)


def test_a_setting_is_one_value_whatever_way_the_command_line_wrote_it(tmp_path):
    """A sweep records a bool override as 'False', a single run as 'false', a run that kept the
    default not at all; '1e-2' is 0.01; a config group a run did not override is the option
    Hydra chose ('none' beside another run's 'scaffold'), not ''."""
    from fedsim.report import report

    root = tmp_path / "runs"
    plain = {"strategy": {"weighted": False}, "control": {"_target_": "NoControl"}}
    write_run(root / "a", seed=0, acc=0.4, config=plain, choices={"control": "none"},
              extra=["strategy.weighted=False", "sim.lr=1e-2"])  # fmt: skip
    write_run(root / "b", seed=1, acc=0.6, config=plain, choices={"control": "none"},
              extra=["strategy.weighted=false"])  # fmt: skip
    write_run(root / "c", seed=2, acc=0.8, config=plain, choices={"control": "none"})
    weighted = {**plain, "strategy": {"weighted": True}}
    write_run(root / "d", seed=0, acc=0.9, config=weighted, choices={"control": "none"})
    scaffold = {**weighted, "control": {"_target_": "Scaffold"}}
    write_run(root / "e", seed=0, acc=0.7, config=scaffold, choices={"control": "scaffold"},
              extra=["control=scaffold"])  # fmt: skip
    report([root], tmp_path / "out", plots=False)
    rows = {r["run"]: r for r in read_csv(tmp_path / "out" / "report.csv")}
    assert {k: r["strategy.weighted"] for k, r in rows.items()} == dict(
        a="false", b="false", c="false", d="true", e="true"
    )
    assert {k: r["control"] for k, r in rows.items()} == dict(
        a="none", b="none", c="none", d="none", e="scaffold"
    )
    assert "sim.lr" not in rows["a"]  # 1e-2 and 0.01 are one rate: nothing was swept
    groups = read_csv(tmp_path / "out" / "groups.csv")
    assert sorted(g["seeds"] for g in groups) == ["1", "1", "3"]
    three = next(g for g in groups if g["seeds"] == "3")
    assert float(three["final_accuracy_mean"]) == pytest.approx(0.6)


def test_long_legend_labels_leave_the_overlay_its_axes(tmp_path, monkeypatch):
    """The overlay's legend sits to the right of the axes; labels as long as a sweep of many
    settings makes widen the figure rather than squeeze the axes."""
    import matplotlib.figure

    from fedsim.report import report
    from fedsim.report.plots import AXES_WIDTH

    root = tmp_path / "runs"
    for i in range(3):
        extra = [f"sim.setting_number_{k}=value_{i}" for k in range(4)]
        write_run(root / str(i), acc=0.5 + i / 10, extra=extra)
    widths = {}
    save = matplotlib.figure.Figure.savefig

    def keep(fig, path, *args, **kwargs):
        widths[path.name] = [ax.get_position().width * fig.get_figwidth() for ax in fig.axes]
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    report([root], tmp_path / "out")
    (axes,) = widths["accuracy_by_round_overlay.png"]
    assert axes >= 0.9 * AXES_WIDTH, axes


def test_aggregator_metrics_and_the_aggregation_error_are_columns(tmp_path):
    from fedsim.report import report

    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root / f"p{seed}", "plugin", seed=seed, aggregator=[1.0, 2.0, 3.0 + seed],
                  error=[None, 0.2, 0.5 + seed, 0.1])  # fmt: skip
        write_run(root / f"f{seed}", "fedavg", seed=seed)
    report([root], tmp_path / "out", plots=False)
    rows = {r["run"]: r for r in read_csv(tmp_path / "out" / "report.csv")}
    header = list(next(iter(rows.values())))
    assert header.index("aggregator_trimmed") == header.index("aggregation_error_max") + 1
    assert rows["p1"]["aggregator_trimmed"] == "4.0"  # the last round's value
    assert rows["p1"]["aggregation_error_max"] == "1.5" and rows["f0"]["aggregator_trimmed"] == ""
    groups = {g["strategy"]: g for g in read_csv(tmp_path / "out" / "groups.csv")}
    assert float(groups["plugin"]["aggregator_trimmed"]) == pytest.approx(3.5)  # mean
    assert float(groups["plugin"]["aggregation_error_max"]) == pytest.approx(1.5)  # largest
    assert groups["fedavg"]["aggregator_trimmed"] == ""
    killed = write_run(tmp_path / "killed", "plugin", aggregator=[7.0, 8.0, 9.0], summary=False)
    from fedsim.report import read_run

    row = read_run(killed).row  # without a summary: from metrics.jsonl
    assert row["aggregator_trimmed"] == 9.0 and row["aggregation_error_max"] == pytest.approx(0.3)


def test_constant_columns_are_folded_and_bytes_read_one_way(grid, tmp_path, capsys, monkeypatch):
    from fedsim.report import main

    monkeypatch.setenv("COLUMNS", "80")  # a narrow terminal: the table keeps to 120 anyway
    main([str(grid), "--out", str(tmp_path), "--no-plots"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert all(len(line) <= 120 for line in lines[:-1]), max(lines[:-1], key=len)
    assert "1.2 MB" in out and "4.0 MB" in out and "e+0" not in out
    assert "task=synthetic" in lines[0]  # the constant columns, on the title line
    md = (tmp_path / "report.md").read_text().splitlines()
    assert md[2].startswith("In every row: ") and "task=synthetic" in md[2]
    header = [c.strip(" |") for c in md[4].split(" | ")]
    assert "task" not in header and "strategy" in header and "bytes_up" in header
    assert any("| 1,234,567 |" in line for line in md)
    groups_md = (tmp_path / "groups.md").read_text()
    assert "1,234,567" in groups_md and "4,000,000" in groups_md and "e+0" not in groups_md
    rows = read_csv(tmp_path / "report.csv")
    assert {r["task"] for r in rows} == {"synthetic"}  # CSV keeps every column
    assert {r["bytes_up"] for r in rows} == {"4000000", "1234567"}
    groups = read_csv(tmp_path / "groups.csv")
    assert {g["bytes_up"] for g in groups} == {"4000000", "1234567"}  # integers, not 4e+06


def test_a_report_of_failed_and_killed_runs_only(tmp_path, capsys):
    from fedsim.report import main

    write_run(tmp_path / "runs" / "failed", status="failed", val=0.5)
    write_run(tmp_path / "runs" / "killed", seed=1, summary=False)
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert "2 runs" in captured.out and "failed: failed: RuntimeError: diverged" in captured.err
    assert [r["status"] for r in read_csv(tmp_path / "out" / "report.csv")] == [
        "failed",
        "incomplete",
    ]
    assert read_csv(tmp_path / "out" / "groups.csv") == []
    assert not list((tmp_path / "out").glob("*.png"))


def test_personal_strategies_are_named_as_such_not_as_lacking_validation(tmp_path):
    """fedsa and local have no global model: a validation split exists but gives them no
    accuracy, and the report says that (not 'set sim.validation_fraction')."""
    from fedsim.report import report

    for job, lr in enumerate([0.01, 0.1]):
        write_run(tmp_path / "runs" / str(job), lr=lr, acc=0.5, val=0.6)
        folder = write_run(tmp_path / "runs" / f"p{job}", "local", lr, acc=0.5, val=0.6)
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        for row in rows:
            row.update(eval_accuracy=None, val_accuracy=None)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = json.loads((folder / "summary.json").read_text())
        summary.update(final_eval_accuracy=None, final_val_accuracy=None)
        (folder / "summary.json").write_text(json.dumps(summary))
    done = report([tmp_path / "runs"], tmp_path / "out", plots=False)
    notes = {r["strategy"]: r["note"] for r in done["tuned"]}
    assert notes["local"] == "no global model (personal adapters) to validate: no rate selected"
    assert [w for w in done["warnings"] if "local train personal adapters" in w]
    assert not [w for w in done["warnings"] if "no validation split" in w]


def test_the_terminal_table_uses_a_wider_terminal_and_short_headers(monkeypatch, capsys):
    """Where the terminal is wider than 120 (``COLUMNS``), the table takes the room instead of
    folding its cells; headers leave off ``sim.``, ``task.`` and ``adapter.``."""
    from fedsim.report.writing import print_table, terminal_width

    columns = ["adapter.client_ranks", "adapter.init.method", "run"]
    settings = [("[2,4]", "default"), ("{4: 0.5}", "eva")]
    rows = [
        {"adapter.client_ranks": ranks, "adapter.init.method": method, "run": "x" * 110 + f"_{k}"}
        for k, (ranks, method) in enumerate(settings)
    ]
    for cols, wide in (("80", False), ("200", True)):
        monkeypatch.setenv("COLUMNS", cols)
        assert terminal_width() == (200 if wide else 120)
        print_table(columns, rows, "runs")
        out = capsys.readouterr().out
        assert "client_ranks" in out and "adapter.client_ranks" not in out
        assert ("x" * 110 + "_1" in out) == wide  # else folded over two lines
