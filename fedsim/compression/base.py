"""The compressor base class, the identity, and the bit-level helpers payloads are made of."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedsim.errors import ConfigError

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
        other sizes is malformed: the decoder refuses it instead of truncating it); None for
        an entropy-coded byte buffer, whose length depends on the data (its decoder checks
        that it ends where its code does)."""
        raise NotImplementedError

    def raw_bytes(self, d: int, itemsize: int) -> int | None:
        """The bytes of a unit of ``d`` values in the fixed-width format fedsim sent before
        payloads were entropy-coded (``bytes_up_raw``); None: the same as what travels."""
        return None

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
