"""Data-driven adapter initialisation: the set-up before round 1, and its frozen factors.

An adapter whose :attr:`~fedsim.adapters.Adapter.data_init` is a
:class:`~fedsim.adapters.data_init.DataInit` (LoRA-SB's gradient initialisation) is set up
from statistics of data before the first round (the round-0 line of ``metrics.jsonl``):

* ``init.source=server``: computed on the task's server split, held out from the clients and
  the test set; no traffic, no client privacy spent.
* ``init.source=clients``: a set-up round. The sampled clients (Poisson at rate ``q`` under
  central DP) each compute them on their first ``ceil(init.examples / k)`` examples and send
  them (counted as traffic). Under client DP-SGD each example's contribution is clipped and
  noised, and the client's accountant records one mechanism at sample rate 1 (counted in the
  noise multiplier for a target epsilon). Under central DP each client scales its statistics
  to ``privacy.clip_norm`` and the server adds Gaussian noise to the sum (one more step of the
  server's accountant at rate ``q``).

This module holds the set-up's server half (:func:`set_up`), its client half
(:func:`client_statistics`) and :class:`FrozenFactors`, the stage of the uplink chain that
sends the resulting frozen factors to each client once (counted) and with every evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedsim import keys
from fedsim.adapters.data_init import DataInit, InitRun
from fedsim.compression import scale_to_norm
from fedsim.errors import ConfigError
from fedsim.messages import (
    check_arrays,
    merge_records,
    missing_records,
    split_prefix,
    with_prefix,
)
from fedsim.records import array_record, messages_payload, numpy_dict
from fedsim.uplink import Stage

#: prefix of the frozen adapter parameters in a message (``frozen/<parameter name>``)
FROZEN = "frozen/"
#: the metrics record of the set-up round when nothing is set up from data
NO_SETUP = {
    keys.TRAIN_LOSS: None,
    "aggregation_error": None,
    "bytes_up": 0,
    "bytes_down": 0,
    "clients_sampled": 0,
    "clients_ok": 0,
    "clients_failed": 0,
    "failures": [],
    "round_skipped": False,
}


class SetupFailed(RuntimeError):
    """No client sent its statistics."""


# ----------------------------------------------------------------------------- the stage


class FrozenFactors(Stage):
    """The frozen adapter factors computed from data, sent to each client at its first
    participation (counted) and with every evaluation message (not counted); the client keeps
    them in its ``Context.state``."""

    name = "frozen"

    def __init__(self, spec) -> None:
        self.spec = spec
        self.frozen: dict[str, np.ndarray] = {}  # the server's copy
        self.has_frozen: set[int] = set()  # clients known to hold them
        self._record: ArrayRecord | None = None

    @staticmethod
    def needed(spec) -> bool:
        adapter = spec.adapter
        return adapter is not None and adapter.frozen_source == "data" and bool(spec.frozen)

    def record(self, model) -> None:
        """Take the frozen factors from the server's model once it is initialised."""
        self.frozen = self.spec.frozen_state(model)
        self._record = None

    def _frozen_record(self) -> ArrayRecord:
        if self._record is None:  # converted once, shared by every message
            self._record = array_record(with_prefix(FROZEN, self.frozen))
        return self._record

    # ------------------------------------------------------------------ server half
    def outgoing(self, info, client, arrays, config):
        if client in self.has_frozen or not self.frozen:
            return arrays, config
        return merge_records(arrays, self._frozen_record()), config

    def evaluate_outgoing(self, arrays):
        return merge_records(arrays, self._frozen_record()) if self.frozen else arrays

    def acknowledge(self, server_round, clients) -> None:
        self.has_frozen.update(clients)

    def state_dict(self):
        return {"frozen": dict(self.frozen), "has_frozen": sorted(self.has_frozen)}

    def load_state_dict(self, state) -> None:
        self.frozen = dict(state["frozen"])
        self.has_frozen = {int(c) for c in state["has_frozen"]}
        self._record = None

    # ------------------------------------------------------------------ client half
    def receive(self, call, arrays):
        """Keep the factors the server sent, or read the kept copy; they go to the strategy's
        client half with the other arrays (unprefixed)."""
        plain, frozen = split_prefix(FROZEN, arrays)
        state = call.state
        if frozen:
            state[keys.STATE_FROZEN] = array_record(frozen)
        elif keys.STATE_FROZEN in state:
            frozen = numpy_dict(state[keys.STATE_FROZEN])
        else:
            raise RuntimeError("the server has not sent this client its frozen adapter factors")
        return {**plain, **frozen}

    def evaluate_receive(self, call, arrays):
        plain, frozen = split_prefix(FROZEN, arrays)
        return {**plain, **frozen}


