"""The inputs of the adapted layers: per-layer sums of ``x``, ``x x^T`` and the token count,
EVA's statistics (:mod:`fedsim.adapters.eva`), plain and under client DP-SGD (per-example
clipped and noised).

Inputs are recorded by forward pre-hooks on the adapted modules during the task's forward pass
(model in eval mode, no gradient). An input of shape ``(batch, tokens, n)`` has its padding
tokens removed with the batch's ``attention_mask`` (peft's EVA does the same); an input of
shape ``(batch, n)`` is one token per example.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from fedsim.tasks.base import Batch
from fedsim.training import to_device

#: per layer: the examples' (tokens, n) inputs with padding zeroed, and each example's count
Tokens = tuple[torch.Tensor, torch.Tensor]


def _tokens(x: torch.Tensor, mask: torch.Tensor | None) -> Tokens:
    """``(x, counts)``: ``x`` as ``(batch, tokens, n)`` float64 with padding zeroed."""
    x = x.detach().to(torch.float64)
    if x.dim() == 2:
        return x[:, None, :], torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    if mask is None or mask.dim() != 2 or mask.shape[1] < x.shape[1]:
        return x, torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64)
    keep = mask[:, : x.shape[1]].to(torch.float64).to(x.device)
    return x * keep[..., None], keep.sum(1)


@contextmanager
def _recording(model: nn.Module, modules: list[str]):
    """Yields ``inputs``: each module's inputs of the last forward pass (a list per call)."""
    inputs: dict[str, list[torch.Tensor]] = {}

    def hook_for(name: str) -> Callable:
        def hook(module, args):
            inputs.setdefault(name, []).append(args[0])

        return hook

    handles = [model.get_submodule(m).register_forward_pre_hook(hook_for(m)) for m in modules]
    was_training = model.training
    model.eval()
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _batches(model, spec, task, data: Batch, batch_size: int, device):
    """Per batch: ``{module: (x, counts)}`` of the adapted layers' inputs."""
    modules = list(spec.adapted_modules)
    n = len(next(iter(data.values())))
    with _recording(model, modules) as inputs, torch.no_grad():
        for start in range(0, n, batch_size):
            batch = to_device({k: v[start : start + batch_size] for k, v in data.items()}, device)
            inputs.clear()
            task.logits(model, batch)
            mask = batch.get("attention_mask")
            out = {}
            for m in modules:
                parts = [_tokens(x, mask) for x in inputs.get(m, [])]
                if not parts:
                    raise RuntimeError(f"the forward pass did not reach the adapted layer {m}")
                out[m] = (
                    torch.cat([p[0] for p in parts], dim=1),
                    sum(p[1] for p in parts),
                )
            yield out


def layer_statistics(
    model: nn.Module, spec, task, data: Batch, batch_size: int, device=None
) -> dict[str, np.ndarray]:
    """``{module}/scatter`` (``sum x x^T``, n x n), ``{module}/sum`` (``sum x``) and
    ``{module}/count`` (tokens) over every non-padding token of ``data``, in float64."""
    totals: dict[str, np.ndarray] = {}
    for stats in _batches(model, spec, task, data, batch_size, device):
        for m, (x, counts) in stats.items():
            flat = x.reshape(-1, x.shape[-1])
            part = {
                f"{m}/scatter": (flat.T @ flat).cpu().numpy(),
                f"{m}/sum": flat.sum(0).cpu().numpy(),
                f"{m}/count": np.array([float(counts.sum())]),
            }
            for key, value in part.items():
                totals[key] = totals[key] + value if key in totals else value
    return totals


def private_layer_statistics(
    model: nn.Module,
    spec,
    task,
    data: Batch,
    clip_norm: float,
    sigma: float,
    generator: torch.Generator,
    batch_size: int = 32,
    device=None,
) -> dict[str, np.ndarray]:
    """:func:`layer_statistics` under DP: each example's contribution (its tokens' scatter,
    sum and count, all layers jointly) clipped to ``clip_norm``, summed, plus
    ``N(0, (sigma clip_norm)^2)`` on every coordinate. One Gaussian mechanism over the examples
    used (sample rate 1)."""
    totals: dict[str, torch.Tensor] = {}
    for stats in _batches(model, spec, task, data, batch_size, device):
        # each example's squared norm without its n x n scatter: ||X^T X||_F = ||X X^T||_F
        squares = sum(
            torch.einsum("btn,bsn->bts", x, x).pow(2).sum((1, 2))
            + x.sum(1).pow(2).sum(1)
            + counts.to(x.device).pow(2)
            for x, counts in stats.values()
        )
        factor = torch.clamp(clip_norm / (torch.sqrt(squares) + 1e-12), max=1.0)
        for m, (x, counts) in stats.items():
            flat, weighted = x.reshape(-1, x.shape[-1]), (x * factor[:, None, None])
            part = {
                f"{m}/scatter": weighted.reshape(-1, x.shape[-1]).T @ flat,
                f"{m}/sum": weighted.sum((0, 1)),
                f"{m}/count": (factor * counts.to(x.device)).sum()[None],
            }
            for key, value in part.items():
                value = value.cpu()
                totals[key] = totals[key] + value if key in totals else value
    out = {}
    for key, total in totals.items():
        noise = torch.normal(0.0, sigma * clip_norm, size=total.shape, generator=generator)
        out[key] = (total + noise.double()).numpy()
    return out
