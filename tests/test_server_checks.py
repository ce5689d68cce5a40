"""What the server computes is checked like what clients send (issue 19): a non-finite or
wrongly shaped aggregate, from a plug-in, a built-in strategy or a stage of the chain (error
feedback's server step, central DP's noised mean), fails the round with the server's step
named, never the clients; the global model is not updated, nothing non-finite is exported, and
the run is ``failed``. A plug-in that a stage's own step would never call is refused at
start-up, naming the user's class and ``averages``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsim.errors import ConfigError, RunFailed
from tests.conftest import ROOT, tiny

PLUGINS = '''
import numpy as np


class NaNMean:
    """The mean, then NaN in every array (a bug in a user's rule)."""

    def aggregate(self, server_round, current, updates):
        return {k: np.full(v.shape, np.nan) for k, v in current.items()}


class HalfInf:
    """The mean with one infinity in the first array."""

    def aggregate(self, server_round, current, updates):
        new = {k: np.mean([u.arrays[k] for u in updates], axis=0) for k in current}
        first = sorted(new)[0]
        new[first].flat[0] = np.inf
        return new


class Huge:
    """Finite in float64, infinite once cast to the global arrays' float32."""

    def aggregate(self, server_round, current, updates):
        return {k: np.full(v.shape, 1e300) for k, v in current.items()}


class Transposed:
    """Right names, one array transposed."""

    def aggregate(self, server_round, current, updates):
        new = {k: np.mean([u.arrays[k] for u in updates], axis=0) for k in current}
        name = next(k for k, v in new.items() if v.ndim == 2 and v.shape[0] != v.shape[1])
        new[name] = new[name].T
        return new


class RobustAverage:
    """Declares averages = True but is a coordinate-wise median (and says when it runs)."""

    averages = True

    def aggregate(self, server_round, current, updates):
        return {k: np.median([u.arrays[k] for u in updates], axis=0) for k in current}


class Plain:
    """A mean that does not declare averages."""

    def aggregate(self, server_round, current, updates):
        return {k: np.mean([u.arrays[k] for u in updates], axis=0) for k in current}
'''

NAMES = ["NaNMean", "HalfInf", "Huge", "Transposed", "RobustAverage", "Plain"]


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A user's module and config folder, outside fedsim; the module is importable."""
    (tmp_path / "server_plugins.py").write_text(PLUGINS)
    strategies = tmp_path / "conf" / "strategy"
    strategies.mkdir(parents=True)
    for name in NAMES:
        (strategies / f"{name.lower()}.yaml").write_text(f"_target_: server_plugins.{name}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def run_in(user_dir: Path, out: Path, *extra: str) -> dict:
    from fedsim.api import run

    return run(tiny(*extra), output_dir=out, config_dir=str(user_dir / "conf"))


def failed_run(user_dir: Path, out: Path, *extra: str) -> tuple[str, dict, list[dict]]:
    """Run, expecting RunFailed; returns its message, summary.json and metrics.jsonl rows."""
    from fedsim.results import read_metrics

    with pytest.raises(RunFailed) as caught:
        run_in(user_dir, out, *extra)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert str(caught.value) in summary["error"]
    assert not (out / "adapter").exists()
    return str(caught.value), summary, read_metrics(out)


def blames_no_client(message: str, rows: list[dict]) -> None:
    assert "client" not in message, message
    assert all(not r.get("failures") for r in rows), [r.get("failures") for r in rows]


def test_a_nan_plug_in_fails_round_1_naming_its_class_not_the_clients(user_dir, tmp_path):
    message, summary, rows = failed_run(user_dir, tmp_path / "r", "strategy=nanmean")
    assert message.startswith("round 1: NaNMean.aggregate returned "), message
    assert "NaN of" in message and "the global model was not updated" in message
    blames_no_client(message, rows)
    assert [r["round"] for r in rows] == [0]  # round 1 recorded nothing
    assert summary["rounds_completed"] == 0


def test_one_infinity_is_refused_with_its_array_and_count(user_dir, tmp_path):
    message, _, rows = failed_run(user_dir, tmp_path / "r", "strategy=halfinf")
    assert message.startswith("round 1: HalfInf.aggregate returned "), message
    assert "1 inf of" in message
    blames_no_client(message, rows)


def test_values_that_overflow_the_global_dtype_are_refused(user_dir, tmp_path):
    message, _, _ = failed_run(user_dir, tmp_path / "r", "strategy=huge")
    assert "Huge.aggregate" in message and "once cast to float32" in message, message


def test_a_wrongly_shaped_aggregate_fails_naming_the_array_and_shapes(user_dir, tmp_path):
    message, _, rows = failed_run(user_dir, tmp_path / "r", "strategy=transposed")
    assert message.startswith("round 1: Transposed.aggregate returned "), message
    assert "with shape" in message and "the global array has shape" in message
    blames_no_client(message, rows)


def test_a_built_in_strategy_producing_nan_fails_with_its_own_name(tmp_path, monkeypatch):
    import strategies.fedavg as fedavg
    from fedsim.api import run

    real = fedavg.FedAvg.aggregate

    def broken(self, server_round, current, updates):
        new = real(self, server_round, current, updates)
        return {k: v * np.nan if server_round == 2 else v for k, v in new.items()}

    monkeypatch.setattr(fedavg.FedAvg, "aggregate", broken)
    with pytest.raises(RunFailed, match=r"^round 2: FedAvg\.aggregate returned .* NaN of"):
        run(tiny("strategy=fedavg", "sim.rounds=3"), output_dir=tmp_path / "r")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_completed"] == 1
    assert not (tmp_path / "r" / "adapter").exists()


def test_error_feedback_s_server_step_is_named_when_it_produces_nan(tmp_path, monkeypatch):
    from fedsim.api import run
    from fedsim.feedback import EF21

    real = EF21.step

    def broken(self, *args, **kwargs):
        return {k: v + np.inf for k, v in real(self, *args, **kwargs).items()}

    monkeypatch.setattr(EF21, "step", broken)
    with pytest.raises(RunFailed, match=r"^round 1: feedback=ef21's server step returned "):
        run(tiny("compressor=topk", "feedback=ef21"), output_dir=tmp_path / "r")


def test_central_dp_s_noised_mean_is_named_when_it_produces_nan(tmp_path, monkeypatch):
    from fedsim.api import run
    from fedsim.privacy.central import CentralDP

    real = CentralDP.noised_sum

    def broken(self, *args, **kwargs):
        return {k: v * np.nan for k, v in real(self, *args, **kwargs).items()}

    monkeypatch.setattr(CentralDP, "noised_sum", broken)
    overrides = tiny("privacy=central", "sim.num_clients=8", "sim.clients_per_round=4")
    with pytest.raises(RunFailed, match=r"central DP's noised mean \(privacy=central\) returned"):
        run(overrides, output_dir=tmp_path / "r")


def test_a_non_finite_global_model_never_finishes_ok_even_past_the_round_checks(
    user_dir, tmp_path, monkeypatch
):
    """With the round checks switched off, the NaN model reaches the end of the run: the check
    before the export and the summary still fails it, and nothing is exported."""
    import fedsim.strategy.rounds as rounds
    import fedsim.uplink as uplink

    monkeypatch.setattr(uplink, "check_arrays", lambda *a: None)
    monkeypatch.setattr(
        rounds,
        "check_aggregate",
        lambda who, current, new, r=None: {k: np.asarray(new[k], current[k].dtype) for k in new},
    )
    message, summary, _ = failed_run(user_dir, tmp_path / "r", "strategy=nanmean", "sim.rounds=1")
    assert message.startswith("the global model at the end of the run holds "), message
    assert "nothing is exported" in message and summary["export"] is None


@pytest.mark.parametrize(
    "name, stage",
    [
        ("robustaverage", ("compressor=topk", "feedback=ef21")),
        ("robustaverage", ("compressor=topk", "feedback=econtrol")),
        ("robustaverage", ("privacy=central", "sim.num_clients=8", "sim.clients_per_round=4")),
        ("plain", ("compressor=topk", "feedback=ef21")),
        ("plain", ("privacy=central", "sim.num_clients=8", "sim.clients_per_round=4")),
    ],
)
def test_a_plug_in_that_a_stage_would_never_call_is_refused(name, stage, user_dir, tmp_path):
    with pytest.raises(ConfigError) as caught:
        run_in(user_dir, tmp_path / "r", f"strategy={name}", *stage)
    message = str(caught.value)
    cls = "RobustAverage" if name == "robustaverage" else "Plain"
    assert f"plug-in {cls}.aggregate would never be called" in message, message
    assert "averages = " in message and "PluginStrategy" not in message
    assert "\n" not in message
    assert not (tmp_path / "r").exists()


def test_the_same_plug_ins_run_with_stages_that_call_them(user_dir, tmp_path):
    """EF14 decodes and hands the estimates to the plug-in, which runs."""
    summary = run_in(user_dir, tmp_path / "r", "strategy=robustaverage", "compressor=topk")
    assert summary["status"] == "ok" and summary["strategy"] == "robustaverage"


def test_the_command_line_prints_one_line_and_exits_1(user_dir, tmp_path):
    out = tmp_path / "r"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim",
            "--config-dir",
            str(user_dir / "conf"),
            *tiny("strategy=nanmean"),
            f"hydra.run.dir={out}",
        ],
        capture_output=True,
        text=True,
        cwd=user_dir,
        env={**os.environ, "PYTHONPATH": f"{user_dir}{os.pathsep}{ROOT}"},
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("fedsim: run failed: round 1: NaNMean.aggregate returned "), err
    assert err.endswith(
        f"(see {out / 'summary.json'}; the traceback is in {out / 'fedsim.log'})"
    ), err
    assert not (out / "adapter").exists()
