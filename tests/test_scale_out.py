"""Opt-in (FEDSIM_TEST_SCALE_OUT=1): the same apps on a Ray cluster fedsim attaches to, and on
Flower's Deployment Engine (a SuperLink and two SuperNodes, each its own process, on loopback).

Both start real servers on free local ports, in private folders, and stop them afterwards; a
run takes one to three minutes on two cores, so they are not part of the default suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from fedsim.results import read_metrics
from tests.conftest import strip_timings, tiny
from tests.test_loopback import is_loopback

pytestmark = [
    pytest.mark.scale_out,
    pytest.mark.skipif(
        os.environ.get("FEDSIM_TEST_SCALE_OUT") != "1",
        reason="opt-in: set FEDSIM_TEST_SCALE_OUT=1",
    ),
]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ListeningSockets(threading.Thread):
    """Every address the process trees of ``procs`` listen on, sampled until ``stop()``."""

    def __init__(self, procs: list[subprocess.Popen]) -> None:
        super().__init__(daemon=True)
        self.procs, self.found, self._done = procs, {}, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            for popen in list(self.procs):
                try:
                    root = psutil.Process(popen.pid)
                    tree = [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                for proc in tree:
                    try:
                        who = " ".join(proc.cmdline())[:100]
                        for conn in proc.net_connections(kind="inet"):
                            if conn.status == psutil.CONN_LISTEN:
                                self.found[(conn.laddr.ip, conn.laddr.port)] = who
                    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                        pass
            time.sleep(0.3)

    def stop(self) -> dict[str, str]:
        """The non-loopback ones."""
        self._done.set()
        self.join()
        return {f"{ip}:{port}": w for (ip, port), w in self.found.items() if not is_loopback(ip)}


def same_results(got_rows, want_rows):
    assert [r["round"] for r in got_rows] == [r["round"] for r in want_rows]
    for g, w in zip(strip_timings(got_rows), strip_timings(want_rows)):
        for key in ("bytes_up", "bytes_down", "clients_ok", "clients_sampled"):
            assert g[key] == w[key], key
        if w["eval_loss"] is not None:
            assert g["eval_loss"] == pytest.approx(w["eval_loss"], rel=1e-6)


def test_the_ray_engine_attaches_to_a_running_cluster(tmp_path, run_tiny):
    port = free_port()
    short = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen(  # --block: this process owns the cluster; stopping it stops Ray
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={short}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        time.sleep(3)
        args = tiny("sim.clients_per_round=3")
        out = tmp_path / "run"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedsim",
                *args,
                "engine=ray",
                f"engine.address=127.0.0.1:{port}",
                f"hydra.run.dir={out}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        too_big = subprocess.run(
            [sys.executable, "-m", "fedsim", *args, "engine=ray", "engine.num_cpus_per_client=8",
             f"engine.address=127.0.0.1:{port}", f"hydra.run.dir={tmp_path / 'big'}"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )  # fmt: skip
        assert too_big.returncode == 2, too_big.stderr[-2000:]
        assert "no node of the Ray cluster" in too_big.stderr
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
    _, inline, _ = run_tiny(base=args)
    same_results(read_metrics(out), inline)


def test_a_superlink_and_two_supernodes_run_the_apps(tmp_path, run_tiny):
    """Flower's Deployment Engine: each SuperNode is its own process with its partition id;
    ``flwr run`` submits the app to the SuperLink, which runs the ServerApp."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link}"\n'
        "insecure = true\n"
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []

    def start(name: str, cmd: list[str]) -> None:
        log = open(logs / f"{name}.log", "w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=tmp_path))

    args = [o for o in tiny("sim.num_clients=2") if not o.startswith("quiet")]
    out = tmp_path / "run"
    scan = ListeningSockets(procs)  # the recipe of docs/scale-out.md listens on loopback only
    try:
        start(
            "superlink",
            [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
             str(link), "--disable-runtime-dependency-installation"],
        )  # fmt: skip
        scan.start()
        time.sleep(3)
        for i in range(2):
            start(
                f"supernode{i}",
                [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                 f"127.0.0.1:{link}", "--host", "127.0.0.1", "--port", str(free_port()),
                 "--node-config", f"partition-id={i} num-partitions=2"],
            )  # fmt: skip
        time.sleep(3)
        run = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(Path(__file__).resolve().parents[1]),
                "test",
                "--stream",
                "--run-config",
                f"overrides='{' '.join(args)}' output-dir='{out}'",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            cwd=tmp_path,
        )
    finally:
        exposed = scan.stop() if scan.is_alive() else {}
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    detail = run.stdout[-2000:] + run.stderr[-2000:]
    assert scan.found, "the scan saw no listening socket"
    assert not exposed, exposed
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (out / name).exists(), detail
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["engine"] == "flwr-run", detail
    _, inline, _ = run_tiny(base=tiny("sim.num_clients=2"))
    same_results(read_metrics(out), inline)
