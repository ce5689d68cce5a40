"""Checks of user-supplied values, each failing with a one-line ConfigError.

Every check names the key, shows the value and says what is allowed. Numbers must be finite
(``nan`` and ``inf`` pass naive comparisons such as ``x > 0``).
"""

from __future__ import annotations

import math
from typing import Any

from fedsim.errors import ConfigError


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(
    key: str,
    value: Any,
    low: int | None = None,
    high: int | None = None,
    high_name: str | None = None,
) -> int:
    """An integer in ``[low, high]`` (either bound optional)."""
    if (
        not is_int(value)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        if low is not None and high is not None:
            upper = f"{high_name} ({high})" if high_name else str(high)
            allowed = f"must be an integer from {low} to {upper}"
        elif low is not None:
            allowed = f"must be an integer >= {low}"
        elif high is not None:
            allowed = f"must be an integer <= {high}"
        else:
            allowed = "must be an integer"
        raise ConfigError(key, value, allowed)
    return value


def number(
    key: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite number in the interval given by ``low``/``high`` (closed unless ``*_open``)."""
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            allowed = (
                f"must be a number in {'(' if low_open else '['}{low:g}, "
                f"{high:g}{')' if high_open else ']'}"
            )
        elif low is not None:
            allowed = f"must be a finite number {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            allowed = f"must be a finite number {'<' if high_open else '<='} {high:g}"
        else:
            allowed = "must be a finite number"
        raise ConfigError(key, value, allowed)
    return float(value)


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "must be true or false")
    return value