# ----------------------------------------------------------------------------- server half


@dataclass
class Setup:
    """What the server half of the set-up needs from the run."""

    model: Any
    spec: Any
    task: Any
    device: torch.device | None
    run: InitRun
    privacy: Any  # the privacy config group (client_dp, active)
    num_clients: int
    clients_per_round: int
    seed: int
    clients: list[int] = field(default_factory=list)  # the set-up round's sampled clients
    node_of: dict[int, int] = field(default_factory=dict)
    #: sends messages, returns (replies, good replies, failures) screened with the check given
    exchange: Callable | None = None
    central: Any = None  # the central DP stage, or None
    client_of_reply: Callable[[Message], int] | None = None


@dataclass
class SetupResult:
    record: dict[str, Any]  # round 0's line of metrics.jsonl (besides evaluation)
    info: dict[str, Any]  # summary.json's adapter_init
    epsilons: dict[int, tuple[float, float]] = field(default_factory=dict)  # DP-SGD spends


def check(adapter, task) -> None:
    """An initialisation from the server split needs a task with enough server examples."""
    init = adapter.data_init
    if init is None or init.source != "server":
        return
    available = task.server_size()
    if available == 0:
        raise ConfigError(
            "adapter.init.source",
            "server",
            f"task {task.name} has no server split; use adapter.init.source=clients",
        )
    if init.examples > available:
        raise ConfigError(
            "adapter.init.examples",
            init.examples,
            f"must be at most the task's server split ({available} examples)",
        )


def set_up(adapter, setup: Setup) -> SetupResult:
    """Initialise the server model's adapter from data (or not, for an adapter that needs
    none); returns round 0's bookkeeping."""
    init: DataInit | None = adapter.data_init
    record = dict(NO_SETUP)
    if init is None:
        return SetupResult(record, {"method": adapter.init_method})
    if init.source == "server":
        statistics, info = _from_server_split(init, setup)
        result = SetupResult(record, info)
    else:
        result, statistics = _setup_round(init, setup, record)
    extra = init.initialize(setup.model, setup.spec, statistics, setup.run)
    result.info = {"method": init.method, "source": init.source, **extra, **result.info}
    if getattr(init, "summary_costs", False):  # the set-up's cost (LoRA-GA, EVA)
        result.info.update(
            bytes_up=record["bytes_up"],
            bytes_down=record["bytes_down"],
            epsilon=record.get("epsilon", 0.0 if setup.privacy.active else None),
        )
    return result


def _from_server_split(init: DataInit, setup: Setup) -> tuple[dict, dict]:
    task = setup.task
    data = {k: v[: init.examples] for k, v in task.server_set().items()}
    statistics = init.statistics(setup.model, setup.spec, task, data, setup.device)
    info: dict[str, Any] = {
        "examples": len(data[task.label_key]),
        "data": "the task's server split (held out from clients and test set)",
    }
    if setup.privacy.active:
        info["privacy"] = "server data: no client privacy spent on the initialisation"
    return statistics, info


