"""``engine.group_size=auto``: the batched engine's largest group that fits in free GPU memory.

On a GPU, one vmapped step of ``k`` clients needs about ``fixed + k * per_client`` bytes: the
activations kept for the backward pass, the stacked trained tensors, their gradients and the
optimizer's state grow with the group; the frozen base is shared. :func:`probe` measures one
training step (forward and backward, the task's longest test examples, ``sim.batch_size`` of
them per client) for groups of 1 and 2 clients; their difference is one client's share, to
which the stacked optimizer's state is added (AdamW's two moments and the copy each reply
takes: 3 x the trained tensors' bytes) and, under DP-SGD, the per-example gradients (2 x the
trained bytes per example). The group is the largest ``k`` for which that fits in
:data:`MARGIN` of the memory free after the probe, at most the round's clients. On the CPU,
``auto`` is the default group of :data:`CPU_GROUP`.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from fedsim.errors import ConfigError
from fedsim.validate import is_int

AUTO = "auto"
#: what ``auto`` means on the CPU (the engine's default)
CPU_GROUP = 32
#: the share of the free memory a group may take; the rest is the safety margin (the
#: allocator's rounding and fragmentation, evaluation, other processes on the GPU)
MARGIN = 0.8


def check_group_size(value) -> int | str:
    """``engine.group_size``: an integer >= 1, or ``auto``."""
    if value == AUTO:
        return AUTO
    if not is_int(value) or value < 1:
        raise ConfigError(
            "engine.group_size",
            value,
            "must be an integer >= 1, or auto (the largest group that fits in the GPU's free "
            f"memory; {CPU_GROUP} on the CPU)",
        )
    return value


def choose(per_client: int, fixed: int, free: int, clients: int) -> int:
    """The largest group of at most ``clients`` (>= 1) with ``fixed + k * per_client`` within
    :data:`MARGIN` of ``free`` bytes; 1 when not even one client fits (the run then fails
    as any run out of memory would, with CUDA's message)."""
    room = MARGIN * free - max(fixed, 0)
    k = int(room // max(per_client, 1))
    return max(1, min(k, max(clients, 1)))


def resolve(components, model: nn.Module, data: dict) -> int:
    """The group size ``auto`` stands for in this run (printed on stderr on a GPU)."""
    device = components.device
    if device.type != "cuda":
        return CPU_GROUP
    sim = components.sim
    per_client, fixed = probe(model, components.task, data, sim["batch_size"], device)
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    per_client += 3 * trained
    if components.privacy.client_dp:
        per_client += 2 * trained * sim["batch_size"]
    free, _ = torch.cuda.mem_get_info(device)
    k = choose(per_client, fixed, free, sim["clients_per_round"])
    print(
        f"fedsim: engine.group_size=auto -> {k} (one client's step {per_client / 2**20:.0f} "
        f"MiB, {free / 2**30:.1f} GiB free on {device}, {MARGIN:.0%} of it used at most)",
        file=sys.stderr,
    )
    return k


def _probe_batch(task, data: dict, batch_size: int) -> dict:
    """``batch_size`` of the longest examples of ``data`` (in the task's evaluation order:
    text by length), repeated if there are fewer."""
    n = len(data[task.label_key])
    index = (torch.arange(batch_size) % n + max(n - batch_size, 0)).to(data[task.label_key].device)
    return {k: v[index] for k, v in data.items()}


def probe(model: nn.Module, task, data: dict, batch_size: int, device) -> tuple[int, int]:
    """(bytes one more client adds to a vmapped training step, the bytes the step needs
    whatever the group's size), measured on ``device`` (CUDA) for groups of 1 and 2."""
    batch = _probe_batch(task, data, batch_size)
    one, two = (_step_peak(model, task, [batch] * k, device) for k in (1, 2))
    per_client = max(two - one, 1)
    return per_client, one - per_client


def _step_peak(model: nn.Module, task, drawn: list, device) -> int:
    """The peak of the memory allocated on ``device`` by one vmapped forward and backward of
    the clients in ``drawn``, above what was allocated before it."""
    from fedsim.batched import padded_group, quiet_fallbacks, vmapped_loss
    from fedsim.dropout import client_streams

    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    k = len(drawn)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    stacked = {
        n: p.detach().unsqueeze(0).repeat(k, *[1] * p.dim()).requires_grad_()
        for n, p in params.items()
    }
    batch, weights, sizes = padded_group(drawn, device)
    batch, lengths = task.group_batch(batch)
    generators = [torch.Generator(device=device).manual_seed(i) for i in range(k)]
    model.train()
    with quiet_fallbacks(), client_streams(generators, sizes, lengths):
        vmapped_loss(model, task)(stacked, batch, weights).sum().backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del stacked, batch, weights
    torch.cuda.empty_cache()
    return int(peak)
