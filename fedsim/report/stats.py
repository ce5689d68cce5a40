"""The report's statistics: means with Student's t intervals, the band a plot draws around a
mean over seeds, and differences paired by seed."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def t_quantile(n: int) -> float:
    """The 97.5% quantile of Student's t with ``n - 1`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def finite(values: Iterable[float | None]) -> list[float]:
    """The values that are numbers and finite, as floats."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_ci(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """``(mean, half-width of the 95% confidence interval, n)`` of the finite values (half-width
    None with fewer than two)."""
    xs = finite(values)
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None, len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return mean, t_quantile(len(xs)) * sd / math.sqrt(len(xs)), len(xs)


#: the fewest seeds for which a plot's band is the t interval (below: the range of the seeds)
CI_SEEDS = 3


def band(values: Iterable[float | None]) -> tuple[float | None, float | None, float | None]:
    """``(mean, low, high)`` of an accuracy over seeds, for a plot: the 95% t interval with at
    least :data:`CI_SEEDS` seeds, else the lowest and highest seed (with one: the value
    itself), kept in [0, 1] as accuracy is."""
    xs = finite(values)
    if not xs:
        return None, None, None
    mean, half, n = mean_ci(xs)
    assert mean is not None
    if n >= CI_SEEDS and half is not None:
        low, high = mean - half, mean + half
    else:
        low, high = min(xs), max(xs)
    return mean, max(low, 0.0), min(high, 1.0)


def band_name(seeds: int) -> str:
    """What :func:`band` draws for ``seeds`` seeds, for a legend: '3 seeds, 95% CI',
    '2 seeds, min-max', '' for one."""
    if seeds >= CI_SEEDS:
        return f"{seeds} seeds, 95% CI"
    return f"{seeds} seeds, min-max" if seeds == 2 else ""


def paired(a: dict[str, float | None], b: dict[str, float | None]) -> dict:
    """The differences ``a - b`` over the seeds both have (finite values only): per seed, their
    mean, the 95% t interval of the mean (with two or more) and ``n``."""
    seeds = sorted((s for s in a if s in b), key=_seed_order)
    diffs = {}
    for s in seeds:
        x, y = finite([a[s]]), finite([b[s]])
        if x and y:
            diffs[s] = x[0] - y[0]
    mean, half, n = mean_ci(diffs.values())
    low = None if mean is None or half is None else mean - half
    high = None if mean is None or half is None else mean + half
    return {"differences": diffs, "n": n, "mean": mean, "low": low, "high": high, "half": half}


def _seed_order(seed: str) -> tuple[float, str]:
    try:
        return float(seed), ""
    except ValueError:
        return math.inf, seed


def rate_order(text: str) -> tuple[float, str]:
    """Learning rates in numeric order (a value that is not a number last, by its text)."""
    return _seed_order(text)


def mean(values: Sequence | Iterable) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None