def _setup_round(init: DataInit, setup: Setup, record: dict) -> tuple[SetupResult, dict]:
    """The set-up round: each sampled client sends its statistics; the server sums them."""
    spec, clients = setup.spec, setup.clients
    expected = setup.clients_per_round if setup.central is not None else len(clients)
    per_client = -(-init.examples // max(expected, 1))
    config = ConfigRecord({keys.SERVER_ROUND: 0, keys.INIT_EXAMPLES: per_client})
    sent = [
        Message(
            RecordDict({keys.CONFIG: config}),
            dst_node_id=setup.node_of[c],
            message_type=f"{MessageType.TRAIN}.{keys.ACTION_INIT}",
            group_id="0",
        )
        for c in clients
    ]
    shapes = init.statistic_shapes(spec)
    wire = {init.wire_name(spec, name): shape for name, shape in shapes.items()}
    replies, good, failures = setup.exchange(sent, lambda reply: _reply_reason(reply, wire))
    if not good and setup.central is None:
        reason = failures[0]["reason"] if failures else "no replies"
        raise SetupFailed(f"{init.title}: no client sent its {init.statistic} ({reason})")
    result = SetupResult(record, {})
    contributions, examples = [], 0
    for reply in good:
        values = reply.content[keys.METRICS]
        if values.get(keys.EPSILON) is not None:  # DP-SGD: the set-up step's spend
            client = setup.client_of_reply(reply)
            result.epsilons[client] = (float(values[keys.EPSILON]), float(values[keys.DELTA]))
        got = numpy_dict(reply.content[keys.ARRAYS])
        contributions.append({name: got[init.wire_name(spec, name)] for name in shapes})
        examples += int(values[keys.NUM_EXAMPLES])
    record["bytes_up"], _ = messages_payload(replies)
    record["bytes_down"], _ = messages_payload(sent)
    record.update(
        clients_sampled=len(sent),
        clients_ok=len(good),
        clients_failed=len(failures),
        failures=failures,
    )
    result.info = {
        "examples": examples,
        "clients": sorted(setup.client_of_reply(r) for r in good),
    }
    total = _combine(init, setup, shapes, contributions, result)
    if setup.privacy.client_dp:
        result.info["privacy"] = "clipped and noised per client; its epsilon is in the total"
        eps = [e for e, _ in result.epsilons.values()]
        record["epsilon"] = max(eps, default=0.0)
        record["epsilon_mean"] = sum(eps) / setup.num_clients
    return result, total


def _combine(init: DataInit, setup: Setup, shapes, contributions, result: SetupResult) -> dict:
    """The sum of the clients' statistics (under central DP, noised: one more release)."""
    central = setup.central
    if central is not None:  # one Gaussian mechanism at rate q, like a round
        total = central.dp.noised_sum(contributions, dict(shapes), setup.seed, 0)
        result.record["epsilon"] = result.record["epsilon_mean"] = central.step_accountant()
        result.info["privacy"] = init.central_note
        return total
    total = {name: np.zeros(shape) for name, shape in shapes.items()}
    for contribution in contributions:
        for name, value in contribution.items():
            total[name] += value
    return total


def _reply_reason(reply: Message, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why a set-up reply is refused: every statistic there, with its shape, finite."""
    return missing_records(reply) or check_arrays(reply.content[keys.ARRAYS], shapes)


# ----------------------------------------------------------------------------- client half


def client_statistics(
    init: DataInit,
    model,
    spec,
    task,
    data,
    device,
    private: tuple[float, float, torch.Generator] | None = None,
    central_clip: float | None = None,
) -> dict[str, np.ndarray]:
    """What a client sends in the set-up round, by wire name. ``private``: client DP-SGD's
    ``(clip_norm, sigma, noise generator)``; ``central_clip``: under central DP, the
    statistics' direction at that norm (user level)."""
    if private is not None:
        clip_norm, sigma, generator = private
        stats = init.private_statistics(
            model, spec, task, data, clip_norm, sigma, generator, device
        )
    else:
        stats = init.statistics(model, spec, task, data, device)
    if central_clip is not None:
        stats = scale_to_norm(stats, central_clip)
    return {init.wire_name(spec, name): value for name, value in stats.items()}
