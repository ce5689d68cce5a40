"""A process's client machinery: receive, train, send; evaluate; the set-up statistics.

A process that runs clients (the main process for the inline and batched engines, each Ray
actor for the ray engine) keeps one :class:`ClientRuntime` per configuration: the run's
components, one model whose frozen base all its clients share, the clients' data, and the
client halves of the uplink chain. Everything a client must remember between rounds (its step
count, optimizer state if kept, strategy and stage state) lives in its ``Context.state``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedsim import keys, threads
from fedsim.apps.client.dp import ClientPrivacy
from fedsim.build import Components, build_components, small_cache
from fedsim.init import client_statistics
from fedsim.messages import ClientCall
from fedsim.privacy import train_local_dp
from fedsim.records import array_record, numpy_dict, payload
from fedsim.training import (
    LocalResult,
    LocalTerms,
    client_generator,
    evaluate,
    load_optimizer_state,
    optimizer_state_arrays,
    seed_torch,
    step_sizes,
    train_local,
)
from fedsim.uplink import Outgoing, Sending


@dataclass
class TrainJob:
    """A client's training round between :meth:`ClientRuntime.begin_train` and
    :meth:`ClientRuntime.finish_train`."""

    msg: Message
    call: ClientCall
    data: dict  # the examples it trains on
    reference: dict[str, np.ndarray] | None  # what its update is relative to (chain stages)
    generator: torch.Generator  # its batch order
    common: dict  # train_local's keyword arguments but the optimizer
    optimizer_state: dict[str, np.ndarray] | None  # its kept optimizer state
    terms: LocalTerms | None = None  # FedProx's proximal term, SCAFFOLD's correction


class ClientRuntime:
    """Per-process client machinery for one run configuration."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.c: Components = build_components(cfg)
        self.device = self.c.device
        self.model, self.spec = self.c.model(self.device)
        threads.apply(getattr(self.c.engine, "num_threads", None), self.model)
        self.uplink = self.c.uplink(self.spec)
        self.privacy = self.c.privacy
        self.dp = (
            ClientPrivacy(self.privacy, self.c, self.model, self.device)
            if self.privacy.client_dp
            else None
        )

    @property
    def trained(self) -> list:
        """The model's trained parameters (read each time: EVA's per-layer ranks rebuild
        layers when the first message arrives)."""
        return self.spec.trained_parameters(self.model)

    def _call(self, msg: Message, context: Context) -> ClientCall:
        return ClientCall(
            client=int(context.node_config[keys.PARTITION_ID]),
            server_round=int(msg.content[keys.CONFIG][keys.SERVER_ROUND]),
            seed=self.c.sim["seed"],
            state=context.state,
            config=msg.content[keys.CONFIG],
        )

    # ------------------------------------------------------------------ training
    def train(self, msg: Message, context: Context) -> Message:
        """One client's training round: receive, train its local steps, reply."""
        job = self.begin_train(msg, context)
        optimizer = self.c.make_optimizer(self.trained, lr=self.c.sim["lr"])
        if job.optimizer_state is not None:
            load_optimizer_state(optimizer, job.optimizer_state)
        seed_torch(job.generator.initial_seed() + 1)  # dropout and other global-RNG draws
        privacy_metrics = {}
        if self.dp is None:
            result = train_local(
                self.model, self.c.task, job.data, optimizer, **job.common, terms=job.terms
            )
        else:
            result, privacy_metrics = self._train_dp(job, optimizer)
        opt_state = (
            optimizer_state_arrays(optimizer) if self.c.sim["keep_optimizer_state"] else None
        )
        return self.finish_train(job, result, opt_state, privacy_metrics)

    def begin_train(self, msg: Message, context: Context) -> TrainJob:
        """Everything before a client's local steps: what the server sent through the chain's
        client halves (an injected crash first) into the model (the strategy's client half),
        its data, generator and schedule."""
        c, sim = self.c, self.c.sim
        call = self._call(msg, context)
        arrays = self.uplink.receive(call, numpy_dict(msg.content[keys.ARRAYS]))
        c.strategy.client_receive(self.model, self.spec, arrays, call)
        self.train_only(c.strategy.round_trained(self.spec, call.server_round))
        reference = None
        if self.uplink.needs_reference:  # what the update is relative to
            before = c.strategy.sent_arrays(self.model, self.spec, call)
            reference = {k: v.detach().cpu().numpy().copy() for k, v in before.items()}
        state = call.state
        info = state.get(keys.STATE_CLIENT, ConfigRecord({keys.STEPS: 0}))
        kept = sim["keep_optimizer_state"] and keys.STATE_OPTIMIZER in state
        generator = client_generator(sim["seed"], call.server_round, call.client)
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
            data=self.uplink.train_data(call, c.strategy.client_data(c.data, call.client)),
            reference=reference,
            generator=generator,
            common=common,
            optimizer_state=numpy_dict(state[keys.STATE_OPTIMIZER]) if kept else None,
            terms=self.local_terms(call),
        )

    def train_only(self, names: list[str]) -> None:
        """Of the adapter's trained parameters, only ``names`` take gradients this round (the
        rest get none, so the optimizer leaves them and their state as they are, and DP-SGD
        clips and noises ``names`` alone (:attr:`ClientPrivacy.gsm`)."""
        keep = set(names)
        for name, p in zip(self.spec.trained, self.trained):
            p.requires_grad_(name in keep)

    def local_terms(self, call: ClientCall) -> LocalTerms | None:
        """What the client's local steps add to plain training (None: nothing), from the
        values its trained parameters start from (what it received): FedProx's proximal term
        on every trained parameter but those a strategy keeps personal (``sim.prox_mu``), and
        the chain's step offset (SCAFFOLD's ``c - c_i``), the strategy's regulariser; no
        proximal term or offset on a parameter the strategy freezes this round
        (``round_trained``)."""
        mu = float(self.c.sim.get("prox_mu", 0.0))
        offset = self.uplink.step_offset(call)
        penalty = self.c.strategy.local_penalty(self.spec, call)
        if not mu and offset is None and penalty is None:
            return None
        names, offset = self.spec.trained, offset or {}
        frozen = set(names) - set(self.c.strategy.round_trained(self.spec, call.server_round))
        free = frozen | set(self.c.strategy.personal_names(self.spec))
        anchors = [
            p.detach().clone() if mu and n not in free else None
            for n, p in zip(names, self.trained)
        ]
        offsets = [
            torch.as_tensor(offset[n]).to(p.device, p.dtype)
            if n in offset and n not in frozen
            else None
            for n, p in zip(names, self.trained)
        ]
        return LocalTerms(list(names), mu, anchors, offsets, penalty)

    def finish_train(
        self,
        job: TrainJob,
        result: LocalResult,
        optimizer_state: dict[str, np.ndarray] | None,
        privacy_metrics: dict | None = None,
    ) -> Message:
        """Everything after a client's local steps (its trained parameters in the model): its
        state, what it sends (the strategy's client half, then the chain's), the reply."""
        c, call = self.c, job.call
        state = call.state
        steps = int(job.common["start_step"]) + result.steps
        state[keys.STATE_CLIENT] = ConfigRecord({keys.STEPS: steps})
        if optimizer_state is not None:
            state[keys.STATE_OPTIMIZER] = array_record(optimizer_state)
        out = Outgoing(arrays=c.strategy.client_send(self.model, self.spec, call))
        common = job.common
        lr_sum = step_sizes(
            common["lr"],
            common["schedule"],
            common["start_step"],
            result.steps,
            common["total_steps"],
        )
        sending = Sending(call, job.msg.content[keys.CONFIG], job.reference, lr_sum)
        self.uplink.send(sending, out)
        records = {keys.ARRAYS: array_record(out.arrays)}
        records.update({name: array_record(arrays) for name, arrays in out.records.items()})
        if out.diagnostic is not None:  # measurement only, not traffic
            records[keys.DIAGNOSTIC] = array_record(out.diagnostic)
        metrics = MetricRecord(
            {
                keys.NUM_EXAMPLES: len(job.data[c.task.label_key]),
                keys.TRAIN_LOSS: result.loss,
                keys.STATE_BYTES: state_bytes(state),
                **(privacy_metrics or {}),
                **out.metrics,
            }
        )
        content = RecordDict({**records, keys.METRICS: metrics})
        return Message(content, reply_to=job.msg)

    def train_group(self, items: list[tuple[Message, Context]]) -> list[Message | Exception]:
        """The batched engine's path (:func:`fedsim.apps.client.grouped.train_group`)."""
        from fedsim.apps.client.grouped import train_group

        return train_group(self, items)

    def dp_start(self, job: TrainJob):
        """A client's DP-SGD settings for this round (see :class:`ClientPrivacy`)."""
        n = len(job.data[self.c.task.label_key])
        return self.dp.start(
            job.call.state, n, job.common["batch_size"], job.generator.initial_seed()
        )

    def _train_dp(self, job: TrainJob, optimizer) -> tuple[Any, dict]:
        """DP-SGD local steps; the client's accountant history persists in its state."""
        dp = self.dp_start(job)
        result = train_local_dp(
            self.model,
            self.dp.gsm,
            self.c.task,
            job.data,
            optimizer,
            self.privacy,
            dp.accountant,
            sigma=dp.sigma,
            noise_generator=dp.noise,
            **job.common,
            terms=job.terms,
        )
        return result, self.dp.finish(dp, job.call.state)

    # ------------------------------------------------------------------ set-up and evaluation
    def init_statistics(self, msg: Message, context: Context) -> Message:
        """The set-up round of a data-driven initialisation (:mod:`fedsim.init`): the
        statistics of the client's first examples."""
        c = self.c
        client = int(context.node_config[keys.PARTITION_ID])
        n = int(msg.content[keys.CONFIG][keys.INIT_EXAMPLES])
        train = c.data.client(client).train
        used = {k: v[:n] for k, v in train.items()}
        model, spec = c.model(self.device)  # as built: the process's model may have trained
        values = {keys.NUM_EXAMPLES: len(used[c.task.label_key])}
        private = None
        if self.dp is not None:  # clipped and noised; the client's accountant records it
            n_train = len(train[c.task.label_key])
            sigma = self.dp.sigma(n_train)
            seed = client_generator(c.sim["seed"], 0, client).initial_seed() + 3
            private = (self.privacy.clip_norm, sigma, torch.Generator().manual_seed(seed))
        central = self.privacy.clip_norm if self.privacy.central else None
        arrays = client_statistics(
            c.adapter.data_init, model, spec, c.task, used, self.device, private, central
        )
        if private is not None:
            values.update(self.dp.charge_setup(context.state, private[1], n_train))
        content = RecordDict(
            {keys.ARRAYS: array_record(arrays), keys.METRICS: MetricRecord(values)}
        )
        return Message(content, reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        """The global model (as the strategy's client half prepares it) on the client's local
        test split."""
        call = self._call(msg, context)
        data = self.c.data.client(call.client)
        arrays = self.uplink.evaluate_receive(call, numpy_dict(msg.content[keys.ARRAYS]))
        self.c.strategy.client_evaluate(self.model, self.spec, arrays, call)
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


def state_bytes(state: RecordDict) -> int:
    """Bytes of the arrays a client keeps in its Context.state."""
    return payload(state)[0]


_RUNTIMES: OrderedDict[str, ClientRuntime] = OrderedDict()


def runtime_for(cfg: dict[str, Any]) -> ClientRuntime:
    """The process's runtime for ``cfg`` (a small cache: sweeps run configs one after another)."""
    return small_cache(_RUNTIMES, json.dumps(cfg, sort_keys=True), lambda: ClientRuntime(cfg))
