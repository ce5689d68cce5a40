"""fedsim's Flower ServerApp: the round loop around a strategy and its uplink chain.

* :mod:`.run`: the round loop (:class:`FederatedRun`);
* :mod:`.transport`: delivering messages over the engine's grid and screening the replies;
* :mod:`.ledger`: the running totals (bytes, failures, epsilons) and the last metrics line;
* :mod:`.state`: the server's state in one object, and the checkpoints that save it;
* :mod:`.report`: ``summary.json``, the PEFT export and the closing line.
"""

from __future__ import annotations

import logging
import threading

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsim.apps.server.run import FederatedRun
from fedsim.config import RunSpec
from fedsim.errors import RunFailed

__all__ = ["FederatedRun", "RunFailed", "app", "make_server_app"]


def make_server_app(spec: RunSpec | None = None, abort: threading.Event | None = None) -> ServerApp:
    """A ServerApp for ``spec``; ``None``: the config comes from the run_config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        run_spec = spec
        if run_spec is None:
            from fedsim.flwr_run import spec_from_run_config

            run_spec = spec_from_run_config(context.run_config)
        FederatedRun(run_spec, grid, abort).run()

    return app


#: the ServerApp that ``flwr run .`` loads (pyproject ``[tool.flwr.app.components]``)
app = make_server_app()
