"""DP-SGD in the batched trainer: per-example gradients from a vmap inside the clients' vmap,
clipped, summed and noised per client as Opacus does it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import grad, vmap

from fedsim.batched.group import Functional, padded_group, quiet_fallbacks
from fedsim.batched.jobs import ClientJob
from fedsim.dropout import client_streams
from fedsim.privacy import poisson_indices
from fedsim.tasks.base import Batch, Task


def per_example_gradients(model: nn.Module, task: Task) -> Callable:
    """``f(trained, context, batch)``: every example's gradient of its own loss with respect
    to its client's trained tensors, ``{name: (clients, examples, *shape)}``, and the
    examples' losses ``(clients, examples)``: a vmap over examples inside a vmap over
    clients (DP-SGD's per-example clipping; Opacus computes the same per client)."""

    def one(trained: dict, context: dict, example: Batch):
        batch = {k: v.unsqueeze(0) for k, v in example.items()}
        tensors = {**trained, **context}
        loss = task.loss(Functional(model, tensors), batch, reduction="none")[0]
        return loss, loss.detach()

    return vmap(vmap(grad(one, has_aux=True), in_dims=(None, None, 0)))


def dp_gradients(
    per_example: Callable,
    task: Task,
    jobs: Sequence[ClientJob],
    trained: dict[str, torch.Tensor],
    context: dict[str, torch.Tensor],
    clip_norm: float,
    device,
    dropout: Sequence[torch.Generator],
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One DP-SGD step's gradients of every client, as Opacus' ``DPOptimizer`` computes a
    client's (``loss_reduction="mean"``): a Poisson batch drawn with the client's generator,
    each example's gradient clipped to ``clip_norm`` (its norm over all trained tensors), the
    sum, Gaussian noise of std ``sigma * clip_norm`` drawn from the client's noise generator
    tensor by tensor in the optimizer's order, divided by the expected batch size. An empty
    batch is noise only. Dropout masks come from the ``dropout`` generators, each client's
    for its whole Poisson batch (:func:`fedsim.dropout.client_streams`). Returns the stacked
    gradients, each client's mean loss and whether its batch had examples."""
    drawn, sizes = [], []
    for job in jobs:
        n = len(job.data[task.label_key])
        idx = poisson_indices(n, job.dp.sample_rate, job.generator)
        sizes.append(len(idx))
        # an empty batch: one stand-in example that the clipping weights by 0
        drawn.append({k: (v[idx] if len(idx) else v[:1]) for k, v in job.data.items()})
    batch, _, _ = padded_group(drawn, device)
    batch, lengths = task.group_batch(batch)
    width = len(batch[task.label_key][0])
    on = next(iter(trained.values())).device
    real = torch.arange(width, device=on)[None, :] < torch.tensor(sizes, device=on)[:, None]
    streams = client_streams(dropout, sizes, lengths, per_example=True)
    with torch.no_grad(), quiet_fallbacks(), streams:
        grads, losses = per_example(trained, context, batch)
    names = list(trained)
    norms = torch.stack(
        [grads[n].reshape(len(jobs), width, -1).norm(2, dim=-1) for n in names], dim=-1
    ).norm(2, dim=-1)
    factor = (clip_norm / (norms + 1e-6)).clamp(max=1.0) * real
    summed = [torch.einsum("ci,ci...->c...", factor.to(grads[n].dtype), grads[n]) for n in names]
    for i, job in enumerate(jobs):  # each client's noise, in its optimizer's order
        std = job.dp.sigma * clip_norm
        for s in summed:
            if std:  # as Opacus draws it: on the tensor's device, from the client's generator
                s[i] += torch.normal(
                    0.0, std, size=s[i].shape, generator=job.dp.noise, device=s[i].device
                )
            s[i] /= job.dp.expected_batch
    counts = torch.tensor(sizes, dtype=torch.float64)
    mean = (losses.double().cpu() * real.cpu()).sum(1) / counts.clamp(min=1)
    return summed, mean, counts > 0
