"""The ``fedsim`` command (also ``python -m fedsim``): a Hydra app with validation up front.

Every job's configuration is composed, validated and built before Hydra starts, so a bad
override costs one line on stderr and exit status 2, with no traceback and nothing written.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fedsim import resume
from fedsim.apps.server import RunFailed
from fedsim.config import (
    RunSpec,
    check,
    compose_job,
    config_search_path,
    expand_sweep,
    to_container,
)
from fedsim.errors import ConfigCompositionError, ConfigError
from fedsim.results import METRICS_FILE

#: environment variable naming the file where a sweep's failed jobs are listed
_SWEEP_FAILURES = "FEDSIM_SWEEP_FAILURES"

# Hydra flags after which fedsim only passes through (they print, they do not run).
_INFO_FLAGS = {
    "--help",
    "-h",
    "--hydra-help",
    "--info",
    "-i",
    "--cfg",
    "-c",
    "--shell-completion",
    "-sc",
    "--version",
}
_VALUE_FLAGS = {
    "--config-name": "name",
    "-cn": "name",
    "--config-dir": "dir",
    "-cd": "dir",
    "--config-path": "path",
    "-cp": "path",
    "--package": "package",
    "-p": "package",
    "--experimental-rerun": "rerun",
}


def _parse(argv: list[str]) -> tuple[list[str], dict[str, str], bool, bool]:
    overrides, flags, multirun, info = [], {}, False, False
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if arg in ("-m", "--multirun"):
            multirun = True
        elif name in _VALUE_FLAGS:
            flags[_VALUE_FLAGS[name]] = value if eq else next(it, "")
        elif name in _INFO_FLAGS:
            info = True
        elif arg.startswith("-"):
            info = True  # something Hydra knows and fedsim does not: let Hydra handle it
        else:
            overrides.append(arg)
    return overrides, flags, multirun, info


def prevalidate(argv: list[str]) -> tuple[int, list[str]]:
    """Compose, validate and build every job of the command line; returns the number of jobs
    and the overrides to add (``resume=true`` finds the folder of the run it continues)."""
    overrides, flags, multirun, info = _parse(argv)
    if info or "rerun" in flags:
        return 0, []
    added: list[str] = []
    resuming_any = False
    where = {
        "config_name": flags.get("name", "config"),
        "config_dir": flags.get("dir"),
        "config_path": _config_path(flags.get("path")),
    }
    jobs, fixed_error = [overrides], None
    if multirun:
        jobs = expand_sweep(overrides, _sweeper_params(overrides, where))
        try:  # what Hydra itself composes before it launches the jobs
            compose_job([o for o in overrides if not _is_sweep(o)], **where)
        except (ConfigError, ConfigCompositionError) as e:
            fixed_error = e
    for index, job in enumerate(jobs):
        composed = compose_job(job, **where)
        check(composed.cfg)
        resuming = composed.cfg.get("resume") is True
        resuming_any = resuming_any or resuming
        if multirun:
            if resuming and not _given("hydra.sweep.dir", job):
                raise ConfigError(
                    "resume",
                    True,
                    "a sweep resumes the jobs of one sweep folder: give hydra.sweep.dir=<it>",
                )
            folder = Path(composed.sweep_dir) / str(index)
            _check_output_dir("hydra.sweep.dir", folder, job, composed.cfg)
        elif resuming and not _given("hydra.run.dir", job):
            root = Path(composed.run_dir).parent.parent
            found = resume.find_run(root, composed.cfg)
            if found is None:
                raise ConfigError(
                    "resume",
                    True,
                    f"no unfinished run of this configuration with a checkpoint under {root}; "
                    "name its folder with hydra.run.dir=<folder> or resume=<folder>",
                )
            added.append(f"hydra.run.dir={found}")
        else:
            _check_output_dir("hydra.run.dir", Path(composed.run_dir), job, composed.cfg)
    if fixed_error is not None:
        raise ConfigCompositionError(
            f"{fixed_error}; in a sweep, a key that exists only in some of the swept options "
            "must be written as a sweep itself: key=choice(value)"
        )
    if resuming_any:  # the folders keep the .hydra/ record of the command that started them
        added.append("hydra.output_subdir=null")
    return len(jobs), added


def _given(key: str, job: list[str]) -> bool:
    return any(o.split("=", 1)[0] == key for o in job)


def _sweeper_params(overrides: list[str], where: dict) -> dict[str, str]:
    """The config's ``hydra.sweeper.params`` (a preset may sweep), read from the first job of
    the command line's own sweeps. A value that only fits a later job of the config's sweep
    (``feedback.compress_first`` while the preset sweeps ``feedback``) is checked in the jobs
    themselves: here the groups and presets chosen are enough."""
    first = expand_sweep(overrides)[0]
    try:
        return compose_job(first, **where).sweeper_params
    except (ConfigError, ConfigCompositionError):
        choices = [o for o in first if "." not in o.split("=", 1)[0]]
        return compose_job(choices, **where).sweeper_params


def _is_sweep(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override).is_sweep_override()
    except Exception:
        return False


def _config_path(path: str | None) -> str | None:
    """``--config-path`` as Hydra reads it: absolute, or relative to fedsim's command module."""
    if path is None:
        return None
    p = Path(path)
    return str(p if p.is_absolute() else (Path(__file__).parent / p).resolve())


