"""Client system profiles (config group ``system``): what each simulated device can do.

A :class:`Profile` is one client's compute speed, uplink and downlink bandwidth, latency and
availability. A :class:`System` gives the profile of every client of a run, drawn from the
run's seed (client ``c``'s draws come from its own generator, seeded ``(sim.seed, 71, c)``, so
a larger federation keeps the smaller one's devices) or read from a trace file
(:mod:`fedsim.system.trace`). :mod:`fedsim.system.clock` turns profiles and the exact bytes and
local work of every message into simulated seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsim.errors import ConfigError
from fedsim.system.availability import Alternating, Always, Availability
from fedsim.validate import number

_STREAM = 71  # the profiles' generator stream (faults: 61)


@dataclass(frozen=True)
class Profile:
    """One client's device and network.

    ``gflops``: sustained training speed in 10^9 floating-point operations per second (or
    ``ms_per_example``: a trace's measured milliseconds per example, which then replaces the
    FLOP count); ``up_mbps`` / ``down_mbps``: megabits per second; ``latency_s``: one-way
    delay added to each transfer."""

    gflops: float
    up_mbps: float
    down_mbps: float
    latency_s: float = 0.0
    availability: Availability = field(default_factory=Always)
    ms_per_example: float | None = None

    def compute_s(self, examples: int, flops_per_example: float) -> float:
        """Seconds of local work on ``examples`` examples."""
        if self.ms_per_example is not None:
            return examples * self.ms_per_example / 1000.0
        return examples * flops_per_example / (self.gflops * 1e9)

    def download_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes * 8.0 / (self.down_mbps * 1e6)

    def upload_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes * 8.0 / (self.up_mbps * 1e6)


class System:
    """Base class of the ``system`` group's options.

    Parameters
    ----------
    name : str
        The option's name (``conf/system/<name>.yaml``).
    targets : list of float
        Test accuracies whose simulated time to reach ``summary.json`` reports
        (``time_to_accuracy``).
    """

    #: whether runs with this option have a clock
    active = True

    def __init__(self, name: str = "custom", targets: Sequence[float] = ()) -> None:
        self.name = str(name)
        if not isinstance(targets, (list, tuple)):
            raise ConfigError("system.targets", targets, "must be a list of accuracies in (0, 1]")
        self.targets = tuple(
            number("system.targets", t, 0, 1, low_open=True) for t in sorted(set(targets))
        )
        self._cache: dict[int, Profile] = {}
        self.seed = 0

    def bind(self, num_clients: int, seed: int) -> None:
        """The run's federation: profiles are drawn (or checked) for clients 0..N-1."""
        self.num_clients, self.seed = num_clients, seed
        self._cache.clear()

    def profile(self, client: int) -> Profile:
        found = self._cache.get(client)
        if found is None:
            found = self._cache[client] = self.make(client)
        return found

    def make(self, client: int) -> Profile:
        raise NotImplementedError

    @property
    def has_availability(self) -> bool:
        """Whether some client can be offline (sampling then takes only online clients)."""
        return False

    def describe(self) -> dict[str, Any]:
        """``summary.json``'s ``system`` block (the settings that define the profiles)."""
        return {"name": self.name}


class NoSystem(System):
    """No clock (the default): rounds take no simulated time."""

    active = False

    def __init__(self, name: str = "none", targets: Sequence[float] = ()) -> None:
        super().__init__(name, targets)


def _lognormal(rng: np.random.Generator, median: float, sigma: float) -> float:
    return float(median * math.exp(sigma * rng.standard_normal())) if sigma else float(median)


