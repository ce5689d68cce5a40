"""The batched trainer: a group of clients' local steps in lock-step, one vmapped forward and
backward per step, each client with its own optimizer, batches, dropout and schedule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedsim.batched.dpsgd import dp_gradients, per_example_gradients
from fedsim.batched.group import padded_group, quiet_fallbacks, vmapped_loss
from fedsim.batched.optimizers import stacked_optimizer, state_from_arrays
from fedsim.dropout import client_streams
from fedsim.privacy import ClientDP
from fedsim.tasks.base import Batch, Task
from fedsim.training import LocalResult, Schedule, batches, load_optimizer_state


@dataclass
class ClientJob:
    """One client's share of a batched group."""

    params: dict[str, torch.Tensor]  # its trained parameters' starting values, by name
    context: dict[str, torch.Tensor]  # other tensors of its model that may differ per client
    data: Batch
    generator: torch.Generator  # its batch order
    start_step: int  # its global step count (the schedule's position)
    optimizer_state: dict | None = None  # fedsim.training.optimizer_state_arrays, if kept
    dp: ClientDP | None = None  # DP-SGD: its Poisson rate, noise and accountant


@dataclass
class ClientOutcome:
    result: LocalResult
    params: dict[str, torch.Tensor]  # its trained parameters after the local steps
    #: its optimizer's per-parameter state, as ``torch.optim.Optimizer.state_dict()["state"]``
    optimizer_state: dict[int, dict[str, torch.Tensor]]


def train_group(
    model: nn.Module,
    task: Task,
    jobs: Sequence[ClientJob],
    make_optimizer: Callable[..., torch.optim.Optimizer],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    schedule: Schedule,
    total_steps: int,
    device: torch.device | None = None,
    clip_norm: float | None = None,
) -> list[ClientOutcome]:
    """``steps`` local steps of every client in ``jobs``, in lock-step, as one vmapped call
    per step.

    A context tensor that is the same for every client is loaded into ``model`` once and
    shared; one that differs is stacked like the trained parameters. A client whose batch is
    shorter (the end of a pass over its data) is padded with zero-weight examples, so the
    examples of a batch must not interact (no batch normalisation). AdamW, Adam and SGD step
    all clients at once (:class:`StackedAdamW`, :class:`StackedSGD`); any other optimizer runs
    once per client, on that client's slices.

    Jobs with ``dp`` settings train with DP-SGD instead
    (:func:`~fedsim.batched.dpsgd.dp_gradients`: Poisson batches, per-example clipping to
    ``clip_norm``, each client's own noise); each client's accountant records its steps.
    """
    if not jobs:
        return []
    names = list(jobs[0].params)
    params = dict(model.named_parameters())
    shared, varying = {}, []
    for name, first in jobs[0].context.items():
        if all(torch.equal(job.context[name], first) for job in jobs[1:]):
            shared[name] = first
        else:
            varying.append(name)
    with torch.no_grad():
        for name, value in shared.items():
            params[name].copy_(value)
    context = {n: torch.stack([job.context[n] for job in jobs]).to(device) for n in varying}
    stacked = [
        torch.stack([job.params[n].detach() for job in jobs]).to(device).requires_grad_(True)
        for n in names
    ]
    probe = make_optimizer([nn.Parameter(torch.zeros(1))], lr=lr)
    fast = stacked_optimizer(probe, stacked)
    per_client: list[torch.optim.Optimizer] = []
    if fast is not None:
        for i, job in enumerate(jobs):
            fast.load_client(i, state_from_arrays(job.optimizer_state, len(names)))
    else:  # each client's optimizer steps its own copies; their gradients come from the stack
        mine = [[torch.zeros_like(p[i]) for p in stacked] for i in range(len(jobs))]
        for job, leaves in zip(jobs, mine):
            for leaf in leaves:
                leaf.grad = torch.zeros_like(leaf)
            opt = make_optimizer(leaves, lr=lr)
            if job.optimizer_state is not None:
                load_optimizer_state(opt, job.optimizer_state)
            per_client.append(opt)
    streams = [batches(job.data, batch_size, job.generator) for job in jobs]
    # each client's dropout stream: the global generator the inline engine seeds for it
    on = device if device is not None else torch.device("cpu")
    dropout = [
        torch.Generator(device=on).manual_seed(job.generator.initial_seed() + 1) for job in jobs
    ]

    private = jobs[0].dp is not None
    batched_loss = vmapped_loss(model, task)
    per_example = per_example_gradients(model, task) if private else None
    totals = torch.zeros(len(jobs), dtype=torch.float64)
    counted = torch.zeros(len(jobs), dtype=torch.float64)
    model.train()
    for step in range(steps):
        lrs = torch.tensor(
            [lr * schedule.factor(job.start_step + step, total_steps) for job in jobs],
            dtype=torch.float64,
        )
        for p in stacked:
            p.grad = None
        if private:
            trained = {n: p.detach() for n, p in zip(names, stacked)}
            grads, losses, nonempty = dp_gradients(
                per_example, task, jobs, trained, context, clip_norm, device, dropout
            )
            for p, g in zip(stacked, grads):
                p.grad = g
            totals += torch.where(nonempty, losses, 0.0)
            counted += nonempty
        else:
            batch, weights, sizes = padded_group([next(s) for s in streams], device)
            batch, lengths = task.group_batch(batch)
            tensors = {n: p for n, p in zip(names, stacked)}
            tensors.update(context)
            with client_streams(dropout, sizes, lengths), quiet_fallbacks():
                losses = batched_loss(tensors, batch, weights)
                losses.sum().backward()
            totals += losses.detach().double().cpu()
            counted += 1
        if fast is not None:
            fast.step(lrs.to(stacked[0].device))
            continue
        with torch.no_grad():
            for i, opt in enumerate(per_client):
                leaves = opt.param_groups[0]["params"]
                for leaf, p in zip(leaves, stacked):
                    leaf.copy_(p[i])
                    if p.grad is None:  # a parameter the loss does not reach
                        leaf.grad.zero_()
                    else:
                        leaf.grad.copy_(p.grad[i])
                for group in opt.param_groups:
                    group["lr"] = float(lrs[i])
                opt.step()
                for leaf, p in zip(leaves, stacked):
                    p[i].copy_(leaf)
    for job in jobs:
        if job.dp is not None:
            job.dp.accountant.step(job.dp.sigma, job.dp.sample_rate, steps)
    outcomes = []
    for i in range(len(jobs)):
        if fast is not None:
            state = fast.client_state(i)
        else:
            state = per_client[i].state_dict()["state"]  # by parameter index
        outcomes.append(
            ClientOutcome(
                result=LocalResult(loss=float(totals[i]) / max(float(counted[i]), 1), steps=steps),
                params={n: p[i].detach().clone() for n, p in zip(names, stacked)},
                optimizer_state=state,
            )
        )
    return outcomes
