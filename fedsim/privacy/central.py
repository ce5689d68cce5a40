"""User-level DP on the server (``privacy=central``): DP-FedAvg, and its stage of the uplink."""

from __future__ import annotations

import math

import numpy as np

from fedsim.compression import clip_joint
from fedsim.errors import ConfigError
from fedsim.messages import merge_records, split_prefix, with_prefix
from fedsim.privacy.accountant import Accountant
from fedsim.privacy.adaptive import AdaptiveClip, count_stddev_for, update_multiplier
from fedsim.privacy.dpsgd import DPSGD, Privacy
from fedsim.records import array_record
from fedsim.uplink import Stage

#: the training message's array carrying the round's clip norm (adaptive clipping), and the
#: reply's record carrying the client's bit; both travel and are counted
CLIP = "central_dp/"
BIT_RECORD = "central_dp"


class CentralDP(Privacy):
    """User-level DP on the server: DP-FedAvg (McMahan et al., 2018).

    Each round every client is sampled independently with probability
    ``q = sim.clients_per_round / sim.num_clients`` (Poisson); a sampled client clips its update
    ``x_i - x`` (all the arrays it sends, one L2 norm) to ``clip_norm`` and sends it; the server
    clips again (a no-op for honest clients), sums, adds ``N(0, (sigma * clip_norm)^2)`` to every
    coordinate and divides by the fixed expected count ``q N``: ``x <- x + (sum + noise) / (q N)``,
    unweighted. One accountant at rate ``q``, one step per round (every round counts, even
    one with no client sampled). ``delta`` defaults to ``1 / (10 N)``.

    With ``adaptive_clip`` the clip norm follows a quantile of the update norms
    (:mod:`fedsim.privacy.adaptive`): ``clip_norm`` is its initial value, the update's noise
    multiplier is raised to ``z_Delta`` so that the update and the noised count of unclipped
    clients together spend what ``sigma`` spends, and the accountant records ``sigma``.

    Parameters
    ----------
    clip_norm : float
        Bound ``C`` on each client's update norm (the initial bound with ``adaptive_clip``).
    noise_multiplier, target_epsilon : float
        ``sigma``, or the epsilon after ``sim.rounds`` rounds from which it is computed.
    delta : float, optional
    accountant : str
        ``rdp`` or ``prv`` (:mod:`fedsim.privacy.accountant`).
    adaptive_clip : bool
        Adaptive clipping (Andrew et al., 2021).
    target_quantile, clip_lr, count_stddev : float
        Its ``gamma``, ``eta_C`` and ``sigma_b`` (None: the expected clients per round / 20).
    """

    name = "central"
    central = True

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float | None = None,
        accountant: str = "rdp",
        adaptive_clip: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        count_stddev: float | None = None,
    ) -> None:
        self._dpsgd = DPSGD(clip_norm, noise_multiplier, target_epsilon, delta, "hooks", accountant)
        self.clip_norm = self._dpsgd.clip_norm
        self.noise_multiplier = self._dpsgd.noise_multiplier
        self.target_epsilon = self._dpsgd.target_epsilon
        self.delta = self._dpsgd.delta
        self.kind = self._dpsgd.accountant
        if not isinstance(adaptive_clip, bool):
            raise ConfigError("privacy.adaptive_clip", adaptive_clip, "must be true or false")
        self.adaptive = (
            AdaptiveClip(target_quantile, clip_lr, count_stddev) if adaptive_clip else None
        )
        self.accountant = Accountant([], self.kind)
        self.sigma_value = 0.0  # set by :meth:`start`: what the accountant records
        self.update_sigma = 0.0  # the update's noise multiplier (z_Delta when adaptive)
        self.count_stddev = 0.0  # sigma_b (adaptive)
        self.q = 0.0

    def start(
        self, num_clients: int, clients_per_round: int, rounds: int, init_steps: int = 0
    ) -> None:
        """Fix ``sigma`` and ``q`` for the run (the server calls this once); ``init_steps``
        set-up rounds (LoRA-SB's initialisation from clients) are mechanisms at the same rate."""
        self.q = clients_per_round / num_clients
        self.sigma_value = self.sigma(num_clients, clients_per_round, rounds + init_steps)
        self.update_sigma = self.sigma_value
        if self.adaptive is not None:
            self.count_stddev = count_stddev_for(
                self.sigma_value, self.q * num_clients, self.adaptive.count_stddev
            )
            self.update_sigma = update_multiplier(self.sigma_value, self.count_stddev)
        self.accountant = Accountant([], self.kind)

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
        clip: float | None = None,
        sigma: float | None = None,
    ) -> dict[str, np.ndarray]:
        """The Gaussian mechanism of one round: each contribution clipped to
        ``unit * clip`` (one norm over all its arrays; a no-op for honest clients, who
        clipped already), summed, plus ``N(0, (sigma * clip * unit)^2)`` on every
        coordinate, in float64. ``unit`` rescales the bound for contributions in other units
        (``1 / lr`` for compressed pseudo-gradients); ``clip`` and ``sigma`` default to
        ``clip_norm`` and the run's noise multiplier (adaptive clipping passes the round's)."""
        bound = (self.clip_norm if clip is None else clip) * unit
        total = {k: np.zeros(shape) for k, shape in shapes.items()}
        for contribution in contributions:
            for k, v in clip_joint(contribution, bound).items():
                total[k] += v
        rng = np.random.default_rng([seed, server_round, 59])
        std = (self.sigma_value if sigma is None else sigma) * bound
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

    With adaptive clipping (:mod:`fedsim.privacy.adaptive`) each training message carries the
    round's clip norm ``C`` (8 bytes), each reply the client's bit ``1[||x_i - x|| <= C]``
    (1 byte); the server noises the update with ``z_Delta C``, then the count, and moves ``C``.
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
        self.clip = dp.clip_norm  # adaptive: the clip norm of the next round
        self.bits: dict[int, int] = {}  # adaptive: this round's bits, by client
        self.last: dict[str, float] = {}  # adaptive: the round's clip norm and noised fraction
        self._received: dict[int, float] = {}  # client half: the clip each client was sent

    @property
    def adaptive(self) -> AdaptiveClip | None:
        return self.dp.adaptive

    # ------------------------------------------------------------------ client half
    def receive(self, call, arrays):
        if self.adaptive is None:
            return arrays
        plain, sent = split_prefix(CLIP, arrays)
        if "clip" not in sent:
            raise RuntimeError("the server sent no clip norm (privacy.adaptive_clip)")
        self._received[call.client] = float(np.asarray(sent["clip"]).reshape(-1)[0])
        return plain

    def send(self, sending, out) -> None:
        if not self.clip_on_client:
            return
        trained = out.numpy()
        clip = self.dp.clip_norm
        if self.adaptive is not None:
            clip = self._received.pop(sending.call.client)
            norm = update_norm(sending.reference, trained)
            out.records[BIT_RECORD] = {"bit": np.array([norm <= clip], np.uint8)}
        out.arrays = clip_update(sending.reference, trained, clip)
        if self.diagnose:  # measurement only, not traffic
            out.diagnostic = trained

    # ------------------------------------------------------------------ server half
    def select(self, server_round: int) -> list[int]:
        q = self.clients_per_round / self.num_clients
        return self.dp.sample(self.num_clients, q, self.seed, server_round)

    def begin_round(self, info):
        self.bits = {}
        return None

    def outgoing(self, info, client, arrays, config):
        if self.adaptive is None:
            return arrays, config
        clip = array_record(with_prefix(CLIP, {"clip": np.array([self.clip], np.float64)}))
        return merge_records(arrays, clip), config

    def screen(self, info, client, reply):
        if self.adaptive is None:
            return None
        record = reply.content.array_records.get(BIT_RECORD)
        bit = None if record is None or "bit" not in record else record["bit"].numpy()
        if bit is None or bit.size != 1 or int(bit.reshape(-1)[0]) not in (0, 1):
            return "rejected", "malformed reply: no clipping bit (privacy.adaptive_clip)"
        self.bits[client] = int(bit.reshape(-1)[0])
        return None

    def wrap(self, inner):
        return _Noised(self, inner)

    def server_step(self) -> str:
        return "central DP's noised mean (privacy=central)"

    def count_noise(self, server_round: int) -> float:
        """The noise on the round's count of unclipped clients, ``N(0, sigma_b^2)``."""
        rng = np.random.default_rng([self.seed, server_round, 61])
        return float(rng.normal(0.0, self.dp.count_stddev))

    def adapt(self, server_round: int, clients: list[int], expected: float) -> None:
        """The noised fraction of the round's aggregated clients left unclipped, and the
        clip norm's geometric step (the noise on the update used the old one)."""
        bits = [self.bits[c] for c in clients]
        fraction = self.adaptive.fraction(bits, expected, self.count_noise(server_round))
        self.last = {"clip_norm": self.clip, "unclipped_fraction": fraction}
        self.clip = self.adaptive.next_clip(self.clip, fraction)

    def report(self, server_round: int, clients: list[int]) -> dict:
        return dict(self.last) if self.adaptive is not None else {}

    def step_accountant(self) -> float:
        """One release of the mechanism at rate ``q`` (every round counts, whoever replied);
        returns the run's epsilon so far. With adaptive clipping the update and the count
        together are one Gaussian mechanism of multiplier ``sigma`` (Andrew et al.)."""
        self.dp.accountant.step(self.dp.sigma_value, self.dp.q)
        return self.epsilon()

    def epsilon(self) -> float:
        return self.dp.accountant.epsilon(self.dp.delta_for(self.num_clients))

    def state_dict(self):
        history = list(self.dp.accountant.history)
        if self.adaptive is None:
            return history
        return {"history": history, "clip": float(self.clip)}

    def load_state_dict(self, state) -> None:
        if isinstance(state, dict):
            self.clip = float(state["clip"])
            state = state["history"]
        self.dp.accountant = Accountant([tuple(h) for h in state], self.dp.kind)


