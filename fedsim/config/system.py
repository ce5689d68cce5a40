"""What the simulated clock (``system``, ``sim.deadline``, ``sim.over_selection``) cannot run
with, one line each."""

from __future__ import annotations

from fedsim.errors import ConfigError
from fedsim.validate import integer, number


def check_system(components) -> None:
    """``sim.deadline`` and ``sim.over_selection`` need a clock; a clock's profiles must cover
    the federation; what its sampling or deadline would make wrong is refused."""
    sim, system = components.sim, components.system
    deadline, over = sim.get("deadline"), sim.get("over_selection", 0.0)
    k = _sim_keys(sim)
    if not system.active:
        for key, value, off in (
            ("deadline", deadline, None),
            ("over_selection", over, 0.0),
            ("async_buffer", k, 0),
        ):
            if value != off:
                raise ConfigError(
                    f"sim.{key}",
                    value,
                    "needs a simulated clock: choose system=mobile, datacenter, tiers or trace",
                )
        return
    system.bind(sim["num_clients"], sim["seed"])  # a trace must cover every client
    faults, strategy, privacy = components.faults, components.strategy, components.privacy
    if faults.deadline is not None:
        raise ConfigError(
            "faults.deadline",
            faults.deadline,
            f"with system={system.name} the clock times each client's whole round (a "
            "straggler's delay included): use faults.deadline=null "
            f"sim.deadline={faults.deadline:g}",
        )
    if strategy.name == "Centralized":
        raise ConfigError(
            "system",
            system.name,
            "strategy=centralized trains one model on the pooled data (a reference, no "
            "clients to time): use system=none",
        )
    if privacy.central and (system.has_availability or over):
        what = "sim.over_selection" if over else f"system={system.name}'s availability"
        raise ConfigError(
            "privacy",
            "central",
            f"its accountant assumes Poisson sampling of every client at rate k/N; {what} "
            "samples otherwise: use privacy=dpsgd, or a system without offline periods "
            "(system.offline_s=0) and sim.over_selection=0",
        )
    if k:
        check_buffered(components, k)


def _sim_keys(sim) -> int:
    """The clock's ``sim`` keys in range; returns ``sim.async_buffer``."""
    deadline, over = sim.get("deadline"), sim.get("over_selection", 0.0)
    if deadline is not None:
        number("sim.deadline", deadline, low=0, low_open=True)
    number("sim.over_selection", over, 0, 10)
    k = integer("sim.async_buffer", sim.get("async_buffer", 0), low=0)
    if sim.get("concurrency") is not None:
        integer("sim.concurrency", sim["concurrency"], 1, sim["num_clients"], "sim.num_clients")
    number("sim.staleness_exponent", sim.get("staleness_exponent", 0.5), 0, 10)
    if sim.get("concurrency") is not None and not k:
        raise ConfigError(
            "sim.concurrency",
            sim["concurrency"],
            "is FedBuff's number of clients training at once on the simulated clock (it does "
            "not parallelise anything: see engine); set sim.async_buffer=K with a system "
            "profile, or leave it null",
        )
    return k


def check_buffered(components, k: int) -> None:
    """What FedBuff's server steps (``sim.async_buffer``) cannot run with, one line each."""
    sim, strategy = components.sim, components.strategy
    key = "sim.async_buffer"
    integer(key, k, 1, sim["num_clients"], "sim.num_clients")  # one update per client a step
    for name, off in (("deadline", None), ("over_selection", 0.0)):
        if sim.get(name, off) != off:
            raise ConfigError(
                f"sim.{name}",
                sim[name],
                f"applies to synchronous rounds; with {key}={k} (FedBuff) there are none: set "
                f"it to {'null' if off is None else off}",
            )
    steady = strategy.communicates and not strategy.folds_into_base
    steady = steady and strategy.persistent_parameters and not strategy.heterogeneous_ranks
    if not steady:
        raise ConfigError(
            "strategy",
            strategy.name,
            f"{key}={k} (FedBuff) rebases each update onto the newer global arrays, which needs "
            "a strategy that averages the same arrays every step: use fedavg, fedsa, fedsb or ffa",
        )
    feedback = components.feedback
    if components.compresses and feedback.replaces_aggregation and sim["staleness_exponent"]:
        raise ConfigError(
            "sim.staleness_exponent",
            sim["staleness_exponent"],
            f"feedback={feedback.name}'s server step moves the model by its running mean of "
            "every client's state, not by the buffered updates, so there is no update to "
            "weight by staleness: set sim.staleness_exponent=0 or use feedback=ef14 or naive",
        )
    stages = {
        "downlink": (components.downlink.active, "the clients' copy w of EF21-P"),
        "control": (components.control.active, "SCAFFOLD's variates"),
        "privacy=central": (components.privacy.central, "its noise and accountant"),
        "faults.byzantine_fraction": (
            components.faults.byzantine is not None,
            "the attacks' view of the honest updates",
        ),
    }
    for what, (on, state) in stages.items():
        if on:
            raise ConfigError(
                key,
                k,
                f"FedBuff aggregates updates trained from older global arrays, and {state} "
                f"assumes a synchronous round (all from the same arrays): turn {what} off or "
                "use sim.async_buffer=0",
            )
    if components.cfg.get("resume", False) is not False:
        raise ConfigError(
            "resume",
            components.cfg["resume"],
            f"{key}={k} keeps clients in flight across server steps, which no checkpoint holds: "
            "FedBuff runs are not checkpointed",
        )
