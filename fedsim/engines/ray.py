"""The ray engine: Flower's own simulation engine (Ray backend) runs the same apps.

By default Ray is started locally for the run (``address: null``) with ``num_cpus`` CPUs; with
``engine.address`` (``auto``, or the head's ``<host>:<port>``) the run attaches to a Ray
cluster someone started (``ray start --head``, ``ray start --address=...`` on each machine)
and its client actors spread over the cluster's nodes (docs/scale-out.md). Each client gets
``num_cpus_per_client`` CPUs and ``num_gpus_per_client`` GPUs. Start-up costs 15-40 s per run
on a small machine.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager

from fedsim import threads
from fedsim.config import RunSpec
from fedsim.errors import ConfigError
from fedsim.results import LOG_FILE
from fedsim.threads import usable_cpus
from fedsim.validate import integer, is_number, number


class RayEngine:
    """Parameters: ``address`` (None: a Ray started here for this run; ``auto`` or
    ``<host>:<port>``: attach to that running Ray cluster, whose nodes then run the client
    actors), ``num_cpus`` (None: all; a local Ray only), ``num_gpus`` (None: all; a local Ray
    only), ``num_cpus_per_client``, ``num_gpus_per_client``, ``num_threads`` (torch threads
    inside each client actor)."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        num_gpus: float | None = None,
        num_cpus_per_client: float = 1,
        num_gpus_per_client: float = 0.0,
        num_threads: int = 1,
    ) -> None:
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise ConfigError(
                "engine.address", address, "must be null (a local Ray), auto or <host>:<port>"
            )
        if address in ("local", ""):
            address = None
        if num_cpus is not None:
            integer("engine.num_cpus", num_cpus, low=1)
        if num_gpus is not None:
            whole_gpus("engine.num_gpus", num_gpus)
        if address is not None and (num_cpus is not None or num_gpus is not None):
            key = "engine.num_cpus" if num_cpus is not None else "engine.num_gpus"
            raise ConfigError(
                key,
                num_cpus if num_cpus is not None else num_gpus,
                f"sizes a local Ray; the cluster at engine.address={address} has its own "
                "resources (set it to null)",
            )
        self.address = address
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.num_cpus_per_client = number(
            "engine.num_cpus_per_client", num_cpus_per_client, low=0, low_open=True
        )
        self.num_gpus_per_client = gpu_share(num_gpus_per_client)
        self.num_threads = integer("engine.num_threads", num_threads, low=1)

    def check(self, sim: dict) -> None:
        """Resources must fit, or Ray's actor pool is empty and Flower's engine never returns
        (a cluster's resources are known only once attached: Ray refuses what does not fit).
        An address must have a cluster behind it, or ``ray.init`` waits for minutes."""
        if self.address is not None:
            check_address(self.address)
            return
        threads.check(self.num_threads)
        cpus = usable_cpus()
        if self.num_cpus is not None and self.num_cpus > cpus:
            raise ConfigError(
                "engine.num_cpus",
                self.num_cpus,
                f"must be at most the {cpus} CPUs this machine lets fedsim use (null: all)",
            )
        if self.num_cpus is not None:
            cpus = self.num_cpus
        if self.num_cpus_per_client > cpus:
            raise ConfigError(
                "engine.num_cpus_per_client",
                self.num_cpus_per_client,
                f"must be at most the CPUs Ray may use ({cpus}; engine.num_cpus)",
            )
        self._check_gpus(sim)

    def _check_gpus(self, sim: dict) -> None:
        import torch

        gpus = torch.cuda.device_count()
        if self.num_gpus is not None and self.num_gpus > gpus:
            raise ConfigError(
                "engine.num_gpus",
                self.num_gpus,
                f"must be at most the {gpus} GPUs torch sees on this machine (null: all)",
            )
        if self.num_gpus_per_client > 0:
            if self.num_gpus is not None:
                gpus = self.num_gpus
            if self.num_gpus_per_client > gpus:
                raise ConfigError(
                    "engine.num_gpus_per_client",
                    self.num_gpus_per_client,
                    f"must be at most the GPUs Ray may use ({gpus:g}; engine.num_gpus)",
                )
            if sim["device"] == "cpu":
                raise ConfigError(
                    "engine.num_gpus_per_client",
                    self.num_gpus_per_client,
                    "reserves GPUs, but sim.device=cpu trains on the CPU: set sim.device=cuda "
                    "(or auto), or 0",
                )

    def check_cluster(self, nodes: list[dict]) -> None:
        """A client actor must fit on one live node of the attached cluster, or Ray leaves it
        pending and Flower's engine never returns."""
        alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
        for key, name, need in (
            ("CPU", "engine.num_cpus_per_client", self.num_cpus_per_client),
            ("GPU", "engine.num_gpus_per_client", self.num_gpus_per_client),
        ):
            most = max((r.get(key, 0.0) for r in alive), default=0.0)
            if need > most:
                raise ConfigError(
                    name,
                    need,
                    f"no node of the Ray cluster at {self.address} has that many {key}s "
                    f"(the most on one node: {most:g})",
                )

    def backend_config(self) -> dict:
        init_args = {
            "address": self.address or "local",
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": False,
        }
        if self.num_cpus is not None:
            init_args["num_cpus"] = self.num_cpus
        if self.num_gpus is not None:
            init_args["num_gpus"] = self.num_gpus
        return {
            "init_args": init_args,
            "client_resources": {
                "num_cpus": self.num_cpus_per_client,
                "num_gpus": self.num_gpus_per_client,
            },
        }

    def run(self, spec: RunSpec) -> None:
        import ray
        from flwr.simulation import run_simulation

        from fedsim.apps import make_client_app, make_server_app

        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        flwr_log = logging.getLogger("flwr")
        flwr_log.setLevel(logging.WARNING)
        flwr_log.addFilter(_drop_run_simulation_notice)
        quiet = _log_to_file(flwr_log, spec.output_dir / LOG_FILE)
        abort = threading.Event()  # tells the ServerApp thread to stop if the engine dies
        if self.address is not None:  # Flower's backend reuses this connection
            ray.init(**self.backend_config()["init_args"])
            try:
                self.check_cluster(ray.nodes())
            except BaseException:
                ray.shutdown()
                raise
        try:
            with _on_loopback(self.address is None):
                run_simulation(
                    server_app=make_server_app(spec, abort),
                    client_app=make_client_app(spec.cfg),
                    num_supernodes=spec.cfg["sim"]["num_clients"],
                    backend_config=self.backend_config(),
                )
        except BaseException:
            abort.set()
            raise
        finally:
            flwr_log.removeFilter(_drop_run_simulation_notice)
            quiet()
            if ray.is_initialized():
                ray.shutdown()


