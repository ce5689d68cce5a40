"""Shared helpers: a tiny configuration and an in-process runner (everything offline)."""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# the token cache of text tasks: a fresh folder per test session, not the user's
os.environ["FEDSIM_CACHE"] = tempfile.mkdtemp(prefix="fedsim-test-cache-")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks/ is importable from tests

#: a run small enough for unit tests: 4 clients, 2 rounds, a narrow network (the synthetic
#: task and FedAvg unless the test picks another task or strategy)
TINY = [
    "sim.num_clients=4",
    "sim.rounds=2",
    "sim.local_steps=3",
    "sim.batch_size=16",
    "sim.lr=0.01",
    "sim.eval_clients=all",
    "quiet=true",
]
SYNTHETIC = [
    "task=synthetic",
    "task.examples_per_client=64",
    "task.test_examples=200",
    "task.hidden_dim=32",
]


def synthetic(*extra: str) -> list[str]:
    """``extra`` on the synthetic task with FedAvg, unless it picks a task or strategy
    (the default run is the sentiment task with Fed-SB: too big for most tests)."""
    picks = {e.split("=", 1)[0] for e in extra}
    task = [] if "task" in picks else ["task=synthetic"]
    strategy = [] if "strategy" in picks else ["strategy=fedavg"]
    return [*task, *strategy, *extra]


def tiny(*extra: str) -> list[str]:
    picks = dict(e.split("=", 1) for e in extra if "=" in e)
    task = [] if "task" in picks else SYNTHETIC[1:]
    clients = picks.get("sim.num_clients", "4")  # all of them, unless the test says
    every = [] if "sim.clients_per_round" in picks else [f"sim.clients_per_round={clients}"]
    return synthetic(*task, *TINY, *every, *extra)


@pytest.fixture
def run_tiny(tmp_path):
    """Run a tiny simulation in-process; returns (summary, metrics rows, run folder)."""
    from fedsim.api import run
    from fedsim.results import read_metrics

    counter = {"n": 0}

    def _run(*extra: str, base: list[str] | None = None):
        counter["n"] += 1
        out = tmp_path / f"run{counter['n']}"
        summary = run(tiny(*extra) if base is None else [*base, *extra], output_dir=out)
        return summary, read_metrics(out), out

    return _run


def strip_timings(rows: list[dict]) -> list[dict]:
    """Rows without their wall times (the simulated clock's ``*sim_time_s`` stay)."""
    return [
        {k: v for k, v in r.items() if not k.endswith("_time_s") or k.endswith("sim_time_s")}
        for r in rows
    ]


@pytest.fixture(scope="session")
def hf_task(tmp_path_factory) -> list[str]:
    """Overrides for ``task=hf`` on a tiny random BERT and a CSV corpus (made once)."""
    from tests.tiny_text import hf_overrides

    return hf_overrides(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="session")
def math_task(tmp_path_factory) -> list[str]:
    """Overrides for ``task=math`` on a tiny random Llama with a character tokenizer."""
    from tests.tiny_lm import math_overrides

    return math_overrides(tmp_path_factory.mktemp("lm"))


#: the marks of tests that start a Ray on this machine
RAY_MARKS = ("ray", "flwr_run", "scale_out")
_RAY_LOCK = Path(tempfile.gettempdir()) / f"fedsim-tests-ray-{os.getuid()}"


@contextmanager
def ray_on_this_machine(alone: bool = False):
    """Held while a test starts Ray (``make test`` runs two pytest-xdist workers, and other
    test sessions may run beside them): any number share it, but ``alone=True`` (a case whose
    outcome another Ray changes: Ray's ``address=auto`` attaches to any Ray it finds on the
    machine) waits for them to end, and the ones asking after it wait for it (a gate, so that
    it is not starved)."""
    with open(f"{_RAY_LOCK}.gate", "a") as gate, open(f"{_RAY_LOCK}.lock", "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _ray_shares_the_machine(request):
    if any(request.node.get_closest_marker(m) for m in RAY_MARKS):
        with ray_on_this_machine():
            yield
    else:
        yield
