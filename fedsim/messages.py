"""What travels in a round, as the server's and the clients' halves of every mechanism see it.

The vocabulary shared by strategies and the stages of the uplink chain (:mod:`fedsim.uplink`):
a client's reply as a :class:`ClientUpdate`, what a client-side hook knows about its call
(:class:`ClientCall`), and helpers for the array names of a message (``<prefix><name>``
sections such as ``frozen/``, ``fold/``, ``down/``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from fedsim import keys
from fedsim.records import array_numpy, array_record


@dataclass
class ClientCall:
    """What a client-side hook knows about the call it serves."""

    client: int  # partition id
    server_round: int
    seed: int  # the run's seed
    state: RecordDict  # the client's Context.state: what it keeps between rounds
    config: Mapping[str, Any] = field(default_factory=dict)  # the message's config record


@dataclass
class ClientUpdate:
    """One client's reply to a training round, as a strategy's ``aggregate`` sees it."""

    client: int  # partition id
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]
    #: the client's uncompressed trained arrays (the aggregation error's input) when what it
    #: sent is a compressed or clipped payload; None: ``arrays`` are those
    diagnostic: dict[str, np.ndarray] | None = None


def weighted_mean(
    arrays: list[Mapping[str, np.ndarray]], weights: list[float] | np.ndarray
) -> dict[str, np.ndarray]:
    """``sum_i w_i * arrays_i`` per key, accumulated and returned in float64.

    fedsim casts what a strategy's ``aggregate`` returns to the global arrays' dtypes after
    measuring the aggregation error, so the diagnostic sees the exact mean.
    """
    out = {}
    for name, first in arrays[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for arr, w in zip(arrays, weights):
            acc += float(w) * arr[name].astype(np.float64, copy=False)
        out[name] = acc
    return out


def with_prefix(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {prefix + name: value for name, value in arrays.items()}


def split_prefix(
    prefix: str, arrays: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(arrays without the prefix, the prefixed ones with the prefix removed)``."""
    plain, tagged = {}, {}
    for name, value in arrays.items():
        if name.startswith(prefix):
            tagged[name[len(prefix) :]] = value
        else:
            plain[name] = value
    return plain, tagged


def merge_records(*records: ArrayRecord) -> ArrayRecord:
    """One record holding the arrays of all, sharing their Array objects (no copy)."""
    out = ArrayRecord()
    for record in records:
        for name, array in record.items():
            out[name] = array
    return out


def extend_record(record: ArrayRecord, extra: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``record`` plus ``extra`` arrays, sharing ``record``'s Array objects (no copy)."""
    return merge_records(record, array_record(extra)) if extra else record


def check_arrays(arrays: ArrayRecord, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why ``arrays`` do not have exactly the expected names and shapes with finite values."""
    if set(arrays.keys()) != set(shapes):
        got = set(arrays.keys())
        missing, extra = sorted(set(shapes) - got), sorted(got - set(shapes))
        return f"malformed reply: missing arrays {missing[:3]}, unexpected arrays {extra[:3]}"
    for name, arr in arrays.items():
        shape, want = tuple(arr.shape), tuple(shapes[name])
        if shape != want:
            return f"malformed reply: {name} has shape {shape}, expected {want}"
        if not np.all(np.isfinite(array_numpy(arr, copy=False))):
            return f"non-finite values in {name}"
    return None


def missing_records(reply: Message) -> str | None:
    """Why a reply cannot be read: it lacks its arrays or its metrics."""
    content = reply.content
    if keys.ARRAYS not in content.array_records or keys.METRICS not in content.metric_records:
        return "malformed reply: missing arrays or metrics"
    return None
