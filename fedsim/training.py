"""Client-side training and evaluation: the loop every engine runs for one client.

Determinism: every random choice (batch order, dropout) comes from generators seeded by
``(run seed, round, client)``, so a client's work is the same whichever engine, process or
order runs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedsim import meter
from fedsim.errors import ConfigError
from fedsim.tasks.base import Batch, Task
from fedsim.validate import integer, number

# ----------------------------------------------------------------------------- schedules


class Schedule:
    """Learning-rate factor as a function of the client's global step count.

    ``total_steps`` is the most local steps a client can take in the run (rounds x local
    steps); a client that is sampled less often never reaches the end of the schedule.
    """

    def __init__(self, warmup_steps: int = 0) -> None:
        self.warmup_steps = integer("schedule.warmup_steps", warmup_steps, low=0)

    def factor(self, step: int, total_steps: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(total_steps - self.warmup_steps, 1)
        return self.decay(min((step - self.warmup_steps) / span, 1.0))

    def decay(self, progress: float) -> float:
        return 1.0


class ConstantSchedule(Schedule):
    """Constant learning rate (after an optional linear warm-up)."""


class _DecaySchedule(Schedule):
    """Decays from the learning rate to ``final_factor`` times it, after warm-up."""

    def __init__(self, warmup_steps: int = 0, final_factor: float = 0.0) -> None:
        super().__init__(warmup_steps)
        self.final_factor = number("schedule.final_factor", final_factor, 0, 1)


class LinearSchedule(_DecaySchedule):
    """Linear decay from the learning rate to ``final_factor`` times it, after warm-up."""

    def decay(self, progress: float) -> float:
        return 1.0 - (1.0 - self.final_factor) * progress


class CosineSchedule(_DecaySchedule):
    """Cosine decay from the learning rate to ``final_factor`` times it, after warm-up."""

    def decay(self, progress: float) -> float:
        cos = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.final_factor + (1.0 - self.final_factor) * cos


# ----------------------------------------------------------------------------- loops


def client_generator(seed: int, server_round: int, client: int) -> torch.Generator:
    """The generator of one client's work in one round."""
    mixed = np.random.SeedSequence([seed, server_round, client]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(mixed))


def resolve_device(name: str) -> torch.device:
    """``sim.device`` as a torch device: ``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("sim.device", name, "CUDA is not available here; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                "sim.device", name, f"this machine has {torch.cuda.device_count()} CUDA devices"
            )
    return device


def describe_device(device: torch.device) -> str:
    """The device for the run's header: ``cpu (1 thread)``, ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    threads = torch.get_num_threads()
    return f"{device} ({threads} thread{'s' if threads != 1 else ''})"


