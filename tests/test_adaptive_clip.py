"""Central DP with adaptive clipping (Andrew et al., 2021, Algorithm 1): equal to Flower's
``DifferentialPrivacyServerSideAdaptiveClipping`` on the same replies (count noise fixed to the
same values on both sides, update noise zero), equal to a direct numpy version of the algorithm
under Poisson sampling (noise drawn from the same seeded generators), accounted as one Gaussian
mechanism of the requested multiplier, resumed bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedsim import keys
from fedsim.adapters import AdapterSpec
from fedsim.messages import ClientCall
from fedsim.privacy import CentralDP, CentralNoise
from fedsim.privacy.adaptive import update_multiplier
from fedsim.records import array_record, numpy_dict
from fedsim.strategy import ClientSampler, Federation, StrategyContext
from fedsim.uplink import Outgoing, Sending, Uplink
from strategies.fedavg import FedAvg
from tests.conftest import tiny
from tests.test_privacy import opacus_epsilon

SHAPES = {"a": (3, 4), "b": (5,)}


@pytest.fixture(autouse=True)
def _server_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def deltas(num_clients: int, rounds: int, seed: int = 3):
    """Client updates with norms spread around 1 (some clipped at any clip near 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in range(1, rounds + 1):
        for i in range(num_clients):
            d = {k: rng.normal(size=s) for k, s in SHAPES.items()}
            norm = math.sqrt(sum(float(np.sum(v**2)) for v in d.values()))
            scale = rng.uniform(0.2, 3.0) / norm
            out[t, i] = {k: v * scale for k, v in d.items()}
    return out


def fedsim_round(fed, stage, t, current, delta_of):
    """One round through fedsim's chain: messages (with the clip), each sampled client's half
    (receive the clip, clip, report the bit), screening, aggregation."""
    msgs = list(fed.configure_train(t, array_record(current), ConfigRecord(), grid=None))
    replies, sent = [], []
    for j, msg in enumerate(msgs):
        msg.metadata.__dict__["_message_id"] = f"m{t}-{j}"
        client = fed.client_of[msg.metadata.dst_node_id]
        call = ClientCall(client, t, 0, RecordDict())
        held = stage.receive(call, numpy_dict(msg.content[keys.ARRAYS]))
        assert set(held) == set(current)  # the clip was taken out
        trained = {k: held[k] + delta_of(t, client)[k] for k in current}
        out = Outgoing(arrays=trained)
        stage.send(Sending(call, msg.content[keys.CONFIG], held), out)
        records = {keys.ARRAYS: array_record(out.arrays)}
        records.update({n: array_record(a) for n, a in out.records.items()})
        metrics = MetricRecord({keys.NUM_EXAMPLES: 1})
        reply = Message(RecordDict({**records, keys.METRICS: metrics}), reply_to=msg)
        assert fed.reply_reason(client, reply) is None
        replies.append(reply)
        sent.append(client)
    new, _ = fed.aggregate_train(t, replies)
    return numpy_dict(new), sent, msgs, replies


def build(num_clients, per_round, dp, seed=0, names=tuple(SHAPES)):
    dp.start(num_clients, per_round, rounds=4)
    stage = CentralNoise(dp, num_clients, per_round, seed)
    spec = AdapterSpec(trained=list(names), sent=list(names))
    nodes = {c: 100 + c for c in range(num_clients)}
    ctx = StrategyContext(ClientSampler(num_clients, per_round, seed), nodes, spec, seed)
    return Federation(FedAvg(weighted=False), Uplink([stage]), ctx), stage


def test_equals_flower_server_side_adaptive_clipping(monkeypatch):
    """Five clients, all sampled (q = 1, so the expected count is the count, as under Flower's
    fixed-size sampling), four rounds. Flower's update noise is zeroed (its std recorded) and
    its count noise fixed; fedsim's update noise is zero (sigma = 0 is not adaptive clipping:
    a sigma whose z_Delta is then zeroed instead) and its count noise fixed to the same values.
    Flower's bit is the clipped indicator; the paper's (and Flower's older DPFedAvgAdaptive
    client's) is the unclipped one: Flower's bit is inverted here, the one difference."""
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
    from flwr.serverapp.strategy import dp_adaptive_clipping as fl

    n, z, gamma, eta, c0, sigma_b = 5, 1.2, 0.6, 0.3, 0.5, 1.0
    count_noise = {1: 0.37, 2: -0.81, 3: 0.0, 4: 1.4}
    dp = CentralDP(
        clip_norm=c0,
        noise_multiplier=z,
        adaptive_clip=True,
        target_quantile=gamma,
        clip_lr=eta,
        count_stddev=sigma_b,
    )
    fed, stage = build(n, n, dp)
    flower = fl.DifferentialPrivacyServerSideAdaptiveClipping(
        FlowerFedAvg(),
        noise_multiplier=z,
        num_sampled_clients=n,
        initial_clipping_norm=c0,
        target_clipped_quantile=gamma,
        clip_norm_lr=eta,
        clipped_count_stddev=sigma_b,
    )
    # the adjusted multipliers agree
    assert dp.update_sigma == pytest.approx(flower.noise_multiplier, rel=1e-15)
    assert dp.count_stddev == flower.clipped_count_stddev
    assert dp.update_sigma == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5, rel=1e-15)

    # noise: Flower's std recorded, nothing added; count noise fixed on both sides
    stds, round_now = [], {"t": 0}
    monkeypatch.setattr(fl, "add_gaussian_noise_inplace", lambda arrays, std: stds.append(std))
    real_normal = np.random.normal

    def fixed_count_noise(loc, scale=1.0, size=None):
        assert size is None and scale == sigma_b
        return loc + count_noise[round_now["t"]]

    monkeypatch.setattr(np.random, "normal", fixed_count_noise)
    monkeypatch.setattr(stage, "count_noise", lambda t: count_noise[t])
    dp.update_sigma = 0.0  # fedsim's update noise off (Flower's: recorded, not added)
    clip_in = fl.adaptive_clip_inputs_inplace
    monkeypatch.setattr(fl, "adaptive_clip_inputs_inplace", lambda a, c: not clip_in(a, c))

    d = deltas(n, 4)
    current = {k: np.zeros(s) for k, s in SHAPES.items()}
    try:
        for t in range(1, 5):
            round_now["t"] = t
            clip_before = stage.clip
            new, sent, msgs, _ = fedsim_round(fed, stage, t, current, lambda t, i: d[t, i])
            assert sorted(sent) == list(range(n))
            flower.current_arrays = array_record({k: current[k] for k in SHAPES})
            replies = [
                Message(
                    RecordDict(
                        {
                            "arrays": array_record({k: current[k] + d[t, i][k] for k in SHAPES}),
                            "metrics": MetricRecord({"num-examples": 1}),
                        }
                    ),
                    reply_to=msgs[i],
                )
                for i in range(n)
            ]
            got, _ = flower.aggregate_train(t, replies)
            assert stage.clip == pytest.approx(flower.clipping_norm, rel=1e-13)
            want = got.to_numpy_ndarrays()
            for k, w in zip(SHAPES, want):
                np.testing.assert_allclose(new[k], w, rtol=1e-12, atol=1e-15)
            # Flower noises with the clip after its update; fedsim with the round's own
            assert stds[-1] == pytest.approx(flower.noise_multiplier * stage.clip / n, rel=1e-13)
            assert stage.last["clip_norm"] == clip_before
            current = new
    finally:
        monkeypatch.setattr(np.random, "normal", real_normal)
    assert stage.clip != c0


