"""Custom aggregators: the plug-in contract (docs/plugins.md).

An aggregator is any class with

``aggregate(server_round, current, updates) -> new`` or ``-> (new, metrics)``
    ``current``: the global adapter state, ``{name: numpy array}`` (the trainable arrays
    clients send: adapter factors and the task head); ``updates``: the round's good replies,
    a list of :class:`~fedsim.strategy.ClientUpdate` (``client`` id, ``arrays`` with the same
    names and shapes as ``current``, ``num_examples``, ``metrics``). ``new``: the next global
    state, the same names and shapes (any float dtype: fedsim casts it back); ``metrics``: an
    optional ``{name: float}`` logged in ``metrics.jsonl`` as ``aggregator_<name>``.

and, optionally, ``state_dict() -> {name: numpy array}`` with
``load_state_dict(state)`` for aggregators that keep state between rounds (both or neither),
and these class attributes: ``weighted`` (default True: the exactness diagnostic's ideal
update weights clients by examples), ``averages`` (default False: True declares that
``aggregate`` is a weighted mean of the clients' arrays; a declaration only: central DP, EF21
and EControl, whose own step would replace ``aggregate``, refuse a plug-in whatever it says,
:func:`refuse_uncalled`), ``adapters`` (default None: the adapter names it works with).

fedsim wraps it in :class:`PluginStrategy`: clients train and send every trainable array
(like FedIT), replies are checked (names, shapes, finite values) before the aggregator sees
them, its result is checked the same way after (a bad one fails the run naming the class),
and bytes, the aggregation-error diagnostic, compression (alone or with EF14), DP-SGD and the
PEFT export work around it unchanged. A class that breaks the contract is refused when the
run is built, with a one-line error. The built-in strategies (``strategies/``) implement the
same ``aggregate`` method on fedsim's base class, so each is a worked example.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedsim.errors import ConfigError, RunFailed
from fedsim.messages import ClientUpdate
from fedsim.strategy.base import AdapterStrategy


@runtime_checkable
class Aggregator(Protocol):
    """The contract (see the module docstring)."""

    def aggregate(
        self, server_round: int, current: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], dict[str, float]]: ...


def check_contract(obj: Any, target: str) -> None:
    """A ConfigError (one line) if ``obj`` does not satisfy the aggregator contract."""
    key = "strategy._target_"
    aggregate = getattr(obj, "aggregate", None)
    if not callable(aggregate):
        raise ConfigError(
            key,
            target,
            "is neither a fedsim strategy nor an aggregator: it has no aggregate(server_round, "
            "current, updates) method (docs/plugins.md)",
        )
    try:
        inspect.signature(aggregate).bind(0, {}, [])
    except TypeError:
        raise ConfigError(
            key,
            target,
            f"aggregate{inspect.signature(aggregate)} must accept (server_round, current, "
            "updates) (docs/plugins.md)",
        ) from None
    except ValueError:  # no signature to inspect (a builtin): trust it
        pass
    has_save = callable(getattr(obj, "state_dict", None))
    has_load = callable(getattr(obj, "load_state_dict", None))
    if has_save != has_load:
        missing = "load_state_dict" if has_save else "state_dict"
        raise ConfigError(
            key, target, f"defines one of state_dict / load_state_dict: add {missing} as well"
        )
    cls = type(obj).__name__
    for name in ("weighted", "averages"):
        value = getattr(obj, name, None)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(key, target, f"{cls}.{name} = {value!r}: must be True or False")
    adapters = getattr(obj, "adapters", None)
    if adapters is not None and not (
        isinstance(adapters, (tuple, list)) and all(isinstance(a, str) for a in adapters)
    ):
        raise ConfigError(
            key, target, f"{cls}.adapters = {adapters!r}: must be a tuple of adapter names"
        )


class PluginStrategy(AdapterStrategy):
    """A user's aggregator as a fedsim strategy (see the module docstring)."""

    def __init__(self, aggregator: Any) -> None:
        super().__init__(weighted=bool(getattr(aggregator, "weighted", True)))
        self.aggregator = aggregator
        self.averages = bool(getattr(aggregator, "averages", False))
        adapters = getattr(aggregator, "adapters", None)
        self.adapters = tuple(adapters) if adapters is not None else None

    @property
    def name(self) -> str:
        return type(self.aggregator).__name__

    def aggregate(
        self, server_round: int, current: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        out = self.aggregator.aggregate(server_round, current, updates)
        metrics: Mapping[str, Any] = {}
        if isinstance(out, tuple):
            if len(out) != 2 or not isinstance(out[1], Mapping):
                raise RunFailed(
                    f"round {server_round}: {self.name}.aggregate returned a tuple; it must "
                    "be (new arrays, metrics)"
                )
            out, metrics = out
        if not isinstance(out, Mapping):
            raise RunFailed(
                f"round {server_round}: {self.name}.aggregate returned {type(out).__name__}; "
                "it must return a dict of arrays named like the global state"
            )
        for key, value in metrics.items():
            try:
                self.round_metrics[f"aggregator_{key}"] = float(value)
            except (TypeError, ValueError):
                raise RunFailed(
                    f"round {server_round}: {self.name}.aggregate returned metric "
                    f"{key}={value!r}: metrics are numbers"
                ) from None
        return dict(out)

    def state_dict(self) -> dict[str, Any]:
        """fedsim's bookkeeping, plus the aggregator's own ``state_dict()`` under
        ``aggregator`` (checkpoints save it; ``{}`` for an aggregator without state)."""
        own = {}
        if hasattr(self.aggregator, "state_dict"):
            own = {str(k): np.asarray(v) for k, v in self.aggregator.state_dict().items()}
        return {**super().state_dict(), "aggregator": own}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        own = dict(state.get("aggregator", {}))
        if hasattr(self.aggregator, "load_state_dict"):
            self.aggregator.load_state_dict(own)
        elif own:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(own)}")
        super().load_state_dict(state)


