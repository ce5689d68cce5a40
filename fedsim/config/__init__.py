"""Composing and validating run configurations, before anything runs.

Hydra's own error path prints a traceback-like report and exits with status 1, after it has
created the output folder. fedsim composes every job's configuration first (expanding a
``--multirun`` sweep into its jobs, :mod:`.compose`), validates it and builds its components
(:mod:`.checks`); any problem is one line naming the key, the value and what is allowed, and
the command exits with status 2 having written nothing.
"""

from fedsim.config.checks import check, validate
from fedsim.config.compose import (
    CONFIG_MODULE,
    CONFIG_NAME,
    Composed,
    compose,
    compose_job,
    config_search_path,
    expand_sweep,
    initialize_config_source,
    to_container,
)
from fedsim.config.spec import (
    CHECKPOINT_KEYS,
    RESUME_FREE,
    SIM_KEYS,
    SIM_OPTIONAL,
    TOP_KEYS,
    RunSpec,
)

__all__ = [
    "CHECKPOINT_KEYS",
    "CONFIG_MODULE",
    "CONFIG_NAME",
    "RESUME_FREE",
    "SIM_KEYS",
    "SIM_OPTIONAL",
    "TOP_KEYS",
    "Composed",
    "RunSpec",
    "check",
    "compose",
    "compose_job",
    "config_search_path",
    "expand_sweep",
    "initialize_config_source",
    "to_container",
    "validate",
]
