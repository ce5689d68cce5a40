"""Compressed updates and error feedback in whole runs: bytes, state, learning, sweeps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.config import check, compose, expand_sweep
from tests.conftest import strip_timings, synthetic

# TINY's sent arrays: LoRA r=8 on three 32x32 layers (A 8x32, B 32x8) and a 32 -> 10 head
SIZES = [256] * 6 + [320, 10]


def topk_bytes(ratio: float) -> int:
    """One client's Top-K payload, per tensor: K fp32 values + K packed ceil(log2 d)-bit indices."""
    total = 0
    for d in SIZES:
        k = min(d, max(1, round(ratio * d)))
        total += 4 * k + math.ceil(k * math.ceil(math.log2(d)) / 8)
    return total


def coded_topk_bytes(ratio: float) -> tuple[float, float]:
    """Bounds on one client's coded Top-K payload: K fp32 values per tensor plus its positions
    in between log2 C(d, K) bits and 5% (+ 2 bytes) more."""
    low = high = 0.0
    for d in SIZES:
        k = min(d, max(1, round(ratio * d)))
        ideal = (math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1)) / math.log(2)
        low, high = low + 4 * k + ideal / 8, high + 4 * k + 1.05 * ideal / 8 + 2
    return low, high


def sent_topk(nbytes: float, clients: int = 4) -> bool:
    low, high = coded_topk_bytes(0.05)
    return clients * low <= nbytes <= clients * high


def test_naive_topk_sends_the_payload_and_reports_its_error(run_tiny):
    summary, rows, _ = run_tiny("compressor=topk", "compressor.ratio=0.05")
    for row in rows[1:]:
        assert sent_topk(row["bytes_up"])  # coded positions
        assert row["bytes_up_raw"] == 4 * topk_bytes(0.05)  # the fixed-width format's size
        assert row["bytes_down"] == 4 * 4 * sum(SIZES)  # the downlink is not compressed
        assert row["aggregation_error"] > 0.1  # it measures the compression error too
    assert summary["client_state_bytes"] == 0  # naive: no memory


def test_ef21_first_message_dense_then_compressed_and_its_state(run_tiny):
    summary, rows, _ = run_tiny("compressor=topk", "compressor.ratio=0.05", "feedback=ef21")
    assert rows[1]["bytes_up"] == 4 * 4 * sum(SIZES)  # u_i uncompressed initialises g_i
    assert sent_topk(rows[2]["bytes_up"]) and rows[2]["bytes_up_raw"] == 4 * topk_bytes(0.05)
    # g_i in float64, and the last (compressed) message kept until the server confirms it
    assert sent_topk(summary["client_state_bytes"] - 4 * 8 * sum(SIZES))
    _, first, _ = run_tiny(
        "compressor=topk", "compressor.ratio=0.05", "feedback=ef21", "feedback.compress_first=true"
    )
    assert sent_topk(first[1]["bytes_up"])
    _, econtrol, _ = run_tiny("compressor=topk", "compressor.ratio=0.05", "feedback=econtrol")
    assert econtrol[-1]["eval_loss"] is not None


def test_ef21_without_compression_is_unweighted_fedavg(run_tiny):
    _, plain, _ = run_tiny("strategy.weighted=false")
    _, ef21, _ = run_tiny("strategy.weighted=false", "feedback=ef21")
    for a, b in zip(plain, ef21):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
        assert b["bytes_up"] == a["bytes_up"]
    for a, b in zip(plain[1:], ef21[1:]):  # FedIT's own inexactness, nothing added
        assert b["aggregation_error"] == pytest.approx(a["aggregation_error"], rel=1e-3)


def test_ef21_beats_naive_topk_on_heterogeneous_clients(run_tiny):
    common = (
        "compressor=topk",
        "compressor.ratio=0.1",
        "sim.rounds=10",
        "partition.alpha=0.1",
        "sim.num_clients=6",
        "task.examples_per_client=128",
    )
    naive, _, _ = run_tiny(*common)
    ef21, _, _ = run_tiny(*common, "feedback=ef21")
    assert ef21["bytes_up_total"] > naive["bytes_up_total"]  # EF21's dense first messages
    assert ef21["final_eval_loss"] < naive["final_eval_loss"] - 0.3