class Sampled(System):
    """Profiles drawn per client from lognormal distributions (``sigma = 0``: every client
    the same), with alternating online / offline periods.

    Parameters
    ----------
    gflops, up_mbps, down_mbps, latency_ms : float
        Medians (> 0; latency >= 0) of the training speed (GFLOP/s), the uplink and downlink
        bandwidth (Mbit/s) and the one-way latency (ms).
    gflops_sigma, bandwidth_sigma, latency_sigma : float
        The lognormals' sigma (>= 0); uplink and downlink share one draw (a client on a slow
        network is slow both ways).
    online_s, offline_s : float
        Mean lengths (simulated seconds) of a client's online and offline periods, exponential
        and alternating; ``offline_s = 0``: always online.
    """

    def __init__(
        self,
        name: str = "custom",
        targets: Sequence[float] = (),
        gflops: float = 20.0,
        gflops_sigma: float = 0.0,
        up_mbps: float = 10.0,
        down_mbps: float = 10.0,
        bandwidth_sigma: float = 0.0,
        latency_ms: float = 0.0,
        latency_sigma: float = 0.0,
        online_s: float = 3600.0,
        offline_s: float = 0.0,
    ) -> None:
        super().__init__(name, targets)
        positive = {"low": 0, "low_open": True}
        self.gflops = number("system.gflops", gflops, **positive)
        self.up_mbps = number("system.up_mbps", up_mbps, **positive)
        self.down_mbps = number("system.down_mbps", down_mbps, **positive)
        self.latency_ms = number("system.latency_ms", latency_ms, low=0)
        self.gflops_sigma = number("system.gflops_sigma", gflops_sigma, 0, 3)
        self.bandwidth_sigma = number("system.bandwidth_sigma", bandwidth_sigma, 0, 3)
        self.latency_sigma = number("system.latency_sigma", latency_sigma, 0, 3)
        self.online_s = number("system.online_s", online_s, **positive)
        self.offline_s = number("system.offline_s", offline_s, low=0)

    def make(self, client: int) -> Profile:
        return self._draw(client, self.gflops, self.up_mbps, self.down_mbps, self.latency_ms)

    def _draw(self, client: int, gflops: float, up: float, down: float, latency_ms: float):
        """Client ``client``'s profile around the given medians."""
        rng = np.random.default_rng([self.seed, _STREAM, client])
        speed = _lognormal(rng, gflops, self.gflops_sigma)
        net = math.exp(self.bandwidth_sigma * rng.standard_normal())
        latency = _lognormal(rng, latency_ms, self.latency_sigma) / 1000.0
        return Profile(speed, up * net, down * net, latency, self._availability(client))

    def _availability(self, client: int) -> Availability:
        if self.offline_s == 0:
            return Always()
        return Alternating(self.online_s, self.offline_s, [self.seed, _STREAM, client, 1])

    @property
    def has_availability(self) -> bool:
        return self.offline_s > 0

    def describe(self) -> dict[str, Any]:
        keys = ("gflops", "gflops_sigma", "up_mbps", "down_mbps", "bandwidth_sigma")
        keys += ("latency_ms", "latency_sigma", "online_s", "offline_s")
        return {"name": self.name, **{k: getattr(self, k) for k in keys}}


class Tiers(Sampled):
    """Device tiers: each client is assigned a tier (seeded, by the tiers' fractions); a tier
    sets the medians of :class:`Sampled` for its clients.

    Parameters
    ----------
    tiers : list of dict
        Each ``{name, fraction, gflops, up_mbps, down_mbps, latency_ms}``; the fractions sum
        to 1.
    """

    TIER_KEYS = ("name", "fraction", "gflops", "up_mbps", "down_mbps", "latency_ms")

    def __init__(
        self,
        name: str = "tiers",
        targets: Sequence[float] = (),
        tiers: Sequence[dict[str, Any]] = (),
        gflops_sigma: float = 0.0,
        bandwidth_sigma: float = 0.0,
        latency_sigma: float = 0.0,
        online_s: float = 3600.0,
        offline_s: float = 0.0,
    ) -> None:
        super().__init__(
            name,
            targets,
            gflops_sigma=gflops_sigma,
            bandwidth_sigma=bandwidth_sigma,
            latency_sigma=latency_sigma,
            online_s=online_s,
            offline_s=offline_s,
        )
        if not isinstance(tiers, (list, tuple)) or not tiers:
            raise ConfigError("system.tiers", tiers, "must be a non-empty list of tiers")
        self.tiers = [self._tier(i, t) for i, t in enumerate(tiers)]
        total = sum(t["fraction"] for t in self.tiers)
        if abs(total - 1.0) > 1e-9:
            fractions = [t["fraction"] for t in self.tiers]
            raise ConfigError("system.tiers", fractions, "the tiers' fractions must sum to 1")

    def _tier(self, i: int, tier: Any) -> dict[str, Any]:
        key = f"system.tiers[{i}]"
        if not isinstance(tier, dict) or set(tier) != set(self.TIER_KEYS):
            raise ConfigError(key, tier, f"must have exactly the keys {', '.join(self.TIER_KEYS)}")
        out = {"name": str(tier["name"])}
        out["fraction"] = number(f"{key}.fraction", tier["fraction"], 0, 1, low_open=True)
        for k in ("gflops", "up_mbps", "down_mbps"):
            out[k] = number(f"{key}.{k}", tier[k], low=0, low_open=True)
        out["latency_ms"] = number(f"{key}.latency_ms", tier["latency_ms"], low=0)
        return out

    def tier_of(self, client: int) -> dict[str, Any]:
        u = np.random.default_rng([self.seed, _STREAM, client, 2]).random()
        edge = 0.0
        for tier in self.tiers:
            edge += tier["fraction"]
            if u < edge:
                return tier
        return self.tiers[-1]

    def make(self, client: int) -> Profile:
        t = self.tier_of(client)
        return self._draw(client, t["gflops"], t["up_mbps"], t["down_mbps"], t["latency_ms"])

    def describe(self) -> dict[str, Any]:
        medians = ("gflops", "up_mbps", "down_mbps", "latency_ms")  # the tiers' own
        out = {k: v for k, v in super().describe().items() if k not in medians}
        return {**out, "tiers": self.tiers}
