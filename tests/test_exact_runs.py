"""Whole runs of every strategy of the exact-aggregation family on the inline engine: the
per-round aggregation error, and bytes equal to the formulas of docs/results.md for the clients
the seed sampled (first participations and catch-ups included)."""

from __future__ import annotations

import pytest

import tests.reference_numpy as ref
from fedsim.build import build_components
from fedsim.config import compose
from fedsim.strategy import ClientSampler
from tests.conftest import tiny

LAYERS = [(32, 32)] * 3  # the tiny synthetic net: three 32 -> 32 layers (hidden 32)
HEAD = 32 * 10 + 10
R = 8
N, K, ROUNDS = 4, 2, 3
RUN = [f"sim.clients_per_round={K}", f"sim.rounds={ROUNDS}"]


def sampled() -> list[list[int]]:
    sampler = ClientSampler(N, K, seed=0)
    return [sampler.train_clients(t) for t in range(1, ROUNDS + 1)]


def expected_bytes(strategy: str) -> list[tuple[int, int]]:
    """(bytes_up, bytes_down) of rounds 1..ROUNDS from the numpy formulas."""
    history = sampled()
    missed = ref.simulate_catch_up(history, N)
    out, seen = [], set()
    for t, clients in enumerate(history):
        up = down = 0
        for c in clients:
            if strategy == "fedavg":
                up += ref.bytes_fedit(LAYERS, R, HEAD)
                down += ref.bytes_fedit(LAYERS, R, HEAD)
            elif strategy == "ffa":
                up += ref.bytes_ffa(LAYERS, R, HEAD)
                down += ref.bytes_ffa(LAYERS, R, HEAD)
            elif strategy == "fedsa":
                up += ref.bytes_fedsa(LAYERS, R, HEAD)
                down += ref.bytes_fedsa(LAYERS, R, HEAD)
            elif strategy == "fedsb":
                up += ref.bytes_fedsb_up(LAYERS, R, HEAD)
                down += ref.bytes_fedsb_down(LAYERS, R, HEAD, c not in seen, data_derived=True)
            elif strategy == "fedex":
                up += ref.bytes_fedex_up(LAYERS, R, HEAD)
                down += ref.bytes_fedex_down(LAYERS, R, HEAD, [K] * len(missed[t][c]))
            elif strategy == "flora":
                up += ref.bytes_flora_up(LAYERS, R, HEAD)
                down += ref.bytes_flora_down(LAYERS, HEAD, [K * R] * len(missed[t][c]))
        seen.update(clients)
        out.append((up, down))
    return out


@pytest.mark.parametrize(
    "strategy", ["fedavg", "fedsb", "ffa", "fedex", "flora", "fedsa", "local", "centralized"]
)
def test_every_strategy_runs_with_its_exactness_and_exact_bytes(run_tiny, strategy):
    summary, rows, _ = run_tiny(f"strategy={strategy}", *RUN)
    assert summary["status"] == "ok" and len(rows) == ROUNDS + 1
    errors = [r["aggregation_error"] for r in rows]
    assert errors[0] is None  # round 0 aggregates nothing
    if strategy in ("fedsa", "local"):  # personalised: no global model
        assert errors[1:] == [None] * ROUNDS and summary["aggregation_error_max"] is None
        assert summary["final_eval_accuracy"] is None
        assert summary["final_eval_accuracy_client_mean"] is not None
    elif strategy == "fedavg":
        assert min(errors[1:]) > 1e-3  # FedIT on non-IID clients is not exact
    else:
        assert max(errors[1:]) <= 1e-9, errors
        assert summary["aggregation_error_max"] <= 1e-9
    got = [(r["bytes_up"], r["bytes_down"]) for r in rows[1:]]
    if strategy in ("local", "centralized"):
        assert got == [(0, 0)] * ROUNDS
    else:
        assert got == expected_bytes(strategy)
    assert summary["bytes_up_total"] == sum(u for u, _ in got)


def test_aggregation_error_can_be_switched_off(run_tiny):
    summary, rows, _ = run_tiny("sim.aggregation_error=false", *RUN)
    assert [r["aggregation_error"] for r in rows] == [None] * (ROUNDS + 1)
    assert summary["aggregation_error_max"] is None


def test_lora_sb_init_sources_are_stated_and_clients_init_is_round_0(run_tiny):
    summary, rows, _ = run_tiny("strategy=fedsb", *RUN)
    init = summary["adapter_init"]
    assert init["source"] == "server" and init["examples"] == 256
    assert "server split" in init["data"]
    assert rows[0]["bytes_up"] == rows[0]["bytes_down"] == 0

    summary, rows, _ = run_tiny("strategy=fedsb", "adapter.init.source=clients", *RUN)
    init = summary["adapter_init"]
    setup = ClientSampler(N, K, seed=0).train_clients(0)
    assert init["source"] == "clients" and init["clients"] == setup
    # ceil(256 / 2) = 128 examples asked of each set-up client; one with fewer uses all it has
    data = build_components(compose(tiny("strategy=fedsb", *RUN))[0]).data
    assert init["examples"] == sum(min(128, data.client(c).num_train) for c in setup)
    # each set-up client sends a dense gradient of every adapted base weight
    assert rows[0]["bytes_up"] == len(setup) * sum(4 * m * n for m, n in LAYERS)
    assert rows[0]["bytes_down"] == 0 and rows[0]["clients_ok"] == len(setup)
    assert summary["bytes_up_total"] == rows[0]["bytes_up"] + sum(r["bytes_up"] for r in rows[1:])

    summary, rows, _ = run_tiny("strategy=fedsb", "adapter.init.method=random", *RUN)
    assert summary["adapter_init"] == {"method": "random"}
    assert rows[1]["bytes_down"] == K * ref.bytes_fedsb_up(LAYERS, R, HEAD)  # B, A from the seed


def test_lora_sb_init_starts_from_the_approximated_first_step(run_tiny):
    _, base, _ = run_tiny("strategy=fedsb", "adapter.init.method=random", "sim.rounds=1")
    _, init, _ = run_tiny("strategy=fedsb", "sim.rounds=1")
    # random init: R = 0, the model is the base; gradient init: B R A is already a step
    assert base[0]["eval_loss"] != init[0]["eval_loss"]


def test_per_client_ranks_change_the_uplink(run_tiny):
    _, rows, _ = run_tiny("strategy=flora", "adapter.client_ranks=[8,4]", *RUN)
    history = sampled()
    for row, clients in zip(rows[1:], history):
        ranks = [[8, 4][c % 2] for c in clients]
        assert row["bytes_up"] == sum(ref.bytes_flora_up(LAYERS, r, HEAD) for r in ranks)
        assert row["aggregation_error"] <= 1e-9


def test_a_skipped_round_still_records_what_its_clients_received(run_tiny, monkeypatch):
    """Fed-SB: round 1 is skipped (one good reply < min_clients), yet the client that replied
    holds B, A and is not sent them again; the clients that failed are."""
    from tests.test_end_to_end import _failing_clients

    _failing_clients(monkeypatch, lambda client, rnd: rnd == 1 and client != 0)
    _, rows, _ = run_tiny("strategy=fedsb", "sim.min_clients=2")
    assert rows[1]["round_skipped"] and rows[2]["clients_ok"] == 4
    per_client = ref.bytes_fedsb_up(LAYERS, R, HEAD)
    broadcast = ref.bytes_fedsb_down(LAYERS, R, HEAD, True, True) - per_client
    assert rows[1]["bytes_down"] == 4 * (per_client + broadcast)
    assert rows[2]["bytes_down"] == 4 * per_client + 3 * broadcast
