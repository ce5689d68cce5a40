"""Client-side DP-SGD (``privacy=dpsgd``) and the privacy config group's base classes."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from fedsim import meter
from fedsim.errors import ConfigError
from fedsim.privacy.accountant import ACCOUNTANTS, Accountant, AccountingError
from fedsim.tasks.base import Batch, Task
from fedsim.training import LocalResult, LocalTerms, Schedule, to_device
from fedsim.validate import number

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew")


class Privacy:
    """Base class of privacy mechanisms (built from ``conf/privacy/*.yaml``)."""

    name = "privacy"
    #: trains clients with DP-SGD
    client_dp = False
    #: user-level DP on the server (DP-FedAvg)
    central = False

    @property
    def active(self) -> bool:
        return False


class NoPrivacy(Privacy):
    """``privacy=none``."""

    name = "none"


class DPSGD(Privacy):
    """Client-side DP-SGD (see the module docstring).

    Parameters
    ----------
    clip_norm : float
        Per-example gradient norm bound ``C`` (> 0).
    noise_multiplier : float, optional
        ``sigma``; the noise has standard deviation ``sigma * C``. Give this or
        ``target_epsilon``.
    target_epsilon : float, optional
        Epsilon no client may exceed; ``sigma`` is computed per client for the worst case.
    delta : float, optional
        Target delta; default ``1 / (10 n)`` per client (``n``: its training examples).
    grad_sample_mode : str
        Opacus' per-sample gradient engine: ``hooks``, ``functorch`` or ``ew``.
    accountant : str
        ``rdp`` or ``prv`` (:mod:`fedsim.privacy.accountant`): what epsilon is computed with,
        and what the noise for ``target_epsilon`` is searched with.
    """

    name = "dpsgd"
    client_dp = True

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float | None = None,
        grad_sample_mode: str = "hooks",
        accountant: str = "rdp",
    ) -> None:
        self.clip_norm = number("privacy.clip_norm", clip_norm, low=0, low_open=True)
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ConfigError(
                "privacy.noise_multiplier",
                noise_multiplier,
                "give exactly one of privacy.noise_multiplier and privacy.target_epsilon "
                "(set the other to null)",
            )
        self.noise_multiplier = (
            None
            if noise_multiplier is None
            else number("privacy.noise_multiplier", noise_multiplier, low=0)
        )
        self.target_epsilon = (
            None
            if target_epsilon is None
            else number("privacy.target_epsilon", target_epsilon, low=0, low_open=True)
        )
        self.delta = (
            None
            if delta is None
            else number("privacy.delta", delta, 0, 1, low_open=True, high_open=True)
        )
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError(
                "privacy.grad_sample_mode", grad_sample_mode, "must be hooks, functorch or ew"
            )
        self.grad_sample_mode = grad_sample_mode
        self.accountant = accountant_kind(accountant)
        self._sigmas: dict[tuple[int, int, int], float] = {}

    @property
    def active(self) -> bool:
        return True

    def _sigma_with_init(self, n: int, batch_size: int, total_steps: int, init_steps: int):
        key = (n, batch_size, total_steps, init_steps)
        if key not in self._sigmas:
            q, delta = self.sample_rate(n, batch_size), self.delta_for(n)

            def epsilon_of(sigma: float) -> float:
                history = [(sigma, 1.0, init_steps), (sigma, q, total_steps)]
                return Accountant(history, self.accountant).epsilon(delta)

            self._sigmas[key] = _search_sigma(epsilon_of, self.target_epsilon)
        return self._sigmas[key]

    def delta_for(self, num_records: int) -> float:
        return self.delta if self.delta is not None else 1.0 / (10 * num_records)

    def sample_rate(self, num_records: int, batch_size: int) -> float:
        return min(1.0, batch_size / num_records)

    def sigma_for(
        self, num_records: int, batch_size: int, total_steps: int, init_steps: int = 0
    ) -> float:
        """The noise multiplier of a client with ``num_records`` examples; ``init_steps``
        full-batch steps (LoRA-SB's set-up round) come on top of the training steps."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        if init_steps:
            return self._sigma_with_init(num_records, batch_size, total_steps, init_steps)
        key = (num_records, batch_size, total_steps)
        if key not in self._sigmas:  # a search over sigma: once per client size
            self._sigmas[key] = noise_for(
                self.target_epsilon,
                self.delta_for(num_records),
                self.sample_rate(num_records, batch_size),
                total_steps,
                self.accountant,
            )
        return self._sigmas[key]


def accountant_kind(value) -> str:
    """``privacy.accountant``, checked."""
    if value not in ACCOUNTANTS:
        raise ConfigError("privacy.accountant", value, "must be rdp or prv")
    return value


@lru_cache(maxsize=1024)
def noise_for(target: float, delta: float, q: float, steps: int, kind: str) -> float:
    """Opacus' search for the noise multiplier that gives epsilon ``target`` (to 0.01) at
    ``delta`` after ``steps`` steps at rate ``q``, by accountant ``kind``."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(
                get_noise_multiplier(
                    target_epsilon=target,
                    target_delta=delta,
                    sample_rate=q,
                    steps=steps,
                    accountant=kind,
                )
            )
    except AccountingError:
        raise
    except (ValueError, OverflowError, MemoryError, RuntimeError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        remedy = "; use privacy.accountant=rdp or a larger privacy.delta" if kind == "prv" else ""
        raise AccountingError(
            f"no noise multiplier found for epsilon {target:g} at delta={delta:g} over "
            f"{steps} steps at rate {q:g} with the {kind} accountant ({reason}){remedy}"
        ) from None


def _search_sigma(epsilon_of, target: float) -> float:
    """The smallest sigma (to 0.1%) whose ``epsilon_of(sigma)`` stays below ``target``."""
    low, high = 0.0, 1.0
    while epsilon_of(high) > target:
        low, high = high, 2 * high
        if high > 1e4:
            raise ConfigError("privacy.target_epsilon", target, "is out of reach")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if epsilon_of(mid) > target else (low, mid)
    return high


@dataclass
class ClientDP:
    """One client's DP-SGD settings for a round (:meth:`ClientRuntime.dp_start`)."""

    accountant: Accountant
    sigma: float  # noise multiplier
    sample_rate: float  # Poisson rate q of its batches
    expected_batch: int  # round(q n): what the clipped sum is divided by
    noise: torch.Generator  # its noise draws
    num_examples: int


def poisson_indices(n: int, q: float, generator: torch.Generator) -> torch.Tensor:
    """Each of ``n`` examples independently with probability ``q``."""
    return torch.nonzero(torch.rand(n, generator=generator) < q).flatten()


def train_local_dp(
    model: nn.Module,
    gsm: nn.Module,
    task: Task,
    data: Batch,
    optimizer: torch.optim.Optimizer,
    privacy: DPSGD,
    accountant: Accountant,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    sigma: float,
    schedule: Schedule,
    start_step: int,
    total_steps: int,
    generator: torch.Generator,
    noise_generator: torch.Generator,
    device: torch.device | None = None,
    terms: LocalTerms | None = None,
) -> LocalResult:
    """``steps`` DP-SGD steps on Poisson batches; the accountant records each one. ``terms``
    (FedProx, SCAFFOLD; :class:`~fedsim.training.LocalTerms`) act on the privatised gradient
    and step: the proximal gradient is added after the clipping and the noise (it does not
    depend on the data), the correction after the optimizer's step."""
    from opacus.optimizers import DPOptimizer

    n = len(data[task.label_key])
    q = privacy.sample_rate(n, batch_size)
    expected = max(1, int(round(q * n)))
    dp = DPOptimizer(
        optimizer,
        noise_multiplier=sigma,
        max_grad_norm=privacy.clip_norm,
        expected_batch_size=expected,
        loss_reduction="mean",
        generator=noise_generator,
    )
    gsm.train()
    total, counted = 0.0, 0
    for i in range(steps):
        factor = schedule.factor(start_step + i, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        dp.zero_grad(set_to_none=True)
        idx = poisson_indices(n, q, generator)
        if len(idx) == 0:  # an empty Poisson batch: the step is noise only
            _noise_only_step(dp, terms, lr * factor)
        else:
            batch = to_device({k: v[idx] for k, v in data.items()}, device)
            total += _private_step(dp, gsm, task, batch, terms, lr * factor)
            counted += 1
        accountant.step(sigma, q)
        meter.steps()
    dp.zero_grad(set_to_none=True)
    return LocalResult(loss=total / max(counted, 1), steps=steps)


def _noise_only_step(dp, terms: LocalTerms | None = None, lr: float = 0.0) -> None:
    """Opacus' step on an empty Poisson batch: a zero sum plus noise, divided by the expected
    batch size (its ``scale_grad`` reads per-example gradients, which an empty batch lacks)."""
    for p in dp.params:
        p.summed_grad = torch.zeros_like(p)
    dp.add_noise()
    for p in dp.params:
        p.grad /= dp.expected_batch_size
    _original_step(dp, terms, lr)
    for p in dp.params:
        p.summed_grad = None


def _original_step(dp, terms: LocalTerms | None, lr: float) -> None:
    """The wrapped optimizer's step on the privatised gradient, with ``terms`` around it."""
    if terms is None:
        dp.original_optimizer.step()
        return
    # every parameter of the optimizer, in the order of the terms (dp.params leaves out those
    # that take no gradient this round: a factor RoLoRA freezes)
    params = [p for group in dp.original_optimizer.param_groups for p in group["params"]]
    terms.add_prox(params)
    dp.original_optimizer.step()
    terms.correct(params, lr)


def _private_step(
    dp, gsm: nn.Module, task: Task, batch: Batch, terms: LocalTerms | None = None, lr: float = 0.0
) -> float:
    """One DP-SGD step on a batch; returns its loss. A mean loss: the GradSampleModule
    (``loss_reduction="mean"``) recovers per-example gradients; DPOptimizer clips them, sums,
    adds noise, divides by the expected size."""
    loss = task.loss(gsm, batch)
    with warnings.catch_warnings():  # inputs need no gradient: the hook's note is moot
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()
    if terms is None:
        dp.step()
    elif dp.pre_step():  # clipped, summed, noised, scaled; then the terms and the step
        _original_step(dp, terms, lr)
    return float(loss.detach())


def wrap(model: nn.Module, privacy: DPSGD) -> nn.Module:
    """The model wrapped for per-example gradients (once per process: the hooks stay)."""
    from opacus.grad_sample.utils import prepare_module

    return prepare_module(model, privacy.grad_sample_mode, batch_first=True, loss_reduction="mean")
