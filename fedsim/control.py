"""Control variates against client drift (config group ``control``): SCAFFOLD.

SCAFFOLD (Karimireddy et al., 2020, https://arxiv.org/abs/1910.06378), option II of its
control-variate update, over the global arrays (the parameters the strategy averages: LoRA's
``A`` and ``B`` and the head for FedIT, ``R`` for Fed-SB, ...). The server keeps ``c``; client
``i`` keeps ``c_i`` in its ``Context.state`` (both start at 0). In a round with sampled set
``S`` of ``N`` clients:

* the server sends ``x`` and ``c`` (``c`` in the global arrays' dtype: counted downlink);
* client ``i`` starts from ``y = x`` and takes its ``K`` local steps, each followed by the
  correction ``y <- y - eta_t (c - c_i)`` (:class:`fedsim.training.LocalTerms`; with plain SGD
  the step is the paper's ``y <- y - eta_t (g_i(y) - c_i + c)``);
* it computes ``c_i+ = c_i - c + (x - y) / sum_t eta_t`` (``K eta_l`` with a constant rate) and
  sends ``y`` (the strategy's reply) and ``Delta c_i = c_i+ - c_i`` (in the arrays' dtype, as
  its own record of the reply: counted uplink);
* the server takes ``x <- x + eta_g (mean_S(y_i) - x)``, ``mean_S`` being the strategy's own
  (weighted) mean, and ``c <- c + (1/N) sum_S Delta c_i`` (the paper's ``(|S|/N)`` times the
  mean), which keeps ``c`` the mean of all ``N`` clients' ``c_i``.

A client's ``c_i+`` becomes its ``c_i`` only once the server has aggregated the message that
carried ``Delta c_i``: each training message says the last round the server aggregated one of
the client's messages (``control-absorbed``), so a lost, late or refused reply, or one of a
skipped round, leaves both sides as if it had not been sent (the client keeps the change it
sent pending until then).

As a stage of the uplink chain: its server half adds ``c`` to each training message, screens
each reply's ``Delta c_i`` (names, shapes, finite values) and wraps the aggregation (the
server step on ``x`` and the update of ``c``, committed once the round's result is accepted);
its client half takes ``c`` out of the message, gives the local steps their offset
``c - c_i`` (:meth:`ControlVariates.step_offset`) and adds ``Delta c_i`` to the reply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord

from fedsim import keys
from fedsim.messages import check_arrays, extend_record, split_prefix, with_prefix
from fedsim.records import array_record, numpy_dict
from fedsim.uplink import Arrays, RoundInfo, Stage
from fedsim.validate import number

#: prefix of the server's control variate in a training message (``control/<name>``)
PREFIX = "control/"


class Control:
    """Base class of the ``control`` group (built from ``conf/control/*.yaml``)."""

    name = "control"
    #: the run has a control stage
    active = False


class NoControl(Control):
    """``control=none``: plain local steps."""

    name = "none"


class Scaffold(Control):
    """``control=scaffold`` (see the module docstring).

    Parameters
    ----------
    lr_server : float
        ``eta_g``, the server's step on the mean change of the clients' arrays (> 0); 1 makes
        it the strategy's own aggregate.
    """

    name = "scaffold"
    active = True

    def __init__(self, lr_server: float = 1.0) -> None:
        self.lr_server = number("control.lr_server", lr_server, low=0, low_open=True)


class ControlVariates(Stage):
    """SCAFFOLD's server and client halves (see the module docstring)."""

    name = "control"
    needs_reference = True

    def __init__(self, control: Scaffold) -> None:
        self.lr_server = control.lr_server
        self.c: Arrays = {}  # the server's variate (float64)
        #: client -> the last round whose reply (and Delta c_i) the server aggregated
        self.absorbed: dict[int, int] = {}
        self._deltas: dict[int, Arrays] = {}  # this round's screened Delta c_i, by client
        self._pending: tuple[int, Arrays, list[int]] | None = None  # round, new c, clients
        self._held: dict[int, tuple[Arrays, Arrays]] = {}  # client half: client -> c, c_i

    # ------------------------------------------------------------------ server: messages
    def begin_round(self, info: RoundInfo):
        if not self.c:
            self.c = {k: np.zeros(np.shape(v)) for k, v in info.current.items()}
        self._deltas, self._pending = {}, None
        return None

    def outgoing(self, info, client, arrays, config):
        c = {k: v.astype(np.asarray(info.current[k]).dtype) for k, v in self.c.items()}
        mine = ConfigRecord({**config, keys.CONTROL_ABSORBED: self.absorbed.get(client, 0)})
        return extend_record(arrays, with_prefix(PREFIX, c)), mine

    # ------------------------------------------------------------------ client half
    def receive(self, call, arrays):
        plain, c = split_prefix(PREFIX, arrays)
        if not c:
            raise RuntimeError("the server sent no control variate (control=scaffold)")
        c = {k: np.asarray(v, np.float64) for k, v in c.items()}
        self._held[call.client] = (c, self.client_variate(call, c))
        return plain

    def client_variate(self, call, c: Mapping[str, np.ndarray]) -> Arrays:
        """The client's ``c_i`` (zeros at first), after the change it sent last is committed
        (the server aggregated it) or dropped (it did not)."""
        state = call.state
        c_i = numpy_dict(state[keys.STATE_CONTROL]) if keys.STATE_CONTROL in state else {}
        if keys.STATE_CONTROL_INFO in state:
            sent = int(state[keys.STATE_CONTROL_INFO][keys.SERVER_ROUND])
            if int(call.config.get(keys.CONTROL_ABSORBED, 0)) >= sent:
                pending = numpy_dict(state[keys.STATE_CONTROL_PENDING])
                for k, d in pending.items():
                    c_i[k] = c_i.get(k, 0.0) + d.astype(np.float64)
                state[keys.STATE_CONTROL] = array_record(c_i)
            del state[keys.STATE_CONTROL_PENDING], state[keys.STATE_CONTROL_INFO]
        return {k: c_i[k] if k in c_i else np.zeros(np.shape(v)) for k, v in c.items()}

    def step_offset(self, call) -> Arrays:
        c, c_i = self._held[call.client]
        return {k: c[k] - c_i[k] for k in c}

    def send(self, sending, out) -> None:
        call = sending.call
        c, _ = self._held.pop(call.client)
        trained, x = out.numpy(), sending.reference
        delta = {  # c_i+ - c_i = (x - y) / sum_t eta_t - c
            k: (
                (np.asarray(x[k], np.float64) - np.asarray(trained[k], np.float64)) / sending.lr_sum
                - c[k]
            ).astype(np.asarray(trained[k]).dtype)
            for k in c
        }
        call.state[keys.STATE_CONTROL_PENDING] = array_record(delta)
        call.state[keys.STATE_CONTROL_INFO] = ConfigRecord({keys.SERVER_ROUND: call.server_round})
        out.records[keys.CONTROL] = delta

    # ------------------------------------------------------------------ server: replies
    def screen(self, info, client, reply):
        content = reply.content
        if keys.CONTROL not in content.array_records:
            return "rejected", "malformed reply: no control variate change (control=scaffold)"
        record = content[keys.CONTROL]
        reason = check_arrays(record, {k: np.shape(v) for k, v in info.current.items()})
        if reason is not None:
            return "rejected", f"{reason} (its control variate change)"
        self._deltas[client] = {k: v.astype(np.float64) for k, v in numpy_dict(record).items()}
        return None

    def wrap(self, inner):
        return _Controlled(self, inner)

    def server_step(self) -> str:
        return "control=scaffold's server step"

    def prepare(self, info: RoundInfo, clients: list[int]) -> None:
        """``c + (1/N) sum_S Delta c_i``, committed by :meth:`acknowledge` once the round's
        result is accepted."""
        new = {k: v.copy() for k, v in self.c.items()}
        for client in clients:
            for k, d in self._deltas[client].items():
                new[k] += d / info.num_clients
        self._pending = (info.server_round, new, list(clients))

    def acknowledge(self, server_round: int, clients: list[int]) -> None:
        if self._pending is None or self._pending[0] != server_round:
            return
        _, self.c, aggregated = self._pending
        self.absorbed.update({client: server_round for client in aggregated})
        self._pending = None

    def state_dict(self) -> dict[str, Any]:
        return {"c": dict(self.c), "absorbed": dict(self.absorbed)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.c = {k: np.asarray(v, np.float64) for k, v in state["c"].items()}
        self.absorbed = {int(c): int(r) for c, r in state["absorbed"].items()}


class _Controlled:
    """The aggregation inside SCAFFOLD's server step: ``x + eta_g (inner - x)`` (the inner
    result itself when ``eta_g = 1``), and ``c``'s update prepared."""

    def __init__(self, stage: ControlVariates, inner) -> None:
        self.stage, self.inner = stage, inner

    def aggregate(self, info: RoundInfo, updates) -> Arrays:
        new = self.inner.aggregate(info, updates)
        self.stage.prepare(info, [u.client for u in updates])
        eta = self.stage.lr_server
        if eta == 1.0:
            return new
        return {
            k: np.asarray(x, np.float64) + eta * (np.asarray(new[k], np.float64) - x)
            for k, x in info.current.items()
        }

    def linear(self, info, updates):
        raise RuntimeError("control=scaffold has no linear form (central DP is refused with it)")
