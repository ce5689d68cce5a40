"""The uplink: a chain of stages between what a strategy's client half sends and what its
server half aggregates.

Every mechanism that changes what travels is one :class:`Stage` with a client half and a server
half (as pfl-research's postprocessors): EF21-P's compressed downlink (the client rebuilds
``w``; the server rebases updates trained from ``w``), compression with error feedback (the
client encodes, the server decodes and, for EF21 and EControl, takes its own step), central DP
(the client clips, the server adds noise to the sum) and injected faults (the client crashes or
spoils what it sends, the server drops late replies). The data-derived frozen factors an adapter
broadcasts once per client are a stage too (:mod:`fedsim.init`). The chain is built once from the
run's components (:meth:`fedsim.build.Components.uplink`, which lists the order); a mechanism
that is off is not in it.

A client's reply goes through the client halves in chain order (``send``); the server halves run
in reverse: each reply's ``arrival`` (in time?) and ``screen`` (its content), then the
aggregation, which each stage may wrap (:meth:`Stage.wrap`, as Flower's DP strategies wrap an
inner strategy): the last stage's wrapper is called first and calls the one before it, down to
the strategy's own ``aggregate``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message

from fedsim.errors import RunFailed
from fedsim.messages import ClientCall, ClientUpdate

Arrays = dict[str, np.ndarray]


@dataclass
class RoundInfo:
    """What the stages' server halves know about the round they serve."""

    server_round: int
    current: Arrays  # the global arrays at the start of the round
    held: Arrays  # the global arrays as the round's clients hold them (EF21-P: w)
    reference: Callable[[int], Arrays]  # client -> what its update is relative to
    num_clients: int  # N, registered clients
    expected: int  # clients sampled per round (q N under central DP)
    seed: int
    #: client -> the round its message was built in, if not this one (FedBuff's stale ones)
    sent_in: dict[int, int] = field(default_factory=dict)

    def round_of(self, client: int) -> int:
        return self.sent_in.get(client, self.server_round)


@dataclass
class Sending:
    """What the stages' client halves know about the reply they shape."""

    call: ClientCall
    config: Mapping[str, Any]  # the training message's config record
    reference: Arrays | None  # the arrays the client started from (for stages that need it)
    lr_sum: float = 0.0  # the sum of the learning rates of the local steps it took


@dataclass
class Outgoing:
    """A client's reply as it passes through the client halves."""

    arrays: dict[str, Any]  # what travels: the strategy's sent tensors, then payloads
    diagnostic: dict[str, Any] | None = None  # measurement only, never traffic
    metrics: dict[str, float] = field(default_factory=dict)
    #: further array records of the reply, by record name (traffic: counted)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    def numpy(self) -> Arrays:
        """The arrays as numpy (tensors detached and moved to the CPU, no copy)."""
        return {k: _numpy(v) for k, v in self.arrays.items()}


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    return value.detach().cpu().numpy()


@dataclass
class Linear:
    """An aggregation written as ``apply(sum of contributions, divisor)``: the form a noise
    stage needs (each contribution bounded in ``unit`` times the clip norm)."""

    contributions: list[Arrays]
    unit: float
    apply: Callable[[Arrays, float], Arrays]


class Reduction(Protocol):
    """Turns the round's screened updates into the new global arrays (float64 allowed)."""

    def aggregate(self, info: RoundInfo, updates: list[ClientUpdate]) -> Arrays: ...

    def linear(self, info: RoundInfo, updates: list[ClientUpdate]) -> Linear: ...


