"""16-bit transport: every value rounded to ``float16`` or ``bfloat16`` (``compressor=cast``).

Deployed federated systems send updates in 16 bits (half the bytes of float32) with error
feedback catching the rounding. Round to nearest, ties to even; ``u`` is the format's unit
roundoff (half its relative spacing): ``bfloat16`` keeps float32's 8 exponent bits and 8
significant bits (``u = 2^-8``), ``float16`` 5 exponent bits and 11 significant bits
(``u = 2^-11``). For every value in the format's normal range ``|C(x)_j - x_j| <= u |x_j|``, so
``||C(x) - x||^2 <= u^2 ||x||^2``: contractive with ``a = 1 - u^2``. ``float16``'s range is
narrow: values beyond its largest finite number (65504) are saturated to it, and values below
its smallest normal (6.1e-5) keep only an absolute accuracy of 2^-25 (its subnormal spacing /
2), where the bound does not hold; ``bfloat16`` has float32's range. Payload: ``d`` 16-bit
values (``bfloat16`` as its bit pattern, ``uint16``: numpy has no bfloat16 type).
"""

from __future__ import annotations

import numpy as np

from fedsim.compression.base import Compressor
from fedsim.errors import ConfigError

HALF = "half"
#: unit roundoff of each 16-bit format
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
FLOAT16_MAX = float(np.finfo(np.float16).max)


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """The bfloat16 nearest each value (ties to even), as its 16-bit pattern."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    out[nan] = 0x7FC0  # a NaN stays a NaN (rounding its payload could make it an infinity)
    return out


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


class Cast(Compressor):
    """Every value rounded to a 16-bit float (see the module docstring)."""

    name = "cast"
    contractive = True

    def __init__(self, dtype: str = "bfloat16", scope: str = "tensor") -> None:
        super().__init__(scope)
        if dtype not in UNIT_ROUNDOFF:
            raise ConfigError("compressor.dtype", dtype, "must be float16 or bfloat16")
        self.dtype = dtype

    def alpha(self, d: int) -> float:
        return 1.0 - UNIT_ROUNDOFF[self.dtype] ** 2

    def part_sizes(self, d):
        return {HALF: d}

    def compress(self, x, rng):
        if self.dtype == "float16":
            return {HALF: np.clip(x, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)}
        return {HALF: to_bfloat16_bits(x)}

    def decompress(self, payload, d, dtype, rng):
        half = np.asarray(payload[HALF])
        want = np.float16 if self.dtype == "float16" else np.uint16
        if half.dtype != want:
            raise ValueError(f"{self.dtype} values arrive as {np.dtype(want)}, got {half.dtype}")
        values = half if self.dtype == "float16" else from_bfloat16_bits(half)
        return values.astype(dtype).reshape(d)
