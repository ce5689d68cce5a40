"""Opt-in: the same apps through ``flwr run .`` (a local SuperLink in simulation mode).

Set FEDSIM_TEST_FLWR_RUN=1 to run it. It starts Flower's managed local SuperLink (fixed local
ports) in a private FLWR_HOME with runtime dependency installation disabled (the app runs in
this environment), and stops it afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, strip_timings, tiny

pytestmark = [
    pytest.mark.flwr_run,
    pytest.mark.skipif(
        os.environ.get("FEDSIM_TEST_FLWR_RUN") != "1", reason="opt-in: set FEDSIM_TEST_FLWR_RUN=1"
    ),
]


def _stop_superlinks(flwr_home: Path) -> None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmdline and str(flwr_home) in cmdline:
            os.kill(int(proc.name), signal.SIGTERM)


def test_flwr_run_matches_the_inline_engine(tmp_path, run_tiny):
    flwr = str(Path(sys.executable).with_name("flwr"))  # beside this Python, on PATH or not
    assert Path(flwr).exists(), f"the flwr command is not installed ({flwr})"
    home = tmp_path / "flwr-home"
    home.mkdir()
    out = tmp_path / "flwr-out"
    overrides = " ".join(o for o in tiny() if not o.startswith("quiet"))
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # flwr starts flower-superlink and flwr-simulation by name: the venv's bin must be on PATH
        "PATH": f"{Path(flwr).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    try:
        proc = subprocess.run(
            [
                flwr,
                "run",
                str(ROOT),
                "--stream",
                "--federation-config",
                "num-supernodes=4",
                "--run-config",
                f"overrides='{overrides}' output-dir='{out}'",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            cwd=tmp_path,
        )
    finally:
        _stop_superlinks(home)
    assert (out / "summary.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    from fedsim.results import read_metrics

    _, inline, _ = run_tiny()
    got = strip_timings(read_metrics(out))
    want = strip_timings(inline)
    assert [r["round"] for r in got] == [0, 1, 2]
    for g, w in zip(got, want):
        for key in ("eval_accuracy", "bytes_up", "bytes_down", "clients_ok"):
            assert g[key] == w[key], key
        assert g["eval_loss"] == pytest.approx(w["eval_loss"], rel=1e-6)
