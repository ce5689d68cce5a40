"""Adaptive clipping for central DP: the clip norm follows a quantile of the update norms.

Andrew, Thakkar, McMahan and Ramaswamy (2021), "Differentially Private Learning with Adaptive
Clipping" (NeurIPS; arXiv:1905.03871), Algorithm 1 with the geometric update. Each round
every sampled client reports the bit ``b_i = 1[||Delta_i|| <= C]`` beside its update clipped
to ``C``; the server releases the noised fraction of unclipped updates

    b~ = 1/2 + (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m,      m = q N (the expected count)

and moves the clip norm geometrically towards the target quantile ``gamma``:

    C <- C * exp(-eta_C * (b~ - gamma)).

The bits are centred (``b_i - 1/2``) so that adding or removing one client changes their sum by
at most 1/2: the count is a Gaussian mechanism with noise multiplier ``2 sigma_b``. Both
releases see the same clients, so together they are one Gaussian mechanism with

    z^-2 = z_Delta^-2 + (2 sigma_b)^-2

(the paper's composition argument): to spend what a noise multiplier ``z`` spends, the update's
noise multiplier is raised to ``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``, which needs
``z < 2 sigma_b``. The paper's defaults: ``gamma = 0.5``, ``eta_C = 0.2``, ``sigma_b = m / 20``,
an initial ``C = 0.1``.

Under fedsim's Poisson sampling the number of clients in a round is random and not public;
``m`` is the expected count ``q N``, public and fixed, which is what makes the sensitivity of the
centred sum 1/2. When the round's count equals ``m`` (always, under the fixed-size sampling of
Flower's ``DifferentialPrivacyServerSideAdaptiveClipping``), ``b~`` is Flower's
``(sum_i b_i + noise) / m``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fedsim.errors import ConfigError
from fedsim.validate import number


def count_stddev_for(noise_multiplier: float, expected: float, given: float | None) -> float:
    """``sigma_b``: as given, else the paper's ``m / 20`` (0 when there is no noise at all,
    as Flower does)."""
    if given is not None:
        return float(given)
    return expected / 20.0 if noise_multiplier > 0 else 0.0


def update_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``: the update's noise multiplier that, with
    the count's, spends what ``z`` alone would (0 stays 0). ConfigError unless
    ``z < 2 sigma_b``."""
    z = float(noise_multiplier)
    if z == 0:
        return 0.0
    if z >= 2 * count_stddev:
        raise ConfigError(
            "privacy.count_stddev",
            count_stddev,
            f"adaptive clipping needs noise_multiplier {z:.4g} < 2 * count_stddev (the count's "
            f"share of the noise); raise privacy.count_stddev above {z / 2:.4g} or "
            "sim.clients_per_round (its default is the expected clients per round / 20)",
        )
    return (z**-2 - (2 * count_stddev) ** -2) ** -0.5


@dataclass
class AdaptiveClip:
    """The quantile rule (Andrew et al., 2021, Algorithm 1, geometric update).

    Parameters
    ----------
    target_quantile : float
        ``gamma`` in (0, 1): the share of updates that should be left unclipped.
    clip_lr : float
        ``eta_C`` > 0.
    count_stddev : float, optional
        ``sigma_b`` >= 0; None: ``m / 20``.
    """

    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float | None = None

    def __post_init__(self) -> None:
        self.target_quantile = number(
            "privacy.target_quantile", self.target_quantile, 0, 1, low_open=True, high_open=True
        )
        self.clip_lr = number("privacy.clip_lr", self.clip_lr, low=0, low_open=True)
        if self.count_stddev is not None:
            self.count_stddev = number("privacy.count_stddev", self.count_stddev, low=0)

    def fraction(self, bits: Sequence[int], expected: float, noise: float) -> float:
        """``b~ = 1/2 + (sum (b_i - 1/2) + noise) / m``."""
        centred = math.fsum(float(b) - 0.5 for b in bits)
        return 0.5 + (centred + noise) / expected

    def next_clip(self, clip: float, fraction: float) -> float:
        """``C exp(-eta_C (b~ - gamma))``."""
        return clip * math.exp(-self.clip_lr * (fraction - self.target_quantile))
