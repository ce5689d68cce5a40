"""Partitioners that flwr-datasets does not have in the form fedsim needs.

:class:`NaturalGroupPartitioner` (``partition=natural``) gives each client whole natural groups
(all the snippets about one movie, all the texts of one author), as a real federation would be
split. flwr-datasets' ``NaturalIdPartitioner`` makes one partition per group, which fixes the
number of clients to the number of groups; here any number of clients up to the number of
groups works: groups are shuffled with the seed, then each (largest first) goes to the client
that holds the fewest examples so far, so clients get similar amounts of data.

:class:`DirichletPartitioner` (``partition=dirichlet``) is flwr-datasets' Dirichlet label skew,
the same rows in the same order for the same arguments and seed, computed with numpy arrays
instead of Python lists, so that 100,000 clients (25.6 million examples) take seconds and one
flat index array rather than minutes and a Python int per example
(``python benchmarks/partition.py`` measures both).
"""

from __future__ import annotations

import warnings

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


def _alpha_vector(alpha, num_partitions: int) -> np.ndarray:
    """``alpha`` as the per-partition concentration vector, refused as flwr-datasets refuses it.

    The accepted forms and the errors (types and messages) are flwr-datasets 0.6's
    (``DirichletPartitioner._initialize_alpha``): a number is repeated for every partition
    (an ``int`` becomes a float), a list must have one value per partition, a 1-D array too, a
    2-D array is flattened and then must; anything else is refused, and so is a value that is
    not strictly positive.
    """
    if isinstance(alpha, int | float):  # bool is an int, numpy's float64 a float, as in flwr
        vector = np.full(num_partitions, float(alpha))
    elif isinstance(alpha, list):
        if len(alpha) != num_partitions:
            raise ValueError(
                "If passing alpha as a List, it needs to be of length of equal to num_partitions."
            )
        vector = np.asarray(alpha)
    elif isinstance(alpha, np.ndarray):
        vector = alpha
        if alpha.ndim == 1 and len(alpha) != num_partitions:
            raise ValueError(
                "If passing alpha as an NDArray, its length needs to be of length equal to "
                "num_partitions."
            )
        if alpha.ndim == 2:
            vector = alpha.flatten()
            if len(vector) != num_partitions:
                raise ValueError(
                    "If passing alpha as an NDArray, its size needs to be of length equal to "
                    "num_partitions."
                )
    else:
        raise ValueError("The given alpha format is not supported.")
    if not (vector > 0).all():
        raise ValueError(
            "Alpha values should be strictly greater than zero. "
            f"Instead it'd be converted to {vector}"
        )
    return vector


def _column(dataset: Dataset, name: str) -> np.ndarray:
    """One column as a numpy array, through Arrow: no Python object per row.

    ``np.array(dataset[name])`` (what flwr-datasets does) builds a Python object per row and,
    with datasets 4's lazy ``Column``, takes seconds per million rows; a dataset without an
    indices mapping (fedsim's) is read here without a copy.
    """
    table = dataset.select_columns([name]).with_format("arrow")[:]
    return table.column(name).to_numpy()


