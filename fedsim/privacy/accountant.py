"""The privacy accountant of a client (DP-SGD) or of the server (central DP), as a history.

Two accountants, both Opacus', read the same history of ``(noise multiplier, sample rate,
steps)`` entries (``privacy.accountant``):

- ``rdp``: Rényi DP of the Poisson-subsampled Gaussian (Mironov, Talwar and Zhang, 2019,
  "Rényi Differential Privacy of the Sampled Gaussian Mechanism"), converted to
  ``(epsilon, delta)`` at Opacus' default orders; an upper bound, cheap.
- ``prv``: numerical composition of privacy loss random variables (Gopi, Lee and Wutschitz,
  2021, "Numerical Composition of Differential Privacy"): tighter, and Opacus' default; the
  reported value is its upper bound at ``eps_error = 0.01`` (an absolute error in epsilon).
  It needs a discretisation fine enough for ``delta`` and the number of steps: where floating
  point cannot resolve it (a tiny ``delta`` over many steps) it raises, and fedsim says so in
  one line (:class:`AccountingError`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

ACCOUNTANTS = ("rdp", "prv")
#: PRV's error bound on epsilon (Opacus' default); its delta error is delta / 1000
PRV_EPS_ERROR = 0.01


class AccountingError(ValueError):
    """The accountant cannot compute epsilon for this history (one line, with the remedy)."""


@dataclass
class Accountant:
    """A privacy accountant as a history that fits in a client's ``Context.state``."""

    history: list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps)
    kind: str = field(default="rdp")

    @classmethod
    def from_array(cls, array: np.ndarray | None, kind: str = "rdp") -> Accountant:
        if array is None:
            return cls([], kind)
        history = [(float(s), float(q), int(n)) for s, q, n in np.asarray(array).reshape(-1, 3)]
        return cls(history, kind)

    def to_array(self) -> np.ndarray:
        return np.array(self.history, dtype=np.float64).reshape(-1, 3)

    def step(self, sigma: float, q: float, steps: int = 1) -> None:
        if self.history and self.history[-1][:2] == (sigma, q):
            s, r, n = self.history[-1]
            self.history[-1] = (s, r, n + steps)
        else:
            self.history.append((sigma, q, steps))

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` over the whole history, by the chosen accountant."""
        if not self.history:
            return 0.0
        return epsilon_of(tuple(self.history), delta, self.kind)


def epsilon_of(history: tuple[tuple[float, float, int], ...], delta: float, kind: str) -> float:
    """Epsilon of a history at ``delta``: ``rdp`` (Opacus' RDP accountant's computation, each
    ``(sigma, q)``'s curve computed once per process) or ``prv`` (Opacus' PRV accountant)."""
    if kind == "prv":
        history = tuple((float(s), float(q), int(n)) for s, q, n in history if n > 0 and q > 0)
        return _prv_epsilon(history, float(delta)) if history else 0.0
    if kind != "rdp":
        raise ValueError(f"unknown accountant {kind!r}; use {' or '.join(ACCOUNTANTS)}")
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(steps * _rdp_curve(sigma, q) for sigma, q, steps in history)
    with warnings.catch_warnings():  # an end of the grid optimal: still a valid bound
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        eps, _ = get_privacy_spent(orders=list(_orders()), rdp=rdp, delta=delta)
    return float(eps)


@lru_cache(maxsize=4096)
def _prv_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    if any(sigma == 0 for sigma, _, _ in history):
        return float("inf")  # no noise: no guarantee (as the RDP accountant says)
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = list(history)
    steps = sum(n for _, _, n in history)
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps = accountant.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR)
    except (ValueError, OverflowError, MemoryError, RuntimeError, FloatingPointError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise AccountingError(
            f"Opacus' PRV accountant cannot account for delta={delta:g} over {steps} steps "
            f"({reason}); use privacy.accountant=rdp or a larger privacy.delta"
        ) from None
    if not np.isfinite(eps):
        raise AccountingError(
            f"Opacus' PRV accountant returned epsilon={eps} for delta={delta:g} over "
            f"{steps} steps; use privacy.accountant=rdp"
        )
    return float(eps)


#: orders beyond Opacus' default grid (which ends at 63): where a small epsilon is optimal at
#: a large order, the default grid gives a looser bound and Opacus warns on every call
EXTRA_ORDERS = (80, 96, 128, 160, 192, 256, 384, 512, 768, 1024, 1536, 2048)


@lru_cache(maxsize=1)
def _orders() -> tuple[float, ...]:
    """Opacus' default RDP orders, extended to 2048 (``EXTRA_ORDERS``). An epsilon is the
    minimum over the orders, so the extension only ever tightens it, and only below about
    0.2 (at ``delta = 1e-5``). The bound at an end of the grid is still a valid one, so
    Opacus' notes that the optimal order is the largest (epsilon below about 0.006) or the
    smallest (epsilon above about 100: little noise) are not shown."""
    from opacus.accountants import RDPAccountant

    return (*RDPAccountant.DEFAULT_ALPHAS, *EXTRA_ORDERS)


@lru_cache(maxsize=4096)
def _rdp_curve(sigma: float, q: float) -> np.ndarray:
    """RDP of one subsampled Gaussian step at every order (the costly part: cached)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(_orders())))
