"""Injected client faults (config group ``faults``): crashes, stragglers, corrupted updates.

Real federations lose clients mid-round, wait for slow ones and receive garbage. Each sampled
client of a training round draws its faults from its own generator, seeded by
``(sim.seed, round, client)``, so a run's faults are the same on every engine and in a run
resumed from a checkpoint, and changing one probability does not move the others' draws:

* **crash** (``crash_prob``): the client raises before it trains (its state is unchanged); the
  server gets an error reply, as from any client that crashed.
* **straggler** (``straggler_prob``): the client answers after a simulated delay drawn from
  ``delay`` (``constant``: ``delay_scale`` seconds; ``uniform`` on ``[0, 2 delay_scale]``;
  ``exponential`` with mean ``delay_scale``; ``lognormal`` with median ``delay_scale`` and
  ``sigma = delay_shape``). With a ``deadline`` (simulated seconds) the server drops replies
  that come later; the client has trained (its state, step count and privacy spend moved on)
  but its update is not aggregated. Delays are simulated: nobody sleeps.
* **corrupt** (``corrupt_prob``): the client trains, then one of ``corrupt_kinds`` spoils what
  it sends (not for a straggler past the deadline, whose reply the server drops unread):
  ``nan`` or ``inf`` in one value of one floating array, or ``shape`` (one array flattened
  and one value longer). The server's screening rejects such replies before the strategy
  aggregates (``check_reply``, or the decoder of a compressed payload).

A round with fewer than ``sim.min_clients`` good replies keeps the previous global model and
is recorded as skipped; the run goes on.

Byzantine clients (``byzantine_fraction``, ``attack``: ``faults=byzantine``) are a fixed set of
malicious clients whose updates are well-formed: :mod:`fedsim.byzantine`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from fedsim import keys
from fedsim.byzantine import Attack
from fedsim.errors import ConfigError
from fedsim.uplink import Stage
from fedsim.validate import number

DELAYS = ("constant", "uniform", "exponential", "lognormal")
CORRUPTIONS = ("nan", "inf", "shape")
_STREAM = 61  # the faults' generator stream (other streams: sampling, compression, DP noise)


@dataclass(frozen=True)
class FaultDraw:
    """What happens to one client in one training round."""

    crash: bool = False
    delay: float = 0.0  # simulated seconds (0: not a straggler)
    corrupt: str | None = None  # one of CORRUPTIONS, or None

    @property
    def straggler(self) -> bool:
        return self.delay > 0.0


class Faults:
    """Fault injection settings (see the module docstring).

    Parameters
    ----------
    name : str
        The option's name (``conf/faults/<name>.yaml``).
    crash_prob, straggler_prob, corrupt_prob : float
        Per sampled client and round, in ``[0, 1]``.
    delay : str
        Distribution of a straggler's delay: ``constant``, ``uniform``, ``exponential`` or
        ``lognormal``.
    delay_scale : float
        Seconds (> 0): the constant, half the uniform's width, the exponential's mean, the
        lognormal's median.
    delay_shape : float
        The lognormal's ``sigma`` (> 0).
    deadline : float, optional
        Simulated seconds after which a round's replies are dropped as late; ``None``: the
        server waits for every straggler.
    corrupt_kinds : list of str
        The corruptions drawn from (uniformly): any of ``nan``, ``inf``, ``shape``.
    byzantine_fraction : float
        In ``[0, 1)``: ``floor(byzantine_fraction * sim.num_clients)`` malicious clients, a
        fixed seeded set (:mod:`fedsim.byzantine`); 0: none.
    attack : str
        What they do: ``sign_flip``, ``scaled``, ``gaussian``, ``alie`` or ``label_flip``.
    boost : float
        ``scaled``: the factor an update is multiplied by.
    noise_std : float
        ``gaussian``: the standard deviation of the update sent instead (> 0).
    alie_z : float, optional
        ``alie``: the ``z`` of ``mu - z sigma``; None: Baruch et al.'s ``z_max`` each round.
    """

    def __init__(
        self,
        name: str = "custom",
        crash_prob: float = 0.0,
        straggler_prob: float = 0.0,
        delay: str = "lognormal",
        delay_scale: float = 5.0,
        delay_shape: float = 1.0,
        deadline: float | None = None,
        corrupt_prob: float = 0.0,
        corrupt_kinds: Sequence[str | float] = CORRUPTIONS,
        byzantine_fraction: float = 0.0,
        attack: str = "sign_flip",
        boost: float = 10.0,
        noise_std: float = 200.0,
        alie_z: float | None = None,
    ) -> None:
        self.name = str(name)
        self.crash_prob = number("faults.crash_prob", crash_prob, 0, 1)
        self.straggler_prob = number("faults.straggler_prob", straggler_prob, 0, 1)
        self.corrupt_prob = number("faults.corrupt_prob", corrupt_prob, 0, 1)
        if delay not in DELAYS:
            raise ConfigError("faults.delay", delay, f"must be one of {', '.join(DELAYS)}")
        self.delay = delay
        self.delay_scale = number("faults.delay_scale", delay_scale, low=0, low_open=True)
        self.delay_shape = number("faults.delay_shape", delay_shape, low=0, low_open=True)
        self.deadline = (
            None if deadline is None else number("faults.deadline", deadline, low=0, low_open=True)
        )
        kinds = None
        if isinstance(corrupt_kinds, (list, tuple)):  # Hydra's overrides read nan / inf as floats
            kinds = [_kind_name(k) for k in corrupt_kinds]
        if not kinds or any(k not in CORRUPTIONS for k in kinds) or len(set(kinds)) < len(kinds):
            raise ConfigError(
                "faults.corrupt_kinds",
                corrupt_kinds,
                f"must be a non-empty list of distinct kinds from {', '.join(CORRUPTIONS)}",
            )
        self.corrupt_kinds = tuple(kinds)
        #: the Byzantine attack (None: no malicious clients)
        self.byzantine = Attack.from_config(byzantine_fraction, attack, boost, noise_std, alie_z)

    @property
    def active(self) -> bool:
        return bool(self.crash_prob or self.straggler_prob or self.corrupt_prob)

    def draw(self, seed: int, server_round: int, client: int) -> FaultDraw:
        """The faults of ``client`` in ``server_round`` (the same draw on every side)."""
        if not self.active:
            return FaultDraw()
        rng = np.random.default_rng([seed, server_round, client, _STREAM])
        u = rng.random(5)  # always five draws: one setting does not move the others
        if u[0] < self.crash_prob:  # a crashed client neither straggles nor sends
            return FaultDraw(crash=True)
        delay = self._delay(float(u[2])) if u[1] < self.straggler_prob else 0.0
        corrupt = None
        if u[3] < self.corrupt_prob and not self.late(delay):  # a late reply is never read
            kinds = self.corrupt_kinds
            corrupt = kinds[min(int(u[4] * len(kinds)), len(kinds) - 1)]
        return FaultDraw(delay=delay, corrupt=corrupt)

    def _delay(self, z: float) -> float:
        s = self.delay_scale
        if self.delay == "constant":
            return s
        if self.delay == "uniform":
            return 2.0 * s * z
        z = min(max(z, 1e-12), 1.0 - 1e-12)
        if self.delay == "exponential":
            return -s * math.log1p(-z)
        return s * math.exp(self.delay_shape * NormalDist().inv_cdf(z))

    def late(self, delay: float) -> bool:
        """Whether a reply after ``delay`` simulated seconds misses the deadline."""
        return self.deadline is not None and delay > self.deadline


def _kind_name(kind: str | float) -> str | float:
    if isinstance(kind, float) and math.isnan(kind):
        return "nan"
    if isinstance(kind, float) and math.isinf(kind) and kind > 0:
        return "inf"
    return kind


def corrupt_arrays(
    arrays: Mapping[str, np.ndarray], kind: str, seed: int, server_round: int, client: int
) -> dict[str, np.ndarray]:
    """``arrays`` with one corruption of ``kind`` (a copy; the inputs are not changed).

    ``nan`` / ``inf``: one value of one floating array (the array and the position drawn from
    the client's generator); with no floating array, ``shape`` instead. ``shape``: one array
    replaced by its values flattened plus one more; with no array at all, an unexpected one.
    """
    rng = np.random.default_rng([seed, server_round, client, _STREAM, 1])
    out = {k: np.array(v) for k, v in arrays.items()}
    floats = [k for k, v in out.items() if v.dtype.kind == "f" and v.size]
    if kind in ("nan", "inf") and floats:
        name = floats[int(rng.integers(len(floats)))]
        flat = out[name].reshape(-1)
        flat[int(rng.integers(flat.size))] = np.nan if kind == "nan" else np.inf
        return out
    if not out:
        return {"corrupt": np.zeros(1, dtype=np.float32)}
    names = list(out)
    name = names[int(rng.integers(len(names)))]
    flat = out[name].reshape(-1)
    out[name] = np.concatenate([flat, flat[:1] if flat.size else np.zeros(1, flat.dtype)])
    return out


class InjectedCrash(RuntimeError):
    """A client crash injected by ``faults.crash_prob`` (the reply is an error, as a crash's)."""


class FaultInjection(Stage):
    """Injected faults as the last stage of the uplink chain (see the module docstring).

    Client half: a crashing client raises before anything is loaded (its state stays as it
    was); a corrupted one spoils what it sends; a straggler reports its simulated delay.
    Server half: replies later than ``faults.deadline`` are dropped unread.
    """

    name = "faults"

    def __init__(self, faults: Faults, seed: int) -> None:
        self.faults, self.seed = faults, seed

    def draw(self, server_round: int, client: int) -> FaultDraw:
        return self.faults.draw(self.seed, server_round, client)

    # ------------------------------------------------------------------ client half
    def receive(self, call, arrays):
        if self.draw(call.server_round, call.client).crash:  # before anything is loaded
            raise InjectedCrash(
                f"injected crash (faults.crash_prob={self.faults.crash_prob:g}) of client "
                f"{call.client} in round {call.server_round}"
            )
        return arrays

    def send(self, sending, out) -> None:
        call = sending.call
        fault = self.draw(call.server_round, call.client)
        if fault.corrupt is not None:  # what travels is spoiled; the client's state is not
            out.arrays = corrupt_arrays(
                out.numpy(), fault.corrupt, self.seed, call.server_round, call.client
            )
        if fault.straggler:
            out.metrics[keys.DELAY] = fault.delay

    # ------------------------------------------------------------------ server half
    def arrival(self, info, client, reply):
        """Why a straggler's reply is dropped: its simulated delay is past the deadline."""
        faults = self.faults
        if faults.deadline is None or keys.METRICS not in reply.content.metric_records:
            return None
        delay = reply.content[keys.METRICS].get(keys.DELAY)
        if delay is None or not faults.late(float(delay)):
            return None
        return "late", (
            f"late: simulated delay {float(delay):.2f} s > faults.deadline={faults.deadline:g} s"
        )

    def report(self, server_round: int, clients: list[int]) -> dict:
        """How many of the round's clients were crashed, slowed and corrupted (their own
        draws, recomputed)."""
        draws = [self.draw(server_round, c) for c in clients]
        return {
            "faults_injected": {
                "crash": sum(d.crash for d in draws),
                "straggler": sum(d.straggler for d in draws),
                "late": sum(self.faults.late(d.delay) for d in draws),
                "corrupt": sum(d.corrupt is not None for d in draws),
            }
        }
