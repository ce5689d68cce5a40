"""FFA-LoRA (Sun et al., 2024, https://arxiv.org/abs/2403.12313).

``A`` is random and frozen (``adapter=ffa``: drawn from the run's seed, so every client and the
server hold the same ``A`` at no cost); clients train ``B`` and the server averages it. Since
``A`` is shared, ``mean(B_i) A = mean(B_i A)``: the aggregation is exact, at ``m r`` numbers per
layer each way.
"""

from __future__ import annotations

from strategies.fedavg import FedAvg


class FFA(FedAvg):
    """Average ``B`` (and the task head), weighted by examples by default."""

    adapters = ("ffa",)