class Stage:
    """One mechanism of the chain; every hook is optional (the defaults change nothing)."""

    name = "stage"
    #: its client half needs the arrays the client started from
    needs_reference = False
    #: what a reply carries is this stage's encoding: its ``screen`` checks it, not the
    #: strategy's ``check_reply``
    decodes = False
    #: the server releases an aggregate every round, even from no replies (central DP: keeping
    #: the model unchanged would be an outcome its accountant does not cover)
    releases_every_round = False

    # ---------------------------------------------------------------- server: messages
    def begin_round(self, info: RoundInfo) -> Arrays | None:
        """Called when a round's messages are built; may return the arrays the round's
        clients will hold instead of the global arrays (EF21-P's ``w``)."""
        return None

    def select(self, server_round: int) -> list[int] | None:
        """The round's clients, if this stage decides them (central DP's Poisson sampling)."""
        return None

    def outgoing(
        self, info: RoundInfo, client: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> tuple[ArrayRecord, ConfigRecord]:
        """What ``client``'s training message carries (arrays and config)."""
        return arrays, config

    def evaluate_outgoing(self, arrays: ArrayRecord) -> ArrayRecord:
        """What an evaluation message carries (not traffic)."""
        return arrays

    # ---------------------------------------------------------------- client
    def receive(self, call: ClientCall, arrays: Arrays) -> Arrays:
        """A training message's arrays on the client, before the strategy's client half."""
        return arrays

    def evaluate_receive(self, call: ClientCall, arrays: Arrays) -> Arrays:
        """An evaluation message's arrays on the client (must not change ``call.state``)."""
        return arrays

    def train_data(self, call: ClientCall, data: Any) -> Any:
        """The examples the client trains on (a Byzantine client's flipped labels)."""
        return data

    def send(self, sending: Sending, out: Outgoing) -> None:
        """Shape the reply after the strategy's client half picked what to send."""

    def step_offset(self, call: ClientCall) -> Arrays | None:
        """What each local step subtracts after the optimizer's step, per unit of its learning
        rate, by trained parameter name (SCAFFOLD's ``c - c_i``), for the client ``receive``
        served last; None: nothing."""
        return None

    # ---------------------------------------------------------------- server: replies
    def arrival(self, info: RoundInfo, client: int, reply: Message) -> tuple[str, str] | None:
        """``(kind, reason)`` if the reply came too late to be read."""
        return None

    def screen(self, info: RoundInfo, client: int, reply: Message) -> tuple[str, str] | None:
        """``(kind, reason)`` if the reply's content must not be aggregated (its records are
        there: the server checked that first)."""
        return None

    def wrap(self, inner: Reduction) -> Reduction:
        """The aggregation with this stage's server half around ``inner``."""
        return inner

    def server_step(self) -> str:
        """What messages call this stage's wrapper when its result is refused."""
        return f"the {self.name} stage's server step"

    def global_frame(self, info: RoundInfo, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """Updates re-expressed against the global arrays (for the exactness diagnostic)."""
        return updates

    def acknowledge(self, server_round: int, clients: list[int]) -> None:
        """The clients that replied now hold what they were sent."""

    def report(self, server_round: int, clients: list[int]) -> dict[str, Any]:
        """Extra fields of the round's line of metrics.jsonl."""
        return {}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> Any:
        """The server half's state that must survive a round (a state tree), or None."""
        return None

    def load_state_dict(self, state: Any) -> None:
        """Restore what :meth:`state_dict` returned."""


class Uplink:
    """The run's stages in chain order (client halves run in this order, server halves in
    reverse)."""

    def __init__(self, stages: list[Stage]) -> None:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"a chain holds each stage once, got {names}")
        self.stages = list(stages)

    def __getitem__(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def get(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def needs_reference(self) -> bool:
        return any(s.needs_reference for s in self.stages)

    @property
    def decodes(self) -> bool:
        return any(s.decodes for s in self.stages)

    @property
    def releases_every_round(self) -> bool:
        return any(s.releases_every_round for s in self.stages)

    # ---------------------------------------------------------------- server: messages
    def begin_round(self, info: RoundInfo) -> Arrays:
        """The arrays the round's clients hold (the global arrays unless a stage says)."""
        held = info.current
        for stage in self.stages:
            held = stage.begin_round(info) or held
        return held

    def select(self, server_round: int) -> list[int] | None:
        for stage in self.stages:
            chosen = stage.select(server_round)
            if chosen is not None:
                return chosen
        return None

    def outgoing(self, info, client, arrays, config) -> tuple[ArrayRecord, ConfigRecord]:
        for stage in self.stages:
            arrays, config = stage.outgoing(info, client, arrays, config)
        return arrays, config

    def evaluate_outgoing(self, arrays: ArrayRecord) -> ArrayRecord:
        for stage in self.stages:
            arrays = stage.evaluate_outgoing(arrays)
        return arrays

    # ---------------------------------------------------------------- client
    def receive(self, call: ClientCall, arrays: Arrays) -> Arrays:
        for stage in reversed(self.stages):
            arrays = stage.receive(call, arrays)
        return arrays

    def evaluate_receive(self, call: ClientCall, arrays: Arrays) -> Arrays:
        for stage in reversed(self.stages):
            arrays = stage.evaluate_receive(call, arrays)
        return arrays

    def train_data(self, call: ClientCall, data: Any) -> Any:
        for stage in self.stages:
            data = stage.train_data(call, data)
        return data

    def send(self, sending: Sending, out: Outgoing) -> Outgoing:
        for stage in self.stages:
            stage.send(sending, out)
        return out

    def step_offset(self, call: ClientCall) -> Arrays | None:
        """The step offset of the stage that has one (None: none has; one stage at most,
        ``control``)."""
        for stage in self.stages:
            offset = stage.step_offset(call)
            if offset is not None:
                return offset
        return None

    # ---------------------------------------------------------------- server: replies
    def arrival(self, info: RoundInfo, client: int, reply: Message) -> tuple[str, str] | None:
        for stage in reversed(self.stages):
            late = stage.arrival(info, client, reply)
            if late is not None:
                return late
        return None

    def screen(self, info: RoundInfo, client: int, reply: Message) -> tuple[str, str] | None:
        for stage in reversed(self.stages):
            rejected = stage.screen(info, client, reply)
            if rejected is not None:
                return rejected
        return None

    def reduction(self, base: Reduction, who: str = "the strategy's aggregate") -> Reduction:
        """The round's aggregation: ``base`` (the strategy's, called ``who`` in messages)
        inside every stage's wrapper; what each of them returns is checked
        (:func:`check_arrays`), so a refusal names the step that produced it."""
        base = Checked(base, who)
        for stage in self.stages:
            wrapped = stage.wrap(base)
            if wrapped is not base:
                base = Checked(wrapped, stage.server_step())
        return base

    def global_frame(self, info: RoundInfo, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        for stage in reversed(self.stages):
            updates = stage.global_frame(info, updates)
        return updates

    def acknowledge(self, server_round: int, clients: list[int]) -> None:
        for stage in self.stages:
            stage.acknowledge(server_round, clients)

    def report(self, server_round: int, clients: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for stage in self.stages:
            out.update(stage.report(server_round, clients))
        return out

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Each stage's server state by stage name (stages without state left out)."""
        out = {}
        for stage in self.stages:
            state = stage.state_dict()
            if state is not None:
                out[stage.name] = state
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = set(state) - set(self.names)
        if unknown:
            raise ValueError(f"the saved chain has stages {sorted(unknown)} this run lacks")
        for stage in self.stages:
            if stage.name in state:
                stage.load_state_dict(state[stage.name])


class Checked:
    """A reduction whose result is checked (:func:`check_arrays`; ``who``: the step)."""

    def __init__(self, inner: Reduction, who: str) -> None:
        self.inner, self.who = inner, who

    def aggregate(self, info: RoundInfo, updates: list[ClientUpdate]) -> Arrays:
        new = self.inner.aggregate(info, updates)
        check_arrays(self.who, info.server_round, info.current, new)
        return new

    def linear(self, info: RoundInfo, updates: list[ClientUpdate]) -> Linear:
        return self.inner.linear(info, updates)  # the wrapper that applies it is checked


def check_arrays(who: str, server_round: int, current: Mapping[str, Any], new: Any) -> None:
    """RunFailed, naming ``who`` (the server's step: clients' replies were checked before)
    unless ``new`` has the global arrays' names and shapes, finite (else the round fails)."""
    where = f"round {server_round}: {who}"
    if not isinstance(new, Mapping):
        raise RunFailed(f"{where} returned {type(new).__name__}, not a dict of arrays")
    if set(new) != set(current):
        missing, extra = sorted(set(current) - set(new)), sorted(set(new) - set(current))
        raise RunFailed(
            f"{where} returned other array names than the global arrays "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    for key, want in current.items():
        value = np.asarray(new[key])
        if value.shape != np.shape(want):
            raise RunFailed(
                f"{where} returned {key} with shape {list(value.shape)}; the global array "
                f"has shape {list(np.shape(want))}"
            )
        bad = non_finite(value)
        if bad:
            raise RunFailed(f"{where} returned {key} with {bad}; {REFUSED}")


#: what happens when the server's own result is refused
REFUSED = "the server refused its aggregate, the global model was not updated"


def non_finite(value: np.ndarray) -> str | None:
    """``"3 NaN and 1 inf of 64 values"`` if ``value`` holds any, else None (also for
    arrays that are not numbers)."""
    if value.dtype.kind not in "fc" or value.size == 0:
        return None
    finite = np.isfinite(value)
    if finite.all():
        return None
    nan = int(np.isnan(value).sum())
    inf = int(value.size - finite.sum()) - nan
    parts = [f"{nan} NaN"] * bool(nan) + [f"{inf} inf"] * bool(inf)
    return f"{' and '.join(parts)} of {value.size} values"