#: what an older fedsim called on a strategy, and what does that now
REPLACED_HOOKS = {
    "configure_train": "fedsim.strategy.Federation builds the messages: override downlink",
    "aggregate_train": "fedsim.strategy.Federation aggregates the replies: override aggregate",
    "configure_evaluate": "fedsim.strategy.Federation: override evaluate_downlink",
    "aggregate_evaluate": "fedsim.strategy.Federation averages the clients' evaluation",
    "aggregation_error": "the diagnostic (fedsim.strategy.diagnostic) uses the adapter's "
    "layer_delta and your weights",
    "effective": "the diagnostic uses the adapter's layer_delta",
    "diagnostic_arrays": "clients attach their uncompressed arrays to compressed replies",
    "check_aggregate": "fedsim.strategy.check_aggregate checks every aggregate",
    "rebased": "EF21-P's stage rebases updates (fedsim.downlink)",
    "reply_reason": "override check_reply; compressed payloads are the compression stage's",
    "aggregate_central": "central DP's stage (fedsim.privacy.CentralNoise)",
    "aggregate_compressed": "the compression stage (fedsim.codec)",
    "receive_frozen": "the frozen stage (fedsim.init): the factors arrive among the arrays "
    "client_receive gets",
}


def check_hooks(obj: AdapterStrategy, target: str) -> None:
    """A ConfigError if a strategy overrides a method fedsim no longer calls (it would be
    ignored without a word, or fail on a name that is gone)."""
    for cls in type(obj).__mro__:
        if cls.__module__.startswith("fedsim.") or cls is object:
            continue
        for name, replacement in REPLACED_HOOKS.items():
            if name in vars(cls):
                raise ConfigError(
                    "strategy._target_",
                    target,
                    f"{cls.__name__} defines {name}(), which fedsim no longer calls: "
                    f"{replacement} (docs/strategies.md)",
                )


def refuse_uncalled(strategy: AdapterStrategy, key: str, value: Any, step: str, instead: str):
    """A ConfigError if ``strategy`` is a plug-in and ``step`` (error feedback's server step,
    central DP's noised mean) would replace its aggregation: its ``aggregate`` would never be
    called, whatever its ``averages`` says (a robust rule would silently become a mean).
    ``instead``: the values of ``key`` a plug-in runs with."""
    if not isinstance(strategy, PluginStrategy):
        return
    name = strategy.name
    why = (
        "its averages = True only declares it a mean, which fedsim cannot check"
        if strategy.averages
        else f"{name} declares averages = False: its rule is not a mean"
    )
    raise ConfigError(
        key,
        value,
        f"{step} replaces the aggregation, so plug-in {name}.aggregate would never be "
        f"called ({why}): run a plug-in with {key}={instead}, or this {key} with a built-in "
        "strategy such as fedavg (docs/plugins.md)",
    )


def as_strategy(obj: Any, target: str) -> AdapterStrategy:
    """``obj`` itself if it is a fedsim strategy (its hooks checked), else the aggregator
    wrapped (contract checked)."""
    if isinstance(obj, AdapterStrategy):
        check_hooks(obj, target)
        return obj
    check_contract(obj, target)
    return PluginStrategy(obj)
