"""Differential privacy (REFERENCE section 5): sample-level DP-SGD on clients, through Opacus.

``privacy=dpsgd``: every local step draws a Poisson batch (each of the client's ``n`` examples
with probability ``q = min(1, batch_size / n)``), clips each example's gradient to
``clip_norm`` and adds Gaussian noise of standard deviation ``noise_multiplier * clip_norm``
(Opacus' ``GradSampleModule`` and ``DPOptimizer``). Each client's RDP accountant history
(``(sigma, q, steps)`` entries) lives in its ``Context.state``, so epsilon adds up over all the
rounds it took part in; a new accountant every round would under-report it.

``target_epsilon`` instead of ``noise_multiplier``: the noise is computed for the worst case, a
client sampled in every round and taking all its local steps (``sim.rounds * sim.local_steps``
steps at its own ``q``), so no client can exceed the target. ``delta`` defaults to
``1 / (10 n)`` for a client with ``n`` training examples (well below ``1/n``, as Opacus' FAQ
asks). Opacus' ``secure_mode`` needs torchcsprng, which does not work with torch 2.x: noise
comes from a seeded generator (reproducible, not cryptographically secure).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from fedsim.compression import clip_joint
from fedsim.dropout import without_dropout
from fedsim.errors import ConfigError
from fedsim.tasks.base import Batch, Task
from fedsim.training import LocalResult, Schedule, to_device
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
                return Accountant(history).epsilon(delta)

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
            from opacus.accountants.utils import get_noise_multiplier

            self._sigmas[key] = float(
                get_noise_multiplier(
                    target_epsilon=self.target_epsilon,
                    target_delta=self.delta_for(num_records),
                    sample_rate=self.sample_rate(num_records, batch_size),
                    steps=total_steps,
                    accountant="rdp",
                )
            )
        return self._sigmas[key]


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
class Accountant:
    """A client's RDP accountant, as a history that fits in its ``Context.state``."""

    history: list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps)

    @classmethod
    def from_array(cls, array: np.ndarray | None) -> Accountant:
        if array is None:
            return cls([])
        return cls([(float(s), float(q), int(n)) for s, q, n in np.asarray(array).reshape(-1, 3)])

    def to_array(self) -> np.ndarray:
        return np.array(self.history, dtype=np.float64).reshape(-1, 3)

    def step(self, sigma: float, q: float, steps: int = 1) -> None:
        if self.history and self.history[-1][:2] == (sigma, q):
            s, r, n = self.history[-1]
            self.history[-1] = (s, r, n + steps)
        else:
            self.history.append((sigma, q, steps))

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` over the whole history: Opacus' RDP accountant's computation
        (its default orders), with each ``(sigma, q)``'s RDP curve computed once per process."""
        if not self.history:
            return 0.0
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum(steps * _rdp_curve(sigma, q) for sigma, q, steps in self.history)
        eps, _ = get_privacy_spent(orders=list(_orders()), rdp=rdp, delta=delta)
        return float(eps)


@lru_cache(maxsize=1)
def _orders() -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant

    return tuple(RDPAccountant.DEFAULT_ALPHAS)


@lru_cache(maxsize=4096)
def _rdp_curve(sigma: float, q: float) -> np.ndarray:
    """RDP of one subsampled Gaussian step at every order (the costly part: cached)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(_orders())))


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
) -> LocalResult:
    """``steps`` DP-SGD steps on Poisson batches; the accountant records each one."""
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
            for p in dp.params:
                p.summed_grad = torch.zeros_like(p)
            dp.add_noise()
            for p in dp.params:  # scale_grad() reads grad_sample, which an empty batch lacks
                p.grad /= dp.expected_batch_size
            dp.original_optimizer.step()
            for p in dp.params:
                p.summed_grad = None
        else:
            batch = to_device({k: v[idx] for k, v in data.items()}, device)
            # a mean loss: the GradSampleModule (loss_reduction="mean") recovers per-example
            # gradients; DPOptimizer clips them, sums, adds noise, divides by the expected size
            loss = task.loss(gsm, batch)
            with warnings.catch_warnings():  # inputs need no gradient: the hook's note is moot
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            dp.step()
            total += float(loss.detach())
            counted += 1
        accountant.step(sigma, q)
    dp.zero_grad(set_to_none=True)
    return LocalResult(loss=total / max(counted, 1), steps=steps)


def wrap(model: nn.Module, privacy: DPSGD) -> nn.Module:
    """The model wrapped for per-example gradients (once per process: the hooks stay)."""
    from opacus.grad_sample.utils import prepare_module

    return prepare_module(model, privacy.grad_sample_mode, batch_first=True, loss_reduction="mean")


class CentralDP(Privacy):
    """User-level DP on the server: DP-FedAvg (McMahan et al., 2018), REFERENCE section 5.

    Each round every client is sampled independently with probability
    ``q = sim.clients_per_round / sim.num_clients`` (Poisson); a sampled client clips its update
    ``x_i - x`` (all the arrays it sends, one L2 norm) to ``clip_norm`` and sends it; the server
    clips again (a no-op for honest clients), sums, adds ``N(0, (sigma * clip_norm)^2)`` to every
    coordinate and divides by the fixed expected count ``q N``: ``x <- x + (sum + noise) / (q N)``,
    unweighted. One RDP accountant at rate ``q``, one step per round (every round counts, even
    one with no client sampled). ``delta`` defaults to ``1 / (10 N)``.

    Parameters
    ----------
    clip_norm : float
        Bound ``C`` on each client's update norm.
    noise_multiplier, target_epsilon : float
        ``sigma``, or the epsilon after ``sim.rounds`` rounds from which it is computed.
    delta : float, optional
    """

    name = "central"
    central = True

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float | None = None,
    ) -> None:
        self._dpsgd = DPSGD(clip_norm, noise_multiplier, target_epsilon, delta)
        self.clip_norm = self._dpsgd.clip_norm
        self.noise_multiplier = self._dpsgd.noise_multiplier
        self.target_epsilon = self._dpsgd.target_epsilon
        self.delta = self._dpsgd.delta
        self.accountant = Accountant([])
        self.sigma_value = 0.0  # set by :meth:`start`
        self.q = 0.0

    def start(
        self, num_clients: int, clients_per_round: int, rounds: int, init_steps: int = 0
    ) -> None:
        """Fix ``sigma`` and ``q`` for the run (the server calls this once); ``init_steps``
        set-up rounds (LoRA-SB's initialisation from clients) are mechanisms at the same rate."""
        self.q = clients_per_round / num_clients
        self.sigma_value = self.sigma(num_clients, clients_per_round, rounds + init_steps)
        self.accountant = Accountant([])

    @property
    def active(self) -> bool:
        return True

    def delta_for(self, num_clients: int) -> float:
        return self.delta if self.delta is not None else 1.0 / (10 * num_clients)

    def sigma(self, num_clients: int, clients_per_round: int, rounds: int) -> float:
        q = clients_per_round / num_clients
        return self._dpsgd.sigma_for(num_clients, clients_per_round, rounds) if q else 0.0

    def sample(self, num_clients: int, q: float, seed: int, server_round: int) -> list[int]:
        rng = np.random.default_rng([seed, server_round, 53])
        return [int(c) for c in np.nonzero(rng.random(num_clients) < q)[0]]

    def noised_sum(
        self,
        contributions: list[dict[str, np.ndarray]],
        shapes: dict[str, tuple[int, ...]],
        seed: int,
        server_round: int,
        unit: float = 1.0,
    ) -> dict[str, np.ndarray]:
        """The Gaussian mechanism of one round: each contribution clipped to
        ``unit * clip_norm`` (one norm over all its arrays; a no-op for honest clients, who
        clipped already), summed, plus ``N(0, (sigma * clip_norm * unit)^2)`` on every
        coordinate, in float64. ``unit`` rescales the bound for contributions in other units
        (``1 / lr`` for compressed pseudo-gradients)."""
        bound = self.clip_norm * unit
        total = {k: np.zeros(shape) for k, shape in shapes.items()}
        for contribution in contributions:
            for k, v in clip_joint(contribution, bound).items():
                total[k] += v
        rng = np.random.default_rng([seed, server_round, 59])
        std = self.sigma_value * bound
        return {k: total[k] + rng.normal(0.0, std, size=total[k].shape) for k in sorted(total)}


def clip_update(
    reference: dict[str, np.ndarray], trained: dict[str, np.ndarray], clip_norm: float
) -> dict[str, np.ndarray]:
    """``reference + (trained - reference) * min(1, C / ||trained - reference||)``, one norm
    over all arrays, in the arrays' dtype."""
    change = {
        k: np.asarray(trained[k], np.float64) - np.asarray(reference[k], np.float64)
        for k in trained
    }
    delta = clip_joint(change, clip_norm)
    return {
        k: (np.asarray(reference[k], np.float64) + d).astype(np.asarray(trained[k]).dtype)
        for k, d in delta.items()
    }


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
    One Gaussian mechanism over the examples used (sample rate 1). ``model`` is a throwaway copy;
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
    out = {}
    for m, t in total.items():
        noise = torch.normal(0.0, sigma * clip_norm, size=t.shape, generator=generator)
        out[m] = (t.cpu() + noise.double()).numpy()
    return out
