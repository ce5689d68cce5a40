"""The server's side of the adapter's data-driven initialisation, wired to its run."""

from __future__ import annotations

from typing import Any

from fedsim.adapters.data_init import InitRun
from fedsim.errors import RunFailed
from fedsim.init import Setup, SetupFailed, set_up


def initialize_adapter(run) -> dict[str, Any]:
    """Set ``run``'s adapter up (:mod:`fedsim.init`: from the server split or a set-up round of
    clients); returns round 0's bookkeeping. The frozen factors then go to the diagnostic and,
    when they come from data, to the chain that sends them."""
    c, sim, fed = run.c, run.sim, run.federation
    setup = Setup(
        model=run.model,
        spec=run.adapter_spec,
        task=c.task,
        device=run.device,
        run=InitRun(sim["lr"], c.schedule, c.total_local_steps),
        privacy=c.privacy,
        num_clients=sim["num_clients"],
        clients_per_round=sim["clients_per_round"],
        seed=sim["seed"],
        node_of=fed.ctx.node_of,
        exchange=lambda sent, reason: _timed(
            run, sent, run.transport.send(sent, _rejecting(reason))
        ),
        central=run.central,
        client_of_reply=run.transport.client_of_reply,
    )
    init = c.adapter.data_init
    if init is not None and init.source == "clients":
        setup.clients = fed.train_clients(0)  # central DP: Poisson at rate q
    try:
        result = set_up(c.adapter, setup)
    except SetupFailed as e:
        raise RunFailed(str(e)) from None
    run.ledger.epsilons.update(result.epsilons)
    run.ledger.adapter_init = result.info
    frozen_from_model(run)
    return result.record


def _timed(run, sent, out):
    """The set-up round's exchange, on the clock (when the run has one)."""
    if run.clock is not None:
        run.clock.setup_round(sent, out[0], run.transport.client_of)
    return out


def _rejecting(reason):
    """A screening check from a function that says why a reply is refused."""

    def check(client, reply):
        why = reason(reply)
        return None if why is None else ("rejected", why)

    return check


def frozen_from_model(run, record: bool = True) -> None:
    """The adapter's frozen factors as the server's model holds them: the diagnostic's input,
    and (``record``) what the chain sends clients when they come from data."""
    run.federation.frozen = run.adapter_spec.frozen_state(run.model)
    frozen = run.uplink.get("frozen")
    if record and frozen is not None:
        frozen.record(run.model)
