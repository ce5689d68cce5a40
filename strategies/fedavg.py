"""FedAvg on LoRA, a.k.a. FedIT (Zhang et al., 2024, https://arxiv.org/abs/2305.05644).

Each adapter matrix is averaged separately, weighted by the clients' numbers of examples:
``A = sum_i p_i A_i``, ``B = sum_i p_i B_i`` (task heads likewise). Not exact: the product of
the means is not the mean of the products, ``mean(B_i) mean(A_i) != mean(B_i A_i)``, so the
global update differs from the mean of the clients' updates ``s B_i A_i``.
"""

from __future__ import annotations

import numpy as np

from fedsim.strategy import AdapterStrategy, ClientUpdate


class FedAvg(AdapterStrategy):
    """Average every sent array with weights ``p_i`` (see :meth:`AdapterStrategy.weights`)."""

    averages = True

    def aggregate(
        self, server_round: int, current: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        return self.average(updates)
