"""The simulated clock (``system``): round times against a hand computation, deadlines,
over-selection, availability, traces, FLOP counts, and the same clock on every engine and
after a resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from fedsim import keys
from fedsim.errors import ConfigError
from fedsim.records import array_record
from fedsim.strategy import ClientSampler
from fedsim.system import Clock, Profile, Sampled, System, Tiers, Trace, flops_per_example
from fedsim.system.availability import Alternating, Intervals
from tests.conftest import strip_timings, tiny

MB = 1e6


@pytest.fixture(autouse=True)
def _server_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


class Fixed(System):
    """Given profiles (a test's federation)."""

    def __init__(self, profiles, targets=()):
        super().__init__("fixed", targets)
        self.profiles = profiles
        self.bind(len(profiles), 0)

    def make(self, client):
        return self.profiles[client]

    @property
    def has_availability(self):
        return any(not math.isinf(p.availability.until(0.0)) for p in self.profiles)


def exchange(down_values, up_values, examples, delays=None, errors=()):
    """Messages to clients 0..n-1 (float32 payloads of the given sizes) and their replies."""
    sent, replies = [], []
    for c, (d, u, n) in enumerate(zip(down_values, up_values, examples)):
        msg = Message(
            RecordDict({keys.ARRAYS: array_record({"w": np.zeros(d, np.float32)})}),
            dst_node_id=100 + c,
            message_type=MessageType.TRAIN,
            group_id="1",
        )
        msg.metadata.__dict__["_message_id"] = f"m{c}"
        if c in errors:
            reply = Message(Error(code=0, reason="crash"), reply_to=msg)
        else:
            metrics = {keys.NUM_EXAMPLES: n}
            if delays and delays[c]:
                metrics[keys.DELAY] = delays[c]
            content = {
                keys.ARRAYS: array_record({"w": np.zeros(u, np.float32)}),
                keys.METRICS: MetricRecord(metrics),
            }
            reply = Message(RecordDict(content), reply_to=msg)
        sent.append(msg)
        replies.append(reply)
    return sent, replies


CLIENT_OF = {100 + c: c for c in range(10)}

# three clients: (GFLOP/s, up Mbit/s, down Mbit/s, latency s)
THREE = [
    Profile(1.0, 1.0, 8.0, 0.1),
    Profile(4.0, 0.5, 2.0, 0.0),
    Profile(0.5, 8.0, 8.0, 0.05),
]
F = 2e6  # FLOPs per example


def hand_times(examples_trained):
    """Each client's seconds, written out from the profiles above (down 1000 values = 4000
    bytes, up 500 values = 2000 bytes; 3 steps of batch 4)."""
    down_bits, up_bits = 4000 * 8, 2000 * 8
    out = []
    for (g, up, down, lat), n in zip(
        [(1.0, 1.0, 8.0, 0.1), (4.0, 0.5, 2.0, 0.0), (0.5, 8.0, 8.0, 0.05)], examples_trained
    ):
        t_down = lat + down_bits / (down * MB)
        t_compute = n * F / (g * 1e9)
        t_up = lat + up_bits / (up * MB)
        out.append(t_down + t_compute + t_up)
    return out


def test_round_time_equals_a_hand_computation_for_three_clients():
    clock = Clock(Fixed(THREE), F, local_steps=3, batch_size=4, clients_per_round=3)
    sent, replies = exchange([1000] * 3, [500] * 3, [10, 2, 7])
    # client 1 has 2 examples: batches of 2; the others full batches of 4
    expected = hand_times([12, 6, 12])
    good, failures, fields = clock.settle(sent, replies, list(replies), [], CLIENT_OF)
    assert [r.metadata.reply_to_message_id for r in good] == ["m0", "m1", "m2"]
    assert failures == []
    assert fields["round_sim_time_s"] == pytest.approx(max(expected), rel=1e-12)
    assert clock.now == fields["round_sim_time_s"]
    assert fields["client_sim_time_s"]["max"] == pytest.approx(max(expected), rel=1e-12)
    assert fields["client_sim_time_s"]["p50"] == pytest.approx(sorted(expected)[1], rel=1e-12)
    # a second round adds on
    clock.settle(sent, replies, list(replies), [], CLIENT_OF)
    assert clock.now == pytest.approx(2 * max(expected), rel=1e-12)


def test_a_deadline_drops_exactly_the_late_clients_and_ends_the_round_at_it():
    times = hand_times([12, 12, 12])
    deadline = sorted(times)[1] + 1e-6  # the two fastest make it
    clock = Clock(Fixed(THREE), F, 3, 4, 3, deadline=deadline)
    sent, replies = exchange([1000] * 3, [500] * 3, [10, 10, 10])
    good, failures, fields = clock.settle(sent, replies, list(replies), [], CLIENT_OF)
    late = int(np.argmax(times))
    assert [f["client"] for f in failures] == [late] and failures[0]["kind"] == "late"
    assert sorted(CLIENT_OF[r.metadata.src_node_id] for r in good) == sorted(
        c for c in range(3) if c != late
    )
    assert fields["round_sim_time_s"] == deadline
    # everyone on time: the round ends at the last arrival, not at the deadline
    clock = Clock(Fixed(THREE), F, 3, 4, 3, deadline=max(times) * 2)
    _, failures, fields = clock.settle(sent, replies, list(replies), [], CLIENT_OF)
    assert failures == [] and fields["round_sim_time_s"] == pytest.approx(max(times))


def test_over_selection_keeps_the_first_k_arrivals():
    times = hand_times([12, 12, 12])
    clock = Clock(Fixed(THREE), F, 3, 4, clients_per_round=2, over_selection=0.5)
    assert clock.sample_size(2) == 3
    sent, replies = exchange([1000] * 3, [500] * 3, [10, 10, 10])
    good, failures, fields = clock.settle(sent, replies, list(replies), [], CLIENT_OF)
    order = list(np.argsort(times))
    assert [CLIENT_OF[r.metadata.src_node_id] for r in good] == sorted(order[:2])
    assert [(f["client"], f["kind"]) for f in failures] == [(order[2], "over_selected")]
    assert fields["round_sim_time_s"] == pytest.approx(sorted(times)[1])


def test_a_straggler_delay_and_a_crash_on_the_clock():
    times = hand_times([12, 12, 12])
    clock = Clock(Fixed(THREE), F, 3, 4, 3)
    sent, replies = exchange([1000] * 3, [500] * 3, [10] * 3, delays=[0, 5.0, 0], errors=(2,))
    good = [r for r in replies if not r.has_error()]
    _, _, fields = clock.settle(sent, replies, good, [], CLIENT_OF)
    assert fields["round_sim_time_s"] == pytest.approx(times[1] + 5.0)
    crash = 0.05 + 4000 * 8 / (8 * MB)  # the crashed client only downloaded
    assert fields["client_sim_time_s"]["max"] == pytest.approx(times[1] + 5.0)
    assert crash < fields["round_sim_time_s"]


def test_a_client_that_goes_offline_mid_round_drops_out():
    times = hand_times([12, 12, 12])
    leaves = Intervals([0.0], [times[0] / 2])
    profiles = [Profile(1.0, 1.0, 8.0, 0.1, leaves), THREE[1], THREE[2]]
    clock = Clock(Fixed(profiles), F, 3, 4, 3)
    sent, replies = exchange([1000] * 3, [500] * 3, [10] * 3)
    good, failures, fields = clock.settle(sent, replies, list(replies), [], CLIENT_OF)
    assert [(f["client"], f["kind"]) for f in failures] == [(0, "offline")]
    assert len(good) == 2
    assert fields["round_sim_time_s"] == pytest.approx(max(times[1], times[2], times[0] / 2))


def test_only_online_clients_are_sampled_and_the_server_waits_for_one():
    profiles = [
        Profile(1, 1, 1, 0, Intervals([0.0], [10.0])),
        Profile(1, 1, 1, 0, Intervals([5.0], [20.0])),
        Profile(1, 1, 1, 0, Intervals([30.0], [40.0])),
    ]
    clock = Clock(Fixed(profiles), F, 1, 1, clients_per_round=3)
    sampler = ClientSampler(3, 3, seed=0)
    sampler.pool, sampler.sample_size = clock.pool, clock.sample_size
    assert sampler.train_clients(1) == [0]
    clock.now = 7.0
    assert sampler.train_clients(2) == [0, 1]
    clock.now = 25.0
    assert clock.begin_round() == {"sim_wait_s": 5.0, "clients_online": 1}
    assert clock.now == 30.0 and sampler.train_clients(3) == [2]


def test_without_a_clock_and_with_everyone_online_sampling_is_unchanged():
    plain = ClientSampler(20, 5, seed=3)
    clocked = ClientSampler(20, 5, seed=3)
    clock = Clock(Sampled("dc", offline_s=0.0), F, 1, 1, 5)
    clock.system.bind(20, 3)
    clocked.pool, clocked.sample_size = clock.pool, clock.sample_size
    for r in range(1, 6):
        assert plain.train_clients(r) == clocked.train_clients(r)


def test_periodic_intervals_answer_online_until_and_next_online():
    a = Intervals([10.0, 50.0], [20.0, 100.0], period=100.0)
    assert not a.online(5.0) and a.online(15.0) and not a.online(30.0) and a.online(99.0)
    assert a.online(115.0) and not a.online(125.0)  # the second period
    assert a.until(15.0) == 20.0 and a.until(160.0) == 200.0 and a.until(30.0) == 30.0
    assert a.next_online(30.0) == 50.0 and a.next_online(101.0) == 110.0
    always = Intervals([0.0], [100.0], period=100.0)
    assert math.isinf(always.until(42.0))
    once = Intervals([1.0], [2.0])
    assert math.isinf(once.next_online(3.0))


def test_alternating_availability_is_seeded_and_online_the_stationary_share():
    a, b = Alternating(600.0, 1800.0, [0, 1]), Alternating(600.0, 1800.0, [0, 1])
    grid = np.arange(0.0, 2e6, 97.0)
    online = [a.online(t) for t in grid]
    assert online == [b.online(t) for t in grid[::-1]][::-1]  # order of questions irrelevant
    assert np.mean(online) == pytest.approx(0.25, abs=0.03)
    t = 1234.5
    if a.online(t):
        assert a.until(t) > t and not a.online(a.until(t) + 1e-9)
    else:
        assert a.online(a.next_online(t))


def test_sampled_profiles_are_per_client_and_tiers_follow_their_fractions():
    s = Sampled("m", gflops=20, gflops_sigma=0.8, up_mbps=1, down_mbps=10, bandwidth_sigma=1)
    s.bind(10, 0)
    big = Sampled("m", gflops=20, gflops_sigma=0.8, up_mbps=1, down_mbps=10, bandwidth_sigma=1)
    big.bind(1000, 0)

    def values(system, c):
        p = system.profile(c)
        return p.gflops, p.up_mbps, p.down_mbps, p.latency_s

    assert [values(s, c) for c in range(10)] == [values(big, c) for c in range(10)]
    p = s.profile(3)
    assert p.down_mbps / p.up_mbps == pytest.approx(10.0)  # one network draw, both ways
    ups = np.log([big.profile(c).up_mbps for c in range(1000)])
    assert np.median(ups) == pytest.approx(0.0, abs=0.12) and np.std(ups) == pytest.approx(
        1, abs=0.1
    )
    tiers = Tiers(
        tiers=[
            {
                "name": "a",
                "fraction": 0.25,
                "gflops": 1,
                "up_mbps": 1,
                "down_mbps": 1,
                "latency_ms": 0,
            },
            {
                "name": "b",
                "fraction": 0.75,
                "gflops": 9,
                "up_mbps": 9,
                "down_mbps": 9,
                "latency_ms": 5,
            },
        ]
    )
    tiers.bind(4000, 1)
    names = [tiers.tier_of(c)["name"] for c in range(4000)]
    assert names.count("a") / 4000 == pytest.approx(0.25, abs=0.02)
    assert {tiers.profile(c).gflops for c in range(4000) if names[c] == "b"} == {9.0}


def test_a_trace_file_in_fedscale_form(tmp_path):
    trace = {
        "0": {"computation": 162.0, "communication": 5648.0},
        "1": {
            "gflops": 2.0,
            "up_kbps": 500,
            "down_kbps": 4000,
            "latency_ms": 20,
            "active": [0, 600],
            "inactive": [300, 900],
            "finish_time": 1000,
        },
    }
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    t = Trace(file=str(path))
    t.bind(2, 0)
    p0, p1 = t.profile(0), t.profile(1)
    assert p0.compute_s(10, 1e12) == pytest.approx(1.62)  # FedScale's ms per example, as is
    assert p0.upload_s(1000) == pytest.approx(8000 / 5.648e6)
    assert p1.download_s(1000) == pytest.approx(0.02 + 8000 / 4e6)
    assert p1.availability.online(650) and not p1.availability.online(1350)
    csv = tmp_path / "trace.csv"
    csv.write_text("client,gflops,communication,active,inactive\n0,1,100,,\n1,2,200,0;10,5;20\n")
    t = Trace(file=str(csv))
    t.bind(2, 0)
    assert t.profile(1).availability.online(12) and not t.profile(1).availability.online(7)


@pytest.mark.parametrize(
    "records, n, says",
    [
        ({"0": {"gflops": 1, "communication": 1}}, 3, "no record for 2 of the sim.num_clients=3"),
        ({"0": {"gflops": -1, "communication": 1}}, 1, "gflops=-1: must be a finite number > 0"),
        ({"0": {"gflops": 1}}, 1, "give communication (kbit/s) or up_kbps and down_kbps"),
        ({"0": {"gflops": 1, "computation": 3, "communication": 1}}, 1, "exactly one of"),
        (
            {"0": {"gflops": 1, "communication": 1, "active": [10, 0], "inactive": [20, 5]}},
            1,
            "must be sorted",
        ),
        ({"0": {"gflops": 1, "communication": 1, "speed": 3}}, 1, "speed=3: unknown key"),
        ({"x": {"gflops": 1, "communication": 1}}, 1, "client id 'x' is not an integer"),
    ],
    ids=["missing", "negative", "no-bandwidth", "two-speeds", "unsorted", "unknown", "bad-id"],
)
def test_a_bad_trace_is_one_line(records, n, says, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ConfigError) as e:
        Trace(file=str(path)).bind(n, 0)
    assert says in str(e.value) and "\n" not in str(e.value)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen, self.trained = nn.Linear(6, 5, bias=False), nn.Linear(5, 3, bias=False)
        self.frozen.weight.requires_grad_(False)

    def forward(self, x):
        return self.trained(self.frozen(x))


class LinearTask:
    label_key = "label"

    def test_set(self):
        g = torch.Generator().manual_seed(0)
        return {"x": torch.randn(40, 6, generator=g), "label": torch.zeros(40, dtype=torch.long)}

    def loss(self, model, batch):
        return nn.functional.cross_entropy(model(batch["x"]), batch["label"])


def test_flops_per_example_are_counted_by_hand():
    model = TwoLayers()
    # forward: 2*6*5 + 2*5*3; backward: the trained layer's weight gradient 2*5*3 (no input
    # gradient: nothing before it trains)
    assert flops_per_example(LinearTask(), model, batch_size=8) == 2 * 6 * 5 + 2 * 5 * 3 * 2
    assert all(p.grad is None for p in model.parameters()) and model.training


def test_a_run_on_the_clock_is_the_same_on_the_batched_engine_and_after_a_resume(
    tmp_path, monkeypatch, run_tiny
):
    from tests.test_checkpoint import interrupted_equals_uninterrupted

    clock = (
        "system=mobile",
        "sim.num_clients=6",
        "sim.clients_per_round=3",
        "sim.over_selection=0.5",
        "sim.deadline=0.25",
        "sim.rounds=4",
        "faults=stragglers",
        "faults.deadline=null",
        "faults.delay_scale=0.1",
    )
    full, resumed = interrupted_equals_uninterrupted(tmp_path, monkeypatch, tiny(*clock), at=2)
    assert full["time_to_accuracy"] == resumed["time_to_accuracy"]
    assert full["sim_time_s"] == resumed["sim_time_s"] > 0
    _, inline, _ = run_tiny(*clock)
    _, batched, _ = run_tiny(*clock, "engine=batched", "engine.group_size=3")
    clock_keys = ("sim_time_s", "round_sim_time_s", "client_sim_time_s", "clients_online")
    for a, b in zip(inline, batched):
        assert [a.get(k) for k in clock_keys] == [b.get(k) for k in clock_keys]
        assert [f["kind"] for f in a["failures"]] == [f["kind"] for f in b["failures"]]
    kinds = {f["kind"] for row in inline for f in row["failures"]}
    assert kinds & {"late", "over_selected", "offline"}  # the clock really dropped some
    assert all(row["sim_time_s"] >= prev["sim_time_s"] for prev, row in zip(inline, inline[1:]))
    assert strip_timings(inline)[0]["sim_time_s"] == 0.0


def test_simulated_seconds_read_well_at_every_scale():
    from fedsim.progress import human_seconds

    got = [human_seconds(s) for s in (0, 0.0094, 0.25, 0.9996, 42, 800, 4000, 1e5)]
    assert got == ["0.0 s", "9.4 ms", "250 ms", "1.0 s", "42.0 s", "13.3 min", "1.1 h", "1.2 d"]