def device_fields(device: torch.device) -> dict[str, str]:
    """summary.json's ``device`` (``cpu``, ``cuda:0``) and ``device_name`` (the CPU's
    ``platform.processor()``, else ``cpu``; the GPU's name)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {"device": f"cuda:{index}", "device_name": torch.cuda.get_device_name(index)}
    import platform

    return {"device": str(device), "device_name": platform.processor() or str(device)}


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring a new peak of the GPU memory allocated on ``device`` (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_fields(device: torch.device) -> dict[str, int]:
    """``{"gpu_peak_mem_bytes": ...}``: the most memory torch allocated on ``device`` since
    :func:`reset_peak_memory` (CUDA only; nothing on the CPU)."""
    if device.type != "cuda":
        return {}
    return {"gpu_peak_mem_bytes": int(torch.cuda.max_memory_allocated(device))}


def to_device(batch: Batch, device: torch.device | None) -> Batch:
    if device is None or device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def seed_torch(seed: int) -> None:
    """Seed torch's global generators (dropout and other implicit draws) for one client's work.

    ``torch.manual_seed`` also queues seeds for CUDA, XPU and MTIA, formatting a stack trace for
    each lazy call (about 0.5 ms, every client, every round); only the CPU generator, and CUDA's
    when it is in use, matter here.
    """
    torch.random.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def batches(data: Batch, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    """Endless mini-batches: shuffled passes over the data, without replacement within a pass."""
    n = len(next(iter(data.values())))
    if n == 0:
        raise ValueError("cannot train on an empty partition")
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            yield {k: v[idx] for k, v in data.items()}


@dataclass
class LocalTerms:
    """What a client's local steps add to plain training on its loss, per trained tensor
    (``None``: nothing for that tensor):

    * FedProx (Li et al., 2020, https://arxiv.org/abs/1812.06127): the gradient of the
      proximal term ``(mu/2) ||w - anchor||^2``, ``mu (w - anchor)``, added to the loss's
      gradient before the optimizer's step (after DP-SGD's clipping and noise: it does not
      depend on the data);
    * SCAFFOLD (Karimireddy et al., 2020, https://arxiv.org/abs/1910.06378): the correction
      ``eta_t (c - c_i)`` (``offset``) subtracted from the tensor after the optimizer's step
      ``t`` of learning rate ``eta_t``; with plain SGD the step is the paper's
      ``y <- y - eta_t (g_i(y) - c_i + c)``.

    ``names`` are the trained tensors' names in the optimizer's order; the tensors the methods
    change are passed in that order (a client's own parameters, or a batched group's stacked
    ones, whose leading dimension is the client, with a learning rate per client).
    """

    names: list[str]
    mu: float
    anchors: list[torch.Tensor | None]
    offsets: list[torch.Tensor | None]
    #: a strategy's regulariser (HetLoRA's rank self-pruning): adds its gradient to the
    #: tensors' ``grad`` given the names and the tensors; None: none
    penalty: Callable[[list[str], Sequence[torch.Tensor]], None] | None = None

    @torch.no_grad()
    def add_prox(self, params: Sequence[torch.Tensor]) -> None:
        """``p.grad += mu (p - anchor)`` (a tensor the loss did not reach gets the term alone),
        and the strategy's regulariser's gradient (:attr:`penalty`)."""
        if self.penalty is not None:
            self.penalty(self.names, params)
        if not self.mu:
            return
        for p, anchor in zip(params, self.anchors):
            if anchor is None:
                continue
            term = self.mu * (p - anchor)
            if p.grad is None:
                p.grad = term
            else:
                p.grad.add_(term)

    @torch.no_grad()
    def correct(self, params: Sequence[torch.Tensor], lr: float | torch.Tensor) -> None:
        """``p -= lr * offset`` after the optimizer's step (``lr``: a tensor of one learning
        rate per client for stacked tensors)."""
        for p, offset in zip(params, self.offsets):
            if offset is None:
                continue
            if isinstance(lr, torch.Tensor):
                shape = (-1,) + (1,) * (p.dim() - 1)
                p.sub_(lr.to(p.dtype).view(shape) * offset)
            else:
                p.sub_(lr * offset)

    @staticmethod
    def stack(terms: Sequence[LocalTerms], device: torch.device | None) -> LocalTerms:
        """Several clients' terms as one over their stacked tensors (the batched trainer);
        every client of a group has the same structure (one configuration)."""
        first = terms[0]
        if first.penalty is not None:
            raise ValueError("a strategy's regulariser acts on one client's tensors")

        def stacked(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
            if parts[0] is None:
                return None
            return torch.stack(parts).to(device)

        return LocalTerms(
            first.names,
            first.mu,
            [stacked([t.anchors[k] for t in terms]) for k in range(len(first.names))],
            [stacked([t.offsets[k] for t in terms]) for k in range(len(first.names))],
        )


def step_sizes(lr: float, schedule: Schedule, start_step: int, steps: int, total: int) -> float:
    """The sum of the learning rates of ``steps`` local steps from ``start_step`` (SCAFFOLD's
    ``K eta_l`` under a schedule)."""
    return sum(lr * schedule.factor(start_step + i, total) for i in range(steps))


@dataclass
class LocalResult:
    loss: float  # mean training loss over the local steps
    steps: int


def train_local(
    model: nn.Module,
    task: Task,
    data: Batch,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    schedule: Schedule,
    start_step: int,
    total_steps: int,
    generator: torch.Generator,
    device: torch.device | None = None,
    terms: LocalTerms | None = None,
) -> LocalResult:
    """Run ``steps`` optimizer steps of ``model`` on ``data`` (the task's mean loss; with
    ``terms``, FedProx's proximal gradient and SCAFFOLD's correction on the optimizer's
    parameters, :class:`LocalTerms`; the loss reported is the task's alone).

    ``data`` stays where it is (the CPU); each batch moves to ``device``, the model's device.
    """
    model.train()
    stream = batches(data, batch_size, generator)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total = 0.0
    for i in range(steps):
        batch = to_device(next(stream), device)
        factor = schedule.factor(start_step + i, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        if terms is None:
            optimizer.step()
        else:
            terms.add_prox(params)
            optimizer.step()
            terms.correct(params, lr * factor)
        total += float(loss.detach())
        meter.steps()
    return LocalResult(loss=total / max(steps, 1), steps=steps)


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Task,
    data: Batch,
    batch_size: int | None = None,
    device: torch.device | None = None,
) -> EvalResult:
    """Mean loss and accuracy of ``model`` on ``data`` (the task's: cross-entropy and
    top-1 for classifiers) (eval mode, no autograd;
    ``batch_size`` defaults to the task's ``eval_batch_size``)."""
    batch_size = batch_size or task.eval_batch_size
    data = task.eval_order(data)
    was_training = model.training
    model.eval()
    labels = data[task.label_key]
    n = len(labels)
    loss_sum, correct = 0.0, 0
    for start in range(0, n, batch_size):
        batch = to_device({k: v[start : start + batch_size] for k, v in data.items()}, device)
        batch_loss, batch_correct = task.eval_sums(model, batch)
        loss_sum += batch_loss
        correct += batch_correct
        meter.examples(len(batch[task.label_key]))
    model.train(was_training)
    if n == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), num_examples=0)
    return EvalResult(loss=loss_sum / n, accuracy=correct / n, num_examples=n)


# ----------------------------------------------------------------------------- optimizer state


def optimizer_state_arrays(optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """An optimizer's per-parameter state as flat named arrays (``"<param index>/<key>"``)."""
    return state_arrays(optimizer.state_dict()["state"])


def state_arrays(per_param: dict) -> dict[str, np.ndarray]:
    """``optimizer.state_dict()["state"]`` (index -> key -> value) as flat named arrays."""
    out = {}
    for index, state in per_param.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"{index}/{key}"] = value.detach().cpu().numpy().copy()
            elif value is not None:
                out[f"{index}/{key}"] = np.asarray(value)
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, arrays: dict[str, np.ndarray]) -> None:
    """Inverse of :func:`optimizer_state_arrays`, for an optimizer over the same parameters."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in arrays.items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = torch.from_numpy(np.array(value))
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
