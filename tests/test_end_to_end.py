"""Inline runs: the results contract, learning, exact bytes, determinism, persistent state."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import strip_timings, tiny

ROUND_KEYS = {
    "round",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "eval_accuracy_client_mean",
    "eval_accuracy_client_min",
    "bytes_up",
    "bytes_down",
    "clients_ok",
    "clients_failed",
    "round_time_s",
}
SUMMARY_KEYS = {
    "strategy",
    "adapter",
    "rounds",
    "final_eval_loss",
    "final_eval_accuracy",
    "bytes_up_total",
    "bytes_down_total",
    "params_sent_per_client",
    "trainable_params",
    "wall_time_s",
    "seed",
    "status",
}


def test_results_contract_and_learning(run_tiny):
    summary, rows, out = run_tiny("sim.rounds=4")
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json"}
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["sim"]["rounds"] == 4 and cfg["task"]["num_clients"] == 4  # resolved
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    for r in rows:
        assert ROUND_KEYS <= set(r), ROUND_KEYS - set(r)
    assert rows[0]["bytes_up"] == 0 and rows[0]["train_loss"] is None
    assert all(r["clients_ok"] == 4 and r["clients_failed"] == 0 for r in rows[1:])
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert summary["strategy"] == "fedavg" and summary["adapter"] == "lora"
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["final_eval_accuracy"] == rows[-1]["eval_accuracy"]
    assert rows[-1]["eval_accuracy"] > rows[0]["eval_accuracy"] + 0.1
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def test_bytes_are_exactly_the_adapter_payload(run_tiny):
    """LoRA r=8 on 32->32, 32->32, 32->32 (hidden 32) and a 32->10 head, fp32, 4 clients."""
    summary, rows, _ = run_tiny("adapter.r=8")
    r = 8
    per_client = 3 * r * (32 + 32) + 32 * 10 + 10  # r(m+n) per adapted layer + head
    assert summary["trainable_params"] == per_client
    assert summary["params_sent_per_client"] == {"up": per_client, "down": per_client}
    for row in rows[1:]:
        assert row["bytes_up"] == row["bytes_down"] == 4 * per_client * 4
    assert summary["bytes_up_total"] == 2 * 4 * per_client * 4


def test_partial_participation_bytes_and_sampling(run_tiny):
    summary, rows, _ = run_tiny(
        "sim.num_clients=8", "sim.clients_per_round=3", "sim.eval_clients=2"
    )
    per_client = 3 * 8 * (32 + 32) + 32 * 10 + 10  # LoRA r=8 on three 32x32 layers + head
    for row in rows[1:]:
        assert row["clients_sampled"] == 3 and row["clients_ok"] == 3
        assert row["clients_evaluated"] == 2
        assert row["bytes_up"] == row["bytes_down"] == 3 * per_client * 4


def test_same_seed_gives_bit_identical_metrics(run_tiny):
    _, a, _ = run_tiny()
    _, b, _ = run_tiny()
    _, c, _ = run_tiny("sim.seed=1")
    assert strip_timings(a) == strip_timings(b)
    assert strip_timings(a) != strip_timings(c)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        # a decaying schedule with partial participation: each client's schedule must continue
        # from its own step count, kept in its Context.state across the rounds it missed
        ["schedule=cosine", "schedule.warmup_steps=2", "sim.rounds=5", "sim.clients_per_round=3"],
    ],
    ids=["constant", "cosine-partial"],
)
def test_inline_engine_matches_a_plain_pytorch_loop(run_tiny, extra):
    """The Flower path (messages, copies, sampling, records) computes what a direct loop does."""
    from benchmarks.plain_loop import plain_fedavg
    from fedsim.config import compose

    overrides = tiny("sim.num_clients=6", "sim.clients_per_round=4", "sim.rounds=3", *extra)
    _, rows, _ = run_tiny(base=overrides)
    cfg, _ = compose(overrides)
    ref = plain_fedavg(cfg)
    assert len(rows) == len(ref) == cfg["sim"]["rounds"] + 1
    for got, want in zip(rows, ref):
        assert got["eval_accuracy"] == want["eval_accuracy"]
        assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)
        assert got["eval_accuracy_client_mean"] == pytest.approx(
            want["eval_accuracy_client_mean"], rel=1e-9
        )
        if want["train_loss"] is not None:
            assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6)


def test_optimizer_state_kept_across_rounds_changes_training(run_tiny):
    _, fresh, _ = run_tiny("sim.rounds=3")
    _, kept, _ = run_tiny("sim.rounds=3", "sim.keep_optimizer_state=true")
    assert strip_timings(fresh)[1] == strip_timings(kept)[1]  # round 1: nothing kept yet
    assert strip_timings(fresh)[2:] != strip_timings(kept)[2:]


def test_client_context_state_persists_across_rounds():
    """Each node's Context.state carries its step count and (optionally) optimizer state."""
    import tempfile
    from pathlib import Path

    from flwr.app import Context, RecordDict

    from fedsim import keys
    from fedsim.apps import make_client_app, make_server_app
    from fedsim.config import RunSpec, check, compose
    from fedsim.engines.inline import InlineGrid

    cfg, choices = compose(tiny("sim.rounds=3", "sim.keep_optimizer_state=true"))
    check(cfg)
    grid = InlineGrid(make_client_app(cfg), 4, seed=0)
    with tempfile.TemporaryDirectory() as d:
        spec = RunSpec(cfg, choices, Path(d) / "r", quiet=True)
        make_server_app(spec)(grid, Context(1, 1, {}, RecordDict(), {}))
    for node in grid.get_node_ids():
        state = grid.context(node).state
        assert state[keys.STATE_CLIENT][keys.STEPS] == 3 * 3  # rounds x local steps
        opt = state[keys.STATE_OPTIMIZER]
        assert any(k.endswith("/exp_avg") for k in opt.keys())