def _check_output_dir(key: str, folder: Path, job: list[str], cfg: dict) -> None:
    """A fixed output folder must be usable and must not hold a run already (unless the job
    resumes it, and then with the same configuration).

    The default folders are time-stamped to the microsecond; a folder named on the command
    line may already hold a finished run, which fedsim never overwrites.
    """
    if not _given(key, job):
        return
    shown = str(folder.parent if key == "hydra.sweep.dir" else folder)
    if cfg.get("resume") is True:
        resume.plan(folder, cfg)  # a ConfigError if the folder holds another configuration
    elif (folder / METRICS_FILE).exists():
        raise ConfigError(
            key, shown, f"already holds a run ({folder / METRICS_FILE}); choose another folder"
        )
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, shown, f"cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(key, shown, f"cannot be created: {existing} is not writable")


def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    plain = to_container(cfg)
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}
    spec = RunSpec(
        cfg=plain,
        choices=choices,
        output_dir=Path(hc.runtime.output_dir),
        quiet=bool(plain.get("quiet")),
    )
    sweep_log = os.environ.get(_SWEEP_FAILURES)
    if plain.get("resume") is True:
        action, ckpt = resume.plan(spec.output_dir, plain)
        if action == resume.DONE:
            resume.drop_stale_checkpoint(spec.output_dir, plain)
            print(f"fedsim: {spec.output_dir} has finished already; nothing to resume")
            return
        if action == resume.RESTART:
            print(f"fedsim: no checkpoint in {spec.output_dir}; starting it again from round 0")
            resume.clear_partial(spec.output_dir)
        spec.resume = ckpt
    _run_job(spec, sweep_log)


