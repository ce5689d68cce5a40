"""``task.pool=on_demand``: synthetic examples made from their index (fedsim.tasks.counter_rng),
checked against a plain-Python SplitMix64 and the published reference outputs, and against the
distribution the stored pool draws from."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim.tasks import counter_rng
from fedsim.tasks.synthetic import SyntheticTask

MASK = (1 << 64) - 1


def splitmix64(state: int) -> tuple[int, int]:
    """Vigna's splitmix64.c, one step, on Python integers: (new state, output)."""
    state = (state + 0x9E3779B97F4A7C15) & MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return state, z ^ (z >> 31)


def test_reference_outputs_of_splitmix64():
    """Draws 0, 1, 2 of stream 0 are SplitMix64's first outputs from state 0 (the values of
    the reference implementation), and any key matches the plain-Python version."""
    state, outputs = 0, []
    for _ in range(3):
        state, out = splitmix64(state)
        outputs.append(out)
    assert outputs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    for key in (0, 12345, counter_rng.stream_key(7, 2, 2)):
        counters = np.array([0, 1, 2, 999, 2**40 + 3], dtype=np.uint64)
        state_of = [(key + int(c) * 0x9E3779B97F4A7C15) & MASK for c in counters]
        expected = [(splitmix64(s)[1] >> 11) / 2**53 for s in state_of]
        assert counter_rng.uniform(key, counters).tolist() == expected


def test_normal_is_box_muller_of_two_uniforms_and_addressed_by_row():
    key, width = counter_rng.stream_key(3, 2, 2), 5
    rows = np.array([4, 0, 10**9])
    z = counter_rng.normal(key, rows, width)
    for i, row in enumerate(rows):
        for j in range(width):
            c = int(row) * width + j
            u1, u2 = counter_rng.uniform(key, np.array([2 * c, 2 * c + 1]))
            assert z[i, j] == pytest.approx(
                math.sqrt(-2 * math.log(1 - u1)) * math.cos(2 * math.pi * u2), rel=1e-12
            )
    # a row is the same whichever rows it is asked with
    assert np.array_equal(counter_rng.normal(key, np.array([10**9]), width)[0], z[2])


def test_draws_have_the_right_moments():
    z = counter_rng.normal(counter_rng.stream_key(0), np.arange(50_000), 8).ravel()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs((z**4).mean() - 3) < 0.05  # kurtosis of a normal
    labels = counter_rng.integers(counter_rng.stream_key(1), 0, 200_000, 10, chunk=30_000)
    assert labels.dtype == np.uint8
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > 19_000 and counts.max() < 21_000
    # chunking does not change the draws
    assert np.array_equal(
        labels[:1000], counter_rng.integers(counter_rng.stream_key(1), 0, 1000, 10)
    )


def test_on_demand_pool_keeps_only_labels_and_makes_the_same_examples_again():
    task = SyntheticTask(num_clients=50, pool="on_demand", seed=4)
    labels = task.pool_labels()
    assert labels.dtype == np.uint8 and labels.nbytes == 50 * 256
    a = task.pool_examples(np.array([5, 900, 3]), client=0)
    b = task.pool_examples(np.array([900]), client=1)
    assert torch.equal(a["x"][1], b["x"][0]) and a["x"].dtype == torch.float32
    assert a["label"].tolist() == labels[[5, 900, 3]].tolist()
    assert task._data is None  # the stored pool was never drawn


def test_on_demand_pool_has_the_stored_pools_distribution():
    """Class means ``U m_k`` and unit noise around them, as the stored pool: the per-class mean
    of each pool agrees with the exact mean to sampling error."""
    stored = SyntheticTask(num_clients=40, seed=2)
    lazy = SyntheticTask(num_clients=40, seed=2, pool="on_demand")
    exact = stored._means() @ stored._subspace().T  # num_classes x input_dim
    rows = np.arange(40 * 256)
    for task in (stored, lazy):
        batch = task.pool_examples(rows, client=0)
        for k in range(task.num_classes):
            xs = batch["x"][batch["label"] == k]
            err = (xs.mean(0) - exact[k]).abs().max().item()
            assert err < 5 / math.sqrt(len(xs)), (task.pool, k, err)
            noise = xs - exact[k]
            assert abs(noise.std().item() - 1) < 0.05
    test = lazy.test_set()
    assert len(test["label"]) == lazy.test_examples
    assert torch.equal(test["x"], lazy.test_set()["x"])


def test_unknown_pool_is_refused():
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match="task.pool=lazy: must be one of stored, on_demand"):
        SyntheticTask(num_clients=2, pool="lazy")


def _data(partitioner_cls, num_clients=20, pool="on_demand"):
    from fedsim.data import FederatedData

    task = SyntheticTask(num_clients=num_clients, examples_per_client=40, pool=pool, seed=1)
    part = partitioner_cls(
        num_partitions=num_clients, partition_by="label", alpha=0.5, min_partition_size=5, seed=1
    )
    return FederatedData(task, part, test_fraction=0.25, seed=1)


def test_fedsims_partitioner_gives_clients_flwr_datasets_would():
    """The same clients' splits through fedsim's index arrays as through flwr-datasets'
    datasets (and fedsim's never reads a partition back as a dataset)."""
    from flwr_datasets.partitioner import DirichletPartitioner as Flwr

    from fedsim.partitioners import DirichletPartitioner

    ours, theirs = _data(DirichletPartitioner), _data(Flwr)
    ours.check(20)
    theirs.check(20)
    ours.partitioner.load_partition = None  # the fast path must not need it
    for c in range(20):
        a, b = ours.client(c), theirs.client(c)
        assert ours.num_train(c) == theirs.num_train(c)
        for split in ("train", "test"):
            for key in getattr(a, split):
                assert torch.equal(getattr(a, split)[key], getattr(b, split)[key])


def test_client_splits_are_kept_for_the_most_recent_clients_only(monkeypatch):
    import fedsim.data
    from fedsim.partitioners import DirichletPartitioner

    monkeypatch.setattr(fedsim.data, "CACHED_CLIENTS", 4)
    data = _data(DirichletPartitioner)
    first = data.client(0).train["x"].clone()
    for c in range(1, 10):
        data.client(c)
    assert len(data._cache) == 4 and 0 not in data._cache
    assert torch.equal(data.client(0).train["x"], first)  # made again, the same


def test_a_run_on_an_on_demand_pool_learns(tmp_path):
    from fedsim.api import run

    summary = run(
        ["task=synthetic", "task.pool=on_demand", "strategy=fedavg", "sim.rounds=5"],
        output_dir=tmp_path / "run",
    )
    # chance is 0.1; measured: 0.8965 on demand, 0.891 with the stored pool (same settings)
    assert summary["final_eval_accuracy"] > 0.8, summary
