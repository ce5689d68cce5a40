"""The simulated clock: arithmetic on the exact bytes and local work of every message.

For client ``c`` sampled at the round's start ``T`` (every time in simulated seconds):

* download ``latency_c + 8 * bytes_down / down_bps_c`` (the bytes of the message it receives);
* compute ``steps * min(batch_size, n_c) * F / flops_c``: ``F`` the FLOPs of one example's
  forward and backward pass through the task's model with its adapter, counted once by
  ``torch.utils.flop_counter`` on the first ``batch_size`` test examples (or a trace's
  measured milliseconds per example), ``n_c`` its training examples;
* a straggler's injected delay (``faults.straggler_prob``), if any;
* upload ``latency_c + 8 * bytes_up / up_bps_c`` (the bytes of the reply it sends).

Its reply arrives at ``T + t_c``. A client whose online period ends first drops out
(``offline``); with ``sim.deadline`` a reply after ``T + deadline`` is dropped (``late``; the
client trained: its state moved on); with ``sim.over_selection`` the server samples
``ceil(k (1 + over_selection))`` online clients and closes the round at the ``k``-th good
arrival (the others: ``over_selected``). The round ends at the deadline when something was
cut by it, at the ``k``-th arrival when over-selection closed it, else at the last event
(arrival, error or dropout). When nobody is online at ``T``, the server waits for the first
client to come online. Nothing sleeps, nothing is measured in wall time: the same inputs
give the same seconds on every engine and after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Message

from fedsim import keys
from fedsim.errors import RunFailed
from fedsim.records import messages_payload
from fedsim.system.profiles import System


@dataclass(frozen=True)
class ClientTime:
    """One client's round on the clock (seconds from the round's start)."""

    client: int
    down: float
    compute: float = 0.0
    delay: float = 0.0
    up: float = 0.0
    offline_at: float = math.inf
    error: bool = False

    @property
    def total(self) -> float:
        return self.down if self.error else self.down + self.compute + self.delay + self.up

    @property
    def dropped_out(self) -> bool:
        return not self.error and self.offline_at < self.total

    @property
    def event(self) -> float:
        """When the server learns of this client: its reply, its error or its dropout."""
        return min(self.offline_at, self.total)


def _bytes(msg: Message) -> int:
    return messages_payload([msg])[0]


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p90 = np.percentile(np.asarray(values, dtype=np.float64), [50, 90])
    return {"p50": float(p50), "p90": float(p90), "max": float(max(values))}


class Clock:
    """The run's simulated clock (see the module docstring).

    Parameters
    ----------
    system : System
        The clients' profiles, bound to the federation.
    flops_per_example : float
        ``F`` above.
    local_steps, batch_size : int
        A client's local work per round.
    clients_per_round : int
        ``k``: the good replies over-selection waits for.
    deadline : float or None
        ``sim.deadline`` (simulated seconds from the round's start).
    over_selection : float
        ``sim.over_selection`` (0: sample ``k``).
    """

    def __init__(
        self,
        system: System,
        flops_per_example: float,
        local_steps: int,
        batch_size: int,
        clients_per_round: int,
        deadline: float | None = None,
        over_selection: float = 0.0,
    ) -> None:
        self.system, self.flops_per_example = system, float(flops_per_example)
        self.local_steps, self.batch_size = local_steps, batch_size
        self.k, self.deadline, self.over_selection = clients_per_round, deadline, over_selection
        self.now = 0.0
        self.reached: dict[float, float | None] = {t: None for t in system.targets}

    # ------------------------------------------------------------------ sampling
    def sample_size(self, k: int) -> int:
        """How many clients to sample for ``k`` good replies (over-selection)."""
        return math.ceil(k * (1.0 + self.over_selection) - 1e-9)

    def pool(self) -> list[int]:
        """The clients online now (every client without an availability model)."""
        n = self.system.num_clients
        if not self.system.has_availability:
            return list(range(n))
        return [c for c in range(n) if self.system.profile(c).availability.online(self.now)]

    def begin_round(self) -> dict[str, Any]:
        """Wait for somebody to be online; the round's availability fields."""
        if not self.system.has_availability:
            return {}
        wait = self.wait_for_clients()
        return {"sim_wait_s": wait, "clients_online": len(self.pool())}

    def wait_for_clients(self, busy: Collection[int] = ()) -> float:
        """Move the clock to the first moment somebody (not ``busy``) is online; returns the
        wait."""
        others = [c for c in range(self.system.num_clients) if c not in busy]
        if not others:
            raise RunFailed("every client is busy: none can be sampled")
        if not self.system.has_availability or set(self.pool()) - set(busy):
            return 0.0
        first = min(self.system.profile(c).availability.next_online(self.now) for c in others)
        if math.isinf(first):
            raise RunFailed(
                f"no client is ever online again after {self.now:.1f} simulated seconds "
                f"(system={self.system.name}): the run cannot go on"
            )
        wait, self.now = first - self.now, first
        return wait

    # ------------------------------------------------------------------ a round
    def client_time(self, client: int, sent: Message, reply: Message, setup: bool) -> ClientTime:
        p = self.system.profile(client)
        down = p.download_s(_bytes(sent))
        offline_at = p.availability.until(self.now) - self.now
        if reply.has_error() or keys.METRICS not in reply.content.metric_records:
            return ClientTime(client, down, offline_at=offline_at, error=True)
        metrics = reply.content[keys.METRICS]
        n = int(metrics.get(keys.NUM_EXAMPLES, 0))
        examples = n if setup else self.local_steps * min(self.batch_size, n)
        return ClientTime(
            client,
            down,
            compute=p.compute_s(examples, self.flops_per_example),
            delay=float(metrics.get(keys.DELAY, 0.0)),
            up=p.upload_s(_bytes(reply)),
            offline_at=offline_at,
        )

    def times(
        self, sent: list[Message], replies: list[Message], client_of: Mapping[int, int], setup=False
    ) -> dict[int, ClientTime]:
        """Every client that answered, on the clock."""
        by_id = {r.metadata.reply_to_message_id: r for r in replies}
        out = {}
        for msg in sent:
            reply = by_id.get(msg.metadata.message_id)
            if reply is not None:
                client = client_of[msg.metadata.dst_node_id]
                out[client] = self.client_time(client, msg, reply, setup)
        return out

    def settle(
        self,
        sent: list[Message],
        replies: list[Message],
        good: list[Message],
        failures: list[dict[str, Any]],
        client_of: Mapping[int, int],
    ) -> tuple[list[Message], list[dict[str, Any]], dict[str, Any]]:
        """Drop the good replies the clock rules out (offline, late, over-selected), move the
        clock to the round's end; returns the good replies kept, every failure, and the
        round's clock fields for ``metrics.jsonl``."""
        times = self.times(sent, replies, client_of)
        source = {r.metadata.src_node_id: r for r in good}
        mine = [(times[client_of[node]], node) for node in source]
        arrivals = sorted((t.total, t.client, node) for t, node in mine if not t.dropped_out)
        dropped = [self.failure(t, "offline") for t, _ in mine if t.dropped_out]
        kept, cut_by_deadline, closed_at = [], False, None
        for total, client, node in arrivals:
            if self.deadline is not None and total > self.deadline:
                cut_by_deadline = True
                dropped.append(self.failure(times[client], "late"))
            elif self.over_selection and len(kept) >= self.k:
                dropped.append(self.failure(times[client], "over_selected"))
            else:
                kept.append((client, source[node]))
                if self.over_selection and len(kept) == self.k:
                    closed_at = total
        events = [t.event for t in times.values()]
        if closed_at is not None:
            length = closed_at
        elif self.deadline is not None and (
            cut_by_deadline or any(e > self.deadline for e in events)
        ):
            length = self.deadline
        else:
            length = max(events, default=0.0)
        self.now += length
        trained = [t.total for t in times.values() if not t.error and not t.dropped_out]
        fields = {"round_sim_time_s": length, "client_sim_time_s": percentiles(trained)}
        good = [r for _, r in sorted(kept, key=lambda cr: cr[0])]
        return good, failures + sorted(dropped, key=lambda f: f["client"]), fields

    def failure(self, t: ClientTime, kind: str) -> dict[str, Any]:
        if kind == "offline":
            reason = (
                f"offline: went offline {t.offline_at:.2f} simulated s into the round, before "
                f"its reply ({t.total:.2f} s)"
            )
        elif kind == "late":
            reason = (
                f"late: its reply took {t.total:.2f} simulated s > sim.deadline={self.deadline:g} s"
            )
        else:
            reason = f"over_selected: the round closed at its first {self.k} good replies"
        return {"client": t.client, "kind": kind, "reason": reason}

    def setup_round(
        self, sent: list[Message], replies: list[Message], client_of: Mapping[int, int]
    ) -> float:
        """The adapter's set-up round (clients compute its statistics on their examples, one
        forward and backward pass each): the clock waits for every reply."""
        times = self.times(sent, replies, client_of, setup=True)
        length = max((t.total for t in times.values()), default=0.0)
        self.now += length
        return length

    # ------------------------------------------------------------------ results
    def note(self, record: dict[str, Any]) -> None:
        """A written round: the first time each target accuracy is reached."""
        accuracy = record.get(keys.EVAL_ACCURACY)
        if accuracy is None:
            accuracy = record.get("eval_accuracy_client_mean")
        for target, when in self.reached.items():
            if when is None and accuracy is not None and accuracy >= target:
                self.reached[target] = record["sim_time_s"]

    def time_to_accuracy(self) -> dict[str, float | None]:
        return {f"{t:g}": when for t, when in self.reached.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"now": self.now, "reached": self.time_to_accuracy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.now = float(state["now"])
        saved = dict(state["reached"])
        self.reached = {t: saved.get(f"{t:g}") for t in self.reached}
