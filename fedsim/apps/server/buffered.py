"""FedBuff: buffered asynchronous aggregation on the simulated clock (``sim.async_buffer=K``).

Nguyen et al. (2022), "Federated Learning with Buffered Asynchronous Aggregation"
(https://arxiv.org/abs/2106.06639). ``sim.concurrency`` clients train at once; each starts
from the global arrays of the moment it is dispatched (version ``v_i``) and its reply arrives
at the simulated time its download, local work and upload take (:mod:`fedsim.system.clock`).
Arrivals fill a buffer in time order (ties by client id); at ``K`` good ones the server takes
one step (a line of ``metrics.jsonl``, a "round"):

    w <- w + sum_i p_i s(tau_i) (w_i - w_{v_i}),   s(tau) = (1 + tau)^(-a)

with ``tau_i`` the versions the server moved on since client ``i`` started (its staleness),
``a = sim.staleness_exponent`` (FedBuff's ``1/sqrt(1 + tau)``: ``a = 0.5``) and ``p_i`` the
strategy's own weights: each update is rebased onto the current arrays and the strategy
aggregates the rebased updates as in a synchronous round (its server optimiser, robust rule
and exactness diagnostic included). A freed slot is refilled at once with a client drawn
(seeded) from those online and idle. Every client trains when it is dispatched (the engines
run it then); only the clock decides when its update counts.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message

from fedsim import keys
from fedsim.apps.server.ledger import raw_fields
from fedsim.records import messages_payload, numpy_dict
from fedsim.system.clock import percentiles

_STREAM = 3  # the dispatches' generator stream (sampling: 1 and 2)


@dataclass(order=True)
class InFlight:
    """A dispatched client, until its reply (or failure) arrives on the clock."""

    arrival: float
    client: int
    version: int = field(compare=False)  # the global version it trained from
    start: dict = field(compare=False)  # those global arrays
    sent: Message = field(compare=False)
    reply: Message | None = field(compare=False)
    failure: dict | None = field(compare=False)
    took: float = field(compare=False)  # its simulated seconds

    @property
    def trained(self) -> dict:
        """The arrays it sent (trained from :attr:`start`)."""
        return numpy_dict(self.reply.content[keys.ARRAYS])

    @property
    def num_examples(self) -> int:
        return int(self.reply.content[keys.METRICS][keys.NUM_EXAMPLES])


@dataclass
class Window:
    """What happened between two server steps."""

    bytes_up: int = 0
    bytes_down: int = 0
    numel_up: int = 0
    numel_down: int = 0
    dispatched: list[int] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    buffer: list[InFlight] = field(default_factory=list)
    replies: list[Message] = field(default_factory=list)  # every reply that arrived


class BufferedRounds:
    """The run's rounds as FedBuff's server steps (see the module docstring)."""

    def __init__(self, run) -> None:
        self.run, sim = run, run.sim
        self.k = int(sim["async_buffer"])
        self.concurrency = int(sim.get("concurrency") or sim["clients_per_round"])
        self.exponent = float(sim.get("staleness_exponent", 0.5))
        self.flight: list[InFlight] = []
        self.busy: set[int] = set()
        self.dispatches = 0
        self.last_step = 0.0  # simulated time of the last server step
        self.last_buffer: list[tuple[InFlight, int]] = []

    # ------------------------------------------------------------------ dispatching
    def fill(self, server_round: int, arrays: ArrayRecord, window: Window) -> None:
        """Dispatch online idle clients (seeded) until ``concurrency`` train at once."""
        run = self.run
        free = self.concurrency - len(self.flight)  # training now (not those buffered)
        idle = [c for c in run.clock.pool() if c not in self.busy]
        if free <= 0 or not idle:
            return
        rng = np.random.default_rng([run.sim["seed"], _STREAM, self.dispatches])
        self.dispatches += 1
        picked = (
            idle if len(idle) <= free else [idle[i] for i in rng.choice(len(idle), free, False)]
        )
        self.dispatch(sorted(picked), server_round, arrays, window)

    def dispatch(self, clients, server_round: int, arrays: ArrayRecord, window: Window) -> None:
        run, fed, clock = self.run, self.run.federation, self.run.clock
        config = ConfigRecord()
        info = fed.begin(server_round, arrays, config)
        sent = fed.messages(info, clients, arrays, config)
        nbytes, numel = messages_payload(sent)
        window.bytes_down += nbytes
        window.numel_down += numel
        window.dispatched += clients
        replies, good, failures = run.transport.send(sent, fed.reply_reason)
        run.ledger.note_replies(replies, run.transport.client_of_reply)
        by_id = {r.metadata.reply_to_message_id: r for r in replies}
        failed = {f["client"]: f for f in failures}
        start = numpy_dict(arrays)
        for msg in sent:
            client = fed.client_of[msg.metadata.dst_node_id]
            reply = by_id.get(msg.metadata.message_id)
            if reply is None:
                took, failure = 0.0, failed[client]
            else:
                t = clock.client_time(client, msg, reply, setup=False)
                took, failure = (
                    (t.offline_at, clock.failure(t, "offline"))
                    if t.dropped_out
                    else (
                        t.total,
                        failed.get(client),
                    )
                )
                reply = None if t.dropped_out else reply
            item = InFlight(
                clock.now + took, client, server_round - 1, start, msg, reply, failure, took
            )
            heapq.heappush(self.flight, item)
            self.busy.add(client)

    def next_arrival(self, server_round: int, arrays: ArrayRecord, window: Window) -> InFlight:
        """Fill the free slots, then move the clock to the next arrival."""
        clock = self.run.clock
        while True:
            self.fill(server_round, arrays, window)
            if self.flight:
                break
            clock.wait_for_clients(self.busy)  # nobody online and idle: wait for one
        item = heapq.heappop(self.flight)
        clock.now = max(clock.now, item.arrival)
        return item

    # ------------------------------------------------------------------ a server step
    def train_round(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict]:
        run, fed = self.run, self.run.federation
        run.printer.begin_round(server_round, self.k)
        window = Window()
        while len(window.buffer) < self.k:
            item = self.next_arrival(server_round, arrays, window)
            if item.reply is not None:
                window.replies.append(item.reply)
                nbytes, numel = messages_payload([item.reply])
                window.bytes_up += nbytes
                window.numel_up += numel
            if item.failure is not None:
                window.failures.append(item.failure)
                self.busy.discard(item.client)
            else:  # busy until the server has taken its update (one per client per step)
                window.buffer.append(item)
        buffer = sorted(window.buffer, key=lambda it: it.client)
        stale = [server_round - 1 - it.version for it in buffer]
        self.last_buffer = list(zip(buffer, stale))  # (for tests and diagnostics)
        info = fed.begin(server_round, arrays, ConfigRecord())
        starts = {it.client: it.start for it in buffer}
        info.reference = starts.__getitem__  # each update is relative to what it started from
        info.sent_in = {it.client: it.version + 1 for it in buffer}
        self.rebase.staleness = {it.client: tau for it, tau in zip(buffer, stale)}
        for it in buffer:  # the stages read each reply again in the step's frame (decoding)
            reason = fed.uplink.screen(info, it.client, it.reply)
            if reason is not None:
                raise RuntimeError(f"client {it.client}'s buffered reply: {reason[1]}")
        new, metrics = fed.aggregate_train(server_round, [it.reply for it in buffer])
        self.busy -= set(starts)
        arrays = new if new is not None else arrays
        run.ledger.note_error(fed.last_aggregation_error)
        replied = len(buffer) + sum(1 for f in window.failures if f["kind"] != "offline")
        run.ledger.note_traffic(window.numel_up, window.numel_down, replied, len(window.dispatched))
        return arrays, self.record(server_round, window, stale, metrics)

    @property
    def rebase(self):
        """The chain's FedBuff stage (:class:`fedsim.staleness.Rebase`)."""
        return next(s for s in self.run.federation.uplink.stages if s.name == "fedbuff")

    def record(self, server_round: int, window: Window, stale, metrics) -> dict[str, Any]:
        run, clock = self.run, self.run.clock
        length, self.last_step = clock.now - self.last_step, clock.now
        failures = sorted(window.failures, key=lambda f: f["client"])
        return {
            keys.TRAIN_LOSS: None if metrics is None else metrics.get(keys.TRAIN_LOSS),
            **run.privacy_fields(),
            "aggregation_error": run.federation.last_aggregation_error,
            "bytes_up": window.bytes_up,
            **raw_fields(run.uplink, window.replies, window.bytes_up),
            "bytes_down": window.bytes_down,
            "clients_sampled": len(window.dispatched),
            "clients_ok": len(window.buffer),
            "clients_failed": len(failures),
            "failures": failures,
            "round_skipped": False,
            **run.uplink.report(server_round, sorted(window.dispatched)),
            **run.strategy.round_metrics,
            "sim_time_s": clock.now,
            "round_sim_time_s": length,
            "client_sim_time_s": percentiles([it.took for it in window.buffer]),
            "staleness": {"mean": float(np.mean(stale)), "max": int(max(stale))},
            "clients_in_flight": len(self.busy),
        }
