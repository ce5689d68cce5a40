"""The small-input path of :mod:`fedsim.compression.coding` for QSGD levels, and the range coder
of their magnitudes: rANS (``constriction``, pinned: its model quantisation fixes the bytes)
under the magnitudes' empirical distribution, whose counts travel in the payload's header."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fedsim.compression.coding_small import (
    DIGITS,
    FIXED,
    GAMMA,
    MAX_ALPHABET,
    RANGE,
    SIGNS,
    bit_string,
    finish,
    fixed,
    gamma,
    golomb,
    pack,
    read_fixed,
    read_gamma,
    read_golomb,
    steps,
    writable,
)

_NONZERO = 512  # the most non-zero levels coded here (64 if wider than MAX_ALPHABET)


# ----------------------------------------------------------------------------- range coder


def _constriction():
    try:
        import constriction
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("range-coded levels need constriction==0.5.0") from err
    return constriction


@lru_cache(maxsize=128)  # a message's decoders meet its encoder's model again
def _model(counts: tuple[int, ...]):
    weights = np.array(counts, dtype=np.float64)
    return _constriction().stream.model.Categorical(weights, perfect=False)


def ans_encode(symbols: np.ndarray, counts: tuple[int, ...]) -> bytes:
    """rANS code of ``symbols`` under the categorical model ``counts``, little-endian bytes;
    the last word (never zero) without its zero high bytes."""
    coder = _constriction().stream.stack.AnsCoder()
    coder.encode_reverse(symbols.astype(np.int32), _model(counts))
    data = np.asarray(coder.get_compressed(), dtype="<u4").tobytes()
    end = len(data)
    while end > len(data) - 3 and data[end - 1] == 0:
        end -= 1
    return data[:end]


def ans_decode(data: bytes, counts: tuple[int, ...], count: int) -> np.ndarray:
    """Inverse of :func:`ans_encode`; the decoded symbols' histogram must equal ``counts``."""
    if data and data[-1] == 0:
        raise ValueError("non-canonical range-coded section")
    words = np.frombuffer(data + bytes(-len(data) % 4), dtype="<u4").astype(np.uint32)
    try:
        coder = _constriction().stream.stack.AnsCoder(words)
        symbols = np.asarray(coder.decode(_model(counts), count), dtype=np.int64)
        drained = coder.is_empty()
    except (KeyboardInterrupt, SystemExit, ImportError):  # pragma: no cover
        raise
    except BaseException as err:  # constriction's errors, a Rust panic included
        raise ValueError(f"malformed range-coded section: {err}") from err
    if not drained or symbols.size != count or symbols.min() < 0:
        raise ValueError("malformed range-coded section")
    if tuple(np.bincount(symbols, minlength=len(counts)).tolist()) != counts:
        raise ValueError("range-coded section disagrees with its header")
    return symbols


# ------------------------------------------------------------------------------------ levels


def _field(value: int, width: int) -> str:
    return format(value, f"0{width}b") if width else ""


def _declined(nnz: int, top: int) -> bool:
    """Whether ``nnz`` non-zero levels up to ``top`` are better left to the numpy path (whose
    cost per entry is lower)."""
    return nnz > _NONZERO or (top > MAX_ALPHABET and nnz > 64)


def encode_levels(levels: np.ndarray, s: int) -> np.ndarray | None:
    """:func:`fedsim.compression.coding.encode_levels` of a short ``int64`` vector; None: left
    to the numpy path (all zero, or :func:`_declined`)."""
    nonzero = levels.nonzero()[0]
    if not 0 < nonzero.size <= _NONZERO:
        return None
    n, nnz, values = levels.size, nonzero.size, levels[nonzero]
    low, top = int(values.min()), int(values.max())
    if low < -s or top > s:  # (zeros lie in any range)
        raise ValueError(f"levels must lie in [-{s}, {s}]")
    top = max(top, -low)
    if _declined(nnz, top):
        return None
    coded = nonzero if 2 * nnz <= n else (levels == 0).nonzero()[0]
    head = _field(nnz - 1, (n - 1).bit_length()) + _field(top - 1, (s - 1).bit_length())
    body = golomb(steps(coded), n) + (values < 0).tobytes().translate(DIGITS).decode()
    if top == 1:
        return writable(pack(head + body))
    magnitude = np.abs(values)
    listed = magnitude.tolist()
    width = (top - 1).bit_length()  # fixed width or Elias-gamma, whichever is shorter; then rANS
    if nnz * width <= 2 * sum(map(int.bit_length, listed)) - nnz:
        first = pack(head + "00" + body + fixed(map((-1).__add__, listed), width))
    else:
        first = pack(head + "01" + body + gamma(listed))
    if top > MAX_ALPHABET:
        return writable(first)
    symbols = magnitude - 1
    counts = tuple(np.bincount(symbols, minlength=top).tolist())
    header = pack(head + "10" + gamma([c + 1 for c in counts[:-1]]) + body)
    if len(header) >= len(first):  # the range-coded one cannot be shorter
        return writable(first)
    second = header + ans_encode(symbols, counts)
    return writable(second if len(second) < len(first) else first)  # equals: the first


