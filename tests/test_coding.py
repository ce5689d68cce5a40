"""Entropy coding of payload parts (fedsim.compression.coding): exact round trips, sizes near
the information-theoretic ideal (computed here independently), and malformed buffers refused."""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedsim.compression import coding
from fedsim.compression.coding import (
    decode_levels,
    decode_positions,
    encode_levels,
    encode_positions,
    pack_bits,
    unpack_bits,
)

ROOT = Path(__file__).resolve().parents[1]
#: level payloads are range coded with constriction (imported only when needed)
needs_constriction = pytest.mark.skipif(
    importlib.util.find_spec("constriction") is None, reason="constriction is not installed"
)


def log2_binomial(d: int, k: int) -> float:
    return (math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1)) / math.log(2)


def entropy_bits(levels: np.ndarray) -> float:
    _, counts = np.unique(levels, return_counts=True)
    return float(-(counts * np.log2(counts / levels.size)).sum())


def elias_omega(v: int) -> int:
    bits = 1
    while v > 1:
        bits += v.bit_length()
        v = v.bit_length() - 1
    return bits


def elias_bits(levels: np.ndarray) -> int:
    """QSGD's own code (Alistarh et al., 2017, section 3.2), norm excluded: per non-zero entry,
    Elias-omega of the distance to it, a sign bit, Elias-omega of its level."""
    total, last = 0, -1
    for i in np.flatnonzero(levels).tolist():
        total += elias_omega(i - last) + 1 + elias_omega(abs(int(levels[i])))
        last = i
    return total


def qsgd(x: np.ndarray, s: int, rng: np.random.Generator, block: int | None = None):
    b = x.reshape(-1, block or x.size)
    norm = np.linalg.norm(b, axis=1, keepdims=True)
    r = np.abs(b) / np.where(norm > 0, norm, 1.0) * s
    low = np.floor(r)
    level = np.minimum(low + (rng.random(r.shape) < r - low), s).astype(np.int64)
    return np.where(b < 0, -level, level).ravel()


def random_positions(d: int, k: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(d, size=k, replace=False))


def check_positions(positions: np.ndarray, d: int) -> np.ndarray:
    buf = encode_positions(positions, d)
    assert buf.dtype == np.uint8 and buf.ndim == 1
    out = decode_positions(buf, d, positions.size)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, positions)
    return buf


# ------------------------------------------------------------------------------- positions

SIZES = [1, 2, 3, 7, 8, 9, 64, 100, 1000, 4099, 65536, 200_000]
FRACTIONS = [0.0, 0.001, 0.01, 0.05, 0.1, 0.3, 0.38, 0.5, 0.62, 0.9, 0.999, 1.0]


@pytest.mark.parametrize("d", SIZES)
def test_positions_round_trip_near_log2_binomial(d):
    for i, fraction in enumerate(FRACTIONS):
        for k in sorted({round(fraction * d), min(d, 1), max(d - 1, 0)}):
            positions = random_positions(d, k, seed=d + i)
            buf = check_positions(positions, d)
            ideal = log2_binomial(d, k)
            # Golomb's worst redundancy (4.2 % near density 0.38) + the last byte's padding
            assert 8 * buf.size <= 1.045 * ideal + 8 + 0.5 * math.log2(2 * math.pi * (k + 1))
            if k in (0, d):
                assert buf.size == 0


