"""Error feedback for compressed updates (REFERENCE section 4): client and server halves.

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
from flwr.app import ConfigRecord, RecordDict

from fedsim import keys
from fedsim.compression import Compressor, clip_joint, compress_arrays, decompress_arrays
from fedsim.records import array_record, numpy_dict
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


def _send(compressor, value, rng_for, dtype, clip=None) -> tuple[dict, Arrays]:
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
        return _send(compressor, dict(u), rng_for, dtype, clip)[0]


class EF14(Feedback):
    """Classic error feedback: ``m_i = C(e_i + u_i)``, ``e_i <- e_i + u_i - m_i``."""

    name = "ef14"
    states = ("e",)

    def encode(self, u, compressor, rng_for, dtype, state, clip=None):
        v = {k: state.get(f"e/{k}", 0.0) + u[k] for k in u}
        payload, m = _send(compressor, v, rng_for, dtype, clip)
        for k in u:
            state[f"e/{k}"] = v[k] - m[k]
        return payload

    def undo(self, decoded, first, state):
        for k, m in decoded.items():  # nothing arrived: all of e + u is still to be sent
            state[f"e/{k}"] = state[f"e/{k}"] + m


class _Tracking(Feedback):
    """EF21 and EControl: a tracked estimate per client, its mean on the server."""

    replaces_aggregation = True
    estimate_key = "g"

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
            payload, c = _send(compressor, diff, rng_for, dtype, clip)
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
    eta : float
        Weight of the error term in what is compressed (> 0).
    """

    name = "econtrol"
    states = ("e", "h")

    def __init__(
        self, lr_server: float = 1.0, compress_first: bool = False, eta: float = 1.0
    ) -> None:
        super().__init__(lr_server, compress_first)
        self.eta = number("feedback.eta", eta, low=0, low_open=True)

    def encode(self, u, compressor, rng_for, dtype, state, clip=None):
        first = f"h/{next(iter(u))}" not in state
        e = {k: state.get(f"e/{k}", 0.0) for k in u}
        h = {k: state.get(f"h/{k}", 0.0) for k in u}
        if first and not self.compress_first:
            payload, d = _dense(dict(u), dtype, clip)
            new_e = {k: np.zeros(np.shape(u[k])) for k in u}
        else:
            v = {k: self.eta * e[k] + u[k] - h[k] for k in u}
            payload, d = _send(compressor, v, rng_for, dtype, clip)
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


# ----------------------------------------------------------------------------- the codec


