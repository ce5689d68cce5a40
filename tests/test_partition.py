"""Partitions through flwr-datasets are deterministic, disjoint and complete."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.build import build_components
from fedsim.config import compose
from tests.conftest import tiny


def _indices(*overrides: str) -> list[np.ndarray]:
    cfg, _ = compose(tiny(*overrides))
    c = build_components(cfg)
    return [c.data.indices(i) for i in range(cfg["sim"]["num_clients"])]


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "pathological"])
def test_partitions_are_deterministic_disjoint_and_complete(partition):
    first = _indices(f"partition={partition}")
    again = _indices(f"partition={partition}")
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    allidx = np.concatenate(first)
    assert len(allidx) == len(set(allidx.tolist()))  # disjoint
    if partition != "pathological":  # pathological may leave classes unassigned
        assert sorted(allidx.tolist()) == list(range(4 * 64))


def test_seed_changes_a_dirichlet_partition():
    a = _indices("partition=dirichlet", "sim.seed=1")
    b = _indices("partition=dirichlet", "sim.seed=2")
    assert any(len(x) != len(y) or not np.array_equal(x, y) for x, y in zip(a, b))


def test_dirichlet_gives_label_skew():
    """With alpha=0.1 clients' label distributions differ far more than under iid."""
    import numpy as np

    def spread(partition):
        cfg, _ = compose(tiny(partition, "sim.num_clients=5", "task.examples_per_client=200"))
        c = build_components(cfg)
        shares = []
        for i in range(5):
            labels = np.concatenate(
                [c.data.client(i).train["label"].numpy(), c.data.client(i).test["label"].numpy()]
            )
            shares.append(np.bincount(labels, minlength=10) / len(labels))
        return float(np.max(np.std(np.array(shares), axis=0)))

    skewed = spread("partition.alpha=0.1")
    assert skewed > 0.1 and skewed > 3 * spread("partition=iid")


def test_pathological_gives_two_classes_per_client():
    cfg, _ = compose(tiny("partition=pathological", "sim.num_clients=5"))
    c = build_components(cfg)
    for i in range(5):
        labels = c.data.client(i).train["label"]
        assert len(set(labels.tolist())) <= 2


def test_local_train_test_split_is_deterministic_and_disjoint():
    cfg, _ = compose(tiny())
    c1, c2 = build_components(cfg), build_components(cfg)
    d1, d2 = c1.data.client(2), c2.data.client(2)
    for k in d1.train:
        assert (d1.train[k] == d2.train[k]).all() and (d1.test[k] == d2.test[k]).all()
    n = len(c1.data.indices(2))
    assert d1.num_train + d1.num_test == n
    assert d1.num_test == round(0.2 * n)


def test_client_shift_offsets_inputs_per_client_and_not_the_test_set():
    base_cfg, _ = compose(tiny())
    shifted_cfg, _ = compose(tiny("task.client_shift=2.0"))
    base, shifted = build_components(base_cfg), build_components(shifted_cfg)
    for client in (0, 1):
        diff = shifted.data.client(client).train["x"] - base.data.client(client).train["x"]
        assert np.allclose(diff.numpy(), diff[0].numpy())  # the same offset for every example
        assert float(diff[0].norm()) > 1.0
        assert (
            shifted.data.client(client).train["label"] == base.data.client(client).train["label"]
        ).all()
    off0 = shifted.task.client_offset(0)
    off1 = shifted.task.client_offset(1)
    assert not np.allclose(off0.numpy(), off1.numpy())
    assert (shifted.task.test_set()["x"] == base.task.test_set()["x"]).all()


def test_a_partitioner_that_cannot_split_names_the_keys_to_change():
    from fedsim.errors import ComponentError

    cfg, _ = compose(tiny("partition=dirichlet", "partition.min_partition_size=100"))
    with pytest.raises(ComponentError) as info:
        build_components(cfg).data.check(cfg["sim"]["num_clients"])
    text = str(info.value)
    assert "Change partition.alpha (now 0.5; larger is less skewed)" in text
    assert "partition.min_partition_size (now 100)" in text
    assert "sim.num_clients (now 4 for 256 training examples)" in text
