"""Compression with error feedback as a stage of the uplink chain (:mod:`fedsim.uplink`).

Client half: the client's pseudo-gradient ``u_i = (x - x_i) / lr`` over the arrays its strategy
sends is encoded by the feedback method around the compressor (:mod:`fedsim.feedback`), and the
packed payload is what travels. Server half: each payload is decoded (a malformed one is refused
before aggregation); then either the feedback method takes its own server step (EF21, EControl)
or the strategy aggregates the server's estimates of the clients' arrays,
``reference - lr_server * lr * m_i``. Under central DP the client clips what it compresses to
``clip / lr`` and the noise stage sums the decoded messages (:meth:`Codec.linear`).

A message the server did not aggregate (lost, late, refused, or in a skipped round) is taken
back from the client's memories the next time it trains: every training message tells the
client the last round whose message from it the server aggregated (``absorbed``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedsim import keys
from fedsim.compression import Compressor, decompress_arrays, raw_extra
from fedsim.feedback import Arrays, Feedback, Naive, rng_factory
from fedsim.records import array_record, numpy_dict
from fedsim.uplink import Linear, Stage


def compresses(compressor: Compressor, feedback: Feedback) -> bool:
    """Whether client updates travel in any other form than the plain arrays: a compressor
    that is active, or a feedback method other than :class:`~fedsim.feedback.Naive` (whose
    memories change what is sent even without one)."""
    return compressor.active or not isinstance(feedback, Naive)


class Codec(Stage):
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
    diagnose : bool
        Clients also attach their uncompressed arrays (measurement only, for the aggregation
        error; not traffic).
    """

    name = "compression"
    needs_reference = True
    decodes = True

    def __init__(
        self,
        compressor: Compressor,
        feedback: Feedback,
        lr: float,
        seed: int,
        clip: float | None = None,
        diagnose: bool = False,
    ) -> None:
        self.compressor, self.feedback, self.lr, self.seed = compressor, feedback, lr, seed
        self.clip, self.diagnose = clip, diagnose
        #: client -> the last round whose message the server aggregated
        self.absorbed: dict[int, int] = {}
        self._decoded: dict[int, Arrays] = {}  # this round's decoded payloads, by client

    # ------------------------------------------------------------------ client half
    def send(self, sending, out) -> None:
        trained = out.numpy()
        call = sending.call
        absorbed = int(sending.config.get(keys.ABSORBED, 0))
        out.arrays = self.client_encode(
            sending.reference, trained, call.client, call.server_round, call.state, absorbed
        )
        extra = raw_extra(self.compressor, out.arrays, trained)
        if extra:  # what the fixed-width format would have sent more (bytes_up_raw)
            out.metrics[keys.RAW_EXTRA] = float(extra)
        if self.diagnose:
            out.diagnostic = trained

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
    def begin_round(self, info):
        self._decoded = {}
        return None

    def outgoing(self, info, client, arrays, config):
        return arrays, ConfigRecord({**config, keys.ABSORBED: self.absorbed.get(client, 0)})

    def screen(self, info, client, reply):
        try:
            self._decoded[client] = self.decode(
                numpy_dict(reply.content[keys.ARRAYS]),
                info.reference(client),
                client,
                info.round_of(client),
            )
        except (ValueError, KeyError, IndexError) as e:
            return "rejected", f"malformed compressed payload: {e}"
        return None

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

    def wrap(self, inner):
        return _Decoded(self, inner)

    def server_step(self) -> str:
        if self.feedback.replaces_aggregation:
            return f"feedback={self.feedback.name}'s server step"
        return f"the decoding of compressor={self.compressor.name}'s messages"

    def state_dict(self):
        return {"feedback": self.feedback.state_dict(), "absorbed": dict(self.absorbed)}

    def load_state_dict(self, state) -> None:
        self.feedback.load_state_dict(state["feedback"])
        self.absorbed = {int(c): int(r) for c, r in state["absorbed"].items()}


class _Decoded:
    """The aggregation of decoded messages: the feedback method's own step (EF21, EControl),
    or the inner aggregation of the server's estimates of the clients' arrays."""

    def __init__(self, codec: Codec, inner) -> None:
        self.codec, self.inner = codec, inner

    def _messages(self, info, updates) -> list[Arrays]:
        decoded = [self.codec._decoded[u.client] for u in updates]
        self.codec.absorbed.update({u.client: info.server_round for u in updates})
        return decoded

    def aggregate(self, info, updates):
        codec = self.codec
        decoded = self._messages(info, updates)
        if codec.feedback.replaces_aggregation:
            return codec.step(info.current, decoded, info.num_clients)
        estimates = [
            replace(u, arrays=codec.estimate(info.reference(u.client), d))
            for u, d in zip(updates, decoded)
        ]
        return self.inner.aggregate(info, estimates)

    def linear(self, info, updates) -> Linear:
        """Sums of messages ``m_i`` (bounded by ``clip / lr``): EF21 / EControl step with the
        sum as one message (the mean over all ``N`` clients' states, as without noise), naive
        and EF14 ``x <- x - lr_server * lr * sum / divisor``."""
        codec, current = self.codec, info.current
        step = codec.feedback.lr_server * codec.lr

        def apply(total: Arrays, divisor: float) -> Arrays:
            if codec.feedback.replaces_aggregation:
                return codec.step(current, [total], info.num_clients)
            return {  # an array no client sent (RoLoRA's frozen factor) stays
                k: np.asarray(current[k], np.float64) - step * total.get(k, 0) / divisor
                for k in current
            }

        return Linear(self._messages(info, updates), 1 / codec.lr, apply)
