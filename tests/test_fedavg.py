"""FedAvg (FedIT) against numbers computed by hand, from fake client replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedsim import keys
from fedsim.adapters import AdapterSpec
from fedsim.errors import RunFailed
from fedsim.records import array_record, numpy_dict
from fedsim.strategy import ClientSampler, ClientUpdate, Federation, StrategyContext, weighted_mean
from fedsim.uplink import Uplink
from strategies.fedavg import FedAvg

NODE = {0: 101, 1: 102, 2: 103}  # partition id -> node id


def make_strategy(weighted=True) -> Federation:
    """FedAvg as the server runs it: inside a chain (empty here: nothing compresses)."""
    spec = AdapterSpec(trained=["a", "b"], sent=["a", "b"])
    ctx = StrategyContext(ClientSampler(3, 3, seed=0), NODE, spec, seed=0)
    return Federation(FedAvg(weighted=weighted), Uplink([]), ctx)


def mock_reply(instruction: Message, arrays: dict, num_examples: int, loss: float) -> Message:
    content = RecordDict(
        {
            keys.ARRAYS: array_record(arrays),
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: num_examples, keys.TRAIN_LOSS: loss}),
        }
    )
    return Message(content, reply_to=instruction)


@pytest.fixture
def rounds_messages():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # as a ServerApp has
    strategy = make_strategy()
    current = array_record({"a": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)})
    msgs = list(strategy.configure_train(1, current, ConfigRecord(), grid=None))
    return strategy, msgs


def test_weighted_average_by_hand(rounds_messages):
    # Prepare: three clients with 10, 30 and 60 examples
    strategy, msgs = rounds_messages
    assert [m.metadata.dst_node_id for m in msgs] == [101, 102, 103]
    assert [m.metadata.message_type for m in msgs] == [MessageType.TRAIN] * 3
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"id{i}"
    a = [
        np.array([[1, 2], [3, 4]], np.float32),
        np.array([[5, 6], [7, 8]], np.float32),
        np.array([[0, 0], [1, 1]], np.float32),
    ]
    b = [
        np.array([1, 1, 1], np.float32),
        np.array([2, 0, 2], np.float32),
        np.array([0, 10, 0], np.float32),
    ]
    replies = [
        mock_reply(m, {"a": a[i], "b": b[i]}, n, loss)
        for i, (m, n, loss) in enumerate(zip(msgs, [10, 30, 60], [1.0, 2.0, 0.5]))
    ]
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    got = numpy_dict(arrays)
    # Assert: 0.1 * a1 + 0.3 * a2 + 0.6 * a3, worked out by hand
    np.testing.assert_allclose(got["a"], [[1.6, 2.0], [3.0, 3.4]], rtol=1e-6)
    np.testing.assert_allclose(got["b"], [0.7, 6.1, 0.7], rtol=1e-6)
    assert got["a"].dtype == np.float32
    assert metrics[keys.TRAIN_LOSS] == pytest.approx(0.1 * 1.0 + 0.3 * 2.0 + 0.6 * 0.5)


def test_unweighted_average_by_hand():
    strategy = make_strategy(weighted=False)
    updates = [
        ClientUpdate(0, {"a": np.array([3.0], np.float32)}, 1, {}),
        ClientUpdate(1, {"a": np.array([6.0], np.float32)}, 1000, {}),
    ]
    assert strategy.strategy.aggregate(1, {}, updates)["a"] == pytest.approx([4.5])


def test_error_replies_are_skipped(rounds_messages):
    from flwr.app import Error

    strategy, msgs = rounds_messages
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"id{i}"
    good = mock_reply(
        msgs[0], {"a": np.ones((2, 2), np.float32), "b": np.ones(3, np.float32)}, 5, 1.0
    )
    bad = Message(Error(code=2, reason="boom"), reply_to=msgs[1])
    arrays, _ = strategy.aggregate_train(1, [good, bad])
    np.testing.assert_array_equal(numpy_dict(arrays)["a"], np.ones((2, 2)))


def test_weighted_mean_accumulates_in_float64():
    big = np.array([1e8], np.float32)
    tiny = np.array([1.0], np.float32)
    out = weighted_mean([{"x": big}, {"x": tiny}, {"x": -big}], [1.0, 1.0, 1.0])
    assert out["x"][0] == 1.0  # float32 accumulation would lose the 1
    assert out["x"].dtype == np.float64  # cast to the global dtype after the diagnostic


def test_sampler_is_seeded_and_samples_without_replacement():
    s = ClientSampler(num_clients=100, clients_per_round=10, seed=3)
    assert s.train_clients(1) == s.train_clients(1)
    assert s.train_clients(1) != s.train_clients(2)
    assert len(set(s.train_clients(1))) == 10
    assert ClientSampler(100, 10, seed=4).train_clients(1) != s.train_clients(1)
    assert ClientSampler(5, 5, seed=0).train_clients(7) == [0, 1, 2, 3, 4]
    assert ClientSampler(5, 5, seed=0, eval_clients=0).evaluate_clients(1) == []


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda out: {k: v for k, v in out.items() if k != "b"}, "other array names"),
        (lambda out: {**out, "a": out["a"].astype(np.int32)}, "as int32"),
        (
            lambda out: {**out, "a": out["a"].reshape(-1)},
            "a with shape \\[4\\]; the global array has shape \\[2, 2\\]",
        ),
    ],
)
def test_an_aggregate_that_changes_the_global_arrays_is_an_error(rounds_messages, mutate, message):
    strategy, msgs = rounds_messages
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"id{i}"
    arrays = {"a": np.ones((2, 2), np.float32), "b": np.ones(3, np.float32)}
    reply = mock_reply(msgs[0], arrays, 5, 1.0)
    inner, original = strategy.strategy, FedAvg.aggregate
    inner.aggregate = lambda r, cur, ups: mutate(original(inner, r, cur, ups))
    with pytest.raises(RunFailed, match=message):
        strategy.aggregate_train(1, [reply])
