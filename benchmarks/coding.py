"""Entropy-coded payload sizes against what fedsim charges now and against the ideal.

    python benchmarks/coding.py                 # d in 1e3..1e6, a markdown table on stdout
    python benchmarks/coding.py --sizes 1000 10000 --repeats 1
    python benchmarks/coding.py --skip-sparse --block 64   # QSGD with one norm per 64 entries

Rows:
  * Top-K (Rand-K with ``shared_seed: false`` sends the same: K float32 values and a uniformly
    random K-subset of positions): fixed = fedsim's payload (values + positions packed at
    ``index_bits(d)`` bits), coded = values + :func:`encode_positions`, ideal = values +
    ``log2 C(d, K)`` bits.
  * ComPEFT: positions + one sign bit per kept entry + one float32 scale; ideal =
    ``log2 C(d, K) + K + 32`` bits.
  * QSGD (Alistarh et al., 2017) with ``s`` levels and one float32 norm for the whole tensor
    (fedsim's default ``block: null``; ``--block B``: one per B entries), on Gaussian and
    Student-t (2 degrees of freedom) vectors: fixed = ``1 + bit_length(s)`` bits per entry
    (fedsim's ``bits`` for ``s = 2^(bits-1) - 1``; the smallest such width for other ``s``) +
    the norms; coded = :func:`encode_levels` + the norms; ideal = the empirical entropy of the
    signed levels + the norms; Elias = the paper's code (section 3.2): 32 bits per norm, then
    per non-zero entry Elias-omega of the distance to it (1-based), a sign bit and Elias-omega
    of its level (bits counted, nothing built).

Times: best of ``--repeats`` runs, in milliseconds, of encoding and of decoding the coded part
(positions, or levels), on whatever machine runs it. Every decode is checked to be exact.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from fedsim.compression import ComPEFT, TopK, top_indices
from fedsim.compression.coding import (
    decode_levels,
    decode_positions,
    encode_levels,
    encode_positions,
)

SIZES = (1_000, 10_000, 100_000, 1_000_000)
RATIOS = (0.001, 0.01, 0.1, 0.5)
LEVELS = (1, 4, 7, 16, 31)
HEADER = (
    "| payload | d | K or s | fixed B | coded B | ideal B | coded/ideal | fixed/ideal "
    "| Elias B | encode ms | decode ms |"
)


def log2_binomial(d: int, k: int) -> float:
    return (math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1)) / math.log(2)


def entropy_bits(levels: np.ndarray) -> float:
    _, counts = np.unique(levels, return_counts=True)
    p = counts / levels.size
    return float(-(counts * np.log2(p)).sum())


def omega_bits(values: np.ndarray) -> np.ndarray:
    """Lengths of the Elias-omega (recursive) codes of positive integers: the binary form of
    the value, preceded by the code of its bit length minus one, down to 1; then a 0."""
    values = np.asarray(values, dtype=np.int64)
    total = np.ones(values.shape, dtype=np.int64)
    n = values.copy()
    while np.any(n > 1):
        width = np.frexp(n.astype(np.float64))[1]  # bit length (exact below 2^53)
        more = n > 1
        total += np.where(more, width, 0)
        n = np.where(more, width - 1, n)
    return total


def elias_bits(levels: np.ndarray) -> int:
    """QSGD's Elias code of a quantised vector, without its 32-bit norm."""
    nonzero = np.flatnonzero(levels)
    if nonzero.size == 0:
        return 0
    distance = np.diff(nonzero, prepend=-1)  # the first: its 1-based position
    return int(
        omega_bits(distance).sum() + nonzero.size + omega_bits(np.abs(levels[nonzero])).sum()
    )


def qsgd_levels(x: np.ndarray, s: int, block: int | None, rng: np.random.Generator):
    """QSGD's signed levels, one norm per block of ``block`` entries (None: the whole vector;
    the last block zero padded), as fedsim.compression.qsgd."""
    b = x.size if block is None else min(block, x.size)
    blocks = np.concatenate([x, np.zeros((-x.size) % b)]).reshape(-1, b)
    norm = np.linalg.norm(blocks, axis=1, keepdims=True)
    r = np.abs(blocks) / np.where(norm > 0, norm, 1.0) * s
    low = np.floor(r)
    level = np.minimum(low + (rng.random(r.shape) < r - low), s).astype(np.int64)
    return np.where(blocks < 0, -level, level).ravel()[: x.size], blocks.shape[0]


def timed(fn, repeats: int):
    best, out = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best * 1e3


def row(name, d, param, fixed, coded, ideal, elias, t_enc, t_dec) -> str:
    elias_text = "" if elias is None else f"{elias:,}"
    return (
        f"| {name} | {d:,} | {param} | {fixed:,} | {coded:,} | {ideal:,.1f} "
        f"| {coded / ideal:.4f} | {fixed / ideal:.2f} | {elias_text} | {t_enc:.2f} | {t_dec:.2f} |"
    )


def sparse_rows(d: int, ratio: float, repeats: int, rng: np.random.Generator) -> list[str]:
    x = rng.normal(size=d).astype(np.float32)
    k = max(1, round(ratio * d))
    top, compeft = TopK(k=k), ComPEFT(k=k)
    fixed_top = top.raw_bytes(d, 4)  # the fixed-width format (bytes_up_raw), not the coded one
    fixed_compeft = compeft.raw_bytes(d, 4)
    positions = top_indices(x, k)
    buf, t_enc = timed(lambda: encode_positions(positions, d), repeats)
    out, t_dec = timed(lambda: decode_positions(buf, d, k), repeats)
    assert np.array_equal(out, positions)
    bits = log2_binomial(d, k)
    label = f"{k:,} ({ratio:.1%})"
    return [
        row("Top-K", d, label, fixed_top, 4 * k + buf.size, 4 * k + bits / 8, None, t_enc, t_dec),
        row(
            "ComPEFT",
            d,
            label,
            fixed_compeft,
            buf.size + math.ceil(k / 8) + 4,
            (bits + k + 32) / 8,
            None,
            t_enc,
            t_dec,
        ),
    ]


def qsgd_row(d, s, kind, block, repeats, rng) -> str:
    x = rng.normal(size=d) if kind == "gauss" else rng.standard_t(2, size=d)
    levels, norms = qsgd_levels(x.astype(np.float32).astype(np.float64), s, block, rng)
    buf, t_enc = timed(lambda: encode_levels(levels, s), repeats)
    out, t_dec = timed(lambda: decode_levels(buf, d, s), repeats)
    assert np.array_equal(out, levels)
    fixed = math.ceil(d * (1 + s.bit_length()) / 8) + 4 * norms
    elias = math.ceil((32 * norms + elias_bits(levels)) / 8)
    ideal = entropy_bits(levels) / 8 + 4 * norms
    name = f"QSGD {kind}" if block is None else f"QSGD {kind} B={block}"
    return row(name, d, f"s={s}", fixed, buf.size + 4 * norms, ideal, elias, t_enc, t_dec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block", type=int, default=None, help="QSGD entries per norm")
    parser.add_argument("--skip-sparse", action="store_true")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for d in [] if args.skip_sparse else args.sizes:
        for ratio in RATIOS:
            for line in sparse_rows(d, ratio, args.repeats, rng):
                print(line, flush=True)
    for kind in ("gauss", "t2"):
        for d in args.sizes:
            for s in LEVELS:
                print(qsgd_row(d, s, kind, args.block, args.repeats, rng), flush=True)


if __name__ == "__main__":
    main()