def update_norm(reference: dict[str, np.ndarray], trained: dict[str, np.ndarray]) -> float:
    """``||trained - reference||``, one L2 norm over all arrays, in float64."""
    return math.sqrt(
        math.fsum(
            float(np.sum((np.asarray(trained[k], np.float64) - reference[k]) ** 2)) for k in trained
        )
    )


class _Noised:
    """``apply(noised sum of the inner aggregation's contributions, q N)``."""

    def __init__(self, stage: CentralNoise, inner) -> None:
        self.stage, self.inner = stage, inner

    def aggregate(self, info, updates):
        stage, dp = self.stage, self.stage.dp
        linear = self.inner.linear(info, updates)
        shapes = {k: np.shape(v) for k, v in info.current.items()}
        clip = stage.clip if stage.adaptive is not None else None
        noisy = dp.noised_sum(
            linear.contributions,
            shapes,
            info.seed,
            info.server_round,
            unit=linear.unit,
            clip=clip,
            sigma=dp.update_sigma,
        )
        if stage.adaptive is not None:
            stage.adapt(info.server_round, [u.client for u in updates], info.expected)
        return linear.apply(noisy, info.expected)  # q N, fixed

    def linear(self, info, updates):
        raise TypeError("nothing can wrap the central noise: it is the last step")
