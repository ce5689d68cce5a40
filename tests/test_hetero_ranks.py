"""Heterogeneous client ranks: adapter.client_ranks, HetLoRA, FlexLoRA (docs/strategies.md).

Every aggregation is checked against a direct numpy transcription of the paper's equation on
small random factors; runs check the bytes per client, the diagnostic and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from fedsim.adapters import LoRA
from fedsim.adapters.ranks import assign, parse, tier_counts
from fedsim.errors import ConfigError
from fedsim.messages import ClientUpdate
from fedsim.resume import comparable, upgrade, with_later_keys
from fedsim.strategy import ClientSampler, StrategyContext
from strategies.flexlora import FlexLoRA
from strategies.hetlora import HetLoRA, keep_rank
from tests.conftest import tiny
from tests.test_checkpoint import interrupted_equals_uninterrupted
from tests.test_exact_family import adapted

ALPHA, RMAX = 4.0, 6
RANKS = [2, 4, 6, 4]
A, B = "lora_A.weight", "lora_B.weight"


# ----------------------------------------------------------------------------- assignment


def test_a_list_repeats_over_the_clients():
    assert assign(parse([2, 4, 8], 8), 7, seed=0) == [2, 4, 8, 2, 4, 8, 2]
    with pytest.raises(ConfigError, match="more entries than sim.num_clients=2"):
        assign(parse([2, 4, 8], 8), 2, seed=0)


def test_tiers_round_by_largest_remainder_and_draw_from_the_seed():
    # 7 clients: exact 2.8, 2.1, 2.1 -> floors 2, 2, 2, the one left to the largest remainder
    assert tier_counts({4: 0.4, 8: 0.3, 16: 0.3}, 7) == {4: 3, 8: 2, 16: 2}
    # ties go to the tier listed first: 3 clients, 1.5 / 1.5
    assert tier_counts({8: 0.5, 4: 0.5}, 3) == {8: 2, 4: 1}
    tiers = parse({4: 0.4, 8: 0.3, 16: 0.3}, 16)
    ranks = assign(tiers, 10, seed=0)
    assert sorted(ranks) == [4] * 4 + [8] * 3 + [16] * 3
    assert assign(tiers, 10, seed=0) == ranks  # seeded
    assert any(assign(tiers, 10, seed=s) != ranks for s in range(1, 5))
    want = [
        [4, 4, 4, 4, 8, 8, 8, 16, 16, 16][i]
        for i in np.random.default_rng(np.random.SeedSequence([0, 2101])).permutation(10)
    ]
    assert ranks == want


@pytest.mark.parametrize(
    "value, says",
    [
        ({4: 0.5, 8: 0.3}, "must sum to 1"),
        ({4: 1.5}, "fractions in (0, 1]"),
        ([0, 2], "at least 1"),
        ([2, 9], "at most adapter.r=8"),
        ("four", "must be null, a list"),
    ],
)
def test_bad_ranks_are_config_errors(value, says):
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace("]", r"\]")):
        LoRA(r=8, client_ranks=value)


def test_a_rank_above_a_layer_is_refused_naming_client_ranks():
    with pytest.raises(
        ConfigError, match=r"adapter.client_ranks=\[32\]: its rank 32 must be at most min"
    ):
        adapted(LoRA(r=32, alpha=ALPHA, client_ranks=[32]))


# ----------------------------------------------------------------------------- fixtures


def bound(strategy, ranks=RANKS):
    model, spec = adapted(LoRA(r=RMAX, alpha=ALPHA))
    strategy.client_ranks = list(ranks)
    ctx = StrategyContext(ClientSampler(len(ranks), len(ranks), 0), {}, spec, 0)
    strategy.bind(ctx)
    current = strategy.initial_arrays(model, spec)
    strategy.current = current
    return model, spec, current


def updates_at(spec, ranks, rng, heads_like):
    out = []
    for c, r in enumerate(ranks):
        arrays = {h: rng.normal(size=v.shape) for h, v in heads_like.items()}
        for module, (m, n) in spec.shapes.items():
            arrays[spec.factors[module][A]] = rng.normal(size=(r, n))
            arrays[spec.factors[module][B]] = rng.normal(size=(m, r))
        out.append(ClientUpdate(client=c, arrays=arrays, num_examples=5 + 3 * c, metrics={}))
    return out


# ----------------------------------------------------------------------------- HetLoRA


def hetlora_numpy(bs, as_, rmax):
    """The paper's zero-padding and sparsity weights, written out."""
    norms = [np.linalg.norm(b @ a, "fro") for b, a in zip(bs, as_)]
    w = np.array(norms) / sum(norms)
    m, n = bs[0].shape[0], as_[0].shape[1]
    pa = [np.vstack([a, np.zeros((rmax - a.shape[0], n))]) for a in as_]
    pb = [np.hstack([b, np.zeros((m, rmax - b.shape[1]))]) for b in bs]
    return sum(wi * a for wi, a in zip(w, pa)), sum(wi * b for wi, b in zip(w, pb)), w