def _run_job(spec: RunSpec, sweep_log: str | None) -> None:
    """Run one job; exit status 2 for a configuration mistake, 1 for a failed run (a sweep's
    job records its failure and returns, so that the other jobs run)."""
    from fedsim.api import run_spec

    try:
        run_spec(spec)
    except (ConfigError, ConfigCompositionError) as e:  # already caught up front, normally
        print(f"fedsim: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        failed = _run_failed(e)
        where = spec.output_dir / "summary.json"
        if sweep_log:  # a sweep goes on: the job's summary.json says why it failed
            if failed is None:  # a bug (or a plug-in's exception): show where it came from
                traceback.print_exc()
            reason = failed if failed is not None else f"{type(e).__name__}: {e}"
            print(f"fedsim: job failed: {reason} (see {where})", file=sys.stderr)
            with open(sweep_log, "a", encoding="utf-8") as f:
                f.write(f"{spec.output_dir}\n")
            return
        if failed is None:
            raise  # a bug: Hydra prints the traceback
        print(f"fedsim: run failed: {failed} (see {where})", file=sys.stderr)
        sys.exit(1)


def _run_failed(exc: BaseException) -> RunFailed | None:
    """The RunFailed behind ``exc`` (the ray engine re-raises it wrapped), if any."""
    while exc is not None:
        if isinstance(exc, RunFailed):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _finished_single_run(argv: list[str]) -> Path | None:
    """The folder of a single ``resume=true`` run that has finished (Hydra is then not
    started, so nothing in the folder is rewritten), else None."""
    overrides, flags, multirun, info = _parse(argv)
    if multirun or info or not _given("hydra.run.dir", overrides):
        return None
    where = {
        "config_name": flags.get("name", "config"),
        "config_dir": flags.get("dir"),
        "config_path": _config_path(flags.get("path")),
    }
    composed = compose_job(overrides, **where)
    if composed.cfg.get("resume") is not True:
        return None
    folder = Path(composed.run_dir)
    if resume.plan(folder, composed.cfg)[0] != resume.DONE:
        return None
    resume.drop_stale_checkpoint(folder, composed.cfg)
    return folder


def _resume_folder(argv: list[str]) -> str | None:
    """The folder of ``resume=<folder>`` on the command line (None: no folder given)."""
    for arg in argv:
        key, eq, value = arg.partition("=")
        if key == "resume" and eq and value.strip().lower() not in ("true", "false", ""):
            return value
    return None


def _resume_saved(folder_arg: str, argv: list[str]) -> RunSpec:
    """``resume=<folder>``: the run in the folder, with the configuration it saved, built only
    from targets fedsim ships or ``--config-dir`` holds (a results folder is data)."""
    from fedsim.checkpoint import CHECKPOINT_FILE

    folder = Path(folder_arg)
    config_dir, argv = resume.config_dir_arg(argv)
    cfg = resume.read_config(folder)
    if cfg is None:
        raise ConfigError("resume", folder_arg, "is not a run folder (it has no config.yaml)")
    others = [a for a in argv if a.partition("=")[0] not in ("resume", "quiet")]
    if others:
        raise ConfigError(
            "resume",
            folder_arg,
            f"continues that run with its saved configuration; drop the other arguments "
            f"({' '.join(others[:3])})",
        )
    resume.refuse_foreign_targets(cfg, config_dir)
    ckpt = folder / CHECKPOINT_FILE
    if resume.summary_status(folder) == "ok":
        raise ConfigError("resume", folder_arg, "holds a finished run; nothing to resume")
    if not ckpt.is_file():
        raise ConfigError(
            "resume",
            folder_arg,
            f"has no {CHECKPOINT_FILE} (the run stopped before its first checkpoint, or "
            "checkpoint.every=0): start it again",
        )
    header = resume.readable(ckpt, folder, cfg)
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "quiet":
            cfg["quiet"] = value.strip().lower() == "true"
    cfg["resume"] = folder_arg
    check(cfg)
    return RunSpec(
        cfg=cfg,
        choices=dict(header.get("choices", {})),
        output_dir=folder,
        quiet=bool(cfg.get("quiet")),
        resume=ckpt,
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    folder = _resume_folder(argv)
    done = None
    try:
        if folder is not None:
            spec = _resume_saved(folder, argv)
        else:
            _, added = prevalidate(argv)
            done = _finished_single_run(argv)
    except (ConfigError, ConfigCompositionError) as e:
        print(f"fedsim: error: {e}", file=sys.stderr)
        sys.exit(2)
    if folder is None and done is not None:  # resume=true of a finished run: touch nothing
        print(f"fedsim: {done} has finished already; nothing to resume")
        return
    if folder is not None:
        _run_job(spec, None)
        return
    argv = [*argv, *added]
    sys.argv = [sys.argv[0] if sys.argv else "fedsim", *argv]
    app = hydra.main(config_path=config_search_path(), config_name="config", version_base="1.3")
    if not _parse(argv)[2]:  # one run
        app(_hydra_main)()
        return
    # a sweep: a failing job is recorded and the others go on (any launcher, any process)
    fd, log_path = tempfile.mkstemp(prefix="fedsim-sweep-", suffix=".txt")
    os.close(fd)
    os.environ[_SWEEP_FAILURES] = log_path
    try:
        app(_hydra_main)()
        failed = Path(log_path).read_text(encoding="utf-8").splitlines()
    finally:
        os.environ.pop(_SWEEP_FAILURES, None)
        Path(log_path).unlink(missing_ok=True)
    if failed:
        print(
            f"fedsim: {len(failed)} job(s) of the sweep failed; the others ran "
            f"(`fedsim-report {Path(failed[0]).parent}` lists them with the reasons)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
