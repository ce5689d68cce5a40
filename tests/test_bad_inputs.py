"""Bad inputs, all of them at once: each row of the table (tests/bad_inputs/) is one ``fedsim``
command, run as a user runs it (a fresh process), that must end with one line on stderr and no
traceback, with its exit status (2: a configuration mistake or a damaged or edited file; 1: a
run that failed), and with every file of an earlier run as it was (hashes before and after).

The commands run two at a time, once per session, before the first row's check (a case
marked ``alone`` runs by itself, in its own test). Each runs in
a child forked from a process that has imported fedsim (tests/zygote.py: the child
has the command's working directory, environment, ``sys.path`` and file descriptors, so it is
the command less the seconds of imports); the runs a case starts ``beside`` it, and the tests
after the table, are fresh interpreters.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pkgutil
import queue
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import tests.bad_inputs as table
from tests.bad_inputs import STOPPED_ARGS, Case
from tests.conftest import ray_on_this_machine

CASES: list[Case] = [
    case
    for info in pkgutil.iter_modules(table.__path__)
    for case in importlib.import_module(f"tests.bad_inputs.{info.name}").CASES
]
ROOT = Path(__file__).resolve().parents[1]
BY_ID = {case.id: case for case in CASES}
assert len(BY_ID) == len(CASES), "two cases share an id"


def _env(case: Case) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR",)}
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONHASHSEED="0")
    env.update(case.env)
    return env


def _fedsim(args, cwd: Path, env: dict[str, str], timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "fedsim", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Zygote:
    """One ``tests.zygote`` process: ``run`` forks it into one command."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert json.loads(self.process.stdout.readline()) == {"ready": True}

    def run(self, args, cwd: Path, env: dict[str, str], io: Path, timeout: float = 300):
        request = {
            "args": list(args),
            "cwd": str(cwd),
            "env": env,
            "stdout": str(io.with_suffix(".out")),
            "stderr": str(io.with_suffix(".err")),
            "timeout": timeout,
        }
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        rc = json.loads(self.process.stdout.readline())["rc"]
        read = lambda p: Path(p).read_text(errors="replace") if Path(p).exists() else ""  # noqa: E731
        return subprocess.CompletedProcess(
            args, rc, read(request["stdout"]), read(request["stderr"])
        )

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """A finished run and a stopped one (killed after its checkpoint of round 1)."""
    from fedsim.apps.server.run import FederatedRun
    from fedsim.cli import main

    root = tmp_path_factory.mktemp("prepared")
    finished, stopped = root / "finished", root / "stopped"
    main([*STOPPED_ARGS, f"hydra.run.dir={finished}"])

    class Killed(BaseException):
        pass

    original = FederatedRun.checkpoint

    def die(self, r, arrays, t_start):
        original(self, r, arrays, t_start)
        if r == 1:
            raise Killed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FederatedRun, "checkpoint", die)
        with pytest.raises(Killed):
            main([*STOPPED_ARGS, f"hydra.run.dir={stopped}"])
    return {"finished": finished, "stopped": stopped}


