"""The stacked optimizers: one optimizer step for every client of a group at once."""

from __future__ import annotations

import torch


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


def state_from_arrays(arrays: dict | None, n: int) -> dict[int, dict[str, torch.Tensor]]:
    """``fedsim.training.optimizer_state_arrays`` back into torch's per-index state dicts."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in (arrays or {}).items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = torch.as_tensor(value)
    return state if len(state) == n else {}
