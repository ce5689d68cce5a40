"""How many torch threads a run trains with (``engine.num_threads``).

``auto`` (the default of the inline and batched engines) gives a model above
:data:`AUTO_ABOVE` parameters every CPU this process may use, and a smaller model one thread.
Measured on the project's 2-core machine (``python benchmarks/engines.py --sentiment``): for
MiniLM (22.7M parameters) two threads make a round about 1.5x faster than one; for the
synthetic task's 39k-parameter MLP one thread is the fastest (its operations are too small to
split, and the threads only wait on each other). Between those sizes it has not been measured.
The jobs of a sweep that run at once (``hydra/launcher=joblib``) share the CPUs.
Threads change the order of a few floating-point sums inside PyTorch's kernels, so a run on
two threads agrees with the same run on one to about 1e-7, not to the bit: give a number to
pin it.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from fedsim.errors import ConfigError
from fedsim.validate import integer

#: parameters above which ``auto`` uses every usable CPU
AUTO_ABOVE = 1_000_000
AUTO = "auto"
#: environment variable: the jobs of a sweep that run at once on this machine (Hydra's joblib
#: launcher's ``n_jobs``); ``auto`` then shares the CPUs among them
PARALLEL_JOBS = "FEDSIM_PARALLEL_JOBS"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def setting(value: Any) -> int | Literal["auto"]:
    """``engine.num_threads``: ``auto`` or an integer >= 1 (a ConfigError otherwise)."""
    if value == AUTO:
        return AUTO
    try:
        return integer("engine.num_threads", value, low=1)
    except ConfigError:
        raise ConfigError("engine.num_threads", value, "must be an integer >= 1 or auto") from None


def check(value: int | Literal["auto"]) -> None:
    """More torch threads than CPUs only oversubscribe them (and OpenMP gives up allocating
    100,000 threads' stacks after the run folder exists): refuse before anything starts."""
    cpus = usable_cpus()
    if value != AUTO and value > cpus:
        raise ConfigError(
            "engine.num_threads",
            value,
            f"must be at most the {cpus} CPUs this machine lets fedsim use",
        )


def resolve(value: int | Literal["auto"], model: Any) -> int:
    """The threads for ``model``: ``value``, or for ``auto`` every usable CPU when the model
    has more than :data:`AUTO_ABOVE` parameters (shared among a sweep's parallel jobs), else 1."""
    if value != AUTO:
        return int(value)
    size = sum(p.numel() for p in model.parameters())
    if size <= AUTO_ABOVE:
        return 1
    return max(1, usable_cpus() // max(1, int(os.environ.get(PARALLEL_JOBS, "1"))))


def apply(value: int | Literal["auto"] | None, model: Any) -> None:
    """Set torch's intra-op threads for ``model`` (``None``: an engine without the setting)."""
    if value is None:
        return
    import torch

    torch.set_num_threads(resolve(value, model))
