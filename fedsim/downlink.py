"""EF21-P: the global arrays sent to clients, compressed with error feedback (``downlink``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedsim import keys
from fedsim.compression import Compressor, decompress_arrays
from fedsim.feedback import Arrays, send_compressed
from fedsim.messages import ClientUpdate, merge_records, split_prefix
from fedsim.records import array_record, numpy_dict
from fedsim.uplink import Stage

#: prefix of the compressed downlink in a message: ``down/<round>/<unit>/<part>`` for a
#: round's compressed step, ``down/upto<round>/<name>`` for the whole model as clients hold it
DOWN = "down/"


class EF21P(Stage):
    """EF21-P compression of the downlink (Gruntkowska, Tyurin, Richtarik, 2023), with catch-up.

    The server keeps ``w``, the global arrays as clients hold them; each round it sends
    ``c_t = C(x - w)`` and sets ``w <- w + c_t``, so clients train from ``w``, not ``x``. A client
    that was not sampled in some rounds is sent the steps it missed, or ``w`` itself in the
    arrays' dtype when that is smaller (always at its first participation: it holds nothing yet).
    Both sides add a step as ``(w in float64 + c).astype(dtype)``, so their ``w`` are identical.
    ``w`` and the round it is current to live in the client's ``Context.state``.

    As a stage of the uplink chain: the round's messages carry ``w``'s catch-up instead of the
    global arrays, and the server rebases the clients' updates, trained from ``w``, onto ``x``.
    """

    name = "downlink"

    def __init__(self, compressor: Compressor, seed: int) -> None:
        self.compressor, self.seed = compressor, seed
        self.w: Arrays = {}
        self.history: list[tuple[int, dict[str, np.ndarray], int]] = []  # round, payload, bytes
        self.latest = 0
        self.pruned_upto = 0
        self.version: dict[int, int] = {}
        self._sent: dict[int, int] = {}

    def rng_for(self, server_round: int):
        """Generators of the server's step in ``server_round``, one per unit."""
        return lambda unit: np.random.default_rng([self.seed, server_round, unit, 43])

    def advance(self, server_round: int, current: Mapping[str, np.ndarray]) -> Arrays:
        """Compress this round's step ``x - w``; returns the new ``w``."""
        if not self.w:
            self.w = {k: np.array(v) for k, v in current.items()}
            return self.w
        diff = {
            k: np.asarray(current[k], np.float64) - self.w[k].astype(np.float64) for k in current
        }
        dtype = next(iter(current.values())).dtype
        payload, step = send_compressed(self.compressor, diff, self.rng_for(server_round), dtype)
        self.w = {
            k: (self.w[k].astype(np.float64) + step[k]).astype(self.w[k].dtype) for k in self.w
        }
        size = sum(v.nbytes for v in payload.values())
        self.history.append((server_round, payload, size))
        self.latest = server_round
        dense = sum(v.nbytes for v in self.w.values())
        while len(self.history) > 1 and sum(h[2] for h in self.history) >= dense:
            self.pruned_upto = self.history.pop(0)[0]
        return self.w

    def catch_up(self, client: int) -> dict[str, np.ndarray]:
        """The arrays that bring ``client``'s ``w`` up to date (counted as traffic)."""
        have = self.version.get(client)
        self._sent[client] = self.latest
        missed = [h for h in self.history if have is not None and h[0] > have]
        dense = sum(v.nbytes for v in self.w.values())
        if have is None or have < self.pruned_upto or sum(h[2] for h in missed) >= dense:
            return {f"{DOWN}upto{self.latest}/{k}": v for k, v in self.w.items()}
        return {f"{DOWN}{r}/{name}": v for r, payload, _ in missed for name, v in payload.items()}

    def acknowledge(self, server_round: int, clients) -> None:
        for c in clients:
            self.version[c] = self._sent.get(c, self.version.get(c))

    # ------------------------------------------------------------------ as a stage
    def begin_round(self, info) -> Arrays:
        return self.advance(info.server_round, info.current)

    def outgoing(self, info, client, arrays, config):
        """``w``'s catch-up in place of the global arrays (the rest of the message kept)."""
        rest = ArrayRecord()
        for name, array in arrays.items():
            if name not in info.current:
                rest[name] = array
        return merge_records(array_record(self.catch_up(client)), rest), config

    def wrap(self, inner):
        return _Rebased(self, inner)

    def global_frame(self, info, updates):
        return rebase(info, updates)

    def state_dict(self) -> dict:
        """The server's ``w``, its recent steps and what each client is known to hold."""
        return {
            "w": dict(self.w),
            "history": [[r, dict(payload), size] for r, payload, size in self.history],
            "latest": self.latest,
            "pruned_upto": self.pruned_upto,
            "version": dict(self.version),
        }

    def load_state_dict(self, state) -> None:
        self.w = dict(state["w"])
        self.history = [(int(r), dict(p), int(n)) for r, p, n in state["history"]]
        self.latest = int(state["latest"])
        self.pruned_upto = int(state["pruned_upto"])
        self.version = {
            int(c): (None if v is None else int(v)) for c, v in state["version"].items()
        }

    # ------------------------------------------------------------------ client half
    def receive(self, call, arrays):
        return self.client_receive(arrays, call.state)

    def client_receive(self, arrays: Mapping[str, np.ndarray], state: RecordDict) -> dict:
        """Rebuild ``w`` from the client's stored copy and the message; returns the arrays with
        the ``down/`` ones replaced by ``w`` (what the strategy's client half loads)."""
        plain, tagged = split_prefix(DOWN, arrays)
        if not tagged:
            return dict(arrays)
        w = numpy_dict(state[keys.STATE_DOWNLINK]) if keys.STATE_DOWNLINK in state else {}
        have = int(w.pop("__version__", np.array(-1))) if w else -1
        dense = {k.split("/", 1)[1]: v for k, v in tagged.items() if k.startswith("upto")}
        if dense:
            w = {k: np.array(v) for k, v in dense.items()}
            have = int(next(iter(tagged)).split("/", 1)[0][len("upto") :])
        steps: dict[int, dict[str, np.ndarray]] = {}
        for name, value in tagged.items():
            tag, rest = name.split("/", 1)
            if not tag.startswith("upto"):
                steps.setdefault(int(tag), {})[rest] = value
        shapes = {k: v.shape for k, v in w.items()}
        for r in sorted(steps):
            if r <= have:
                continue
            dtype = next(iter(w.values())).dtype
            step = decompress_arrays(self.compressor, steps[r], shapes, self.rng_for(r), dtype)
            w = {k: (w[k].astype(np.float64) + step[k]).astype(w[k].dtype) for k in w}
            have = r
        state[keys.STATE_DOWNLINK] = array_record({**w, "__version__": np.array(have)})
        return {**plain, **w}


def rebase(info, updates: list[ClientUpdate]) -> list[ClientUpdate]:
    """Clients trained from ``w``, not from the global ``x``: their changes apply to ``x``
    (``x_i + x - w``), so that the part of ``x`` not yet sent is kept."""
    if info.held is info.current:
        return updates
    shift = {
        k: np.asarray(v, np.float64) - np.asarray(info.held[k], np.float64)
        for k, v in info.current.items()
    }
    out = []
    for u in updates:
        arrays = dict(u.arrays)
        for k, s in shift.items():
            if k in arrays:
                dtype = np.asarray(arrays[k]).dtype
                arrays[k] = (np.asarray(arrays[k], np.float64) + s).astype(dtype)
        out.append(replace(u, arrays=arrays))
    return out


class _Rebased:
    """The inner aggregation of the updates rebased onto the global arrays."""

    def __init__(self, stage: EF21P, inner) -> None:
        self.stage, self.inner = stage, inner

    def aggregate(self, info, updates):
        return self.inner.aggregate(info, rebase(info, updates))

    def linear(self, info, updates):
        return self.inner.linear(info, rebase(info, updates))
