"""The inline Grid: copies like a transport, keeps one Context per node, reports client errors."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from fedsim import keys
from fedsim.engines.inline import InlineGrid
from fedsim.records import array_record, numpy_dict


def _app():
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if msg.content[keys.CONFIG]["crash"]:
            raise RuntimeError("client exploded")
        calls = context.state.get("calls", ConfigRecord({"n": 0}))
        context.state["calls"] = ConfigRecord({"n": int(calls["n"]) + 1})
        arrays = numpy_dict(msg.content[keys.ARRAYS])
        arrays["w"] += 1  # mutate the received copy
        out = RecordDict(
            {
                keys.ARRAYS: array_record(arrays),
                keys.CONFIG: ConfigRecord(
                    {"calls": int(calls["n"]) + 1, "pid": context.node_config[keys.PARTITION_ID]}
                ),
            }
        )
        return Message(out, reply_to=msg)

    return app


def _send(grid, node, crash=False):
    content = RecordDict(
        {
            keys.ARRAYS: array_record({"w": np.zeros(2, np.float32)}),
            keys.CONFIG: ConfigRecord({"crash": crash}),
        }
    )
    msg = Message(content, dst_node_id=node, message_type=MessageType.TRAIN)
    return content, list(grid.send_and_receive([msg]))[0]


def test_copies_context_persistence_and_errors():
    grid = InlineGrid(_app(), num_nodes=3, seed=0)
    nodes = sorted(grid.get_node_ids())
    assert len(nodes) == 3 and all(n > 1 for n in nodes)
    pids = {}
    for node in nodes:
        sent, reply = _send(grid, node)
        np.testing.assert_array_equal(sent[keys.ARRAYS]["w"].numpy(), [0, 0])  # server copy intact
        np.testing.assert_array_equal(reply.content[keys.ARRAYS]["w"].numpy(), [1, 1])
        assert reply.metadata.src_node_id == node
        pids[node] = reply.content[keys.CONFIG]["pid"]
    assert sorted(pids.values()) == [0, 1, 2]
    _, again = _send(grid, nodes[0])
    assert again.content[keys.CONFIG]["calls"] == 2  # Context.state persisted
    _, crashed = _send(grid, nodes[1], crash=True)
    assert crashed.has_error() and "client exploded" in crashed.error.reason


def test_node_ids_are_seeded():
    a = sorted(InlineGrid(_app(), 5, seed=1).get_node_ids())
    b = sorted(InlineGrid(_app(), 5, seed=1).get_node_ids())
    c = sorted(InlineGrid(_app(), 5, seed=2).get_node_ids())
    assert a == b and a != c


def test_fast_array_decoding_equals_flower_numpy():
    from flwr.app import Array

    from fedsim.records import array_numpy

    rng = np.random.default_rng(0)
    cases = [
        rng.standard_normal((3, 4)).astype(np.float32),
        rng.standard_normal(5).astype(np.float64),
        np.arange(7, dtype=np.uint8),
        np.asfortranarray(rng.standard_normal((3, 2))),  # falls back to Flower's decoder
        np.array(2.5, dtype=np.float32),
        rng.standard_normal((2, 3)).astype(">f4"),  # big-endian: falls back too
    ]
    for value in cases:
        arr = Array(value)
        got = array_numpy(arr)
        want = arr.numpy()
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        got[...] = 0  # writable, and a copy
        np.testing.assert_array_equal(arr.numpy(), want)


def test_fast_array_encoding_is_byte_identical_to_flower():
    import torch
    from flwr.app import Array

    from fedsim.records import to_array

    rng = np.random.default_rng(1)
    for value in [
        rng.standard_normal((4, 3)).astype(np.float32),
        np.arange(5, dtype=np.int64),
        np.array(1.5),
        np.zeros((0, 3), np.float32),
    ]:
        fast, ref = to_array(value), Array(value)
        assert (fast.dtype, tuple(fast.shape), fast.stype, fast.data) == (
            ref.dtype,
            tuple(ref.shape),
            ref.stype,
            ref.data,
        )
    t = torch.randn(2, 3)
    assert to_array(t).data == Array(t.numpy()).data


def test_transport_copy_is_independent_and_equal():
    from flwr.app import Array, Error, MetricRecord

    from fedsim.engines.inline import transport_copy

    content = RecordDict(
        {
            keys.ARRAYS: array_record({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}),
            keys.CONFIG: ConfigRecord({"round": 3, "names": ["a", "b"]}),
            keys.METRICS: MetricRecord({"loss": 0.5, "hist": [1.0, 2.0]}),
        }
    )
    msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN, group_id="3")
    copied = transport_copy(msg)
    assert copied is not msg and copied.content is not msg.content
    assert copied.metadata.dst_node_id == 7 and copied.metadata.group_id == "3"
    np.testing.assert_array_equal(
        copied.content[keys.ARRAYS]["w"].numpy(), msg.content[keys.ARRAYS]["w"].numpy()
    )
    assert dict(copied.content[keys.CONFIG]) == dict(content[keys.CONFIG])
    assert dict(copied.content[keys.METRICS]) == dict(content[keys.METRICS])
    # mutating the copy leaves the original untouched
    copied.content[keys.ARRAYS]["w"] = Array(np.zeros(1))
    copied.content[keys.CONFIG]["names"].append("c")
    copied.content[keys.METRICS]["hist"][0] = 9.0
    copied.metadata.__dict__["_message_id"] = "changed"
    assert msg.content[keys.ARRAYS]["w"].shape == (2, 3)
    assert msg.content[keys.CONFIG]["names"] == ["a", "b"]
    assert msg.content[keys.METRICS]["hist"] == [1.0, 2.0]
    assert msg.metadata.message_id == ""
    msg.metadata.__dict__["_message_id"] = "m1"
    err = transport_copy(Message(Error(code=2, reason="x"), reply_to=msg))
    assert err.has_error() and err.error.reason == "x"
