"""User-level DP on the server (``privacy=central``): DP-FedAvg, and its stage of the uplink."""

from __future__ import annotations

import numpy as np

from fedsim.compression import clip_joint
from fedsim.privacy.accountant import Accountant
from fedsim.privacy.dpsgd import DPSGD, Privacy
from fedsim.uplink import Stage


class CentralDP(Privacy):
    """User-level DP on the server: DP-FedAvg (McMahan et al., 2018).

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


class CentralNoise(Stage):
    """Central DP as a stage of the uplink chain.

    Client half: the update ``x_i - x`` is clipped to ``clip_norm`` (unless compression comes
    first in the chain: it then clips what it compresses). Server half: Poisson sampling of each
    round's clients, and the Gaussian mechanism on the sum of the clipped contributions of the
    aggregation it wraps (its :class:`~fedsim.uplink.Linear` form), divided by ``q N``.
    """

    name = "central_dp"
    needs_reference = True
    releases_every_round = True

    def __init__(
        self,
        dp: CentralDP,
        num_clients: int,
        clients_per_round: int,
        seed: int,
        clip_on_client: bool = True,
        diagnose: bool = False,
    ) -> None:
        self.dp, self.seed = dp, seed
        self.num_clients, self.clients_per_round = num_clients, clients_per_round
        self.clip_on_client, self.diagnose = clip_on_client, diagnose

    # ------------------------------------------------------------------ client half
    def send(self, sending, out) -> None:
        if not self.clip_on_client:
            return
        trained = out.numpy()
        out.arrays = clip_update(sending.reference, trained, self.dp.clip_norm)
        if self.diagnose:  # measurement only, not traffic
            out.diagnostic = trained

    # ------------------------------------------------------------------ server half
    def select(self, server_round: int) -> list[int]:
        q = self.clients_per_round / self.num_clients
        return self.dp.sample(self.num_clients, q, self.seed, server_round)

    def wrap(self, inner):
        return _Noised(self, inner)

    def server_step(self) -> str:
        return "central DP's noised mean (privacy=central)"

    def step_accountant(self) -> float:
        """One release of the mechanism at rate ``q`` (every round counts, whoever replied);
        returns the run's epsilon so far."""
        self.dp.accountant.step(self.dp.sigma_value, self.dp.q)
        return self.epsilon()

    def epsilon(self) -> float:
        return self.dp.accountant.epsilon(self.dp.delta_for(self.num_clients))

    def state_dict(self):
        return list(self.dp.accountant.history)

    def load_state_dict(self, state) -> None:
        self.dp.accountant = Accountant([tuple(h) for h in state])


class _Noised:
    """``apply(noised sum of the inner aggregation's contributions, q N)``."""

    def __init__(self, stage: CentralNoise, inner) -> None:
        self.stage, self.inner = stage, inner

    def aggregate(self, info, updates):
        linear = self.inner.linear(info, updates)
        shapes = {k: np.shape(v) for k, v in info.current.items()}
        noisy = self.stage.dp.noised_sum(
            linear.contributions, shapes, info.seed, info.server_round, unit=linear.unit
        )
        return linear.apply(noisy, info.expected)  # q N, fixed

    def linear(self, info, updates):
        raise TypeError("nothing can wrap the central noise: it is the last step")
