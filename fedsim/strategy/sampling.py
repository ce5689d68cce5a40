"""Which clients train and evaluate in each round, from the run's seed.

fedsim, not Flower's random node sampling, chooses each round's clients by partition id, so
every engine trains the same clients.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class ClientSampler:
    """Which clients (partition ids) train and evaluate in each round, from the run's seed.

    Parameters
    ----------
    num_clients : int
    clients_per_round : int
    seed : int
    eval_clients : int or None
        Clients evaluated per round on their local test split (``None``: all of them).
    """

    def __init__(
        self, num_clients: int, clients_per_round: int, seed: int, eval_clients: int | None = None
    ) -> None:
        self.num_clients, self.clients_per_round = num_clients, clients_per_round
        self.seed, self.eval_clients = seed, eval_clients
        #: the simulated clock's hooks (``system``): the clients online now, and how many to
        #: sample for ``k`` good replies (over-selection); None: every client, ``k``
        self.pool: Callable[[], list[int]] | None = None
        self.sample_size: Callable[[int], int] | None = None

    def _draw(self, stream: int, server_round: int, k: int) -> list[int]:
        if k >= self.num_clients:
            return list(range(self.num_clients))
        rng = np.random.default_rng([self.seed, stream, server_round])
        return sorted(int(i) for i in rng.choice(self.num_clients, size=k, replace=False))

    def train_clients(self, server_round: int) -> list[int]:
        if self.pool is None:
            return self._draw(1, server_round, self.clients_per_round)
        pool = self.pool()
        k = (
            self.clients_per_round
            if self.sample_size is None
            else self.sample_size(self.clients_per_round)
        )
        if k >= len(pool):
            return pool
        rng = np.random.default_rng([self.seed, 1, server_round])
        return sorted(pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False))

    def evaluate_clients(self, server_round: int) -> list[int]:
        k = self.num_clients if self.eval_clients is None else self.eval_clients
        return self._draw(2, server_round, k)
