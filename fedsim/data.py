"""Splitting a task's client pool among clients, with flwr-datasets partitioners.

The pool's labels become an in-memory ``datasets.Dataset`` (an ``idx`` column and the label);
the configured partitioner (``conf/partition``) assigns rows to clients; each client's rows are
then split, with a seeded permutation, into a local train and a local test split.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.errors import ComponentError, ConfigError
from fedsim.tasks.base import Batch, Task

#: clients whose local splits :meth:`FederatedData.client` keeps made (a round of 1,000
#: clients and the evaluated ones fit; a pool of 100,000 is made again as clients come back)
CACHED_CLIENTS = 2048


@dataclass
class ClientData:
    train: Batch
    test: Batch

    @property
    def num_train(self) -> int:
        return len(next(iter(self.train.values())))

    @property
    def num_test(self) -> int:
        return len(next(iter(self.test.values()))) if self.test else 0


class FederatedData:
    """Client partitions of a task, computed on first use and cached.

    Parameters
    ----------
    task : Task
    partitioner : flwr_datasets.partitioner.Partitioner, or a callable that builds one
        With ``num_partitions`` equal to the number of clients. A callable is called on first
        use: the check of a configuration then refuses a combination of components before
        flwr-datasets (and the partitioner's library) is imported, and a build that never
        partitions (``estimate=true``) never imports it.
    test_fraction : float
        Share of each client's examples held out as its local test split.
    seed : int
        Seed of the train/test split.
    """

    def __init__(self, task: Task, partitioner, test_fraction: float, seed: int) -> None:
        self.task, self._partitioner = task, partitioner
        self.test_fraction, self.seed = float(test_fraction), int(seed)
        self._ready = False
        self._cache: dict[int, ClientData] = {}
        self._pooled: Batch | None = None

    @property
    def partitioner(self) -> Any:
        if callable(self._partitioner) and not hasattr(self._partitioner, "load_partition"):
            self._partitioner = self._partitioner()
        return self._partitioner

    def _setup(self) -> None:
        if not self._ready:
            from datasets import Dataset

            from fedsim.partitioners import GROUP

            labels = self.task.pool_labels()
            # "label": what conf/partition's label-based partitioners partition by; "idx": the
            # pool's rows, read back from a partition (not needed by a partitioner that gives
            # indices itself: 8 bytes an example, 200 MB for a pool of 25 million)
            columns = {"label": labels}
            if not _gives_indices(self.partitioner):
                columns["idx"] = np.arange(len(labels), dtype=_index_dtype(len(labels)))
            groups = self.task.pool_groups()
            if groups is not None:  # natural client ids, for partition=natural
                columns[GROUP] = groups
            ds = Dataset.from_dict(columns)
            self.partitioner.dataset = ds
            self._ready = True

    def indices(self, client: int) -> np.ndarray:
        self._setup()
        if _gives_indices(self.partitioner):
            return np.asarray(self.partitioner.partition_indices(client), dtype=np.int64)
        part = self.partitioner.load_partition(client).with_format("arrow")  # no row objects
        return np.asarray(part["idx"], dtype=np.int64)

    def _sizes(self, num_clients: int) -> list[int]:
        if _gives_indices(self.partitioner):
            return [int(n) for n in self.partitioner.partition_sizes()[:num_clients]]
        return [len(self.partitioner.load_partition(c)) for c in range(num_clients)]

    def check(self, num_clients: int) -> None:
        """Partition now and make sure every client gets examples (a ConfigError otherwise).

        flwr-datasets partitioners compute all partitions on first use; settings they cannot
        satisfy (more classes per client than the task has, a minimum partition size too large)
        fail there, which would otherwise be inside every client, every round.
        """
        name = type(self.partitioner).__name__
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                self._setup()
                sizes = self._sizes(num_clients)
            except ConfigError:  # the task's own settings, already named
                raise
            except (ValueError, KeyError, IndexError) as e:
                reason = " ".join(str(e).split()).rstrip(".")
                reason += _advice(self.partitioner, num_clients)
                notes = _distinct([str(w.message) for w in caught])
                if notes:
                    reason += " (it warned: " + "; ".join(notes) + ")"
                raise ComponentError("partition", name, reason) from None
        empty = [client for client, size in enumerate(sizes) if size < 2]
        if empty:
            raise ComponentError(
                "partition",
                name,
                f"clients {empty[:10]} get fewer than 2 examples (a train and a test example); "
                "use fewer clients, more examples per client, or another partitioner",
            )

    def _num_test(self, n: int) -> int:
        """Examples of a client with ``n`` held out as its local test split."""
        n_test = int(round(self.test_fraction * n))
        if n >= 2 and self.test_fraction > 0:
            n_test = min(max(n_test, 1), n - 1)
        return n_test

    def num_train(self, client: int) -> int:
        """A client's training examples, from its partition's size (no data loaded)."""
        n = len(self.indices(client))
        return n - self._num_test(n)

    def client(self, client: int) -> ClientData:
        """Client ``client``'s local splits, made when first asked for and kept while among the
        :data:`CACHED_CLIENTS` most recently used (the same data when made again)."""
        data = self._cache.pop(client, None)
        if data is None:
            idx = self.indices(client)
            perm = np.random.default_rng([self.seed, 7, client]).permutation(len(idx))
            n_test = self._num_test(len(idx))
            test_idx, train_idx = idx[perm[:n_test]], idx[perm[n_test:]]
            train = self.task.pool_examples(train_idx, client)
            test = self.task.pool_examples(test_idx, client) if n_test else {}
            data = ClientData(train=train, test=test)
        self._cache[client] = data  # most recent last
        if len(self._cache) > CACHED_CLIENTS:
            del self._cache[next(iter(self._cache))]
        return data

    def pooled_train(self) -> Batch:
        """Every client's training split, concatenated in client order (cached)."""
        import torch

        if self._pooled is None:
            self._setup()
            parts = [self.client(c).train for c in range(self.partitioner.num_partitions)]
            self._pooled = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return self._pooled


def _gives_indices(partitioner: Any) -> bool:
    """Whether a partitioner gives each partition's rows and sizes as arrays (fedsim's own,
    :mod:`fedsim.partitioners`), instead of flwr-datasets' ``load_partition`` datasets only."""
    return hasattr(partitioner, "partition_indices") and hasattr(partitioner, "partition_sizes")


def _index_dtype(n: int) -> type:
    return np.int32 if n <= np.iinfo(np.int32).max else np.int64


def _distinct(messages: list[str]) -> list[str]:
    """Library warnings whole, on one line each, without repeats: a warning repeated with
    other numbers (DirichletPartitioner's "for alpha ([...]) after 3 attempts", once per
    attempt) is shown once, as last issued."""
    import re

    last: dict[str, str] = {}
    for message in messages:
        line = " ".join(message.split())
        key = re.sub(r"\[[^\]]*\]|\d+", "#", line)  # numbers and lists of them
        last.pop(key, None)
        last[key] = line
    return list(last.values())


def validation_split(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the validation split and of the remaining test set, out of a global test set
    of ``n`` examples (``sim.validation_fraction``). The permutation is fixed (not
    ``sim.seed``'s), so that every run of a sweep validates and tests on the same examples."""
    k = int(round(fraction * n))
    if not 1 <= k <= n - 1:
        raise ConfigError(
            "sim.validation_fraction",
            fraction,
            f"leaves {k} of the task's {n} test examples for validation: each side needs one",
        )
    perm = np.random.default_rng([0, 29]).permutation(n)
    return np.sort(perm[:k]), np.sort(perm[k:])


def eval_subset(test: Batch, examples: Any) -> Batch | None:
    """The fixed subset of ``examples`` test examples that the server evaluates between round
    0 and the last round (``sim.eval_examples``); None for ``all`` or at least the whole set.
    Like the validation split, the choice does not depend on ``sim.seed``."""
    if examples == "all":
        return None
    n = len(next(iter(test.values())))
    if int(examples) >= n:
        return None
    perm = np.random.default_rng([0, 31]).permutation(n)
    return take(test, np.sort(perm[: int(examples)]))


def take(batch: Batch, indices: np.ndarray) -> Batch:
    import torch

    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    return {k: v[idx] for k, v in batch.items()}


def _advice(partitioner: Any, num_clients: int) -> str:
    """The keys to change when a partitioner cannot satisfy its settings, with their values."""
    keys = []
    alpha = getattr(partitioner, "_alpha", None)
    if alpha is not None:
        keys.append(f"partition.alpha (now {float(np.min(alpha)):g}; larger is less skewed)")
    size = getattr(partitioner, "_min_partition_size", None)
    if size is not None:
        keys.append(f"partition.min_partition_size (now {size})")
    per_client = getattr(partitioner, "_num_classes_per_partition", None)
    if per_client is not None:
        keys.append(f"partition.num_classes_per_partition (now {per_client})")
    try:
        rows = f" for {partitioner.dataset.num_rows} training examples"
    except (AttributeError, ValueError):
        rows = ""
    keys.append(f"sim.num_clients (now {num_clients}{rows})")
    return ". Change " + ", ".join(keys[:-1]) + (" or " if len(keys) > 1 else "") + keys[-1]
