"""Compressors of client updates (REFERENCE sections 3 and 4), and their exact payloads.

A compressor turns a 1-D vector into a payload of named arrays, exactly what travels: values at
their dtype's size, indices packed at ``ceil(log2 d)`` bits each, b-bit quantisation codes
(sign bit included) packed, one scale per tensor or block. Bytes are then counted from the
payload like any other array (packed arrays are ``uint8``: ``ceil(bits / 8)`` bytes each).
Each compressor declares whether it is **contractive** (``E||C(x) - x||^2 <= (1 - a)||x||^2``,
:meth:`Compressor.alpha`) or **unbiased** (``E C(x) = x``, ``E||C(x) - x||^2 <= w ||x||^2``,
:meth:`Compressor.omega`); error feedback needs a contractive one.

Randomness comes from a ``numpy.random.Generator`` the caller derives from the run's seed, the
round, the client and the tensor, so the server can regenerate what it needs (Rand-K's
indices with ``shared_seed``) at no cost. ``scope``: compress each tensor on its own
(``tensor``) or the concatenated update (``flat``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from fedsim.errors import ConfigError
from fedsim.validate import boolean, integer, number

SCOPES = ("tensor", "flat")
FLAT = "*"  # the unit name of a flattened update
DENSE = "dense"  # the payload part of an uncompressed unit


def _joint(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    """The arrays in float64 and their one L2 norm over all of them."""
    value = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
    return value, math.sqrt(sum(float(np.sum(v * v)) for v in value.values()))


def clip_joint(arrays: Mapping[str, np.ndarray], bound: float) -> dict[str, np.ndarray]:
    """``arrays * min(1, bound / ||arrays||)`` in float64, one L2 norm over all of them."""
    value, norm = _joint(arrays)
    return {k: v * (bound / norm) for k, v in value.items()} if norm > bound else value


def scale_to_norm(arrays: Mapping[str, np.ndarray], norm: float) -> dict[str, np.ndarray]:
    """``arrays`` rescaled to L2 norm ``norm`` jointly, in float64 (zero stays zero)."""
    value, total = _joint(arrays)
    return {k: v * (norm / total) for k, v in value.items()} if total > 0 else value


def index_bits(d: int) -> int:
    """Bits per index into a vector of length ``d``: ``ceil(log2 d)``."""
    return math.ceil(math.log2(d)) if d > 1 else 0


def pack_uint(values: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative integers, ``bits`` each, packed big-endian into ``uint8``."""
    values = np.asarray(values, dtype=np.uint64)
    if bits == 0 or values.size == 0:
        return np.zeros(0, dtype=np.uint8)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    return np.packbits(((values[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).ravel())


def unpack_uint(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_uint`."""
    if bits == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    needed = math.ceil(count * bits / 8)
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.size != needed:
        raise ValueError(f"packed array has {packed.size} bytes, expected {needed}")
    flat = np.unpackbits(packed)[: count * bits].reshape(count, bits).astype(np.int64)
    return flat @ (np.int64(1) << np.arange(bits - 1, -1, -1, dtype=np.int64))


class Compressor:
    """Base class (built from ``conf/compressor/*.yaml``).

    Subclasses implement :meth:`compress` and :meth:`decompress` on 1-D vectors and set
    ``contractive`` / ``unbiased`` / ``norm_non_increasing``.
    """

    name = "compressor"
    contractive = False
    unbiased = False
    #: ``||C(x)|| <= ||x||`` always (what central DP needs of a compressed, clipped message)
    norm_non_increasing = False

    def __init__(self, scope: str = "tensor") -> None:
        if scope not in SCOPES:
            raise ConfigError("compressor.scope", scope, "must be tensor or flat")
        self.scope = scope

    @property
    def active(self) -> bool:
        return True

    def alpha(self, d: int) -> float | None:
        """Contraction parameter ``a`` for length ``d`` (None: not contractive)."""
        return None

    def omega(self, d: int) -> float | None:
        """Variance parameter ``w`` for length ``d`` (None: not unbiased)."""
        return None

    def parts(self) -> set[str]:
        """The names of the arrays a payload of one unit holds."""
        return set(self.part_sizes(1))

    def part_sizes(self, d: int) -> dict[str, int]:
        """How many values each payload array holds for a unit of ``d`` values (a payload of
        other sizes is malformed: the decoder refuses it instead of truncating it)."""
        raise NotImplementedError

    def compress(self, x: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decompress(
        self, payload: Mapping[str, np.ndarray], d: int, dtype: np.dtype, rng: np.random.Generator
    ) -> np.ndarray:
        raise NotImplementedError

    def apply(self, x: np.ndarray, seed: int) -> np.ndarray:
        """``C(x)`` as the receiver reconstructs it (both sides' generators from ``seed``)."""
        payload = self.compress(x, np.random.default_rng(seed))
        return self.decompress(payload, x.size, x.dtype, np.random.default_rng(seed))


class NoCompression(Compressor):
    """The identity: the update travels dense (``compressor=none``)."""

    name = "none"
    contractive = unbiased = norm_non_increasing = True

    @property
    def active(self) -> bool:
        return False

    def alpha(self, d: int) -> float:
        return 1.0

    def omega(self, d: int) -> float:
        return 0.0

    def part_sizes(self, d):
        return {DENSE: d}

    def compress(self, x, rng):
        return {DENSE: np.array(x)}

    def decompress(self, payload, d, dtype, rng):
        return np.asarray(payload[DENSE], dtype=dtype).reshape(d)


class _Sparse(Compressor):
    """Keeps ``K`` of ``d`` entries: ``k`` of them, or ``max(1, round(ratio * d))``."""

    def __init__(self, ratio: float | None = None, k: int | None = None, scope: str = "tensor"):
        super().__init__(scope)
        if (ratio is None) == (k is None):
            raise ConfigError(
                "compressor.ratio",
                ratio,
                "give exactly one of compressor.ratio and compressor.k (set the other to null)",
            )
        self.ratio = (
            None if ratio is None else number("compressor.ratio", ratio, 0, 1, low_open=True)
        )
        self.k = None if k is None else integer("compressor.k", k, low=1)

    def count(self, d: int) -> int:
        if self.k is not None:
            return min(self.k, d)
        return min(d, max(1, round(self.ratio * d)))


def top_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``|x|``, ties broken by the lower index; sorted."""
    order = np.argsort(-np.abs(x), kind="stable")[:k]
    return np.sort(order)


class TopK(_Sparse):
    """Top-K: the K largest magnitudes with their indices. Contractive, ``a = K/d``."""

    name = "topk"
    contractive = norm_non_increasing = True

    def alpha(self, d: int) -> float:
        return self.count(d) / d

    def part_sizes(self, d):
        k = self.count(d)
        return {"values": k, "indices": math.ceil(k * index_bits(d) / 8)}

    def compress(self, x, rng):
        idx = top_indices(x, self.count(x.size))
        return {"values": x[idx], "indices": pack_uint(idx, index_bits(x.size))}

    def decompress(self, payload, d, dtype, rng):
        k = self.count(d)
        out = np.zeros(d, dtype=dtype)
        out[unpack_uint(payload["indices"], index_bits(d), k)] = payload["values"]
        return out


class RandK(_Sparse):
    """Rand-K: K entries chosen uniformly at random.

    ``scaled``: values multiplied by ``d/K`` (unbiased, ``w = d/K - 1``); otherwise contractive
    with ``a = K/d``. ``shared_seed``: the server regenerates the indices from the seed both
    sides know (they cost nothing); otherwise they are sent.
    """

    name = "randk"

    def __init__(
        self,
        ratio: float | None = None,
        k: int | None = None,
        scaled: bool = True,
        shared_seed: bool = True,
        scope: str = "tensor",
    ) -> None:
        super().__init__(ratio, k, scope)
        self.scaled = boolean("compressor.scaled", scaled)
        self.shared_seed = boolean("compressor.shared_seed", shared_seed)
        self.contractive = self.norm_non_increasing = not self.scaled
        self.unbiased = self.scaled

    def alpha(self, d):
        return None if self.scaled else self.count(d) / d

    def omega(self, d):
        return d / self.count(d) - 1.0 if self.scaled else None

    def part_sizes(self, d):
        k = self.count(d)
        if self.shared_seed:
            return {"values": k}
        return {"values": k, "indices": math.ceil(k * index_bits(d) / 8)}

    def _indices(self, d: int, rng: np.random.Generator) -> np.ndarray:
        return np.sort(rng.choice(d, size=self.count(d), replace=False))

    def compress(self, x, rng):
        idx = self._indices(x.size, rng)  # the generator's first draw: the server repeats it
        values = x[idx] * (x.size / idx.size) if self.scaled else x[idx]
        out = {"values": values.astype(x.dtype)}
        if not self.shared_seed:
            out["indices"] = pack_uint(idx, index_bits(x.size))
        return out

    def decompress(self, payload, d, dtype, rng):
        k = self.count(d)
        if self.shared_seed:
            idx = self._indices(d, rng)
        else:
            idx = unpack_uint(payload["indices"], index_bits(d), k)
        out = np.zeros(d, dtype=dtype)
        out[idx] = payload["values"]
        return out


class QSGD(Compressor):
    """QSGD (Alistarh et al., 2017): b-bit stochastic quantisation with one norm per block.

    Each entry becomes a sign bit and a level in ``0..s`` (``s = 2^(b-1) - 1``) drawn so that
    ``E[norm * sign * level / s] = x``: unbiased, ``w = min(B/s^2, sqrt(B)/s)`` for blocks of
    ``B`` entries (``block: null``: the whole tensor). Payload: ``b`` bits per entry, packed, and
    one norm per block.
    """

    name = "qsgd"
    unbiased = True

    def __init__(self, bits: int = 4, block: int | None = None, scope: str = "tensor") -> None:
        super().__init__(scope)
        self.bits = integer("compressor.bits", bits, 2, 32)
        self.block = None if block is None else integer("compressor.block", block, low=1)
        self.levels = 2 ** (self.bits - 1) - 1

    def _block(self, d: int) -> int:
        return d if self.block is None else min(self.block, d)

    def omega(self, d):
        b, s = self._block(d), self.levels
        return min(b / s**2, math.sqrt(b) / s)

    def part_sizes(self, d):
        return {"codes": math.ceil(d * self.bits / 8), "scales": math.ceil(d / self._block(d))}

    def compress(self, x, rng):
        d, b = x.size, self._block(x.size)
        pad = (-d) % b
        blocks = np.concatenate([x.astype(np.float64), np.zeros(pad)]).reshape(-1, b)
        norms = np.linalg.norm(blocks, axis=1).astype(x.dtype)
        scale = np.where(norms > 0, norms.astype(np.float64), 1.0)[:, None]
        r = np.abs(blocks) / scale * self.levels
        low = np.floor(r)
        level = low + (rng.random(r.shape) < (r - low))
        level = np.minimum(level, self.levels).ravel()[:d].astype(np.int64)
        sign = (blocks.ravel()[:d] < 0).astype(np.int64)
        codes = (sign << (self.bits - 1)) | level
        return {"codes": pack_uint(codes, self.bits), "scales": norms}

    def decompress(self, payload, d, dtype, rng):
        b = self._block(d)
        codes = unpack_uint(payload["codes"], self.bits, d)
        sign = np.where(codes >> (self.bits - 1), -1.0, 1.0)
        level = codes & ((1 << (self.bits - 1)) - 1)
        norms = np.repeat(np.asarray(payload["scales"], dtype=np.float64), b)[:d]
        return (sign * norms * level / self.levels).astype(dtype)


class ComPEFT(_Sparse):
    """ComPEFT (Yadav et al., 2023): the top-K magnitudes sent as ``sign * alpha * std(x)``.

    Payload: packed indices, one sign bit per kept entry, one scale per tensor. Neither
    contractive nor unbiased: no error-feedback guarantee covers it.
    """

    name = "compeft"

    def __init__(
        self,
        ratio: float | None = None,
        k: int | None = None,
        alpha: float = 1.0,
        scope: str = "tensor",
    ) -> None:
        super().__init__(ratio, k, scope)
        self.alpha_scale = number("compressor.alpha", alpha, low=0, low_open=True)

    def part_sizes(self, d):
        k = self.count(d)
        return {
            "indices": math.ceil(k * index_bits(d) / 8),
            "signs": math.ceil(k / 8),
            "scales": 1,
        }

    def compress(self, x, rng):
        idx = top_indices(x, self.count(x.size))
        scale = np.array([self.alpha_scale * np.std(x.astype(np.float64))], dtype=x.dtype)
        return {
            "indices": pack_uint(idx, index_bits(x.size)),
            "signs": np.packbits((x[idx] < 0).astype(np.uint8)),
            "scales": scale,
        }

    def decompress(self, payload, d, dtype, rng):
        k = self.count(d)
        idx = unpack_uint(payload["indices"], index_bits(d), k)
        negative = np.unpackbits(np.asarray(payload["signs"], dtype=np.uint8))[:k]
        out = np.zeros(d, dtype=np.float64)
        out[idx] = np.where(negative, -1.0, 1.0) * float(payload["scales"][0])
        return out.astype(dtype)


# ----------------------------------------------------------------------------- whole updates

RngFor = Callable[[int], np.random.Generator]


def units(compressor: Compressor, names: list[str]) -> list[tuple[str, list[str]]]:
    """The compression units: each tensor, or all of them concatenated (sorted by name)."""
    ordered = sorted(names)
    if compressor.scope == "flat":
        return [(FLAT, ordered)]
    return [(name, [name]) for name in ordered]


def compress_arrays(
    compressor: Compressor,
    arrays: Mapping[str, np.ndarray],
    rng_for: RngFor,
    dtype: np.dtype,
    dense: bool = False,
) -> dict[str, np.ndarray]:
    """The payload of an update: ``<unit>/<part>`` arrays; values in ``dtype``.

    ``dense``: send the update uncompressed (``<unit>/dense``), e.g. a first EF21 message.
    """
    out = {}
    for index, (unit, names) in enumerate(units(compressor, list(arrays))):
        x = np.concatenate([np.asarray(arrays[n]).ravel() for n in names]).astype(dtype)
        parts = {DENSE: x} if dense else compressor.compress(x, rng_for(index))
        for part, value in parts.items():
            out[f"{unit}/{part}"] = value
    return out


def decompress_arrays(
    compressor: Compressor,
    payload: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    rng_for: RngFor,
    dtype: np.dtype,
) -> dict[str, np.ndarray]:
    """The dense update (float64, by name) that a payload stands for; ValueError if malformed."""
    out: dict[str, np.ndarray] = {}
    expected = set()
    for index, (unit, names) in enumerate(units(compressor, list(shapes))):
        parts = {k[len(unit) + 1 :]: v for k, v in payload.items() if k.rsplit("/", 1)[0] == unit}
        expected.update(f"{unit}/{p}" for p in parts)
        sizes = [math.prod(shapes[n]) for n in names]
        d = sum(sizes)
        if set(parts) == {DENSE}:
            x = np.asarray(parts[DENSE], dtype=np.float64)
            if x.size != d:
                raise ValueError(f"{unit}: dense part has {x.size} values, expected {d}")
        elif set(parts) != compressor.parts():
            raise ValueError(
                f"{unit}: payload parts {sorted(parts)}, expected {sorted(compressor.parts())}"
            )
        else:
            for part, size in compressor.part_sizes(d).items():
                got = np.shape(parts[part])
                if got != (size,):
                    raise ValueError(f"{unit}/{part} has shape {got}, expected ({size},)")
            x = compressor.decompress(parts, d, dtype, rng_for(index)).astype(np.float64)
        for name, piece in zip(names, np.split(x, np.cumsum(sizes)[:-1])):
            out[name] = piece.reshape(shapes[name])
    extra = set(payload) - expected
    if extra:
        raise ValueError(f"unexpected payload arrays {sorted(extra)[:3]}")
    return out
