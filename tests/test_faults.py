"""Injected client faults (fedsim.faults): seeded draws at the configured rates, delays from
their distributions, corruptions the server rejects, and every strategy surviving them."""

from __future__ import annotations

import math

import numpy as np
import pytest

import strategies.fedavg
from fedsim.errors import ConfigError
from fedsim.faults import Faults, corrupt_arrays

STRATEGIES = ["fedavg", "fedsb", "ffa", "fedex", "flora", "fedsa", "centralized", "local"]


def test_draws_are_seeded_at_the_configured_rates_and_independent():
    f = Faults(crash_prob=0.2, straggler_prob=0.3, corrupt_prob=0.25, deadline=10.0)
    draws = [f.draw(7, r, c) for r in range(1, 101) for c in range(100)]
    assert draws == [f.draw(7, r, c) for r in range(1, 101) for c in range(100)]
    assert draws != [f.draw(8, r, c) for r in range(1, 101) for c in range(100)]
    n = len(draws)  # 10,000 draws: the rates within 4 standard errors
    crash = np.mean([d.crash for d in draws])
    alive = [d for d in draws if not d.crash]
    straggle = np.mean([d.straggler for d in alive])
    in_time = [d for d in alive if not f.late(d.delay)]
    corrupt = np.mean([d.corrupt is not None for d in in_time])
    for got, p, m in ((crash, 0.2, n), (straggle, 0.3, len(alive)), (corrupt, 0.25, len(in_time))):
        assert abs(got - p) < 4 * math.sqrt(p * (1 - p) / m), (got, p)
    assert all(not d.straggler and d.corrupt is None for d in draws if d.crash)
    assert not any(f.late(d.delay) and d.corrupt for d in draws)  # dropped unread: not spoiled
    # one probability does not move the other faults' draws
    g = Faults(crash_prob=0.0, straggler_prob=0.3, corrupt_prob=0.25, deadline=10.0)
    other = [g.draw(7, r, c) for r in range(1, 101) for c in range(100)]
    assert [d for d in draws if not d.crash] == [o for d, o in zip(draws, other) if not d.crash]
    kinds = {d.corrupt for d in draws} - {None}
    assert kinds == {"nan", "inf", "shape"}
    assert Faults().draw(0, 1, 1) == Faults(name="none").draw(0, 1, 1)
    assert not Faults().active


@pytest.mark.parametrize(
    "delay, mean, median",
    [
        ("constant", 3.0, 3.0),
        ("uniform", 3.0, 3.0),  # on [0, 6]
        ("exponential", 3.0, 3.0 * math.log(2)),
        ("lognormal", 3.0 * math.exp(0.5**2 / 2), 3.0),  # sigma 0.5, median 3
    ],
)
def test_delays_follow_their_distributions(delay, mean, median):
    f = Faults(straggler_prob=1.0, delay=delay, delay_scale=3.0, delay_shape=0.5)
    d = np.array([f.draw(0, r, c).delay for r in range(1, 201) for c in range(100)])
    assert np.all(d > 0)
    assert abs(d.mean() - mean) < 0.03 * mean + 1e-12
    assert abs(np.median(d) - median) < 0.03 * median + 1e-12
    if delay == "uniform":
        assert d.max() <= 6.0
    late = Faults(straggler_prob=1.0, delay=delay, delay_scale=3.0, delay_shape=0.5, deadline=4)
    assert late.late(4.01) and not late.late(4.0) and not Faults().late(1e9)


