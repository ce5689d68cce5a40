"""fedsim's vectorised DirichletPartitioner assigns exactly what flwr-datasets' assigns.

Both partitioners get the same dataset (an ``idx`` column = the row number, and a label with
10 classes of unequal frequency) and the same arguments; every partition must hold the same
rows in the same order (``partition_indices`` and ``load_partition`` against flwr-datasets'
``load_partition``), the same warnings must be issued while the draws are repeated, the same
error raised when they never satisfy ``min_partition_size``, and both generators must end in
the same state (the same numbers drawn, shuffle included).
"""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner as FlwrDirichlet

from fedsim.partitioners import DirichletPartitioner
from tests.partition_data import FREQUENCIES, assign, labelled, rows

DATASET = labelled()


def _partition(cls, dataset: Dataset, **kwargs):
    """The partitioner with the dataset, all partitions assigned; (it, warnings, error)."""
    return assign(cls, dataset, partition_by="label", **kwargs)


def _same_assignment(dataset: Dataset, **kwargs) -> list:
    """Assert both partitioners agree on ``dataset``; flwr-datasets' warnings."""
    flwr, flwr_notes, flwr_error = _partition(FlwrDirichlet, dataset, **kwargs)
    ours, notes, error = _partition(DirichletPartitioner, dataset, **kwargs)
    assert notes == flwr_notes
    assert flwr_error is None and error is None, (flwr_error, error)
    idx = np.asarray(dataset.with_format("arrow")[:].column("idx"))
    sizes = []
    for p in range(kwargs["num_partitions"]):
        expected = rows(flwr.load_partition(p))
        sizes.append(len(expected))
        assert idx[ours.partition_indices(p)].tolist() == expected, p
        assert rows(ours.load_partition(p)) == expected, p
    assert ours.partition_sizes().tolist() == sizes
    assert sum(sizes) == len(dataset)
    assert ours._rng.bit_generator.state == flwr._rng.bit_generator.state
    return flwr_notes


CONFIGS = [
    # num_partitions, alpha, self_balancing, shuffle, seed, min_partition_size
    (3, 0.5, False, True, 42, 10),
    (3, 5, True, False, 1, 10),
    (10, 0.1, False, True, 0, 10),
    (10, 0.1, True, True, 7, 10),
    (10, 0.5, True, False, 3, 10),
    (10, 5.0, False, False, 11, 10),
    (10, [0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 2.0, 3.0, 5.0, 10.0], True, True, 5, 10),
    (10, np.linspace(0.2, 2.0, 10).reshape(2, 5), False, True, 9, 10),
    (100, 0.5, False, True, 3, 10),
    (100, 0.5, True, True, 1, 5),
    (100, 1.0, True, False, 4, 10),
    (100, list(np.linspace(0.3, 3.0, 100)), False, True, 1, 2),  # 4 redraws
]


@pytest.mark.parametrize("num_partitions,alpha,self_balancing,shuffle,seed,min_size", CONFIGS)
def test_same_rows_in_the_same_order(
    num_partitions, alpha, self_balancing, shuffle, seed, min_size
):
    _same_assignment(
        DATASET,
        num_partitions=num_partitions,
        alpha=alpha,
        self_balancing=self_balancing,
        shuffle=shuffle,
        seed=seed,
        min_partition_size=min_size,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_partitions=100, alpha=0.5, seed=3),  # 1 redraw
        dict(num_partitions=100, alpha=0.5, seed=2),  # 8 redraws
        dict(num_partitions=10, alpha=0.1, seed=1, min_partition_size=50, self_balancing=True),
    ],
)
def test_redraws_warn_as_flwr_does(kwargs):
    notes = _same_assignment(DATASET, **kwargs)
    assert notes and all(category is UserWarning for category, _ in notes)
    assert "min_partition_size" in notes[0][1] and "after 0 attempts" in notes[0][1]


def test_gives_up_after_ten_redraws_as_flwr_does():
    kwargs = dict(num_partitions=100, alpha=0.5, seed=0, min_partition_size=10)
    _, flwr_notes, flwr_error = _partition(FlwrDirichlet, DATASET, **kwargs)
    ours, notes, error = _partition(DirichletPartitioner, DATASET, **kwargs)
    assert isinstance(flwr_error, ValueError) and type(error) is type(flwr_error)
    assert str(error) == str(flwr_error)
    assert len(flwr_notes) == 11 and notes == flwr_notes


def test_other_labels_and_a_mappeddataset():
    """String labels (sorted as strings), integer labels with gaps and negative values, uint8
    labels (the synthetic task's), and a dataset with an indices mapping (rows are positions in
    it, not in its table)."""
    rng = np.random.default_rng(8)
    names = np.array(["b", "a", "c10", "c9", "Z"])
    _same_assignment(labelled(names[rng.integers(0, 5, 800)].tolist()), num_partitions=7, alpha=1.0)
    gaps = np.array([-5, 3, 100, 7])[rng.integers(0, 4, 800)]
    _same_assignment(labelled(gaps), num_partitions=7, alpha=0.5, self_balancing=True)
    small = np.random.default_rng(5).choice(10, 1000, p=FREQUENCIES).astype(np.uint8)
    _same_assignment(labelled(small), num_partitions=10, alpha=0.5)
    _same_assignment(DATASET.shuffle(seed=4).select(range(1500)), num_partitions=10, alpha=0.5)


def test_fast_accessors():
    ours = DirichletPartitioner(num_partitions=10, partition_by="label", alpha=0.5)
    ours.dataset = DATASET
    got = ours.partition_indices(3)
    assert got.dtype == np.int32 and not got.flags.writeable
    assert ours.partition_sizes().dtype == np.int64 and ours.num_partitions == 10
    for bad in (-1, 10):
        with pytest.raises(KeyError):
            ours.partition_indices(bad)


def _error(cls, **kwargs):
    try:
        partitioner = cls(partition_by="label", **kwargs)
        partitioner.dataset = labelled(np.arange(5) % 2)
        partitioner.load_partition(0)
    except Exception as e:  # noqa: BLE001 (compared below)
        return type(e), str(e)
    return None


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_partitions=3, alpha=-1.0),
        dict(num_partitions=3, alpha=0),
        dict(num_partitions=0, alpha=0.5),
        dict(num_partitions=-2, alpha=0.5),
        dict(num_partitions=3, alpha=[0.5, 0.5]),
        dict(num_partitions=3, alpha=[0.5, -0.1, 1.0]),
        dict(num_partitions=3, alpha=np.ones(2)),
        dict(num_partitions=3, alpha=np.ones((2, 2))),
        dict(num_partitions=3, alpha="0.5"),
        dict(num_partitions=6, alpha=0.5),  # more partitions than rows
    ],
)
def test_bad_arguments_are_refused_as_flwr_refuses_them(kwargs):
    expected = _error(FlwrDirichlet, **kwargs)
    assert expected is not None and expected[0] is ValueError
    assert _error(DirichletPartitioner, **kwargs) == expected
