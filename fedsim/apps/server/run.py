"""The round loop: one simulation, driven from the ServerApp's ``main``.

Each round: the :class:`~fedsim.strategy.Federation` (the strategy inside the uplink chain)
builds the messages; the transport delivers them (whatever the engine) and screens the replies
(no reply, an error, late, malformed or refused: failed, with the reason); the federation
aggregates the good ones; the global model is evaluated on the server's test set and on the
clients' local test splits; one line goes to ``metrics.jsonl`` and the ledger adds it up.
Bytes are measured from the messages' payloads.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedsim import keys, threads
from fedsim.apps.server import timing
from fedsim.apps.server.evaluation import Evaluation
from fedsim.apps.server.ledger import Ledger, raw_fields
from fedsim.apps.server.report import done_line, export, header, summary
from fedsim.apps.server.setup import frozen_from_model, initialize_adapter
from fedsim.apps.server.state import Checkpoints, ServerState
from fedsim.apps.server.transport import Transport
from fedsim.build import build_components
from fedsim.config import RunSpec
from fedsim.errors import RunFailed
from fedsim.progress import RoundPrinter
from fedsim.records import array_record, numpy_dict
from fedsim.results import ResultsWriter
from fedsim.strategy import Federation, StrategyContext
from fedsim.training import peak_memory_fields, reset_peak_memory
from fedsim.uplink import non_finite

log = logging.getLogger(__name__)


def finite_or_fail(what: str, arrays: ArrayRecord) -> None:
    """RunFailed if the global arrays hold a NaN or an infinity (``what`` names them)."""
    for key, value in numpy_dict(arrays).items():
        bad = non_finite(value)
        if bad:
            raise RunFailed(f"{what} holds {bad} in {key}; nothing is exported")


def min_replies(sim: dict[str, Any], strategy) -> tuple[int, str]:
    """The good replies a round needs (``sim.min_clients``, or more for a robust rule: Krum
    ``2f + 3``) and how messages name that number."""
    need, rule = max(sim["min_clients"], strategy.min_updates()), strategy.robust
    if rule is not None and need > sim["min_clients"]:
        return need, f"the {need} that robust={rule.describe()} needs"
    return need, f"sim.min_clients={sim['min_clients']}"


class FederatedRun:
    """One simulation (see the module docstring)."""

    def __init__(self, spec: RunSpec, grid: Grid, abort: threading.Event | None = None) -> None:
        self.spec, self.grid = spec, grid
        self.c = build_components(spec.cfg)
        self.sim = sim = self.c.sim
        self.device = self.c.device
        self.model, self.adapter_spec = self.c.model(self.device)
        threads.apply(getattr(self.c.engine, "num_threads", None), self.model)
        self.clock = timing.build_clock(self.c, self.model, self.device)  # None: no system profile
        self.strategy = self.c.strategy
        self.uplink = self.c.uplink(self.adapter_spec)
        self.central = self.uplink.get("central_dp")
        init = self.c.adapter.data_init
        if self.central is not None:
            steps = init.client_steps if init is not None else 0
            self.central.dp.start(
                sim["num_clients"], sim["clients_per_round"], sim["rounds"], init_steps=steps
            )
        self.writer = ResultsWriter(spec.output_dir)
        self.printer = RoundPrinter(sim["rounds"], spec.quiet, sim["local_steps"])
        self.evaluation = Evaluation(self.c, self.model, self.adapter_spec, self.device)
        self.ledger = Ledger(sim["num_clients"])
        self.transport = Transport(grid, sim["round_timeout"], abort)
        self.checkpoints = Checkpoints(spec, can_save=hasattr(grid, "node_states"))
        self.state = ServerState(self.strategy, self.uplink, self.ledger, self.c.server_opt)
        self.buffered = timing.buffered(self)  # FedBuff's server steps (sim.async_buffer)
        self.federation: Federation | None = None
        self.export_info: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        sim = self.sim
        resume = self._resume_tree()
        if resume is None:
            self.writer.write_config(self.spec.cfg)
        self.c.logger.start(self.spec.output_dir, self.spec.cfg, self.spec.choices)
        header(self)
        self.printer.start()
        try:
            t0 = time.perf_counter()
            reset_peak_memory(self.device)  # each round's gpu_peak_mem_bytes (CUDA only)
            self._bind()
            if resume is None:
                arrays = self._round_zero(t0, t_start)
                first = 1
            else:
                arrays = self.restore(resume)
                first = int(resume["round"]) + 1
            for server_round in range(first, sim["rounds"] + 1):
                t0 = time.perf_counter()
                reset_peak_memory(self.device)
                step = self.train_round if self.buffered is None else self.buffered.train_round
                arrays, train = step(server_round, arrays)
                self.record_round(server_round, arrays, train, t0)
                self.checkpoint(server_round, arrays, t_start)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            self.finish(summary(self, self.ledger.elapsed(t_start), "failed", error))
            log.debug("run failed:\n%s", traceback.format_exc())
            raise
        finally:
            self.printer.stop()
        return self._end(arrays, t_start)

    def _resume_tree(self) -> dict[str, Any] | None:
        if self.spec.resume is None:
            return None
        return self.checkpoints.load(self.writer, self.uplink.names)

    def _bind(self) -> None:
        """Find the clients' nodes; the strategy and its chain become the run's federation."""
        sim = self.sim
        node_of = self.transport.discover_nodes(sim["num_clients"])
        sampler = self.c.sampler()
        timing.attach(self.clock, sampler)
        ctx = StrategyContext(
            sampler,
            node_of,
            self.adapter_spec,
            sim["seed"],
            aggregation_error=sim["aggregation_error"],
        )
        self.federation = Federation(self.strategy, self.uplink, ctx, self.c.server_opt)
        self.federation.summary()

    def _round_zero(self, t0: float, t_start: float) -> ArrayRecord:
        """The adapter's (data-driven) initialisation, then round 0's evaluation and line."""
        self.printer.begin_round(0, 0)
        setup = initialize_adapter(self)
        arrays = array_record(self.strategy.initial_arrays(self.model, self.adapter_spec))
        finite_or_fail("the adapter's initial arrays (adapter.init)", arrays)
        setup.update(timing.round_zero(self.clock))  # the set-up round's time, on a clock
        self.record_round(0, arrays, setup, t0)
        self.checkpoint(0, arrays, t_start)
        return arrays

    def _end(self, arrays: ArrayRecord, t_start: float) -> dict[str, Any]:
        sim, totals = self.sim, self.ledger.totals
        if sim["rounds"] and totals["rounds_skipped"] == sim["rounds"]:
            last = self.ledger.last
            first = last["failures"][0]["reason"] if last["failures"] else "?"
            needed = min_replies(self.sim, self.strategy)[1]
            error = (
                f"every round was skipped: no round had {needed} good "
                f"replies (last failure: {first})"
            )
            self.finish(summary(self, self.ledger.elapsed(t_start), "failed", error))
            raise RunFailed(error)
        try:  # a model that is not finite never finishes ok and is never exported
            finite_or_fail("the global model at the end of the run", arrays)
            self.export_info = export(self, arrays)
        except RunFailed as e:
            self.finish(summary(self, self.ledger.elapsed(t_start), "failed", str(e)))
            raise
        done = summary(self, self.ledger.elapsed(t_start), "ok")
        self.finish(done)
        self.checkpoints.drop()
        self.printer.final(f"{done_line(done)} -> {self.spec.output_dir}")
        return done

    def finish(self, summary: dict[str, Any]) -> None:
        """Write summary.json (the run's record), then tell the logging sink."""
        self.writer.write_summary(summary)
        self.writer.close()
        self.c.logger.finish(summary)

    # ------------------------------------------------------------------ one round
    def train_round(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict]:
        """One training round; returns the new global arrays and the round's bookkeeping."""
        fed, strategy, ledger, clock = self.federation, self.strategy, self.ledger, self.clock
        waited = clock.begin_round() if clock is not None else {}  # for an online client
        sent = list(fed.configure_train(server_round, arrays, ConfigRecord(), self.grid))
        self.printer.begin_round(server_round, len(sent))
        bytes_down, numel_down = strategy.traffic(sent)
        replies, good, failures = self.transport.send(sent, fed.reply_reason)
        good, failures, timed = timing.settle(clock, sent, replies, good, failures, self.transport)
        bytes_up, numel_up = strategy.traffic(replies)
        ledger.note_replies(replies, self.transport.client_of_reply)
        # A stage that releases every round (central DP) aggregates whoever replied
        # (keeping the model unchanged would be an outcome its accountant does not cover).
        releases = self.uplink.releases_every_round
        skipped = not releases and len(good) < min_replies(self.sim, strategy)[0]
        train_loss = error = None
        if not skipped:
            new_arrays, train_metrics = fed.aggregate_train(server_round, good)
            if new_arrays is not None:
                arrays = new_arrays
            if train_metrics is not None:
                train_loss = train_metrics.get(keys.TRAIN_LOSS)
            error = fed.last_aggregation_error
            ledger.note_error(error)
        else:  # nothing aggregated, but the clients that replied hold what they were sent
            fed.acknowledge(server_round, fed.updates_from(good))
        replied = sum(1 for r in replies if r.has_content())
        ledger.note_traffic(numel_up, numel_down, replied, len(sent))
        clients = [fed.client_of[m.metadata.dst_node_id] for m in sent]
        return arrays, {
            keys.TRAIN_LOSS: train_loss,
            **self.privacy_fields(),
            "aggregation_error": error,
            "bytes_up": bytes_up,
            **raw_fields(self.uplink, replies, bytes_up),
            "bytes_down": bytes_down,
            "clients_sampled": len(sent),
            "clients_ok": len(good),
            "clients_failed": len(failures),
            "failures": failures,
            "round_skipped": skipped,
            **self.uplink.report(server_round, clients),
            **({} if skipped else strategy.round_metrics),
            **timed,
            **waited,
        }

    def privacy_fields(self) -> dict[str, float]:
        """The round's epsilon: central DP's accountant takes one step every round, whoever
        was sampled; under client DP-SGD, the worst client's and the mean."""
        if self.central is not None:
            eps = self.central.step_accountant()
            return {"epsilon": eps, "epsilon_mean": eps}
        if self.c.privacy.client_dp:
            return self.ledger.client_epsilons()
        return {}

    def record_round(self, server_round: int, arrays: ArrayRecord, train: dict, t0: float) -> None:
        """Evaluate, then write and print the round's line of metrics.jsonl."""
        t_eval = time.perf_counter()
        self.printer.evaluating()
        record = {
            "round": server_round,
            keys.TRAIN_LOSS: train[keys.TRAIN_LOSS],
            **self.evaluation.metrics(
                server_round, arrays, self.federation, self.transport, self.grid
            ),
            **train,
        }
        now = time.perf_counter()
        record["round_time_s"] = now - t0
        record["eval_time_s"] = now - t_eval
        record.update(peak_memory_fields(self.device))  # CUDA only: none on the CPU
        self.writer.append_round(record)
        if self.clock is not None:
            self.clock.note(record)
        self.c.logger.log_round(record)
        self.printer.round(record)
        if record["failures"]:
            warn_failures(self, server_round, record)
        self.ledger.add(record)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, server_round: int, arrays: ArrayRecord, t_start: float) -> None:
        """Save the server state and every client's after ``server_round`` when it is due."""
        if not self.checkpoints.due(server_round, self.sim["rounds"]):
            return
        clients = {
            self.federation.client_of[node]: state
            for node, state in self.grid.node_states().items()
        }
        tree = self.state.tree(server_round, arrays, t_start)
        tree["grid"] = {"messages": self.grid.message_count()}
        tree.update(timing.state(self.clock))
        self.checkpoints.save(tree, clients)

    def restore(self, tree: dict) -> ArrayRecord:
        """Put the server, the strategy, the chain and every client back where the checkpoint
        left them; returns the global arrays."""
        from fedsim import checkpoint

        arrays = self.state.restore(tree)
        self.checkpoints.restored(tree)
        timing.restore(self.clock, tree)
        frozen = self.uplink.get("frozen")
        if frozen is not None:  # the data-derived factors, into the server's model
            self.adapter_spec.load(self.model, frozen.frozen)
        frozen_from_model(self, record=False)
        node_of = self.federation.ctx.node_of
        self.grid.load_node_states(
            {
                node_of[int(client)]: checkpoint.record_dict_from_state(state)
                for client, state in tree["clients"].items()
            }
        )
        if "grid" in tree:  # (format-1 checkpoints did not save it)
            self.grid.continue_message_count(tree["grid"]["messages"])
        self.printer.line(f"resumed after round {tree['round']} from {self.spec.resume}")
        return arrays


def warn_failures(run: FederatedRun, server_round: int, record: dict[str, Any]) -> None:
    """One warning line for a round with failed clients."""
    first = record["failures"][0]
    message = (
        f"round {server_round}: {len(record['failures'])} client(s) failed, "
        f"e.g. client {first['client']}: {first['reason']}"
    )
    if record["round_skipped"]:
        message += f"; fewer than {min_replies(run.sim, run.strategy)[1]} good "
        message += "replies, the global model was kept"
    run.printer.warning(message)
