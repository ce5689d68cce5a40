"""A coordinate-wise trimmed mean: a robust aggregator as a fedsim plug-in (docs/plugins.md).

For every coordinate of every array, the server sorts the clients' values, drops the
``floor(trim * k)`` smallest and largest of the ``k`` replies, and averages the rest
(unweighted). With ``trim=0`` it is the plain mean of the clients' arrays. Yin et al., 2018,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates"
(https://arxiv.org/abs/1803.01498).

Nothing here imports fedsim: the contract is one method.
"""

from __future__ import annotations

import math

import numpy as np


class TrimmedMean:
    """Coordinate-wise trimmed mean of the clients' arrays.

    Parameters
    ----------
    trim : float
        Share of the replies dropped at each end, per coordinate, in [0, 0.5).
    """

    weighted = False  # the exactness diagnostic compares against the unweighted mean

    def __init__(self, trim: float = 0.1) -> None:
        if not 0.0 <= float(trim) < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        self.trim = float(trim)

    def aggregate(self, server_round, current, updates):
        k = len(updates)
        cut = math.floor(self.trim * k)
        new = {}
        for name in current:
            stacked = np.stack([np.asarray(u.arrays[name], dtype=np.float64) for u in updates])
            ordered = np.sort(stacked, axis=0)
            new[name] = ordered[cut : k - cut].mean(axis=0)
        return new, {"trimmed_per_side": cut}
