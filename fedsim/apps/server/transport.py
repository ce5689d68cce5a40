"""Delivering a round's messages over the engine's grid, and screening the replies.

Flower's ``send_and_receive`` with no timeout waits forever for a reply that never comes (a lost
client, an engine that died); :meth:`Transport.exchange` pushes once and pulls until every reply
is in, ``sim.round_timeout`` passes, or the engine signals that it stopped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsim import keys, meter
from fedsim.errors import RunFailed

#: ``check(client, reply)``: ``(kind, reason)`` if a reply that arrived must not be used
Check = Callable[[int, Message], "tuple[str, str] | None"]


class Transport:
    """The server's side of the grid: push, pull, screen."""

    def __init__(
        self, grid: Grid, round_timeout: float | None, abort: threading.Event | None = None
    ) -> None:
        self.grid, self.round_timeout, self.abort = grid, round_timeout, abort
        self.client_of: dict[int, int] = {}  # node id -> partition id

    def discover_nodes(self, num_clients: int) -> dict[int, int]:
        """Ask every node for its partition id; returns partition id -> node id."""
        nodes = sorted(self.grid.get_node_ids())
        msgs = [
            Message(
                RecordDict({keys.CONFIG: ConfigRecord()}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
                group_id="0",
            )
            for n in nodes
        ]
        node_of: dict[int, int] = {}
        for reply in self.exchange(msgs):
            if reply.has_error():
                raise RuntimeError(
                    f"node {reply.metadata.src_node_id} failed: {reply.error.reason}"
                )
            node_of[int(reply.content[keys.CONFIG][keys.PARTITION_ID])] = reply.metadata.src_node_id
        if sorted(node_of) != list(range(num_clients)):
            raise RuntimeError(
                f"the federation has {len(node_of)} nodes with partition ids "
                f"{sorted(node_of)[:10]}...; "
                f"sim.num_clients={num_clients} needs exactly the ids 0..{num_clients - 1}"
            )
        self.client_of = {node: client for client, node in node_of.items()}
        return node_of

    def exchange(self, messages: list[Message]) -> list[Message]:
        """Send messages; collect replies until all are in, time is up, or the engine stops."""
        if not messages:
            return []
        pending = set(self.grid.push_messages(messages))
        timeout = self.round_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = 0.001
        while True:
            pulled = list(self.grid.pull_messages(sorted(pending)))
            for reply in pulled:
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
            if pulled and not getattr(self.grid, "reports_progress", False):
                meter.client_done(len(pulled))  # (an in-process grid counts its own)
            if not pending:
                return replies
            if self.abort is not None and self.abort.is_set():
                raise RunFailed("the engine stopped while clients were still working")
            if deadline is not None and time.monotonic() >= deadline:
                return replies
            time.sleep(wait)
            wait = min(wait * 2, 0.05)

    def client_of_reply(self, reply: Message) -> int:
        return self.client_of[reply.metadata.src_node_id]

    def screen(
        self, sent: list[Message], replies: list[Message], check: Check
    ) -> tuple[list[Message], list[dict[str, Any]]]:
        """Split replies into good ones (sorted by client) and failures with their kind and
        reason: ``no_reply``, ``error`` (the client raised), or what ``check`` says."""
        by_id = {m.metadata.reply_to_message_id: m for m in replies}
        good, failures = [], []
        for msg in sent:
            client = self.client_of[msg.metadata.dst_node_id]
            reply = by_id.get(msg.metadata.message_id)
            if reply is None:
                rejected = "no_reply", f"no reply within sim.round_timeout={self.round_timeout} s"
            elif reply.has_error():
                reason = reply.error.reason or f"error code {reply.error.code}"
                rejected = "error", reason.strip().splitlines()[-1]
            else:
                rejected = check(client, reply)
            if rejected is None:
                good.append((client, reply))
            else:
                kind, reason = rejected
                failures.append({"client": client, "kind": kind, "reason": reason})
        good.sort(key=lambda cr: cr[0])
        return [r for _, r in good], failures

    def send(self, sent: list[Message], check: Check):
        """Exchange, then screen: ``(replies, good replies, failures)``."""
        replies = self.exchange(sent)
        good, failures = self.screen(sent, replies, check)
        return replies, good, failures
