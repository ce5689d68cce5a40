"""What fedsim's label partitioners share: the labels read through Arrow, the rows grouped by
class, and every partition's rows kept in one flat array with an offsets array
(:class:`FlatPartitioner`), so that a partition is a slice, not a Python list of ints."""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import Partitioner


class FlatPartitioner(Partitioner):
    """A partitioner whose partitions are slices of one flat array of row indices.

    A subclass computes, on first use, every partition's rows through :meth:`_compute`, from
    the labels in column ``partition_by``, with one generator (``np.random.default_rng(seed)``)
    for its draws and, with ``shuffle``, each partition's shuffle;
    fedsim reads :meth:`partition_indices` and :meth:`partition_sizes` (no dataset per
    partition), and :meth:`load_partition` gives flwr-datasets' form (``dataset.select`` of
    the rows: about 2.5 ms a partition).
    """

    def __init__(
        self, num_partitions: int, partition_by: str, shuffle: bool, seed: int | None
    ) -> None:
        super().__init__()
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._shuffle = shuffle
        self._seed = seed
        self._rng = np.random.default_rng(seed=seed)  # made here, as flwr-datasets makes it
        self._indices: np.ndarray | None = None  # every partition's rows, partition after partition
        self._offsets: np.ndarray | None = None  # partition p: _indices[_offsets[p]:_offsets[p+1]]

    @property
    def num_partitions(self) -> int:
        """Number of partitions (assigns them first, as flwr-datasets does)."""
        self._assign()
        return self._num_partitions

    def load_partition(self, partition_id: int) -> Dataset:
        """The rows of one partition, as ``dataset.select`` of :meth:`partition_indices`."""
        return self.dataset.select(self.partition_indices(partition_id))

    def partition_indices(self, partition_id: int) -> np.ndarray:
        """Row indices of one partition, in flwr-datasets' order (a read-only view).

        An id outside ``range(num_partitions)`` raises ``KeyError``, as flwr-datasets' dict does.
        """
        self._assign()
        if not 0 <= partition_id < self._num_partitions:
            raise KeyError(partition_id)
        return self._indices[self._offsets[partition_id] : self._offsets[partition_id + 1]]

    def partition_sizes(self) -> np.ndarray:
        """Number of rows of every partition (int64, length ``num_partitions``)."""
        self._assign()
        return np.diff(self._offsets)

    def _assign(self) -> None:
        if self._indices is None:
            indices, offsets = self._compute()
            indices.flags.writeable = False
            self._indices, self._offsets = indices, offsets

    def _compute(self) -> tuple[np.ndarray, np.ndarray]:
        """(every partition's rows, partition after partition; the offsets, length
        ``num_partitions + 1``)."""
        raise NotImplementedError

    def _check_rows(self) -> int:
        """The dataset's number of rows, refused (``ValueError``) below the partitions'."""
        rows = self.dataset.num_rows
        if self._num_partitions > rows:
            raise ValueError(
                "The number of partitions needs to be smaller than the number of samples in "
                "the dataset."
            )
        return rows


def by_class(
    order: np.ndarray, class_sizes: np.ndarray, counts: np.ndarray, rng=None
) -> tuple[np.ndarray, np.ndarray]:
    """Every partition's rows from each class's share: class after class (sorted), the class's
    rows (``order``, grouped by class as :func:`rows_by_class` gives them) cut into consecutive
    segments of ``counts[k, p]`` rows for partitions 0, 1, ... in turn, each partition's
    segments one after another in class order (a class whose counts are all 0 left out); then,
    with ``rng``, each partition shuffled in
    place, in partition order (``Generator.shuffle`` of a 1-D array slice draws the same
    numbers and makes the same swaps as of flwr-datasets' lists). (rows, offsets)."""
    partitions = counts.shape[1]
    offsets = np.zeros(partitions + 1, dtype=np.int64)
    np.cumsum(np.sum(counts, axis=0), out=offsets[1:])
    rows = len(order)
    indices = np.empty(int(offsets[-1]), dtype=np.int32 if rows < 1 << 31 else np.int64)
    # Class after class, each segment of the class's rows goes after what its partition
    # already holds: a row's place is its place in the class plus the segment's shift.
    filled, start = offsets[:-1].copy(), 0
    for size, count in zip(class_sizes.tolist(), counts):
        shift = filled - (np.cumsum(count) - count)
        places = np.repeat(shift, count)
        taken = len(places)  # the class's first rows; all of them but for a class left out
        places += np.arange(taken)
        indices[places] = order[start : start + taken]
        filled += count
        start += size
    if rng is not None:
        for p in range(partitions):
            rng.shuffle(indices[offsets[p] : offsets[p + 1]])
    return indices, offsets


def column(dataset: Dataset, name: str) -> np.ndarray:
    """One column as a numpy array, through Arrow: no Python object per row.

    ``np.array(dataset[name])`` (what flwr-datasets does) builds a Python object per row and,
    with datasets 4's lazy ``Column``, takes seconds per million rows; a dataset without an
    indices mapping (fedsim's) is read here without a copy.
    """
    table = dataset.select_columns([name]).with_format("arrow")[:]
    return table.column(name).to_numpy()


def rows_by_class(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row indices grouped by class, classes in sorted order and rows ascending within each;
    the number of rows of each class).

    The classes are sorted as flwr-datasets sorts them (``sorted(dataset.unique(column))``),
    and ``np.nonzero(labels == k)`` lists a class's rows in ascending order, which the stable
    sort of the class ranks keeps. Integer labels of a small range are counted with
    ``bincount`` (no sort of the labels); others go through ``np.unique``.
    """
    if labels.dtype.kind in "iu" and labels.size:
        low, high = int(labels.min()), int(labels.max())
        if high - low < max(labels.size, 1 << 16) and high < 1 << 63:
            # labels from 0 (fedsim's) are counted as they are, without a shifted copy
            plain = low == 0 and labels.dtype != np.uint64
            shifted = labels if plain else labels.astype(np.int64) - low
            counts = np.bincount(shifted, minlength=high - low + 1)
            present = counts > 0
            sizes = counts[present]
            rank = (np.cumsum(present) - 1).astype(_key_type(len(sizes)))[shifted]
            return np.argsort(rank, kind="stable"), sizes.astype(np.int64)
    _, rank, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    rank = rank.reshape(-1).astype(_key_type(len(sizes)))
    return np.argsort(rank, kind="stable"), sizes.astype(np.int64)


def _key_type(classes: int) -> type:
    """The smallest integer type of class ranks: numpy radix-sorts 8- and 16-bit keys."""
    return np.uint8 if classes <= 1 << 8 else np.uint16 if classes <= 1 << 16 else np.int64
