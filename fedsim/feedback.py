"""Error feedback methods for compressed updates (config group ``feedback``).

The quantity a client compresses is its pseudo-gradient after its local steps,
``u_i = (x - x_i) / lr`` (``x``: the arrays it started from, ``x_i``: after training, ``lr``:
``sim.lr``), over the arrays its strategy sends. Methods (config group ``feedback``):

* ``none`` (naive): send ``C(u_i)``; the server's estimate of the client's arrays is
  ``x - lr_server * lr * C(u_i)``, aggregated by the strategy's own rule.
* ``ef14`` (Seide et al., 2014): residual ``e_i``; send ``m_i = C(e_i + u_i)``,
  ``e_i <- e_i + u_i - m_i``; the server aggregates the estimates ``x - lr_server * lr * m_i``.
* ``ef21`` (Richtarik et al., 2021) with partial participation: client state ``g_i``, server
  state ``g = (1/N) sum_i g_i`` over all ``N`` clients; ``c_i = C(u_i - g_i)`` is all that is
  sent, ``g_i <- g_i + c_i``, ``g <- g + (1/N) sum_received c_i``, ``x <- x - lr_server * lr * g``.
  Clients not sampled keep their ``g_i``.
* ``econtrol`` (Gao, Islamov, Stich, 2023): client states ``e_i``, ``h_i``;
  ``D_i = C(eta e_i + u_i - h_i)``, ``e_i <- e_i + u_i - h_i - D_i``, ``h_i <- h_i + D_i``;
  server ``h <- h + (1/N) sum_received D_i`` (the mean over all clients' ``h_i``, as EF21-PP),
  ``x <- x - lr_server * lr * h``.

``lr_server`` is in units of the client learning rate: with ``lr_server = 1`` and no
compression, EF21 with every client sampled is unweighted FedAvg. For ``ef21`` and ``econtrol``
a client's first message is ``u_i`` uncompressed (counted), which initialises ``g_i`` /
``h_i`` (EF21's initialisation; ``compress_first: true`` starts from zero instead). They
replace the strategy's averaging with the step above, so they need a strategy that averages
the arrays it sends (:attr:`fedsim.strategy.AdapterStrategy.averages`). All client states live
in the client's ``Context.state`` in float64; the values sent are in the parameters' dtype, and
both sides update their states with exactly what was sent, so they never drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedsim.compression import Compressor, clip_joint, compress_arrays, decompress_arrays
from fedsim.validate import boolean, number

Arrays = dict[str, np.ndarray]


def rng_factory(seed: int, server_round: int, client: int):
    """Generators for one client's message, one per compression unit."""

    def rng_for(unit: int) -> np.random.Generator:
        return np.random.default_rng([seed, server_round, client, unit, 41])

    return rng_for


class Feedback:
    """Base class of feedback methods (built from ``conf/feedback/*.yaml``).

    Parameters
    ----------
    lr_server : float
        Server step in units of ``sim.lr`` (> 0).
    """

    name = "feedback"
    #: needs a contractive compressor (error feedback)
    needs_contractive = True
    #: the server step replaces the strategy's aggregation (EF21, EControl)
    replaces_aggregation = False
    #: the client-state arrays this method keeps, by prefix
    states: tuple[str, ...] = ()

    def __init__(self, lr_server: float = 1.0) -> None:
        self.lr_server = number("feedback.lr_server", lr_server, low=0, low_open=True)
        self.server_state: Arrays = {}

    # ------------------------------------------------------------------ client half
    def encode(
        self,
        u: Mapping[str, np.ndarray],
        compressor: Compressor,
        rng_for,
        dtype: np.dtype,
        state: Arrays,
        clip: float | None = None,
    ) -> dict[str, np.ndarray]:
        """The payload for pseudo-gradient ``u``; updates ``state`` (float64 arrays) in place.

        ``clip`` (central DP): the quantity compressed is first clipped to this L2 norm, jointly
        over all arrays; with a norm-non-increasing compressor the message stays within it.
        The memories are updated with what was sent, so what clipping removed is left for
        later messages, as what compression removes."""
        raise NotImplementedError

    def undo(self, decoded: Arrays, first: bool, state: Arrays) -> None:
        """Take back a message the server did not aggregate (lost, late, refused, or in a
        skipped round), so that the client's memories match what the server has seen."""

    # ------------------------------------------------------------------ server half
    def step(
        self,
        current: Mapping[str, np.ndarray],
        received: list[Arrays],
        num_clients: int,
        lr: float,
    ) -> Arrays:
        """The new global arrays (float64) from the decoded messages (only when
        :attr:`replaces_aggregation`)."""
        raise NotImplementedError

    def state_dict(self) -> Arrays:
        return dict(self.server_state)

    def load_state_dict(self, state: Arrays) -> None:
        self.server_state = dict(state)


def send_compressed(compressor, value, rng_for, dtype, clip=None) -> tuple[dict, Arrays]:
    """Compress ``value`` (clipped to norm ``clip`` first, if given); returns the payload and
    what the receiver reconstructs."""
    if clip is not None:
        value = clip_joint(value, clip)
    payload = compress_arrays(compressor, value, rng_for, dtype)
    shapes = {k: np.shape(v) for k, v in value.items()}
    return payload, decompress_arrays(compressor, payload, shapes, rng_for, dtype)


