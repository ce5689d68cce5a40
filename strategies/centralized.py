"""The ``centralized`` reference: all clients' data pooled and trained as one model.

Each round one trainer takes ``sim.local_steps`` steps on batches of
``sim.batch_size * batch_multiplier`` examples drawn from the union of every client's training
split (``batch_multiplier`` defaults to ``sim.clients_per_round``): as many sequential steps as a
client takes, on as many examples per step as the round's clients see together. It is the
upper reference at equal steps: what federated training would reach without data
heterogeneity or communication limits. Nothing is communicated (0 bytes); the trainer runs on a
client process only because that is where fedsim trains. The global model is evaluated like
any other, on the server's test set and on every client's local test split.
"""

from __future__ import annotations

from flwr.app import Message

from fedsim.data import FederatedData
from fedsim.errors import ConfigError
from fedsim.strategy import AdapterStrategy
from fedsim.tasks.base import Batch
from fedsim.validate import integer

TRAINER = 0  # the client process (partition id) that hosts the pooled trainer


class Centralized(AdapterStrategy):
    """Train one model on the pooled data; the "aggregate" is that model."""

    communicates = False

    def __init__(self, batch_multiplier: int = 1) -> None:
        super().__init__(weighted=True)
        self.batch_multiplier = integer("strategy.batch_multiplier", batch_multiplier, low=1)

    def check_setup(self, adapter, sim) -> None:
        super().check_setup(adapter, sim)
        if sim["min_clients"] > 1:
            raise ConfigError(
                "sim.min_clients", sim["min_clients"], "must be 1 with strategy=centralized"
            )

    def train_clients(self, server_round: int) -> list[int]:
        return [TRAINER]

    def client_data(self, data: FederatedData, client: int) -> Batch:
        return data.pooled_train()

    def client_batch_size(self, batch_size: int) -> int:
        return batch_size * self.batch_multiplier

    def traffic(self, messages: list[Message]) -> tuple[int, int]:
        return 0, 0

    def aggregate(self, server_round, current, updates):
        (update,) = updates
        return dict(update.arrays)
