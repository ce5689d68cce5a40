"""Training many clients at once: one vmapped forward and backward over stacked adapters.

The clients of a round share the frozen base model and differ only in small tensors: their
trained adapter and head, sometimes their frozen factors or folded base. The batched trainer
stacks the tensors that differ along a new leading client dimension and runs each local step of
a whole group of clients as one ``torch.func.vmap`` of ``functional_call`` over the shared
model: the base's matrix products see every client's examples at once and the adapters'
become batched matrix products (the idea of multi-adapter serving such as S-LoRA, applied to
training).

Each client keeps what the inline engine gives it: its own parameter leaves, its own optimizer
(any ``torch.optim`` class from the ``optimizer`` group, with its state when
``sim.keep_optimizer_state``), its own batch order (its generator), its own adapter-dropout
masks and the model's own (:mod:`fedsim.dropout`) and its own position in the learning-rate
schedule. The sum of the group's losses has, with respect to each client's leaves,
exactly that client's gradient, so every client's update is the inline engine's up to float
rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedsim.dropout import client_streams
from fedsim.privacy import ClientDP, poisson_indices
from fedsim.tasks.base import Batch, Task
from fedsim.training import LocalResult, Schedule, batches, load_optimizer_state, to_device


@dataclass
class ClientJob:
    """One client's share of a batched group."""

    params: dict[str, torch.Tensor]  # its trained parameters' starting values, by name
    context: dict[str, torch.Tensor]  # other tensors of its model that may differ per client
    data: Batch
    generator: torch.Generator  # its batch order
    start_step: int  # its global step count (the schedule's position)
    optimizer_state: dict | None = None  # fedsim.training.optimizer_state_arrays, if kept
    dp: ClientDP | None = None  # DP-SGD: its Poisson rate, noise and accountant


@dataclass
class ClientOutcome:
    result: LocalResult
    params: dict[str, torch.Tensor]  # its trained parameters after the local steps
    #: its optimizer's per-parameter state, as ``torch.optim.Optimizer.state_dict()["state"]``
    optimizer_state: dict[int, dict[str, torch.Tensor]]


