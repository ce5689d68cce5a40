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
