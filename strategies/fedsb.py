"""Fed-SB (Singhal et al., 2025, https://arxiv.org/abs/2502.15436).

Clients train only LoRA-SB's ``r x r`` matrix ``R`` between frozen ``B`` and ``A``
(``adapter=lora_sb``); the server averages ``R``. The average is exact, ``B mean(R_i) A =
mean(B R_i A)``, and costs ``r^2`` numbers per layer each way, whatever the number of clients.
``B`` and ``A`` come from LoRA-SB's data-driven initialisation, so the server sends them to each
client once, at its first participation (``r(m+n)`` per layer; counted).

Unweighted by default, as the reference code averages; ``weighted: true`` weights by examples.
"""

from __future__ import annotations

from strategies.fedavg import FedAvg


class FedSB(FedAvg):
    """Average ``R`` (and the task head) over the round's clients."""

    adapters = ("lora_sb",)

    def __init__(self, weighted: bool = False) -> None:
        super().__init__(weighted=weighted)