def test_flower_own_bit_moves_the_clip_away_from_the_quantile(monkeypatch):
    """What the inverted bit above corrects (Flower 1.41): every update clipped, no noise,
    target 0.5; the paper raises the clip, Flower's server-side class lowers it."""
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
    from flwr.serverapp.strategy import dp_adaptive_clipping as fl

    flower = fl.DifferentialPrivacyServerSideAdaptiveClipping(
        FlowerFedAvg(), noise_multiplier=0.0, num_sampled_clients=2, initial_clipping_norm=0.1
    )
    current = {"w": np.zeros(4)}
    flower.current_arrays = array_record(current)
    asks = [Message(RecordDict(), dst_node_id=1 + i, message_type="train") for i in range(2)]
    for i, ask in enumerate(asks):
        ask.metadata.__dict__["_message_id"] = f"x{i}"
    content = {
        "arrays": array_record({"w": np.full(4, 5.0)}),
        "metrics": MetricRecord({"num-examples": 1}),
    }
    flower.aggregate_train(1, [Message(RecordDict(content), reply_to=a) for a in asks])
    assert flower.clipping_norm == pytest.approx(0.1 * math.exp(-0.2 * (1 - 0.5)))
    dp = CentralDP(clip_norm=0.1, noise_multiplier=0.0, adaptive_clip=True)
    fed, stage = build(2, 2, dp, names=("w",))
    fedsim_round(fed, stage, 1, current, lambda t, i: {"w": np.full(4, 5.0)})
    assert stage.clip == pytest.approx(0.1 * math.exp(-0.2 * (0 - 0.5)))  # up


