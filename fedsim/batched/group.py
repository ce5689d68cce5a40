"""A group of clients as one call: their batches padded and stacked, their losses one vmap."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, vmap

from fedsim.dropout import client_streams
from fedsim.tasks.base import Batch, Task
from fedsim.training import to_device


class Functional:
    """``model`` called with some of its tensors replaced (what ``task.loss`` calls)."""

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        self.model, self.tensors = model, tensors

    def __call__(self, *args, **kwargs):
        return functional_call(self.model, self.tensors, args, kwargs, strict=False)

    @property
    def training(self) -> bool:
        return self.model.training


@contextmanager
def quiet_fallbacks():
    """torch warns once per operator without a vmap batching rule (the CPU's fused
    attention: it then loops over the clients); that is a speed note, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because")
        yield


def vmapped_loss(model: nn.Module, task: Task) -> Callable:
    """``f(tensors, batch, weights)``: each client's weighted loss, one vmapped call over
    the stacked ``tensors`` (parameters by name), ``batch`` (from :meth:`Task.group_batch`)
    and ``weights`` (per example)."""

    def client_loss(tensors: dict[str, torch.Tensor], batch: Batch, w: torch.Tensor):
        per_example = task.loss(Functional(model, tensors), batch, reduction="none")
        return (per_example * w).sum()

    return vmap(client_loss)


def group_mean_losses(
    model: nn.Module, task: Task, drawn: list[Batch], seeds: Sequence[int] | None = None
) -> torch.Tensor:
    """Each client's mean loss on its batch in ``drawn`` computed as the batched engine
    computes it (padded, :meth:`Task.group_batch`, one vmapped call), with ``model``'s own
    trained parameters for every client, and client ``i``'s dropout drawn from a generator
    seeded ``seeds[i]`` (as the inline engine seeds torch's for it): what the engine checks
    against the task's plain loss before a run."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    batch, weights, sizes = padded_group(drawn, device)
    batch, lengths = task.group_batch(batch)
    tensors = {n: params[n].detach().expand(len(drawn), *params[n].shape) for n in names}
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds or [0] * len(drawn)]
    with torch.no_grad(), quiet_fallbacks(), client_streams(generators, sizes, lengths):
        return vmapped_loss(model, task)(tensors, batch, weights)


def padded_group(drawn: list[Batch], device) -> tuple[Batch, torch.Tensor, list[int]]:
    """The clients' batches stacked, each padded to the longest with copies of its first
    example, and the per-example weights that make the padded sum each client's mean loss
    (``1 / n_i`` for its ``n_i`` real examples, 0 for the padding)."""
    sizes = [len(next(iter(b.values()))) for b in drawn]
    width = max(sizes)
    weights = torch.zeros(len(drawn), width)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in drawn[0]}
    for i, (b, n) in enumerate(zip(drawn, sizes)):
        weights[i, :n] = 1.0 / n
        for k, v in b.items():
            if n < width:
                v = torch.cat([v, v[:1].expand(width - n, *v.shape[1:])])
            out[k].append(v)
    batch = to_device({k: torch.stack(v) for k, v in out.items()}, device)
    return batch, weights.to(device if device is not None else "cpu"), sizes
