"""The public interface of fedsim's server strategies.

A strategy is a Flower message-API strategy (``flwr.serverapp.strategy.Strategy``) whose two
halves live in one class:

* the **server half** — :meth:`AdapterStrategy.aggregate` turns the round's client updates into
  the new global arrays (plus what Flower's ``configure_*`` / ``aggregate_*`` need, provided here);
* the **client half** — :meth:`~AdapterStrategy.client_receive` loads what the server sent into
  the client's model and :meth:`~AdapterStrategy.client_send` picks what goes back.

fedsim, not Flower's random node sampling, chooses each round's clients (by partition id, from
the run's seed, see :class:`ClientSampler`), so every engine trains the same clients. A new
strategy usually overrides :meth:`aggregate` only; see ``strategies/fedavg.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedsim import keys
from fedsim.adapters.base import AdapterSpec
from fedsim.records import array_numpy, array_record, numpy_dict
from fedsim.validate import boolean

log = logging.getLogger(__name__)


class ClientSampler:
    """Which clients (partition ids) train and evaluate in each round, from the run's seed.

    Parameters
    ----------
    num_clients : int
    clients_per_round : int
    seed : int
    eval_clients : int or None
        Clients evaluated per round on their local test split (``None``: all of them).
    """

    def __init__(
        self, num_clients: int, clients_per_round: int, seed: int, eval_clients: int | None = None
    ) -> None:
        self.num_clients, self.clients_per_round = num_clients, clients_per_round
        self.seed, self.eval_clients = seed, eval_clients

    def _draw(self, stream: int, server_round: int, k: int) -> list[int]:
        if k >= self.num_clients:
            return list(range(self.num_clients))
        rng = np.random.default_rng([self.seed, stream, server_round])
        return sorted(int(i) for i in rng.choice(self.num_clients, size=k, replace=False))

    def train_clients(self, server_round: int) -> list[int]:
        return self._draw(1, server_round, self.clients_per_round)

    def evaluate_clients(self, server_round: int) -> list[int]:
        k = self.num_clients if self.eval_clients is None else self.eval_clients
        return self._draw(2, server_round, k)


@dataclass
class StrategyContext:
    """What fedsim's server tells a strategy before the first round."""

    sampler: ClientSampler
    node_of: dict[int, int]  # partition id -> Flower node id
    spec: AdapterSpec  # parameter names trained / sent
    seed: int
    client_of: dict[int, int] = field(init=False)  # node id -> partition id

    def __post_init__(self) -> None:
        self.client_of = {node: client for client, node in self.node_of.items()}


@dataclass
class ClientUpdate:
    """One client's reply to a training round, as a strategy's :meth:`aggregate` sees it."""

    client: int  # partition id
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


