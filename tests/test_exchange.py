"""The server never waits forever: round timeouts and an engine that stops."""

from __future__ import annotations

import json
import threading

import pytest
from flwr.app import Context, RecordDict

from fedsim.apps import make_client_app, make_server_app
from fedsim.apps.server import RunFailed
from fedsim.config import RunSpec, check, compose
from fedsim.engines.inline import InlineGrid
from tests.conftest import tiny


class SilentGrid(InlineGrid):
    """Never delivers training messages to the clients in ``silent`` (a lost node)."""

    def __init__(self, *args, silent=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.silent = set(silent)

    def pull_messages(self, message_ids):
        keep = []
        for msg_id in message_ids:
            msg = self._pending.get(msg_id)
            if msg is not None and msg.metadata.message_type == "train":
                if self._partition_of[msg.metadata.dst_node_id] in self.silent:
                    continue  # stays pending: no reply, ever
            keep.append(msg_id)
        return super().pull_messages(keep)


def _run(tmp_path, overrides, silent, abort=None):
    cfg, choices = compose(tiny(*overrides))
    check(cfg)
    grid = SilentGrid(make_client_app(cfg), 4, seed=0, silent=silent)
    spec = RunSpec(cfg, choices, tmp_path / "run", quiet=True)
    make_server_app(spec, abort)(grid, Context(1, 1, {}, RecordDict(), {}))
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]


def test_a_client_that_never_replies_fails_after_the_round_timeout(tmp_path):
    rows = _run(tmp_path, ["sim.round_timeout=0.2"], silent={2})
    for row in rows[1:]:
        assert row["clients_ok"] == 3 and row["clients_failed"] == 1
        assert row["failures"] == [
            {"client": 2, "kind": "no_reply", "reason": "no reply within sim.round_timeout=0.2 s"}
        ]


def test_a_stopped_engine_ends_the_run_with_a_summary(tmp_path):
    abort = threading.Event()
    threading.Timer(0.3, abort.set).start()
    with pytest.raises(RunFailed, match="engine stopped"):
        _run(tmp_path, [], silent={1}, abort=abort)  # no timeout: only the abort ends the wait
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "engine stopped" in summary["error"]
