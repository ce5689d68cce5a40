"""The batched trainer: a group of clients' local steps in lock-step, one vmapped forward and
backward per step, each client with its own optimizer, batches, dropout and schedule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedsim import meter
from fedsim.batched.dpsgd import dp_gradients, per_example_gradients
from fedsim.batched.group import padded_group, quiet_fallbacks, vmapped_loss
from fedsim.batched.jobs import ClientJob, ClientOutcome
from fedsim.batched.optimizers import stacked_optimizer, state_from_arrays
from fedsim.dropout import client_streams
from fedsim.tasks.base import Task
from fedsim.training import LocalResult, LocalTerms, Schedule, batches, load_optimizer_state


@dataclass
class _Stack:
    """What a group trains on: its trained tensors stacked along a leading client dimension
    (``names`` in their order), the stacked context tensors that differ between its clients
    and each client's dropout stream (the global generator the inline engine seeds for it)."""

    names: list[str]
    trained: list[torch.Tensor]
    context: dict[str, torch.Tensor]
    dropout: list[torch.Generator]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors by name, then the varying context: what the vmapped loss takes."""
        tensors = {n: p for n, p in zip(self.names, self.trained)}
        tensors.update(self.context)
        return tensors


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
    Jobs with ``terms`` (:class:`~fedsim.training.LocalTerms`: FedProx, SCAFFOLD) get them on
    their slices, as on the inline engine: the proximal gradient before each step (after
    DP-SGD's noise), the correction after it, at each client's learning rate.
    """
    if not jobs:
        return []
    group = _stack(model, jobs, device)
    optimizer = _group_optimizer(jobs, group.trained, make_optimizer, lr)
    if jobs[0].dp is not None:
        gradients = _private_gradients(model, task, jobs, group, clip_norm, device)
    else:
        gradients = _plain_gradients(model, task, jobs, group, batch_size, device)
    terms = LocalTerms.stack([job.terms for job in jobs], device) if jobs[0].terms else None
    model.train()
    rates = [_learning_rates(jobs, lr, schedule, step, total_steps) for step in range(steps)]
    totals, counted = _steps(len(jobs), group.trained, optimizer, gradients, terms, rates)
    for job in jobs:
        if job.dp is not None:
            job.dp.accountant.step(job.dp.sigma, job.dp.sample_rate, steps)
    return [
        ClientOutcome(
            result=LocalResult(loss=float(totals[i]) / max(float(counted[i]), 1), steps=steps),
            params={n: p[i].detach().clone() for n, p in zip(group.names, group.trained)},
            optimizer_state=optimizer.client_state(i),
        )
        for i in range(len(jobs))
    ]


def _steps(
    clients: int, trained, optimizer, gradients, terms, rates
) -> tuple[torch.Tensor, torch.Tensor]:
    """The local steps (one per entry of ``rates``, each client's learning rate at that
    step); returns each client's summed loss and how many of its steps counted."""
    totals = torch.zeros(clients, dtype=torch.float64)
    counted = torch.zeros(clients, dtype=torch.float64)
    for lrs in rates:
        lrs = lrs.to(trained[0].device)
        for p in trained:
            p.grad = None
        losses, took = gradients()  # each client's loss; the stacked tensors' gradients set
        totals += losses
        counted += took
        if terms is None:
            optimizer.step(lrs)
        else:
            terms.add_prox(trained)
            optimizer.step(lrs)
            terms.correct(trained, lrs)
        meter.steps(clients)
    return totals, counted


def _learning_rates(
    jobs: Sequence[ClientJob], lr: float, schedule: Schedule, step: int, total_steps: int
) -> torch.Tensor:
    """Each client's learning rate at local step ``step``: at its own place in the schedule."""
    return torch.tensor(
        [lr * schedule.factor(job.start_step + step, total_steps) for job in jobs],
        dtype=torch.float64,
    )


def _stack(model: nn.Module, jobs: Sequence[ClientJob], device) -> _Stack:
    """The group's stacked tensors on ``device``; the context that every client shares is
    loaded into ``model`` instead."""
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
    trained = [
        torch.stack([job.params[n].detach() for job in jobs]).to(device).requires_grad_(True)
        for n in names
    ]
    on = device if device is not None else torch.device("cpu")
    dropout = [
        torch.Generator(device=on).manual_seed(job.generator.initial_seed() + 1) for job in jobs
    ]
    return _Stack(names, trained, context, dropout)


