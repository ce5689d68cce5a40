"""fedsim's Flower ServerApp: the round loop around a strategy, with fedsim's bookkeeping.

Each round: the strategy's ``configure_train`` picks the clients and builds the messages; the
grid delivers them (whatever the engine); replies are screened (no reply, an error, malformed
or non-finite arrays: counted as failed, with the reason); the strategy aggregates the good ones;
the global model is evaluated on the server's test set and on the clients' local test splits;
one line goes to ``metrics.jsonl``. Bytes are measured from the messages' payloads.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import flwr
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

import fedsim
from fedsim import checkpoint, keys
from fedsim.build import build_components
from fedsim.checkpoint import CHECKPOINT_FILE
from fedsim.config import RunSpec
from fedsim.data import take, validation_split
from fedsim.privacy import Accountant
from fedsim.progress import RoundPrinter, human_bytes
from fedsim.records import array_record, messages_payload, numpy_dict
from fedsim.results import ResultsWriter
from fedsim.resume import comparable
from fedsim.strategy import StrategyContext, check_arrays
from fedsim.training import evaluate

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """The run ended without a usable result (its summary.json says why)."""


class FederatedRun:
    """One simulation, driven from the ServerApp's ``main``."""

    def __init__(self, spec: RunSpec, grid: Grid, abort: threading.Event | None = None) -> None:
        self.spec, self.grid, self.abort = spec, grid, abort
        self.c = build_components(spec.cfg)
        self.sim = self.c.sim
        self.device = self.c.device
        self.model, self.adapter_spec = self.c.model(self.device)
        self.strategy = self.c.strategy
        self.writer = ResultsWriter(spec.output_dir)
        self.printer = RoundPrinter(self.sim["rounds"], quiet=spec.quiet)
        self.test_set = self.c.task.test_set()
        self.val_set = None  # sim.validation_fraction: held out of the test set
        fraction = float(self.sim.get("validation_fraction", 0.0))
        if fraction > 0:
            n = len(next(iter(self.test_set.values())))
            val, test = validation_split(n, fraction)
            self.val_set = take(self.test_set, val)
            self.test_set = take(self.test_set, test)
        self.last: dict[str, Any] = {}  # the latest line of metrics.jsonl
        self.totals = {
            "bytes_up": 0,
            "bytes_down": 0,
            "numel_up": 0,
            "numel_down": 0,
            "replies": 0,
            "sent": 0,
            "rounds_skipped": 0,
            "clients_failed": 0,
            "clients_failed_by_kind": {},
            "faults_injected": {},
        }
        self.aggregation_errors: list[float] = []
        self.state_bytes: dict[int, int] = {}  # client -> bytes of arrays in its Context.state
        self.epsilons: dict[int, tuple[float, float]] = {}  # client -> (epsilon, delta) so far
        self.central = self.c.privacy if self.c.privacy.central else None
        if self.central is not None:
            self.central.start(
                self.sim["num_clients"],
                self.sim["clients_per_round"],
                self.sim["rounds"],
                init_steps=int(self.init_from_clients),
            )
        self._round = 0
        self.adapter_init: dict[str, Any] = {}
        ck = spec.cfg.get("checkpoint", {})
        self.checkpoint_every = int(ck.get("every", 1))
        self.checkpoint_keep = bool(ck.get("keep", False))
        self.checkpoint_info: dict[str, Any] = {"every": self.checkpoint_every, "written": 0}
        self.elapsed_before = 0.0  # wall seconds of the run's earlier parts (resumed runs)
        self.resumed_from: list[int] = []

    # ------------------------------------------------------------------ set-up
    @property
    def init_from_clients(self) -> bool:
        """Whether LoRA-SB's initialisation takes a set-up round on client data."""
        adapter = self.c.adapter
        return bool(adapter.needs_data_init and getattr(adapter, "init_source", "") == "clients")

    def discover_nodes(self) -> dict[int, int]:
        """Ask every node for its partition id; returns partition id -> node id."""
        nodes = sorted(self.grid.get_node_ids())
        msgs = [
            Message(
                RecordDict({keys.CONFIG: ConfigRecord()}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
                group_id="0",
            )
            for n in nodes
        ]
        node_of: dict[int, int] = {}
        for reply in self.exchange(msgs):
            if reply.has_error():
                raise RuntimeError(
                    f"node {reply.metadata.src_node_id} failed: {reply.error.reason}"
                )
            node_of[int(reply.content[keys.CONFIG][keys.PARTITION_ID])] = reply.metadata.src_node_id
        n = self.sim["num_clients"]
        if sorted(node_of) != list(range(n)):
            raise RuntimeError(
                f"the federation has {len(node_of)} nodes with partition ids "
                f"{sorted(node_of)[:10]}...; "
                f"sim.num_clients={n} needs exactly the ids 0..{n - 1}"
            )
        return node_of

    def exchange(self, messages: list[Message]) -> list[Message]:
        """Send messages; collect replies until all are in, time is up, or the engine stops.

        Flower's ``send_and_receive`` with no timeout waits forever for a reply that never comes
        (a lost client, an engine that died); this pushes once and pulls until
        ``sim.round_timeout`` (if set) or until the engine signals that it stopped.
        """
        if not messages:
            return []
        pending = set(self.grid.push_messages(messages))
        timeout = self.sim["round_timeout"]
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = 0.001
        while True:
            for reply in self.grid.pull_messages(sorted(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
            if not pending:
                return replies
            if self.abort is not None and self.abort.is_set():
                raise RunFailed("the engine stopped while clients were still working")
            if deadline is not None and time.monotonic() >= deadline:
                return replies
            time.sleep(wait)
            wait = min(wait * 2, 0.05)

    # ------------------------------------------------------------------ one round
    def screen(
        self, sent: list[Message], replies: list[Message], check=None
    ) -> tuple[list[Message], list[dict[str, Any]]]:
        """Split replies into good ones (sorted by client) and failures with their reasons.

        ``check(reply)`` returns why a reply is refused, or None (default: the strategy's).
        """
        check = check or self.reject_reason
        by_id = {m.metadata.reply_to_message_id: m for m in replies}
        good, failures = [], []
        for msg in sent:
            client = self.strategy.context.client_of[msg.metadata.dst_node_id]
            reply = by_id.get(msg.metadata.message_id)
            if reply is None:
                kind = "no_reply"
                reason = f"no reply within sim.round_timeout={self.sim['round_timeout']} s"
            elif reply.has_error():
                kind = "error"
                reason = (
                    (reply.error.reason or f"error code {reply.error.code}")
                    .strip()
                    .splitlines()[-1]
                )
            else:
                kind, reason = "late", self.late_reason(reply)
                if reason is None:
                    kind, reason = "rejected", check(reply)
            if reason is None:
                good.append((client, reply))
            else:
                failures.append({"client": client, "kind": kind, "reason": reason})
        good.sort(key=lambda cr: cr[0])
        return [r for _, r in good], failures

    def late_reason(self, reply: Message) -> str | None:
        """Why a straggler's reply is dropped: its simulated delay is past ``faults.deadline``."""
        faults = self.c.faults
        if faults.deadline is None or keys.METRICS not in reply.content.metric_records:
            return None
        delay = reply.content[keys.METRICS].get(keys.DELAY)
        if delay is None or not faults.late(float(delay)):
            return None
        return f"late: simulated delay {float(delay):.2f} s > faults.deadline={faults.deadline:g} s"

    def injected(self, server_round: int, sent: list[Message]) -> dict[str, int]:
        """How many of the round's clients the fault injector crashed, slowed and corrupted
        (the clients' own draws, recomputed: see :mod:`fedsim.faults`)."""
        faults, client_of = self.c.faults, self.strategy.context.client_of
        draws = [
            faults.draw(self.sim["seed"], server_round, client_of[m.metadata.dst_node_id])
            for m in sent
        ]
        return {
            "crash": sum(d.crash for d in draws),
            "straggler": sum(d.straggler for d in draws),
            "late": sum(faults.late(d.delay) for d in draws),
            "corrupt": sum(d.corrupt is not None for d in draws),
        }

    @staticmethod
    def _missing_records(reply: Message) -> str | None:
        content = reply.content
        if keys.ARRAYS not in content.array_records or keys.METRICS not in content.metric_records:
            return "malformed reply: missing arrays or metrics"
        return None

    def reject_reason(self, reply: Message) -> str | None:
        content = reply.content
        if missing := self._missing_records(reply):
            return missing
        if keys.NUM_EXAMPLES not in content[keys.METRICS]:
            return f"malformed reply: no {keys.NUM_EXAMPLES}"
        client = self._client_of_reply(reply)
        return self.strategy.reply_reason(client, self._round, content[keys.ARRAYS])

    def _client_of_reply(self, reply: Message) -> int:
        return self.strategy.context.client_of[reply.metadata.src_node_id]

    def evaluate_global(self, server_round: int, arrays) -> dict[str, Any]:
        out: dict[str, Any] = {keys.EVAL_LOSS: None, keys.EVAL_ACCURACY: None}
        if not self.strategy.personalised:  # else there is no global model to evaluate
            self.strategy.load_global(self.model, self.adapter_spec, numpy_dict(arrays))
            res = evaluate(self.model, self.c.task, self.test_set, device=self.device)
            out = {keys.EVAL_LOSS: res.loss, keys.EVAL_ACCURACY: res.accuracy}
        if self.val_set is not None:
            out[keys.VAL_LOSS] = out[keys.VAL_ACCURACY] = None
            if not self.strategy.personalised:
                res = evaluate(self.model, self.c.task, self.val_set, device=self.device)
                out.update({keys.VAL_LOSS: res.loss, keys.VAL_ACCURACY: res.accuracy})
        msgs = list(
            self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(), self.grid)
        )
        fed = None
        if msgs:
            replies = sorted(self.exchange(msgs), key=self._client_of_reply)
            fed = self.strategy.aggregate_evaluate(server_round, replies)
        fed = dict(fed) if fed is not None else {}
        out["eval_loss_client_mean"] = fed.get("eval_loss_client_mean")
        out["eval_accuracy_client_mean"] = fed.get("eval_accuracy_client_mean")
        out["eval_accuracy_client_min"] = fed.get("eval_accuracy_client_min")
        out["clients_evaluated"] = int(fed.get("clients_evaluated", 0))
        return out

    def initialize_adapter(self) -> dict[str, Any]:
        """Data-driven adapter initialisation (LoRA-SB); returns round 0's bookkeeping.

        ``adapter.init.source=server``: on the task's server split, no traffic.
        ``clients``: a set-up round; the sampled clients send the gradient of each adapted base
        weight on their first examples (``ceil(init.examples / k)`` each), the server sums them.
        """
        adapter, spec, task = self.c.adapter, self.adapter_spec, self.c.task
        record = {
            keys.TRAIN_LOSS: None,
            "aggregation_error": None,
            "bytes_up": 0,
            "bytes_down": 0,
            "clients_sampled": 0,
            "clients_ok": 0,
            "clients_failed": 0,
            "failures": [],
            "round_skipped": False,
        }
        if not adapter.needs_data_init:
            self.adapter_init = {"method": getattr(adapter, "init_method", "default")}
            return record
        eta1 = self.sim["lr"] * self.c.schedule.factor(0, self.c.total_local_steps)
        info: dict[str, Any] = {"method": "gradient", "source": adapter.init_source, "eta1": eta1}
        if adapter.init_source == "server":
            data = {k: v[: adapter.init_examples] for k, v in task.server_set().items()}
            grads = adapter.base_gradients(self.model, spec, task.loss, data, self.device)
            info["examples"] = len(data[task.label_key])
            info["data"] = "the task's server split (held out from clients and test set)"
            if self.c.privacy.active:
                info["privacy"] = "server data: no client privacy spent on the initialisation"
        else:
            clients = self.strategy.train_clients(0)  # central DP: Poisson at rate q
            expected = self.sim["clients_per_round"] if self.central else len(clients)
            per_client = -(-adapter.init_examples // max(expected, 1))
            config = ConfigRecord({keys.SERVER_ROUND: 0, keys.INIT_EXAMPLES: per_client})
            sent = [
                Message(
                    RecordDict({keys.CONFIG: config}),
                    dst_node_id=self.strategy.context.node_of[c],
                    message_type=f"{MessageType.TRAIN}.{keys.ACTION_INIT}",
                    group_id="0",
                )
                for c in clients
            ]
            replies = self.exchange(sent)
            good, failures = self.screen(sent, replies, self.init_reject_reason)
            if not good and self.central is None:
                reason = failures[0]["reason"] if failures else "no replies"
                raise RunFailed(f"LoRA-SB initialisation: no client sent its gradient ({reason})")
            grads = {m: np.zeros(spec.shapes[m]) for m in spec.adapted_modules}
            contributions = []
            examples = 0
            for reply in good:
                values = reply.content[keys.METRICS]
                if values.get(keys.EPSILON) is not None:  # DP: the set-up step's spend
                    self.epsilons[self._client_of_reply(reply)] = (
                        float(values[keys.EPSILON]),
                        float(values[keys.DELTA]),
                    )
                got = numpy_dict(reply.content[keys.ARRAYS])
                contributions.append({m: got[spec.base_weight(m)] for m in spec.adapted_modules})
                examples += int(reply.content[keys.METRICS][keys.NUM_EXAMPLES])
            record["bytes_up"], _ = messages_payload(replies)
            record["bytes_down"], _ = messages_payload(sent)
            record.update(
                clients_sampled=len(sent),
                clients_ok=len(good),
                clients_failed=len(failures),
                failures=failures,
            )
            info["examples"] = examples
            info["clients"] = sorted(self._client_of_reply(r) for r in good)
            if self.central is not None:  # one Gaussian mechanism at rate q, like a round
                grads = self.central.noised_sum(
                    contributions, {m: spec.shapes[m] for m in grads}, self.sim["seed"], 0
                )
                self.central.accountant.step(self.central.sigma_value, self.central.q)
                info["privacy"] = (
                    "each client's gradient direction scaled to privacy.clip_norm, the sum "
                    "noised (LoRA-SB uses its sign); one more step at rate q, included in epsilon"
                )
                record["epsilon"] = record["epsilon_mean"] = self.central_epsilon()
            else:
                for contribution in contributions:
                    for m, g in contribution.items():
                        grads[m] += g
            if self.c.privacy.client_dp:
                info["privacy"] = "clipped and noised per client; its epsilon is in the total"
                eps = [e for e, _ in self.epsilons.values()]
                record["epsilon"] = max(eps, default=0.0)
                record["epsilon_mean"] = sum(eps) / self.sim["num_clients"]
        adapter.initialize(self.model, spec, grads, eta1)
        self.adapter_init = info
        return record

    def init_reject_reason(self, reply: Message) -> str | None:
        """Why a set-up reply is refused: every adapted base weight's gradient, finite."""
        spec = self.adapter_spec
        shapes = {spec.base_weight(m): spec.shapes[m] for m in spec.adapted_modules}
        return self._missing_records(reply) or check_arrays(reply.content[keys.ARRAYS], shapes)

    # ------------------------------------------------------------------ the run
    def train_round(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict]:
        """One training round; returns the new global arrays and the round's bookkeeping."""
        self._round = server_round
        sent = list(self.strategy.configure_train(server_round, arrays, ConfigRecord(), self.grid))
        bytes_down, numel_down = self.strategy.traffic(sent)
        replies = self.exchange(sent)
        good, failures = self.screen(sent, replies)
        bytes_up, numel_up = self.strategy.traffic(replies)
        for reply in replies:
            if reply.has_content() and keys.METRICS in reply.content.metric_records:
                values = reply.content[keys.METRICS]
                client = self._client_of_reply(reply)
                if values.get(keys.STATE_BYTES) is not None:
                    self.state_bytes[client] = int(values[keys.STATE_BYTES])
                if values.get(keys.EPSILON) is not None:  # DP-SGD: the client's spend so far
                    self.epsilons[client] = (float(values[keys.EPSILON]), float(values[keys.DELTA]))
        # Central DP releases a noised sum every round, whoever replied (keeping the model
        # unchanged would be an outcome the accountant does not cover).
        skipped = self.central is None and len(good) < self.sim["min_clients"]
        train_loss = None
        error = None
        if not skipped:
            new_arrays, train_metrics = self.strategy.aggregate_train(server_round, good)
            if new_arrays is not None:
                arrays = new_arrays
            if train_metrics is not None:
                train_loss = train_metrics.get(keys.TRAIN_LOSS)
            error = self.strategy.last_aggregation_error
            if error is not None:
                self.aggregation_errors.append(error)
        else:  # nothing aggregated, but the clients that replied hold what they were sent
            self.strategy.acknowledge(server_round, self.strategy.updates_from(good))
        self.totals["numel_up"] += numel_up
        self.totals["numel_down"] += numel_down
        self.totals["replies"] += sum(1 for r in replies if r.has_content())
        self.totals["sent"] += len(sent)
        privacy = {}
        if self.central is not None:  # every round counts, whoever was sampled
            self.central.accountant.step(self.central.sigma_value, self.central.q)
            eps = self.central_epsilon()
            privacy = {"epsilon": eps, "epsilon_mean": eps}
        if self.c.privacy.client_dp:
            eps = [e for e, _ in self.epsilons.values()]
            privacy = {
                "epsilon": max(eps, default=0.0),
                "epsilon_mean": sum(eps) / self.sim["num_clients"],
            }
        faults = (
            {"faults_injected": self.injected(server_round, sent)} if self.c.faults.active else {}
        )
        return arrays, {
            keys.TRAIN_LOSS: train_loss,
            **privacy,
            "aggregation_error": error,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "clients_sampled": len(sent),
            "clients_ok": len(good),
            "clients_failed": len(failures),
            "failures": failures,
            "round_skipped": skipped,
            **faults,
            **({} if skipped else self.strategy.round_metrics),
        }

    def record_round(self, server_round: int, arrays: ArrayRecord, train: dict, t0: float) -> None:
        """Evaluate, then write and print the round's line of metrics.jsonl."""
        t_eval = time.perf_counter()
        record = {
            "round": server_round,
            keys.TRAIN_LOSS: train[keys.TRAIN_LOSS],
            **self.evaluate_global(server_round, arrays),
            **train,
        }
        now = time.perf_counter()
        record["round_time_s"] = now - t0
        record["eval_time_s"] = now - t_eval
        self.writer.append_round(record)
        self.c.logger.log_round(record)
        self.printer.round(record)
        if record["failures"]:
            first = record["failures"][0]
            message = (
                f"round {server_round}: {len(record['failures'])} client(s) failed, "
                f"e.g. client {first['client']}: {first['reason']}"
            )
            if record["round_skipped"]:
                message += f"; fewer than sim.min_clients={self.sim['min_clients']} good "
                message += "replies, the global model was kept"
            self.printer.warning(message)
        self.totals["rounds_skipped"] += int(record["round_skipped"])
        self.totals["clients_failed"] += record["clients_failed"]
        for failure in record["failures"]:
            kinds = self.totals["clients_failed_by_kind"]
            kinds[failure["kind"]] = kinds.get(failure["kind"], 0) + 1
        for kind, n in record.get("faults_injected", {}).items():
            injected = self.totals["faults_injected"]
            injected[kind] = injected.get(kind, 0) + n
        self.totals["bytes_up"] += record["bytes_up"]
        self.totals["bytes_down"] += record["bytes_down"]
        self.last = record

    def finish(self, summary: dict[str, Any]) -> None:
        """Write summary.json (the run's record), then tell the logging sink."""
        self.writer.write_summary(summary)
        self.writer.close()
        self.c.logger.finish(summary)

    def run(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        sim = self.sim
        resume = self.load_checkpoint() if self.spec.resume is not None else None
        if resume is None:
            self.writer.write_config(self.spec.cfg)
        self.c.logger.start(self.spec.output_dir, self.spec.cfg, self.spec.choices)
        shown = ("task", "adapter", "strategy", "partition", "engine")
        self.printer.header(
            " ".join(f"{k}={v}" for k, v in self.spec.choices.items() if k in shown)
            + f"  clients {sim['clients_per_round']}/{sim['num_clients']}  rounds {sim['rounds']}"
            + f"  -> {self.spec.output_dir}"
        )
        try:
            t0 = time.perf_counter()
            node_of = self.discover_nodes()
            self.strategy.bind(
                StrategyContext(
                    self.c.sampler(),
                    node_of,
                    self.adapter_spec,
                    sim["seed"],
                    aggregation_error=sim["aggregation_error"],
                    codec=self.c.codec(),
                    downlink=self.c.downlink_codec(),
                    central=self.central,
                )
            )
            self.strategy.summary()
            if resume is None:
                setup = self.initialize_adapter()
                arrays = array_record(self.strategy.initial_arrays(self.model, self.adapter_spec))
                self.record_round(0, arrays, setup, t0)
                self.checkpoint(0, arrays, t_start)
                first = 1
            else:
                arrays = self.restore(resume)
                first = int(resume["round"]) + 1
            for server_round in range(first, sim["rounds"] + 1):
                t0 = time.perf_counter()
                arrays, train = self.train_round(server_round, arrays)
                self.record_round(server_round, arrays, train, t0)
                self.checkpoint(server_round, arrays, t_start)
        except Exception as exc:
            summary = self.summary(
                self.elapsed(t_start), status="failed", error=f"{type(exc).__name__}: {exc}"
            )
            self.finish(summary)
            log.debug("run failed:\n%s", traceback.format_exc())
            raise
        if sim["rounds"] and self.totals["rounds_skipped"] == sim["rounds"]:
            first = self.last["failures"][0]["reason"] if self.last["failures"] else "?"
            error = (
                f"every round was skipped: no round had sim.min_clients="
                f"{sim['min_clients']} good replies (last failure: {first})"
            )
            summary = self.summary(self.elapsed(t_start), status="failed", error=error)
            self.finish(summary)
            raise RunFailed(error)
        self.export_info = self.export(arrays)
        summary = self.summary(self.elapsed(t_start), status="ok")
        self.finish(summary)
        self.drop_checkpoint()
        self.printer.line(
            f"done in {summary['wall_time_s']:.1f} s: "
            + (
                f"accuracy {summary['final_eval_accuracy']:.4f}, "
                if summary["final_eval_accuracy"] is not None
                else f"client accuracy {summary['final_eval_accuracy_client_mean']:.4f} "
                f"(personal models), "
            )
            + f"up {human_bytes(summary['bytes_up_total'])}, "
            f"down {human_bytes(summary['bytes_down_total'])}"
            + (
                f", max aggregation error {summary['aggregation_error_max']:.2e}"
                if summary["aggregation_error_max"] is not None
                else ""
            )
        )
        return summary

    # ------------------------------------------------------------------ checkpoints
    def elapsed(self, t_start: float) -> float:
        """Wall seconds of the whole run, earlier parts of a resumed run included."""
        return self.elapsed_before + time.perf_counter() - t_start

    @property
    def checkpoint_path(self) -> Path:
        return self.spec.output_dir / CHECKPOINT_FILE

    def checkpoint(self, server_round: int, arrays: ArrayRecord, t_start: float) -> None:
        """Write the checkpoint after ``server_round`` when it is due (``checkpoint.every``;
        the last round only with ``checkpoint.keep``: a finished run needs none)."""
        every = self.checkpoint_every
        if every == 0 or not hasattr(self.grid, "node_states"):
            return
        last = server_round == self.sim["rounds"]
        if (server_round % every and not last) or (last and not self.checkpoint_keep):
            return
        t0 = time.perf_counter()
        size = checkpoint.save(
            self.checkpoint_path, self.checkpoint_state(server_round, arrays, t_start)
        )
        self.checkpoint_info.update(
            written=self.checkpoint_info["written"] + 1,
            last_round=server_round,
            bytes=size,
            write_time_s=time.perf_counter() - t0,
        )

    def drop_checkpoint(self) -> None:
        """A finished run keeps its checkpoint only with ``checkpoint.keep``."""
        tmp = self.checkpoint_path.with_name(f".{CHECKPOINT_FILE}.tmp")  # a kill mid-write
        tmp.unlink(missing_ok=True)
        if not self.checkpoint_keep and self.checkpoint_path.exists():
            self.checkpoint_path.unlink()
            checkpoint.sync_folder(self.spec.output_dir)

    def checkpoint_state(self, server_round: int, arrays: ArrayRecord, t_start: float) -> dict:
        """Everything the run needs to continue after ``server_round`` (see
        :mod:`fedsim.checkpoint`)."""
        ctx = self.strategy.context
        clients = {
            ctx.client_of[node]: checkpoint.record_dict_state(state)
            for node, state in self.grid.node_states().items()
        }
        return {
            "format": checkpoint.FORMAT,
            "round": server_round,
            "config": comparable(self.spec.cfg),
            "choices": dict(self.spec.choices),
            "fedsim": fedsim.__version__,
            "arrays": numpy_dict(arrays),
            "strategy": self.strategy.state_dict(),
            "feedback": ctx.codec.feedback.state_dict() if ctx.codec is not None else None,
            "downlink": ctx.downlink.state_dict() if ctx.downlink is not None else None,
            "central": None if self.central is None else list(self.central.accountant.history),
            "clients": clients,
            "run": {
                "totals": self.totals,
                "aggregation_errors": self.aggregation_errors,
                "state_bytes": self.state_bytes,
                "epsilons": self.epsilons,
                "last": self.last,
                "adapter_init": self.adapter_init,
                "elapsed_s": self.elapsed(t_start),
                "resumed_from": self.resumed_from,
                "checkpoints_written": self.checkpoint_info["written"] + 1,
            },
            "rng": checkpoint.rng_state(),
        }

    def load_checkpoint(self) -> dict:
        """Read the checkpoint to resume from, and cut ``metrics.jsonl`` back to its round."""
        try:
            state = checkpoint.load(self.spec.resume)
        except ValueError as e:
            raise RunFailed(str(e)) from None
        if state.get("format") != checkpoint.FORMAT:
            raise RunFailed(
                f"{self.spec.resume} has checkpoint format {state.get('format')}; this fedsim "
                f"reads format {checkpoint.FORMAT}"
            )
        if state["config"] != comparable(self.spec.cfg):
            raise RunFailed(f"{self.spec.resume} belongs to another configuration")
        try:
            self.writer.resume(int(state["round"]))
        except ValueError as e:
            raise RunFailed(str(e)) from None
        return state

    def restore(self, state: dict) -> ArrayRecord:
        """Put the server, the strategy and every client back where the checkpoint left
        them; returns the global arrays."""
        ctx = self.strategy.context
        run = state["run"]  # first: a failure below still reports the rounds done
        self.totals = run["totals"]
        self.aggregation_errors = list(run["aggregation_errors"])
        self.state_bytes = {int(c): int(b) for c, b in run["state_bytes"].items()}
        self.epsilons = {int(c): (float(e), float(d)) for c, (e, d) in run["epsilons"].items()}
        self.last = run["last"]
        self.adapter_init = run["adapter_init"]
        self.elapsed_before = float(run["elapsed_s"])
        self.resumed_from = [*run["resumed_from"], int(state["round"])]
        self.checkpoint_info["written"] = int(run["checkpoints_written"])
        self.checkpoint_info["last_round"] = int(state["round"])
        self.strategy.load_state_dict(state["strategy"])
        self.adapter_spec.load(self.model, self.strategy.frozen)  # data-derived factors
        if ctx.codec is not None:
            ctx.codec.feedback.load_state_dict(state["feedback"])
        if ctx.downlink is not None:
            ctx.downlink.load_state_dict(state["downlink"])
        if self.central is not None:
            self.central.accountant = Accountant([tuple(h) for h in state["central"]])
        self.grid.load_node_states(
            {
                ctx.node_of[int(client)]: checkpoint.record_dict_from_state(tree)
                for client, tree in state["clients"].items()
            }
        )
        checkpoint.set_rng_state(state["rng"])
        self.printer.line(f"resumed after round {state['round']} from {self.spec.resume}")
        return array_record(state["arrays"])

    def central_epsilon(self) -> float:
        """The run's epsilon so far under central DP."""
        return self.central.accountant.epsilon(self.central.delta_for(self.sim["num_clients"]))

    def privacy_summary(self) -> dict[str, Any]:
        """Epsilon and delta of the run: the max over clients (client DP-SGD)."""
        if self.central is not None:
            n = self.sim["num_clients"]
            return {
                "epsilon": self.central_epsilon(),
                "delta": self.central.delta_for(n),
                "noise_multiplier": self.central.sigma_value,
                "privacy": "central DP-FedAvg (user level), Poisson sampling at rate "
                f"q={self.central.q:g}, RDP accountant, one step per round"
                + (" and one for the set-up round" if self.init_from_clients else ""),
            }
        if not self.c.privacy.client_dp:
            return {}
        spent = list(self.epsilons.values())
        return {
            "epsilon": max((e for e, _ in spent), default=0.0),
            "delta": max((d for _, d in spent), default=None),
            "privacy": "client DP-SGD (sample level), RDP accountant per client across rounds",
        }

    def export(self, arrays: ArrayRecord) -> dict[str, Any]:
        """The global model's change as a PEFT LoRA adapter in ``adapter/`` (see
        :mod:`fedsim.export`); returns the summary's ``export`` block."""
        if not self.spec.cfg.get("export", True):
            return {"skipped": "export=false"}
        if self.strategy.personalised:
            name = type(self.strategy).__name__
            return {"skipped": f"strategy {name} has no global model (personal adapters)"}
        from fedsim.export import export_peft

        self.strategy.load_global(self.model, self.adapter_spec, numpy_dict(arrays))
        task = self.c.task
        try:
            return export_peft(
                self.model,
                self.adapter_spec,
                task.build_model(),
                tuple(task.head_modules),
                self.spec.output_dir / "adapter",
                base_model=getattr(task, "model_path", None),
                base_changes=getattr(self.strategy, "base_delta", None),
                task_type=task.peft_task_type,
            )
        except Exception as e:  # the run itself succeeded: say why there is no adapter
            log.debug("export failed:\n%s", traceback.format_exc())
            return {"failed": f"{type(e).__name__}: {e}"}

    def checkpoint_summary(self) -> dict[str, Any]:
        """The summary's ``checkpoint`` block."""
        if self.checkpoint_every and not hasattr(self.grid, "node_states"):
            return {
                "every": self.checkpoint_every,
                "written": 0,
                "skipped": (
                    "this engine keeps client states in its own processes; checkpoints need "
                    "engine=inline or engine=batched"
                ),
            }
        return {**self.checkpoint_info, "kept": self.checkpoint_keep}

    def summary(self, wall: float, status: str, error: str | None = None) -> dict[str, Any]:
        last, totals = self.last, self.totals
        sim, ch = self.sim, self.spec.choices
        out = {
            "status": status,
            "task": ch.get("task"),
            "strategy": ch.get("strategy"),
            "adapter": ch.get("adapter"),
            "partition": ch.get("partition"),
            "engine": ch.get("engine"),
            "compressor": ch.get("compressor"),
            "feedback": ch.get("feedback"),
            "privacy": ch.get("privacy"),
            "faults": ch.get("faults"),
            "rounds": sim["rounds"],
            "rounds_completed": last.get("round", 0),
            "rounds_skipped": totals["rounds_skipped"],
            "clients_failed_total": totals["clients_failed"],
            "clients_failed_by_kind": dict(sorted(totals["clients_failed_by_kind"].items())),
            **(
                {"faults_injected_total": dict(totals["faults_injected"])}
                if self.c.faults.active
                else {}
            ),
            "num_clients": sim["num_clients"],
            "clients_per_round": sim["clients_per_round"],
            "final_eval_loss": last.get(keys.EVAL_LOSS),
            "final_eval_accuracy": last.get(keys.EVAL_ACCURACY),
            "final_eval_accuracy_client_mean": last.get("eval_accuracy_client_mean"),
            "final_eval_accuracy_client_min": last.get("eval_accuracy_client_min"),
            **(
                {
                    "final_val_loss": last.get(keys.VAL_LOSS),
                    "final_val_accuracy": last.get(keys.VAL_ACCURACY),
                }
                if self.val_set is not None
                else {}
            ),
            "aggregation_error_max": max(self.aggregation_errors, default=None),
            "client_state_bytes": sum(self.state_bytes.values()),
            **self.privacy_summary(),
            "adapter_init": self.adapter_init,
            "export": getattr(self, "export_info", None),
            "bytes_up_total": totals["bytes_up"],
            "bytes_down_total": totals["bytes_down"],
            "params_sent_per_client": {
                "up": totals["numel_up"] / totals["replies"] if totals["replies"] else 0,
                "down": totals["numel_down"] / totals["sent"] if totals["sent"] else 0,
            },
            "trainable_params": self.adapter_spec.num_trained(self.model),
            "wall_time_s": wall,
            "checkpoint": self.checkpoint_summary(),
            "resumed_from": self.resumed_from,
            "seed": sim["seed"],
            "versions": {
                "fedsim": fedsim.__version__,
                "flwr": flwr.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
        if error is not None:
            out["error"] = error
        return out


def make_server_app(spec: RunSpec | None = None, abort: threading.Event | None = None) -> ServerApp:
    """A ServerApp for ``spec``; ``None``: the config comes from the run_config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        run_spec = spec
        if run_spec is None:
            from fedsim.flwr_run import spec_from_run_config

            run_spec = spec_from_run_config(context.run_config)
        FederatedRun(run_spec, grid, abort).run()

    return app


#: the ServerApp that ``flwr run .`` loads (pyproject ``[tool.flwr.app.components]``)
app = make_server_app()
