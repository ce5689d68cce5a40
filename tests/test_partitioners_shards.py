"""fedsim's IidPartitioner and PathologicalPartitioner assign exactly what flwr-datasets' do.

Both get the same dataset (an ``idx`` column = the row number, and a label of 10 classes of
unequal frequency) and the same arguments; every partition must hold the same rows in the same
order (``partition_indices`` and ``load_partition`` against flwr-datasets' ``load_partition``),
and for the pathological split both generators must end in the same state (the same numbers
drawn, class draws and shuffle). Settings neither can satisfy are refused by both.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from datasets import Dataset
from flwr_datasets.partitioner import IidPartitioner as FlwrIid
from flwr_datasets.partitioner import PathologicalPartitioner as FlwrPathological

from fedsim.partitioners import IidPartitioner, PathologicalPartitioner
from tests.partition_data import FREQUENCIES, assign, labelled, rows

DATASET = labelled()


def _flwr_rows(flwr, p: int) -> list[int]:
    """flwr-datasets' partition ``p``; [] for an empty shard at the end of the dataset, which
    its ``load_partition`` refuses (``IndexError``: the empty range starts at the last row)."""
    try:
        return rows(flwr.load_partition(p))
    except IndexError:
        return []


def _partition(cls, dataset: Dataset, **kwargs):
    """The partitioner with the dataset, all partitions assigned; (it, warned, error)."""
    partitioner, notes, error = assign(cls, dataset, **kwargs)
    return partitioner, bool(notes), error


def _same_assignment(cls, flwr_cls, dataset: Dataset, **kwargs) -> bool:
    """Assert both partitioners agree on ``dataset``; whether they warned."""
    flwr, flwr_warned, flwr_error = _partition(flwr_cls, dataset, **kwargs)
    ours, warned, error = _partition(cls, dataset, **kwargs)
    assert flwr_error is None and error is None, (flwr_error, error)
    assert warned == flwr_warned
    idx = np.asarray(dataset.with_format("arrow")[:].column("idx"))
    sizes = []
    for p in range(kwargs["num_partitions"]):
        expected = _flwr_rows(flwr, p)
        sizes.append(len(expected))
        assert idx[ours.partition_indices(p)].tolist() == expected, p
        assert rows(ours.load_partition(p)) == expected, p
    assert ours.partition_sizes().tolist() == sizes
    if hasattr(flwr, "_rng"):
        assert ours._rng.bit_generator.state == flwr._rng.bit_generator.state
    return warned


@pytest.mark.parametrize("num_partitions", [1, 3, 7, 10, 100, 2999, 3000, 3001, 4500])
def test_iid_same_rows_in_the_same_order(num_partitions):
    _same_assignment(IidPartitioner, FlwrIid, DATASET, num_partitions=num_partitions)


def test_iid_a_mapped_dataset_and_its_accessors():
    _same_assignment(IidPartitioner, FlwrIid, DATASET.shuffle(seed=4).select(range(1501)),
                     num_partitions=10)  # fmt: skip
    ours = IidPartitioner(num_partitions=7)
    ours.dataset = DATASET
    assert ours.partition_sizes().tolist() == [429] * 4 + [428] * 3  # 3000 = 7 * 428 + 4
    assert ours.partition_indices(4).tolist() == list(range(4 * 428 + 4, 5 * 428 + 4))
    for bad in (-1, 7):
        with pytest.raises(KeyError):
            ours.partition_indices(bad)
    with pytest.raises(ValueError, match="greater than zero"):
        IidPartitioner(num_partitions=0)


PATHOLOGICAL = [
    # num_partitions, num_classes_per_partition, class_assignment_mode, shuffle, seed
    (10, 2, "first-deterministic", True, 0),
    (10, 2, "first-deterministic", False, 3),
    (7, 3, "first-deterministic", True, 42),  # fewer partitions than classes: some unused
    (100, 2, "first-deterministic", True, 1),
    (100, 5, "first-deterministic", True, 2),
    (10, 1, "first-deterministic", True, 4),
    (10, 10, "first-deterministic", True, 5),
    (10, 2, "deterministic", True, 0),
    (25, 4, "deterministic", False, 9),
    (4, 2, "deterministic", True, 1),  # classes 5-9 unused
    (10, 2, "random", True, 0),
    (100, 3, "random", True, 8),
    (13, 10, "random", False, 6),
    (5, 1, "random", True, 7),
]


@pytest.mark.parametrize("num_partitions,per,mode,shuffle,seed", PATHOLOGICAL)
def test_pathological_same_rows_in_the_same_order(num_partitions, per, mode, shuffle, seed):
    kwargs = dict(num_partitions=num_partitions, partition_by="label", shuffle=shuffle)
    kwargs.update(num_classes_per_partition=per, class_assignment_mode=mode, seed=seed)
    warned = _same_assignment(PathologicalPartitioner, FlwrPathological, DATASET, **kwargs)
    ours = PathologicalPartitioner(**kwargs)
    ours.dataset = DATASET
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = np.concatenate([ours.partition_indices(p) for p in range(num_partitions)])
    labels = np.asarray(DATASET["label"])
    classes = set(labels[kept].tolist())
    assert warned == (len(classes) < 10)  # a class no partition drew is named in a warning
    assert len(kept) == np.isin(labels, list(classes)).sum()  # every row of the others


def test_pathological_other_labels_and_a_mappeddataset():
    """String labels (sorted as strings), integer labels with gaps and negative values, uint8
    labels (the synthetic task's), and a dataset with an indices mapping."""
    rng = np.random.default_rng(8)
    kwargs = dict(partition_by="label", num_classes_per_partition=2, seed=3)
    names = np.array(["b", "a", "c10", "c9", "Z"])
    data = labelled(names[rng.integers(0, 5, 800)].tolist())
    for mode in ("first-deterministic", "random", "deterministic"):
        _same_assignment(PathologicalPartitioner, FlwrPathological, data, num_partitions=7,
                         class_assignment_mode=mode, **kwargs)  # fmt: skip
    gaps = labelled(np.array([-5, 3, 100, 7])[rng.integers(0, 4, 800)])
    _same_assignment(PathologicalPartitioner, FlwrPathological, gaps, num_partitions=9, **kwargs)
    small = labelled(np.random.default_rng(5).choice(10, 1000, p=FREQUENCIES).astype(np.uint8))
    _same_assignment(PathologicalPartitioner, FlwrPathological, small, num_partitions=20, **kwargs)
    mapped = DATASET.shuffle(seed=4).select(range(1500))
    _same_assignment(PathologicalPartitioner, FlwrPathological, mapped, num_partitions=30,
                     **kwargs)  # fmt: skip


def _refused(cls, size=20, **kwargs):
    partitioner = cls(partition_by="label", **kwargs)
    partitioner.dataset = labelled(np.arange(size) % 4)
    try:
        partitioner.load_partition(0)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize(
    "kwargs,says",
    [
        (dict(num_partitions=3, num_classes_per_partition=5), "num_classes_per_partition=5"),
        (dict(num_partitions=30, num_classes_per_partition=1), "number of partitions"),
        (dict(num_partitions=12, num_classes_per_partition=4), "has only 5 rows"),
        (
            dict(num_partitions=3, num_classes_per_partition=2, class_assignment_mode="every"),
            "class_assignment_mode=every",
        ),  # fmt: skip
    ],
)
def test_pathological_settings_flwr_refuses_are_refused(kwargs, says):
    assert _refused(FlwrPathological, **kwargs) is not None
    message = _refused(PathologicalPartitioner, **kwargs)
    assert message is not None and says in message, message