def test_hetlora_aggregates_as_the_paper():
    strategy = HetLoRA()
    _, spec, current = bound(strategy)
    heads = {h: current[h] for h in spec.heads}
    updates = updates_at(spec, [2, 4, 6], np.random.default_rng(0), heads)
    new = strategy.aggregate(1, current, updates)
    p = np.array([u.num_examples for u in updates], float)
    p /= p.sum()
    for h in spec.heads:
        np.testing.assert_allclose(new[h], sum(pi * u.arrays[h] for pi, u in zip(p, updates)))
    for module in spec.adapted_modules:
        f = spec.factors[module]
        a, b, _ = hetlora_numpy(
            [u.arrays[f[B]] for u in updates], [u.arrays[f[A]] for u in updates], RMAX
        )
        np.testing.assert_allclose(new[f[A]], a, rtol=1e-12)
        np.testing.assert_allclose(new[f[B]], b, rtol=1e-12)


def test_hetlora_diagnostic_is_the_padding_and_product_loss():
    from fedsim.strategy.diagnostic import aggregation_error

    strategy = HetLoRA()
    _, spec, current = bound(strategy)
    rng = np.random.default_rng(1)
    for module, (m, _) in spec.shapes.items():  # a global B that is not zero
        current[spec.factors[module][B]] = rng.normal(size=(m, RMAX)).astype(np.float32)
    heads = {h: current[h] for h in spec.heads}
    updates = updates_at(spec, [2, 4, 6], rng, heads)
    new = strategy.aggregate(1, current, updates)
    ideal = strategy.diagnostic_ideal(spec, {}, current, updates)
    s = ALPHA / RMAX
    worst = 0.0
    for module in spec.adapted_modules:
        f = spec.factors[module]
        bs, as_ = [u.arrays[f[B]] for u in updates], [u.arrays[f[A]] for u in updates]
        a, b, w = hetlora_numpy(bs, as_, RMAX)
        a0, b0 = current[f[A]].astype(float), current[f[B]].astype(float)
        want = sum(
            wi * s * (bi @ ai - b0[:, : ai.shape[0]] @ a0[: ai.shape[0]])
            for wi, bi, ai in zip(w, bs, as_)
        )
        np.testing.assert_allclose(ideal[module], want, rtol=1e-10)
        got = s * (b @ a - b0 @ a0)
        worst = max(worst, np.linalg.norm(got - want) / np.linalg.norm(want))
    measured = aggregation_error(spec, {}, np.ones(3) / 3, current, new, updates, {}, ideal)
    assert measured == pytest.approx(worst, rel=1e-9) and measured > 0.1


def test_hetlora_sends_each_client_its_truncation_and_prunes():
    strategy = HetLoRA(prune_gamma=0.5, prune_lambda=1.0)
    model, spec, current = bound(strategy)
    from fedsim.records import array_record, numpy_dict

    got = numpy_dict(strategy.downlink(1, 1, array_record(current)))
    f = spec.factors[spec.adapted_modules[0]]
    np.testing.assert_array_equal(got[f[A]], current[f[A]][:4])
    assert got[f[B]].shape == (current[f[B]].shape[0], 4)
    # the client: its rank from the shape, the regulariser's gradient, the pruning rule
    call = type("Call", (), {"client": 1, "server_round": 1, "seed": 0, "state": {}})()
    rng = np.random.default_rng(3)
    got[f[B]] = rng.normal(size=got[f[B]].shape).astype(np.float32)
    strategy.client_receive(model, spec, got, call)
    params = spec.parameters_of(model)
    assert not params[f[A]][4:].any() and not params[f[B]][:, 4:].any()
    penalty = strategy.local_penalty(spec, call)
    names = spec.trained
    tensors = [params[n] for n in names]
    for t in tensors:
        t.grad = None
    penalty(names, tensors)
    k = keep_rank(4, 0.5)
    a = params[f[A]].detach().clone().requires_grad_(True)
    b = params[f[B]].detach().clone().requires_grad_(True)
    (1.0 * a[k:4].norm() * b[:, k:4].norm()).backward()
    torch.testing.assert_close(params[f[A]].grad, a.grad)
    torch.testing.assert_close(params[f[B]].grad, b.grad)
    with torch.no_grad():  # shrink every tail: the client prunes to k
        for module in spec.adapted_modules:
            params[spec.factors[module][B]][:, k:4] *= 0.5
    sent = strategy.sent_arrays(model, spec, call)
    assert sent[f[A]].shape[0] == k == 2


# ----------------------------------------------------------------------------- FlexLoRA