def whole_gpus(key: str, value) -> float:
    """A local Ray's GPUs: a whole number >= 0 (Ray refuses fractions of a node's GPUs)."""
    if not is_number(value) or value < 0 or float(value) != int(value):
        raise ConfigError(key, value, "must be a whole number of GPUs >= 0 (null: all)")
    return value


def gpu_share(value) -> float:
    """``engine.num_gpus_per_client``: 0 (none), a share of one GPU in (0, 1] (clients share
    it: 0.25 puts four client actors on each GPU), or a whole number of GPUs."""
    whole = is_number(value) and float(value) == int(value) and value >= 0
    if not (whole or (is_number(value) and 0 < value <= 1)):
        raise ConfigError(
            "engine.num_gpus_per_client",
            value,
            "must be 0, a share of one GPU in (0, 1] (0.25: four clients per GPU) or a whole "
            "number of GPUs",
        )
    return float(value)


@contextmanager
def _on_loopback(local: bool):
    """A Ray started here serves on 127.0.0.1 only.

    Every process of a Ray node (GCS, raylet, runtime-env and dashboard agents, workers, the
    driver's core worker) binds its servers to the node's address, and to every interface
    unless that address is loopback. Ray 2.55 takes the node's address from
    ``services.get_node_ip_address()``: the machine's outward address on Linux, loopback where
    ``ray_constants.ENABLE_RAY_CLUSTER`` is off (Ray's default on macOS and Windows, the
    environment variable ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; read once, at import).
    ``ray.init(_node_ip_address="127.0.0.1")`` does not help: Ray turns a loopback address
    into the outward one. So the flag is off while Flower starts Ray, and restored after the
    run (an attached cluster's driver needs its outward address).
    tests/test_loopback.py lists the listening sockets of a run's processes."""
    if not local:
        yield
        return
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


