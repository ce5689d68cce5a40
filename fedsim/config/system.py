"""What the simulated clock (``system``, ``sim.deadline``, ``sim.over_selection``) cannot run
with, one line each."""

from __future__ import annotations

from fedsim.errors import ConfigError
from fedsim.validate import number


def check_system(components) -> None:
    """``sim.deadline`` and ``sim.over_selection`` need a clock; a clock's profiles must cover
    the federation; what its sampling or deadline would make wrong is refused."""
    sim, system = components.sim, components.system
    deadline, over = sim.get("deadline"), sim.get("over_selection", 0.0)
    if deadline is not None:
        number("sim.deadline", deadline, low=0, low_open=True)
    number("sim.over_selection", over, 0, 10)
    if not system.active:
        for key, value, off in (("deadline", deadline, None), ("over_selection", over, 0.0)):
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