def test_corruptions_spoil_one_value_or_the_shape_and_leave_the_input_alone():
    arrays = {"a": np.ones((3, 4), np.float32), "b": np.arange(5.0), "i": np.arange(3)}
    before = {k: v.copy() for k, v in arrays.items()}
    for kind, check in (("nan", np.isnan), ("inf", np.isinf)):
        out = corrupt_arrays(arrays, kind, 0, 1, 2)
        bad = sum(int(check(v).sum()) for v in out.values() if v.dtype.kind == "f")
        assert bad == 1
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in arrays.items()}
    out = corrupt_arrays(arrays, "shape", 0, 1, 2)
    changed = [k for k in arrays if out[k].shape != arrays[k].shape]
    assert len(changed) == 1 and out[changed[0]].size == arrays[changed[0]].size + 1
    assert all(np.array_equal(arrays[k], before[k]) for k in arrays)
    assert list(corrupt_arrays({}, "nan", 0, 1, 2)) == ["corrupt"]  # nothing sent: an extra one
    assert corrupt_arrays({"i": np.arange(3)}, "inf", 0, 1, 2)["i"].shape == (4,)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"crash_prob": 1.5}, "faults.crash_prob=1.5: must be a number in [0, 1]"),
        ({"straggler_prob": -0.1}, "faults.straggler_prob=-0.1"),
        ({"corrupt_prob": float("nan")}, "faults.corrupt_prob=nan"),
        ({"delay": "gamma"}, "faults.delay=gamma: must be one of constant, uniform"),
        ({"delay_scale": 0}, "faults.delay_scale=0"),
        ({"deadline": 0}, "faults.deadline=0"),
        ({"corrupt_kinds": []}, "faults.corrupt_kinds=[]: must be a non-empty list"),
        ({"corrupt_kinds": ["nan", "zero"]}, "faults.corrupt_kinds=['nan', 'zero']"),
    ],
)
def test_bad_fault_settings_name_the_value(kwargs, message):
    with pytest.raises(ConfigError) as info:
        Faults(**kwargs)
    assert message in str(info.value)


