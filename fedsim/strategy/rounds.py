"""The Flower strategy fedsim's server runs: a fedsim strategy inside its uplink chain.

:class:`Federation` builds each round's messages (the strategy's :meth:`downlink`, then the
chain's stages), screens the replies, aggregates the good ones (the strategy's
:meth:`aggregate` inside the stages' wrappers: :meth:`fedsim.uplink.Uplink.reduction`),
measures the exactness diagnostic and averages the clients' evaluation metrics. It implements
Flower's message-API ``Strategy`` (``configure_train``, ``aggregate_train``,
``configure_evaluate``, ``aggregate_evaluate``), as Flower's DP strategies wrap another one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim import keys
from fedsim.errors import RunFailed
from fedsim.messages import ClientUpdate, missing_records
from fedsim.records import array_record, numpy_dict
from fedsim.server_opt import NoServerOpt, ServerOpt
from fedsim.strategy.base import AdapterStrategy, StrategyContext
from fedsim.strategy.diagnostic import aggregation_error
from fedsim.uplink import REFUSED, Linear, RoundInfo, Uplink, non_finite

log = logging.getLogger(__name__)

#: metrics a reply carries for the server's bookkeeping, not for the strategy
BOOKKEEPING = (
    keys.STATE_BYTES,
    keys.EPSILON,
    keys.DELTA,
    keys.NOISE_MULTIPLIER,
    keys.DELAY,
    keys.RAW_EXTRA,
)


class _StrategyReduction:
    """The strategy's own aggregation, innermost in the chain's wrappers; its linear form
    (for a noise stage) is the unweighted sum of the clients' changes."""

    def __init__(self, strategy: AdapterStrategy) -> None:
        self.strategy = strategy

    def aggregate(self, info: RoundInfo, updates: list[ClientUpdate]):
        return self.strategy.aggregate_round(info.server_round, info.current, updates)

    def linear(self, info: RoundInfo, updates: list[ClientUpdate]) -> Linear:
        current = info.current
        deltas = [  # relative to the arrays the client trained from (rebased: the global ones)
            {k: np.asarray(v, np.float64) - current[k] for k, v in u.arrays.items()}
            for u in updates
        ]

        def apply(total, divisor):  # an array no client sent (RoLoRA's frozen factor) stays
            return {
                k: np.asarray(current[k], np.float64) + (total[k] / divisor if k in total else 0)
                for k in current
            }

        return Linear(deltas, 1.0, apply)


