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
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedsim import keys
from fedsim.adapters.base import Adapter, AdapterSpec
from fedsim.data import FederatedData
from fedsim.errors import ConfigError
from fedsim.feedback import EF21P, Codec
from fedsim.privacy import CentralDP
from fedsim.records import array_numpy, array_record, messages_payload, numpy_dict
from fedsim.tasks.base import Batch
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
    spec: AdapterSpec  # parameter names trained / sent / frozen, the adapter
    seed: int
    aggregation_error: bool = True  # compute the per-round exactness diagnostic
    codec: Codec | None = None  # compression and error feedback of client updates
    downlink: EF21P | None = None  # EF21-P compression of the global arrays sent to clients
    central: CentralDP | None = None  # user-level DP on the server (DP-FedAvg)
    client_of: dict[int, int] = field(init=False)  # node id -> partition id

    def __post_init__(self) -> None:
        self.client_of = {node: client for client, node in self.node_of.items()}


@dataclass
class ClientCall:
    """What a client-side hook knows about the call it serves."""

    client: int  # partition id
    server_round: int
    seed: int  # the run's seed
    state: RecordDict  # the client's Context.state: what it keeps between rounds


@dataclass
class ClientUpdate:
    """One client's reply to a training round, as a strategy's :meth:`aggregate` sees it."""

    client: int  # partition id
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]
    #: the client's uncompressed trained arrays (the aggregation error's input) when what it
    #: sent is a compressed payload; None: ``arrays`` are those
    diagnostic: dict[str, np.ndarray] | None = None


