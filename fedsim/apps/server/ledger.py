"""The server's running record of a run: bytes, failures, epsilons, the last metrics line.

Everything ``summary.json`` totals is added up here, round by round, and saved with every
checkpoint (:meth:`Ledger.state_dict`), so a resumed run reports what an uninterrupted one would.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import Message

from fedsim import keys


class Ledger:
    """Totals of a run so far (see the module docstring)."""

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients
        self.totals: dict[str, Any] = {
            "bytes_up": 0,
            "bytes_down": 0,
            "numel_up": 0,
            "numel_down": 0,
            "replies": 0,
            "sent": 0,
            "rounds_skipped": 0,
            "clients_failed": 0,
            "clients_failed_by_kind": {},
            "faults_injected": {},
        }
        self.aggregation_errors: list[float] = []
        self.state_bytes: dict[int, int] = {}  # client -> bytes of arrays in its Context.state
        self.epsilons: dict[int, tuple[float, float]] = {}  # client -> (epsilon, delta) so far
        self.last: dict[str, Any] = {}  # the latest line of metrics.jsonl
        self.adapter_init: dict[str, Any] = {}  # summary.json's adapter_init
        self.elapsed_before = 0.0  # wall seconds of the run's earlier parts (resumed runs)
        self.resumed_from: list[int] = []

    def elapsed(self, t_start: float) -> float:
        """Wall seconds of the whole run, earlier parts of a resumed run included."""
        return self.elapsed_before + time.perf_counter() - t_start

    # ------------------------------------------------------------------ a round
    def note_replies(self, replies: list[Message], client_of) -> None:
        """What the replies say about their clients: state bytes, DP-SGD epsilon so far."""
        for reply in replies:
            if reply.has_content() and keys.METRICS in reply.content.metric_records:
                values = reply.content[keys.METRICS]
                client = client_of(reply)
                if values.get(keys.STATE_BYTES) is not None:
                    self.state_bytes[client] = int(values[keys.STATE_BYTES])
                if values.get(keys.EPSILON) is not None:  # DP-SGD: the client's spend so far
                    self.epsilons[client] = (float(values[keys.EPSILON]), float(values[keys.DELTA]))

    def note_traffic(self, numel_up: int, numel_down: int, replies: int, sent: int) -> None:
        t = self.totals
        t["numel_up"] += numel_up
        t["numel_down"] += numel_down
        t["replies"] += replies
        t["sent"] += sent

    def client_epsilons(self) -> dict[str, float]:
        """The round's epsilon fields under client DP-SGD: the worst client, the mean over all
        registered clients (0 for those that never trained)."""
        eps = [e for e, _ in self.epsilons.values()]
        return {"epsilon": max(eps, default=0.0), "epsilon_mean": sum(eps) / self.num_clients}

    def add(self, record: dict[str, Any]) -> None:
        """A round's line of metrics.jsonl, written: add it to the totals."""
        t = self.totals
        t["rounds_skipped"] += int(record["round_skipped"])
        t["clients_failed"] += record["clients_failed"]
        for failure in record["failures"]:
            kinds = t["clients_failed_by_kind"]
            kinds[failure["kind"]] = kinds.get(failure["kind"], 0) + 1
        for kind, n in record.get("faults_injected", {}).items():
            injected = t["faults_injected"]
            injected[kind] = injected.get(kind, 0) + n
        if "bytes_up_raw" in record:  # rounds before it (set-up, or a run saved before the
            # fixed-width count was kept, when every payload was fixed-width) were raw already
            t["bytes_up_raw"] = t.get("bytes_up_raw", t["bytes_up"]) + record["bytes_up_raw"]
        t["bytes_up"] += record["bytes_up"]
        t["bytes_down"] += record["bytes_down"]
        self.last = record

    def note_error(self, error: float | None) -> None:
        if error is not None:
            self.aggregation_errors.append(error)

    # ------------------------------------------------------------------ state
    def state_dict(self, t_start: float) -> dict[str, Any]:
        return {
            "totals": self.totals,
            "aggregation_errors": self.aggregation_errors,
            "state_bytes": self.state_bytes,
            "epsilons": self.epsilons,
            "last": self.last,
            "adapter_init": self.adapter_init,
            "elapsed_s": self.elapsed(t_start),
            "resumed_from": self.resumed_from,
        }

    def load_state_dict(self, run: dict[str, Any], server_round: int) -> None:
        self.totals = run["totals"]
        self.aggregation_errors = list(run["aggregation_errors"])
        self.state_bytes = {int(c): int(b) for c, b in run["state_bytes"].items()}
        self.epsilons = {int(c): (float(e), float(d)) for c, (e, d) in run["epsilons"].items()}
        self.last = run["last"]
        self.adapter_init = run["adapter_init"]
        self.elapsed_before = float(run["elapsed_s"])
        self.resumed_from = [*run["resumed_from"], int(server_round)]


def raw_fields(uplink, replies, bytes_up: int) -> dict[str, int]:
    """``bytes_up_raw`` when the uplink compresses: ``bytes_up`` plus what each reply's
    fixed-width format would have taken more (each client says so, bookkeeping)."""
    if "compression" not in uplink.names:
        return {}
    extra = sum(
        int(r.content[keys.METRICS].get(keys.RAW_EXTRA, 0))
        for r in replies
        if r.has_content() and keys.METRICS in r.content.metric_records
    )
    return {"bytes_up_raw": bytes_up + extra}
