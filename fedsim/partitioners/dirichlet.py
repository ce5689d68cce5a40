"""``partition=dirichlet``: Dirichlet label skew (Hsu, Qi, Brown, 2019,
https://arxiv.org/abs/1909.06335) as flwr-datasets assigns it, vectorised."""

from __future__ import annotations

import warnings

import numpy as np

from fedsim.partitioners.flat import FlatPartitioner, by_class, column, rows_by_class


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


class DirichletPartitioner(FlatPartitioner):
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
        if not num_partitions > 0:
            raise ValueError("The number of partitions needs to be greater than zero.")
        self._alpha = _alpha_vector(alpha, num_partitions)
        super().__init__(num_partitions, partition_by, shuffle, seed)
        self._min_partition_size = min_partition_size
        self._self_balancing = self_balancing

    def _compute(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self._check_rows()
        order, class_sizes = rows_by_class(column(self.dataset, self._partition_by))
        counts = self._draw(class_sizes, rows / self._num_partitions)
        return by_class(order, class_sizes, counts, self._rng if self._shuffle else None)

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
