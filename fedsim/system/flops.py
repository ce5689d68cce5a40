"""The FLOPs of one training example of a task's model, counted (not timed)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedsim.training import to_device


def flops_per_example(task, model: nn.Module, batch_size: int, device=None) -> float:
    """Forward and backward FLOPs per example of ``task``'s loss through ``model`` (its adapter
    trainable, the base frozen: no weight gradients for the base), counted by
    ``torch.utils.flop_counter`` on the first ``batch_size`` examples of the test set.

    The count covers matrix products, convolutions and attention (the operations with a FLOP
    formula); element-wise work is left out. The model's mode, gradients and the random state
    are left as they were."""
    data = task.test_set()
    n = min(batch_size, len(data[task.label_key]))
    batch = to_device({k: v[:n] for k, v in data.items()}, device)
    was_training = model.training
    model.eval()  # no dropout: the count is the same, and no random numbers are drawn
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    try:
        with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
            task.loss(model, batch).backward()
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        model.train(was_training)
    return counter.get_total_flops() / max(n, 1)
