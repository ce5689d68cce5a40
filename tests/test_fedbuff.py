"""FedBuff (``sim.async_buffer``): the event order and the staleness of every server step
against a small reference simulation, and each step against its formula in numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsim.apps.server.buffered import BufferedRounds
from fedsim.build import build_components
from fedsim.config import compose
from fedsim.records import numpy_dict
from tests.conftest import tiny

# four clients of very different speeds, always online, no latency
TRACE = {
    "0": {"gflops": 0.002, "up_kbps": 8000, "down_kbps": 8000},
    "1": {"gflops": 0.0005, "up_kbps": 2000, "down_kbps": 8000},
    "2": {"gflops": 0.001, "up_kbps": 500, "down_kbps": 1000},
    "3": {"gflops": 0.004, "up_kbps": 4000, "down_kbps": 4000},
}


def args(tmp_path, *extra):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(TRACE))
    return tiny(
        "strategy=fedavg",
        "system=trace",
        f"system.file={path}",
        "sim.num_clients=4",
        "sim.async_buffer=2",
        "sim.concurrency=4",
        "sim.rounds=6",
        *extra,
    )


def reference(durations, k, steps):
    """Every client trains back to back (concurrency = N); the server steps at every k-th
    arrival in time order, ties by client id; a client whose update waits in the buffer starts
    again at the step that takes it. Returns each step's time and the staleness of its
    updates."""
    n = len(durations)
    start_version = [0] * n
    next_arrival = {i: durations[i] for i in range(n)}  # the clients in flight
    out, buffer, version = [], [], 0
    while len(out) < steps:
        c = min(next_arrival, key=lambda i: (next_arrival[i], i))
        t = next_arrival.pop(c)
        buffer.append(c)
        if len(buffer) == k:
            out.append((t, sorted(version - start_version[b] for b in buffer)))
            version += 1
            for b in buffer:
                start_version[b] = version
                next_arrival[b] = t + durations[b]
            buffer = []
    return out


def test_event_order_and_staleness_match_a_reference_simulation(tmp_path, run_tiny):
    summary, rows, _ = run_tiny(*args(tmp_path))
    cfg, _ = compose(args(tmp_path))
    c = build_components(cfg)
    flops = summary["system"]["flops_per_example"]
    down = rows[1]["bytes_down"] / rows[1]["clients_sampled"]  # every message the same size
    up = rows[1]["bytes_up"] / rows[1]["clients_ok"]
    steps, batch = cfg["sim"]["local_steps"], cfg["sim"]["batch_size"]
    durations = []
    for i in range(4):
        n = c.data.client(i).num_train
        rec = TRACE[str(i)]
        durations.append(
            down * 8 / (rec["down_kbps"] * 1e3)
            + steps * min(batch, n) * flops / (rec["gflops"] * 1e9)
            + up * 8 / (rec["up_kbps"] * 1e3)
        )
    assert len(set(np.round(durations, 9))) == 4  # the order is really decided by speed
    ref = reference(durations, k=2, steps=6)
    for row, (t, stale) in zip(rows[1:], ref):
        assert row["sim_time_s"] == pytest.approx(t, rel=1e-12)
        assert row["staleness"] == {"mean": float(np.mean(stale)), "max": max(stale)}
    assert any(max(s) > 0 for _, s in ref)  # some updates really were stale


def test_each_server_step_is_the_staleness_weighted_rebased_mean(tmp_path, monkeypatch, run_tiny):
    from fedsim.strategy import Federation

    seen, servers = [], []
    init, aggregate = BufferedRounds.__init__, Federation.aggregate_train

    def remember(self, run):
        init(self, run)
        servers.append(self)

    def capture(self, r, replies):
        current = {k: np.array(v) for k, v in self.strategy.current.items()}
        new, metrics = aggregate(self, r, replies)
        seen.append((current, list(servers[-1].last_buffer), numpy_dict(new)))
        return new, metrics

    monkeypatch.setattr(BufferedRounds, "__init__", remember)
    monkeypatch.setattr(Federation, "aggregate_train", capture)
    run_tiny(*args(tmp_path, "sim.staleness_exponent=0.5"))
    assert len(seen) == 6
    for current, buffer, new in seen:
        n = np.array([it.num_examples for it, _ in buffer], dtype=np.float64)
        p = n / n.sum()
        for key in current:
            want = np.asarray(current[key], np.float64)
            for pi, (it, tau) in zip(p, buffer):
                change = np.asarray(it.trained[key], np.float64) - it.start[key]
                want = want + pi * (1.0 + tau) ** -0.5 * change
            np.testing.assert_allclose(new[key], want, rtol=1e-5, atol=1e-6)


def test_compressed_stale_updates_are_decoded_with_the_round_they_were_sent_in(
    tmp_path, monkeypatch, run_tiny
):
    """Rand-K's positions come from the seed of the round a message was built in: with one
    update a step, the step's change is ``s(tau) lr_server (d/K) (x_i - x_start)`` on exactly
    the K positions the client drew, whatever the staleness (a wrong round: other positions)."""
    from fedsim import keys
    from fedsim.strategy import Federation

    seen, servers = [], []
    init, aggregate = BufferedRounds.__init__, Federation.aggregate_train

    def remember(self, run):
        init(self, run)
        servers.append(self)

    def capture(self, r, replies):
        current = {k: np.array(v) for k, v in self.strategy.current.items()}
        new, metrics = aggregate(self, r, replies)
        seen.append((current, list(servers[-1].last_buffer), numpy_dict(new)))
        return new, metrics

    monkeypatch.setattr(BufferedRounds, "__init__", remember)
    monkeypatch.setattr(Federation, "aggregate_train", capture)
    extra = ["sim.async_buffer=1", "compressor=randk", "compressor.ratio=0.25"]
    summary, rows, _ = run_tiny(*args(tmp_path, *extra))
    assert summary["status"] == "ok"
    assert any(tau > 0 for _, buffer, _ in seen for _, tau in buffer)
    for current, [(item, tau)], new in seen:
        trained = numpy_dict(item.reply.content[keys.DIAGNOSTIC])
        for key, x in trained.items():
            moved = np.asarray(new[key], np.float64) - current[key]
            own = np.asarray(x, np.float64) - item.start[key]
            picked = moved != 0
            d = own.size
            k = max(1, round(0.25 * d))
            assert picked.sum() == min(k, (own != 0).sum())
            want = (1.0 + tau) ** -0.5 * (d / k) * own[picked]
            np.testing.assert_allclose(moved[picked], want, rtol=1e-4, atol=1e-7)
