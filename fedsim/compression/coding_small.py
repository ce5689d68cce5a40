"""The small-input path of :mod:`fedsim.compression.coding`: bit strings, and positions.

The same bit streams as the whole-array numpy path, byte for byte, built and read as Python
strings of ``'0'``/``'1'`` (``int(text, 2)`` and ``format`` convert them to and from bytes):
each section one C-level ``join`` over cached tables (the Golomb code of every gap, indexed by
the gap; the unary codes; the fixed-width codes), and read back with ``split``, ``find``,
integer shifts, or (from ``_LEAN`` positions on) a dozen whole-array steps. The numpy path
spends two dozen array calls on a buffer whatever its size: their fixed cost dominated the
coding of small tensors (256 values: 40-80 us a call). Callers check shapes and dtypes and pass
1-D ``int64`` arrays; everything here is exact (Python integers, or int64 sums that cannot
overflow).
"""

from __future__ import annotations

import math
from functools import cache, lru_cache
from itertools import accumulate, islice, repeat

import numpy as np

#: the largest magnitude the range-coded mode takes (beyond it: fixed width or Elias-gamma)
MAX_ALPHABET = 4096
FIXED, GAMMA, RANGE = 0, 1, 2  # the magnitude modes (2 header bits when the maximum is > 1)
_LEAN = 48  # from this many positions on, decoded with whole-array steps
_TABLE = 12  # fields up to this width (Golomb divisors up to 2^_TABLE) use cached tables


@lru_cache(maxsize=4096)
def golomb_parameter(d: int, k: int) -> int:
    """Golomb's optimal divisor for the gaps of a density-``k / d`` set (``k <= d / 2``): the
    smallest ``m`` with ``q^m (1 + q) <= 1``, ``q = 1 - k / d``."""
    if k <= 0 or 2 * k >= d:
        return 1
    return max(1, math.ceil(math.log1p((d - k) / d) / -math.log1p(-k / d)))


# ---------------------------------------------------------------------------- bit strings

_BITS = bytes.maketrans(b"01", b"\x00\x01")  # '0'/'1' characters to 0/1 bytes
_BITS_PLUS_ONE = bytes.maketrans(b"01", b"\x01\x02")
SIGNS = bytes.maketrans(b"01", b"\x01\xff")  # sign bits to +1/-1 (int8)
DIGITS = bytes.maketrans(b"\x00\x01", b"01")  # booleans' bytes to '0'/'1'
_ONES = ["0" * q + "1" for q in range(64)]  # unary codes of small values
_STEP_ONES = ["", *_ONES]  # the unary code of each step's gap (step - 1)
_SMALL = 1024  # Elias-gamma codes of values below it come from tables
_GAMMA_LOW = [bin(v)[3:] for v in range(_SMALL)]  # the bits below the leading one
_GAMMA_HIGH = [""] + [_ONES[v.bit_length() - 1] for v in range(1, _SMALL)]  # its position
_GAMMA_VALUE = {bits: v for v, bits in enumerate(_GAMMA_LOW) if v}


@cache
def _codes(width: int) -> list[str]:
    """Every ``width``-bit value's big-endian code (``width <= _TABLE``)."""
    return [format(v, f"0{width}b") for v in range(1 << width)] if width else [""]


@cache
def _weights(width: int) -> np.ndarray:
    return np.int64(1) << np.arange(width - 1, -1, -1, dtype=np.int64)


def pack(bits: str) -> bytes:
    """A bit string, zero padded to whole bytes."""
    size = (len(bits) + 7) // 8
    return (int(bits, 2) << (8 * size - len(bits))).to_bytes(size, "big") if bits else b""


def writable(raw: bytes) -> np.ndarray:
    return np.frombuffer(bytearray(raw), dtype=np.uint8)  # writable, as np.packbits' arrays


def bit_string(raw: bytes) -> str:
    """Inverse of :func:`pack`, padding kept: ``8 * len(raw)`` characters."""
    return format(int.from_bytes(raw, "big"), f"0{8 * len(raw)}b") if raw else ""


def finish(bits: str, end: int) -> None:
    """Check that the bit stream ends at ``end`` in its last byte, zero padded."""
    if (end + 7) // 8 != len(bits) // 8 or bits.find("1", end) >= 0:
        raise ValueError("trailing bytes or non-zero padding after the coded data")


def fixed(values, width: int) -> str:
    """Integers in ``[0, 2^width)``, ``width`` bits each, big-endian, back to back."""
    if width <= _TABLE:
        return "".join(map(_codes(width).__getitem__, values))
    return "".join(map(format, values, repeat(f"0{width}b")))


