"""``partition=natural``: whole natural groups per client (all the snippets about one movie,
all the texts of one author), as a real federation would be split. flwr-datasets'
``NaturalIdPartitioner`` makes one partition per group, which fixes the number of clients to the
number of groups; here any number of clients up to the number of groups works: groups are
shuffled with the seed, then each (largest first) goes to the client that holds the fewest
examples so far, so clients get similar amounts of data."""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import Partitioner

from fedsim.errors import ComponentError
from fedsim.validate import integer

#: the column of natural group ids that :class:`fedsim.data.FederatedData` adds for a task that
#: has them (:meth:`fedsim.tasks.base.Task.pool_groups`)
GROUP = "group"


class NaturalGroupPartitioner(Partitioner):
    """Whole natural groups per client, balanced by size (see the module docstring).

    Parameters
    ----------
    num_partitions : int
        Number of clients (at most the number of groups).
    seed : int
        Seed of the order in which groups of equal size are dealt.
    """

    def __init__(self, num_partitions: int, seed: int = 0) -> None:
        super().__init__()
        self._num_partitions = integer("partition.num_partitions", num_partitions, low=1)
        self.seed = integer("partition.seed", seed, low=0)
        self._rows: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def _assign(self) -> list[np.ndarray]:
        if self._rows is None:
            if GROUP not in self.dataset.column_names:
                raise ComponentError(
                    "partition",
                    "natural",
                    "the task has no natural client ids (only sentiment and tasks given a "
                    "group column have); use dirichlet, iid or pathological",
                )
            groups = np.asarray(self.dataset[GROUP])
            ids, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
            if len(ids) < self._num_partitions:
                raise ComponentError(
                    "partition",
                    "natural",
                    f"{self._num_partitions} clients but only {len(ids)} natural groups; "
                    "use at most that many clients",
                )
            order = np.random.default_rng([self.seed, 17]).permutation(len(ids))
            order = order[np.argsort(-counts[order], kind="stable")]  # largest first
            sizes = np.zeros(self._num_partitions, dtype=np.int64)
            owner = np.empty(len(ids), dtype=np.int64)
            for g in order:
                client = int(np.argmin(sizes))
                owner[g] = client
                sizes[client] += counts[g]
            row_owner = owner[inverse]
            self._rows = [np.nonzero(row_owner == c)[0] for c in range(self._num_partitions)]
        return self._rows

    def load_partition(self, partition_id: int) -> Dataset:
        return self.dataset.select(self._assign()[partition_id])

    def partition_indices(self, partition_id: int) -> np.ndarray:
        """Row indices of one partition (``KeyError`` outside ``range(num_partitions)``)."""
        if not 0 <= partition_id < self._num_partitions:
            raise KeyError(partition_id)
        return self._assign()[partition_id]

    def partition_sizes(self) -> np.ndarray:
        """Number of rows of every partition."""
        return np.array([len(rows) for rows in self._assign()], dtype=np.int64)