@pytest.mark.parametrize(
    "extra",
    [
        ["schedule=cosine", "schedule.warmup_steps=2"],
        ["optimizer=sgd", "sim.lr=0.1"],
        ["partition=iid", "task.client_shift=1.0"],
    ],
)
def test_options_run_end_to_end(run_tiny, extra):
    summary, rows, _ = run_tiny(*extra)
    assert summary["status"] == "ok" and len(rows) == 3


def _failing_clients(monkeypatch, should_fail):
    from fedsim.apps import client as client_mod

    original = client_mod.ClientRuntime.train

    def flaky(self, msg, context):
        client = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        if should_fail(client, server_round):
            raise RuntimeError("injected failure")
        return original(self, msg, context)

    monkeypatch.setattr(client_mod.ClientRuntime, "train", flaky)


def test_min_clients_not_met_keeps_the_model(run_tiny, monkeypatch):
    """Round 1 has one good reply (< sim.min_clients=2): skipped, the model is kept."""
    _failing_clients(monkeypatch, lambda client, rnd: rnd == 1 and client != 0)
    summary, rows, _ = run_tiny("sim.min_clients=2")
    first = rows[1]
    assert first["clients_ok"] == 1 and first["clients_failed"] == 3
    assert first["round_skipped"] is True and first["train_loss"] is None
    assert {f["reason"] for f in first["failures"]} == {"RuntimeError: injected failure"}
    assert sorted(f["client"] for f in first["failures"]) == [1, 2, 3]
    assert first["eval_accuracy"] == rows[0]["eval_accuracy"]  # the global model was kept
    assert rows[2]["round_skipped"] is False and rows[2]["clients_ok"] == 4
    assert summary["status"] == "ok"
    assert summary["rounds_skipped"] == 1 and summary["clients_failed_total"] == 3


def test_a_run_where_every_round_is_skipped_fails(tmp_path, monkeypatch):
    import json

    from fedsim.api import run
    from fedsim.apps.server import RunFailed

    _failing_clients(monkeypatch, lambda client, rnd: True)
    with pytest.raises(RunFailed, match="every round was skipped"):
        run(tiny(), output_dir=tmp_path / "r")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and "injected failure" in summary["error"]
    assert summary["rounds_skipped"] == 2


def test_no_path_appends_to_a_finished_run(tmp_path):
    from fedsim.errors import ConfigError
    from fedsim.flwr_run import spec_from_run_config
    from fedsim.results import ResultsWriter

    done = tmp_path / "done"
    done.mkdir()
    (done / "metrics.jsonl").write_text('{"round": 0}\n')
    with pytest.raises(ConfigError, match="already holds a run"):
        spec_from_run_config({"overrides": "sim.rounds=1", "output-dir": str(done)})
    with pytest.raises(FileExistsError):
        ResultsWriter(done).append_round({"round": 0})
    assert (done / "metrics.jsonl").read_text() == '{"round": 0}\n'


def test_inline_engine_matches_a_plain_pytorch_loop_on_text_with_dropout(run_tiny, hf_task):
    """fedsim runs a text model's dropout through fedsim.dropout (so that the batched engine
    can give each client its own masks); the plain loop runs torch's own dropout layers and
    sdpa's own attention dropout: on a CPU the runs are the same."""
    from benchmarks.plain_loop import plain_fedavg
    from fedsim.config import compose

    overrides = tiny(
        *hf_task, "adapter=lora", "sim.num_clients=6", "sim.rounds=2", "task.dropout=0.3"
    )
    _, rows, _ = run_tiny(base=overrides)
    ref = plain_fedavg(compose(overrides)[0])
    assert len(rows) == len(ref) == 3
    for got, want in zip(rows, ref):
        assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)
    undropped = plain_fedavg(compose([*overrides[:-1], "task.dropout=0"])[0])
    assert undropped[-1]["eval_loss"] != pytest.approx(ref[-1]["eval_loss"], rel=1e-6)


def test_quiet_prints_only_the_closing_line_with_the_run_folder(tmp_path):
    import subprocess
    import sys

    from tests.conftest import tiny

    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", *tiny("sim.rounds=1"), f"hydra.run.dir={out}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("done in ") and lines[0].endswith(f"-> {out}")
