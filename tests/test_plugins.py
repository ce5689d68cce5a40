"""The plug-in contract (docs/plugins.md): a user's aggregator, selected from the user's own
config folder through ``_target_``, with no edit to fedsim."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, strip_timings, tiny

#: a plug-in module: weighted FedAvg re-implemented, a stateful aggregator, broken ones
PLUGINS = '''
import numpy as np


class WeightedMean:
    """FedAvg by the contract: sum_i n_i x_i / sum_i n_i (what strategy=fedavg does)."""

    averages = True

    def aggregate(self, server_round, current, updates):
        n = np.array([u.num_examples for u in updates], dtype=np.float64)
        p = n / n.sum()
        new = {}
        for name in current:
            acc = np.zeros(current[name].shape, dtype=np.float64)
            for w, u in zip(p, updates):
                acc += w * u.arrays[name].astype(np.float64)
            new[name] = acc
        return new


class Momentum:
    """Server momentum on the mean update: keeps a velocity between rounds."""

    weighted = False

    def __init__(self, beta=0.5):
        self.beta = beta
        self.velocity = {}

    def aggregate(self, server_round, current, updates):
        new = {}
        for name, x in current.items():
            mean = np.mean([u.arrays[name] for u in updates], axis=0)
            v = self.beta * self.velocity.get(name, 0.0) + (mean - x)
            self.velocity[name] = v
            new[name] = x + v
        norm = float(np.sqrt(sum(np.sum(v * v) for v in self.velocity.values())))
        return new, {"velocity_norm": norm}

    def state_dict(self):
        return dict(self.velocity)

    def load_state_dict(self, state):
        self.velocity = dict(state)


class NoAggregate:
    def combine(self, updates):
        return updates


class WrongSignature:
    def aggregate(self, updates):
        return updates


class HalfState:
    def aggregate(self, server_round, current, updates):
        return current

    def state_dict(self):
        return {}


class Flaky:
    def __init__(self, fail_round=2):
        self.fail_round = fail_round

    def aggregate(self, server_round, current, updates):
        if server_round == self.fail_round:
            raise RuntimeError(f"gives up in round {server_round}")
        return {k: np.mean([u.arrays[k] for u in updates], axis=0) for k in current}


class BadShape:
    def aggregate(self, server_round, current, updates):
        return {k: np.zeros(3) for k in current}
'''

NAMES = ["WeightedMean", "Momentum", "NoAggregate", "WrongSignature", "HalfState", "Flaky"]


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A user's module and config folder, outside fedsim; the module is importable."""
    (tmp_path / "my_plugins.py").write_text(PLUGINS)
    strategies = tmp_path / "conf" / "strategy"
    strategies.mkdir(parents=True)
    for name in [*NAMES, "BadShape"]:
        (strategies / f"{name.lower()}.yaml").write_text(f"_target_: my_plugins.{name}\n")
    (strategies / "flaky.yaml").write_text("_target_: my_plugins.Flaky\nfail_round: 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def run_in(user_dir: Path, out: Path, *extra: str) -> tuple[dict, list[dict]]:
    from fedsim.api import run
    from fedsim.results import read_metrics

    summary = run(tiny(*extra), output_dir=out, config_dir=str(user_dir / "conf"))
    return summary, read_metrics(out)


def test_a_plug_in_weighted_mean_reproduces_fedavg_exactly(user_dir, tmp_path):
    common = ("sim.rounds=3", "sim.clients_per_round=2")
    s_builtin, builtin = run_in(user_dir, tmp_path / "a", "strategy=fedavg", *common)
    s_plugin, plugin = run_in(user_dir, tmp_path / "b", "strategy=weightedmean", *common)
    assert strip_timings(plugin) == strip_timings(builtin)
    assert s_plugin["bytes_up_total"] == s_builtin["bytes_up_total"] > 0
    assert s_plugin["export"]["modules"] == s_builtin["export"]["modules"]


def test_wrappers_keep_working_around_a_plug_in(user_dir, tmp_path):
    """Compression with error feedback (EF14) and DP-SGD call the plug-in's aggregate (EF21,
    EControl and central DP replace it with their own step: refused, test_server_checks.py)."""
    for i, extra in enumerate(
        [
            ("compressor=topk", "feedback=ef14"),
            ("privacy=dpsgd", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0"),
        ]
    ):
        a, rows_a = run_in(user_dir, tmp_path / f"a{i}", "strategy=fedavg", *extra)
        b, rows_b = run_in(user_dir, tmp_path / f"b{i}", "strategy=weightedmean", *extra)
        assert strip_timings(rows_b) == strip_timings(rows_a), extra
        assert a["status"] == b["status"] == "ok"


def test_a_stateful_plug_in_logs_its_metrics_and_saves_state(user_dir, tmp_path):
    from fedsim.build import build_components
    from fedsim.config import compose
    from fedsim.strategy import PluginStrategy

    summary, rows = run_in(user_dir, tmp_path / "m", "strategy=momentum", "sim.rounds=3")
    assert summary["status"] == "ok"
    norms = [r["aggregator_velocity_norm"] for r in rows[1:]]
    assert len(norms) == 3 and all(n > 0 for n in norms)
    assert "aggregator_velocity_norm" not in rows[0]
    cfg = compose(tiny("strategy=momentum"), config_dir=str(user_dir / "conf"))[0]
    strategy = build_components(cfg).strategy
    assert isinstance(strategy, PluginStrategy) and not strategy.weighted
    strategy.load_state_dict({**strategy.state_dict(), "aggregator": {"w": np.ones(2)}})
    assert np.array_equal(strategy.state_dict()["aggregator"]["w"], np.ones(2))
    assert np.array_equal(strategy.aggregator.velocity["w"], np.ones(2))


def test_a_stateful_plug_in_resumes_exactly_from_a_checkpoint(user_dir, tmp_path, monkeypatch):
    from fedsim.api import run
    from fedsim.results import read_metrics
    from tests.test_checkpoint import crash_after

    args = tiny("strategy=momentum", "sim.rounds=4")
    full = run(args, output_dir=tmp_path / "full", config_dir=str(user_dir / "conf"))
    with crash_after(2, monkeypatch):
        run(args, output_dir=tmp_path / "cut", config_dir=str(user_dir / "conf"))
    resumed = run(args, output_dir=tmp_path / "cut", config_dir=str(user_dir / "conf"), resume=True)
    assert resumed["resumed_from"] == [2] and full["status"] == resumed["status"] == "ok"
    assert strip_timings(read_metrics(tmp_path / "cut")) == strip_timings(
        read_metrics(tmp_path / "full")
    )


@pytest.mark.parametrize(
    "name, message",
    [
        ("noaggregate", "has no aggregate(server_round, current, updates) method"),
        ("wrongsignature", "must accept (server_round, current, updates)"),
        ("halfstate", "defines one of state_dict / load_state_dict: add load_state_dict"),
    ],
)
def test_a_broken_plug_in_fails_at_start_up_in_one_line(name, message, user_dir, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim",
            "--config-dir",
            str(user_dir / "conf"),
            *tiny(f"strategy={name}"),
            f"hydra.run.dir={tmp_path / 'r'}",
        ],
        capture_output=True,
        text=True,
        cwd=user_dir,
        env={**os.environ, "PYTHONPATH": f"{user_dir}{os.pathsep}{ROOT}"},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert err.startswith("fedsim: error: strategy._target_=my_plugins."), err
    assert not (tmp_path / "r").exists()


def test_a_plug_in_that_returns_the_wrong_shapes_fails_the_run_with_the_reason(user_dir, tmp_path):
    from fedsim.errors import RunFailed

    with pytest.raises(RunFailed, match="round 1: BadShape.aggregate returned"):
        run_in(user_dir, tmp_path / "r", "strategy=badshape")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and "the global array has shape" in summary["error"]


def test_a_failing_job_does_not_stop_a_parallel_sweep_and_shows_in_the_report(user_dir, tmp_path):
    """joblib launcher, 2 workers: the jobs whose aggregator raises fail, the others finish,
    the sweep exits 1, and fedsim-report lists the failures with their reason."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim",
            "-m",
            "--config-dir",
            str(user_dir / "conf"),
            *tiny("strategy=flaky", "strategy.fail_round=2,99", "sim.seed=0,1", "sim.rounds=3"),
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        cwd=user_dir,
        env={**os.environ, "PYTHONPATH": f"{user_dir}{os.pathsep}{ROOT}"},
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "2 job(s) of the sweep failed" in proc.stderr
    assert f"4 jobs, 2 ok, 2 failed -> {sweep}; compare them with: fedsim-report {sweep}" in (
        proc.stdout
    )
    for i in range(1, 5):  # each job's last line says which job it was (parallel workers)
        assert f"[job {i}/4] done in" in proc.stdout or f"job {i}/4 failed:" in proc.stderr
    assert proc.stdout.count("] done in") == 2 and proc.stderr.count("/4 failed:") == 2
    report = subprocess.run(
        [sys.executable, "-m", "fedsim.report", str(sweep), "--no-plots", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr
    with open(sweep / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    status = {(r["strategy.fail_round"], r["sim.seed"]): r["status"] for r in rows}
    assert status == {
        ("2", "0"): "failed",
        ("2", "1"): "failed",
        ("99", "0"): "ok",
        ("99", "1"): "ok",
    }
    failed = [r for r in rows if r["status"] == "failed"]
    assert all("RuntimeError: gives up in round 2" in r["reason"] for r in failed)


def test_the_example_runs_from_outside_the_package(tmp_path):
    example = tmp_path / "custom_aggregator"
    shutil.copytree(ROOT / "examples" / "custom_aggregator", example)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = "."
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim",
            "--config-dir",
            "conf",
            *tiny("strategy=trimmed_mean"),
            f"hydra.run.dir={out}",
        ],
        capture_output=True,
        text=True,
        cwd=example,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["strategy"] == "trimmed_mean"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["aggregator_trimmed_per_side"] == 0  # floor(0.2 * 4 clients)
    # nobody trimmed: the unweighted mean, i.e. the built-in fedavg with weighted=false
    from fedsim.api import run
    from fedsim.results import read_metrics

    run(tiny("strategy=fedavg", "strategy.weighted=false"), output_dir=tmp_path / "fedavg")
    plain = [{k: v for k, v in r.items() if not k.startswith("aggregator_")} for r in rows]
    assert strip_timings(plain) == strip_timings(read_metrics(tmp_path / "fedavg"))


def test_the_example_trimmed_mean_equals_a_direct_computation():
    sys.path.insert(0, str(ROOT / "examples" / "custom_aggregator"))
    try:
        from trimmed_mean import TrimmedMean
    finally:
        sys.path.pop(0)
    from fedsim.strategy import ClientUpdate

    rng = np.random.default_rng(0)
    values = rng.normal(size=(5, 3, 2))
    values[0, 0, 0] = 1e6  # an outlier the trimmed mean drops
    updates = [ClientUpdate(i, {"w": values[i]}, 10, {}) for i in range(5)]
    new, metrics = TrimmedMean(trim=0.2).aggregate(1, {"w": np.zeros((3, 2))}, updates)
    want = np.zeros((3, 2))
    for i in range(3):
        for j in range(2):
            column = sorted(values[:, i, j])
            want[i, j] = sum(column[1:4]) / 3  # drop one at each end of five
    np.testing.assert_allclose(new["w"], want, rtol=1e-12)
    assert metrics == {"trimmed_per_side": 1} and new["w"][0, 0] < 10
