"""Client DP-SGD: epsilon equals Opacus' RDP accountant computed independently, persists and
grows across rounds, respects a target; clipping bounds the update; the noise has its variance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from fedsim.privacy import DPSGD, Accountant, train_local_dp, wrap
from fedsim.tasks.base import Task
from fedsim.training import ConstantSchedule
from tests.conftest import tiny


def opacus_epsilon(history, delta):
    accountant = RDPAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def test_accountant_equals_opacus_rdp_accountant():
    history = [(1.1, 0.05, 30), (0.8, 0.2, 10), (1.1, 0.05, 5)]
    acc = Accountant([])
    for sigma, q, steps in history:
        for _ in range(steps):
            acc.step(sigma, q)
    got = Accountant.from_array(acc.to_array()).epsilon(1e-5)  # through the stored form
    assert got == pytest.approx(opacus_epsilon(history, 1e-5), rel=1e-6)


def test_epsilon_persists_grows_and_matches_opacus_per_client(run_tiny):
    summary, rows, _ = run_tiny(
        "privacy=dpsgd",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.0",
        "sim.clients_per_round=2",
        "sim.rounds=4",
    )
    eps = [r["epsilon"] for r in rows[1:]]
    assert all(b >= a for a, b in zip(eps, eps[1:])) and eps[-1] > eps[0]
    assert all(r["epsilon_mean"] <= r["epsilon"] for r in rows[1:])
    # independently: each client's steps from the seeded sampling, q = b / n, delta = 1/(10 n)
    from fedsim.build import build_components
    from fedsim.config import compose

    cfg = compose(tiny("privacy=dpsgd", "sim.clients_per_round=2", "sim.rounds=4"))[0]
    c = build_components(cfg)
    sampler = c.sampler()
    rounds = {}
    for t in range(1, 5):
        for client in sampler.train_clients(t):
            rounds[client] = rounds.get(client, 0) + 1
    want = []
    for client, times in rounds.items():
        n = c.data.client(client).num_train
        q = min(1.0, 16 / n)
        want.append(opacus_epsilon([(1.0, q, times * 3)], 1 / (10 * n)))
    assert summary["epsilon"] == pytest.approx(max(want), rel=1e-6)
    assert summary["delta"] == pytest.approx(
        max(1 / (10 * c.data.client(k).num_train) for k in rounds)
    )


def test_target_epsilon_is_never_exceeded(run_tiny):
    summary, rows, _ = run_tiny("privacy=dpsgd", "privacy.target_epsilon=2.0", "sim.rounds=3")
    assert all(r["epsilon"] <= 2.0 for r in rows[1:])
    # every client is sampled every round here: the worst case the noise was computed for
    assert 1.8 <= summary["epsilon"] <= 2.0


class _Linear(Task):
    label_key = "label"

    def build_model(self):
        return nn.Sequential(nn.Linear(20, 50, bias=False))

    def pool_labels(self):
        return np.zeros(1)

    def pool_examples(self, indices, client):
        return {}

    def test_set(self):
        return {}

    def logits(self, model, batch):
        return model(batch["x"])


def _one_step(sigma, clip, seed=0):
    torch.manual_seed(0)
    task = _Linear()
    model = task.build_model()
    before = model[0].weight.detach().clone()
    gsm = wrap(model, DPSGD(clip_norm=clip, noise_multiplier=sigma))
    g = torch.Generator().manual_seed(1)
    data = {
        "x": 10 * torch.randn(8, 20, generator=g),
        "label": torch.randint(0, 50, (8,), generator=g),
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    train_local_dp(
        model,
        gsm,
        task,
        data,
        optimizer,
        DPSGD(clip_norm=clip, noise_multiplier=sigma),
        Accountant([]),
        steps=1,
        batch_size=8,  # q = 1: the whole client, expected batch size 8
        lr=1.0,
        sigma=sigma,
        schedule=ConstantSchedule(),
        start_step=0,
        total_steps=1,
        generator=torch.Generator().manual_seed(2),
        noise_generator=torch.Generator().manual_seed(seed),
    )
    return (before - model[0].weight.detach()).double()


def test_clipping_bounds_the_update():
    step = _one_step(sigma=0.0, clip=0.5)  # lr 1, no noise: the mean of clipped gradients
    assert 0 < float(step.norm()) <= 0.5 + 1e-6
    big = _one_step(sigma=0.0, clip=1e6)  # no clipping at all: far larger
    assert float(big.norm()) > 10 * float(step.norm())


def test_noise_has_standard_deviation_sigma_clip_over_batch():
    clean = _one_step(sigma=0.0, clip=0.5)
    noise = _one_step(sigma=2.0, clip=0.5, seed=3) - clean  # 1000 coordinates
    assert float(noise.mean()) == pytest.approx(0.0, abs=4 * 0.125 / np.sqrt(1000))
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 8, rel=0.1)


def test_an_empty_poisson_batch_is_a_noise_only_step():
    """q = 1/8 and a generator whose first draw takes no example: the step's gradient is the
    noise (std sigma C, the client's noise generator) over the expected batch size 1, so SGD
    at lr 1 moves the weights by exactly minus that noise."""
    from fedsim.privacy import poisson_indices

    seed = next(
        s
        for s in range(100)
        if len(poisson_indices(8, 1 / 8, torch.Generator().manual_seed(s))) == 0
    )
    torch.manual_seed(0)
    task = _Linear()
    model = task.build_model()
    before = model[0].weight.detach().clone()
    privacy = DPSGD(clip_norm=0.5, noise_multiplier=2.0)
    g = torch.Generator().manual_seed(1)
    data = {"x": torch.randn(8, 20, generator=g), "label": torch.randint(0, 50, (8,), generator=g)}
    train_local_dp(
        model,
        wrap(model, privacy),
        task,
        data,
        torch.optim.SGD(model.parameters(), lr=1.0),
        privacy,
        Accountant([]),
        steps=1,
        batch_size=1,
        lr=1.0,
        sigma=2.0,
        schedule=ConstantSchedule(),
        start_step=0,
        total_steps=1,
        generator=torch.Generator().manual_seed(seed),
        noise_generator=torch.Generator().manual_seed(7),
    )
    noise = torch.normal(0.0, 2.0 * 0.5, size=(50, 20), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(model[0].weight.detach(), before - noise, rtol=0, atol=1e-6)


def test_small_batches_fail_no_client(run_tiny):
    """Batch size 1 of ~64 examples: most Poisson batches are empty, and no client fails (an
    empty batch once made Opacus' scale_grad read per-example gradients it did not have)."""
    _, rows, _ = run_tiny(
        "privacy=dpsgd",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.0",
        "sim.batch_size=1",
    )
    assert all(r["clients_failed"] == 0 for r in rows[1:]), rows[-1]["failures"]


def test_bad_privacy_settings():
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match="exactly one"):
        DPSGD(noise_multiplier=1.0, target_epsilon=3.0)
    with pytest.raises(ConfigError, match="privacy.delta"):
        DPSGD(noise_multiplier=1.0, delta=1.5)
    with pytest.raises(ConfigError, match="grad_sample_mode"):
        DPSGD(noise_multiplier=1.0, grad_sample_mode="ghost")


# ----------------------------------------------------------------------------- central DP


def test_central_epsilon_is_opacus_at_rate_q_one_step_per_round(run_tiny):
    summary, rows, _ = run_tiny(
        "privacy=central",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.5",
        "sim.num_clients=8",
        "sim.clients_per_round=2",
        "sim.rounds=4",
    )
    for t, row in enumerate(rows[1:], start=1):
        want = opacus_epsilon([(1.5, 2 / 8, t)], 1 / 80)
        assert row["epsilon"] == pytest.approx(want, rel=1e-6)
    assert summary["delta"] == pytest.approx(1 / 80) and summary["noise_multiplier"] == 1.5
    assert "central DP-FedAvg" in summary["privacy"]


def test_central_target_epsilon_is_met(run_tiny):
    summary, _, _ = run_tiny(
        "privacy=central", "privacy.target_epsilon=4.0", "sim.clients_per_round=2"
    )
    assert 3.6 <= summary["epsilon"] <= 4.0


def test_central_without_noise_or_clipping_is_unweighted_fedavg(run_tiny):
    _, plain, _ = run_tiny("strategy.weighted=false")
    _, central, _ = run_tiny(
        "privacy=central",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=0",
        "privacy.clip_norm=1e9",
    )
    for a, b in zip(plain[1:], central[1:]):  # q = 1: every client, divided by N
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)


