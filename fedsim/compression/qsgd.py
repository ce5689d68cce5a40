"""QSGD (Alistarh et al., 2017): stochastic quantisation to ``s`` levels per block."""

from __future__ import annotations

import math

import numpy as np

from fedsim.compression.base import Compressor, pack_uint, unpack_uint
from fedsim.validate import integer


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