class StackedAdamW:
    """``torch.optim.AdamW`` (or ``Adam``) for every client of a group at once, on parameters
    stacked along dimension 0, with a learning rate and a step count per client: the update
    of each slice is, up to float rounding, what the client's own optimizer computes
    (torch's single-tensor Adam, decoupled weight decay for AdamW)."""

    KEYS = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, params: list[torch.Tensor], defaults: dict, decoupled: bool) -> None:
        self.params = params
        self.beta1, self.beta2 = (float(b) for b in defaults["betas"])
        self.eps, self.weight_decay = float(defaults["eps"]), float(defaults["weight_decay"])
        self.decoupled = decoupled
        c, device = params[0].shape[0], params[0].device
        self.steps = torch.zeros(c, dtype=torch.float64, device=device)
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @staticmethod
    def supports(opt: torch.optim.Optimizer) -> bool:
        d = opt.defaults
        return type(opt) in (torch.optim.AdamW, torch.optim.Adam) and not (
            d.get("amsgrad") or d.get("maximize") or d.get("capturable") or d.get("differentiable")
        )

    def load_client(self, i: int, state: dict[int, dict[str, torch.Tensor]]) -> None:
        if not state:
            return
        if any(state[k]["exp_avg"].shape != p.shape[1:] for k, p in enumerate(self.params)):
            raise ValueError("the kept optimizer state does not fit the trained parameters")
        self.steps[i] = float(state[0]["step"])
        for k, _ in enumerate(self.params):
            self.exp_avg[k][i].copy_(state[k]["exp_avg"])
            self.exp_avg_sq[k][i].copy_(state[k]["exp_avg_sq"])

    def client_state(self, i: int) -> dict[int, dict[str, torch.Tensor]]:
        if self.steps[i] == 0:
            return {}
        step = torch.tensor(float(self.steps[i]), dtype=torch.float32)
        return {
            k: {"step": step.clone(), "exp_avg": m[i].clone(), "exp_avg_sq": v[i].clone()}
            for k, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq))
        }

    @torch.no_grad()
    def step(self, lrs: torch.Tensor) -> None:
        self.steps += 1
        bc1 = 1 - self.beta1**self.steps
        bc2_sqrt = (1 - self.beta2**self.steps).sqrt()
        step_size = lrs.double() / bc1
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            grad = p.grad
            if self.weight_decay:
                if self.decoupled:
                    p.mul_((1 - lrs.double() * self.weight_decay).to(p.dtype).view(shape))
                else:
                    grad = grad.add(p, alpha=self.weight_decay)
            m.lerp_(grad, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            denom = (v.sqrt() / bc2_sqrt.to(p.dtype).view(shape)).add_(self.eps)
            p.sub_(step_size.to(p.dtype).view(shape) * m / denom)


class StackedSGD:
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay) for every client of
    a group at once, with a learning rate per client (see :class:`StackedAdamW`)."""

    KEYS = ("momentum_buffer",)

    def __init__(self, params: list[torch.Tensor], defaults: dict) -> None:
        self.params = params
        self.momentum, self.dampening = float(defaults["momentum"]), float(defaults["dampening"])
        self.weight_decay, self.nesterov = float(defaults["weight_decay"]), defaults["nesterov"]
        c = params[0].shape[0]
        self.has_buffer = torch.zeros(c, dtype=torch.bool, device=params[0].device)
        self.buffers = [torch.zeros_like(p) for p in params]

    @staticmethod
    def supports(opt: torch.optim.Optimizer) -> bool:
        d = opt.defaults
        return type(opt) is torch.optim.SGD and not (d.get("maximize") or d.get("differentiable"))

    def load_client(self, i: int, state: dict[int, dict[str, torch.Tensor]]) -> None:
        if state and all("momentum_buffer" in state[k] for k in range(len(self.params))):
            for k in range(len(self.params)):
                self.buffers[k][i].copy_(state[k]["momentum_buffer"])
            self.has_buffer[i] = True

    def client_state(self, i: int) -> dict[int, dict[str, torch.Tensor]]:
        if not self.momentum or not self.has_buffer[i]:
            return {}
        return {k: {"momentum_buffer": b[i].clone()} for k, b in enumerate(self.buffers)}

    @torch.no_grad()
    def step(self, lrs: torch.Tensor) -> None:
        for p, buf in zip(self.params, self.buffers):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            grad = p.grad
            if self.weight_decay:
                grad = grad.add(p, alpha=self.weight_decay)
            if self.momentum:
                new = self.has_buffer.view(shape)
                buf.copy_(torch.where(new, buf * self.momentum + (1 - self.dampening) * grad, grad))
                grad = grad.add(buf, alpha=self.momentum) if self.nesterov else buf
            p.sub_(lrs.to(p.dtype).view(shape) * grad)
        self.has_buffer[:] = True


def stacked_optimizer(probe: torch.optim.Optimizer, params: list[torch.Tensor]):
    """The stacked counterpart of ``probe``'s class, or None (then each client gets its own
    optimizer object)."""
    if StackedAdamW.supports(probe):
        decoupled = isinstance(probe, torch.optim.AdamW) or probe.defaults.get(
            "decoupled_weight_decay", False
        )
        return StackedAdamW(params, probe.defaults, decoupled)
    if StackedSGD.supports(probe):
        return StackedSGD(params, probe.defaults)
    return None


class _Functional:
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
        per_example = task.loss(_Functional(model, tensors), batch, reduction="none")
        return (per_example * w).sum()

    return vmap(client_loss)


def per_example_gradients(model: nn.Module, task: Task) -> Callable:
    """``f(trained, context, batch)``: every example's gradient of its own loss with respect
    to its client's trained tensors, ``{name: (clients, examples, *shape)}``, and the
    examples' losses ``(clients, examples)``: a vmap over examples inside a vmap over
    clients (DP-SGD's per-example clipping; Opacus computes the same per client)."""

    def one(trained: dict, context: dict, example: Batch):
        batch = {k: v.unsqueeze(0) for k, v in example.items()}
        tensors = {**trained, **context}
        loss = task.loss(_Functional(model, tensors), batch, reduction="none")[0]
        return loss, loss.detach()

    return vmap(vmap(grad(one, has_aux=True), in_dims=(None, None, 0)))


def _dp_gradients(
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


def _load_state(arrays: dict | None, n: int) -> dict[int, dict[str, torch.Tensor]]:
    """``fedsim.training.optimizer_state_arrays`` back into torch's per-index state dicts."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in (arrays or {}).items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = torch.as_tensor(value)
    return state if len(state) == n else {}


def train_group(
    model: nn.Module,
    task: Task,
    jobs: Sequence[ClientJob],
    make_optimizer: Callable[..., torch.optim.Optimizer],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    schedule: Schedule,
    total_steps: int,
    device: torch.device | None = None,
    clip_norm: float | None = None,
) -> list[ClientOutcome]:
    """``steps`` local steps of every client in ``jobs``, in lock-step, as one vmapped call
    per step.

    A context tensor that is the same for every client is loaded into ``model`` once and
    shared; one that differs is stacked like the trained parameters. A client whose batch is
    shorter (the end of a pass over its data) is padded with zero-weight examples, so the
    examples of a batch must not interact (no batch normalisation). AdamW, Adam and SGD step
    all clients at once (:class:`StackedAdamW`, :class:`StackedSGD`); any other optimizer runs
    once per client, on that client's slices.

    Jobs with ``dp`` settings train with DP-SGD instead (:func:`_dp_gradients`: Poisson
    batches, per-example clipping to ``clip_norm``, each client's own noise); each client's
    accountant records its steps.
    """
    if not jobs:
        return []
    names = list(jobs[0].params)
    params = dict(model.named_parameters())
    shared, varying = {}, []
    for name, first in jobs[0].context.items():
        if all(torch.equal(job.context[name], first) for job in jobs[1:]):
            shared[name] = first
        else:
            varying.append(name)
    with torch.no_grad():
        for name, value in shared.items():
            params[name].copy_(value)
    context = {n: torch.stack([job.context[n] for job in jobs]).to(device) for n in varying}
    stacked = [
        torch.stack([job.params[n].detach() for job in jobs]).to(device).requires_grad_(True)
        for n in names
    ]
    probe = make_optimizer([nn.Parameter(torch.zeros(1))], lr=lr)
    fast = stacked_optimizer(probe, stacked)
    per_client: list[torch.optim.Optimizer] = []
    if fast is not None:
        for i, job in enumerate(jobs):
            fast.load_client(i, _load_state(job.optimizer_state, len(names)))
    else:  # each client's optimizer steps its own copies; their gradients come from the stack
        mine = [[torch.zeros_like(p[i]) for p in stacked] for i in range(len(jobs))]
        for job, leaves in zip(jobs, mine):
            for leaf in leaves:
                leaf.grad = torch.zeros_like(leaf)
            opt = make_optimizer(leaves, lr=lr)
            if job.optimizer_state is not None:
                load_optimizer_state(opt, job.optimizer_state)
            per_client.append(opt)
    streams = [batches(job.data, batch_size, job.generator) for job in jobs]
    # each client's dropout stream: the global generator the inline engine seeds for it
    on = device if device is not None else torch.device("cpu")
    dropout = [
        torch.Generator(device=on).manual_seed(job.generator.initial_seed() + 1) for job in jobs
    ]

    private = jobs[0].dp is not None
    batched_loss = vmapped_loss(model, task)
    per_example = per_example_gradients(model, task) if private else None
    totals = torch.zeros(len(jobs), dtype=torch.float64)
    counted = torch.zeros(len(jobs), dtype=torch.float64)
    model.train()
    for step in range(steps):
        lrs = torch.tensor(
            [lr * schedule.factor(job.start_step + step, total_steps) for job in jobs],
            dtype=torch.float64,
        )
        for p in stacked:
            p.grad = None
        if private:
            trained = {n: p.detach() for n, p in zip(names, stacked)}
            grads, losses, nonempty = _dp_gradients(
                per_example, task, jobs, trained, context, clip_norm, device, dropout
            )
            for p, g in zip(stacked, grads):
                p.grad = g
            totals += torch.where(nonempty, losses, 0.0)
            counted += nonempty
        else:
            batch, weights, sizes = padded_group([next(s) for s in streams], device)
            batch, lengths = task.group_batch(batch)
            tensors = {n: p for n, p in zip(names, stacked)}
            tensors.update(context)
            with client_streams(dropout, sizes, lengths), quiet_fallbacks():
                losses = batched_loss(tensors, batch, weights)
                losses.sum().backward()
            totals += losses.detach().double().cpu()
            counted += 1
        if fast is not None:
            fast.step(lrs.to(stacked[0].device))
            continue
        with torch.no_grad():
            for i, opt in enumerate(per_client):
                leaves = opt.param_groups[0]["params"]
                for leaf, p in zip(leaves, stacked):
                    leaf.copy_(p[i])
                    if p.grad is None:  # a parameter the loss does not reach
                        leaf.grad.zero_()
                    else:
                        leaf.grad.copy_(p.grad[i])
                for group in opt.param_groups:
                    group["lr"] = float(lrs[i])
                opt.step()
                for leaf, p in zip(leaves, stacked):
                    p[i].copy_(leaf)
    for job in jobs:
        if job.dp is not None:
            job.dp.accountant.step(job.dp.sigma, job.dp.sample_rate, steps)
    outcomes = []
    for i in range(len(jobs)):
        if fast is not None:
            state = fast.client_state(i)
        else:
            state = per_client[i].state_dict()["state"]  # by parameter index
        outcomes.append(
            ClientOutcome(
                result=LocalResult(loss=float(totals[i]) / max(float(counted[i]), 1), steps=steps),
                params={n: p[i].detach().clone() for n, p in zip(names, stacked)},
                optimizer_state=state,
            )
        )
    return outcomes