def test_central_noise_variance_clipping_and_poisson_sampling():
    from fedsim.adapters import AdapterSpec
    from fedsim.privacy import CentralDP, CentralNoise, clip_update
    from fedsim.strategy import ClientSampler, ClientUpdate, Federation, StrategyContext
    from fedsim.uplink import RoundInfo, Uplink
    from strategies.fedavg import FedAvg

    central = CentralDP(clip_norm=0.5, noise_multiplier=2.0)
    central.start(num_clients=100, clients_per_round=10, rounds=1)
    ctx = StrategyContext(ClientSampler(100, 10, 0), {}, AdapterSpec(trained=["w"], sent=["w"]), 0)
    noise = CentralNoise(central, num_clients=100, clients_per_round=10, seed=0)
    strategy = Federation(FedAvg(weighted=False), Uplink([noise]), ctx)
    current = {"w": np.zeros(20000, np.float32)}
    update = ClientUpdate(0, {"w": np.zeros(20000, np.float32)}, 1, {})
    info = RoundInfo(1, current, current, lambda c: current, 100, 10, 0)
    new = strategy.reduction.aggregate(info, [update])["w"]
    assert float(new.std()) == pytest.approx(2.0 * 0.5 / 10, rel=0.02)  # sigma C / (q N)
    assert abs(float(new.mean())) < 4 * 0.1 / np.sqrt(20000)
    big = {"w": np.full(20000, 3.0, np.float32)}
    clipped = clip_update({"w": np.zeros(20000, np.float32)}, big, 0.5)
    assert float(np.linalg.norm(clipped["w"])) == pytest.approx(0.5, rel=1e-5)
    counts = [len(strategy.train_clients(t)) for t in range(1, 201)]
    assert np.mean(counts) == pytest.approx(10, rel=0.05) and np.std(counts) > 1  # Poisson


