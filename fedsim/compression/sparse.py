"""Sparsifiers: Top-K, Rand-K, and ComPEFT (Top-K signs with one scale).

The kept positions travel Golomb-coded (:func:`fedsim.compression.coding.encode_positions`:
within about 1% of ``log2 C(d, K)`` bits), the values in their dtype, in position order."""

from __future__ import annotations

import math

import numpy as np

from fedsim.compression.base import Compressor, index_bits
from fedsim.compression.coding import decode_positions, encode_positions
from fedsim.errors import ConfigError
from fedsim.validate import boolean, integer, number


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

    def raw_bytes(self, d: int, itemsize: int) -> int | None:
        """Values at ``itemsize`` and ``ceil(log2 d)``-bit packed positions."""
        k = self.count(d)
        return itemsize * k + math.ceil(k * index_bits(d) / 8)

    def count(self, d: int) -> int:
        if self.k is not None:
            return min(self.k, d)
        return min(d, max(1, round(self.ratio * d)))


def top_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``|x|``, ties broken by the lower index; sorted."""
    order = np.argsort(-np.abs(x), kind="stable")[:k]
    return np.sort(order)


class TopK(_Sparse):
    """Top-K: the K largest magnitudes with their coded positions. Contractive, ``a = K/d``."""

    name = "topk"
    contractive = norm_non_increasing = True

    def alpha(self, d: int) -> float:
        return self.count(d) / d

    def part_sizes(self, d):
        return {"values": self.count(d), "indices": None}

    def compress(self, x, rng):
        idx = top_indices(x, self.count(x.size))
        return {"values": x[idx], "indices": encode_positions(idx, x.size)}

    def decompress(self, payload, d, dtype, rng):
        out = np.zeros(d, dtype=dtype)
        out[decode_positions(payload["indices"], d, self.count(d))] = payload["values"]
        return out


class RandK(_Sparse):
    """Rand-K: K entries chosen uniformly at random.

    ``scaled``: values multiplied by ``d/K`` (unbiased, ``w = d/K - 1``); otherwise contractive
    with ``a = K/d``. ``shared_seed``: the server regenerates the indices from the seed both
    sides know (they cost nothing); otherwise they are sent.
    """

    name = "randk"
    #: the setting under which it is contractive and norm-non-increasing (hints name it)
    contractive_when = "scaled=false"

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
        return {"values": k, "indices": None}

    def raw_bytes(self, d, itemsize):
        if self.shared_seed:
            return None
        return super().raw_bytes(d, itemsize)

    def _indices(self, d: int, rng: np.random.Generator) -> np.ndarray:
        return np.sort(rng.choice(d, size=self.count(d), replace=False))

    def compress(self, x, rng):
        idx = self._indices(x.size, rng)  # the generator's first draw: the server repeats it
        values = x[idx] * (x.size / idx.size) if self.scaled else x[idx]
        out = {"values": values.astype(x.dtype)}
        if not self.shared_seed:
            out["indices"] = encode_positions(idx, x.size)
        return out

    def decompress(self, payload, d, dtype, rng):
        k = self.count(d)
        if self.shared_seed:
            idx = self._indices(d, rng)
        else:
            idx = decode_positions(payload["indices"], d, k)
        out = np.zeros(d, dtype=dtype)
        out[idx] = payload["values"]
        return out


class ComPEFT(_Sparse):
    """ComPEFT (Yadav et al., 2023): the top-K magnitudes sent as ``sign * alpha * std(x)``.

    Payload: coded positions, one sign bit per kept entry, one scale per tensor. Neither
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
        return {"indices": None, "signs": math.ceil(k / 8), "scales": 1}

    def raw_bytes(self, d, itemsize):
        k = self.count(d)
        return math.ceil(k * index_bits(d) / 8) + math.ceil(k / 8) + itemsize

    def compress(self, x, rng):
        idx = top_indices(x, self.count(x.size))
        scale = np.array([self.alpha_scale * np.std(x.astype(np.float64))], dtype=x.dtype)
        return {
            "indices": encode_positions(idx, x.size),
            "signs": np.packbits((x[idx] < 0).astype(np.uint8)),
            "scales": scale,
        }

    def decompress(self, payload, d, dtype, rng):
        k = self.count(d)
        idx = decode_positions(payload["indices"], d, k)
        negative = np.unpackbits(np.asarray(payload["signs"], dtype=np.uint8))[:k]
        out = np.zeros(d, dtype=np.float64)
        out[idx] = np.where(negative, -1.0, 1.0) * float(payload["scales"][0])
        return out.astype(dtype)
