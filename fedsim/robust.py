"""Robust aggregation (config group ``robust``): rules that replace the mean of an averaging
strategy, so that a few Byzantine clients cannot move the global model at will.

Every strategy whose server step is a mean of the arrays its clients send (``averages = True``:
FedIT, Fed-SB, FFA-LoRA, FedSA) computes that mean through
:meth:`fedsim.strategy.AdapterStrategy.average`; with ``robust`` other than ``none`` the rule
below replaces it. Each rule works **in the space of the sent arrays**: coordinate by
coordinate (median, trimmed mean, Bulyan's second step) or by the distances between the
clients' sent arrays flattened together (Krum, Multi-Krum, Bulyan's selection), exactly as
Flower's ``FedMedian``, ``FedTrimmedAvg``, ``Krum``, ``MultiKrum`` and ``Bulyan``
(``flwr.serverapp.strategy``) compute on the same arrays (``tests/test_robust.py``). For FedIT
the sent arrays are the factors ``A_i``, ``B_i``, so the rule's product ``s B A`` is not the rule
applied to the clients' ``dW_i = s B_i A_i`` (docs/strategies.md measures the difference); for
Fed-SB it is the same up to the fixed linear map ``R -> B R A`` (coordinatewise rules are not
invariant under it either, Krum's distances are when ``B``, ``A`` have orthonormal columns and
rows).

With ``n`` replies in a round and weights ``p_i`` (the strategy's: by examples, or uniform):

* ``median`` (Yin et al., 2018): ``x[j] = median_i x_i[j]`` (unweighted, as Flower's);
* ``trimmed_mean`` (Yin et al., 2018): drop the ``b = floor(beta n)`` largest and smallest
  values of each coordinate, average the other ``n - 2b`` (unweighted);
* ``krum`` (Blanchard et al., 2017): the reply whose summed squared distance to its
  ``n - f - 2`` nearest others is smallest (needs ``n >= 2f + 3``);
* ``multikrum`` (Blanchard et al., 2017): the ``m`` replies with the smallest such scores
  (``m`` null: ``n - f``), averaged with the strategy's weights renormalised over them (Flower
  weights by examples: the same as ``strategy.weighted=true``);
* ``bulyan`` (El Mhamdi et al., 2018): Multi-Krum selects ``theta = n - 2f`` replies; each
  coordinate is the mean of the ``theta - 2f`` selected values nearest that coordinate's median
  (unweighted; needs ``n >= 4f + 3``). The selection is Flower's: one Multi-Krum pass with
  scores over all ``n`` replies, where the paper re-runs Krum after each pick.

A round with fewer good replies than a rule needs keeps the global model and is recorded as
skipped, as one with fewer than ``sim.min_clients`` (Flower's Bulyan also skips such a round).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedsim.errors import RunFailed
from fedsim.messages import weighted_mean
from fedsim.validate import integer, number

Arrays = Mapping[str, np.ndarray]

#: the space every rule works in (summary.json's ``robust_space``)
SPACE = "sent arrays"


class Robust:
    """``robust=none``: the strategy's weighted mean, unchanged (the default)."""

    name = "none"

    @property
    def active(self) -> bool:
        return type(self) is not Robust

    def min_updates(self) -> int:
        """The fewest replies the rule can aggregate."""
        return 1

    def settings(self) -> dict[str, Any]:
        """The rule's parameters (summary.json)."""
        return {}

    def describe(self) -> str:
        keys = ", ".join(f"{k}={v}" for k, v in self.settings().items())
        return f"{self.name}({keys})"

    def aggregate(self, arrays: Sequence[Arrays], weights: np.ndarray) -> dict[str, np.ndarray]:
        """The new arrays (float64) from the clients' sent ``arrays`` and their weights."""
        self._check(len(arrays))
        return self.reduce([_float64(a) for a in arrays], np.asarray(weights, np.float64))

    def reduce(self, arrays: list[dict[str, np.ndarray]], p: np.ndarray) -> dict[str, np.ndarray]:
        return weighted_mean(arrays, p)

    def _check(self, n: int) -> None:
        need = self.min_updates()
        if n < need:  # the server skips such rounds first; this is the rule's own guard
            raise RunFailed(f"robust={self.describe()} needs at least {need} updates, got {n}")