@pytest.mark.parametrize(
    "extra",
    [
        ["strategy=fedsb", "compressor=topk", "feedback=ef21"],
        ["strategy=fedsa", "compressor=topk", "compressor.scope=flat", "feedback=ef14"],
        ["strategy=fedex", "compressor=qsgd"],
        ["strategy=flora", "compressor=compeft"],
        ["compressor=randk", "compressor.scaled=false", "feedback=econtrol"],
    ],
    ids=["fedsb-ef21", "fedsa-ef14-flat", "fedex-qsgd", "flora-compeft", "randk-econtrol"],
)
def test_compression_composes_with_strategies(run_tiny, extra):
    summary, rows, _ = run_tiny(*extra)
    assert summary["status"] == "ok" and rows[-1]["clients_ok"] == 4


def test_same_seed_same_compressed_run(run_tiny):
    _, a, _ = run_tiny("compressor=randk", "compressor.scaled=false", "feedback=ef21")
    _, b, _ = run_tiny("compressor=randk", "compressor.scaled=false", "feedback=ef21")
    assert strip_timings(a) == strip_timings(b)


def test_the_issue_sweep_composes_and_checks():
    jobs = expand_sweep(
        [
            "feedback=none,ef21",
            "compressor=topk",
            "compressor.ratio=0.001,0.01,0.1",
            "sim.num_clients=10,100",
        ]
    )
    assert len(jobs) == 12
    for job in jobs:
        check(compose(synthetic(*job))[0])


def test_lr_server_scales_the_step(run_tiny):
    _, one, _ = run_tiny("feedback=ef21", "sim.rounds=1")
    _, half, _ = run_tiny("feedback=ef21", "feedback.lr_server=0.5", "sim.rounds=1")
    assert half[1]["eval_loss"] != one[1]["eval_loss"]


def test_ef21p_downlink_with_everything_kept_is_the_plain_run(run_tiny):
    _, plain, _ = run_tiny("sim.clients_per_round=3", "sim.rounds=3")
    _, full, _ = run_tiny(
        "sim.clients_per_round=3", "sim.rounds=3", "downlink=topk", "downlink.ratio=1.0"
    )
    for a, b in zip(plain, full):
        # Top-K of everything: w = x up to the fp32 rounding of the sent step
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
        assert b["bytes_down"] == a["bytes_down"]  # dense is smaller than values + indices


def test_ef21p_clients_hold_exactly_the_servers_w():
    from flwr.app import RecordDict

    from fedsim.compression import TopK
    from fedsim.downlink import EF21P
    from fedsim.records import array_record, numpy_dict

    rng = np.random.default_rng(0)
    server = EF21P(TopK(ratio=0.2), seed=3)
    client_side = EF21P(TopK(ratio=0.2), seed=3)
    states = {c: RecordDict() for c in range(4)}
    x = {
        "a": rng.normal(size=(6, 5)).astype(np.float32),
        "b": rng.normal(size=7).astype(np.float32),
    }
    dense = sum(v.nbytes for v in x.values())
    for t in range(1, 9):
        w = server.advance(t, x)
        sampled = [c for c in range(4) if rng.random() < 0.5]
        for c in sampled:
            message = server.catch_up(c)
            assert sum(v.nbytes for v in message.values()) <= dense  # steps or w, the smaller
            got = client_side.client_receive(numpy_dict(array_record(message)), states[c])
            for k in x:
                np.testing.assert_array_equal(got[k], w[k])
        server.acknowledge(t, sampled)
        x = {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in x.items()}