NO_NOISE = ("privacy=central", "privacy.target_epsilon=null", "privacy.noise_multiplier=0")


@pytest.mark.parametrize(
    "extra",
    [
        ("feedback=ef21",),
        ("compressor=topk", "compressor.ratio=0.1", "feedback=ef21"),
        ("compressor=topk", "compressor.ratio=0.1"),
        ("strategy=fedsb", "compressor=randk", "compressor.scaled=false", "feedback=ef21"),
        ("downlink=topk", "downlink.ratio=0.2"),
    ],
)
def test_central_dp_without_noise_or_clipping_leaves_compressed_runs_unchanged(run_tiny, extra):
    """q = 1, sigma = 0, a huge bound: the mechanism is the identity on the sum, so the run
    is the non-private one (EF21's server step divides by N either way)."""
    base = ("strategy.weighted=false", *extra)
    _, plain, _ = run_tiny(*base)
    _, private, _ = run_tiny(*base, *NO_NOISE, "privacy.clip_norm=1e9")
    for a, b in zip(plain, private):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
        assert b["bytes_up"] == a["bytes_up"] and b["bytes_down"] == a["bytes_down"]


def test_central_dp_with_ef21_bounds_messages_and_accounts_like_dp_fedavg(run_tiny):
    summary, rows, _ = run_tiny(
        "privacy=central",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.5",
        "privacy.clip_norm=0.05",
        "compressor=topk",
        "compressor.ratio=0.1",
        "feedback=ef21",
        "sim.num_clients=8",
        "sim.clients_per_round=2",
        "sim.rounds=4",
    )
    for t, row in enumerate(rows[1:], start=1):  # the same mechanism: one step at q per round
        assert row["epsilon"] == pytest.approx(opacus_epsilon([(1.5, 2 / 8, t)], 1 / 80), rel=1e-6)
    assert summary["status"] == "ok" and np.isfinite(rows[-1]["eval_loss"])