def _rows_by_class(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


class DirichletPartitioner(Partitioner):
    """Label skew from Dirichlet draws: flwr-datasets' assignment, vectorised.

    The assignment is flwr-datasets' ``DirichletPartitioner`` (0.6) for the same arguments and
    seed, row for row and in the same order within every partition (tests/
    test_partitioners_dirichlet.py compares them): the classes in sorted order, one
    ``dirichlet(alpha)`` draw each from ``np.random.default_rng(seed)``, the class's rows (in
    ascending order) cut at ``(cumsum(proportions) * n).astype(int)``; with ``self_balancing``
    a partition already holding more than ``num_rows / num_partitions`` rows gets no share
    of the later classes; the whole draw is repeated, with flwr's warning, while a partition
    has fewer than ``min_partition_size`` rows, and refused with flwr's ``ValueError`` after 10
    repetitions; finally (``shuffle``) each partition, in partition order, is shuffled in place
    with the same generator. A partition's rows are those of the classes in sorted order.

    What differs is the cost: flwr-datasets reads the labels into a Python list and keeps one
    Python list per partition (2.56 million rows in 10,000 partitions: 32 s, and 100 MiB of
    Python ints kept; here 0.18 s and 10 MiB, and 1.5 s for 25.6 million rows in 100,000
    partitions: benchmarks/partition.py). Here the labels are read through Arrow, the redraws
    only count rows, and the rows are written once into one flat array (int32 when they fit),
    ordered by partition, with an offsets array: :meth:`partition_indices` is a slice of it.
    Only the shuffle loops over partitions (``Generator.shuffle`` of a 1-D array slice draws
    the same numbers and makes the same swaps as of flwr's list). Reading every partition
    through :meth:`load_partition` (``dataset.select``) costs about 2.5 ms a partition; fedsim
    reads :meth:`partition_indices` and :meth:`partition_sizes` instead.

    Parameters
    ----------
    num_partitions : int
        Number of partitions (clients); more than zero and at most the number of rows.
    partition_by : str
        Column of the labels the Dirichlet draws split.
    alpha : float, int, list of float or numpy array
        Concentration: one number for every partition, or one per partition.
    min_partition_size : int
        The draws are repeated while a partition has fewer rows than this.
    self_balancing : bool
        Stop giving rows to partitions that hold more than the average.
    shuffle : bool
        Shuffle each partition's rows after the assignment.
    seed : int or None
        Seed of the generator of the draws and of the shuffle.
    """

    def __init__(
        self,
        num_partitions: int,
        partition_by: str,
        alpha: int | float | list[float] | np.ndarray,
        min_partition_size: int = 10,
        self_balancing: bool = False,
        shuffle: bool = True,
        seed: int | None = 42,
    ) -> None:
        super().__init__()
        if not num_partitions > 0:
            raise ValueError("The number of partitions needs to be greater than zero.")
        self._num_partitions = num_partitions
        self._alpha = _alpha_vector(alpha, num_partitions)
        self._partition_by = partition_by
        self._min_partition_size = min_partition_size
        self._self_balancing = self_balancing
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
        if self._indices is not None:
            return
        rows = self.dataset.num_rows
        if self._num_partitions > rows:
            raise ValueError(
                "The number of partitions needs to be smaller than the number of samples in "
                "the dataset."
            )
        order, class_sizes = _rows_by_class(_column(self.dataset, self._partition_by))
        counts = self._draw(class_sizes, rows / self._num_partitions)
        offsets = np.zeros(self._num_partitions + 1, dtype=np.int64)
        np.cumsum(np.sum(counts, axis=0), out=offsets[1:])
        indices = np.empty(len(order), dtype=np.int32 if rows < 1 << 31 else np.int64)
        # Class after class, each segment of the class's rows goes after what its partition
        # already holds: a row's place is its place in the class plus the segment's shift.
        filled, start = offsets[:-1].copy(), 0
        for size, count in zip(class_sizes.tolist(), counts):
            shift = filled - (np.cumsum(count) - count)
            places = np.repeat(shift, count)
            places += np.arange(size)
            indices[places] = order[start : start + size]
            filled += count
            start += size
        if self._shuffle:
            for p in range(self._num_partitions):
                self._rng.shuffle(indices[offsets[p] : offsets[p + 1]])
        indices.flags.writeable = False
        self._indices, self._offsets = indices, offsets

    def _draw(self, class_sizes: np.ndarray, average: float) -> np.ndarray:
        """Rows of each class given to each partition (classes x partitions), redrawn until every
        partition has ``min_partition_size`` rows (flwr-datasets' loop: 10 retries at most)."""
        attempt = 0
        while True:
            counts = np.empty((len(class_sizes), self._num_partitions), dtype=np.int64)
            sizes = np.zeros(self._num_partitions, dtype=np.int64)
            for k, n in enumerate(class_sizes.tolist()):
                share = self._rng.dirichlet(self._alpha)
                if self._self_balancing:
                    share[sizes > average] = 0.0
                    # flwr-datasets divides by Python's sum(), a left-to-right sum: cumsum's
                    # last value is the same number (np.sum adds pairwise and may differ)
                    share = share / np.cumsum(share)[-1]
                cuts = (np.cumsum(share) * n).astype(int)[:-1]
                counts[k] = np.diff(cuts, prepend=0, append=n)
                sizes += counts[k]
            if sizes.min() >= self._min_partition_size:
                return counts
            self._warn_too_small(sizes, attempt)
            if attempt == 10:
                raise ValueError(
                    "The max number of attempts (10) was reached. Please update the values of "
                    "alpha and try again."
                )
            attempt += 1

    def _warn_too_small(self, sizes: np.ndarray, attempt: int) -> None:
        """flwr-datasets' warning, word for word, before a new draw."""
        smallest = list(self._alpha[sizes == sizes.min()])
        hint = ""
        if self._alpha.size > 0:
            hint = (
                "Generating partitions by sampling from a list of very wide range of alpha "
                "values can be hard to achieve. Try reducing the range between maximum "
                f"({self._alpha.max()}) and minimum alpha ({self._alpha.min()}) values or "
                "increasing all the values."
            )
        warnings.warn(
            f"The specified min_partition_size ({self._min_partition_size}) was not satisfied "
            f"for alpha ({smallest}) after {attempt} attempts at sampling from the Dirichlet "
            "distribution. The probability sampling from the Dirichlet distribution will be "
            "repeated. Note: This is not a desired behavior. It is recommended to adjust the "
            f"alpha or min_partition_size instead. {hint}",
            stacklevel=1,
        )