def _group_optimizer(
    jobs: Sequence[ClientJob],
    stacked: list[torch.Tensor],
    make_optimizer: Callable[..., torch.optim.Optimizer],
    lr: float,
):
    """The stacked optimizer of ``make_optimizer``'s class with each client's kept state, or,
    for a class without one, :class:`_PerClient` optimizers."""
    probe = make_optimizer([nn.Parameter(torch.zeros(1))], lr=lr)
    fast = stacked_optimizer(probe, stacked)
    if fast is None:
        return _PerClient(jobs, stacked, make_optimizer, lr)
    for i, job in enumerate(jobs):
        fast.load_client(i, state_from_arrays(job.optimizer_state, len(stacked)))
    return fast


class _PerClient:
    """Each client's own optimizer on its own copies of its slices of the stacked tensors:
    before each step the copies take the slices and their gradients, after it the slices
    take the copies back."""

    def __init__(
        self,
        jobs: Sequence[ClientJob],
        stacked: list[torch.Tensor],
        make_optimizer: Callable[..., torch.optim.Optimizer],
        lr: float,
    ) -> None:
        self.stacked = stacked
        self.optimizers: list[torch.optim.Optimizer] = []
        mine = [[torch.zeros_like(p[i]) for p in stacked] for i in range(len(jobs))]
        for job, leaves in zip(jobs, mine):
            for leaf in leaves:
                leaf.grad = torch.zeros_like(leaf)
            opt = make_optimizer(leaves, lr=lr)
            if job.optimizer_state is not None:
                load_optimizer_state(opt, job.optimizer_state)
            self.optimizers.append(opt)

    @torch.no_grad()
    def step(self, lrs: torch.Tensor) -> None:
        for i, (opt, lr) in enumerate(zip(self.optimizers, lrs.tolist())):
            leaves = opt.param_groups[0]["params"]
            for leaf, p in zip(leaves, self.stacked):
                leaf.copy_(p[i])
                if p.grad is None:  # a parameter the loss does not reach
                    leaf.grad.zero_()
                else:
                    leaf.grad.copy_(p.grad[i])
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            for leaf, p in zip(leaves, self.stacked):
                p[i].copy_(leaf)

    def client_state(self, i: int) -> dict[int, dict[str, torch.Tensor]]:
        return self.optimizers[i].state_dict()["state"]  # by parameter index


def _plain_gradients(
    model: nn.Module, task: Task, jobs: Sequence[ClientJob], group: _Stack, batch_size, device
) -> Callable[[], tuple[torch.Tensor, int]]:
    """A step's gradients: every client's next batch (its generator's order), padded to a
    group, one vmapped loss and one backward; returns each client's loss and that it counts."""
    loss = vmapped_loss(model, task)
    streams = [batches(job.data, batch_size, job.generator) for job in jobs]

    def gradients() -> tuple[torch.Tensor, int]:
        batch, weights, sizes = padded_group([next(s) for s in streams], device)
        batch, lengths = task.group_batch(batch)
        with client_streams(group.dropout, sizes, lengths), quiet_fallbacks():
            losses = loss(group.tensors(), batch, weights)
            losses.sum().backward()
        return losses.detach().double().cpu(), 1

    return gradients


def _private_gradients(
    model: nn.Module, task: Task, jobs: Sequence[ClientJob], group: _Stack, clip_norm, device
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A DP-SGD step's gradients (:func:`~fedsim.batched.dpsgd.dp_gradients`); returns each
    client's loss and whether it counts (its Poisson batch was not empty)."""
    per_example = per_example_gradients(model, task)

    def gradients() -> tuple[torch.Tensor, torch.Tensor]:
        trained = {n: p.detach() for n, p in zip(group.names, group.trained)}
        grads, losses, nonempty = dp_gradients(
            per_example, task, jobs, trained, group.context, clip_norm, device, group.dropout
        )
        for p, g in zip(group.trained, grads):
            p.grad = g
        return torch.where(nonempty, losses, 0.0), nonempty

    return gradients
