"""Logging sinks: TensorBoard and MLflow receive exactly the numbers of metrics.jsonl, and a
sink that breaks never costs the run."""

from __future__ import annotations

import logging

import pytest

from fedsim.errors import ConfigError


def test_tensorboard_holds_every_round_of_metrics_jsonl(run_tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary, rows, out = run_tiny("logger=tensorboard", "sim.rounds=3")
    assert summary["status"] == "ok"
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for tag, key in (("eval/accuracy", "eval_accuracy"), ("bytes/up", "bytes_up")):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        want = [(r["round"], float(r[key])) for r in rows if r[key] is not None]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert "train/loss" in events.Tags()["scalars"]


def test_mlflow_run_holds_params_metrics_and_status(run_tiny, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary, rows, out = run_tiny(
        "logger=mlflow", f"logger.tracking_uri={uri}", "logger.experiment=tests", "sim.rounds=2"
    )
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tests")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == out.name and run.info.status == "FINISHED"
    assert run.data.params["choice.strategy"] == "fedavg"
    assert run.data.params["sim.lr"] == "0.01" and run.data.tags["status"] == "ok"
    history = client.get_metric_history(run.info.run_id, "eval_accuracy")
    assert [(m.step, m.value) for m in history] == [
        (r["round"], pytest.approx(r["eval_accuracy"])) for r in rows
    ]
    assert run.data.metrics["final_eval_accuracy"] == pytest.approx(summary["final_eval_accuracy"])


def test_a_broken_sink_warns_and_the_run_finishes(run_tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="fedsim.sinks"):
        summary, rows, out = run_tiny(
            "logger=mlflow", "logger.tracking_uri=sqlite:////proc/no/such/place.db"
        )
    assert summary["status"] == "ok" and len(rows) == 3
    assert any("logger=mlflow stopped" in r.getMessage() for r in caplog.records)


def test_a_missing_sink_package_is_a_one_line_error(monkeypatch):
    import importlib.util

    from fedsim.sinks import TensorBoard

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    with pytest.raises(ConfigError) as e:
        TensorBoard()
    assert "pip install tensorboard" in str(e.value) and "\n" not in str(e.value)
