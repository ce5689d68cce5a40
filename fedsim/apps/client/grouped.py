"""The batched engine's client path: a group of clients trained together.

Each client is received one by one (:meth:`~fedsim.apps.client.runtime.ClientRuntime.begin_train`:
the chain's client halves and the strategy's), the group's local steps run in one vmapped
trainer (:func:`fedsim.batched.train_group`), and each reply is built one by one again
(:meth:`~fedsim.apps.client.runtime.ClientRuntime.finish_train`), so the inline and batched
engines run the same chain. A client that raises gets its exception back instead of a reply.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message

from fedsim.batched import ClientJob
from fedsim.batched import train_group as train_stacked
from fedsim.training import state_arrays


def context_names(runtime) -> list[str]:
    """Tensors besides the trained ones that a client's model may hold its own values of:
    the frozen adapter factors, and the base weights of a strategy that folds into them."""
    spec = runtime.spec
    names = list(spec.frozen)
    if runtime.c.strategy.folds_into_base:
        names += [spec.base_weight(m) for m in spec.adapted_modules]
    return names


def _start(runtime, items, out) -> tuple[list, list[ClientJob]]:
    """Each client received into the shared model, its tensors copied out as a job."""
    spec = runtime.spec
    started, jobs = [], []
    for k, (msg, ctx) in enumerate(items):
        try:  # an (injected) crash, DP settings it cannot meet, a bug: that client's error
            job = runtime.begin_train(msg, ctx)
            dp = runtime.dp_start(job) if runtime.dp is not None else None
        except Exception as e:
            out[k] = e
            continue
        # what trains this round is stacked; a factor the strategy freezes (RoLoRA) is context
        names = runtime.c.strategy.round_trained(spec, job.call.server_round)
        context = context_names(runtime) + [n for n in spec.trained if n not in names]
        params = spec.parameters_of(runtime.model)
        jobs.append(
            ClientJob(
                params={n: params[n].detach().clone() for n in names},
                context={n: params[n].detach().clone() for n in context},
                data=job.data,
                generator=job.generator,
                start_step=int(job.common["start_step"]),
                optimizer_state=job.optimizer_state,
                dp=dp,
                terms=job.terms,
            )
        )
        started.append((k, job))
    return started, jobs


def train_group(runtime, items: list[tuple[Message, Context]]) -> list[Message | Exception]:
    """Replies (or exceptions) for ``items``, in order (see the module docstring)."""
    c = runtime.c
    out: list[Message | Exception | None] = [None] * len(items)
    started, jobs = _start(runtime, items, out)
    if not jobs:
        return out
    common = started[0][1].common
    try:
        outcomes = train_stacked(
            runtime.model,
            c.task,
            jobs,
            c.make_optimizer,
            steps=common["steps"],
            batch_size=common["batch_size"],
            lr=common["lr"],
            schedule=c.schedule,
            total_steps=common["total_steps"],
            device=runtime.device,
            clip_norm=runtime.privacy.clip_norm if runtime.dp is not None else None,
        )
    except Exception as e:  # the group's training failed: each of its clients failed
        for k, _ in started:
            out[k] = e
        return out
    keep = c.sim["keep_optimizer_state"]
    params = runtime.spec.parameters_of(runtime.model)
    for (k, job), client_job, outcome in zip(started, jobs, outcomes):
        try:
            with torch.no_grad():  # the client's own tensors back into the model
                for name, value in {**client_job.context, **outcome.params}.items():
                    params[name].copy_(value)
            opt_state = state_arrays(outcome.optimizer_state) if keep else None
            privacy = runtime.dp.finish(client_job.dp, job.call.state) if client_job.dp else None
            out[k] = runtime.finish_train(job, outcome.result, opt_state, privacy)
        except Exception as e:
            out[k] = e
    return out
