"""FedSA-LoRA (Guo et al., 2025, https://arxiv.org/abs/2410.01463).

Only ``A`` matrices (and the task head) are shared and averaged; each client's ``B`` stays in its
own ``Context.state`` and is never sent (``r n`` numbers per layer each way). The result is one
personalised model per client (global ``A``, own ``B``): the server evaluates no global model
and the aggregation error is not defined; clients evaluate their own models.
"""

from __future__ import annotations

import numpy as np

from fedsim.adapters.base import AdapterSpec
from fedsim.strategy import ClientUpdate, PersonalStrategy


class FedSA(PersonalStrategy):
    """Average ``A`` and the head; keep ``B`` on each client."""

    adapters = ("lora",)
    averages = True

    def personal_names(self, spec: AdapterSpec) -> list[str]:
        return [factors["lora_B.weight"] for factors in spec.factors.values()]

    def aggregate(
        self, server_round: int, current: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        return self.average(updates)
