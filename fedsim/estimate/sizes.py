"""The adapted model's parameters: counts and bytes by dtype, frozen and trainable (computed
from the built model's tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

#: the parts of the model, in the order they are printed
PARTS = ("base", "adapter_frozen", "adapter_trained", "head")
LABELS = {
    "base": "base model (frozen)",
    "adapter_frozen": "adapter, frozen factors",
    "adapter_trained": "adapter, trained",
    "head": "task head, trained",
}


@dataclass
class Part:
    """Parameters of one part of the model."""

    numel: int = 0
    nbytes: int = 0
    by_dtype: dict[str, int] = field(default_factory=dict)  # dtype name -> bytes

    def add(self, numel: int, nbytes: int, dtype: str) -> None:
        self.numel += numel
        self.nbytes += nbytes
        self.by_dtype[dtype] = self.by_dtype.get(dtype, 0) + nbytes

    def merged(self, other: Part) -> Part:
        out = Part(self.numel, self.nbytes, dict(self.by_dtype))
        for dtype, n in other.by_dtype.items():
            out.by_dtype[dtype] = out.by_dtype.get(dtype, 0) + n
        out.numel += other.numel
        out.nbytes += other.nbytes
        return out


@dataclass
class ModelSizes:
    parts: dict[str, Part]
    buffers: int  # bytes of the model's buffers (frozen: position ids, norms' statistics)

    def total(self, names=PARTS) -> Part:
        out = Part()
        for name in names:
            out = out.merged(self.parts[name])
        return out

    @property
    def frozen(self) -> Part:
        return self.total(("base", "adapter_frozen"))

    @property
    def trainable(self) -> Part:
        return self.total(("adapter_trained", "head"))


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_sizes(model: nn.Module, spec) -> ModelSizes:
    """Each parameter of ``model`` in its part: the adapter's trained and frozen parameters
    (``spec.trained``, ``spec.frozen``), the task head (trained parameters outside the adapted
    modules, ``spec.heads``), and the base model (everything else)."""
    trained, frozen = set(spec.trained), set(spec.frozen)
    heads = set(spec.heads) & trained
    parts = {name: Part() for name in PARTS}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # a tied weight counts once
            continue
        seen.add(id(p))
        if name in heads:
            part = "head"
        elif name in trained or p.requires_grad:
            part = "adapter_trained"
        elif name in frozen:
            part = "adapter_frozen"
        else:
            part = "base"
        parts[part].add(p.numel(), p.numel() * p.element_size(), _dtype_name(p.dtype))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return ModelSizes(parts, buffers)
