"""Running fedsim from Python (tests, notebooks, benchmarks): the same path as the command line.

>>> from fedsim.api import run
>>> summary = run(["strategy=fedavg", "sim.rounds=3"], output_dir="results/my-run")
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fedsim import locks
from fedsim.build import build
from fedsim.config import RunSpec, check, compose
from fedsim.results import METRICS_FILE, SUMMARY_FILE


def run_spec(spec: RunSpec) -> dict[str, Any]:
    """Validate ``spec.cfg``, run it on its engine (from ``spec.resume``'s checkpoint, if
    given), return the summary it wrote. With ``estimate=true``: print the estimate
    (:mod:`fedsim.estimate`) and return its numbers; nothing is trained or written."""
    check(spec.cfg)
    if spec.cfg.get("estimate") is True:
        from fedsim.estimate import show

        return show(spec.cfg, spec.choices)
    if spec.resume is None and (spec.output_dir / METRICS_FILE).exists():
        from fedsim.errors import ConfigError

        raise ConfigError(
            "output_dir", str(spec.output_dir), "already holds a run; choose another folder"
        )
    build("engine", spec.cfg["engine"]).run(spec)
    return json.loads((spec.output_dir / SUMMARY_FILE).read_text())


def run(
    overrides: Sequence[str] = (),
    output_dir: str | Path | None = None,
    quiet: bool = True,
    config_dir: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Compose the config from ``overrides`` (as on the command line) and run it.

    ``output_dir`` must not hold a run yet; by default ``results/api/<date>/<time>``. With
    ``estimate=true`` among the overrides nothing runs: the estimate is printed and its numbers
    returned (:meth:`fedsim.estimate.Estimate.as_dict`), and no folder is written. With
    ``resume=True`` it must be given: a finished run there is returned as it is, an unfinished
    one continues from its checkpoint (or starts again without one).
    """
    if output_dir is None:
        if resume:
            raise ValueError("resume=True needs the output_dir of the run to continue")
        output_dir = f"results/api/{datetime.now().strftime('%Y-%m-%d/%H-%M-%S-%f')}"
    overrides = [*overrides, "resume=true"] if resume else list(overrides)
    cfg, choices = compose(overrides, config_dir=config_dir)
    spec = RunSpec(cfg=cfg, choices=choices, output_dir=Path(output_dir), quiet=quiet)
    check(cfg)  # before anything in the folder is touched (the lock creates it)
    if cfg.get("estimate") is True:  # nothing is written: no folder, no lock
        return run_spec(spec)
    held = locks.hold(spec.output_dir, "output_dir")  # one run per folder
    try:
        return _run_held(spec, cfg, resume)
    finally:
        if held:
            locks.free(spec.output_dir)


def _run_held(spec: RunSpec, cfg: dict[str, Any], resume: bool) -> dict[str, Any]:
    from fedsim import resume as resuming

    if resume:
        action, spec.resume = resuming.plan(spec.output_dir, cfg)
        if action == resuming.DONE:
            resuming.drop_stale_checkpoint(spec.output_dir, cfg)
            return json.loads((spec.output_dir / SUMMARY_FILE).read_text())
        if action == resuming.RESTART:
            resuming.clear_partial(spec.output_dir)
    return run_spec(spec)
