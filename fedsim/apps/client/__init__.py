"""fedsim's Flower ClientApp: ``query``, ``train`` (and the set-up round's ``train.init``) and
``evaluate`` handlers over a per-process :class:`~fedsim.apps.client.runtime.ClientRuntime`.

* :mod:`.runtime`: receive, train, send through the chain; evaluate; set-up statistics;
* :mod:`.dp`: a client's DP-SGD settings and accountant;
* :mod:`.grouped`: the batched engine's path (a group of clients trained together).
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsim import keys
from fedsim.apps.client.runtime import ClientRuntime, TrainJob, runtime_for, state_bytes
from fedsim.faults import InjectedCrash

__all__ = [
    "ClientRuntime",
    "InjectedCrash",
    "TrainJob",
    "app",
    "make_client_app",
    "runtime_for",
    "state_bytes",
]


def make_client_app(cfg: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp for ``cfg``; ``None``: the config comes from the run_config (``flwr run``)."""
    app = ClientApp()

    def rt(context: Context) -> ClientRuntime:
        if cfg is not None:
            return runtime_for(cfg)
        from fedsim.flwr_run import config_from_run_config

        return runtime_for(config_from_run_config(context.run_config)[0])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        # Answered without building anything: the server maps partition ids to node ids.
        client = int(context.node_config[keys.PARTITION_ID])
        info = ConfigRecord({keys.PARTITION_ID: client})
        return Message(RecordDict({keys.CONFIG: info}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return rt(context).train(msg, context)

    @app.train(keys.ACTION_INIT)
    def init_statistics(msg: Message, context: Context) -> Message:
        return rt(context).init_statistics(msg, context)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return rt(context).evaluate(msg, context)

    return app


#: the ClientApp that ``flwr run .`` loads (pyproject ``[tool.flwr.app.components]``)
app = make_client_app()