def test_flexlora_averages_full_updates_and_sends_truncated_svds():
    strategy = FlexLoRA()
    _, spec, current = bound(strategy)
    heads = {h: current[h] for h in spec.heads}
    updates = updates_at(spec, RANKS, np.random.default_rng(2), heads)
    strategy.aggregate(1, current, updates)
    p = np.array([u.num_examples for u in updates], float)
    p /= p.sum()
    for module in spec.adapted_modules:
        f = spec.factors[module]
        dw = sum(
            pi * (ALPHA / u.arrays[f[A]].shape[0]) * (u.arrays[f[B]] @ u.arrays[f[A]])
            for pi, u in zip(p, updates)
        )
        np.testing.assert_allclose(strategy.base_delta[module], dw, rtol=1e-12)
    strategy.initial_a = {m: v.astype(np.float64) for m, v in strategy.initial_a.items()}
    for client, r in enumerate(RANKS):
        sent = strategy.factors(client)
        for module in spec.adapted_modules:
            f = spec.factors[module]
            u, s, vt = np.linalg.svd(strategy.base_delta[module])
            best = (u[:, :r] * s[:r]) @ vt[:r]
            product = (ALPHA / r) * sent[f[B]] @ sent[f[A]]
            assert sent[f[A]].shape == (r, spec.shapes[module][1])
            np.testing.assert_allclose(product, best, atol=1e-10)


def test_flexlora_diagnostic_is_the_truncation_loss():
    strategy = FlexLoRA()
    _, spec, current = bound(strategy)
    heads = {h: current[h] for h in spec.heads}
    rng = np.random.default_rng(4)
    strategy.aggregate(1, current, updates_at(spec, RANKS, rng, heads))
    before = dict(strategy.base_delta)
    updates = updates_at(spec, RANKS, rng, heads)
    strategy.aggregate(2, current, updates)
    ideal = strategy.diagnostic_ideal(spec, {}, current, updates)
    p = np.array([u.num_examples for u in updates], float)
    p /= p.sum()
    for module in spec.adapted_modules:
        u_, s_, vt = np.linalg.svd(before[module])
        lost = sum(pi * (before[module] - (u_[:, :r] * s_[:r]) @ vt[:r]) for pi, r in zip(p, RANKS))
        got = strategy.round_fold[module]
        np.testing.assert_allclose(got - ideal[module], -lost, atol=1e-10)


# ----------------------------------------------------------------------------- runs


def _ranks_run(run_tiny, strategy, ranks, *extra):
    return run_tiny(f"strategy={strategy}", "adapter.r=8", f"adapter.client_ranks={ranks}", *extra)


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora", "flora"])
def test_bytes_follow_each_clients_rank(run_tiny, strategy):
    summary, rows, folder = _ranks_run(
        run_tiny,
        strategy,
        "[2,4,8,8]",
        "strategy.prune_lambda=0" if strategy == "hetlora" else "sim.seed=0",
    )
    from fedsim.build import build_components

    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    model, spec = build_components(cfg).model()
    layers = sum(m + n for m, n in spec.shapes.values())
    head = sum(p.numel() for n, p in spec.parameters_of(model).items() if n in spec.heads)
    want_up = 4 * sum(head + r * layers for r in [2, 4, 8, 8])  # fp32, every client
    assert rows[1]["bytes_up"] == want_up
    if strategy != "flora":
        assert rows[1]["bytes_down"] == want_up  # the same ranks come down
    assert summary["status"] == "ok"
    assert all(r["aggregation_error"] is not None for r in rows[1:])


def test_flora_reads_adapter_client_ranks():
    from fedsim.build import build_components
    from fedsim.config import compose

    cfg, _ = compose(tiny("strategy=flora", "adapter.client_ranks=[2,4,8]", "sim.num_clients=6"))
    assert build_components(cfg).strategy.client_ranks == [2, 4, 8, 2, 4, 8]


@pytest.mark.parametrize(
    "extra",
    [
        ("strategy=hetlora", "strategy.prune_gamma=0.5", "strategy.prune_lambda=0.5"),
        ("strategy=flexlora",),
    ],
    ids=["hetlora", "flexlora"],
)
def test_resume_is_bit_identical(extra, tmp_path, monkeypatch):
    args = tiny(
        *extra,
        "adapter.r=8",
        "adapter.client_ranks={2: 0.4, 4: 0.3, 8: 0.3}",
        "sim.rounds=4",
        "sim.num_clients=5",
        "sim.clients_per_round=3",
    )
    interrupted_equals_uninterrupted(tmp_path, monkeypatch, args, at=2)


def test_an_older_config_with_strategy_client_ranks_still_loads():
    old = {
        "adapter": {"_target_": "fedsim.adapters.LoRA", "r": 8, "alpha": 16},
        "strategy": {
            "_target_": "strategies.flora.FLoRA",
            "weighted": True,
            "client_ranks": [2, 4],
        },
    }
    new = upgrade(old)
    assert new["strategy"] == {"_target_": "strategies.flora.FLoRA", "weighted": True}
    assert new["adapter"]["client_ranks"] == [2, 4]
    none = upgrade({**old, "strategy": {**old["strategy"], "client_ranks": None}})
    assert "client_ranks" not in none["strategy"] and "client_ranks" not in none["adapter"]
    cfg = {
        "adapter": {**old["adapter"], "client_ranks": [2, 4]},
        "strategy": {"_target_": "strategies.flora.FLoRA", "weighted": True},
    }
    assert comparable(with_later_keys(old, cfg)) == comparable(cfg)
    tiers = {"adapter": {"client_ranks": {4: 0.5, 8: 0.5}}}
    assert comparable(tiers) == comparable({"adapter": {"client_ranks": {"4": 0.5, "8": 0.5}}})
