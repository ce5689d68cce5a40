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
