"""RoLoRA (strategy=rolora): alternating factors, checked against a direct numpy version of
two rounds, exact aggregation in a run, the bytes of every round against the arithmetic, a
frozen factor that does not move, DP-SGD's accounting, and a resume after an A round."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.adapters import LoRA
from fedsim.adapters.base import AdapterSpec
from fedsim.api import run
from fedsim.records import array_record, numpy_dict
from fedsim.results import read_metrics
from fedsim.strategy import ClientSampler, ClientUpdate, StrategyContext
from strategies.rolora import STATE_HELD, RoLoRA
from tests.conftest import tiny
from tests.test_checkpoint import interrupted_equals_uninterrupted

M, N, R, HEAD = 6, 5, 2, (3, 4)
A, B, H = "l.lora_A.weight", "l.lora_B.weight", "head.weight"


def _strategy(**kw) -> RoLoRA:
    spec = AdapterSpec(
        trained=[A, B, H],
        sent=[A, B, H],
        adapted_modules=["l"],
        factors={"l": {"lora_A.weight": A, "lora_B.weight": B}},
        heads=[H],
        shapes={"l": (M, N)},
        adapter=LoRA(r=R, alpha=2 * R),
    )
    s = RoLoRA(**kw)
    s.bind(StrategyContext(ClientSampler(4, 3, 0), {c: c for c in range(4)}, spec, 0))
    return s


def test_two_rounds_against_numpy():
    """Round 1 averages B (A shared), round 2 averages A (B shared), weighted by examples;
    the product of the new factors is the weighted mean of the clients' products."""
    rng = np.random.default_rng(0)
    s = _strategy()
    scale = 1.0  # alpha / r
    cur = {A: rng.normal(size=(R, N)), B: rng.normal(size=(M, R)), H: rng.normal(size=HEAD)}
    n = [10, 30, 60]
    p = np.array(n) / sum(n)
    for server_round, factor in [(1, B), (2, A)]:
        assert s.round_trained(s.context.spec, server_round) == [factor, H]
        sent = [{factor: rng.normal(size=cur[factor].shape), H: rng.normal(size=HEAD)} for _ in n]
        updates = [ClientUpdate(i, a, k, {}) for i, (a, k) in enumerate(zip(sent, n))]
        new = s.aggregate(server_round, cur, updates)
        want = {**cur, factor: sum(w * a[factor] for w, a in zip(p, sent))}
        want[H] = sum(w * a[H] for w, a in zip(p, sent))
        for k in cur:
            np.testing.assert_allclose(new[k], want[k], rtol=1e-14, atol=1e-14)
        # exact: s B' A' = sum_i p_i s B_i A_i, each client's frozen factor the global one
        ideal = sum(w * scale * ({**cur, **a}[B] @ {**cur, **a}[A]) for w, a in zip(p, sent))
        np.testing.assert_allclose(scale * new[B] @ new[A], ideal, rtol=1e-12, atol=1e-14)
        cur = new


def test_first_a_and_bad_first():
    s = _strategy(first="A")
    assert [s.factor(t) for t in (1, 2, 3)] == ["A", "B", "A"]
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy.first=C: must be A or B"):
        RoLoRA(first="C")


def test_downlink_sends_only_what_the_client_lacks():
    s = _strategy()
    full = array_record({A: np.zeros((R, N)), B: np.zeros((M, R)), H: np.zeros(HEAD)})
    assert set(s.downlink(1, 0, full).keys()) == {A, B, H}  # never synced: both
    s.acknowledge(1, [ClientUpdate(0, {}, 1, {})])
    assert set(s.downlink(2, 0, full).keys()) == {B, H}  # B was aggregated in round 1
    s.acknowledge(2, [])  # its round-2 reply lost: the server does not know it holds B
    assert set(s.downlink(3, 0, full).keys()) == {A, B, H}
    s.acknowledge(3, [ClientUpdate(0, {}, 1, {})])
    assert set(s.downlink(4, 0, full).keys()) == {B, H}  # B aggregated in round 3
    assert set(s.downlink(6, 0, full).keys()) == {A, B, H}  # absent in round 4 and 5
    s.load_state_dict(s.state_dict())
    assert s.synced == {0: 3}


def _sizes(args):
    from fedsim.build import build_components
    from fedsim.config import compose

    c = build_components(compose(args)[0])
    _, spec = c.model()
    params = spec.parameters_of(c.model()[0])
    size = {n: params[n].numel() * 4 for n in spec.trained}  # float32

    def total(names):
        return sum(size[n] for n in names)

    a = total(names["lora_A.weight"] for names in spec.factors.values())
    b = total(names["lora_B.weight"] for names in spec.factors.values())
    return a, b, total(spec.heads)


