"""Shared helpers: a tiny configuration and an in-process runner (everything offline)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks/ is importable from tests

#: a run small enough for unit tests: 4 clients, 2 rounds, a narrow network
TINY = [
    "sim.num_clients=4",
    "sim.rounds=2",
    "sim.local_steps=3",
    "sim.batch_size=16",
    "task.examples_per_client=64",
    "task.test_examples=200",
    "task.hidden_dim=32",
    "quiet=true",
]


def tiny(*extra: str) -> list[str]:
    return [*TINY, *extra]


@pytest.fixture
def run_tiny(tmp_path):
    """Run a tiny simulation in-process; returns (summary, metrics rows, run folder)."""
    from fedsim.api import run
    from fedsim.results import read_metrics

    counter = {"n": 0}

    def _run(*extra: str, base: list[str] | None = None):
        counter["n"] += 1
        out = tmp_path / f"run{counter['n']}"
        summary = run([*(TINY if base is None else base), *extra], output_dir=out)
        return summary, read_metrics(out), out

    return _run


def strip_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in rows]