def read_fixed(bits: str, at: int, width: int, count: int) -> tuple[list[int], int]:
    """``count`` integers of ``width`` bits from ``bits[at:]``; and the position after them."""
    end = at + width * count
    if end > len(bits):
        raise ValueError("buffer too short")
    if width <= 1 or not count:
        return (list(bits[at:end].encode().translate(_BITS)) if width else [0] * count), end
    if count >= 32 and width < 64:  # one numpy product beats count slices
        rows = np.frombuffer(bits[at:end].encode().translate(_BITS), dtype=np.uint8)
        return (rows.reshape(count, width) @ _weights(width)).tolist(), end
    fields, mask = int(bits[at:end], 2), (1 << width) - 1
    return [fields >> shift & mask for shift in range(end - at - width, -1, -width)], end


def unary(values: list[int]) -> str:
    """Each ``q`` as ``q`` zeros and a one."""
    try:
        return "".join(map(_ONES.__getitem__, values))
    except IndexError:  # a long one
        return "1".join(map("0".__mul__, values)) + "1" if values else ""


def read_unary(bits: str, at: int, count: int) -> tuple[list[int], int]:
    if count == 0:
        return [], at
    runs = bits[at:].split("1", count)
    if len(runs) <= count:
        raise ValueError("buffer too short for its unary codes")
    runs.pop()
    values = list(map(len, runs))
    return values, at + sum(values) + count


def gamma(values: list[int]) -> str:
    """Elias-gamma codes of positive integers: all the bit lengths in unary, then all the bits
    below the leading ones."""
    try:
        high, low = map(_GAMMA_HIGH.__getitem__, values), map(_GAMMA_LOW.__getitem__, values)
        return "".join(high) + "".join(low)
    except IndexError:  # a large one
        low = [b[3:] for b in map(bin, values)]
        return unary([v.bit_length() - 1 for v in values]) + "".join(low)


def read_gamma(bits: str, at: int, count: int, top: int) -> tuple[list[int], int]:
    low, at = read_unary(bits, at, count)
    longest = max(low, default=0)
    if longest >= top.bit_length():
        raise ValueError("an Elias-gamma value beyond the header's maximum")
    ends = list(accumulate(low, initial=at))
    if ends[-1] > len(bits):
        raise ValueError("buffer too short")
    pieces = map(bits.__getitem__, map(slice, ends, islice(ends, 1, None)))
    if longest < _SMALL.bit_length() - 1:
        return list(map(_GAMMA_VALUE.__getitem__, pieces)), ends[-1]
    return [int("1" + piece, 2) for piece in pieces], ends[-1]


# --------------------------------------------------------------------------------- positions


@lru_cache(maxsize=32)
def _remainder_codes(m: int) -> tuple[list[str], list[str]]:
    """Every remainder's truncated-binary code (``1 < m <= 2^_TABLE``): its ``b - 1`` leading
    bits, and its extra bit (empty for the short remainders)."""
    b = (m - 1).bit_length()
    short = (1 << b) - m
    codes = _codes(b - 1)
    lead = [codes[r if r < short else (r + short) >> 1] for r in range(m)]
    return lead, ["" if r < short else "01"[(r + short) & 1] for r in range(m)]


@lru_cache(maxsize=32)
def _step_codes(m: int) -> tuple[list[str], list[str], list[str]]:
    """The Golomb code of every gap below ``64 m`` (``m <= 64``), indexed by the gap plus one
    (its :func:`steps` value): the remainder's two parts, the quotient in unary."""
    lead, extra = _remainder_codes(m)
    return ["", *lead * 64], ["", *extra * 64], ["", *[_ONES[q] for q in range(64) for _ in lead]]


def steps(positions: np.ndarray) -> list[int]:
    """Each (``int64``) position's distance to the one before it (the first's: to -1)."""
    out = np.empty_like(positions)
    out[:1] = positions[:1] + 1
    np.subtract(positions[1:], positions[:-1], out=out[1:])
    return out.tolist()


def golomb(steps: list[int], d: int) -> str:
    """The Golomb code of sorted distinct positions (at most ``d / 2`` of them), given as
    their :func:`steps`: each gap (step - 1) as a remainder and a quotient."""
    if not steps:
        return ""
    m = golomb_parameter(d, len(steps))
    try:
        if m == 1:
            return "".join(map(_STEP_ONES.__getitem__, steps))
        if m <= 64:
            lead, extra, ones = _step_codes(m)
            code = "".join(map(lead.__getitem__, steps)) + "".join(map(extra.__getitem__, steps))
            return code + "".join(map(ones.__getitem__, steps))
    except IndexError:  # a gap beyond the tables
        pass
    gaps = [step - 1 for step in steps]
    if m == 1:
        return unary(gaps)
    rest, ones = list(map(m.__rmod__, gaps)), unary(list(map(m.__rfloordiv__, gaps)))
    if m <= 1 << _TABLE:
        lead, extra = _remainder_codes(m)
        return "".join(map(lead.__getitem__, rest)) + "".join(map(extra.__getitem__, rest)) + ones
    b = (m - 1).bit_length()
    short = (1 << b) - m
    code = fixed([r if r < short else (r + short) >> 1 for r in rest], b - 1)
    return code + "".join(["01"[(r + short) & 1] for r in rest if r >= short]) + ones