#: how long fedsim waits for a cluster's address to accept a connection, and for its GCS
#: to answer, before refusing the address
CONNECT_TIMEOUT_S = 5.0
GCS_TIMEOUT_S = 60.0
#: asks the GCS at argv[1] for its cluster id, as ``ray.init`` does first (in a process of its
#: own: Ray's C++ client logs its retries on stderr and may wait)
_GCS_PROBE = (
    "import sys; from ray._raylet import GcsClient; GcsClient(address=sys.argv[1]).cluster_id"
)
_NO_CLUSTER = (
    "start the cluster first (`ray start --head`), or set engine.address=null for a Ray "
    "started for this run"
)


def check_address(address: str) -> None:
    """A Ray cluster must answer at ``address`` before anything starts: for an address nobody
    serves, ``ray.init`` retries for minutes (more than 300 s measured for ``127.0.0.1:1``),
    and ``auto`` without a cluster ends in a traceback. Ray's own look-up resolves ``auto``
    (``RAY_ADDRESS``, else the cluster ``ray start`` recorded, else a GCS running here), and
    ``RAY_ADDRESS`` overrides a given address, as in ``ray.init``. A TCP connection refused,
    an unknown host or 5 s without an answer fail at once; then the GCS must answer."""
    from ray._private.services import get_ray_address_from_environment

    client = address.startswith("ray://")  # a Ray Client server: checked for TCP only
    target = address.removeprefix("ray://")
    if not client:
        try:
            target = get_ray_address_from_environment(address, None)
        except ConnectionError:
            raise ConfigError(
                "engine.address",
                address,
                "Ray found no running cluster (RAY_ADDRESS is not set and no cluster was "
                "started on this machine): start one with `ray start --head`, or set "
                "engine.address=null for a Ray started for this run",
            ) from None
    where = target if target == address or client else f"{target} (Ray's address for {address})"
    if os.environ.get("RAY_ADDRESS") and not client:
        where = f"{target} (from RAY_ADDRESS)"
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            "engine.address",
            address,
            "must be null (a local Ray), auto or <host>:<port> (a port from 1 to 65535)",
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(
            "engine.address",
            address,
            f"nothing accepts connections at {where} ({reason}): {_NO_CLUSTER}",
        ) from None
    if not client:
        _probe_gcs(address, target, where)


def _probe_gcs(address: str, target: str, where: str) -> None:
    try:
        probe = subprocess.run(
            [sys.executable, "-c", _GCS_PROBE, target],
            capture_output=True,
            text=True,
            timeout=GCS_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        reason = f"no answer within {GCS_TIMEOUT_S:g} s"
    else:
        if probe.returncode == 0:
            return
        lines = [line for line in probe.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit status {probe.returncode}"
    raise ConfigError(
        "engine.address",
        address,
        f"no Ray cluster answers at {where} ({reason}): {_NO_CLUSTER}",
    )


def _log_to_file(logger: logging.Logger, path):
    """Send ``logger``'s records to the run's log instead of the terminal (Flower's engine logs
    a traceback for every client that raises; fedsim records each failure in metrics.jsonl and
    a failed run ends with one line). Returns the function that undoes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8", delay=True)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    consoles = [
        (h, h.level)
        for h in logger.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    for handler, _ in consoles:
        handler.setLevel(logging.CRITICAL + 1)
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(to_file)

    def undo() -> None:
        logger.removeHandler(to_file)
        to_file.close()
        logger.propagate = propagate
        for handler, level in consoles:
            handler.setLevel(level)

    return undo


def _drop_run_simulation_notice(record: logging.LogRecord) -> bool:
    """fedsim calls ``run_simulation`` on purpose (it is Flower's Ray engine); skip its notice."""
    return "run_simulation` function is deprecated" not in record.getMessage()
