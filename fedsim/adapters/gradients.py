"""Gradients of the loss with respect to the adapted layers' frozen base weights: the
statistics of gradient-based data-driven initialisations (LoRA-SB's), plain and under client
DP-SGD (per-example clipped and noised)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from fedsim import meter
from fedsim.dropout import without_dropout
from fedsim.tasks.base import Batch
from fedsim.training import to_device


def base_gradients(
    model: nn.Module,
    spec,
    loss_fn,
    data: dict[str, torch.Tensor],
    batch_size: int,
    device: torch.device | None = None,
) -> dict[str, np.ndarray]:
    """``G``: the summed gradient of the mean batch loss with respect to each adapted base
    weight, over ``data`` in batches of ``batch_size`` (model in eval mode, no step).

    Returns ``{module name: G}`` (m x n, float32). ``loss_fn(model, batch)`` is the task's
    mean loss (:meth:`~fedsim.tasks.Task.loss`).
    """
    weights = {m: model.get_submodule(m).base.weight for m in spec.adapted_modules}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        n = len(next(iter(data.values())))
        for start in range(0, n, batch_size):
            batch = {k: v[start : start + batch_size] for k, v in data.items()}
            if device is not None and device.type != "cpu":
                batch = {k: v.to(device) for k, v in batch.items()}
            loss_fn(model, batch).backward()
            meter.examples(len(next(iter(batch.values()))))
        return {
            m: (
                w.grad.detach().float().cpu().numpy().copy()  # float32 (a 16-bit base's too)
                if w.grad is not None
                else np.zeros(tuple(w.shape), dtype=np.float32)
            )
            for m, w in weights.items()
        }
    finally:
        for w in weights.values():
            w.grad = None
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)


def private_base_gradients(
    model: nn.Module,
    spec,
    loss_fn,
    data: Batch,
    clip_norm: float,
    sigma: float,
    generator: torch.Generator,
    batch_size: int = 64,
    device: torch.device | None = None,
) -> dict[str, np.ndarray]:
    """LoRA-SB's set-up gradients under DP: the sum over the client's examples of each
    example's gradient with respect to the adapted base weights, clipped to ``clip_norm``
    jointly over all those weights, plus ``N(0, (sigma * clip_norm)^2)`` on every coordinate.
    One Gaussian mechanism over the examples used (sample rate 1). Returns float32 (``4 m n``
    bytes a layer on the wire, as :func:`base_gradients`). ``model`` is a throwaway copy;
    ``loss_fn(model, batch, reduction)`` is the task's :meth:`~fedsim.tasks.Task.loss`.
    """
    from opacus.grad_sample.utils import prepare_module

    bases = {m: model.get_submodule(m).base for m in spec.adapted_modules}
    for p in model.parameters():
        p.requires_grad_(False)
    for lin in bases.values():
        lin.weight.requires_grad_(True)
    gsm = prepare_module(model, "hooks", batch_first=True, loss_reduction="sum")
    model.train()  # Opacus records activations in training mode; dropout stays off:
    for module in model.modules():  # torch's layers, and fedsim's (text models' own too)
        if isinstance(module, nn.Dropout):
            module.eval()
    total = {m: torch.zeros_like(lin.weight, dtype=torch.float64) for m, lin in bases.items()}
    n = len(next(iter(data.values())))
    for start in range(0, n, batch_size):
        batch = to_device({k: v[start : start + batch_size] for k, v in data.items()}, device)
        with without_dropout():
            loss = loss_fn(gsm, batch, reduction="sum")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        per = {m: lin.weight.grad_sample.double() for m, lin in bases.items()}
        norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per.values()))
        factor = torch.clamp(clip_norm / (norms + 1e-12), max=1.0)
        for m, g in per.items():
            total[m] += torch.einsum("b,b...->...", factor, g)
        for lin in bases.values():
            lin.weight.grad_sample = None
            lin.weight.grad = None
    out = {}  # summed and noised in float64; sent in float32, as the plain G (4 m n bytes)
    for m, t in total.items():
        noise = torch.normal(0.0, sigma * clip_norm, size=t.shape, generator=generator)
        out[m] = (t.cpu() + noise.double()).float().numpy()
    return out
