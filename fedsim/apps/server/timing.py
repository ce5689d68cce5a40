"""The simulated clock wired to a run (``system``; :mod:`fedsim.system.clock`)."""

from __future__ import annotations

from typing import Any

from fedsim.system import Clock, flops_per_example


def build_clock(c, model, device) -> Clock | None:
    """The run's clock (None with ``system=none``): the profiles bound to the federation and
    the task's FLOPs per example counted on the server's model."""
    system, sim = c.system, c.sim
    if not system.active:
        return None
    system.bind(sim["num_clients"], sim["seed"])
    batch_size = c.strategy.client_batch_size(sim["batch_size"])
    clock = Clock(
        system,
        flops_per_example(c.task, model, batch_size, device),
        sim["local_steps"],
        batch_size,
        sim["clients_per_round"],
        deadline=sim.get("deadline"),
        over_selection=float(sim.get("over_selection") or 0.0),
    )
    return clock


def attach(clock: Clock | None, sampler) -> None:
    """Sampling takes only online clients, over-selected."""
    if clock is not None:
        sampler.pool, sampler.sample_size = clock.pool, clock.sample_size


def buffered(run):
    """FedBuff's server steps when ``sim.async_buffer`` > 0 (None: synchronous rounds). Its
    clients stay in flight across steps, which a checkpoint does not hold: none are written."""
    if not run.sim.get("async_buffer"):
        return None
    from fedsim.apps.server.buffered import BufferedRounds

    run.checkpoints.can_save = False
    run.checkpoints.why_not = "FedBuff keeps clients in flight across server steps"
    return BufferedRounds(run)


def round_zero(clock: Clock | None) -> dict[str, Any]:
    """Round 0's clock fields: the set-up round's time (0 without one)."""
    if clock is None:
        return {}
    return {"sim_time_s": clock.now, "round_sim_time_s": clock.now, "client_sim_time_s": None}


def settle(clock: Clock | None, sent, replies, good, failures, transport):
    """A round's replies on the clock, which drops what arrives offline, late or beyond k:
    ``(good, failures, clock fields)``."""
    if clock is None:
        return good, failures, {}
    good, failures, fields = clock.settle(sent, replies, good, failures, transport.client_of)
    return good, failures, {"sim_time_s": clock.now, **fields}


def state(clock: Clock | None) -> dict[str, Any]:
    """The checkpoint tree's clock (none without one: the tree stays as before)."""
    return {} if clock is None else {"clock": clock.state_dict()}


def restore(clock: Clock | None, tree: dict[str, Any]) -> None:
    if clock is not None:
        clock.load_state_dict(tree["clock"])


def summary(run) -> dict[str, Any]:
    """summary.json's clock fields (none without a clock: such runs keep their summary)."""
    clock = run.clock
    if clock is None:
        return {}
    return {
        "system": {
            **clock.system.describe(),
            "flops_per_example": clock.flops_per_example,
            "flops_counted": "forward + backward of the first batch of the test set "
            "(torch.utils.flop_counter: matrix products, convolutions, attention)",
            "deadline": clock.deadline,
            "over_selection": clock.over_selection,
        },
        "sim_time_s": clock.now,
        "time_to_accuracy": clock.time_to_accuracy(),
    }