def algorithm_1(num_clients, q, rounds, z, c0, gamma, eta, sigma_b, d, seed, sampled):
    """Andrew et al.'s Algorithm 1 in numpy: clip to C, the bits, the noised sum over the
    expected count m = q N, the noised centred count, the geometric step. The noise is drawn
    as fedsim draws it (same seeded generators), so equal arrays check the arithmetic."""
    m = q * num_clients
    z_delta = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
    x = {k: np.zeros(s) for k, s in SHAPES.items()}
    clip, clips, fractions = c0, [], []
    for t in range(1, rounds + 1):
        total = {k: np.zeros(s) for k, s in SHAPES.items()}
        bits = []
        for i in sampled[t]:
            norm = math.sqrt(sum(float(np.sum(v**2)) for v in d[t, i].values()))
            bits.append(1.0 if norm <= clip else 0.0)
            for k in SHAPES:
                total[k] += d[t, i][k] * min(1.0, clip / norm)
        rng = np.random.default_rng([seed, t, 59])
        x = {
            k: x[k] + (total[k] + rng.normal(0, z_delta * clip, total[k].shape)) / m
            for k in sorted(SHAPES)
        }
        noise_b = np.random.default_rng([seed, t, 61]).normal(0, sigma_b)
        fraction = (sum(bits) - len(bits) / 2 + noise_b) / m + 0.5
        clips.append(clip)
        fractions.append(fraction)
        clip = clip * math.exp(-eta * (fraction - gamma))
    return x, clips, fractions


def test_equals_algorithm_1_in_numpy_under_poisson_sampling():
    n, per_round, rounds, z, seed = 40, 20, 4, 0.8, 7
    dp = CentralDP(clip_norm=0.7, noise_multiplier=z, adaptive_clip=True)
    fed, stage = build(n, per_round, dp, seed)
    assert dp.count_stddev == per_round / 20  # the paper's sigma_b = m / 20
    assert dp.update_sigma == pytest.approx(update_multiplier(z, 1.0))
    d = deltas(n, rounds)
    current = {k: np.zeros(s) for k, s in SHAPES.items()}
    sampled, clips, fractions = {}, [], []
    for t in range(1, rounds + 1):
        current, sampled[t], _, _ = fedsim_round(fed, stage, t, current, lambda t, i: d[t, i])
        clips.append(stage.last["clip_norm"])
        fractions.append(stage.last["unclipped_fraction"])
    assert len({len(s) for s in sampled.values()}) > 1  # Poisson: the count varies
    x, want_clips, want_fractions = algorithm_1(
        n, per_round / n, rounds, z, 0.7, 0.5, 0.2, 1.0, d, seed, sampled
    )
    np.testing.assert_allclose(clips, want_clips, rtol=1e-13)
    np.testing.assert_allclose(fractions, want_fractions, rtol=1e-12, atol=1e-15)
    for k in SHAPES:
        np.testing.assert_allclose(current[k], x[k], rtol=1e-11, atol=1e-14)


def _uniform_norms(t, i):
    """Client ``i`` of 100: an update of norm ``(i + 1) / 50``."""
    return {k: np.ones(s) / math.sqrt(17) * (i + 1) / 50 for k, s in SHAPES.items()}


def test_the_clip_converges_to_the_target_quantile_without_noise():
    """Updates with norms uniform on [0, 2]: the median is 1, the 0.8 quantile 1.6."""
    for gamma, want in ((0.5, 1.0), (0.8, 1.6)):
        dp = CentralDP(
            clip_norm=0.1,
            noise_multiplier=0.0,
            adaptive_clip=True,
            target_quantile=gamma,
            clip_lr=0.2,
        )
        fed, stage = build(100, 100, dp)
        current = {k: np.zeros(s) for k, s in SHAPES.items()}
        for t in range(1, 61):
            fedsim_round(fed, stage, t, current, _uniform_norms)
        assert stage.clip == pytest.approx(want, rel=0.05)