def _dense(value, dtype, clip=None) -> tuple[dict, Arrays]:
    from fedsim.compression import NoCompression

    if clip is not None:
        value = clip_joint(value, clip)
    none = NoCompression()
    payload = compress_arrays(none, value, lambda i: None, dtype, dense=True)
    shapes = {k: np.shape(v) for k, v in value.items()}
    return payload, decompress_arrays(none, payload, shapes, lambda i: None, dtype)


class Naive(Feedback):
    """``feedback=none``: send ``C(u_i)``, no memory."""

    name = "none"
    needs_contractive = False

    def encode(self, u, compressor, rng_for, dtype, state, clip=None):
        return send_compressed(compressor, dict(u), rng_for, dtype, clip)[0]


class EF14(Feedback):
    """Classic error feedback: ``m_i = C(e_i + u_i)``, ``e_i <- e_i + u_i - m_i``."""

    name = "ef14"
    states = ("e",)

    def encode(self, u, compressor, rng_for, dtype, state, clip=None):
        v = {k: state.get(f"e/{k}", 0.0) + u[k] for k in u}
        payload, m = send_compressed(compressor, v, rng_for, dtype, clip)
        for k in u:
            state[f"e/{k}"] = v[k] - m[k]
        return payload

    def undo(self, decoded, first, state):
        for k, m in decoded.items():  # nothing arrived: all of e + u is still to be sent
            state[f"e/{k}"] = state[f"e/{k}"] + m


class _Tracking(Feedback):
    """EF21 and EControl: a tracked estimate per client, its mean on the server."""

    replaces_aggregation = True

    def __init__(self, lr_server: float = 1.0, compress_first: bool = False) -> None:
        super().__init__(lr_server)
        self.compress_first = boolean("feedback.compress_first", compress_first)

    def step(self, current, received, num_clients, lr):
        mean = self.server_state  # g (EF21) or h (EControl): the mean over all N clients
        for name, value in current.items():
            mean.setdefault(name, np.zeros(np.shape(value)))
        for message in received:
            for name, value in message.items():
                mean[name] = mean[name] + value / num_clients
        step = self.lr_server * lr
        return {k: np.asarray(v, dtype=np.float64) - step * mean[k] for k, v in current.items()}


class EF21(_Tracking):
    """EF21 with partial participation: ``c_i = C(u_i - g_i)``, ``g_i <- g_i + c_i``."""

    name = "ef21"
    states = ("g",)

    def encode(self, u, compressor, rng_for, dtype, state, clip=None):
        if f"g/{next(iter(u))}" not in state and not self.compress_first:
            payload, c = _dense(dict(u), dtype, clip)
        else:
            diff = {k: u[k] - state.get(f"g/{k}", 0.0) for k in u}
            payload, c = send_compressed(compressor, diff, rng_for, dtype, clip)
        for k in u:
            state[f"g/{k}"] = state.get(f"g/{k}", 0.0) + c[k]
        return payload

    def undo(self, decoded, first, state):
        for k, c in decoded.items():
            if first:
                del state[f"g/{k}"]  # the next message is a first message again
            else:
                state[f"g/{k}"] = state[f"g/{k}"] - c


class EControl(_Tracking):
    """EControl: ``D_i = C(eta e_i + u_i - h_i)``, ``e_i <- e_i + u_i - h_i - D_i``,
    ``h_i <- h_i + D_i``.

    Parameters
    ----------
    eta : float or None
        Weight of the error term in what is compressed (> 0). None (the default): the
        compressor's contraction parameter ``a`` of each compressed unit (``K/d`` for Top-K),
        the order the paper's analysis takes ``eta`` at (Gao, Islamov & Stich, 2023,
        arXiv:2311.05645); ``eta = 1`` lets the error memory grow without bound under Top-K.
    """

    name = "econtrol"
    states = ("e", "h")

    def __init__(
        self, lr_server: float = 1.0, compress_first: bool = False, eta: float | None = None
    ) -> None:
        super().__init__(lr_server, compress_first)
        self.eta = None if eta is None else number("feedback.eta", eta, low=0, low_open=True)

    def etas(self, u: Arrays, compressor) -> dict[str, float]:
        """``eta`` for each array of ``u`` (its unit's ``a`` when ``eta`` is None)."""
        if self.eta is not None:
            return dict.fromkeys(u, self.eta)
        if compressor.scope == "flat":
            return dict.fromkeys(u, compressor.alpha(sum(np.size(v) for v in u.values())))
        return {k: compressor.alpha(np.size(v)) for k, v in u.items()}

    def encode(self, u, compressor, rng_for, dtype, state, clip=None):
        first = f"h/{next(iter(u))}" not in state
        e = {k: state.get(f"e/{k}", 0.0) for k in u}
        h = {k: state.get(f"h/{k}", 0.0) for k in u}
        if first and not self.compress_first:
            payload, d = _dense(dict(u), dtype, clip)
            new_e = {k: np.zeros(np.shape(u[k])) for k in u}
        else:
            eta = self.etas(u, compressor)
            v = {k: eta[k] * e[k] + u[k] - h[k] for k in u}
            payload, d = send_compressed(compressor, v, rng_for, dtype, clip)
            new_e = {k: e[k] + u[k] - h[k] - d[k] for k in u}
        for k in u:
            state[f"e/{k}"] = new_e[k]
            state[f"h/{k}"] = h[k] + d[k]
        return payload

    def undo(self, decoded, first, state):
        for k, d in decoded.items():
            if first:
                del state[f"e/{k}"], state[f"h/{k}"]
            else:
                state[f"h/{k}"] = state[f"h/{k}"] - d
                state[f"e/{k}"] = state[f"e/{k}"] + d
