"""Optional logging sinks (``conf/logger``): TensorBoard and MLflow, off by default.

The run folder's files (``metrics.jsonl``, ``summary.json``) stay the record; a sink copies the
numbers into a tool's own store as the run goes: every numeric field of each round's metrics
line at step ``round``, the run's choices and main settings as parameters, and the summary's
final numbers and status at the end. A sink that fails while the run goes on logs one warning
and stops; the run does not fail because of it.

* ``logger=tensorboard``: event files in ``<run folder>/tensorboard/`` (``logger.dir`` to
  choose), scalars grouped as ``eval/``, ``train/``, ``bytes/``, ...; the final numbers also as
  TensorBoard hparams, so runs of a sweep compare in its HPARAMS tab.
  ``tensorboard --logdir results/`` shows every run below that folder.
* ``logger=mlflow``: a run in a local MLflow tracking store, by default the SQLite file
  ``results/mlflow.db`` under the folder fedsim was started from (MLflow 3 keeps its
  plain-file store in maintenance mode only), experiment ``fedsim``.
  ``mlflow ui --backend-store-uri sqlite:///results/mlflow.db`` browses it.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from typing import Any

from fedsim.errors import ConfigError

log = logging.getLogger(__name__)

#: settings logged as parameters besides the config-group choices
PARAMS = (
    "sim.num_clients",
    "sim.clients_per_round",
    "sim.rounds",
    "sim.local_steps",
    "sim.batch_size",
    "sim.lr",
    "sim.seed",
    "adapter.r",
)

#: final numbers of summary.json logged when the run ends
FINAL = (
    "final_eval_accuracy",
    "final_eval_loss",
    "final_val_accuracy",
    "final_val_loss",
    "bytes_up_total",
    "bytes_down_total",
    "epsilon",
    "wall_time_s",
    "aggregation_error_max",
)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics line (no round, lists, booleans or nulls)."""
    out = {}
    for key, value in record.items():
        if key == "round" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


def params(cfg: dict[str, Any], choices: dict[str, Any]) -> dict[str, str]:
    out = {f"choice.{k}": str(v) for k, v in sorted(choices.items())}
    for dotted in PARAMS:
        node: Any = cfg
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            out[dotted] = str(node)
    return out


class Sink:
    """Base class: does nothing (``logger=none``)."""

    name = "none"

    def start(self, output_dir: Path, cfg: dict[str, Any], choices: dict[str, Any]) -> None:
        """Called once, when the run starts."""

    def log_round(self, record: dict[str, Any]) -> None:
        """Called with every line written to ``metrics.jsonl``."""

    def finish(self, summary: dict[str, Any]) -> None:
        """Called once with ``summary.json``'s content, finished or failed."""

    # the guard: a sink's failure costs a warning, never the run
    def _safely(self, what: str, fn, *args) -> None:
        if getattr(self, "_broken", False):
            return
        try:
            fn(*args)
        except Exception as e:  # the results files stay complete; only the copy stops
            self._broken = True
            log.warning(
                "logger=%s stopped: %s failed: %s: %s", self.name, what, type(e).__name__, e
            )


def _need(package: str, pip_name: str, group: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            "logger", group, f"needs the PyPI package {pip_name}: pip install {pip_name}"
        )


class NoSink(Sink):
    pass


class TensorBoard(Sink):
    """Scalars and hparams into TensorBoard event files."""

    name = "tensorboard"

    def __init__(self, dir: str | None = None) -> None:  # noqa: A002  (the config key)
        _need("tensorboard", "tensorboard", self.name)
        self.dir = dir
        self.writer = None
        self._params: dict[str, str] = {}

    def start(self, output_dir, cfg, choices) -> None:
        def open_writer() -> None:
            from torch.utils.tensorboard import SummaryWriter

            folder = Path(self.dir) if self.dir else Path(output_dir) / "tensorboard"
            self.writer = SummaryWriter(log_dir=str(folder))
            self._params = params(cfg, choices)
            table = "\n".join(f"| {k} | {v} |" for k, v in self._params.items())
            self.writer.add_text("run", "| setting | value |\n|---|---|\n" + table, 0)

        self._safely("start", open_writer)

    def log_round(self, record) -> None:
        def write() -> None:
            step = int(record["round"])
            for key, value in scalars(record).items():
                self.writer.add_scalar(_tag(key), value, step)
            self.writer.flush()

        if self.writer is not None:
            self._safely("log_round", write)

    def finish(self, summary) -> None:
        def close() -> None:
            final = {f"final/{k}": float(summary[k]) for k in FINAL if _number(summary.get(k))}
            final["final/ok"] = float(summary.get("status") == "ok")
            self.writer.add_hparams(self._params, final, run_name=".")
            self.writer.close()

        if self.writer is not None:
            self._safely("finish", close)


def _tag(key: str) -> str:
    for prefix in ("eval", "val", "train", "bytes", "clients", "epsilon", "aggregator"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1 :]}"
    return f"run/{key}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class MLflow(Sink):
    """A run in a local MLflow tracking store."""

    name = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str = "fedsim") -> None:
        _need("mlflow", "mlflow-skinny", self.name)
        self.tracking_uri = tracking_uri
        self.experiment = str(experiment)
        self.client = None
        self.run_id: str | None = None

    def uri(self) -> str:
        if self.tracking_uri:
            return str(self.tracking_uri)
        db = (Path.cwd() / "results" / "mlflow.db").resolve()
        return f"sqlite:///{db}"

    def start(self, output_dir, cfg, choices) -> None:
        def open_run() -> None:
            from mlflow.tracking import MlflowClient

            uri = self.uri()
            if uri.startswith("sqlite:///"):
                Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            logging.getLogger("mlflow").setLevel(logging.WARNING)
            logging.getLogger("alembic").setLevel(logging.WARNING)
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(self.experiment)
            experiment = (
                found.experiment_id if found else self.client.create_experiment(self.experiment)
            )
            run = self.client.create_run(
                experiment,
                run_name=Path(output_dir).name,
                tags={"fedsim.output_dir": str(Path(output_dir).resolve())},
            )
            self.run_id = run.info.run_id
            for key, value in params(cfg, choices).items():
                self.client.log_param(self.run_id, key, value)

        self._safely("start", open_run)

    def log_round(self, record) -> None:
        def write() -> None:
            from mlflow.entities import Metric

            step, now = int(record["round"]), _millis()
            metrics = [Metric(k, v, now, step) for k, v in scalars(record).items()]
            self.client.log_batch(self.run_id, metrics=metrics)

        if self.run_id is not None:
            self._safely("log_round", write)

    def finish(self, summary) -> None:
        def close() -> None:
            for key in FINAL:
                if _number(summary.get(key)):
                    self.client.log_metric(
                        self.run_id, f"final_{key.removeprefix('final_')}", float(summary[key])
                    )
            self.client.set_tag(self.run_id, "status", str(summary.get("status")))
            if summary.get("error"):
                self.client.set_tag(self.run_id, "error", str(summary["error"])[:500])
            ok = summary.get("status") == "ok"
            self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")

        if self.run_id is not None:
            self._safely("finish", close)


def _millis() -> int:
    import time

    return int(time.time() * 1000)
