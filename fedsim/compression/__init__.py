"""Compressors of client updates, and their exact payloads (config groups ``compressor`` and
``downlink``).

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

from fedsim.compression.arrays import compress_arrays, decompress_arrays, raw_extra, units
from fedsim.compression.base import (
    DENSE,
    FLAT,
    SCOPES,
    Compressor,
    NoCompression,
    clip_joint,
    index_bits,
    pack_uint,
    scale_to_norm,
    unpack_uint,
)
from fedsim.compression.cast import Cast
from fedsim.compression.qsgd import QSGD
from fedsim.compression.sparse import ComPEFT, RandK, TopK, top_indices

__all__ = [
    "DENSE",
    "Cast",
    "FLAT",
    "QSGD",
    "SCOPES",
    "ComPEFT",
    "Compressor",
    "NoCompression",
    "RandK",
    "TopK",
    "clip_joint",
    "compress_arrays",
    "decompress_arrays",
    "index_bits",
    "pack_uint",
    "raw_extra",
    "scale_to_norm",
    "top_indices",
    "unpack_uint",
    "units",
]