class Codec:
    """A compressor and a feedback method, as one client and one server half.

    Parameters
    ----------
    compressor, feedback
        The built config groups.
    lr : float
        ``sim.lr``, the unit of the pseudo-gradient.
    seed : int
        The run's seed (compression randomness).
    clip : float, optional
        Central DP: the bound on ``lr`` times each message's L2 norm (parameter units, like the
        update bound of DP-FedAvg); what a client compresses is clipped to ``clip / lr`` first.
    """

    def __init__(
        self,
        compressor: Compressor,
        feedback: Feedback,
        lr: float,
        seed: int,
        clip: float | None = None,
    ) -> None:
        self.compressor, self.feedback, self.lr, self.seed = compressor, feedback, lr, seed
        self.clip = clip

    @property
    def active(self) -> bool:
        """Whether updates travel in any other form than the plain arrays."""
        return self.compressor.active or not isinstance(self.feedback, Naive)

    # ------------------------------------------------------------------ client half
    def client_encode(
        self,
        reference: Mapping[str, np.ndarray],
        trained: Mapping[str, np.ndarray],
        client: int,
        server_round: int,
        state: RecordDict,
        absorbed: int = 0,
    ) -> dict[str, np.ndarray]:
        """The payload a client sends for its trained arrays (its feedback state updated).

        ``absorbed`` is the last round whose message from this client the server aggregated
        (it says so in every training message); if the client's previous message is not among
        them, its effect on the memories is taken back first (:meth:`Feedback.undo`). The
        message sent is kept in the state until then (compressed: small).
        """
        dtype = np.asarray(next(iter(trained.values()))).dtype
        u = {
            k: (np.asarray(reference[k], np.float64) - np.asarray(trained[k], np.float64)) / self.lr
            for k in trained
        }
        memory = numpy_dict(state[keys.STATE_FEEDBACK]) if keys.STATE_FEEDBACK in state else {}
        if keys.STATE_PENDING_INFO in state:  # the message this client sent last time
            info = state[keys.STATE_PENDING_INFO]
            sent_round = int(info[keys.SERVER_ROUND])
            if absorbed < sent_round:
                pending = numpy_dict(state[keys.STATE_PENDING])
                shapes = {k: np.shape(v) for k, v in u.items()}
                rng_old = rng_factory(self.seed, sent_round, client)
                decoded = decompress_arrays(self.compressor, pending, shapes, rng_old, dtype)
                self.feedback.undo(decoded, bool(info["first"]), memory)
        first = not memory
        rng_for = rng_factory(self.seed, server_round, client)
        bound = None if self.clip is None else self.clip / self.lr
        payload = self.feedback.encode(u, self.compressor, rng_for, dtype, memory, clip=bound)
        if self.feedback.states:  # naive compression keeps nothing
            state[keys.STATE_FEEDBACK] = array_record(memory)
            state[keys.STATE_PENDING] = array_record(payload)
            state[keys.STATE_PENDING_INFO] = ConfigRecord(
                {keys.SERVER_ROUND: server_round, "first": first}
            )
        return payload

    # ------------------------------------------------------------------ server half
    def decode(
        self,
        payload: Mapping[str, np.ndarray],
        reference: Mapping[str, np.ndarray],
        client: int,
        server_round: int,
    ) -> Arrays:
        """The dense message (float64 by name); ValueError if the payload is malformed."""
        shapes = {k: np.shape(v) for k, v in reference.items()}
        dtype = np.asarray(next(iter(reference.values()))).dtype
        rng_for = rng_factory(self.seed, server_round, client)
        with np.errstate(invalid="ignore", over="ignore"):  # a spoiled payload: refused below
            decoded = decompress_arrays(self.compressor, payload, shapes, rng_for, dtype)
        for name, value in decoded.items():
            if not np.all(np.isfinite(value)):
                raise ValueError(f"non-finite values in {name}")
        return decoded

    def estimate(self, reference: Mapping[str, np.ndarray], decoded: Arrays) -> Arrays:
        """The server's estimate of the client's trained arrays, in the reference's dtypes."""
        step = self.feedback.lr_server * self.lr  # decoded: C(u_i) (naive) or m_i (EF14)
        return {
            k: (np.asarray(v, np.float64) - step * decoded[k]).astype(np.asarray(v).dtype)
            for k, v in reference.items()
        }

    def step(self, current: Mapping[str, np.ndarray], decoded: list[Arrays], num_clients: int):
        """EF21 / EControl: the new global arrays (float64)."""
        return self.feedback.step(current, decoded, num_clients, self.lr)


# ----------------------------------------------------------------------------- downlink

#: prefix of the compressed downlink in a message: ``down/<round>/<unit>/<part>`` for a
#: round's compressed step, ``down/upto<round>/<name>`` for the whole model as clients hold it
DOWN = "down/"


class EF21P:
    """EF21-P compression of the downlink (REFERENCE section 4), with catch-up.

    The server keeps ``w``, the global arrays as clients hold them; each round it sends
    ``c_t = C(x - w)`` and sets ``w <- w + c_t``, so clients train from ``w``, not ``x``. A client
    that was not sampled in some rounds is sent the steps it missed, or ``w`` itself in the
    arrays' dtype when that is smaller (always at its first participation: it holds nothing yet).
    Both sides add a step as ``(w in float64 + c).astype(dtype)``, so their ``w`` are identical.
    ``w`` and the round it is current to live in the client's ``Context.state``.
    """

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
        payload, step = _send(self.compressor, diff, self.rng_for(server_round), dtype)
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

    def acknowledge(self, clients) -> None:
        for c in clients:
            self.version[c] = self._sent.get(c, self.version.get(c))

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
    def receive(self, arrays: Mapping[str, np.ndarray], state: RecordDict) -> dict:
        """Rebuild ``w`` from the client's stored copy and the message; returns the arrays with
        the ``down/`` ones replaced by ``w`` (what the strategy's client half loads)."""
        from fedsim.strategy import split_prefix

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
