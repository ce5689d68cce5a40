"""QSGD (Alistarh et al., 2017): stochastic quantisation to ``s`` levels per block."""

from __future__ import annotations

import math

import numpy as np

from fedsim.compression.base import Compressor
from fedsim.compression.coding import decode_levels, encode_levels
from fedsim.validate import integer


class QSGD(Compressor):
    """QSGD (Alistarh et al., 2017): stochastic quantisation to ``s`` levels, one norm per block.

    Each entry becomes a sign and a level in ``0..s`` drawn so that
    ``E[norm * sign * level / s] = x``: unbiased, ``w = min(B/s^2, sqrt(B)/s)`` for blocks of
    ``B`` entries (``block: null``: the whole tensor). ``levels`` is the paper's ``s`` (null:
    ``2^(bits-1) - 1``, what ``bits`` bits with a sign bit hold). Payload: the signed levels
    entropy-coded (:func:`fedsim.compression.coding.encode_levels`: at or below the paper's
    Elias code) and one norm per block.
    """

    name = "qsgd"
    unbiased = True

    def __init__(
        self,
        bits: int = 4,
        block: int | None = None,
        scope: str = "tensor",
        levels: int | None = None,
    ) -> None:
        super().__init__(scope)
        self.bits = integer("compressor.bits", bits, 2, 32)
        self.block = None if block is None else integer("compressor.block", block, low=1)
        if levels is None:
            self.levels = 2 ** (self.bits - 1) - 1
        else:
            self.levels = integer("compressor.levels", levels, 1, 2**31 - 1)

    def _block(self, d: int) -> int:
        return d if self.block is None else min(self.block, d)

    def omega(self, d):
        b, s = self._block(d), self.levels
        return min(b / s**2, math.sqrt(b) / s)

    def part_sizes(self, d):
        return {"codes": None, "scales": math.ceil(d / self._block(d))}

    def raw_bytes(self, d, itemsize):
        """``1 + bits(s)`` bits per entry (a sign and the level), packed, and the norms."""
        bits = 1 + self.levels.bit_length()
        return math.ceil(d * bits / 8) + itemsize * math.ceil(d / self._block(d))

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
        signed = np.where(blocks.ravel()[:d] < 0, -level, level)
        return {"codes": encode_levels(signed, self.levels), "scales": norms}

    def decompress(self, payload, d, dtype, rng):
        b = self._block(d)
        signed = decode_levels(payload["codes"], d, self.levels).astype(np.float64)
        norms = np.repeat(np.asarray(payload["scales"], dtype=np.float64), b)[:d]
        return (norms * signed / self.levels).astype(dtype)
