"""fedsim's Flower ClientApp: ``query``, ``train`` and ``evaluate`` handlers.

A process that runs clients (the main process for the inline engine, each Ray actor for the ray
engine) keeps one :class:`ClientRuntime`: the run's components, one model whose frozen base all
its clients share, and the clients' data. Everything a client must remember between rounds
(its step count, optimizer state if kept, strategy state) lives in its ``Context.state``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim import keys
from fedsim.build import Components, build_components, small_cache
from fedsim.compression import scale_to_norm
from fedsim.faults import FaultDraw, corrupt_arrays
from fedsim.privacy import (
    Accountant,
    ClientDP,
    clip_update,
    private_base_gradients,
    train_local_dp,
    wrap,
)
from fedsim.records import array_record, numpy_dict, payload
from fedsim.strategy import ClientCall
from fedsim.training import (
    LocalResult,
    client_generator,
    evaluate,
    load_optimizer_state,
    optimizer_state_arrays,
    seed_torch,
    state_arrays,
    train_local,
)


class ClientRuntime:
    """Per-process client machinery for one run configuration."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.c: Components = build_components(cfg)
        threads = getattr(self.c.engine, "num_threads", None)
        if threads:
            torch.set_num_threads(int(threads))
        self.device = self.c.device
        self.model, self.spec = self.c.model(self.device)
        self.trained = self.spec.trained_parameters(self.model)
        self.codec = self.c.codec()
        self.downlink = self.c.downlink_codec()
        self.privacy = self.c.privacy
        self._gsm = None  # Opacus' per-example wrapper, made when the inline path needs it

    def _client(self, context: Context) -> int:
        return int(context.node_config[keys.PARTITION_ID])

    def _call(self, msg: Message, context: Context) -> ClientCall:
        return ClientCall(
            client=self._client(context),
            server_round=int(msg.content[keys.CONFIG][keys.SERVER_ROUND]),
            seed=self.c.sim["seed"],
            state=context.state,
        )

    def train(self, msg: Message, context: Context) -> Message:
        """One client's training round: receive, train its local steps, reply."""
        job = self.begin_train(msg, context)
        optimizer = self.c.make_optimizer(self.trained, lr=self.c.sim["lr"])
        if job.optimizer_state is not None:
            load_optimizer_state(optimizer, job.optimizer_state)
        seed_torch(job.generator.initial_seed() + 1)  # dropout and other global-RNG draws
        privacy_metrics = {}
        if not self.privacy.client_dp:
            result = train_local(self.model, self.c.task, job.data, optimizer, **job.common)
        else:
            result, privacy_metrics = self._train_dp(job, optimizer)
        opt_state = (
            optimizer_state_arrays(optimizer) if self.c.sim["keep_optimizer_state"] else None
        )
        return self.finish_train(job, result, opt_state, privacy_metrics)

    def begin_train(self, msg: Message, context: Context) -> TrainJob:
        """Everything before a client's local steps: its faults, what the server sent loaded
        into the model (the strategy's client half), its data, generator and schedule."""
        c, sim = self.c, self.c.sim
        call = self._call(msg, context)
        client, server_round, state = call.client, call.server_round, call.state
        fault = c.faults.draw(sim["seed"], server_round, client)
        if fault.crash:  # before anything: the client's state stays as it was
            raise InjectedCrash(
                f"injected crash (faults.crash_prob={c.faults.crash_prob:g}) of client {client} "
                f"in round {server_round}"
            )
        arrays = numpy_dict(msg.content[keys.ARRAYS])
        if self.downlink is not None:  # EF21-P: rebuild w from the stored copy and the steps
            arrays = self.downlink.receive(arrays, state)
        c.strategy.client_receive(self.model, self.spec, arrays, call)
        reference = None
        if self.codec is not None or self.privacy.central:  # what the update is relative to
            before = c.strategy.sent_arrays(self.model, self.spec, call)
            reference = {k: v.detach().cpu().numpy().copy() for k, v in before.items()}
        info = state.get(keys.STATE_CLIENT, ConfigRecord({keys.STEPS: 0}))
        kept = sim["keep_optimizer_state"] and keys.STATE_OPTIMIZER in state
        generator = client_generator(sim["seed"], server_round, client)
        common = {
            "steps": sim["local_steps"],
            "batch_size": c.strategy.client_batch_size(sim["batch_size"]),
            "lr": sim["lr"],
            "schedule": c.schedule,
            "start_step": int(info[keys.STEPS]),
            "total_steps": c.total_local_steps,
            "generator": generator,
            "device": self.device,
        }
        return TrainJob(
            msg=msg,
            call=call,
            fault=fault,
            data=c.strategy.client_data(c.data, client),
            reference=reference,
            generator=generator,
            common=common,
            optimizer_state=numpy_dict(state[keys.STATE_OPTIMIZER]) if kept else None,
        )

    def finish_train(
        self,
        job: TrainJob,
        result: LocalResult,
        optimizer_state: dict[str, np.ndarray] | None,
        privacy_metrics: dict | None = None,
    ) -> Message:
        """Everything after a client's local steps (its trained parameters in the model): its
        state, what it sends (the strategy's client half, compression, clipping), the reply."""
        c, sim = self.c, self.c.sim
        call, fault, reference = job.call, job.fault, job.reference
        client, server_round, state = call.client, call.server_round, call.state
        steps = int(job.common["start_step"]) + result.steps
        state[keys.STATE_CLIENT] = ConfigRecord({keys.STEPS: steps})
        if optimizer_state is not None:
            state[keys.STATE_OPTIMIZER] = array_record(optimizer_state)
        central = self.privacy if self.privacy.central else None
        arrays = c.strategy.client_send(self.model, self.spec, call)
        records = {keys.ARRAYS: array_record(arrays)}
        if central is not None and self.codec is None:  # DP-FedAvg: the clipped update
            trained = {k: v.detach().cpu().numpy() for k, v in arrays.items()}
            records = {
                keys.ARRAYS: array_record(clip_update(reference, trained, central.clip_norm))
            }
            if sim["aggregation_error"]:  # measurement only, not traffic
                records[keys.DIAGNOSTIC] = array_record(trained)
        if self.codec is not None:  # under central DP the codec clips what it compresses
            trained = {k: v.detach().cpu().numpy() for k, v in arrays.items()}
            absorbed = int(job.msg.content[keys.CONFIG].get(keys.ABSORBED, 0))
            payload = self.codec.client_encode(
                reference, trained, client, server_round, state, absorbed
            )
            records = {keys.ARRAYS: array_record(payload)}
            if sim["aggregation_error"]:  # measurement only, not traffic
                records[keys.DIAGNOSTIC] = array_record(trained)
        if fault.corrupt is not None:  # what travels is spoiled; the client's state is not
            spoiled = corrupt_arrays(
                numpy_dict(records[keys.ARRAYS]), fault.corrupt, sim["seed"], server_round, client
            )
            records[keys.ARRAYS] = array_record(spoiled)
        metrics = MetricRecord(
            {
                keys.NUM_EXAMPLES: len(job.data[c.task.label_key]),
                keys.TRAIN_LOSS: result.loss,
                keys.STATE_BYTES: state_bytes(state),
                **(privacy_metrics or {}),
                **({keys.DELAY: fault.delay} if fault.straggler else {}),
            }
        )
        content = RecordDict({**records, keys.METRICS: metrics})
        return Message(content, reply_to=job.msg)

    def train_group(self, items: list[tuple[Message, Context]]) -> list[Message | Exception]:
        """The batched engine's path: each client received one by one (:meth:`begin_train`),
        the group's local steps in one vmapped trainer (:func:`fedsim.batched.train_group`),
        each reply built one by one (:meth:`finish_train`); a client that raises gets its
        exception back instead of a reply."""
        from fedsim.batched import ClientJob, train_group

        c = self.c
        out: list[Message | Exception | None] = [None] * len(items)
        started, jobs = [], []
        names = self.spec.trained
        for k, (msg, context) in enumerate(items):
            try:  # an (injected) crash, DP settings it cannot meet, a bug: that client's error
                job = self.begin_train(msg, context)
                dp = self.dp_start(job) if self.privacy.client_dp else None
            except Exception as e:
                out[k] = e
                continue
            params = self.spec.parameters_of(self.model)
            jobs.append(
                ClientJob(
                    params={n: params[n].detach().clone() for n in names},
                    context={n: params[n].detach().clone() for n in self.context_names},
                    data=job.data,
                    generator=job.generator,
                    start_step=int(job.common["start_step"]),
                    optimizer_state=job.optimizer_state,
                    dp=dp,
                )
            )
            started.append((k, job))
        if not jobs:
            return out
        common = started[0][1].common
        try:
            outcomes = train_group(
                self.model,
                c.task,
                jobs,
                c.make_optimizer,
                steps=common["steps"],
                batch_size=common["batch_size"],
                lr=common["lr"],
                schedule=c.schedule,
                total_steps=common["total_steps"],
                device=self.device,
                clip_norm=self.privacy.clip_norm if self.privacy.client_dp else None,
            )
        except Exception as e:  # the group's training failed: each of its clients failed
            for k, _ in started:
                out[k] = e
            return out
        keep = c.sim["keep_optimizer_state"]
        params = self.spec.parameters_of(self.model)
        for (k, job), client_job, outcome in zip(started, jobs, outcomes):
            try:
                with torch.no_grad():  # the client's own tensors back into the model
                    for name, value in {**client_job.context, **outcome.params}.items():
                        params[name].copy_(value)
                opt_state = state_arrays(outcome.optimizer_state) if keep else None
                privacy_metrics = (
                    self.dp_finish(client_job.dp, job.call.state) if client_job.dp else None
                )
                out[k] = self.finish_train(job, outcome.result, opt_state, privacy_metrics)
            except Exception as e:
                out[k] = e
        return out

    @property
    def context_names(self) -> list[str]:
        """Tensors besides the trained ones that a client's model may hold its own values of:
        the frozen adapter factors, and the base weights of a strategy that folds into them."""
        names = list(self.spec.frozen)
        if self.c.strategy.folds_into_base:
            names += [self.spec.base_weight(m) for m in self.spec.adapted_modules]
        return names

    def sigma(self, n: int) -> float:
        """A client's noise multiplier. For a target epsilon: the worst case, sampled in every
        round for every local step, and in LoRA-SB's set-up round when it draws on clients."""
        c = self.c
        adapter = c.adapter
        init = int(adapter.needs_data_init and getattr(adapter, "init_source", "") == "clients")
        batch_size = c.strategy.client_batch_size(c.sim["batch_size"])
        return self.privacy.sigma_for(n, batch_size, c.total_local_steps, init)

    @property
    def gsm(self):
        """The model wrapped by Opacus for per-example gradients (once per process: its hooks
        stay on the model; the batched engine computes per-example gradients itself)."""
        if self._gsm is None:
            self._gsm = wrap(self.model, self.privacy)
        return self._gsm

    def dp_start(self, job: TrainJob) -> ClientDP:
        """A client's DP-SGD settings for this round: its accountant (from its state), noise
        multiplier, Poisson rate and noise generator (seeded from its batch generator)."""
        state, n = job.call.state, len(job.data[self.c.task.label_key])
        history = (
            numpy_dict(state[keys.STATE_PRIVACY])["history"]
            if keys.STATE_PRIVACY in state
            else None
        )
        q = self.privacy.sample_rate(n, job.common["batch_size"])
        return ClientDP(
            accountant=Accountant.from_array(history),
            sigma=self.sigma(n),
            sample_rate=q,
            expected_batch=max(1, int(round(q * n))),
            # on the model's device: Opacus draws the noise there (a CPU generator cannot)
            noise=torch.Generator(device=self.device or "cpu").manual_seed(
                job.generator.initial_seed() + 2
            ),
            num_examples=n,
        )

    def dp_finish(self, dp: ClientDP, state) -> dict:
        """The client's accountant back into its state; the reply's privacy metrics."""
        state[keys.STATE_PRIVACY] = array_record({"history": dp.accountant.to_array()})
        delta = self.privacy.delta_for(dp.num_examples)
        return {
            keys.EPSILON: dp.accountant.epsilon(delta),
            keys.DELTA: delta,
            keys.NOISE_MULTIPLIER: dp.sigma,
        }

    def _train_dp(self, job: TrainJob, optimizer) -> tuple[Any, dict]:
        """DP-SGD local steps; the client's accountant history persists in its state."""
        dp = self.dp_start(job)
        result = train_local_dp(
            self.model,
            self.gsm,
            self.c.task,
            job.data,
            optimizer,
            self.privacy,
            dp.accountant,
            sigma=dp.sigma,
            noise_generator=dp.noise,
            **job.common,
        )
        return result, self.dp_finish(dp, job.call.state)

    def init_gradients(self, msg: Message, context: Context) -> Message:
        """LoRA-SB's set-up round: the base-weight gradients on the client's first examples."""
        c = self.c
        client = self._client(context)
        n = int(msg.content[keys.CONFIG][keys.INIT_EXAMPLES])
        train = c.data.client(client).train
        used = {k: v[:n] for k, v in train.items()}
        model, spec = c.model(self.device)  # as built: the process's model may have trained
        values = {keys.NUM_EXAMPLES: len(used[c.task.label_key])}
        if self.privacy.client_dp:  # clipped and noised; the client's accountant records it
            n_train = len(train[c.task.label_key])
            sigma = self.sigma(n_train)
            g = torch.Generator().manual_seed(
                client_generator(c.sim["seed"], 0, client).initial_seed() + 3
            )
            grads = private_base_gradients(
                model,
                spec,
                c.task.loss,
                used,
                self.privacy.clip_norm,
                sigma,
                g,
                device=self.device,
            )
            accountant = Accountant.from_array(
                numpy_dict(context.state[keys.STATE_PRIVACY])["history"]
                if keys.STATE_PRIVACY in context.state
                else None
            )
            accountant.step(sigma, 1.0)
            context.state[keys.STATE_PRIVACY] = array_record({"history": accountant.to_array()})
            delta = self.privacy.delta_for(n_train)
            values.update({keys.EPSILON: accountant.epsilon(delta), keys.DELTA: delta})
        else:
            grads = c.adapter.base_gradients(model, spec, c.task.loss, used, self.device)
        if self.privacy.central:  # user level: the gradient's direction at norm clip_norm
            grads = scale_to_norm(grads, self.privacy.clip_norm)
        arrays = {spec.base_weight(m): g for m, g in grads.items()}
        metrics = MetricRecord(values)
        content = RecordDict({keys.ARRAYS: array_record(arrays), keys.METRICS: metrics})
        return Message(content, reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        client = self._client(context)
        data = self.c.data.client(client)
        self.c.strategy.client_evaluate(
            self.model, self.spec, numpy_dict(msg.content[keys.ARRAYS]), self._call(msg, context)
        )
        if data.num_test:
            res = evaluate(self.model, self.c.task, data.test, device=self.device)
            values = {
                keys.NUM_EXAMPLES: res.num_examples,
                keys.EVAL_LOSS: res.loss,
                keys.EVAL_ACCURACY: res.accuracy,
            }
        else:
            values = {keys.NUM_EXAMPLES: 0, keys.EVAL_LOSS: 0.0, keys.EVAL_ACCURACY: 0.0}
        return Message(RecordDict({keys.METRICS: MetricRecord(values)}), reply_to=msg)


@dataclass
class TrainJob:
    """A client's training round between :meth:`ClientRuntime.begin_train` and
    :meth:`ClientRuntime.finish_train`."""

    msg: Message
    call: ClientCall
    fault: FaultDraw
    data: dict  # the examples it trains on
    reference: dict[str, np.ndarray] | None  # what its update is relative to (compression, DP)
    generator: torch.Generator  # its batch order
    common: dict  # train_local's keyword arguments but the optimizer
    optimizer_state: dict[str, np.ndarray] | None  # its kept optimizer state


class InjectedCrash(RuntimeError):
    """A client crash injected by ``faults.crash_prob`` (the reply is an error, as a crash's)."""


def state_bytes(state: RecordDict) -> int:
    """Bytes of the arrays a client keeps in its Context.state."""
    return payload(state)[0]


_RUNTIMES: OrderedDict[str, ClientRuntime] = OrderedDict()


def runtime_for(cfg: dict[str, Any]) -> ClientRuntime:
    """The process's runtime for ``cfg`` (a small cache: sweeps run configs one after another)."""
    return small_cache(_RUNTIMES, json.dumps(cfg, sort_keys=True), lambda: ClientRuntime(cfg))


def make_client_app(cfg: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp for ``cfg``; ``None``: the config comes from the run_config (``flwr run``)."""
    app = ClientApp()

    def rt(context: Context) -> ClientRuntime:
        if cfg is not None:
            return runtime_for(cfg)
        from fedsim.flwr_run import config_from_run_config

        return runtime_for(config_from_run_config(context.run_config)[0])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        # Answered without building anything: the server maps partition ids to node ids.
        client = int(context.node_config[keys.PARTITION_ID])
        info = ConfigRecord({keys.PARTITION_ID: client})
        return Message(RecordDict({keys.CONFIG: info}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return rt(context).train(msg, context)

    @app.train(keys.ACTION_INIT)
    def init_gradients(msg: Message, context: Context) -> Message:
        return rt(context).init_gradients(msg, context)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return rt(context).evaluate(msg, context)

    return app


#: the ClientApp that ``flwr run .`` loads (pyproject ``[tool.flwr.app.components]``)
app = make_client_app()
