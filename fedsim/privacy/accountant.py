"""The RDP accountant of a client (DP-SGD) or of the server (central DP), as a history."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


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
