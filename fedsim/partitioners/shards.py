"""``partition=iid`` and ``partition=pathological``: flwr-datasets' ``IidPartitioner`` and
``PathologicalPartitioner`` assignments, computed with numpy arrays.

flwr-datasets builds a dataset per partition (``iid``: a contiguous shard each) or a Python
list of row ids per partition (``pathological``), so that checking 10,000 clients took 8.7 s and
133 s (benchmarks/partition.py); here the rows are ranges or slices of one flat array, for
the same rows in the same order (tests/test_partitioners_shards.py compares them).
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import Partitioner

from fedsim.partitioners.flat import FlatPartitioner, by_class, column, rows_by_class

#: ``class_assignment_mode`` values of :class:`PathologicalPartitioner`
MODES = ("random", "deterministic", "first-deterministic")


class IidPartitioner(Partitioner):
    """Equal contiguous shards of the pool (which fedsim's tasks draw in a seeded random
    order): partition ``p`` of ``P`` holds rows ``[p * d + min(p, m), ...)``, ``d + 1`` rows
    for the first ``m`` partitions and ``d`` for the rest (``d, m = divmod(rows, P)``), as
    flwr-datasets' ``IidPartitioner`` (``dataset.shard(P, p, contiguous=True)``) gives them.
    Nothing is stored: a partition's rows are a range.

    Parameters
    ----------
    num_partitions : int
        Number of partitions (clients), more than zero.
    """

    def __init__(self, num_partitions: int) -> None:
        super().__init__()
        if num_partitions <= 0:
            raise ValueError("The number of partitions must be greater than zero.")
        self._num_partitions = num_partitions

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def _bounds(self, partition_id: int) -> tuple[int, int]:
        if not 0 <= partition_id < self._num_partitions:
            raise KeyError(partition_id)
        size, rest = divmod(self.dataset.num_rows, self._num_partitions)
        start = size * partition_id + min(partition_id, rest)
        return start, start + size + (partition_id < rest)

    def load_partition(self, partition_id: int) -> Dataset:
        return self.dataset.select(self.partition_indices(partition_id))

    def partition_indices(self, partition_id: int) -> np.ndarray:
        """Row indices of one partition (``KeyError`` outside ``range(num_partitions)``)."""
        return np.arange(*self._bounds(partition_id), dtype=np.int64)

    def partition_sizes(self) -> np.ndarray:
        size, rest = divmod(self.dataset.num_rows, self._num_partitions)
        return size + (np.arange(self._num_partitions) < rest).astype(np.int64)


class PathologicalPartitioner(FlatPartitioner):
    """Each partition holds rows of exactly ``num_classes_per_partition`` classes (Li, Diao,
    Chen, He, 2022, "Federated Learning on Non-IID Data Silos: An Experimental Study",
    https://arxiv.org/abs/2102.02079), as flwr-datasets' ``PathologicalPartitioner`` assigns
    them for the same arguments and seed.

    The classes (sorted) are assigned to partitions in order 0, 1, ... with one generator,
    ``np.random.default_rng(seed)``: ``first-deterministic`` gives partition ``p`` class
    ``p mod C`` and then draws classes uniformly (one at a time, a class it holds drawn
    again) until it holds ``num_classes_per_partition``; ``deterministic`` gives it classes
    ``p, p + 1, ...`` (mod ``C``); ``random`` draws them without replacement. Each class's rows
    (ascending) are then cut into as many near-equal consecutive parts as partitions hold the
    class (``np.array_split``: the first parts one row longer), given to those partitions in
    partition order; a partition's rows are its parts in class order, and (``shuffle``) each
    partition, in partition order, is shuffled in place with the same generator. A class no
    partition drew is left out, with a warning.

    Parameters
    ----------
    num_partitions : int
        Number of partitions (clients), at most the number of rows.
    partition_by : str
        Column of the labels.
    num_classes_per_partition : int
        Classes each partition holds, at most the number of classes.
    class_assignment_mode : str
        ``first-deterministic`` (the paper's, every class used when there are at least as
        many partitions as classes), ``deterministic`` or ``random``.
    shuffle : bool
        Shuffle each partition's rows after the assignment.
    seed : int or None
        Seed of the generator of the class draws and of the shuffle.
    """

    def __init__(
        self,
        num_partitions: int,
        partition_by: str,
        num_classes_per_partition: int,
        class_assignment_mode: Literal["random", "deterministic", "first-deterministic"] = "random",
        shuffle: bool = True,
        seed: int | None = 42,
    ) -> None:
        super().__init__(num_partitions, partition_by, shuffle, seed)
        self._num_classes_per_partition = num_classes_per_partition
        self._class_assignment_mode = class_assignment_mode

    def _compute(self) -> tuple[np.ndarray, np.ndarray]:
        self._check_rows()
        labels = column(self.dataset, self._partition_by)
        order, class_sizes = rows_by_class(labels)
        held = self._classes_held(len(class_sizes))  # partitions x classes
        users = held.sum(axis=0)
        short = np.nonzero(users > class_sizes)[0]
        if short.size:
            k = int(short[0])
            raise ValueError(
                f"class {_class_names(labels)[k]!r} would be split among {users[k]} partitions "
                f"but has only {class_sizes[k]} rows; use fewer partitions or classes per "
                "partition, or class_assignment_mode=deterministic (classes spread evenly)"
            )
        unused = np.nonzero(users == 0)[0]
        if unused.size:
            names = [_class_names(labels)[k] for k in unused.tolist()]
            warnings.warn(
                f"classes {names} are held by no partition and left out "
                f"(class_assignment_mode={self._class_assignment_mode}); first-deterministic "
                "uses every class when there are at least as many partitions as classes",
                stacklevel=1,
            )
        counts = np.zeros((len(class_sizes), self._num_partitions), dtype=np.int64)
        for k in np.nonzero(users)[0].tolist():
            size, rest = divmod(int(class_sizes[k]), int(users[k]))
            parts = size + (np.arange(users[k]) < rest)
            counts[k, held[:, k]] = parts
        return by_class(order, class_sizes, counts, self._rng if self._shuffle else None)

    def _classes_held(self, classes: int) -> np.ndarray:
        """Which classes each partition holds (partitions x classes, bool), drawn as the class
        docstring says."""
        per, mode, rng = self._num_classes_per_partition, self._class_assignment_mode, self._rng
        if mode not in MODES:
            raise ValueError(f"class_assignment_mode={mode}: must be one of {', '.join(MODES)}")
        if per > classes:
            raise ValueError(
                f"num_classes_per_partition={per} is more than the {classes} classes the data has"
            )
        held = np.zeros((self._num_partitions, classes), dtype=bool)
        if mode == "deterministic":
            p = np.arange(self._num_partitions)[:, None]
            held[p, (p + np.arange(per)) % classes] = True
            return held
        for p in range(self._num_partitions):
            if mode == "random":
                held[p, rng.choice(classes, size=per, replace=False)] = True
                continue
            held[p, p % classes] = True
            have = 1
            while have < per:
                k = rng.choice(classes, size=1)[0]
                have += not held[p, k]
                held[p, k] = True
        return held


def _class_names(labels: np.ndarray) -> list:
    """The classes in sorted order, as Python values."""
    return np.unique(labels).tolist()
