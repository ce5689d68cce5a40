"""A client's memory on the run's device, and how many clients of a batched group fit.

Weights, gradients and the optimizer's state are computed from the model's tensors (the state
by one optimizer step on zero gradients of copies of the trained tensors); the activations are
measured: the bytes of the tensors autograd saves for the backward pass
(``torch.autograd.graph.saved_tensors_hooks``, each storage counted once, the model's own
parameters and buffers left out) during one forward pass of the task's training loss on
``sim.batch_size`` of its longest test examples (text tasks cut a batch to its longest text).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fedsim.estimate.sizes import ModelSizes


@dataclass
class Memory:
    """Bytes one client needs while it trains, by kind (``rows``), and what a batched group
    shares and adds per client."""

    rows: dict[str, int] = field(default_factory=dict)
    #: optimizer state per trained value (AdamW: 2) and the optimizer's class name
    states_per_value: float = 0.0
    optimizer: str = ""
    batch: int = 0  # examples in the measured batch
    shared: int = 0  # a batched group: what its clients share (the frozen base, once)
    per_client: int = 0  # a batched group: what each client adds
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def client_memory(
    model: nn.Module, spec, components, sizes: ModelSizes, batch_size: int, device
) -> Memory:
    """A client's memory on ``device`` (``model`` is there; see the module docstring)."""
    out = Memory(batch=batch_size)
    trainable = sizes.trainable.nbytes
    out.rows["frozen weights and buffers"] = sizes.frozen.nbytes + sizes.buffers
    out.rows["trainable weights"] = trainable
    out.rows["gradients"] = trainable
    state, out.optimizer = optimizer_state(model, components.make_optimizer, components.sim["lr"])
    out.rows["optimizer state"] = state
    out.states_per_value = state / trainable if trainable else 0.0
    batch = probe_batch(components.task, batch_size, device)
    out.rows["activations"] = activation_bytes(model, components.task, batch)
    if components.privacy.client_dp:
        out.rows["DP-SGD per-example gradients"] = batch_size * sizes.trainable.numel * 4
    if getattr(components.task, "gradient_checkpointing", False):
        out.notes.append(
            "task.gradient_checkpointing: each block's recomputation in the backward pass "
            "needs that block's activations again (not counted)"
        )
    per_client = out.total - out.rows["frozen weights and buffers"]
    per_client += trainable  # the batched engine's copy of each client's arrays for its reply
    if getattr(components.strategy, "folds_into_base", False):
        per_client += folded_bases(model, spec)
        out.notes.append(
            f"strategy {components.strategy.name} folds changes into the base: a batched "
            "group stacks each client's adapted base weights (counted per client)"
        )
    out.shared, out.per_client = out.rows["frozen weights and buffers"], per_client
    return out


def optimizer_state(model: nn.Module, make_optimizer, lr: float) -> tuple[int, str]:
    """Bytes of the optimizer's state for the trained parameters after one step (on zero
    gradients of copies of them), and the optimizer's class name."""
    copies = [
        torch.zeros_like(p, requires_grad=True) for p in model.parameters() if p.requires_grad
    ]
    if not copies:
        return 0, "none"
    optimizer = make_optimizer(copies, lr=lr)
    for p in copies:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    nbytes = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    return nbytes, type(optimizer).__name__


def probe_batch(task, batch_size: int, device) -> dict:
    """``batch_size`` of the task's longest test examples (its evaluation order puts text
    by length), repeated when the test set has fewer, on ``device``."""
    data = task.eval_order(task.test_set())
    n = len(data[task.label_key])
    index = torch.arange(batch_size) % n + max(n - batch_size, 0)
    return {k: v[index].to(device) for k, v in data.items()}


def activation_bytes(model: nn.Module, task, batch: dict) -> int:
    """Bytes of the tensors saved for the backward pass in one training forward of the task's
    loss (each storage once; the model's parameters and buffers are not activations)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            return t  # a tensor without a plain storage (none in fedsim's tasks)
        ptr = storage.data_ptr()
        if ptr and ptr not in own:
            saved[(str(t.device), ptr)] = storage.nbytes()
        return t

    was_training = model.training
    model.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = task.loss(model, batch)
        del loss
    finally:
        model.train(was_training)
    return sum(saved.values())


def folded_bases(model: nn.Module, spec) -> int:
    """Bytes of the adapted modules' base weights (stacked per client by the batched engine
    when a strategy folds changes into them)."""
    params = dict(model.named_parameters())
    names = [spec.base_weight(m) for m in spec.adapted_modules]
    return sum(params[n].numel() * params[n].element_size() for n in names if n in params)


def free_memory(device) -> tuple[int | None, str]:
    """Free memory on ``device`` in bytes and where the number comes from (None: unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), "torch.cuda.mem_get_info"
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available), "available RAM (psutil)"
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    return None, "unknown on this system"


def clients_that_fit(memory: Memory, free: int, share: float = 1.0) -> int:
    """Clients of a batched group that fit in ``share`` of ``free`` bytes (0: not even one)."""
    room = share * free - memory.shared
    return max(int(room // max(memory.per_client, 1)), 0)
