"""When a simulated client is online: always, alternating seeded periods, or a trace's
intervals (FedScale's ``active`` / ``inactive`` lists, repeating every ``finish_time``).

Every kind answers two questions on the simulated clock: is the client online at ``t``
(:meth:`Availability.online`), and until when does it stay online (:meth:`Availability.until`:
a client whose work ends later drops out of its round), plus when it next comes online
(:meth:`Availability.next_online`: the server waits for somebody when nobody is).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np


class Availability:
    def online(self, t: float) -> bool:
        raise NotImplementedError

    def until(self, t: float) -> float:
        """The end of the online period holding ``t`` (``t`` itself if offline)."""
        raise NotImplementedError

    def next_online(self, t: float) -> float:
        """The first time >= ``t`` at which the client is online (``inf``: never)."""
        raise NotImplementedError


class Always(Availability):
    def online(self, t: float) -> bool:
        return True

    def until(self, t: float) -> float:
        return math.inf

    def next_online(self, t: float) -> float:
        return t


class Intervals(Availability):
    """Online on ``[active[i], inactive[i])``; with a ``period``, the pattern repeats every
    ``period`` seconds (FedScale's ``finish_time``)."""

    def __init__(
        self, active: Sequence[float], inactive: Sequence[float], period: float | None = None
    ) -> None:
        self.active, self.inactive = list(active), list(inactive)
        self.period = period

    def _split(self, t: float) -> tuple[float, float]:
        if self.period is None:
            return 0.0, t
        k = math.floor(t / self.period)
        return k * self.period, t - k * self.period

    def _index(self, local: float) -> int:
        """The interval holding ``local``, or -1."""
        i = bisect.bisect_right(self.active, local) - 1
        return i if i >= 0 and local < self.inactive[i] else -1

    def online(self, t: float) -> bool:
        return self._index(self._split(t)[1]) >= 0

    def until(self, t: float) -> float:
        base, local = self._split(t)
        i = self._index(local)
        if i < 0:
            return t
        end = base + self.inactive[i]
        wraps = self.period is not None and self.inactive[i] >= self.period
        if wraps and self.active[0] <= 0:  # online at the period's end and at its start
            if i == 0:
                return math.inf  # one interval covering the whole period: always online
            return base + self.period + self.inactive[0]
        return end

    def next_online(self, t: float) -> float:
        if not self.active:
            return math.inf
        base, local = self._split(t)
        if self._index(local) >= 0:
            return t
        i = bisect.bisect_right(self.active, local)
        if i < len(self.active):
            return base + self.active[i]
        if self.period is None:
            return math.inf
        return base + self.period + self.active[0]


class Alternating(Availability):
    """Online and offline periods of exponential lengths (means ``online_s``, ``offline_s``),
    alternating; the state at ``t = 0`` drawn from the stationary share of online time
    (memoryless: the first period is exponential too). Switch times come from the client's
    own generator (``seed``), extended as far as the clock asks."""

    def __init__(self, online_s: float, offline_s: float, seed: Sequence[int]) -> None:
        self.online_s, self.offline_s = online_s, offline_s
        self.rng = np.random.default_rng(list(seed))
        self.start_online = bool(self.rng.random() < online_s / (online_s + offline_s))
        self.switches: list[float] = []  # times at which the state flips

    def _extend(self, t: float) -> None:
        last = self.switches[-1] if self.switches else 0.0
        while last <= t:
            online = self.start_online == (len(self.switches) % 2 == 0)
            last += float(self.rng.exponential(self.online_s if online else self.offline_s))
            self.switches.append(last)

    def _state(self, t: float) -> tuple[bool, int]:
        """Online at ``t``, and the index of the next switch."""
        self._extend(t)
        i = bisect.bisect_right(self.switches, t)
        return self.start_online == (i % 2 == 0), i

    def online(self, t: float) -> bool:
        return self._state(t)[0]

    def until(self, t: float) -> float:
        online, i = self._state(t)
        return self.switches[i] if online else t

    def next_online(self, t: float) -> float:
        online, i = self._state(t)
        return t if online else self.switches[i]
