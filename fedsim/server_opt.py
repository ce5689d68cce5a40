"""Server optimisers (config group ``server_opt``): the server's last step of every round.

The round's aggregation (the strategy's mean inside every uplink stage's wrapper: EF21-P's
rebase, compression's decoding or EF21 / EControl's own step, central DP's noise) returns new
global arrays ``y``. A server optimiser treats ``Delta = y - x`` (``x``: the global arrays the
round started from) as a pseudo-gradient and sets ``x <- x + step(Delta)`` instead (Reddi et
al., 2021, "Adaptive Federated Optimization", https://arxiv.org/abs/2003.00295, Algorithm 2),
array by array and coordinate by coordinate, in float64:

* ``avgm`` (FedAvgM; Hsu, Qi, Brown, 2019, https://arxiv.org/abs/1909.06335):
  ``v <- mu v + Delta`` (``v = Delta`` at the first step), ``x <- x + eta v`` (with
  ``nesterov``: ``x <- x + eta (Delta + mu v)``, PyTorch's SGD convention);
* ``adagrad``: ``m <- b1 m + (1 - b1) Delta``, ``v <- v + Delta^2``,
  ``x <- x + eta m / (sqrt(v) + tau)``;
* ``adam``: ``m`` as above, ``v <- b2 v + (1 - b2) Delta^2``,
  ``x <- x + eta_t m / (sqrt(v) + tau)`` with ``eta_t = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))``
  at round ``t`` (``bias_correction: false``: ``eta_t = eta``, Algorithm 2 as printed);
* ``yogi``: ``m`` as above, ``v <- v - (1 - b2) Delta^2 sign(v - Delta^2)``,
  ``x <- x + eta m / (sqrt(v) + tau)``.

``m`` and ``v`` start at zero. The arithmetic is that of Flower's ``FedAvgM``, ``FedAdagrad``,
``FedAdam`` and ``FedYogi`` (``flwr.serverapp.strategy``; the bias correction's exponent is
Flower's ``server_round + 1``), operation for operation: on float64 arrays both give the same
bits (``tests/test_server_opt.py``). The moments are server state: checkpointed with the rest
(:meth:`ServerOpt.state_dict`), so a resumed run is bit-identical to an uninterrupted one.

A server optimiser of your own is a subclass with :meth:`ServerOpt.step` and a YAML file in
``conf/server_opt/`` (or in your ``--config-dir``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedsim.validate import boolean, number

Arrays = dict[str, np.ndarray]


class ServerOpt:
    """Base class of server optimisers (built from ``conf/server_opt/*.yaml``).

    A subclass implements :meth:`step`; the base class forms the pseudo-gradient, applies the
    step, keeps the state and reports the round's numbers.

    Parameters
    ----------
    lr : float
        The server learning rate ``eta`` (> 0).
    """

    name = "server_opt"
    #: off (``server_opt=none``): the aggregate is the new global model, nothing is reported
    active = True

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = number("server_opt.lr", lr, low=0, low_open=True)
        #: the optimiser's state between rounds: named groups of arrays by global array name
        self.state: dict[str, Arrays] = {}
        #: numbers of the last step, for the round's metrics line
        self.round_metrics: dict[str, float] = {}

    def step(self, server_round: int, delta: Arrays, state: dict[str, Arrays]) -> Arrays:
        """The change to add to the global arrays, from the pseudo-gradient ``delta`` (the
        aggregate minus the current arrays, float64 by name). ``state`` is the optimiser's own
        (:attr:`state`), to read and update in place; it starts empty."""
        raise NotImplementedError

    def apply(
        self, server_round: int, current: Mapping[str, np.ndarray], new: Mapping[str, Any]
    ) -> Arrays:
        """The new global arrays (float64): ``current + step(new - current)``."""
        x = {k: np.asarray(v, np.float64) for k, v in current.items()}
        delta = {k: np.asarray(new[k], np.float64) - x[k] for k in x}
        change = self.step(server_round, delta, self.state)
        self.round_metrics = {
            "server_opt_delta_norm": _norm(delta),
            "server_opt_step_norm": _norm(change),
        }
        return {k: x[k] + change[k] for k in x}

    def state_dict(self) -> dict[str, Arrays]:
        return {group: dict(arrays) for group, arrays in self.state.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        self.state = {
            group: {k: np.asarray(v, np.float64) for k, v in arrays.items()}
            for group, arrays in state.items()
        }

    def describe(self) -> str:
        """One line for the log."""
        return f"{type(self).__name__}(lr={self.lr:g})"


class NoServerOpt(ServerOpt):
    """``server_opt=none``: the aggregate is the new global model."""

    name = "none"
    active = False

    def __init__(self) -> None:
        super().__init__(lr=1.0)

    def apply(self, server_round, current, new):
        return new


def _norm(arrays: Mapping[str, np.ndarray]) -> float:
    """The L2 norm over every array together."""
    return float(np.sqrt(sum(float(np.sum(np.square(a))) for a in arrays.values())))


def _zeros(state: dict[str, Arrays], group: str, like: Arrays) -> Arrays:
    """``state[group]``, zeros shaped as ``like`` when the optimiser has not stepped yet."""
    if not state.get(group):
        state[group] = {k: np.zeros_like(v) for k, v in like.items()}
    return state[group]


def _beta(key: str, value: float) -> float:
    return number(key, value, 0, 1, high_open=True)


class AvgM(ServerOpt):
    """FedAvgM: server momentum (see the module docstring).

    Parameters
    ----------
    lr : float
        Server learning rate ``eta``.
    momentum : float
        ``mu`` in [0, 1).
    nesterov : bool
        Nesterov momentum (PyTorch's convention; Flower's FedAvgM has none).
    """

    name = "avgm"

    def __init__(self, lr: float = 1.0, momentum: float = 0.9, nesterov: bool = False) -> None:
        super().__init__(lr)
        self.momentum = _beta("server_opt.momentum", momentum)
        self.nesterov = boolean("server_opt.nesterov", nesterov)

    def step(self, server_round, delta, state):
        mu = self.momentum
        if not state.get("momentum"):
            state["momentum"] = dict(delta)
        else:
            v = state["momentum"]
            state["momentum"] = {k: mu * v[k] + d for k, d in delta.items()}
        v = state["momentum"]
        if self.nesterov:
            return {k: self.lr * (d + mu * v[k]) for k, d in delta.items()}
        return {k: self.lr * v[k] for k in delta}

    def describe(self) -> str:
        return f"AvgM(lr={self.lr:g}, momentum={self.momentum:g}, nesterov={self.nesterov})"


class _Adaptive(ServerOpt):
    """What FedAdagrad, FedAdam and FedYogi share: ``m``, ``tau`` and the step
    ``eta m / (sqrt(v) + tau)``."""

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__(lr)
        self.beta1 = _beta("server_opt.beta1", beta1)
        self.beta2 = _beta("server_opt.beta2", beta2)
        self.tau = number("server_opt.tau", tau, low=0, low_open=True)

    def first_moment(self, delta: Arrays, state: dict[str, Arrays]) -> Arrays:
        m = _zeros(state, "m", delta)
        b1 = self.beta1
        state["m"] = {k: b1 * m[k] + (1 - b1) * d for k, d in delta.items()}
        return state["m"]

    def second_moment(self, delta: Arrays, v: Arrays) -> Arrays:
        raise NotImplementedError

    def eta(self, server_round: int) -> float:
        return self.lr

    def step(self, server_round, delta, state):
        m = self.first_moment(delta, state)
        state["v"] = v = self.second_moment(delta, _zeros(state, "v", delta))
        eta = self.eta(server_round)
        return {k: eta * m[k] / (np.sqrt(v[k]) + self.tau) for k in delta}

    def describe(self) -> str:
        return (
            f"{type(self).__name__}(lr={self.lr:g}, beta1={self.beta1:g}, "
            f"beta2={self.beta2:g}, tau={self.tau:g})"
        )


class Adagrad(_Adaptive):
    """FedAdagrad (see the module docstring); ``beta2`` is unused, ``beta1`` 0 by default
    (no momentum, as Flower's ``FedAdagrad``)."""

    name = "adagrad"

    def __init__(self, lr: float = 0.1, beta1: float = 0.0, tau: float = 1e-3) -> None:
        super().__init__(lr, beta1, 0.0, tau)

    def second_moment(self, delta, v):
        return {k: v[k] + (d**2) for k, d in delta.items()}


class Adam(_Adaptive):
    """FedAdam (see the module docstring).

    Parameters
    ----------
    bias_correction : bool
        Scale ``eta`` as Flower's ``FedAdam`` does, by ``sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))``
        at round ``t`` (false: Reddi et al.'s Algorithm 2 as printed, no correction).
    """

    name = "adam"

    def __init__(
        self,
        lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.999,
        tau: float = 1e-3,
        bias_correction: bool = True,
    ) -> None:
        super().__init__(lr, beta1, beta2, tau)
        self.bias_correction = boolean("server_opt.bias_correction", bias_correction)

    def second_moment(self, delta, v):
        b2 = self.beta2
        return {k: b2 * v[k] + (1 - b2) * (d**2) for k, d in delta.items()}

    def eta(self, server_round):
        if not self.bias_correction:
            return self.lr
        t = server_round + 1.0
        return self.lr * np.sqrt(1 - np.power(self.beta2, t)) / (1 - np.power(self.beta1, t))


class Yogi(_Adaptive):
    """FedYogi (see the module docstring)."""

    name = "yogi"

    def __init__(
        self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.999, tau: float = 1e-3
    ) -> None:
        super().__init__(lr, beta1, beta2, tau)

    def second_moment(self, delta, v):
        b2 = self.beta2
        return {k: v[k] - (1.0 - b2) * (d**2) * np.sign(v[k] - d**2) for k, d in delta.items()}