@pytest.mark.parametrize("d", [2, 3, 10, 17, 1000, 4096])
def test_adversarial_position_sets(d):
    every = np.arange(d)
    cases = [
        every[: d // 4 + 1],  # all at the start
        every[-(d // 4 + 1) :],  # all at the end
        every[::2],
        every[1::2],
        every[::3],
        every[:1],
        every[-1:],
        np.concatenate([every[: d // 8], every[-(d // 8) :]]) if d >= 16 else every[:0],
        every,
        every[:0],
    ]
    for positions in cases:
        check_positions(positions, d)


def test_positions_degenerate_sizes():
    for d, positions, size in [(0, [], 0), (1, [], 0), (1, [0], 0), (2, [1], 1), (2, [0, 1], 0)]:
        assert check_positions(np.array(positions, dtype=np.int64), d).size == size
    assert decode_positions(np.zeros(0, np.uint8), 5, 0).size == 0
    assert decode_positions(b"", 5, 5).tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(decode_positions(encode_positions([3], 4).tobytes(), 4, 1), [3])


@pytest.mark.parametrize(
    "positions, d",
    [([2, 1], 5), ([1, 1], 5), ([-1, 2], 5), ([0, 5], 5), ([0.0, 1.0], 5), ([[0, 1]], 5)],
)
def test_bad_positions_are_refused(positions, d):
    with pytest.raises(ValueError):
        encode_positions(np.array(positions), d)


def test_bad_arguments_are_refused():
    for call in (
        lambda: encode_positions([0], -1),
        lambda: decode_positions(b"", 3, 4),
        lambda: decode_positions(np.zeros(2, np.int32), 3, 1),
        lambda: encode_levels([0, 1], 0),
        lambda: encode_levels([0, 3], 2),
        lambda: encode_levels(np.array([0.5]), 2),
        lambda: decode_levels(b"", 3, 0),
        lambda: decode_levels(b"\x01", 0, 3),
        lambda: unpack_bits(np.zeros(2, np.uint8), 7),
        lambda: unpack_bits(np.array([1], np.uint8), 7),
    ):
        with pytest.raises(ValueError):
            call()


def test_bits_round_trip():
    for n in [0, 1, 7, 8, 9, 1001]:
        bits = np.random.default_rng(n).random(n) < 0.3
        buf = pack_bits(bits)
        assert buf.size == math.ceil(n / 8)
        np.testing.assert_array_equal(unpack_bits(buf, n), bits)


# ------------------------------------------------------------------- payload-level goals


@pytest.mark.parametrize("d", [1000, 10_000, 100_000])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1, 0.5])
def test_topk_and_compeft_payloads_within_5_percent(d, ratio):
    k = max(1, round(ratio * d))
    buf = check_positions(random_positions(d, k, seed=k), d)
    bits = log2_binomial(d, k)
    top_ideal, compeft_ideal = 4 * k + bits / 8, (bits + k + 32) / 8
    if top_ideal >= 100:
        assert (4 * k + buf.size) / top_ideal <= 1.05
    if compeft_ideal >= 100:
        assert (buf.size + math.ceil(k / 8) + 4) / compeft_ideal <= 1.05


# ---------------------------------------------------------------------------------- levels


def check_levels(levels: np.ndarray, s: int) -> np.ndarray:
    buf = encode_levels(levels, s)
    assert buf.dtype == np.uint8 and buf.ndim == 1
    out = decode_levels(buf, levels.size, s)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, levels)
    return buf


@needs_constriction
@pytest.mark.parametrize("s", [1, 2, 3, 4, 7, 16, 31, 255])
@pytest.mark.parametrize("n", [1, 5, 100, 1000, 20_000])
@pytest.mark.parametrize("block", [None, 16])
def test_qsgd_levels_round_trip_below_elias_near_entropy(s, n, block):
    rng = np.random.default_rng(1000 * s + n)
    for x in (rng.normal(size=n), rng.standard_t(2, size=n)):
        levels = qsgd(x, s, rng, block if block and n % block == 0 else None)
        buf = check_levels(levels, s)
        ideal, elias = entropy_bits(levels), elias_bits(levels)
        if n >= 100:  # the header (non-zero count, maximum, mode) can cost a byte at n = 100
            assert buf.size <= math.ceil(elias / 8) + (n < 300)
            # the header (counts, Elias-gamma) and the mask's Golomb redundancy
            distinct = np.unique(np.abs(levels)).size
            assert 8 * buf.size <= 1.045 * ideal + 64 + distinct * (2 * math.log2(n) + 1)
        if n >= 20_000:
            assert 8 * buf.size <= 1.03 * ideal + 8 * 64


@needs_constriction
@pytest.mark.parametrize("s", [1, 2, 7, 31, 4096, 4097, 2**31 - 1])
@pytest.mark.parametrize("n", [0, 1, 2, 9, 257])
def test_adversarial_levels(s, n):
    rng = np.random.default_rng(s + n)
    cases = [
        np.zeros(n, np.int64),
        np.full(n, s),
        np.full(n, -s),
        np.where(np.arange(n) % 2, s, -s),
        rng.integers(-s, s + 1, size=n),  # uniform: the fixed-width mode
        np.where(rng.random(n) < 0.1, rng.integers(-s, s + 1, size=n), 0),
        np.where(rng.random(n) < 0.5, s, 1) * rng.choice([-1, 1], size=n),  # gaps in 2..s-1
    ]
    for levels in cases:
        buf = check_levels(np.asarray(levels, dtype=np.int64), s)
        if not np.any(levels):
            assert buf.size == 0


@needs_constriction
def test_level_dtypes_and_int64_extremes():
    for s in (2**40, 2**63 - 1):
        check_levels(np.array([s, -s, 0, 1, -1, 12345678901], dtype=np.int64), s)
        check_levels(np.array([s, 0, 0, 0, 2, 3, 1, 1, 1, 1], dtype=np.int64), s)
    for bad in (2**63, -1, True, 2.0):
        with pytest.raises(ValueError):
            encode_levels(np.zeros(3, np.int64), bad)
    check_levels(np.array([1, 0, 255], dtype=np.uint8), 255)
    check_levels(np.array([-7, 0, 7], dtype=np.int8), 7)


# ------------------------------------------------------------------------ malformed buffers


def _mutants(buf: np.ndarray, rng: np.random.Generator):
    raw = buf.tobytes()
    yield raw[:-1]
    yield raw + b"\x00"
    yield raw + b"\xff"
    yield raw[1:]
    for i in range(len(raw)):
        for flip in (0x01, 0x80, 0xFF):
            yield raw[:i] + bytes([raw[i] ^ flip]) + raw[i + 1 :]
    for size in (1, 2, 3, 4, 5, 8, 16, len(raw), 2 * len(raw) + 1):
        yield rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()


def _refused_or_valid(decode, raw: bytes, size: int, valid) -> None:
    try:
        out = decode(np.frombuffer(raw, np.uint8))
    except ValueError:
        return
    assert out.shape == (size,) and out.dtype == np.int64 and valid(out)


@pytest.mark.parametrize("d, k", [(1000, 10), (1000, 400), (1000, 600), (64, 63), (5, 2)])
def test_malformed_position_buffers(d, k):
    rng = np.random.default_rng(d + k)
    buf = encode_positions(random_positions(d, k, seed=k), d)

    def valid(p):
        return (p.size == 0 or (p[0] >= 0 and p[-1] < d)) and np.all(np.diff(p) > 0)

    for raw in _mutants(buf, rng):
        _refused_or_valid(lambda b: decode_positions(b, d, k), raw, k, valid)
    for wrong in (k - 1, k + 1):
        _refused_or_valid(lambda b, w=wrong: decode_positions(b, d, w), buf.tobytes(), wrong, valid)


@needs_constriction
@pytest.mark.parametrize("s", [1, 7, 31, 2**20])
def test_malformed_level_buffers(s):
    rng = np.random.default_rng(s)
    n = 300
    for levels in (qsgd(rng.normal(size=n), s, rng, 10), rng.integers(-s, s + 1, size=n)):
        buf = encode_levels(levels, s)

        def valid(out, s=s):
            return bool(np.all(np.abs(out) <= s))

        for raw in _mutants(buf, rng):
            _refused_or_valid(lambda b, s=s: decode_levels(b, n, s), raw, n, valid)
        _refused_or_valid(lambda b, s=s: decode_levels(b, n - 1, s), buf.tobytes(), n - 1, valid)
        _refused_or_valid(lambda b, s=s: decode_levels(b, n, s + 1), buf.tobytes(), n, valid)


@needs_constriction
def test_garbage_never_crashes_or_hangs_the_interpreter():
    """Random buffers of every small length against both decoders, in a child process: a
    native crash (a Rust panic that aborts, a segfault) or a hang would fail here."""
    script = textwrap.dedent(
        """
        import numpy as np
        from fedsim.compression.coding import decode_levels, decode_positions
        rng = np.random.default_rng(7)
        for trial in range(3000):
            raw = rng.integers(0, 256, size=int(rng.integers(1, 40)), dtype=np.uint8)
            n = int(rng.integers(1, 5000))
            for call in (
                lambda: decode_levels(raw, n, int(rng.choice([1, 3, 31, 4096, 2**31 - 1]))),
                lambda: decode_positions(raw, n, int(rng.integers(0, n + 1))),
            ):
                try:
                    call()
                except ValueError:
                    pass
        print("survived")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0 and "survived" in done.stdout, done.stderr[-2000:]


def test_module_is_standalone():
    """No import of the rest of fedsim (nor of fedsim.compression's __init__): the coding
    modules import each other and the standard library, numpy and constriction only."""
    allowed = {"__future__", "math", "functools", "itertools", "operator", "numpy"}
    for path in Path(coding.__file__).parent.glob("coding*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        inside = {name for name in names if name.startswith("fedsim.compression.coding")}
        assert names - inside <= allowed | {"constriction"}, path.name


# ------------------------------------------------------------------------ bytes unchanged


def hashed(n: int, seed: int) -> np.ndarray:
    """Deterministic pseudo-random uint64s (splitmix64), independent of numpy's generators."""
    x = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def golden_positions(d: int, k: int, seed: int) -> np.ndarray:
    if d > 2**20:  # k distinct positions spread over [0, d)
        return np.unique((hashed(k, seed) >> np.uint64(2)) % np.uint64(d)).astype(np.int64)
    return np.sort(np.argsort(hashed(d, seed), kind="stable")[:k]).astype(np.int64)


def golden_levels(n: int, s: int, seed: int, density: int, geometric: bool) -> np.ndarray:
    """``density`` per mille non-zero; magnitudes geometric (P(m) = 2^-m) or uniform in [1, s]."""
    h = hashed(n, seed)
    low = (h >> np.uint64(12)) | np.uint64(1 << 51)
    if geometric:
        magnitude = np.log2((low & (~low + np.uint64(1))).astype(np.float64)).astype(np.int64) + 1
    else:
        magnitude = ((h >> np.uint64(12)) % np.uint64(min(s, 2**50))).astype(np.int64) + 1
    magnitude = np.minimum(magnitude, s)
    signed = np.where((h >> np.uint64(8)) & np.uint64(1), -magnitude, magnitude)
    return np.where(h % np.uint64(1000) < np.uint64(density), signed, 0)


#: SHA-256 of the coded bytes, computed with the coder before its small-input path existed
#: (the bytes are part of stored results: golden files)
POSITION_DIGESTS = [  # d, k, seed, digest
    (256, 3, 1, "dfbdce2df1d9c7f8772a0545319f78630d3457876b1f3dbd2854b2837a09afda"),
    (256, 26, 2, "5bbd2386421a27dd2c5bb5bb813acfd51ac94b221a59570389e23f6d9aa1d62e"),
    (256, 200, 3, "9db4b73e62124cc3b9ccd1103d0c31affb3650193ffe469e798ca35a293056e1"),
    (1024, 102, 4, "d4b95e32c9b14fb181fd92a2fe9b234d28f9847f56b7f7c0522a83680b184258"),
    (4096, 41, 5, "4ef37e961fbc94cdcf920fe267b691fd356584b4677661d6ab25a1c7688e9fb5"),
    (10, 1, 6, "9e076ceaf246b6003d9c2680a2b4cf0bffd069805902b0b5edeebf49039fe4bd"),
    (10**5, 300, 7, "dc708d31bcd91c48003fb5ca505ed374a6488f917121d25bbd7fc9087dfd0282"),
    (10**5, 1000, 8, "38b26e0a654692216f9543aab76aab3a1d968cd27fda410f7c08464ad5eea8d8"),
    (2**62, 60, 9, "7de09725293fdfcd2c3ef7bd6e8ba5a211369b84cdd99ea348744e0b84ce5c7b"),
    (10**6, 3, 10, "7878b0b966965f2ffb47247e7589107f111b4a587237ba488ca8dd2a655e9327"),
]
LEVEL_DIGESTS = [  # n, s, seed, density per mille, geometric magnitudes, digest
    (256, 7, 1, 300, True, "4312be65b8731d8c5190e04e1b08035a665bad863069d36055759f54f8874b47"),
    (256, 7, 2, 300, False, "6b54145e88f1d52c18bcd6da76be8ac3ee6818255354568ee41204eefba57e8f"),
    (256, 7, 3, 40, True, "7fa82dfd69a8d68617809811919157639ef458d19657697c57d53b7ad60d4506"),
    (10, 7, 4, 600, True, "3fe470d0d2a68c4a123f584ee57b877550f229b34d87a98b8b3a55720ff71265"),
    (1024, 7, 5, 150, True, "cab229efbfcb5063dff220b9533380c4647e6c5aa208daa8a052477413385f4f"),
    (1024, 1, 6, 500, True, "66f7b1747839171735af7c3687a96c34412d079653955173d352c1c8adb2359c"),
    (256, 255, 7, 900, True, "45d41920e6683f2de6222ae85f16055751d4a0e113752850de9b64dfee991389"),
    (256, 255, 8, 900, False, "36e8c20f1d50a6ebafb3b6ff840ba215053593d0cc6a10b45a3bcc29f65cc565"),
    (4096, 31, 9, 300, True, "3dd670d9c134b945cb41d0e29c8c884ae591f5efc92d8c849d7b91993b770560"),
    (300, 2**40, 10, 50, False, "c458c1b2676f45b20412ddf61a36644c33c9f3c1ac93ba76630d63195ade3b98"),
    (300, 2**40, 11, 50, True, "9cdd1d265e7572ed3e464d610435fb4fdb050bf2f59bdaed547d89d7e723a576"),
    (10**5, 7, 12, 20, True, "f1f42f34c472397172c4c1bfee44f18cdb1aee6897ab5cf2a3b92b6dec15e564"),
]


@pytest.mark.parametrize("d, k, seed, digest", POSITION_DIGESTS)
def test_position_bytes_unchanged(d, k, seed, digest):
    positions = golden_positions(d, k, seed)
    assert hashlib.sha256(check_positions(positions, d).tobytes()).hexdigest() == digest


@needs_constriction
@pytest.mark.parametrize("n, s, seed, density, geometric, digest", LEVEL_DIGESTS)
def test_level_bytes_unchanged(n, s, seed, density, geometric, digest):
    levels = golden_levels(n, s, seed, density, geometric)
    assert hashlib.sha256(check_levels(levels, s).tobytes()).hexdigest() == digest


def _outcomes(kind: str, x: np.ndarray, size: int) -> list:
    """The coded bytes, then the decode (or ValueError) of them and of mutants of them."""
    if kind == "positions":
        raw = encode_positions(x, size).tobytes()
        decode = functools.partial(decode_positions, d=size, k=x.size)
    else:
        raw = encode_levels(x, size).tobytes()
        decode = functools.partial(decode_levels, n=x.size, s=size)
    flips = [
        raw[:i] + bytes([raw[i] ^ flip]) + raw[i + 1 :]
        for i in range(0, len(raw), max(1, len(raw) // 6))
        for flip in (0x01, 0x80)
    ]
    out = [raw]
    for mutant in (raw, raw[:-1], raw + b"\x00", raw + b"\x01", *flips):
        try:
            decoded = decode(np.frombuffer(mutant, dtype=np.uint8))
            out.append((decoded.dtype.str, decoded.tobytes()))
        except ValueError:
            out.append("ValueError")
    return out


@needs_constriction
def test_small_and_numpy_paths_agree(monkeypatch):
    """Small inputs take coding_small/coding_levels (Python strings and ints); with the size
    limits at -1 everything takes the whole-array numpy path: the same bytes, the same
    decodes, the same refusals of malformed buffers."""
    rng = np.random.default_rng(2024)
    cases = []
    for d in (1, 2, 7, 64, 256, 1000, 5000, 2**62):
        for k in sorted({0, 1, 2, min(d, 47), min(d, 48), min(d, 300), d // 3, d - 1, d}):
            if k <= 5000:
                positions = np.unique(rng.integers(0, d, size=k, dtype=np.int64))
                cases.append(("positions", positions, d))
    for n in (1, 10, 256, 1024):
        for s in (1, 7, 255, 4097, 2**40):
            for density in (0.01, 0.3, 0.9):
                big = rng.integers(1, s, n, endpoint=True)
                magnitude = big if s == 2**40 else np.minimum(rng.geometric(0.4, n), s)
                levels = np.where(rng.random(n) < density, magnitude, 0)
                cases.append(("levels", levels * rng.choice([-1, 1], n), s))
    for kind, x, size in cases:
        small = _outcomes(kind, x, size)
        for name in ("SMALL_ENCODE", "SMALL_DECODE", "SMALL_LEVELS", "SMALL_BYTES"):
            monkeypatch.setattr(coding, name, -1)
        assert _outcomes(kind, x, size) == small, (kind, size, x.size)
        monkeypatch.undo()
