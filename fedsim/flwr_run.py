"""Glue for ``flwr run .``: the apps read fedsim's Hydra overrides from Flower's run_config.

``pyproject.toml``'s ``[tool.flwr.app.config]`` holds ``overrides`` (a string of Hydra overrides,
as on fedsim's command line: the app's defaults), ``extra`` (more overrides, applied after
them; empty by default) and ``output-dir``. Add to the defaults with
``flwr run . --run-config "extra='sim.rounds=5'"``; replace them with ``overrides='...'``.
"""

from __future__ import annotations

import shlex
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedsim import keys
from fedsim.config import RunSpec, check, compose
from fedsim.errors import ConfigError
from fedsim.results import METRICS_FILE


@lru_cache(maxsize=4)
def _compose(overrides: str) -> tuple[dict[str, Any], dict[str, str]]:
    return compose(shlex.split(overrides))


#: run_config key: overrides applied after ``overrides`` (the app's defaults), so that a
#: ``--run-config`` changes one setting and keeps the others
RUN_EXTRA = "extra"


def config_from_run_config(run_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    base = str(run_config.get(keys.RUN_OVERRIDES, ""))
    extra = str(run_config.get(RUN_EXTRA, "") or "")
    return _compose(f"{base} {extra}".strip())


def spec_from_run_config(run_config: dict[str, Any]) -> RunSpec:
    cfg, choices = config_from_run_config(run_config)
    check(cfg)
    out = str(run_config.get(keys.RUN_OUTPUT_DIR, "") or "")
    if not out:
        out = f"results/flwr-run/{datetime.now().strftime('%Y-%m-%d_%H-%M-%S-%f')}"
    if (Path(out) / METRICS_FILE).exists():
        raise ConfigError("output-dir", out, "already holds a run; choose another folder")
    choices = {**choices, "engine": "flwr-run"}  # Flower's runtime delivers the messages
    return RunSpec(
        cfg=cfg, choices=choices, output_dir=Path(out).resolve(), quiet=bool(cfg.get("quiet"))
    )