class Federation(Strategy):
    """A fedsim strategy and its uplink chain, as one Flower strategy (see the module
    docstring), with the run's server optimiser as its last step (:mod:`fedsim.server_opt`;
    none by default). ``frozen``: the adapter's frozen parameters as the server holds them
    (the diagnostic's input), set once the adapter is initialised."""

    def __init__(
        self,
        strategy: AdapterStrategy,
        uplink: Uplink,
        ctx: StrategyContext,
        server_opt: ServerOpt | None = None,
    ) -> None:
        self.strategy, self.uplink, self.ctx = strategy, uplink, ctx
        self.server_opt = server_opt if server_opt is not None else NoServerOpt()
        strategy.bind(ctx)
        self.reduction = uplink.reduction(
            _StrategyReduction(strategy), f"{strategy.name}.aggregate"
        )
        self.frozen: dict[str, np.ndarray] = {}
        self.info: RoundInfo | None = None
        #: the aggregation error of the last aggregated round (None: not measured)
        self.last_aggregation_error: float | None = None

    @property
    def client_of(self) -> dict[int, int]:
        return self.ctx.client_of

    def train_clients(self, server_round: int) -> list[int]:
        """The round's clients: a stage's choice (central DP's Poisson sampling), else the
        strategy's."""
        chosen = self.uplink.select(server_round)
        return chosen if chosen is not None else self.strategy.train_clients(server_round)

    def _message(self, client: int, record: RecordDict, kind: str, server_round: int) -> Message:
        return Message(
            record,
            dst_node_id=self.ctx.node_of[client],
            message_type=kind,
            group_id=str(server_round),
        )

    # ------------------------------------------------------------------ training
    def begin(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> RoundInfo:
        """The round's state, server side: the strategy's current arrays, the stages' round."""
        s, sampler = self.strategy, self.ctx.sampler
        s.current = numpy_dict(arrays)
        config[keys.SERVER_ROUND] = server_round
        info = RoundInfo(
            server_round,
            s.current,
            s.current,
            lambda client: s.reference(client, server_round),
            sampler.num_clients,
            sampler.clients_per_round,
            self.ctx.seed,
        )
        s.held = info.held = self.uplink.begin_round(info)
        self.info = info
        return info

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid | None
    ) -> Iterable[Message]:
        info = self.begin(server_round, arrays, config)
        return self.messages(info, self.train_clients(server_round), arrays, config)

    def messages(
        self, info: RoundInfo, clients: list[int], arrays: ArrayRecord, config: ConfigRecord
    ) -> list[Message]:
        """Training messages for ``clients`` in the round ``info`` begun with ``arrays``."""
        s, server_round = self.strategy, info.server_round
        messages = []
        for client in clients:
            record = s.downlink(server_round, client, arrays)
            record, mine = self.uplink.outgoing(info, client, record, config)
            content = RecordDict({keys.ARRAYS: record, keys.CONFIG: mine})
            messages.append(self._message(client, content, MessageType.TRAIN, server_round))
        return messages

    def reply_reason(self, client: int, reply: Message) -> tuple[str, str] | None:
        """``(kind, reason)`` if a training reply must not be aggregated: late (a stage's
        arrival check), malformed, or refused (the payload's decoder, else the strategy's
        :meth:`~AdapterStrategy.check_reply`)."""
        late = self.uplink.arrival(self.info, client, reply)
        if late is not None:
            return late
        content = reply.content
        missing = missing_records(reply)
        if missing is not None:
            return "rejected", missing
        if keys.NUM_EXAMPLES not in content[keys.METRICS]:
            return "rejected", f"malformed reply: no {keys.NUM_EXAMPLES}"
        rejected = self.uplink.screen(self.info, client, reply)
        if rejected is not None or self.uplink.decodes:
            return rejected
        reason = self.strategy.check_reply(client, content[keys.ARRAYS])
        return None if reason is None else ("rejected", reason)

    def updates_from(self, replies: Iterable[Message]) -> list[ClientUpdate]:
        out = []
        for msg in replies:
            if msg.has_error():
                continue
            metrics = dict(msg.content[keys.METRICS])
            for key in BOOKKEEPING:
                metrics.pop(key, None)  # bookkeeping the server reads itself
            content = msg.content
            out.append(
                ClientUpdate(
                    client=self.client_of[msg.metadata.src_node_id],
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
        s = self.strategy
        self.last_aggregation_error = None
        s.round_metrics = {}
        updates = self.updates_from(replies)
        if not updates and not self.uplink.releases_every_round:
            return None, None
        s.round_fold = {}
        new = self.reduction.aggregate(self.info, updates)
        # the server optimiser steps by the aggregate's change (the diagnostic measures the
        # aggregate itself); names, shapes, finite values are checked on the result (each step
        # of the chain checked its own result too)
        stepped = self.server_opt.apply(server_round, s.current, new)
        who = self.reduction.who
        if self.server_opt.active:
            who = f"server_opt={self.server_opt.name}'s step"
            s.round_metrics.update(self.server_opt.round_metrics)
        checked = check_aggregate(who, s.current, stepped, server_round)
        if self.ctx.aggregation_error and updates:
            self.last_aggregation_error = self.diagnose(new, updates)
        self.acknowledge(server_round, updates)
        w = s.weights(updates) if updates else []
        metrics = MetricRecord()
        for key in updates[0].metrics if updates else ():
            metrics[key] = float(sum(wi * u.metrics[key] for wi, u in zip(w, updates)))
        return array_record(checked), metrics

    def diagnose(self, new: Mapping[str, np.ndarray], updates: list[ClientUpdate]):
        """The exactness diagnostic of the round, against the clients' own trained arrays
        (their uncompressed, un-clipped side channel when what they sent was encoded)."""
        s = self.strategy
        truth = [u if u.diagnostic is None else replace(u, arrays=u.diagnostic) for u in updates]
        # a global array a client did not send (RoLoRA's frozen factor) is the one it held
        truth = [replace(u, arrays={**s.held, **u.arrays}) for u in truth]
        truth = self.uplink.global_frame(self.info, truth)
        if self.uplink.decodes and any(u.diagnostic is None for u in updates):
            return None
        if s.personalised:
            return None
        spec = self.ctx.spec
        weights = s.weights(truth)
        ideal = s.diagnostic_ideal(spec, self.frozen, s.current, truth)
        return aggregation_error(
            spec, self.frozen, weights, s.current, new, truth, s.round_fold, ideal
        )

    def acknowledge(self, server_round: int, updates: list[ClientUpdate]) -> None:
        """The clients that replied hold what they were sent (aggregated or not)."""
        self.strategy.acknowledge(server_round, updates)
        self.uplink.acknowledge(server_round, [u.client for u in updates])

    # ------------------------------------------------------------------ evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid | None
    ) -> Iterable[Message]:
        config[keys.SERVER_ROUND] = server_round
        sent = self.uplink.evaluate_outgoing(self.strategy.evaluate_downlink(arrays))
        record = RecordDict({keys.ARRAYS: sent, keys.CONFIG: config})
        clients = self.ctx.sampler.evaluate_clients(server_round)
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
        self.strategy.summary()
        if self.server_opt.active:
            log.info("server optimiser: %s", self.server_opt.describe())


def check_aggregate(
    who: str, current: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray], server_round=None
) -> dict[str, np.ndarray]:
    """The global arrays keep their names and shapes and stay finite; returns them in the global
    dtypes (what the server computed is checked here before it reaches any client, like what
    clients send). RunFailed naming ``who`` (the step that computed ``new``: ``FedAvg.aggregate``,
    a plug-in's own class, ``feedback=ef21's server step``) otherwise: the round fails and the
    global model is not updated."""
    if server_round is not None:
        who = f"round {server_round}: {who}"
    if set(new) != set(current):
        missing, extra = sorted(set(current) - set(new)), sorted(set(new) - set(current))
        raise RunFailed(
            f"{who} returned other array names than the global arrays "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    out = {}
    for key, value in new.items():
        want, value = current[key], np.asarray(value)
        if value.shape != want.shape or value.dtype.kind != want.dtype.kind:
            raise RunFailed(
                f"{who} returned {key} as {value.dtype}"
                f"{list(value.shape)}; the global array is {want.dtype}{list(want.shape)}"
            )
        with np.errstate(over="ignore"):
            out[key] = value.astype(want.dtype, copy=False)
        bad = non_finite(out[key])
        if bad:
            cast = "" if value.dtype == want.dtype else f" once cast to {want.dtype}"
            raise RunFailed(f"{who} returned {key} with {bad}{cast}; {REFUSED}")
    return out