def _run_case(case: Case, base: Path, prepared: dict[str, Path], zygotes: queue.Queue) -> dict:
    tmp = base / case.id
    tmp.mkdir(parents=True)
    run = tmp / "run"
    if case.folder is not None:
        shutil.copytree(prepared[case.folder], run)
    if case.prepare is not None:
        case.prepare(run, tmp)

    def fill(args):
        return [a.replace("{run}", str(run)).replace("{tmp}", str(tmp)) for a in args]

    first = None
    if case.beside is not None:
        first = subprocess.Popen(
            [sys.executable, "-m", "fedsim", *fill(case.beside)],
            cwd=tmp,
            env=_env(case),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_for(run / "metrics.jsonl", first)
    before = hashes(tmp)
    if first is not None:  # what the first run has written for good, and must keep
        kept = ("run/.hydra/", "run/config.yaml")
        before = {k: v for k, v in before.items() if k.startswith(kept)}
    t0 = time.perf_counter()
    zygote = zygotes.get()
    try:
        out = zygote.run(fill(case.args), tmp, _env(case), base / case.id)
    finally:
        zygotes.put(zygote)
    outcome = {
        "rc": out.returncode,
        "stdout": out.stdout,
        "stderr": out.stderr,
        "seconds": time.perf_counter() - t0,
        "before": before,
    }
    if first is not None:
        first_err = first.communicate(timeout=600)[1]
        outcome["beside"] = (first.returncode, first_err[-2000:])
        summary = run / "summary.json"
        outcome["summary_status"] = (
            json.loads(summary.read_text())["status"] if summary.exists() else None
        )
    outcome["after"] = hashes(tmp)
    return outcome


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.perf_counter()
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(
                f"the first run ended before its first round: {process.stderr.read()}"
            )
        if time.perf_counter() - t0 > timeout:
            process.kill()
            raise AssertionError(f"the first run wrote no round in {timeout} s")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def outcomes(request, prepared, tmp_path_factory) -> dict[str, dict]:
    """Every selected case's outcome, run two at a time."""
    wanted = [
        item.callspec.params["case_id"]
        for item in request.session.items
        if getattr(item, "callspec", None) is not None and "case_id" in item.callspec.params
    ]
    base = tmp_path_factory.mktemp("cases")
    zygotes: queue.Queue = queue.Queue()
    for _ in range(2):
        zygotes.put(_zygote())
    try:
        with ray_on_this_machine(), ThreadPoolExecutor(max_workers=2) as pool:
            futures = {
                cid: pool.submit(_run_case, BY_ID[cid], base, prepared, zygotes) for cid in wanted
            }
        return {cid: _result(f) for cid, f in futures.items()}
    finally:
        while not zygotes.empty():
            zygotes.get().close()


def _zygote() -> Zygote:
    """A process that has imported fedsim, to fork the cases' commands from."""
    return Zygote(_env(Case("zygote", (), "")))


def _result(future) -> dict:
    try:
        return future.result()
    except Exception as e:  # one case's harness failure fails that case only
        return {"harness": f"{type(e).__name__}: {e}"}


@pytest.mark.parametrize("case_id", [c.id for c in CASES if not c.alone])
def test_a_bad_input_is_one_line_and_changes_nothing(case_id, outcomes):
    _check(BY_ID[case_id], outcomes[case_id])


@pytest.mark.parametrize("alone_id", [c.id for c in CASES if c.alone])
def test_a_bad_input_that_must_run_alone(alone_id, tmp_path):
    """The cases whose outcome another process could change, one at a time (see Case.alone)."""
    zygotes: queue.Queue = queue.Queue()
    zygotes.put(_zygote())
    try:
        with ray_on_this_machine(alone=True):
            out = _run_case(BY_ID[alone_id], tmp_path, {}, zygotes)
    finally:
        zygotes.get().close()
    _check(BY_ID[alone_id], out)


def _check(case: Case, out: dict) -> None:
    assert "harness" not in out, out.get("harness")
    shown = f"exit {out['rc']}\nstdout:\n{out['stdout'][-2000:]}\nstderr:\n{out['stderr'][-4000:]}"
    assert out["rc"] == case.code, shown
    lines = [line for line in out["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out["stderr"], shown
    assert case.says in lines[0], shown
    changed = [k for k, v in out["before"].items() if out["after"].get(k) != v]
    assert not changed, f"changed or removed: {changed}\n{shown}"
    if "beside" in out:  # the run that was going on finished as if alone
        assert out["beside"] == (0, ""), out["beside"]
        assert out["summary_status"] == "ok", out
    elif case.code == 2:
        added = sorted(set(out["after"]) - set(out["before"]))
        assert not added, f"written although refused: {added}\n{shown}"


def test_the_table_is_broad():
    assert len(CASES) >= 60, len(CASES)
    assert sum(c.alone for c in CASES) <= 3  # each costs a fresh zygote


def test_a_failed_run_is_one_line_and_its_traceback_is_in_the_log(tmp_path):
    args = [*STOPPED_ARGS, "faults=crash", "faults.crash_prob=1.0", "hydra.run.dir=run"]
    env = _env(Case("x", (), ""))
    out = _fedsim(args, tmp_path, env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    summary, log = tmp_path / "run" / "summary.json", tmp_path / "run" / "fedsim.log"
    assert f"see {summary}" in line and f"the traceback is in {log}" in line, line
    assert json.loads(summary.read_text())["status"] == "failed"
    assert "Traceback" in log.read_text() and "RunFailed" in log.read_text()
    out = _fedsim([*args[:-1], "hydra.run.dir=again"], tmp_path, {**env, "HYDRA_FULL_ERROR": "1"})
    assert out.returncode == 1 and "Traceback" in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("fedsim: run failed: every round")


def test_a_folder_another_process_holds_is_refused_before_anything_is_written(tmp_path):
    """The lock itself (the table's concurrent cases mostly meet the earlier check that the
    folder already holds a run): a folder held by another process, still empty."""
    import fcntl

    folder = tmp_path / "held"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        out = _fedsim([*STOPPED_ARGS, f"hydra.run.dir={folder}"], tmp_path, _env(Case("x", (), "")))
    finally:
        os.close(fd)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (
        f"fedsim: error: hydra.run.dir={folder}: another fedsim run is using this folder "
        "(one run per folder); wait for it to end or choose another folder"
    )
    assert list(folder.iterdir()) == []
    out = _fedsim([*STOPPED_ARGS, f"hydra.run.dir={folder}"], tmp_path, _env(Case("x", (), "")))
    assert out.returncode == 0, out.stderr  # free again: the run goes ahead
