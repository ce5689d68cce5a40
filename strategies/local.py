"""The ``local`` reference: no aggregation, each client trains alone.

Every client keeps all its trained parameters in its own ``Context.state``, nothing is sent in
either direction (0 bytes; an adapter initialised from the server's data, LoRA-SB's gradient
init, is sent to each client once, and counted), and each client evaluates its own model on its
local test split.
It is the lower reference a federated method must beat to be worth its communication.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from fedsim.adapters.base import AdapterSpec
from fedsim.strategy import ClientUpdate, PersonalStrategy, check_arrays


class Local(PersonalStrategy):
    """Clients train their own adapters; the server only schedules and collects metrics."""

    communicates = False

    def personal_names(self, spec: AdapterSpec) -> list[str]:
        return list(spec.sent)

    def downlink(self, server_round: int, client: int, arrays: ArrayRecord) -> ArrayRecord:
        return super().downlink(server_round, client, ArrayRecord())

    def check_reply(self, client: int, arrays: ArrayRecord) -> str | None:
        return check_arrays(arrays, {})

    def aggregate(
        self, server_round: int, current: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        return current