def test_run_is_exact_and_bytes_follow_the_arithmetic(tmp_path):
    """Partial participation (3 of 6 clients, 6 rounds): the aggregation error is float
    rounding in every round (FedIT's is not); each round uploads the trained factor and the
    head per client, and downloads the head plus the factors each client lacks."""
    args = tiny("strategy=rolora", "sim.num_clients=6", "sim.clients_per_round=3", "sim.rounds=6")
    run(args, output_dir=tmp_path / "rolora")
    rows = read_metrics(tmp_path / "rolora")[1:]
    assert all(r["aggregation_error"] < 1e-13 for r in rows)
    run([*args, "strategy=fedavg"], output_dir=tmp_path / "fedit")
    fedit = read_metrics(tmp_path / "fedit")[1:]
    assert max(r["aggregation_error"] for r in fedit[1:]) > 1e-4
    a, b, head = _sizes(args)
    sampler, synced = ClientSampler(6, 3, 0), {}
    for row in rows:
        t = row["round"]
        trained = b if t % 2 == 1 else a
        held = b if t % 2 == 1 else a  # what a client synced in round t - 1 holds already
        clients = sampler.train_clients(t)
        assert row["bytes_up"] == len(clients) * (trained + head)
        down = 0
        for c in clients:
            recent = c in synced and t - synced[c] < 2
            down += head + a + b - (held if recent else 0)
            synced[c] = t
        assert row["bytes_down"] == down
        if t >= 2:  # FedIT sends both factors both ways
            assert fedit[t - 1]["bytes_up"] == len(clients) * (a + b + head)
            assert row["bytes_up"] < fedit[t - 1]["bytes_up"]


@pytest.mark.parametrize(
    "extra",
    [
        ("sim.keep_optimizer_state=true", "sim.prox_mu=0.1", "optimizer.weight_decay=0.1"),
        ("privacy=dpsgd", "sim.prox_mu=0.1"),
        ("engine=batched", "optimizer.weight_decay=0.1"),
        ("engine=batched", "privacy=dpsgd"),
    ],
)
def test_the_frozen_factor_does_not_move(extra, tmp_path, monkeypatch):
    """AdamW with weight decay and kept state (its moments of the frozen factor from an earlier
    round), FedProx, DP-SGD, the batched engine: after its local steps, every client's frozen
    factor is bit for bit the global one it received, and it sends the trained factor only."""
    seen = []
    original = RoLoRA.client_send

    def checked(self, model, spec, call):
        params = spec.parameters_of(model)
        held = numpy_dict(call.state[STATE_HELD])
        frozen = [n for n in spec.trained if n not in self.round_trained(spec, call.server_round)]
        assert frozen and all(np.array_equal(params[n].detach().numpy(), held[n]) for n in frozen)
        sent = original(self, model, spec, call)
        assert not set(sent) & set(frozen)
        seen.append(call.server_round)
        return sent

    monkeypatch.setattr(RoLoRA, "client_send", checked)
    run(tiny("strategy=rolora", "sim.rounds=3", *extra), output_dir=tmp_path / "run")
    assert sorted(set(seen)) == [1, 2, 3]
    assert all(r["aggregation_error"] < 1e-13 for r in read_metrics(tmp_path / "run")[1:])


def test_batched_equals_inline(tmp_path):
    plain = tiny("strategy=rolora", "sim.rounds=3")
    run(plain, output_dir=tmp_path / "a")
    run([*plain, "engine=batched"], output_dir=tmp_path / "b")
    x, y = read_metrics(tmp_path / "a")[1:], read_metrics(tmp_path / "b")[1:]
    for r, q in zip(x, y):
        assert q["aggregation_error"] < 1e-13
        assert q["eval_loss"] == pytest.approx(r["eval_loss"], rel=1e-5)


def test_dpsgd_accounting_is_fedits(tmp_path):
    """DP-SGD clips and noises the trained factor only; each client's epsilon is FedIT's
    (the same steps at the same sampling rate and noise)."""
    dp = ["privacy=dpsgd", "sim.rounds=3"]
    got = run(tiny("strategy=rolora", *dp), output_dir=tmp_path / "rolora")
    want = run(tiny("strategy=fedavg", *dp), output_dir=tmp_path / "fedit")
    assert got["status"] == want["status"] == "ok"
    rows = read_metrics(tmp_path / "rolora")[1:]
    assert all(r["aggregation_error"] < 1e-13 for r in rows)
    eps = [(r["epsilon"], r["epsilon_mean"]) for r in rows]
    assert eps == [(r["epsilon"], r["epsilon_mean"]) for r in read_metrics(tmp_path / "fedit")[1:]]
    assert 0 < eps[-1][0] <= 8.0  # privacy.target_epsilon


def test_resume_after_an_a_round_is_bit_identical(tmp_path, monkeypatch):
    args = tiny("strategy=rolora", "sim.rounds=4", "sim.num_clients=5", "sim.clients_per_round=2")
    interrupted_equals_uninterrupted(tmp_path, monkeypatch, args, at=2)