def test_bits_and_clip_travel_and_are_counted(run_tiny):
    _, plain, _ = run_tiny(
        "privacy=central",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=0.5",
        "privacy.count_stddev=1",
    )
    _, rows, _ = run_tiny(
        "privacy=central",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=0.5",
        "privacy.count_stddev=1",
        "privacy.adaptive_clip=true",
    )
    for a, b in zip(plain[1:], rows[1:]):
        k = b["clients_sampled"]
        assert b["bytes_up"] == a["bytes_up"] + k * 1  # the bit: one uint8
        assert b["bytes_down"] == a["bytes_down"] + k * 8  # the clip: one float64
    assert [r["clip_norm"] for r in rows[1:]][0] == 1.0
    assert all("clip_norm" not in r for r in plain)
    clips = [r["clip_norm"] for r in rows[1:]]
    for r, c_next in zip(rows[1:], clips[1:]):  # the logged step is the rule's
        assert c_next == pytest.approx(
            r["clip_norm"] * math.exp(-0.2 * (r["unclipped_fraction"] - 0.5))
        )


def test_epsilon_is_that_of_the_requested_multiplier(run_tiny):
    """The update (z_Delta) and the count (2 sigma_b) compose to one Gaussian mechanism of
    multiplier z: at q = 1 its RDP is alpha / (2 z_Delta^2) + alpha / (2 (2 sigma_b)^2) per
    round, converted here directly; and at q < 1 it is Opacus' subsampled Gaussian at z."""
    z, sigma_b, rounds = 0.6, 1.0, 3
    summary, rows, _ = run_tiny(
        "privacy=central",
        "privacy.target_epsilon=null",
        f"privacy.noise_multiplier={z}",
        f"privacy.count_stddev={sigma_b}",
        "privacy.adaptive_clip=true",
        f"sim.rounds={rounds}",
    )
    z_delta = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
    assert summary["update_noise_multiplier"] == pytest.approx(z_delta)
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), float)
    delta = 1 / 40
    for t, row in enumerate(rows[1:], start=1):
        rdp = t * (orders / (2 * z_delta**2) + orders / (2 * (2 * sigma_b) ** 2))
        eps = rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
        assert row["epsilon"] == pytest.approx(float(np.nanmin(eps)), rel=1e-9)
    summary, rows, _ = run_tiny(
        "privacy=central",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.5",
        "privacy.count_stddev=2",
        "privacy.adaptive_clip=true",
        "sim.num_clients=8",
        "sim.clients_per_round=2",
        "sim.rounds=3",
    )
    for t, row in enumerate(rows[1:], start=1):
        assert row["epsilon"] == pytest.approx(opacus_epsilon([(1.5, 2 / 8, t)], 1 / 80), rel=1e-6)


def test_target_epsilon_with_adaptive_clipping_is_met(run_tiny):
    summary, _, _ = run_tiny(
        "privacy=central",
        "privacy.target_epsilon=6",
        "privacy.adaptive_clip=true",
        "privacy.count_stddev=2",
    )
    assert 5.4 <= summary["epsilon"] <= 6.0
    assert summary["update_noise_multiplier"] > summary["noise_multiplier"]


def test_adaptive_clipping_resumes_exactly(tmp_path, monkeypatch):
    from tests.test_checkpoint import interrupted_equals_uninterrupted

    args = tiny(
        "sim.rounds=4",
        "sim.num_clients=5",
        "sim.clients_per_round=3",
        "privacy=central",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=0.5",
        "privacy.count_stddev=0.5",
        "privacy.adaptive_clip=true",
        "privacy.clip_norm=0.05",
    )
    full, _ = interrupted_equals_uninterrupted(tmp_path, monkeypatch, args, at=2)
    from fedsim.results import read_metrics

    clips = [r["clip_norm"] for r in read_metrics(tmp_path / "full")[1:]]
    assert len(set(clips)) == 4  # the clip moved every round, and the resumed run followed it


def test_the_batched_engine_adapts_the_clip_as_the_inline_engine(run_tiny):
    args = (
        "privacy=central",
        "privacy.adaptive_clip=true",
        "privacy.count_stddev=2",
        "privacy.clip_norm=0.05",
        "sim.num_clients=8",
        "sim.clients_per_round=4",
        "sim.rounds=3",
    )
    _, inline, _ = run_tiny(*args)
    _, batched, _ = run_tiny(*args, "engine=batched")
    for a, b in zip(inline[1:], batched[1:]):
        assert b["clip_norm"] == pytest.approx(a["clip_norm"], rel=1e-6)
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
        assert b["bytes_up"] == a["bytes_up"] and b["bytes_down"] == a["bytes_down"]
    assert len({r["clip_norm"] for r in inline[1:]}) == 3