def _check_round_bookkeeping(rows):
    for r in rows[1:]:
        kinds = [f["kind"] for f in r["failures"]]
        inj = r["faults_injected"]
        assert kinds.count("error") == inj["crash"], r
        assert kinds.count("late") == inj["late"], r
        assert kinds.count("rejected") == inj["corrupt"], r
        assert r["clients_ok"] + r["clients_failed"] == r["clients_sampled"]
        assert r["clients_failed"] == len(r["failures"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_survives_injected_faults(strategy, run_tiny):
    least = 1 if strategy == "centralized" else 2  # one pooled trainer
    summary, rows, _ = run_tiny(
        f"strategy={strategy}",
        "faults=mixed",
        "faults.crash_prob=0.25",
        "faults.straggler_prob=0.4",
        "faults.delay_scale=8",
        "faults.corrupt_prob=0.3",
        "sim.rounds=5",
        "sim.num_clients=6",
        "sim.clients_per_round=4",
        f"sim.min_clients={least}",
    )
    assert summary["status"] == "ok"
    _check_round_bookkeeping(rows)
    injected = summary["faults_injected_total"]
    assert injected == {k: sum(r["faults_injected"][k] for r in rows[1:]) for k in injected}
    failed = summary["clients_failed_by_kind"]
    assert sum(failed.values()) == summary["clients_failed_total"] > 0
    assert failed.get("error", 0) == injected["crash"]
    assert failed.get("rejected", 0) == injected["corrupt"]
    for prev, r in zip(rows, rows[1:]):  # a skipped round keeps the global model
        assert r["round_skipped"] == (r["clients_ok"] < least)
        if r["round_skipped"] and r["eval_loss"] is not None:
            assert r["eval_loss"] == prev["eval_loss"]


def test_faults_are_the_same_in_every_run_and_the_seed_moves_them(run_tiny):
    extra = ("faults=mixed", "faults.corrupt_prob=0.4", "sim.rounds=4")
    a = run_tiny(*extra)[1]
    b = run_tiny(*extra)[1]
    c = run_tiny(*extra, "sim.seed=1")[1]
    failures = [[r["failures"] for r in rows] for rows in (a, b, c)]
    assert failures[0] == failures[1] != failures[2]


def test_corrupted_updates_never_reach_the_aggregator(run_tiny, monkeypatch):
    seen = []
    inner = strategies.fedavg.FedAvg.aggregate

    def watched(self, server_round, current, updates):
        for u in updates:
            for k, v in u.arrays.items():
                assert v.shape == current[k].shape and np.all(np.isfinite(v)), k
            seen.append((server_round, u.client))
        return inner(self, server_round, current, updates)

    monkeypatch.setattr(strategies.fedavg.FedAvg, "aggregate", watched)
    summary, rows, _ = run_tiny("faults=corrupt", "faults.corrupt_prob=0.5", "sim.rounds=6")
    rejected = {(r["round"], f["client"]) for r in rows for f in r["failures"]}
    assert summary["faults_injected_total"]["corrupt"] == len(rejected) > 0
    assert rejected.isdisjoint(seen)
    assert len(seen) + len(rejected) == sum(r["clients_sampled"] for r in rows)
    reasons = [f["reason"] for r in rows for f in r["failures"]]
    assert all(r.startswith(("non-finite values in ", "malformed reply: ")) for r in reasons)
    assert any("has shape" in r for r in reasons)


@pytest.mark.parametrize(
    "extra",
    [
        ("compressor=topk", "compressor.ratio=0.2", "feedback=ef21"),
        ("compressor=qsgd",),
        ("privacy=dpsgd", "privacy.noise_multiplier=0.5", "privacy.target_epsilon=null"),
        (
            "privacy=central",
            "privacy.noise_multiplier=0.1",
            "privacy.target_epsilon=null",
            "sim.clients_per_round=2",
        ),
        ("downlink=topk", "downlink.ratio=0.3"),
    ],
    ids=["ef21-topk", "qsgd", "dpsgd", "central", "ef21p"],
)
def test_faults_compose_with_compression_and_privacy(extra, run_tiny):
    summary, rows, _ = run_tiny(
        "faults=mixed", "faults.corrupt_prob=0.3", "faults.crash_prob=0.2", "sim.rounds=4", *extra
    )
    assert summary["status"] == "ok"
    _check_round_bookkeeping(rows)
    assert summary["clients_failed_total"] > 0


@pytest.mark.parametrize(
    "compressor",
    [
        ["compressor=topk"],
        ["compressor=randk", "compressor.shared_seed=false"],
        ["compressor=qsgd"],
        ["compressor=qsgd", "compressor.block=16"],
        ["compressor=compeft"],
        ["compressor=topk", "feedback=ef21", "feedback.compress_first=true"],
        ["compressor=cast"],
        ["compressor=cast", "compressor.dtype=float16"],
    ],
    ids=["topk", "randk-indices", "qsgd", "qsgd-blocks", "compeft", "ef21", "bf16", "fp16"],
)
@pytest.mark.parametrize("kind", ["shape", "nan"])
def test_every_corrupted_payload_is_rejected(compressor, kind, run_tiny):
    summary, rows, _ = run_tiny(
        "faults=corrupt", "faults.corrupt_prob=0.6", f"faults.corrupt_kinds=[{kind}]", *compressor
    )
    injected = summary["faults_injected_total"]["corrupt"]
    assert injected > 0 and summary["clients_failed_by_kind"] == {"rejected": injected}
    _check_round_bookkeeping(rows)


def test_stragglers_without_a_deadline_are_waited_for(run_tiny):
    summary, rows, _ = run_tiny("faults=stragglers", "faults.deadline=null", "sim.rounds=3")
    assert summary["faults_injected_total"]["straggler"] > 0
    assert summary["clients_failed_total"] == 0
    summary, rows, _ = run_tiny("faults=stragglers", "faults.deadline=0.001", "sim.rounds=3")
    late = [f for r in rows for f in r["failures"] if f["kind"] == "late"]
    assert len(late) == summary["faults_injected_total"]["straggler"] > 0
    assert late[0]["reason"].startswith("late: simulated delay")


def test_every_round_failing_fails_the_run_with_the_reason(run_tiny):
    from fedsim.apps.server import RunFailed

    with pytest.raises(RunFailed, match="every round was skipped.*injected crash"):
        run_tiny("faults=crash", "faults.crash_prob=1.0")