class Median(Robust):
    """Coordinatewise median (Yin et al., 2018, https://arxiv.org/abs/1803.01498)."""

    name = "median"

    def reduce(self, arrays, p):
        return {k: np.median(_stack(arrays, k), axis=0) for k in arrays[0]}


class TrimmedMean(Robust):
    """Coordinatewise ``beta``-trimmed mean (Yin et al., 2018)."""

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.2) -> None:
        self.beta = number("robust.beta", beta, 0, 0.5, high_open=True)

    def settings(self):
        return {"beta": self.beta}

    def reduce(self, arrays, p):
        n = len(arrays)
        cut = int(self.beta * n)
        return {
            k: np.sort(_stack(arrays, k), axis=0)[cut : n - cut].mean(axis=0) for k in arrays[0]
        }


class Krum(Robust):
    """Krum (Blanchard et al., 2017, https://arxiv.org/abs/1703.02757): the one reply nearest
    its ``n - f - 2`` neighbours."""

    name = "krum"

    def __init__(self, f: int = 1) -> None:
        self.f = integer("robust.f", f, low=0)

    def settings(self):
        return {"f": self.f}

    def min_updates(self) -> int:
        return 2 * self.f + 3

    def reduce(self, arrays, p):
        (best,) = krum_select(arrays, self.f, 1)
        return dict(arrays[best])


class MultiKrum(Krum):
    """Multi-Krum (Blanchard et al., 2017): the mean of the ``m`` best Krum scores."""

    name = "multikrum"

    def __init__(self, f: int = 1, m: int | None = None) -> None:
        super().__init__(f)
        self.m = None if m is None else integer("robust.m", m, low=1)

    def settings(self):
        return {"f": self.f, "m": self.m}

    def min_updates(self) -> int:
        return max(2 * self.f + 3, self.m or 1)

    def chosen(self, n: int) -> int:
        return self.m if self.m is not None else n - self.f

    def reduce(self, arrays, p):
        picked = krum_select(arrays, self.f, self.chosen(len(arrays)))
        q = p[picked] / p[picked].sum()
        return weighted_mean([arrays[i] for i in picked], q)


class Bulyan(Robust):
    """Bulyan (El Mhamdi et al., 2018, https://arxiv.org/abs/1802.07927) over Multi-Krum."""

    name = "bulyan"

    def __init__(self, f: int = 1) -> None:
        self.f = integer("robust.f", f, low=0)

    def settings(self):
        return {"f": self.f}

    def min_updates(self) -> int:
        return 4 * self.f + 3

    def reduce(self, arrays, p):
        n, f = len(arrays), self.f
        theta = n - 2 * f
        beta = theta - 2 * f
        picked = [arrays[i] for i in krum_select(arrays, f, theta)]
        out = {}
        for k in arrays[0]:
            stack = _stack(picked, k)
            median = np.median(stack, axis=0)
            nearest = np.argsort(np.abs(stack - median), axis=0, kind="stable")[:beta]
            out[k] = np.take_along_axis(stack, nearest, axis=0).mean(axis=0)
        return out


def krum_select(arrays: Sequence[Arrays], f: int, m: int) -> list[int]:
    """The indices of the ``m`` lowest Krum scores, lowest first: each reply's score is the sum
    of its squared distances (all arrays flattened together) to its ``max(1, n - f - 2)``
    nearest other replies (Flower's ``select_multikrum``)."""
    n = len(arrays)
    names = sorted(arrays[0])
    flat = np.stack([np.concatenate([np.ravel(a[k]) for k in names]) for a in arrays])
    dist = np.stack([((flat - row) ** 2).sum(axis=1) for row in flat])  # no n x n x d temporary
    closest = max(1, n - f - 2)
    scores = []
    for i in range(n):
        others = np.delete(dist[i], i)
        scores.append(np.sort(others)[:closest].sum())
    return [int(i) for i in np.argsort(np.array(scores), kind="stable")[:m]]


def _stack(arrays: Sequence[Arrays], key: str) -> np.ndarray:
    return np.stack([a[key] for a in arrays])


def _float64(arrays: Arrays) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in arrays.items()}