def weighted_mean(
    arrays: list[Mapping[str, np.ndarray]], weights: list[float] | np.ndarray
) -> dict[str, np.ndarray]:
    """``sum_i w_i * arrays_i`` per key, accumulated in float64, returned in the input dtype."""
    out = {}
    for name, first in arrays[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for arr, w in zip(arrays, weights):
            acc += float(w) * arr[name].astype(np.float64, copy=False)
        out[name] = acc.astype(first.dtype)
    return out


class AdapterStrategy(Strategy):
    """Base class of fedsim strategies. Subclasses implement :meth:`aggregate`.

    Parameters
    ----------
    weighted : bool
        Weight clients by their number of training examples (``p_i = n_i / sum n_j``) when
        averaging; otherwise every sampled client counts ``1/k``.
    """

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = boolean("strategy.weighted", weighted)
        self.ctx: StrategyContext | None = None
        self.current: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ wiring
    def bind(self, ctx: StrategyContext) -> None:
        """Called by fedsim's server once, before the first round."""
        self.ctx = ctx

    @property
    def context(self) -> StrategyContext:
        if self.ctx is None:
            raise RuntimeError(f"{type(self).__name__} is not bound: call bind() first")
        return self.ctx

    # ------------------------------------------------------------------ client half
    def client_receive(
        self, model: nn.Module, spec: AdapterSpec, arrays: dict[str, np.ndarray], state: RecordDict
    ) -> None:
        """Load what the server sent into the client's model (default: all of it)."""
        spec.load(model, arrays)

    def client_send(self, model: nn.Module, spec: AdapterSpec, state: RecordDict) -> dict:
        """What the client sends back after training (default: the adapter's sent parameters)."""
        return spec.sent_state(model)

    def client_evaluate(
        self, model: nn.Module, spec: AdapterSpec, arrays: dict[str, np.ndarray], state: RecordDict
    ) -> None:
        """Prepare the client's model to evaluate the global model (default: load the arrays).

        Federated evaluation measures the global model on each client's local test split; it
        is not part of the training protocol and its traffic is not counted, so this hook must
        not change ``state`` (a personalised strategy may read it).
        """
        spec.load(model, arrays)

    # ------------------------------------------------------------------ server half
    def initial_arrays(self, model: nn.Module, spec: AdapterSpec) -> dict[str, np.ndarray]:
        """The global arrays before round 1 (default: the sent parameters at initialisation)."""
        return {k: v.detach().cpu().numpy().copy() for k, v in spec.sent_state(model).items()}

    def load_global(
        self, model: nn.Module, spec: AdapterSpec, arrays: dict[str, np.ndarray]
    ) -> None:
        """Make the server's model the global model (for server-side evaluation)."""
        spec.load(model, arrays)

    def aggregate(
        self, server_round: int, current: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        """The new global arrays from the current ones and the round's client updates."""
        raise NotImplementedError

    def check_reply(self, arrays: ArrayRecord) -> str | None:
        """Why a client's reply cannot be aggregated, or None if it can.

        Called by the server on every reply before :meth:`aggregate`; rejected replies count as
        failed clients. Default: the same names and shapes as the global arrays, finite values.
        A strategy whose clients send something else (a subset, a compressed payload)
        overrides this together with :meth:`client_send` and :meth:`aggregate`.
        """
        expected = self.current
        if set(arrays.keys()) != set(expected):
            return "malformed reply: unexpected array names"
        for name, arr in arrays.items():
            if tuple(arr.shape) != expected[name].shape:
                shape, want = tuple(arr.shape), expected[name].shape
                return f"malformed reply: {name} has shape {shape}, expected {want}"
            if not np.all(np.isfinite(array_numpy(arr, copy=False))):
                return f"non-finite values in {name}"
        return None

    def check_aggregate(self, new: Mapping[str, np.ndarray]) -> None:
        """The global arrays keep their names, shapes and dtypes from round to round."""
        name = type(self).__name__
        if set(new) != set(self.current):
            missing, extra = (
                sorted(set(self.current) - set(new)),
                sorted(set(new) - set(self.current)),
            )
            raise ValueError(
                f"{name}.aggregate returned other array names than the global arrays "
                f"(missing {missing[:5]}, unexpected {extra[:5]})"
            )
        for key, value in new.items():
            want = self.current[key]
            if np.shape(value) != want.shape or np.asarray(value).dtype != want.dtype:
                raise ValueError(
                    f"{name}.aggregate returned {key} as {np.asarray(value).dtype}"
                    f"{list(np.shape(value))}; the global array is {want.dtype}{list(want.shape)}"
                )

    def weights(self, updates: list[ClientUpdate]) -> np.ndarray:
        """``p_i``: by number of examples if ``weighted``, else uniform."""
        if self.weighted:
            n = np.array([u.num_examples for u in updates], dtype=np.float64)
            return n / n.sum()
        return np.full(len(updates), 1.0 / len(updates))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Server state that must survive a round beyond the global arrays (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")

    # ------------------------------------------------------------------ Flower Strategy API
    def _messages(
        self, clients: Iterable[int], record: RecordDict, message_type: str, server_round: int
    ) -> list[Message]:
        node_of = self.context.node_of
        return [
            Message(
                record,
                dst_node_id=node_of[c],
                message_type=message_type,
                group_id=str(server_round),
            )
            for c in clients
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = numpy_dict(arrays)
        config[keys.SERVER_ROUND] = server_round
        record = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config})
        clients = self.context.sampler.train_clients(server_round)
        return self._messages(clients, record, MessageType.TRAIN, server_round)

    def updates_from(self, replies: Iterable[Message]) -> list[ClientUpdate]:
        client_of = self.context.client_of
        out = []
        for msg in replies:
            if msg.has_error():
                continue
            metrics = dict(msg.content[keys.METRICS])
            out.append(
                ClientUpdate(
                    client=client_of[msg.metadata.src_node_id],
                    arrays=numpy_dict(msg.content[keys.ARRAYS]),
                    num_examples=int(metrics.pop(keys.NUM_EXAMPLES)),
                    metrics=metrics,
                )
            )
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates = self.updates_from(replies)
        if not updates:
            return None, None
        new = self.aggregate(server_round, self.current, updates)
        self.check_aggregate(new)
        w = self.weights(updates)
        metrics = MetricRecord()
        for key in updates[0].metrics:
            metrics[key] = float(sum(wi * u.metrics[key] for wi, u in zip(w, updates)))
        return array_record(new), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[keys.SERVER_ROUND] = server_round
        record = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config})
        clients = self.context.sampler.evaluate_clients(server_round)
        return self._messages(clients, record, MessageType.EVALUATE, server_round)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Per-client mean and worst accuracy on the clients' local test splits."""
        rows = [dict(m.content[keys.METRICS]) for m in replies if not m.has_error()]
        rows = [r for r in rows if r.get(keys.NUM_EXAMPLES, 0) > 0]
        if not rows:
            return None
        acc = np.array([r[keys.EVAL_ACCURACY] for r in rows])
        loss = np.array([r[keys.EVAL_LOSS] for r in rows])
        return MetricRecord(
            {
                "eval_accuracy_client_mean": float(acc.mean()),
                "eval_accuracy_client_min": float(acc.min()),
                "eval_loss_client_mean": float(loss.mean()),
                "clients_evaluated": len(rows),
            }
        )

    def summary(self) -> None:
        log.info("%s(weighted=%s)", type(self).__name__, self.weighted)
