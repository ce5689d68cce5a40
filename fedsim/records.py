"""Converting between torch/numpy tensors and Flower records, and measuring payloads.

Payload size follows docs/results.md ("What bytes count"): every value at its dtype's size,
no serialisation framing. Flower stores each Array as a ``.npy`` blob whose header is framing,
so sizes are computed from shape and dtype, never from ``len(array.data)``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedsim.keys import DIAGNOSTIC


def _c_order(value: np.ndarray) -> np.ndarray:
    arr = np.asarray(value)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")  # keeps 0-d arrays 0-d


@lru_cache(maxsize=4096)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    empty = np.zeros(shape, dtype=np.dtype(dtype))
    np.save(buffer, empty, allow_pickle=False)
    data = buffer.getvalue()
    return data[: len(data) - empty.nbytes]


def to_array(value: torch.Tensor | np.ndarray) -> Array:
    """A Flower Array holding a copy of ``value``.

    Byte for byte what ``Array(ndarray)`` stores (``np.save`` output), but the ``.npy`` header
    is cached per dtype and shape instead of formatted for every array (2x faster).
    """
    arr = _c_order(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value)
    if arr.dtype.hasobject or arr.dtype.fields is not None:
        return Array(arr.copy())
    data = _npy_header(arr.dtype.str, tuple(arr.shape)) + arr.tobytes()
    return Array(_dtype_name(arr.dtype), tuple(arr.shape), "numpy.ndarray", data)


@lru_cache(maxsize=64)
def _dtype_name(dtype: np.dtype) -> str:
    return str(dtype)  # what Flower records; str(dtype) costs microseconds every time


def array_record(arrays: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """Build an ArrayRecord, keeping the given key order."""
    record = ArrayRecord()  # filled item by item: ArrayRecord(dict) re-creates every Array
    for name, value in arrays.items():
        record[name] = to_array(value)
    return record


def array_numpy(array: Array, copy: bool = True) -> np.ndarray:
    """A writable numpy copy of a Flower Array (a read-only view with ``copy=False``).

    Equal to ``array.numpy()``, which runs ``np.load`` and parses the ``.npy`` header on every
    call (about 4x slower; hundreds of calls a round). When the blob starts with exactly the
    header ``np.save`` writes for a C-order array of the recorded dtype and shape, the values
    are read straight after it; anything else goes through ``array.numpy()``.
    """
    if array.stype == "numpy.ndarray":
        shape = tuple(array.shape)
        dtype = _dtype(array.dtype)
        header = _npy_header(dtype.str, shape)  # exactly what np.save writes for a C array
        data = array.data
        if data.startswith(header) and len(data) == len(header) + math.prod(shape) * dtype.itemsize:
            flat = np.frombuffer(data, dtype=dtype, offset=len(header))
            view = flat.reshape(shape)
            return view.copy() if copy else view
    return array.numpy()


def numpy_dict(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a record as numpy arrays, in record order."""
    return {name: array_numpy(array) for name, array in record.items()}


@lru_cache(maxsize=64)
def _dtype(name: str) -> np.dtype:
    return np.dtype(name)


@lru_cache(maxsize=64)
def _itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


def payload(content: RecordDict) -> tuple[int, int]:
    """(bytes, values) of all arrays a message carries.

    Configs and metrics are control data and are not counted (docs/results.md), nor is the
    diagnostic side channel (a compressing client's uncompressed arrays, for measurement only).
    """
    nbytes = numel = 0
    for name, record in content.items():
        if isinstance(record, ArrayRecord) and name != DIAGNOSTIC:
            for array in record.values():
                n = math.prod(array.shape)
                numel += n
                nbytes += n * _itemsize(array.dtype)
    return nbytes, numel


def messages_payload(messages: Iterable[Message]) -> tuple[int, int]:
    """(bytes, values) summed over the messages that carry content."""
    nbytes = numel = 0
    for msg in messages:
        if msg.has_content():
            b, n = payload(msg.content)
            nbytes += b
            numel += n
    return nbytes, numel
