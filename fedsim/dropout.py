"""Dropout that the batched engine can reproduce client by client.

A client that trains alone draws its dropout masks from torch's default generator, which the
ClientApp seeds for each client and round. Under the batched engine's ``torch.func.vmap`` one
call draws the masks of a whole group, so each client's masks must come from its own
generator, in the order and at the shape it draws them when it trains alone: its real
examples only (not the group's padding), and, for text, its own cut length (its batch alone is
cut to its longest text, the group's to the group's longest). :func:`client_streams` hands the
group's generators to :class:`_DropoutMask`, whose vmap rule draws each client's mask that way.

Two kinds of dropout go through it:

* adapter dropout (:class:`AdapterDropout`, on an adapter's input);
* the model's own: :class:`StreamedDropout` is a ``TorchFunctionMode`` that the text tasks
  enter around their forward passes. It replaces ``torch.nn.functional.dropout`` (every
  ``nn.Dropout`` layer calls it, and so does Hugging Face's eager attention) by the same
  computation with the mask drawn here, and ``scaled_dot_product_attention`` with
  ``dropout_p > 0`` (what ``sdpa`` attention runs in training) by its plain definition with
  the attention weights dropped the same way.

On a CPU the masks are those of torch's own dropout for contiguous inputs (what Hugging Face
models drop: ``bernoulli_(1 - p)`` from the default generator, then ``x * (mask / (1 - p))``),
so a client that trains alone gets exactly what plain PyTorch gives it. Sequence dimensions
follow Hugging Face's layouts: a tensor of rank 3 is (examples, tokens, features), one of rank
4 is attention weights (examples, heads, queries, keys); a dimension is cut to the client's
length only where it has the group's length. The batched engine checks on test examples, with
dropout on, that a group's losses equal each client's own before a run starts.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_GROUP = threading.local()  # the batched engine's per-client random streams


class _DropoutMask(torch.autograd.Function):
    """A dropout mask (keep probability ``keep``), drawn from torch's default generator, or,
    under the batched engine's ``torch.func.vmap`` (:func:`client_streams`), from each client's
    own generator for its real examples at its own cut length."""

    generate_vmap_rule = False

    @staticmethod
    def forward(x: torch.Tensor, keep: float) -> torch.Tensor:
        return _draw(x.shape, keep, x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(output)

    @staticmethod
    def backward(ctx, grad):
        return None, None

    @staticmethod
    def vmap(info, in_dims, x: torch.Tensor, keep: float):
        if getattr(_GROUP, "per_example", False) and not getattr(_GROUP, "nested", False):
            # DP-SGD's vmap over a client's examples (each a batch of one) inside the vmap over
            # clients: the client's masks are those of its whole batch, as when it trains alone
            examples = x.movedim(in_dims[0], 0)
            if examples.shape[1] != 1:
                raise RuntimeError("per-example dropout expects each example as a batch of one")
            _GROUP.nested, _GROUP.reached = True, False
            try:
                mask = _DropoutMask.apply(examples.squeeze(1), keep).unsqueeze(1)
                if not _GROUP.reached:  # not under the vmap over clients: no client's stream
                    raise RuntimeError(
                        "per-example dropout ran outside the vmap over clients (a tensor that "
                        "does not depend on the client?)"
                    )
                return mask, 0
            finally:
                _GROUP.nested = False
        _GROUP.reached = True
        generators, sizes = getattr(_GROUP, "generators", None), getattr(_GROUP, "sizes", None)
        if generators is None or len(generators) != info.batch_size:
            raise RuntimeError(
                "dropout under vmap needs each client's generator (fedsim.dropout.client_streams)"
            )
        lengths = getattr(_GROUP, "lengths", None)
        x = x.movedim(in_dims[0], 0)
        masks = torch.ones_like(x)  # padding is kept: it has no weight, no query attends it
        cut = sequence_dims(x.shape[1:], max(lengths)) if lengths else ()
        for i, (g, n) in enumerate(zip(generators, sizes)):
            own = [i, slice(0, n)] + [slice(None)] * (x.dim() - 2)
            for d in cut:
                own[d + 1] = slice(0, lengths[i])
            own = tuple(own)
            masks[own] = _draw(x[own].shape, keep, x, g)
        return masks, 0


def _draw(shape, keep: float, like: torch.Tensor, generator=None) -> torch.Tensor:
    """A mask of ``shape`` (contiguous, ``like``'s dtype and device): 1 with probability
    ``keep``, drawn in row-major order, as torch's CPU dropout draws one for a contiguous
    input."""
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    return out.bernoulli_(keep, generator=generator)


def sequence_dims(shape: Sequence[int], length: int) -> tuple[int, ...]:
    """The dimensions of one client's tensor of ``shape`` that run over its tokens, when its
    group is cut to ``length`` tokens: dimension 1 of (examples, tokens, features); 2 and 3 of
    attention weights (examples, heads, queries, keys); each only if it has that length."""
    if len(shape) == 3:
        dims = (1,)
    elif len(shape) == 4:
        dims = (2, 3)
    else:
        dims = ()
    return tuple(d for d in dims if shape[d] == length)


@contextmanager
def client_streams(
    generators: Sequence[torch.Generator],
    sizes: Sequence[int],
    lengths: Sequence[int] | None = None,
    per_example: bool = False,
):
    """Inside: dropout under vmap draws client ``i``'s masks for its first ``sizes[i]``
    examples from ``generators[i]`` (the batched engine's forward passes); with ``lengths``
    (text), for its first ``lengths[i]`` tokens (:func:`sequence_dims`), the shape its own
    batch has when it trains alone. ``per_example``: the forward pass is a vmap over each
    client's examples, one at a time, inside the vmap over clients (DP-SGD's per-example
    gradients); each example's mask is its slice of its client's whole-batch mask."""
    keys = ("generators", "sizes", "lengths", "per_example")
    saved = {k: getattr(_GROUP, k, None) for k in keys}
    _GROUP.generators, _GROUP.sizes = list(generators), list(sizes)
    _GROUP.lengths = None if lengths is None else list(lengths)
    _GROUP.per_example = per_example
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(_GROUP, k, v)


@contextmanager
def without_dropout():
    """Inside: :func:`drop` is the identity (the batched engine's check that a model has no
    other randomness)."""
    saved = getattr(_GROUP, "off", False)
    _GROUP.off = True
    try:
        yield
    finally:
        _GROUP.off = saved


def drop(x: torch.Tensor, p: float, inplace: bool = False) -> torch.Tensor:
    """``x`` with each entry zeroed with probability ``p`` and the rest scaled by
    ``1 / (1 - p)`` (``inplace``: ``x`` itself): torch's dropout on a CPU, value for value for a
    contiguous ``x``, with the mask from :class:`_DropoutMask`."""
    if p == 0.0 or getattr(_GROUP, "off", False):
        return x
    if p == 1.0:
        factor = torch.zeros((), dtype=x.dtype, device=x.device)
    else:
        keep = 1.0 - p
        factor = _DropoutMask.apply(x, keep).div_(keep)
    return x.mul_(factor) if inplace else x * factor


class AdapterDropout(nn.Module):
    """Dropout on an adapter's input (``x * mask / (1 - p)`` in training), with per-client
    random streams under the batched engine."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return drop(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _argument(args, kwargs, index: int, name: str, default):
    return args[index] if len(args) > index else kwargs.get(name, default)


def attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
) -> torch.Tensor:
    """``scaled_dot_product_attention`` by its definition, its attention weights dropped with
    :func:`drop` (so each client draws them from its own stream)."""
    n, s = query.size(-2), key.size(-2)
    if enable_gqa and key.size(-3) != query.size(-3):
        repeat = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    lowest = torch.finfo(scores.dtype).min
    if is_causal:
        keep = torch.ones(n, s, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, lowest)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, lowest)
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(drop(weights, float(dropout_p)), value)


class StreamedDropout(TorchFunctionMode):
    """Inside: the model's own dropout draws its masks through :func:`drop` (see the module's
    docstring); everything else runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            x = args[0] if args else kwargs["input"]
            p = float(_argument(args, kwargs, 1, "p", 0.5))
            if not _argument(args, kwargs, 2, "training", True) or p == 0.0:
                return x
            return drop(x, p, bool(_argument(args, kwargs, 3, "inplace", False)))
        if func is F.scaled_dot_product_attention and _argument(args, kwargs, 4, "dropout_p", 0.0):
            return attention(*args, **kwargs)
        return func(*args, **kwargs)


def model_dropout(model: nn.Module):
    """The context a text task's forward pass runs in: :class:`StreamedDropout` in training,
    nothing in evaluation."""
    return StreamedDropout() if getattr(model, "training", True) else nullcontext()