@pytest.mark.parametrize("feedback", ["ef21", "econtrol", "ef14"])
def test_memories_follow_what_the_server_aggregated(run_tiny, monkeypatch, feedback):
    """Client 0's round-2 reply is refused and round 3 is skipped: the server never sees those
    messages, the clients take them back, so the server's mean state equals the clients'."""
    import fedsim.codec as codec_mod

    captured = {}
    original = codec_mod.Codec.screen

    def screen(self, info, client, reply):  # the compression stage's server half
        captured["codec"] = self
        if client == 0 and info.server_round == 2:
            return "rejected", "refused for the test"
        return original(self, info, client, reply)

    monkeypatch.setattr(codec_mod.Codec, "screen", screen)
    import fedsim.engines.inline as inline_mod
    from tests.test_end_to_end import _failing_clients

    grids = []
    grid_init = inline_mod.InlineGrid.__init__

    def keep_grid(self, *args, **kwargs):
        grid_init(self, *args, **kwargs)
        grids.append(self)

    monkeypatch.setattr(inline_mod.InlineGrid, "__init__", keep_grid)

    _failing_clients(monkeypatch, lambda client, rnd: rnd == 3 and client != 1)
    summary, rows, _ = run_tiny(
        "compressor=topk",
        f"feedback={feedback}",
        "sim.rounds=4",
        "sim.min_clients=2",
        "sim.client_test_fraction=0.2",
    )
    assert rows[2]["clients_failed"] == 1 and rows[3]["round_skipped"]
    assert summary["status"] == "ok"
    if feedback == "ef14":
        return  # no server state to compare with
    codec = captured["codec"]
    contexts = [ctx.state for ctx in grids[0]._contexts.values()]
    assert len(contexts) == 4
    key = "g" if feedback == "ef21" else "h"
    for name, mean in codec.feedback.server_state.items():
        clients = [
            c["fedsim.feedback"][f"{key}/{name}"].numpy()
            if "fedsim.feedback" in c and f"{key}/{name}" in c["fedsim.feedback"]
            else 0.0
            for c in contexts
        ]
        np.testing.assert_allclose(mean, sum(clients) / 4, rtol=1e-9, atol=1e-12)


def test_ef21p_keeps_what_it_has_not_sent_yet():
    """Clients train from w; their changes apply to the server's x: x' = x + mean(x_i - w)."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedsim import keys
    from fedsim.adapters import AdapterSpec
    from fedsim.compression import TopK
    from fedsim.downlink import EF21P
    from fedsim.records import array_record, numpy_dict
    from fedsim.strategy import ClientSampler, Federation, StrategyContext
    from fedsim.uplink import Uplink
    from strategies.fedavg import FedAvg

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    spec = AdapterSpec(trained=["a"], sent=["a"])
    ef21p = EF21P(TopK(k=2), seed=0)
    node_of = {0: 10, 1: 11}
    ctx = StrategyContext(ClientSampler(2, 2, 0), node_of, spec, 0)
    strategy = Federation(FedAvg(weighted=False), Uplink([ef21p]), ctx)
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=8).astype(np.float32)}
    for t in (1, 2, 3):
        msgs = list(strategy.configure_train(t, array_record(x), ConfigRecord(), None))
        w = {k: v.copy() for k, v in ef21p.w.items()}
        replies, deltas = [], []
        for i, m in enumerate(msgs):
            m.metadata.__dict__["_message_id"] = f"{t}-{i}"
            d = rng.normal(size=8).astype(np.float32)
            deltas.append(d)
            content = RecordDict(
                {
                    keys.ARRAYS: array_record({"a": w["a"] + d}),
                    keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 5}),
                }
            )
            replies.append(Message(content, reply_to=m))
        new, _ = strategy.aggregate_train(t, replies)
        want = x["a"].astype(np.float64) + np.mean(deltas, axis=0)
        np.testing.assert_allclose(numpy_dict(new)["a"], want, rtol=1e-5, atol=1e-6)
        if t > 1:
            assert np.abs(x["a"] - w["a"]).max() > 1e-3  # w lags x: the shift matters
        x = numpy_dict(new)
