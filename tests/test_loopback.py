"""A Ray started for a run (``engine=ray``, no ``engine.address``) listens on loopback only.

The run is a real ``python -m fedsim`` process; while it runs, every process of its tree (the
driver, gcs_server, raylet, the runtime-env agent, the workers) and every process whose
command line names its Ray session is asked for its listening sockets (psutil), and none may
listen on a non-loopback address (``0.0.0.0``, ``::``, the machine's own address).
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
import sys
import time

import psutil
import pytest

from fedsim.threads import usable_cpus
from tests.conftest import tiny


def is_loopback(ip: str) -> bool:
    """``127.0.0.0/8``, ``::1``, or an IPv4-mapped ``::ffff:127.x.y.z`` (a gRPC server bound
    to 127.0.0.1 on a dual-stack socket)."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def test_is_loopback_tells_the_addresses_apart():
    assert all(map(is_loopback, ["127.0.0.1", "127.0.1.1", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:10.0.0.1", "fe80::1"]))


SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_[\d-]+_\d+")


def _listening(procs: list[psutil.Process], found: dict, names: dict) -> None:
    for proc in procs:
        try:
            # asked each time: a process just forked still shows its parent's command line
            names[proc.pid] = " ".join(proc.cmdline())[:120] or names.get(proc.pid, "?")
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found[(conn.laddr.ip, conn.laddr.port)] = names[proc.pid]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass


def _session_processes(session: str) -> list[psutil.Process]:
    procs = []
    for proc in psutil.process_iter():
        try:
            if session in " ".join(proc.cmdline()):
                procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return procs


@pytest.mark.ray
def test_a_local_ray_run_listens_on_loopback_only(tmp_path):
    cpus = min(2, usable_cpus())  # more than the machine has is refused
    args = tiny("sim.num_clients=2", "sim.rounds=1", "engine=ray", f"engine.num_cpus={cpus}")
    run = subprocess.Popen(
        [sys.executable, "-m", "fedsim", *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    root = psutil.Process(run.pid)
    found: dict[tuple[str, int], str] = {}
    names: dict[int, str] = {}
    session = None
    deadline = time.monotonic() + 600
    while run.poll() is None and time.monotonic() < deadline:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        if session is None:
            session = next((m.group() for m in map(SESSION.search, names.values()) if m), None)
        if session is not None:
            procs += _session_processes(session)
        _listening(procs, found, names)
        time.sleep(0.2)
    if run.poll() is None:
        run.kill()
    _, err = run.communicate()
    assert run.returncode == 0, err[-3000:]
    servers = " ".join(found.values())
    assert "gcs_server" in servers and "raylet" in servers, found  # the scan saw Ray's servers
    exposed = {f"{ip}:{port}": who for (ip, port), who in found.items() if not is_loopback(ip)}
    assert not exposed, exposed
