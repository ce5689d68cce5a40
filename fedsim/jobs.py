"""How a job ends on the command line: a failed run is one line on stderr (exit status 1, or
recorded and passed over in a sweep), its traceback in the run's ``fedsim.log``."""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

from fedsim.config import RunSpec
from fedsim.errors import ConfigCompositionError, ConfigError, RunFailed
from fedsim.results import LOG_FILE, SUMMARY_FILE

#: environment variable naming the file where a sweep's failed jobs are listed
SWEEP_FAILURES = "FEDSIM_SWEEP_FAILURES"
#: environment variable holding a sweep's number of jobs (each job's lines say "job i/N")
SWEEP_TOTAL = "FEDSIM_SWEEP_TOTAL"
#: environment variable naming the job whose lines are printed (fedsim.progress.job_tag)
JOB_TAG = "FEDSIM_JOB_TAG"


def run_job(spec: RunSpec, sweep_log: str | None) -> None:
    """Run one job; exit status 2 for a configuration mistake, 1 for a failed run (a sweep's
    job records its failure and returns, so that the other jobs run). A failed run ends with
    one line on stderr; its traceback goes to the run's ``fedsim.log`` (and to the terminal
    too with ``HYDRA_FULL_ERROR=1``)."""
    from fedsim.api import run_spec

    try:
        run_spec(spec)
    except (ConfigError, ConfigCompositionError) as e:  # already caught up front, normally
        print(f"fedsim: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        failed = run_failed(e)
        reason = " ".join(str(failed if failed is not None else f"{type(e).__name__}: {e}").split())
        where = record_failure(spec.output_dir)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exc()
        if sweep_log:  # a sweep goes on: the job's summary.json says why it failed
            tag = os.environ.get("FEDSIM_JOB_TAG")  # which job, among parallel workers' lines
            print(f"fedsim: {tag or 'job'} failed: {reason} ({where})", file=sys.stderr)
            with open(sweep_log, "a", encoding="utf-8") as f:
                f.write(f"{spec.output_dir}\n")
            return
        print(f"fedsim: run failed: {reason} ({where})", file=sys.stderr)
        sys.exit(1)


def record_failure(folder: Path) -> str:
    """Append the current exception's traceback to the run's ``fedsim.log``; returns where
    the user reads more (only files that exist are named)."""
    from datetime import datetime

    log = folder / LOG_FILE
    try:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{datetime.now().isoformat(timespec='seconds')} run failed\n")
            f.write(traceback.format_exc())
    except OSError:
        log = None
    summary = folder / SUMMARY_FILE
    if summary.is_file() and log is not None:
        return f"see {summary}; the traceback is in {log}"
    if summary.is_file():
        return f"see {summary}"
    if log is not None:
        return f"the traceback is in {log}"
    return "HYDRA_FULL_ERROR=1 shows the traceback"


def run_failed(exc: BaseException) -> RunFailed | None:
    """The RunFailed behind ``exc`` (the ray engine re-raises it wrapped), if any."""
    while exc is not None:
        if isinstance(exc, RunFailed):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def run_sweep(launch: Callable[[], None], folders: list[tuple[str, Path, bool]]) -> None:
    """Run a sweep's jobs (``launch``: Hydra's multirun); then one line: how many ran and
    failed, how long, and the report's command (exit status 1 when a job failed)."""
    import time

    from fedsim.progress import human_seconds

    jobs = [f for key, f, _ in folders[1:] if key == "hydra.sweep.dir"]
    fd, log_path = tempfile.mkstemp(prefix="fedsim-sweep-", suffix=".txt")
    os.close(fd)
    os.environ[SWEEP_FAILURES] = log_path
    os.environ[SWEEP_TOTAL] = str(len(jobs))
    t0 = time.perf_counter()
    try:
        launch()
        failed = Path(log_path).read_text(encoding="utf-8").splitlines()
    finally:
        for key in (SWEEP_FAILURES, SWEEP_TOTAL, JOB_TAG):  # (a sweep run in-process)
            os.environ.pop(key, None)
        Path(log_path).unlink(missing_ok=True)
    root = folders[0][1] if folders else Path(".")
    ok = len(jobs) - len(failed)
    print(
        f"fedsim: sweep done in {human_seconds(time.perf_counter() - t0)}: {len(jobs)} jobs, "
        f"{ok} ok, {len(failed)} failed -> {root}; compare them with: fedsim-report {root}"
    )
    if failed:
        print(
            f"fedsim: {len(failed)} job(s) of the sweep failed; the others ran "
            f"(`fedsim-report {Path(failed[0]).parent}` lists them with the reasons)",
            file=sys.stderr,
        )
        sys.exit(1)
