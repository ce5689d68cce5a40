"""Compressors: exact payload sizes, packing, and their statistical contracts (fixed seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.compression import (
    QSGD,
    Cast,
    ComPEFT,
    NoCompression,
    RandK,
    TopK,
    compress_arrays,
    decompress_arrays,
    index_bits,
    pack_uint,
    unpack_uint,
)

D = 1000
X = np.random.default_rng(0).normal(size=D)


def nbytes(payload: dict) -> int:
    return sum(v.nbytes for v in payload.values())


@pytest.mark.parametrize("bits", [1, 3, 7, 8, 10, 17])
def test_packing_round_trips_at_exactly_the_bits_asked(bits):
    values = np.random.default_rng(bits).integers(0, 2**bits, size=101)
    packed = pack_uint(values, bits)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(101 * bits / 8)
    np.testing.assert_array_equal(unpack_uint(packed, bits, 101), values)


def test_index_bits():
    assert [index_bits(d) for d in (1, 2, 3, 4, 5, 1000, 1024, 1025)] == [0, 1, 2, 2, 3, 10, 10, 11]


def log2_binomial(d: int, k: int) -> float:
    return (math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1)) / math.log(2)


@pytest.mark.parametrize(
    "compressor, fixed_bytes, kept",
    [
        (TopK(ratio=0.1), 4 * 100, 100),  # values + coded positions of 100 of 1000
        (TopK(k=7), 4 * 7, 7),
        (RandK(ratio=0.1), 4 * 100, 0),  # positions from the shared seed cost nothing
        (RandK(ratio=0.1, shared_seed=False), 4 * 100, 100),
        (ComPEFT(ratio=0.1), math.ceil(100 / 8) + 4, 100),  # signs + a scale + positions
        (NoCompression(), 4 * D, 0),
        (Cast("bfloat16"), 2 * D, 0),
        (Cast("float16"), 2 * D, 0),
    ],
    ids=["topk", "topk-k", "randk-seed", "randk-sent", "compeft", "none", "bf16", "fp16"],
)
def test_payload_is_the_compressed_form_with_positions_at_their_information(
    compressor, fixed_bytes, kept
):
    """What travels: the fixed parts at their size, and the kept positions in between
    log2 C(d, K) bits and 5% (+ 2 bytes) more."""
    x = X.astype(np.float32)
    payload = compressor.compress(x, np.random.default_rng(1))
    coded = nbytes(payload) - fixed_bytes
    ideal = log2_binomial(D, kept) / 8
    assert ideal <= coded <= 1.05 * ideal + 2
    back = compressor.decompress(payload, D, x.dtype, np.random.default_rng(1))
    assert back.shape == (D,) and back.dtype == np.float32


@pytest.mark.parametrize("levels", [1, 4, 7, 16])
def test_qsgd_levels_are_coded_below_fixed_width_and_decode_exactly(levels):
    """Any number of levels (the paper's s); the signed levels travel coded, far below the
    fixed width (1 + bits for s) on a Gaussian vector, and decode to sign * norm * level / s."""
    q = QSGD(levels=levels)
    x = X.astype(np.float32)
    payload = q.compress(x, np.random.default_rng(2))
    fixed = math.ceil(D * (1 + levels.bit_length()) / 8)
    assert payload["codes"].dtype == np.uint8 and payload["codes"].nbytes < 0.5 * fixed
    back = q.decompress(payload, D, np.float64, None)
    norm = float(payload["scales"][0])
    level = back * levels / norm
    np.testing.assert_allclose(level, np.round(level), atol=1e-9)
    assert np.abs(np.round(level)).max() <= levels and np.all(np.sign(back) * np.sign(x) >= 0)
    assert q.omega(D) == pytest.approx(min(D / levels**2, math.sqrt(D) / levels))
    assert QSGD(bits=4).levels == 7


def test_topk_keeps_the_largest_with_lower_index_tie_break():
    c = TopK(k=2)
    x = np.array([1.0, -3.0, 3.0, 2.0])
    np.testing.assert_array_equal(c.apply(x, 0), [0, -3, 3, 0])
    np.testing.assert_array_equal(TopK(k=1).apply(np.array([2.0, 2.0, 2.0]), 0), [2, 0, 0])


@pytest.mark.parametrize("compressor", [TopK(ratio=0.05), TopK(k=1), TopK(ratio=0.5)])
def test_topk_is_contractive_on_every_vector(compressor):
    rng = np.random.default_rng(3)
    for _ in range(200):
        x = rng.standard_cauchy(size=64)
        err = np.sum((compressor.apply(x, 0) - x) ** 2)
        assert err <= (1 - compressor.alpha(64)) * np.sum(x**2) + 1e-12


def _moments(compressor, x, draws=4000):
    out = np.array([compressor.apply(x, seed) for seed in range(draws)])
    mean = out.mean(axis=0)
    mse = np.mean(np.sum((out - x) ** 2, axis=1))
    return mean, mse, out


@pytest.mark.parametrize(
    "compressor",
    [RandK(ratio=0.2), QSGD(bits=3), QSGD(bits=2, block=8)],
    ids=["randk-0.2", "qsgd-3bits", "qsgd-2bits-block8"],
)
def test_unbiased_compressors_are_unbiased_with_their_variance_bound(compressor):
    x = np.random.default_rng(5).normal(size=40)
    mean, mse, out = _moments(compressor, x)
    sem = out.std(axis=0) / math.sqrt(len(out))
    assert np.all(np.abs(mean - x) <= 5 * sem + 1e-12)  # E C(x) = x, within 5 standard errors
    assert mse <= compressor.omega(40) * np.sum(x**2) * 1.05
    if isinstance(compressor, RandK):  # for scaled Rand-K the bound is an equality
        assert mse == pytest.approx(compressor.omega(40) * np.sum(x**2), rel=0.05)


def test_unscaled_randk_contracts_in_expectation_and_is_biased():
    c = RandK(ratio=0.25, scaled=False)
    x = np.random.default_rng(6).normal(size=40)
    mean, mse, _ = _moments(c, x)
    assert c.contractive and not c.unbiased
    assert mse == pytest.approx((1 - c.alpha(40)) * np.sum(x**2), rel=0.05)
    np.testing.assert_allclose(mean, 0.25 * x, atol=0.06)  # keeps each entry w.p. K/d


def test_compeft_sends_signs_times_alpha_std():
    x = np.array([0.1, -5.0, 0.2, 4.0, -0.3])
    got = ComPEFT(k=2, alpha=2.0).apply(x, 0)
    s = 2.0 * np.std(x)
    np.testing.assert_allclose(got, [0, -s, 0, s, 0])
    c = ComPEFT(ratio=0.1)
    assert not c.contractive and not c.unbiased


def test_declared_properties():
    assert TopK(ratio=0.1).contractive and TopK(ratio=0.1).alpha(1000) == 0.1
    assert RandK(ratio=0.1).unbiased and RandK(ratio=0.1).omega(1000) == pytest.approx(9.0)
    assert RandK(ratio=0.1, scaled=False).alpha(1000) == 0.1
    assert QSGD(bits=4).omega(100) == pytest.approx(min(100 / 49, 10 / 7))


def test_tensor_and_flat_scopes():
    arrays = {"b": np.arange(1, 11, dtype=np.float32), "a": -np.arange(1, 6, dtype=np.float32)}
    shapes = {k: v.shape for k, v in arrays.items()}

    def rng(i):
        return np.random.default_rng(i)

    per = compress_arrays(TopK(k=1), arrays, rng, np.float32)
    assert sorted(per) == ["a/indices", "a/values", "b/indices", "b/values"]
    back = decompress_arrays(TopK(k=1), per, shapes, rng, np.float32)
    assert back["a"].tolist() == [0, 0, 0, 0, -5] and back["b"][-1] == 10
    flat = TopK(k=2, scope="flat")
    payload = compress_arrays(flat, arrays, rng, np.float32)
    assert sorted(payload) == ["*/indices", "*/values"]
    back = decompress_arrays(flat, payload, shapes, rng, np.float32)
    assert back["b"][-2:].tolist() == [9, 10] and not back["a"].any()  # one K over all values


def test_malformed_payloads_are_refused():
    shapes = {"w": (10,)}

    def rng(i):
        return np.random.default_rng(i)

    good = compress_arrays(TopK(k=2), {"w": np.arange(10.0)}, rng, np.float32)
    for bad in (
        {},
        {**good, "w/extra": np.zeros(1)},
        {"w/values": good["w/values"], "w/indices": good["w/indices"][:0]},
        {"w/dense": np.zeros(3)},
    ):
        with pytest.raises((ValueError, KeyError)):
            decompress_arrays(TopK(k=2), bad, shapes, rng, np.float32)


@pytest.mark.parametrize(
    "compressor",
    [
        NoCompression(),
        TopK(ratio=0.1),
        RandK(ratio=0.2, scaled=False),
        RandK(ratio=0.2, shared_seed=False),
        QSGD(bits=3, block=7),
        QSGD(bits=8),
        ComPEFT(ratio=0.15),
        Cast("bfloat16"),
        Cast("float16"),
    ],
    ids=[
        "none",
        "topk",
        "randk",
        "randk-indices",
        "qsgd-blocks",
        "qsgd",
        "compeft",
        "bf16",
        "fp16",
    ],
)
def test_payload_sizes_are_what_the_decoder_expects_and_others_are_refused(compressor):
    for d in (1, 9, 64, 1001):
        x = np.random.default_rng(d).standard_normal(d).astype(np.float32)
        payload = compressor.compress(x, np.random.default_rng(0))
        sizes = compressor.part_sizes(d)
        assert set(payload) == set(sizes)
        for k, n in sizes.items():  # None: a coded byte buffer, its length the data's
            if n is None:
                assert payload[k].dtype == np.uint8 and payload[k].ndim == 1
            else:
                assert payload[k].shape == (n,)
    arrays = {"w": np.random.default_rng(1).standard_normal((8, 9)).astype(np.float32)}
    rng_for = lambda unit: np.random.default_rng([3, unit])  # noqa: E731
    payload = compress_arrays(compressor, arrays, rng_for, np.float32)
    shapes = {"w": (8, 9)}
    decompress_arrays(compressor, payload, shapes, rng_for, np.float32)
    for name, value in payload.items():  # one value too many, in any part: refused
        longer = {**payload, name: np.concatenate([value, value[:1]])}
        with pytest.raises(ValueError, match="has shape|values, expected|trailing bytes"):
            decompress_arrays(compressor, longer, shapes, rng_for, np.float32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cast_rounds_as_torch_does_and_contracts_by_its_unit_roundoff(dtype):
    import torch

    rng = np.random.default_rng(3)
    # every binade of float16's normal range, ties, zeros and signs
    x = (rng.normal(size=5000) * 10.0 ** rng.uniform(-4, 4, size=5000)).astype(np.float32)
    x[:4] = [0.0, -0.0, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8]  # bfloat16 ties: to even
    c = Cast(dtype)
    back = c.decompress(c.compress(x, None), x.size, np.float32, None)
    want = torch.from_numpy(x).to(getattr(torch, dtype)).to(torch.float32).numpy()
    np.testing.assert_array_equal(back, want)
    u = 2.0**-8 if dtype == "bfloat16" else 2.0**-11
    normal = np.abs(x) >= (np.finfo(np.float16).tiny if dtype == "float16" else 0)
    err = np.abs(back[normal].astype(np.float64) - x[normal])
    assert np.all(err <= u * np.abs(x[normal]) * (1 + 1e-12))
    assert c.alpha(x.size) == 1 - u**2


def test_cast_saturates_float16_and_keeps_bfloat16_range_and_nan():
    big = np.array([1e6, -1e6, 3e38, np.nan], dtype=np.float32)
    half = Cast("float16")
    back = half.decompress(half.compress(big[:2], None), 2, np.float32, None)
    np.testing.assert_array_equal(back, [65504.0, -65504.0])
    bf = Cast("bfloat16")
    back = bf.decompress(bf.compress(big, None), 4, np.float32, None)
    assert back[2] == pytest.approx(3e38, rel=2**-8) and np.isnan(back[3])
    with pytest.raises(ValueError, match="arrive as uint16"):
        bf.decompress({"half": np.zeros(4, np.float16)}, 4, np.float32, None)


@pytest.mark.parametrize(
    "compressor, raw",
    [
        (TopK(ratio=0.1), lambda d, k: 4 * k + math.ceil(k * math.ceil(math.log2(d)) / 8)),
        (RandK(ratio=0.1, shared_seed=False), lambda d, k: 4 * k + math.ceil(k * 10 / 8)),
        (ComPEFT(ratio=0.1), lambda d, k: math.ceil(k * 10 / 8) + math.ceil(k / 8) + 4),
        (QSGD(bits=4), lambda d, k: math.ceil(d * 4 / 8) + 4),
        (RandK(ratio=0.1), lambda d, k: 4 * k),
        (Cast("bfloat16"), lambda d, k: 2 * d),
    ],
    ids=["topk", "randk-indices", "compeft", "qsgd", "randk-seed", "bf16"],
)
def test_raw_extra_is_what_the_fixed_width_format_would_add(compressor, raw):
    """bytes_up_raw: the coded payload plus raw_extra is the old fixed-width size, by hand
    (values at 4 bytes, positions at ceil(log2 d) = 10 bits for d = 1000)."""
    from fedsim.compression import raw_extra

    arrays = {"w": X.astype(np.float32)}
    payload = compress_arrays(compressor, arrays, lambda u: np.random.default_rng(u), np.float32)
    assert nbytes(payload) + raw_extra(compressor, payload, arrays) == raw(D, 100)