def test_central_noised_sum_clips_each_contribution_and_adds_its_noise():
    from fedsim.privacy import CentralDP

    central = CentralDP(clip_norm=0.5, noise_multiplier=0.0)
    central.start(num_clients=10, clients_per_round=5, rounds=1)
    big = {"a": np.full(3, 4.0), "b": np.full(4, -4.0)}  # one norm over both arrays
    small = {"a": np.array([0.1, 0.0, 0.0]), "b": np.zeros(4)}
    out = central.noised_sum([big, small], {"a": (3,), "b": (4,)}, 0, 1, unit=2.0)
    norm_big = np.sqrt(7 * 16.0)
    np.testing.assert_allclose(out["a"], 4.0 * 1.0 / norm_big + np.array([0.1, 0, 0]))
    np.testing.assert_allclose(out["b"], -4.0 * 1.0 / norm_big)  # bound = unit * clip = 1
    central = CentralDP(clip_norm=0.5, noise_multiplier=3.0)
    central.start(num_clients=10, clients_per_round=5, rounds=1)
    noisy = central.noised_sum([], {"w": (40000,)}, 0, 1, unit=2.0)["w"]
    assert float(noisy.std()) == pytest.approx(3.0 * 0.5 * 2.0, rel=0.02)


def test_lora_sb_set_up_round_under_central_dp(run_tiny):
    """Each sampled client sends its gradient's direction at norm clip_norm; the server adds
    noise: one more step at rate q, in epsilon."""
    summary, rows, _ = run_tiny(
        "strategy=fedsb",
        "adapter.init.source=clients",
        "privacy=central",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=2.0",
        "sim.num_clients=8",
        "sim.clients_per_round=4",
    )
    assert rows[0]["epsilon"] == pytest.approx(opacus_epsilon([(2.0, 0.5, 1)], 1 / 80), rel=1e-6)
    assert summary["epsilon"] == pytest.approx(opacus_epsilon([(2.0, 0.5, 3)], 1 / 80), rel=1e-6)
    assert "included in epsilon" in summary["adapter_init"]["privacy"]
    assert "set-up round" in summary["privacy"]
    target, _, _ = run_tiny(
        "strategy=fedsb",
        "adapter.init.source=clients",
        "privacy=central",
        "privacy.target_epsilon=3.0",
        "sim.num_clients=8",
        "sim.clients_per_round=4",
    )
    assert 2.7 <= target["epsilon"] <= 3.0


def test_central_set_up_round_with_one_client(run_tiny):
    """A client's vector is its gradient's direction at norm clip_norm: the same signs, so
    without noise LoRA-SB's initialisation is the non-private one (any clip norm); with noise
    it is not."""
    base = (
        "strategy=fedsb",
        "adapter.init.source=clients",
        "adapter.init.examples=32",
        "sim.num_clients=1",
    )
    _, plain, _ = run_tiny(*base)
    _, quiet, _ = run_tiny(*base, *NO_NOISE, "privacy.clip_norm=0.01")
    _, noisy, _ = run_tiny(*base, *NO_NOISE[:2], "privacy.noise_multiplier=1.0")
    assert quiet[0]["epsilon"] is None  # no noise: infinite, written as null
    assert quiet[0]["eval_loss"] == pytest.approx(plain[0]["eval_loss"], rel=1e-6)
    assert abs(noisy[0]["eval_loss"] - plain[0]["eval_loss"]) > 1e-4


