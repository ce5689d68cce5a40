"""The inline engine: a Flower ``Grid`` that delivers messages to the ClientApp in-process.

Flower's simulation engine starts Ray (15-47 s here) and routes every message through actors;
for LoRA-sized rounds that costs more than the training. This Grid hands each message straight
to the ClientApp, with one persistent ``Context`` per simulated node, and runs the very same
ServerApp, ClientApp and strategies. Messages are copied in both directions, as a transport
would copy them (:func:`transport_copy`), so neither side can alias the other's records.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Literal

import numpy as np
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedsim import keys, meter, threads
from fedsim.config import RunSpec


def transport_copy(msg: Message) -> Message:
    """What the receiving side of a transport gets: new records, new Arrays, new metadata.

    Each Array's payload is an immutable ``bytes`` object, so the copy shares it instead of
    duplicating it; everything mutable is new. (``copy.deepcopy`` gives the same result at
    1.5x the cost, in a path every message takes.)
    """
    metadata = copy.copy(msg.metadata)
    if msg.has_error():
        return Message(copy.copy(msg.error), metadata=metadata)
    content = RecordDict()
    for key, record in msg.content.items():
        new = type(record)()
        if isinstance(record, ArrayRecord):
            for name, array in record.items():
                new[name] = copy.copy(array)
        else:  # ConfigRecord / MetricRecord: scalars, bytes, strings, or lists of them
            for name, value in record.items():
                new[name] = list(value) if isinstance(value, list) else value
        content[key] = new
    return Message(content=content, metadata=metadata)


class InlineGrid(Grid):
    """A Grid over ``num_nodes`` simulated nodes whose ClientApp runs in this process.

    Node ids are random 63-bit integers drawn from ``seed`` (as Flower's are random), so code
    cannot mistake a node id for a partition id; each node's ``node_config`` carries its
    ``partition-id`` and ``num-partitions`` as in Flower's simulation engine. Contexts are
    created when a node first receives a message and persist for the whole run.
    """

    #: the grid reports each reply to :mod:`fedsim.meter` itself (the transport need not)
    reports_progress = True

    def __init__(
        self, client_app: ClientApp, num_nodes: int, seed: int = 0, run_id: int = 1
    ) -> None:
        self.client_app = client_app
        rng = np.random.default_rng([seed, 99])
        ids: set[int] = set()
        while len(ids) < num_nodes:
            ids.update(int(i) for i in rng.integers(2, 2**63 - 1, size=num_nodes - len(ids)))
        self._partition_of = dict(zip(sorted(ids), rng.permutation(num_nodes).tolist()))
        self._num_nodes = num_nodes
        self._contexts: dict[int, Context] = {}
        self._pending: dict[str, Message] = {}
        self._replies: dict[str, Message] = {}
        self._next_id = 1  # message ids: m1, m2, ... (their order is the order of delivery)
        self._run = Run.create_empty(run_id=run_id)
        self._run.primary_task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    # -------------------------------------------------------------- Grid API
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._partition_of)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self._partition_of:
                raise ValueError(f"unknown destination node {msg.metadata.dst_node_id}")
            md = msg.metadata
            if md.message_id or md.reply_to_message_id or md.ttl <= 0 or md.delivered_at:
                raise ValueError(f"Invalid message: {msg}")  # as Flower's grids check
            msg_id = f"m{self._next_id}"
            self._next_id += 1
            md.__dict__["_message_id"] = msg_id
            self._pending[msg_id] = transport_copy(msg)  # what the client receives
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for msg_id in message_ids:
            if msg_id in self._pending:
                self._deliver(msg_id)
            if msg_id in self._replies:
                out.append(self._replies.pop(msg_id))
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # -------------------------------------------------------------- node state
    def node_states(self) -> dict[int, RecordDict]:
        """Each node's ``Context.state`` (what its client keeps between rounds), by node id;
        nodes that never received a message have none. Checkpoints save these."""
        return {node: ctx.state for node, ctx in self._contexts.items()}

    def message_count(self) -> int:
        """How many messages were pushed so far (checkpoints save it)."""
        return self._next_id - 1

    def continue_message_count(self, count: int) -> None:
        """Number the next messages as a grid that had pushed ``count`` would: a resumed run
        delivers (and so sums) in the order the uninterrupted run did."""
        self._next_id = int(count) + 1

    def load_node_states(self, states: dict[int, RecordDict]) -> None:
        """Give nodes the states :meth:`node_states` returned (a resumed run)."""
        for node, state in states.items():
            if node not in self._partition_of:
                raise ValueError(f"unknown node {node}")
            self.context(node).state = state

    # -------------------------------------------------------------- delivery
    def context(self, node_id: int) -> Context:
        ctx = self._contexts.get(node_id)
        if ctx is None:
            config = {
                keys.PARTITION_ID: self._partition_of[node_id],
                keys.NUM_PARTITIONS: self._num_nodes,
            }
            ctx = Context(
                run_id=self._run.run_id,
                node_id=node_id,
                node_config=config,
                state=RecordDict(),
                run_config={},
            )
            self._contexts[node_id] = ctx
        return ctx

    def _deliver(self, msg_id: str) -> None:
        msg = self._pending.pop(msg_id)
        try:
            reply = self.client_app(msg, self.context(msg.metadata.dst_node_id))
        except Exception as exc:
            reply = exc
        self._store_reply(msg_id, msg, reply)

    def _store_reply(self, msg_id: str, msg: Message, reply: Message | Exception) -> None:
        """Keep the reply to ``msg`` for the server; a client's exception becomes an error
        reply, as in Flower."""
        if isinstance(reply, Exception):
            error = Error(
                code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                reason=f"{type(reply).__name__}: {reply}",
            )
            reply = Message(error, reply_to=msg)
        reply.metadata.__dict__["_message_id"] = f"r{msg_id}"
        self._replies[msg_id] = transport_copy(reply)  # what the server receives
        meter.client_done()


class InlineEngine:
    """Run the apps in this process through :class:`InlineGrid`.

    Parameters
    ----------
    num_threads : int or "auto"
        torch threads for training; ``auto``: every usable CPU for a model above 1M
        parameters, else 1 (:mod:`fedsim.threads`).
    """

    name = "inline"
    #: client states live in this process's grid, so runs can be checkpointed and resumed
    checkpoints = True

    def __init__(self, num_threads: int | Literal["auto"] = "auto") -> None:
        self.num_threads = threads.setting(num_threads)

    def check(self, sim: dict) -> None:
        """Everything runs in this process: only its threads must fit the machine."""
        threads.check(self.num_threads)

    def run(self, spec: RunSpec) -> None:
        self.run_grid(spec, lambda app, n, seed: InlineGrid(app, n, seed=seed))

    def run_grid(self, spec: RunSpec, make_grid) -> None:
        """Run the apps over the grid ``make_grid(client_app, num_nodes, seed)`` builds."""
        import torch

        from fedsim.apps import make_client_app, make_server_app

        if self.num_threads != threads.AUTO:  # auto: set once the model is built (its size)
            torch.set_num_threads(self.num_threads)
        grid = make_grid(
            make_client_app(spec.cfg), spec.cfg["sim"]["num_clients"], spec.cfg["sim"]["seed"]
        )
        context = Context(
            run_id=grid.run.run_id,
            node_id=SUPERLINK_NODE_ID,
            node_config={},
            state=RecordDict(),
            run_config={},
        )
        make_server_app(spec)(grid, context)
