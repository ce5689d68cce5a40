"""The interface an adapter implements when its initialisation needs data (LoRA-SB's).

An adapter whose :attr:`~fedsim.adapters.Adapter.data_init` is a :class:`DataInit` is set up
before round 1 from statistics computed on examples: the task's server split
(``init.source=server``) or a set-up round in which sampled clients compute them on their own
examples (``init.source=clients``; bytes counted, DP-SGD budget charged, central DP noise added
to the sum). fedsim runs that set-up (:mod:`fedsim.init`); the adapter says what is computed on
the examples and how the summed statistics set its parameters. Its frozen factors then come
from data, so the server sends them to every client once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.tasks.base import Batch, Task
from fedsim.validate import integer

SOURCES = ("server", "clients")


@dataclass
class InitRun:
    """What an initialisation may read about the run it starts."""

    lr: float  # sim.lr
    schedule: Any  # the client schedule: ``factor(step, total_steps)``
    total_steps: int  # sim.rounds * sim.local_steps


class DataInit:
    """A data-driven initialisation. Subclasses set :attr:`method` and implement
    :meth:`statistic_shapes`, :meth:`statistics`, :meth:`private_statistics` and
    :meth:`initialize`.

    Parameters
    ----------
    source : str
        ``server`` (the task's held-out server split) or ``clients`` (a set-up round).
    examples : int
        Examples the statistics are computed on (spread over the set-up round's clients).
    batch_size : int
        Examples per forward pass while computing them.
    key : str
        The config key the parameters came from (error messages).
    """

    #: the method's name (``summary.json``: ``adapter_init.method``)
    method = "data"
    #: how errors name the initialisation and what clients send for it
    title = "the data-driven initialisation"
    statistic = "statistics"
    #: how ``summary.json`` describes the set-up under central DP (one Gaussian mechanism on the
    #: sum of the clients' statistics, each scaled to ``privacy.clip_norm``)
    central_note = (
        "each client's statistics scaled to privacy.clip_norm, the sum noised; one more step "
        "at rate q, included in epsilon"
    )
    #: ``summary.json``'s ``adapter_init`` also gives the set-up round's ``bytes_up``,
    #: ``bytes_down`` and ``epsilon`` (round 0's line has them in any case)
    summary_costs = False

    def __init__(
        self, source: str = "server", examples: int = 256, batch_size: int = 32, key: str = "init"
    ) -> None:
        from fedsim.errors import ConfigError

        if source not in SOURCES:
            raise ConfigError(f"{key}.source", source, "must be " + " or ".join(SOURCES))
        self.source = source
        self.examples = integer(f"{key}.examples", examples, low=1)
        self.batch_size = integer(f"{key}.batch_size", batch_size, low=1)

    @property
    def client_steps(self) -> int:
        """DP mechanisms each client's data goes through before round 1 (its accountant)."""
        return int(self.source == "clients")

    def statistic_shapes(self, spec) -> dict[str, tuple[int, ...]]:
        """The statistics' names and shapes (what a set-up reply must hold)."""
        raise NotImplementedError

    def wire_name(self, spec, name: str) -> str:
        """The array name a statistic travels under in a set-up reply."""
        return name

    def statistics(
        self, model: nn.Module, spec, task: Task, data: Batch, device: torch.device | None
    ) -> dict[str, np.ndarray]:
        """The statistics of ``data`` (summed over examples where the server sums clients')."""
        raise NotImplementedError

    def private_statistics(
        self,
        model: nn.Module,
        spec,
        task: Task,
        data: Batch,
        clip_norm: float,
        sigma: float,
        generator: torch.Generator,
        device: torch.device | None,
    ) -> dict[str, np.ndarray]:
        """The statistics under client DP-SGD: each example's contribution clipped to
        ``clip_norm`` (jointly), summed, plus ``N(0, (sigma clip_norm)^2)`` noise: one Gaussian
        mechanism at sample rate 1."""
        raise NotImplementedError

    def initialize(
        self, model: nn.Module, spec, statistics: Mapping[str, np.ndarray], run: InitRun
    ) -> dict[str, Any]:
        """Set the adapter of ``model`` from the summed statistics; returns what the summary
        says about it besides method, source and examples."""
        raise NotImplementedError