def test_lora_sb_set_up_round_under_dp_counts_in_epsilon(run_tiny):
    summary, rows, _ = run_tiny(
        "privacy=dpsgd",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=2.0",
        "strategy=fedsb",
        "adapter.init.source=clients",
    )
    assert rows[0]["epsilon"] > 0  # the set-up round already spent some
    assert "in the total" in summary["adapter_init"]["privacy"]
    from fedsim.build import build_components
    from fedsim.config import compose

    c = build_components(compose(tiny("strategy=fedsb"))[0])
    want = []
    for client in range(4):  # all 4 in the set-up round and in both rounds (3 steps each)
        n = c.data.client(client).num_train
        history = [(2.0, 1.0, 1), (2.0, min(1.0, 16 / n), 6)]
        want.append(opacus_epsilon(history, 1 / (10 * n)))
    assert summary["epsilon"] == pytest.approx(max(want), rel=1e-6)


def test_lora_sb_set_up_target_includes_the_init_step(run_tiny):
    summary, rows, _ = run_tiny(
        "privacy=dpsgd",
        "privacy.target_epsilon=3.0",
        "strategy=fedsb",
        "adapter.init.source=clients",
    )
    assert all(r["epsilon"] <= 3.0 for r in rows)
    assert 2.7 <= summary["epsilon"] <= 3.0


def test_private_set_up_gradients_clip_each_example():
    from fedsim.adapters import LoRASB
    from fedsim.adapters.gradients import private_base_gradients
    from tests.test_exact_family import LAYERS, adapted

    adapter = LoRASB(r=2)
    g = torch.Generator().manual_seed(0)
    data = {
        "x": 5 * torch.randn(6, 12, generator=g),
        "label": torch.randint(0, 3, (6,), generator=g),
    }

    def run(clip, sigma):
        model, spec = adapted(adapter)
        return private_base_gradients(
            model,
            spec,
            lambda m, b, reduction: nn.functional.cross_entropy(
                m(b["x"]), b["label"], reduction=reduction
            ),
            data,
            clip,
            sigma,
            torch.Generator().manual_seed(1),
            batch_size=4,
        )

    exact = run(1e9, 0.0)  # no clipping, no noise: the sum of per-example gradients
    model, spec = adapted(adapter)
    for m in LAYERS:
        model.get_submodule(m).base.weight.requires_grad_(True)
    want = {m: torch.zeros(shape, dtype=torch.float64) for m, shape in LAYERS.items()}
    for i in range(6):
        loss = nn.functional.cross_entropy(model(data["x"][i : i + 1]), data["label"][i : i + 1])
        grads = torch.autograd.grad(loss, [model.get_submodule(m).base.weight for m in LAYERS])
        for m, gr in zip(LAYERS, grads):
            want[m] += gr.double()
    for m in LAYERS:
        assert exact[m].dtype == np.float32  # what the set-up reply carries: 4 m n bytes
        np.testing.assert_allclose(exact[m], want[m].numpy(), rtol=1e-4, atol=1e-6)  # fp32
    clipped = run(0.01, 0.0)
    total = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in clipped.values()))
    assert total <= 6 * 0.01 * (1 + 1e-6)  # six examples, each at most 0.01 (float32 sum)


def test_central_dp_releases_noise_even_when_no_client_replies(run_tiny):
    """Keeping the model unchanged in a round without clients would be an outcome the
    accountant does not cover: the noised (empty) sum is released every round."""
    _, rows, _ = run_tiny(
        "privacy=central",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.0",
        "sim.num_clients=8",
        "sim.clients_per_round=1",
        "sim.rounds=6",
        "sim.seed=1",  # rounds 1, 2 and 6 sample nobody
    )
    empty = [t for t in range(1, 7) if rows[t]["clients_sampled"] == 0]
    assert empty, "the seed gives no empty round: pick another"
    for t in empty:
        assert rows[t]["eval_loss"] != rows[t - 1]["eval_loss"] and not rows[t]["round_skipped"]
