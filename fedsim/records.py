"""Converting between torch/numpy tensors and Flower records, and measuring payloads.

Payload size follows REFERENCE section 3: every value at its dtype's size, no serialisation
framing. Flower stores each Array as a ``.npy`` blob whose header is framing, so sizes are
computed from shape and dtype, never from ``len(array.data)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict


def to_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    """Detach a tensor to a contiguous numpy array (copying, so later training cannot alias it)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    return np.ascontiguousarray(value)


def array_record(arrays: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """Build an ArrayRecord, keeping the given key order."""
    return ArrayRecord({name: Array(to_numpy(value)) for name, value in arrays.items()})


def numpy_dict(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a record as numpy arrays, in record order."""
    return {name: array.numpy() for name, array in record.items()}


def array_nbytes(array: Array) -> int:
    """Payload bytes of one Array: number of values times the dtype's size."""
    return int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize


def array_numel(array: Array) -> int:
    return int(np.prod(array.shape, dtype=np.int64))


def payload_bytes(content: RecordDict) -> int:
    """Bytes of all arrays a message carries (configs and metrics are control data, not counted)."""
    return sum(array_nbytes(a) for rec in content.array_records.values() for a in rec.values())


def payload_numel(content: RecordDict) -> int:
    """Number of values (parameters) a message carries."""
    return sum(array_numel(a) for rec in content.array_records.values() for a in rec.values())


def messages_payload(messages: Iterable[Message]) -> tuple[int, int]:
    """(bytes, values) summed over messages that carry content."""
    nbytes = numel = 0
    for msg in messages:
        if msg.has_content():
            nbytes += payload_bytes(msg.content)
            numel += payload_numel(msg.content)
    return nbytes, numel
