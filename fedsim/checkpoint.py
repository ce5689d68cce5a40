"""Checkpoints: everything a run needs to continue, in one safetensors file, written atomically.

A checkpoint is a *state tree* (nested dicts, lists, numbers, strings and numpy arrays) saved
as one ``.safetensors`` file: the arrays are its tensors, and the rest of the tree is JSON in
the file's metadata (key ``fedsim``), with each array replaced by a reference to its tensor.
Nothing is pickled; any safetensors reader can open the file and ``json.loads`` its metadata.

The tree of a run (:mod:`fedsim.apps.server.state`) holds the round it was taken after, the
configuration it belongs to, the server's state (:class:`~fedsim.apps.server.state.ServerState`:
the global arrays, the strategy's own state, each stage of the uplink chain's server state, the
running totals, the random states of Python, NumPy and PyTorch) and every client's
``Context.state`` (error-feedback memories, DP accountants, personal adapters, folded bases,
step counts).

Encoding of the tree's values in the JSON (the markers start with ``$``, which fedsim's own
keys never do): a dict whose keys are not all strings is ``{"$dict": [[key, value], ...]}``,
a tuple ``{"$tuple": [...]}``, a set ``{"$set": [...]}``, bytes ``{"$bytes": base64}``, a
non-finite float ``{"$float": "nan"}``, an array ``{"$array": tensor name}`` and a NumPy scalar
``{"$scalar": tensor name}`` (a 0-d tensor, so its dtype survives).

Since format 3 the file verifies itself: the metadata key ``fedsim_sha256`` holds the SHA-256
of the JSON text and of every tensor (name, dtype, shape and bytes, tensors in name order), and
:func:`load` and :func:`header` both recompute it, so a damaged, cut or edited file is refused
(ValueError naming the file). It detects damage and edits, not a forger who rewrites the digest
too: it is a checksum, not a signature. Formats 1 and 2 were written before it and are read
without one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors import SafetensorError

from fedsim.keys import CHECKPOINT_FILE as CHECKPOINT_FILE  # re-exported (light: no PyTorch)
from fedsim.records import array_record, numpy_dict

#: bumped when the file's layout changes (2: the server's state as ServerState gathers it; 3: the
#: SHA-256 digest; the server upgrades format 1, reads 2 as it is (no digest to check), and
#: refuses others with a clear message)
FORMAT = 3
#: the formats written before the digest existed: read without one
UNDIGESTED = (1, 2)
_META_KEY = "fedsim"
_DIGEST_KEY = "fedsim_sha256"


# ----------------------------------------------------------------------------- state trees


def _encode(value: Any, path: str, tensors: dict[str, np.ndarray]) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.generic):
        name = f"{len(tensors)}:{path}"
        tensors[name] = np.asarray(value)
        return {"$scalar": name}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject or value.dtype.fields is not None:
            raise TypeError(f"{path}: arrays of dtype {value.dtype} cannot be checkpointed")
        name = f"{len(tensors)}:{path}"
        tensors[name] = value if value.flags.c_contiguous else value.copy(order="C")  # 0-d too
        return {"$array": name}
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in value.items()}
        return {
            "$dict": [
                [_encode(k, f"{path}/key", tensors), _encode(v, f"{path}/{k}", tensors)]
                for k, v in value.items()
            ]
        }
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, (set, frozenset)):
        return {"$set": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(sorted(value))]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    raise TypeError(f"{path}: a {type(value).__name__} cannot be checkpointed")


def _decode(value: Any, tensors: Mapping[str, np.ndarray]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((marker, inner),) = value.items()
        if marker == "$array":
            return np.array(tensors[inner])
        if marker == "$scalar":
            return np.asarray(tensors[inner])[()]
        if marker == "$float":
            return float(inner)
        if marker == "$bytes":
            return base64.b64decode(inner)
        if marker == "$tuple":
            return tuple(_decode(v, tensors) for v in inner)
        if marker == "$set":
            return {_decode(v, tensors) for v in inner}
        if marker == "$dict":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in inner}
    return {k: _decode(v, tensors) for k, v in value.items()}


def encode_tree(tree: Any) -> tuple[str, dict[str, np.ndarray]]:
    """``(JSON text, tensors)`` of a state tree."""
    tensors: dict[str, np.ndarray] = {}
    skeleton = _encode(tree, "", tensors)
    return json.dumps(skeleton, allow_nan=False), tensors


def decode_tree(text: str, tensors: Mapping[str, np.ndarray]) -> Any:
    return _decode(json.loads(text), tensors)


def save(path: Path | str, tree: Any) -> int:
    """Write ``tree`` to ``path`` atomically (a temporary file, synced, then renamed over the
    old one, and the folder synced): a kill at any moment leaves the old checkpoint or the new
    one, never a half-written file. Returns the file's size in bytes."""
    from safetensors.numpy import save_file

    path = Path(path)
    text, tensors = encode_tree(tree)
    tmp = path.with_name(f".{path.name}.tmp")
    meta = {_META_KEY: text, _DIGEST_KEY: digest(text, tensors)}
    save_file(tensors, str(tmp), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # like the run's other files (safetensors writes 0600)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_folder(path.parent)
    return path.stat().st_size


def digest(text: str, tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of a checkpoint's JSON text and tensors: the text, then each tensor in
    name order as its name, dtype, shape and bytes (each part length-prefixed, so no two
    different files hash the same bytes)."""
    h = hashlib.sha256()

    def part(data) -> None:
        view = memoryview(data).cast("B")
        h.update(len(view).to_bytes(8, "little"))
        h.update(view)

    part(text.encode("utf-8"))
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        part(name.encode("utf-8"))
        part(array.dtype.str.encode("ascii"))
        part(json.dumps(list(array.shape)).encode("ascii"))
        part(array.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _read(path: Path | str, keep: bool) -> tuple[str, dict[str, np.ndarray]]:
    """The JSON text and (``keep``) the tensors of a checkpoint file, its digest checked."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            if _META_KEY not in meta:
                raise ValueError(f"{path} is a safetensors file but not a fedsim checkpoint")
            text, stored = meta[_META_KEY], meta.get(_DIGEST_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()} if keep else {}
            if stored is None:
                _undigested(path, text)
                return text, tensors
            actual = digest(text, tensors if keep else _LazyTensors(f))
    except (OSError, SafetensorError) as e:  # a missing, cut or damaged file
        raise ValueError(f"{path} cannot be read as a checkpoint: {e}") from None
    if actual != stored:
        raise ValueError(
            f"{path} does not match its SHA-256 digest (the file was changed after it was written)"
        )
    return text, tensors


class _LazyTensors(Mapping):
    """The tensors of an open safetensors file as a mapping that reads each one on access
    (the digest of a big checkpoint holds one tensor at a time)."""

    def __init__(self, f) -> None:
        self.f = f
        self.names = list(f.keys())

    def __getitem__(self, name: str) -> np.ndarray:
        return self.f.get_tensor(name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _undigested(path: Path | str, text: str) -> None:
    """A file without a digest must be of a format written before digests existed."""
    try:
        fmt = json.loads(text).get("format")
    except (ValueError, AttributeError):
        fmt = None
    if fmt not in UNDIGESTED:
        raise ValueError(
            f"{path} has no SHA-256 digest, which every checkpoint of format {FORMAT} carries "
            f"(its header says format {fmt!r})"
        )


def load(path: Path | str) -> Any:
    """The state tree saved in ``path`` (ValueError if it is not a fedsim checkpoint, or is
    damaged: its digest does not match)."""
    text, tensors = _read(path, keep=True)
    try:
        return decode_tree(text, tensors)
    except (ValueError, KeyError, TypeError) as e:  # an undigested file, edited
        raise ValueError(f"{path} cannot be read as a checkpoint: {e}") from None


def header(path: Path | str) -> dict[str, Any]:
    """The checkpoint's small plain fields (``format``, ``round``, ``config``, ``choices``,
    ``fedsim``), from the file's header; the whole file is read to check its digest (the
    tensors one at a time)."""
    text, _ = _read(path, keep=False)
    try:
        tree = json.loads(text)
        plain = ("format", "round", "config", "choices", "fedsim")
        return {k: _decode(tree[k], {}) for k in plain if k in tree}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} cannot be read as a checkpoint: {e}") from None


def sync_folder(folder: Path | str) -> None:
    """fsync a folder, so that a rename inside it survives a crash of the machine."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- records


def record_dict_state(rd: RecordDict) -> dict[str, Any]:
    """A client's ``Context.state`` as a state tree (record kind, then its items)."""
    out: dict[str, Any] = {}
    for key, record in rd.items():
        if isinstance(record, ArrayRecord):
            out[key] = {"kind": "array", "items": numpy_dict(record)}
        elif isinstance(record, ConfigRecord):
            out[key] = {"kind": "config", "items": dict(record)}
        elif isinstance(record, MetricRecord):
            out[key] = {"kind": "metric", "items": dict(record)}
        else:  # pragma: no cover - Flower has no other record kinds
            raise TypeError(f"state record {key}: {type(record).__name__} cannot be checkpointed")
    return out


def record_dict_from_state(tree: Mapping[str, Any]) -> RecordDict:
    """The inverse of :func:`record_dict_state` (arrays stored byte for byte as before)."""
    rd = RecordDict()
    for key, entry in tree.items():
        kind, items = entry["kind"], entry["items"]
        if kind == "array":
            rd[key] = array_record(items)
        elif kind == "config":
            rd[key] = ConfigRecord(dict(items))
        else:
            rd[key] = MetricRecord(dict(items))
    return rd


# ----------------------------------------------------------------------------- random states


def rng_state() -> dict[str, Any]:
    """The global random states of Python, NumPy and PyTorch (CPU and each CUDA device)."""
    version, internal, gauss = random.getstate()
    kind, keys_, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": keys_,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state().numpy(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.numpy() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"], n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(torch.from_numpy(np.array(state["torch"], dtype=np.uint8)))
    if "cuda" in state and torch.cuda.is_available():
        states = [torch.from_numpy(np.array(s, dtype=np.uint8)) for s in state["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
