"""The ``fedsim`` command (also ``python -m fedsim``): a Hydra app with validation up front.

Every job's configuration is composed, validated and built before Hydra starts, so a bad
override costs one line on stderr and exit status 2, with no traceback and nothing written.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fedsim import locks, resume, targets, threads
from fedsim.config import (
    RunSpec,
    check,
    compose_job,
    config_search_path,
    expand_sweep,
    to_container,
)
from fedsim.config.compose import shared_group_listings
from fedsim.errors import ConfigCompositionError, ConfigError
from fedsim.jobs import JOB_TAG, SWEEP_FAILURES, SWEEP_TOTAL, run_job, run_sweep
from fedsim.results import METRICS_FILE

# Hydra flags after which fedsim only passes through (they print, they do not run).
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c"}
_INFO_FLAGS |= {"--shell-completion", "-sc", "--version"}
#: the flags whose text lists every config group's options
_HELP = {"--help", "-h", "--hydra-help"}
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


def prevalidate(
    argv: list[str], estimates: list | None = None
) -> tuple[list[tuple[str, Path, bool]], list[str]]:
    """Compose, validate and build every job of the command line; returns the folders the
    command will write (``(key, folder, resumed)``: the run's, or the sweep's and each job's)
    and the overrides to add (the folders, resolved here once, so that they are known and
    locked before Hydra writes anything; ``resume=true`` finds the folder it continues).
    ``estimate=true`` jobs write no folder: their ``(overrides, composed)`` go to ``estimates``."""
    overrides, flags, multirun, info = _parse(argv)
    if info or "rerun" in flags:
        return [], []
    added: list[str] = []
    folders: list[tuple[str, Path, bool]] = []
    resuming_any = False
    where = {
        "config_name": flags.get("name", "config"),
        "config_dir": flags.get("dir"),
        "config_path": _config_path(flags.get("path")),
    }
    jobs, fixed_error = [overrides], None
    estimates = [] if estimates is None else estimates
    if multirun:
        jobs = expand_sweep(overrides, _sweeper_params(overrides, where))
        try:  # what Hydra itself composes before it launches the jobs
            compose_job([o for o in overrides if not _is_sweep(o)], **where)
        except (ConfigError, ConfigCompositionError) as e:
            fixed_error = e
    for index, job in enumerate(jobs):
        composed = compose_job(job, **where)
        check(composed.cfg)
        if _estimating(composed.cfg, index, estimates):
            estimates.append((job, composed))
            continue
        resuming = composed.cfg.get("resume") is True
        resuming_any = resuming_any or resuming
        if multirun:
            if resuming and not _given("hydra.sweep.dir", job):
                raise ConfigError(
                    "resume",
                    True,
                    "a sweep resumes the jobs of one sweep folder: give hydra.sweep.dir=<it>",
                )
            if index == 0:
                sweep_dir = Path(composed.sweep_dir)
                folders.append(("hydra.sweep.dir", sweep_dir, resuming))
                if not _given("hydra.sweep.dir", job):
                    added.append(f"hydra.sweep.dir={sweep_dir}")
            folder = sweep_dir / str(index)
            _check_output_dir("hydra.sweep.dir", folder, job, composed.cfg)
            folders.append(("hydra.sweep.dir", folder, resuming))
        else:
            _run_folder(job, composed, added, folders)
    if fixed_error is not None:
        raise ConfigCompositionError(
            f"{fixed_error}; in a sweep, a key that exists only in some of the swept options "
            "must be written as a sweep itself: key=choice(value)"
        )
    if resuming_any:  # the folders keep the .hydra/ record of the command that started them
        added.append("hydra.output_subdir=null")
    return folders, added


def _estimating(cfg: dict, index: int, estimates: list) -> bool:
    """Whether job ``index`` only estimates (``estimate=true``: it writes no folder), given the
    earlier jobs that do (``estimates``): a sweep's jobs all estimate or none does."""
    estimating = cfg.get("estimate") is True
    if len(estimates) != (index if estimating else 0):
        raise ConfigError("estimate", estimating, "a sweep estimates all its jobs or none")
    return estimating


def _run_folder(job: list[str], composed, added: list[str], folders: list) -> None:
    """A single run's folder: checked, resolved once (added as an override) and listed."""
    if composed.cfg.get("resume") is True and not _given("hydra.run.dir", job):
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
        folders.append(("resume", found, True))
        return
    _check_output_dir("hydra.run.dir", Path(composed.run_dir), job, composed.cfg)
    if not _given("hydra.run.dir", job):
        added.append(f"hydra.run.dir={composed.run_dir}")
    folders.append(("hydra.run.dir", Path(composed.run_dir), composed.cfg.get("resume") is True))


def _lock(folders: list[tuple[str, Path, bool]]) -> None:
    """Hold every folder the command writes (one run per folder), then check again, under
    the lock, that a folder a new run writes into holds no run (one may have ended in it
    since the first check)."""
    for key, folder, resuming in folders:
        locks.hold(folder, key)
        if not resuming and (folder / METRICS_FILE).exists():
            raise ConfigError(
                key,
                str(folder),
                f"already holds a run ({folder / METRICS_FILE}); choose another folder",
            )


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
    n_jobs = hc.launcher.get("n_jobs") if "n_jobs" in hc.launcher else None
    if isinstance(n_jobs, int) and n_jobs != 1:  # parallel jobs share the CPUs
        os.environ[threads.PARALLEL_JOBS] = str(n_jobs if n_jobs > 0 else threads.usable_cpus())
    sweep_log = os.environ.get(SWEEP_FAILURES)
    if sweep_log is not None:  # every line of the job says which it is (parallel workers)
        total = os.environ.get(SWEEP_TOTAL, "?")
        os.environ[JOB_TAG] = f"job {int(hc.job.num) + 1}/{total}"
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
    run_job(spec, sweep_log)


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
    config_dir, argv = targets.config_dir_arg(argv)
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
    targets.refuse_foreign_targets(cfg, config_dir)
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
    """The ``fedsim`` command. As the console script (no ``argv``), a configuration refused
    before anything ran ends the process right after its line: nothing is written or open, and
    Python's teardown of PyTorch's modules would add 0.5 s (benchmarks/startup.py)."""
    try:
        _main(list(sys.argv[1:] if argv is None else argv))
    except _Refused:
        locks.free_all()
        if argv is None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        sys.exit(2)
    finally:
        locks.free_all()  # a process's locks end with it anyway; main() may be called again


class _Refused(Exception):  # a configuration refused before anything ran (its line printed)
    pass


def _main(argv: list[str]) -> None:
    folder = _resume_folder(argv)
    done, estimates = None, []
    try:
        if folder is not None:
            spec = _resume_saved(folder, argv)
            _lock([("resume", spec.output_dir, True)])
        else:
            folders, added = prevalidate(argv, estimates)
            _lock(folders)
            done = _finished_single_run(argv)
    except (ConfigError, ConfigCompositionError) as e:
        print(f"fedsim: error: {e}", file=sys.stderr)
        raise _Refused from None
    if folder is not None:
        run_job(spec, None)
        return
    if estimates:  # estimate=true: printed, nothing written (no folder, no Hydra)
        from fedsim.estimate import show_jobs

        show_jobs(estimates)
        return
    if done is not None:  # resume=true of a finished run: touch nothing
        print(f"fedsim: {done} has finished already; nothing to resume")
        return
    argv = [*argv, *added]
    sys.argv = [sys.argv[0] if sys.argv else "fedsim", *argv]
    app = hydra.main(config_path=config_search_path(), config_name="config", version_base="1.3")
    if not _parse(argv)[2]:  # one run
        with shared_group_listings() if _HELP & set(argv) else nullcontext():  # half the time
            app(_hydra_main)()
        return
    # a sweep: a failing job is recorded and the others go on (any launcher, any process)
    run_sweep(lambda: app(_hydra_main)(), folders)


if __name__ == "__main__":
    main()
