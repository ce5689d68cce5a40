"""Compressing a whole update (named arrays) unit by unit, and reading a payload back."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from fedsim.compression.base import DENSE, FLAT, Compressor

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
                if size is None and (len(got) != 1 or np.asarray(parts[part]).dtype != np.uint8):
                    raise ValueError(f"{unit}/{part} is not a coded byte buffer (shape {got})")
                if size is not None and got != (size,):
                    raise ValueError(f"{unit}/{part} has shape {got}, expected ({size},)")
            x = compressor.decompress(parts, d, dtype, rng_for(index)).astype(np.float64)
        for name, piece in zip(names, np.split(x, np.cumsum(sizes)[:-1])):
            out[name] = piece.reshape(shapes[name])
    extra = set(payload) - expected
    if extra:
        raise ValueError(f"unexpected payload arrays {sorted(extra)[:3]}")
    return out


def raw_extra(
    compressor: Compressor, payload: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray]
) -> int:
    """How many bytes more ``payload`` (the encoding of ``arrays``) would take in the
    fixed-width format (:meth:`Compressor.raw_bytes`); 0 for dense units."""
    extra = 0
    for unit, names in units(compressor, list(arrays)):
        parts = {k: v for k, v in payload.items() if k.rsplit("/", 1)[0] == unit}
        if f"{unit}/{DENSE}" in parts:
            continue
        d = sum(int(np.size(arrays[n])) for n in names)
        raw = compressor.raw_bytes(d, np.asarray(arrays[names[0]]).dtype.itemsize)
        if raw is not None:
            extra += raw - sum(int(np.asarray(v).nbytes) for v in parts.values())
    return extra