def _read_header(bits: str, n: int, s: int):
    """The non-zero count, the largest magnitude, the mode, the counts (range mode)."""
    widths = ((n - 1).bit_length(), (s - 1).bit_length())
    at = widths[0] + widths[1]
    if at > len(bits):
        raise ValueError("buffer too short")
    nnz = int(bits[: widths[0]] or "0", 2) + 1
    top = int(bits[widths[0] : at] or "0", 2) + 1
    if nnz > n or top > s:
        raise ValueError("header out of range")
    if top == 1:
        return nnz, top, FIXED, None, at
    if at + 2 > len(bits):
        raise ValueError("buffer too short")
    mode, at = int(bits[at : at + 2], 2), at + 2
    if mode not in (FIXED, GAMMA, RANGE) or (mode == RANGE and top > MAX_ALPHABET):
        raise ValueError(f"unknown magnitude mode {mode}")
    if mode != RANGE:
        return nnz, top, mode, None, at
    head, at = read_gamma(bits, at, top - 1, nnz + 1)
    last = nnz - sum(head) + len(head)
    if last < 1:
        raise ValueError("magnitude counts exceed the non-zero count")
    return nnz, top, mode, (*[h - 1 for h in head], last), at


def decode_levels(raw: bytes, n: int, s: int) -> np.ndarray | None:
    """:func:`fedsim.compression.coding.decode_levels` of a short (``n <= 4096``), non-empty
    buffer; None: left to the numpy path (:func:`_declined`, judged from the header alone)."""
    widths = (n - 1).bit_length() + (s - 1).bit_length()  # at most 75 bits: in 10 bytes
    if widths <= 8 * len(raw[:10]):
        head = int.from_bytes(raw[:10], "big") >> (8 * len(raw[:10]) - widths)
        top = head & ((1 << (s - 1).bit_length()) - 1)
        if _declined((head >> (s - 1).bit_length()) + 1, top + 1):
            return None
    bits = bit_string(raw)
    nnz, top, mode, counts, at = _read_header(bits, n, s)
    flip = 2 * nnz > n
    coded, at = read_golomb(bits, at, n, n - nnz if flip else nnz)
    signs, at = bits[at : at + nnz], at + nnz
    if at > len(bits):
        raise ValueError("buffer too short")
    values = np.frombuffer(signs.encode().translate(SIGNS), dtype=np.int8)
    if mode == RANGE:
        stop = (at + 7) // 8
        if bits.find("1", at, 8 * stop) >= 0:
            raise ValueError("non-zero padding before the range-coded section")
        values = values * (ans_decode(raw[stop:], counts, nnz) + 1)
    elif top > 1:
        if mode == FIXED:
            magnitude, at = read_fixed(bits, at, (top - 1).bit_length(), nnz)
            magnitude = np.fromiter(magnitude, np.int64, nnz) + 1
        else:
            magnitude, at = read_gamma(bits, at, nnz, top)
            magnitude = np.fromiter(magnitude, np.int64, nnz)
        finish(bits, at)
        if magnitude.max() != top:
            raise ValueError("decoded magnitudes disagree with the header's maximum")
        values = values * magnitude
    else:
        finish(bits, at)
    levels = np.zeros(n, dtype=np.int64)
    if flip:
        mask = np.ones(n, dtype=bool)
        mask[coded] = False
        levels[mask] = values
    else:
        levels[coded] = values
    return levels
