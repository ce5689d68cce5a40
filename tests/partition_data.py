"""The dataset the partitioner tests give both fedsim's partitioners and flwr-datasets': an
``idx`` column (the row number) and a label of 10 classes of unequal frequency."""

from __future__ import annotations

import numpy as np
from datasets import Dataset

ROWS = 3000
FREQUENCIES = np.linspace(1.0, 3.0, 10) / np.linspace(1.0, 3.0, 10).sum()


def labelled(labels=None) -> Dataset:
    """``labels`` (default: :data:`ROWS` drawn with :data:`FREQUENCIES`, seed 5) with ``idx``."""
    if labels is None:
        labels = np.random.default_rng(5).choice(10, ROWS, p=FREQUENCIES)
    return Dataset.from_dict({"idx": np.arange(len(labels)), "label": labels})


def rows(part: Dataset) -> list[int]:
    """A partition's ``idx`` values, in its order."""
    return part.with_format("arrow")[:].column("idx").to_pylist()


def assign(cls, data: Dataset, **kwargs):
    """``cls(**kwargs)`` given ``data``, all partitions assigned (``load_partition(0)``):
    (the partitioner, the warnings it issued as (category, message), the ValueError or None)."""
    import warnings

    partitioner = cls(**kwargs)
    partitioner.dataset = data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            partitioner.load_partition(0)
            error = None
        except ValueError as e:
            error = e
    return partitioner, [(w.category, str(w.message)) for w in caught], error
