"""FedBuff's rebasing as a stage of the uplink chain (:mod:`fedsim.uplink`): the innermost
server half, right before the strategy's own aggregation.

Under buffered asynchronous aggregation (``sim.async_buffer``, :mod:`fedsim.apps.server.buffered`)
client ``i`` trained from the global arrays ``w_{v_i}`` of the moment it was dispatched, and the
server has moved on ``tau_i`` versions since. Each update, once every outer stage has read it
(a compressed payload decoded into the server's estimate of the client's arrays, relative to
``w_{v_i}``), is put onto the current arrays ``w`` with FedBuff's staleness weight:

    w_i' = w + s(tau_i) (w_i - w_{v_i}),   s(tau) = (1 + tau)^(-a)

so that the strategy's weighted mean of the ``w_i'`` is ``w + sum_i p_i s(tau_i) (w_i - w_{v_i})``
(Nguyen et al., 2022, https://arxiv.org/abs/2106.06639, with ``a = 1/2``). The exactness
diagnostic compares the aggregate with the rebased updates (:meth:`Rebase.global_frame`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedsim.uplink import Arrays, Stage


def staleness_weight(tau: int, exponent: float) -> float:
    """FedBuff's ``s(tau) = (1 + tau)^(-a)``."""
    return float((1.0 + tau) ** (-exponent))


class Rebase(Stage):
    """Updates trained from older global arrays, re-expressed on the current ones."""

    name = "fedbuff"

    def __init__(self, exponent: float) -> None:
        self.exponent = float(exponent)
        #: client -> its staleness tau in the step being aggregated (set by the server loop)
        self.staleness: dict[int, int] = {}

    def rebased(self, info, update):
        weight = staleness_weight(self.staleness[update.client], self.exponent)
        start, current = info.reference(update.client), info.current
        arrays: Arrays = {}
        for k, v in update.arrays.items():
            dtype = np.asarray(v).dtype
            moved = np.asarray(v, np.float64) - np.asarray(start[k], np.float64)
            arrays[k] = (np.asarray(current[k], np.float64) + weight * moved).astype(dtype)
        return replace(update, arrays=arrays)

    def wrap(self, inner):
        return _Rebased(self, inner)

    def server_step(self) -> str:
        return "FedBuff's rebasing of stale updates"

    def global_frame(self, info, updates):
        return [self.rebased(info, u) for u in updates]


class _Rebased:
    def __init__(self, stage: Rebase, inner) -> None:
        self.stage, self.inner = stage, inner

    def aggregate(self, info, updates):
        return self.inner.aggregate(info, [self.stage.rebased(info, u) for u in updates])

    def linear(self, info, updates):
        return self.inner.linear(info, [self.stage.rebased(info, u) for u in updates])
