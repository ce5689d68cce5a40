"""Random numbers addressed by position: the ``n``-th draw of a stream without the ``n - 1``
before it, so that a task can make any example of a pool of millions on demand, from its index.

A counter-based generator: draw ``n`` of stream ``key`` is SplitMix64's output function applied
to ``key + (n + 1) * 0x9E3779B97F4A7C15`` (Steele, Lea & Flood, "Fast splittable pseudorandom
number generators", OOPSLA 2014; the finaliser of Java's ``SplittableRandom``), its top 53 bits
read as a uniform number in ``[0, 1)``. Normal draws use the Box-Muller transform on two
uniforms. Everything is vectorised NumPy on unsigned 64-bit integers (which wrap modulo 2**64,
as the method needs), so the numbers are the same on every platform.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def stream_key(*entropy: int) -> int:
    """A 64-bit stream key from integers (NumPy's ``SeedSequence``: nearby seeds, distant keys)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0])


def uniform(key: int, counters: np.ndarray) -> np.ndarray:
    """Draws ``counters`` (non-negative integers, any shape) of stream ``key``: float64 in
    ``[0, 1)``."""
    z = np.asarray(counters, dtype=np.uint64) + np.uint64(1)
    z = z * _GOLDEN + np.uint64(key)  # wraps modulo 2**64
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def normal(key: int, rows: np.ndarray, width: int) -> np.ndarray:
    """Standard normal draws, ``len(rows) x width``: row ``i`` of the result is row ``rows[i]``
    of an endless ``? x width`` matrix of stream ``key`` (Box-Muller on draws ``2c`` and
    ``2c + 1``, ``c = row * width + column``)."""
    rows = np.asarray(rows, dtype=np.uint64).reshape(-1, 1)
    cells = rows * np.uint64(width) + np.arange(width, dtype=np.uint64)
    u1 = uniform(key, cells * np.uint64(2))
    u2 = uniform(key, cells * np.uint64(2) + np.uint64(1))
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def integers(key: int, start: int, stop: int, high: int, chunk: int = 1 << 20) -> np.ndarray:
    """Draws ``start .. stop - 1`` of stream ``key`` as integers uniform in ``[0, high)``, in
    the smallest unsigned dtype that holds them (computed ``chunk`` draws at a time: a pool of
    25 million labels takes 25 MB, not the 400 MB of its intermediate arrays)."""
    dtype = np.min_scalar_type(max(high - 1, 0))
    out = np.empty(max(stop - start, 0), dtype=dtype)
    for lo in range(start, stop, chunk):
        hi = min(lo + chunk, stop)
        u = uniform(key, np.arange(lo, hi, dtype=np.uint64))
        out[lo - start : hi - start] = np.minimum((u * high).astype(np.int64), high - 1)
    return out
