"""What a run is given: its resolved configuration, chosen options and folder; the keys fedsim
reads itself (``sim``, the top level, ``checkpoint``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim import registry

SIM_KEYS = {
    "aggregation_error",
    "device",
    "round_timeout",
    "num_clients",
    "clients_per_round",
    "min_clients",
    "rounds",
    "local_steps",
    "batch_size",
    "lr",
    "seed",
    "keep_optimizer_state",
    "eval_clients",
    "eval_every",
    "eval_examples",
    "client_test_fraction",
    "validation_fraction",
    "prox_mu",
    "deadline",
    "over_selection",
    "async_buffer",
    "concurrency",
    "staleness_exponent",
}
#: ``sim`` keys a configuration may lack (saved before they existed), with the value that
#: changes nothing; a resumed run compares configurations without them at that value
SIM_OPTIONAL = {
    "prox_mu": 0.0,
    "deadline": None,
    "over_selection": 0.0,
    "async_buffer": 0,
    "concurrency": None,
    "staleness_exponent": 0.5,
    "eval_every": 1,
    "eval_examples": "all",
}
#: the top-level keys: every config group (fedsim.registry) and the run's settings
TOP_KEYS = {*registry.names(), *registry.SETTINGS}
CHECKPOINT_KEYS = {"every", "keep"}
#: keys a resumed run may change: they do not change what the run computes
RESUME_FREE = ("resume", "quiet", "checkpoint", "estimate")


@dataclass
class RunSpec:
    """Everything a run needs: the resolved config, the chosen options, where to write."""

    cfg: dict[str, Any]
    choices: dict[str, str]
    output_dir: Path
    quiet: bool = False
    #: a checkpoint to continue from (``resume``); None: start at round 0
    resume: Path | None = None