def weighted_mean(
    arrays: list[Mapping[str, np.ndarray]], weights: list[float] | np.ndarray
) -> dict[str, np.ndarray]:
    """``sum_i w_i * arrays_i`` per key, accumulated and returned in float64.

    The base class casts what :meth:`AdapterStrategy.aggregate` returns to the global arrays'
    dtypes after measuring the aggregation error, so the diagnostic sees the exact mean.
    """
    out = {}
    for name, first in arrays[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for arr, w in zip(arrays, weights):
            acc += float(w) * arr[name].astype(np.float64, copy=False)
        out[name] = acc
    return out


def with_prefix(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {prefix + name: value for name, value in arrays.items()}


def split_prefix(
    prefix: str, arrays: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(arrays without the prefix, the prefixed ones with the prefix removed)``."""
    plain, tagged = {}, {}
    for name, value in arrays.items():
        if name.startswith(prefix):
            tagged[name[len(prefix) :]] = value
        else:
            plain[name] = value
    return plain, tagged


def merge_records(*records: ArrayRecord) -> ArrayRecord:
    """One record holding the arrays of all, sharing their Array objects (no copy)."""
    out = ArrayRecord()
    for record in records:
        for name, array in record.items():
            out[name] = array
    return out


def extend_record(record: ArrayRecord, extra: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``record`` plus ``extra`` arrays, sharing ``record``'s Array objects (no copy)."""
    return merge_records(record, array_record(extra)) if extra else record


#: prefix of the frozen adapter parameters in a message (``frozen/<parameter name>``)
FROZEN = "frozen/"


class AdapterStrategy(Strategy):
    """Base class of fedsim strategies. Subclasses implement :meth:`aggregate`.

    Parameters
    ----------
    weighted : bool
        Weight clients by their number of training examples (``p_i = n_i / sum n_j``) when
        averaging; otherwise every sampled client counts ``1/k``.
    """

    #: names of the adapters (``conf/adapter``) the strategy works with; ``None``: any
    adapters: tuple[str, ...] | None = None
    #: no global model: each client keeps its own (server-side evaluation and the
    #: aggregation error are null; clients evaluate their personal models)
    personalised = False
    #: the server step is a (weighted) mean of the arrays clients send, so error feedback's
    #: server step (EF21, EControl) can replace it
    averages = False
    #: clients send updates (the references ``local`` and ``centralized`` do not)
    communicates = True
    #: clients train the same parameters every round (FLoRA starts fresh ones)
    persistent_parameters = True
    #: changes are folded into the clients' frozen base weights (FedEx, FLoRA), so clients'
    #: base weights differ (the batched engine stacks them)
    folds_into_base = False

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = boolean("strategy.weighted", weighted)
        self.ctx: StrategyContext | None = None
        self.current: dict[str, np.ndarray] = {}
        #: the server's copy of the frozen adapter parameters (set by :meth:`initial_arrays`)
        self.frozen: dict[str, np.ndarray] = {}
        #: clients known to hold the frozen parameters when those come from data
        self.has_frozen: set[int] = set()
        #: the change folded into the frozen base in the current round (float64, by module)
        self.round_fold: dict[str, np.ndarray] = {}
        #: the aggregation error of the last aggregated round (None: not measured)
        self.last_aggregation_error: float | None = None
        #: extra numbers the last aggregation reports (logged in that round's metrics line)
        self.round_metrics: dict[str, float] = {}
        self._frozen_record: ArrayRecord | None = None
        self._decoded: dict[int, dict[str, np.ndarray]] = {}  # this round's decoded payloads
        #: client -> the last round whose compressed message the server aggregated (a client
        #: whose message was not takes its memories back, see fedsim.feedback)
        self.absorbed: dict[int, int] = {}
        #: the global arrays as the round's clients hold them (EF21-P: ``w``, else current)
        self.held: dict[str, np.ndarray] = {}

    @property
    def name(self) -> str:
        """The class messages name (a plug-in's own class for a wrapped aggregator)."""
        return type(self).__name__

    # ------------------------------------------------------------------ wiring
    def bind(self, ctx: StrategyContext) -> None:
        """Called by fedsim's server once, before the first round."""
        self.ctx = ctx

    @property
    def context(self) -> StrategyContext:
        if self.ctx is None:
            raise RuntimeError(f"{type(self).__name__} is not bound: call bind() first")
        return self.ctx

    def check_setup(self, adapter: Adapter, sim: Mapping[str, Any]) -> None:
        """Refuse, with a ConfigError, an adapter or settings the strategy cannot work with."""
        if self.adapters is not None and adapter.name not in self.adapters:
            needs = " or ".join(self.adapters)
            raise ConfigError(
                "adapter",
                adapter.name,
                f"strategy {self.name} needs adapter={needs}",
            )

    def global_names(self, spec: AdapterSpec) -> list[str]:
        """The parameters that make up the global arrays (default: everything the adapter sends)."""
        return list(spec.sent)

    # ------------------------------------------------------------------ client half
    def client_receive(
        self, model: nn.Module, spec: AdapterSpec, arrays: dict[str, np.ndarray], call: ClientCall
    ) -> None:
        """Load what the server sent into the client's model.

        Default: keep and load the frozen adapter parameters when the server sends them (once,
        for adapters initialised from data), otherwise load the client's stored copy; then load
        the global arrays.
        """
        plain = self.receive_frozen(model, spec, arrays, call.state)
        spec.load(model, plain)

    def client_send(self, model: nn.Module, spec: AdapterSpec, call: ClientCall) -> dict:
        """What the client sends back after training (default: :meth:`sent_arrays`)."""
        return self.sent_arrays(model, spec, call)

    def sent_arrays(self, model: nn.Module, spec: AdapterSpec, call: ClientCall) -> dict:
        """The arrays a client sends, read from its model without side effects (default: the
        adapter's sent parameters). Read before training too: a compressed update is the
        difference between the two readings."""
        return spec.sent_state(model)

    def client_evaluate(
        self, model: nn.Module, spec: AdapterSpec, arrays: dict[str, np.ndarray], call: ClientCall
    ) -> None:
        """Prepare the client's model to evaluate the global model (default: load the arrays).

        Federated evaluation measures the global model on each client's local test split; it
        is not part of the training protocol and its traffic is not counted, so this hook must
        not change ``call.state`` (a personalised strategy may read it).
        """
        plain, frozen = split_prefix(FROZEN, arrays)
        spec.load(model, frozen)
        spec.load(model, plain)

    def client_data(self, data: FederatedData, client: int) -> Batch:
        """The examples a client trains on (default: its own training split)."""
        return data.client(client).train

    def client_batch_size(self, batch_size: int) -> int:
        """The batch size a client trains with (default: ``sim.batch_size``)."""
        return batch_size

    def receive_frozen(
        self, model: nn.Module, spec: AdapterSpec, arrays: dict[str, np.ndarray], state: RecordDict
    ) -> dict[str, np.ndarray]:
        """Store and load frozen adapter parameters sent by the server, or load the stored copy.

        Returns the other arrays. Frozen parameters derived from the seed are already in the
        model (built identically everywhere) and are never sent.
        """
        plain, frozen = split_prefix(FROZEN, arrays)
        if frozen:
            state[keys.STATE_FROZEN] = array_record(frozen)
            spec.load(model, frozen)
        elif keys.STATE_FROZEN in state:
            spec.load(model, numpy_dict(state[keys.STATE_FROZEN]))
        elif spec.adapter is not None and spec.adapter.frozen_source == "data" and spec.frozen:
            raise RuntimeError("the server has not sent this client its frozen adapter factors")
        return plain

    # ------------------------------------------------------------------ server half
    def initial_arrays(self, model: nn.Module, spec: AdapterSpec) -> dict[str, np.ndarray]:
        """The global arrays before round 1: the :meth:`global_names` parameters at
        initialisation. Also records the frozen adapter parameters (:attr:`frozen`)."""
        self.frozen = spec.frozen_state(model)
        self._frozen_record = None
        params = spec.parameters_of(model)
        return {n: params[n].detach().cpu().numpy().copy() for n in self.global_names(spec)}

    def load_global(
        self, model: nn.Module, spec: AdapterSpec, arrays: dict[str, np.ndarray]
    ) -> None:
        """Make the server's model the global model (for server-side evaluation)."""
        spec.load(model, arrays)

    def downlink(self, server_round: int, client: int, arrays: ArrayRecord) -> ArrayRecord:
        """What ``client`` receives in a training round: the global arrays plus, at its first
        participation, the frozen adapter parameters when they come from data."""
        return self._with_frozen(arrays, client not in self.has_frozen)

    def evaluate_downlink(self, arrays: ArrayRecord) -> ArrayRecord:
        """What a client receives to evaluate the global model (not counted as traffic)."""
        return self._with_frozen(arrays, True)

    def _with_frozen(self, arrays: ArrayRecord, include: bool) -> ArrayRecord:
        spec = self.context.spec
        if not include or spec.adapter is None or spec.adapter.frozen_source != "data":
            return arrays
        if not self.frozen:
            return arrays
        if self._frozen_record is None:  # converted once, shared by every message
            self._frozen_record = array_record(with_prefix(FROZEN, self.frozen))
        return merge_records(arrays, self._frozen_record)

    def acknowledge(self, server_round: int, updates: list[ClientUpdate]) -> None:
        """Note what the clients that replied now hold (called after each aggregation)."""
        self.has_frozen.update(u.client for u in updates)
        if self.context.downlink is not None:
            self.context.downlink.acknowledge(u.client for u in updates)

    def traffic(self, messages: Iterable[Message]) -> tuple[int, int]:
        """(bytes, values) of the messages' payloads (docs/results.md, "What bytes count")."""
        return messages_payload(messages)

    def aggregate(
        self, server_round: int, current: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        """The new global arrays from the current ones and the round's client updates.

        May return float64 arrays: the aggregation error is measured on what is returned, and
        the base class then casts each array to the global array's dtype.
        """
        raise NotImplementedError

    def reference(self, client: int, server_round: int) -> dict[str, np.ndarray]:
        """What ``client`` started this round's training from, as the server knows it: the
        arrays its compressed update is relative to (default: the global arrays as clients
        hold them, :attr:`held`: EF21-P's ``w`` when the downlink is compressed)."""
        return self.held

    def reply_reason(self, client: int, server_round: int, arrays: ArrayRecord) -> str | None:
        """Why a reply is refused: :meth:`check_reply`, or an undecodable compressed payload."""
        codec = self.context.codec
        if codec is None or not codec.active:
            return self.check_reply(client, arrays)
        try:
            self._decoded[client] = codec.decode(
                numpy_dict(arrays), self.reference(client, server_round), client, server_round
            )
        except (ValueError, KeyError, IndexError) as e:
            return f"malformed compressed payload: {e}"
        return None

    def check_reply(self, client: int, arrays: ArrayRecord) -> str | None:
        """Why a client's reply cannot be aggregated, or None if it can.

        Called by the server on every reply before :meth:`aggregate`; rejected replies count as
        failed clients. Default: the same names and shapes as the global arrays, finite values.
        A strategy whose clients send something else (a subset, a compressed payload)
        overrides this together with :meth:`client_send` and :meth:`aggregate`.
        """
        return check_arrays(arrays, {n: v.shape for n, v in self.current.items()})

    def check_aggregate(self, new: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global arrays keep their names and shapes; returns them in the global dtypes."""
        name = self.name
        if set(new) != set(self.current):
            missing, extra = (
                sorted(set(self.current) - set(new)),
                sorted(set(new) - set(self.current)),
            )
            raise ValueError(
                f"{name}.aggregate returned other array names than the global arrays "
                f"(missing {missing[:5]}, unexpected {extra[:5]})"
            )
        out = {}
        for key, value in new.items():
            want, value = self.current[key], np.asarray(value)
            if value.shape != want.shape or value.dtype.kind != want.dtype.kind:
                raise ValueError(
                    f"{name}.aggregate returned {key} as {value.dtype}"
                    f"{list(value.shape)}; the global array is {want.dtype}{list(want.shape)}"
                )
            out[key] = value.astype(want.dtype, copy=False)
        return out

    def weights(self, updates: list[ClientUpdate]) -> np.ndarray:
        """``p_i``: by number of examples if ``weighted``, else uniform."""
        if self.weighted:
            n = np.array([u.num_examples for u in updates], dtype=np.float64)
            return n / n.sum()
        return np.full(len(updates), 1.0 / len(updates))

    # ------------------------------------------------------------------ exactness diagnostic
    def effective(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each layer's adapter contribution to its effective weight, and each head parameter,
        in float64, from arrays by parameter name (the frozen parameters are added)."""
        spec = self.context.spec
        full = {**self.frozen, **arrays}
        out = spec.deltas(full)
        for name in spec.heads:
            if name in arrays:
                out[name] = np.asarray(arrays[name], dtype=np.float64)
        return out

    def diagnostic_arrays(self, update: ClientUpdate) -> dict[str, np.ndarray]:
        """The client's uncompressed, un-noised trained arrays (default: what it sent)."""
        return update.arrays

    def aggregation_error(
        self,
        current: Mapping[str, np.ndarray],
        new: Mapping[str, np.ndarray],
        updates: list[ClientUpdate],
    ) -> float | None:
        """REFERENCE section 3: ``max over layers ||dW_agg - dW*||_F / ||dW*||_F`` in float64.

        ``dW*`` is the ``p``-weighted mean of the clients' changes to the effective weight
        (:meth:`weights`), ``dW_agg`` the change the server produced: the new global arrays'
        contribution plus what was folded into the frozen base this round (:attr:`round_fold`).
        Head parameters count as layers. Layers whose ideal change is exactly zero are left
        out (no relative error is defined there); None when there is nothing to compare.
        """
        if self.personalised:
            return None
        p = self.weights(updates)
        old = self.effective(current)
        ideal = {k: np.zeros_like(v) for k, v in old.items()}
        for w, update in zip(p, updates):
            mine = self.effective(self.diagnostic_arrays(update))
            for k in ideal:
                ideal[k] += float(w) * (mine.get(k, old[k]) - old[k])
        got = self.effective(new)
        worst = None
        for k, want in ideal.items():
            change = got.get(k, old[k]) - old[k] + self.round_fold.get(k, 0.0)
            norm = float(np.linalg.norm(want))
            if norm == 0.0:
                continue
            err = float(np.linalg.norm(change - want)) / norm
            worst = err if worst is None else max(worst, err)
        return worst

    def state_dict(self) -> dict[str, Any]:
        """The server state that must survive a round beyond the global arrays, as a state
        tree (nested dicts and lists of numbers, strings and numpy arrays; see
        :mod:`fedsim.checkpoint`). Checkpoints save it and :meth:`load_state_dict` restores it.

        The base class keeps the frozen adapter factors, which clients hold them and which
        compressed messages it absorbed. A strategy with state of its own extends the dict
        (``{**super().state_dict(), "mine": ...}``) and reads its part back in its own
        :meth:`load_state_dict` before calling ``super()``; what the server rebuilds each round
        (``current``, this round's decoded payloads) is not state.
        """
        return {
            "frozen": dict(self.frozen),
            "has_frozen": sorted(self.has_frozen),
            "absorbed": dict(self.absorbed),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.frozen = dict(state["frozen"])
        self._frozen_record = None
        self.has_frozen = {int(c) for c in state["has_frozen"]}
        self.absorbed = {int(c): int(r) for c, r in state["absorbed"].items()}

    # ------------------------------------------------------------------ Flower Strategy API
    def train_clients(self, server_round: int) -> list[int]:
        """The clients (partition ids) that train in ``server_round`` (default: the sampler's;
        under central DP each client independently with probability ``q``)."""
        ctx = self.context
        if ctx.central is not None:
            s = ctx.sampler
            q = s.clients_per_round / s.num_clients
            return ctx.central.sample(s.num_clients, q, ctx.seed, server_round)
        return ctx.sampler.train_clients(server_round)

    def _message(
        self, client: int, record: RecordDict, message_type: str, server_round: int
    ) -> Message:
        return Message(
            record,
            dst_node_id=self.context.node_of[client],
            message_type=message_type,
            group_id=str(server_round),
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = numpy_dict(arrays)
        self._decoded = {}
        config[keys.SERVER_ROUND] = server_round
        ef21p = self.context.downlink
        self.held = self.current if ef21p is None else ef21p.advance(server_round, self.current)
        messages = []
        codec = self.context.codec
        for client in self.train_clients(server_round):
            base = arrays if ef21p is None else array_record(ef21p.catch_up(client))
            mine = config
            if codec is not None and codec.active:
                mine = ConfigRecord({**config, keys.ABSORBED: self.absorbed.get(client, 0)})
            record = {keys.ARRAYS: self.downlink(server_round, client, base), keys.CONFIG: mine}
            messages.append(
                self._message(client, RecordDict(record), MessageType.TRAIN, server_round)
            )
        return messages

    def updates_from(self, replies: Iterable[Message]) -> list[ClientUpdate]:
        client_of = self.context.client_of
        out = []
        for msg in replies:
            if msg.has_error():
                continue
            metrics = dict(msg.content[keys.METRICS])
            for key in (
                keys.STATE_BYTES,
                keys.EPSILON,
                keys.DELTA,
                keys.NOISE_MULTIPLIER,
                keys.DELAY,
            ):
                metrics.pop(key, None)  # bookkeeping the server reads itself
            content = msg.content
            out.append(
                ClientUpdate(
                    client=client_of[msg.metadata.src_node_id],
                    arrays=numpy_dict(content[keys.ARRAYS]),
                    num_examples=int(metrics.pop(keys.NUM_EXAMPLES)),
                    metrics=metrics,
                    diagnostic=(
                        numpy_dict(content[keys.DIAGNOSTIC])
                        if keys.DIAGNOSTIC in content.array_records
                        else None
                    ),
                )
            )
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the good replies; measures :attr:`last_aggregation_error` on the way."""
        self.last_aggregation_error = None
        self.round_metrics = {}
        updates = self.updates_from(replies)
        if not updates and self.context.central is None:
            return None, None
        self.round_fold = {}
        codec = self.context.codec
        if self.context.central is not None:
            new = self.aggregate_central(server_round, updates)
        elif codec is None or not codec.active:
            new = self.aggregate(server_round, self.current, self.rebased(updates))
        else:
            new = self.aggregate_compressed(server_round, updates)
        if codec is not None and codec.active:
            self.absorbed.update({u.client: server_round for u in updates})
        checked = self.check_aggregate(new)  # names and shapes first; the diagnostic uses new
        if self.context.aggregation_error and updates:
            truth = [
                u if u.diagnostic is None else replace(u, arrays=u.diagnostic) for u in updates
            ]
            truth = self.rebased(truth)
            if codec is None or not codec.active or all(u.diagnostic is not None for u in updates):
                self.last_aggregation_error = self.aggregation_error(self.current, new, truth)
        new = checked
        self.acknowledge(server_round, updates)
        w = self.weights(updates) if updates else []
        metrics = MetricRecord()
        for key in updates[0].metrics if updates else ():
            metrics[key] = float(sum(wi * u.metrics[key] for wi, u in zip(w, updates)))
        return array_record(new), metrics

    def aggregate_compressed(
        self, server_round: int, updates: list[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        """Aggregate compressed updates (see :mod:`fedsim.feedback`): EF21 / EControl take
        their own server step; otherwise the strategy aggregates the server's estimates of the
        clients' arrays, ``reference - lr_server * lr * estimate(u_i)``."""
        codec = self.context.codec
        decoded = [self._decoded[u.client] for u in updates]
        if codec.feedback.replaces_aggregation:
            return codec.step(self.current, decoded, self.context.sampler.num_clients)
        estimates = self.rebased(
            [
                replace(u, arrays=codec.estimate(self.reference(u.client, server_round), d))
                for u, d in zip(updates, decoded)
            ]
        )
        return self.aggregate(server_round, self.current, estimates)

    def aggregate_central(
        self, server_round: int, updates: list[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        """DP-FedAvg: ``x + (sum of clipped updates + N(0, (sigma C)^2)) / (q N)``.

        With a compressor or feedback method the clients' decoded messages ``m_i`` (bounded by
        ``C / lr``) go through the same mechanism, and the noisy sum ``s`` is all the server
        uses: EF21 / EControl step ``g <- g + s / N`` (the mean over all ``N`` clients' states,
        as without DP), naive and EF14 ``x <- x - lr_server * lr * s / (q N)``."""
        ctx = self.context
        central, codec = ctx.central, ctx.codec
        shapes = {k: np.shape(v) for k, v in self.current.items()}
        expected = ctx.sampler.clients_per_round  # q N, fixed
        if codec is None or not codec.active:
            deltas = [  # relative to the arrays the client trained from (EF21-P: w)
                {k: np.asarray(v, np.float64) - self.current[k] for k, v in u.arrays.items()}
                for u in self.rebased(updates)
            ]
            noisy = central.noised_sum(deltas, shapes, ctx.seed, server_round)
            return {
                k: np.asarray(self.current[k], np.float64) + noisy[k] / expected for k in shapes
            }
        decoded = [self._decoded[u.client] for u in updates]
        noisy = central.noised_sum(decoded, shapes, ctx.seed, server_round, unit=1 / codec.lr)
        if codec.feedback.replaces_aggregation:
            return codec.step(self.current, [noisy], ctx.sampler.num_clients)
        step = codec.feedback.lr_server * codec.lr
        return {
            k: np.asarray(self.current[k], np.float64) - step * noisy[k] / expected for k in shapes
        }

    def rebased(self, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """With EF21-P, clients trained from ``w``, not from the global ``x``: their changes
        apply to ``x`` (``x_i + x - w``), so that the part of ``x`` not yet sent is kept."""
        if self.context.downlink is None or self.held is self.current:
            return updates
        shift = {
            k: np.asarray(v, np.float64) - np.asarray(self.held[k], np.float64)
            for k, v in self.current.items()
        }
        out = []
        for u in updates:
            arrays = dict(u.arrays)
            for k, s in shift.items():
                if k in arrays:
                    dtype = np.asarray(arrays[k]).dtype
                    arrays[k] = (np.asarray(arrays[k], np.float64) + s).astype(dtype)
            out.append(replace(u, arrays=arrays))
        return out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[keys.SERVER_ROUND] = server_round
        record = RecordDict({keys.ARRAYS: self.evaluate_downlink(arrays), keys.CONFIG: config})
        clients = self.context.sampler.evaluate_clients(server_round)
        return [self._message(c, record, MessageType.EVALUATE, server_round) for c in clients]

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
        log.info("%s(weighted=%s)", self.name, self.weighted)


def check_arrays(arrays: ArrayRecord, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why ``arrays`` do not have exactly the expected names and shapes with finite values."""
    if set(arrays.keys()) != set(shapes):
        got = set(arrays.keys())
        missing, extra = sorted(set(shapes) - got), sorted(got - set(shapes))
        return f"malformed reply: missing arrays {missing[:3]}, unexpected arrays {extra[:3]}"
    for name, arr in arrays.items():
        shape, want = tuple(arr.shape), tuple(shapes[name])
        if shape != want:
            return f"malformed reply: {name} has shape {shape}, expected {want}"
        if not np.all(np.isfinite(array_numpy(arr, copy=False))):
            return f"non-finite values in {name}"
    return None


#: prefix of a personal parameter's initial value in a message (``initial/<parameter name>``)
INITIAL = "initial/"


class PersonalStrategy(AdapterStrategy):
    """A strategy whose clients keep some trained parameters to themselves.

    The :meth:`personal_names` parameters never leave the client: they are stored in its
    ``Context.state`` after training and loaded before training and evaluation; a client that
    has not trained yet starts from the adapter's initial values. Those come from the seed
    (every process builds them), or, for an adapter initialised from data (LoRA-SB's gradient
    init), from the server, once, with the frozen factors (counted). There is no global model,
    so the server does not evaluate one (:attr:`personalised`); clients evaluate their own.
    """

    personalised = True

    def __init__(self, weighted: bool = True) -> None:
        super().__init__(weighted)
        self._initial: dict[str, np.ndarray] | None = None  # per process, from the fresh model
        self.initial_personal: dict[str, np.ndarray] = {}  # server: data-derived initial values

    def initial_arrays(self, model: nn.Module, spec: AdapterSpec) -> dict[str, np.ndarray]:
        out = super().initial_arrays(model, spec)
        self.initial_personal = {}
        if spec.adapter is not None and spec.adapter.frozen_source == "data":
            params = spec.parameters_of(model)
            self.initial_personal = {
                n: params[n].detach().cpu().numpy().copy() for n in self.personal_names(spec)
            }
        return out

    def downlink(self, server_round: int, client: int, arrays: ArrayRecord) -> ArrayRecord:
        out = super().downlink(server_round, client, arrays)
        if client in self.has_frozen:
            return out
        return extend_record(out, with_prefix(INITIAL, self.initial_personal))

    def evaluate_downlink(self, arrays: ArrayRecord) -> ArrayRecord:
        out = super().evaluate_downlink(arrays)
        return extend_record(out, with_prefix(INITIAL, self.initial_personal))

    def personal_names(self, spec: AdapterSpec) -> list[str]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial_personal": dict(self.initial_personal)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.initial_personal = dict(state["initial_personal"])
        super().load_state_dict(state)

    def global_names(self, spec: AdapterSpec) -> list[str]:
        personal = set(self.personal_names(spec))
        return [n for n in spec.sent if n not in personal]

    def _load_personal(
        self, model: nn.Module, spec: AdapterSpec, state: RecordDict, initial: dict
    ) -> None:
        if self._initial is None:
            params = spec.parameters_of(model)
            self._initial = {
                n: params[n].detach().cpu().numpy().copy() for n in self.personal_names(spec)
            }
        if keys.STATE_PERSONAL in state:
            spec.load(model, numpy_dict(state[keys.STATE_PERSONAL]))
        else:
            spec.load(model, initial or self._initial)

    def client_receive(self, model, spec, arrays, call) -> None:
        plain, initial = split_prefix(INITIAL, arrays)
        super().client_receive(model, spec, plain, call)
        self._load_personal(model, spec, call.state, initial)

    def client_send(self, model, spec, call) -> dict:
        params = spec.parameters_of(model)
        call.state[keys.STATE_PERSONAL] = array_record(
            {n: params[n] for n in self.personal_names(spec)}
        )
        return self.sent_arrays(model, spec, call)

    def sent_arrays(self, model, spec, call) -> dict:
        params = spec.parameters_of(model)
        return {n: params[n] for n in self.global_names(spec)}

    def client_evaluate(self, model, spec, arrays, call) -> None:
        plain, initial = split_prefix(INITIAL, arrays)
        super().client_evaluate(model, spec, plain, call)
        self._load_personal(model, spec, call.state, initial)