def read_golomb(bits: str, at: int, d: int, k: int) -> tuple[np.ndarray, int]:
    """Inverse of :func:`golomb` from ``bits[at:]``: positions (``int64``), and the end."""
    m = golomb_parameter(d, k)
    if k >= _LEAN and m * (len(bits) + k) < 2**62:  # (int64 sums cannot overflow)
        return _read_golomb_array(bits, at, d, k, m)
    positions, at = _read_golomb_list(bits, at, d, k, m)
    return np.fromiter(positions, np.int64, k), at


def _read_golomb_array(bits: str, at: int, d: int, k: int, m: int) -> tuple[np.ndarray, int]:
    """:func:`read_golomb` of many positions, in a dozen whole-array steps: the ``i``-th is
    ``m * u_i + sum_{j <= i} (r_j + 1 - m) + m - 1``, ``u_i`` the ``i``-th unary one."""
    section = np.frombuffer(bits[at:].encode().translate(_BITS), dtype=np.uint8)
    rest = 0
    if m > 1:
        b = (m - 1).bit_length()
        short, end = (1 << b) - m, (b - 1) * k
        if end > section.size:
            raise ValueError("buffer too short")
        if b <= 2:
            lead = section[:end].astype(np.int64) if b == 2 else np.zeros(k, dtype=np.int64)
        else:
            lead = section[:end].reshape(k, b - 1) @ _weights(b - 1)
        long = lead >= short
        stop = end + int(np.count_nonzero(long))
        if stop > section.size:
            raise ValueError("buffer too short")
        rest = lead + (1 - m)
        rest[long] += lead[long] - short + section[end:stop]  # int64: the extra bits
        section, at = section[stop:], at + stop
    ones = section.nonzero()[0]
    if ones.size < k:
        raise ValueError("buffer too short for its unary codes")
    ones = ones[:k]
    positions = m * ones
    if m > 1:
        positions += np.cumsum(rest)
        positions += m - 1
    if positions[-1] >= d:
        raise ValueError(f"a decoded position is beyond {d}")
    return positions, at + int(ones[-1]) + 1


def _read_golomb_list(bits: str, at: int, d: int, k: int, m: int) -> tuple[list[int], int]:
    if k == 0:
        return [], at
    if m == 1:
        quotient, at = read_unary(bits, at, k)
        steps = map((1).__add__, quotient)
    else:  # the truncated-binary remainders: b - 1 leading bits, then the long ones' extra bit
        b = (m - 1).bit_length()
        short = (1 << b) - m
        lead, at = read_fixed(bits, at, b - 1, k)
        end = at + (k if short == 0 else sum(map(short.__le__, lead)))
        if end > len(bits):
            raise ValueError("buffer too short")
        extra = bits[at:end].encode().translate(_BITS_PLUS_ONE)  # the extra bit plus one
        quotient, at = read_unary(bits, end, k)
        more = iter(extra)
        steps = [
            q * m + (v + 1 if v < short else 2 * v - short + next(more))
            for q, v in zip(quotient, lead)
        ]
    positions = list(accumulate(steps, initial=-1))
    if positions[-1] >= d:
        raise ValueError(f"a decoded position is beyond {d}")
    del positions[0]
    return positions, at


def complement(positions, d: int) -> np.ndarray:
    """The sorted positions of ``[0, d)`` not in ``positions``."""
    mask = np.ones(d, dtype=bool)
    mask[positions] = False
    return mask.nonzero()[0]


def encode_positions(positions: np.ndarray, d: int) -> np.ndarray:
    """:func:`fedsim.compression.coding.encode_positions` of a few (``int64``) positions."""
    gaps = steps(positions)
    if gaps:  # all steps positive, and their sum exact (no int64 wraparound): increasing
        last = int(positions[-1])
        if min(gaps) < 1 or last >= d or sum(gaps) != last + 1:
            raise ValueError(f"positions must be strictly increasing, in [0, {d})")
    if 2 * len(gaps) > d:
        gaps = steps(complement(positions, d))
    return writable(pack(golomb(gaps, d)))


def decode_positions(raw: bytes, d: int, k: int) -> np.ndarray:
    """:func:`fedsim.compression.coding.decode_positions` of a few positions."""
    bits = bit_string(raw)
    flip = 2 * k > d
    positions, end = read_golomb(bits, 0, d, d - k if flip else k)
    finish(bits, end)
    return complement(positions, d) if flip else positions
