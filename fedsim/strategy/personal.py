"""Strategies whose clients keep some trained parameters to themselves (FedSA, ``local``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from torch import nn

from fedsim import keys
from fedsim.adapters.base import AdapterSpec
from fedsim.messages import ClientUpdate, extend_record, split_prefix, with_prefix
from fedsim.records import array_record, numpy_dict
from fedsim.strategy.base import AdapterStrategy

#: prefix of a personal parameter's initial value in a message (``initial/<parameter name>``)
INITIAL = "initial/"


class PersonalStrategy(AdapterStrategy):
    """A strategy whose clients keep some trained parameters to themselves.

    The :meth:`personal_names` parameters never leave the client: they are stored in its
    ``Context.state`` after training and loaded before training and evaluation; a client that
    has not trained yet starts from the adapter's initial values. Those come from the seed
    (every process builds them), or, for an adapter initialised from data (LoRA-SB's gradient
    init), from the server, once, with the frozen factors (counted). There is no global model,
    so the server does not evaluate one (:attr:`personalised`); clients evaluate their own.
    """

    personalised = True

    def __init__(self, weighted: bool = True) -> None:
        super().__init__(weighted)
        self._initial: dict[str, np.ndarray] | None = None  # per process, from the fresh model
        self.initial_personal: dict[str, np.ndarray] = {}  # server: data-derived initial values
        self.has_initial: set[int] = set()  # clients known to hold them

    def personal_names(self, spec: AdapterSpec) -> list[str]:
        raise NotImplementedError

    def global_names(self, spec: AdapterSpec) -> list[str]:
        personal = set(self.personal_names(spec))
        return [n for n in spec.sent if n not in personal]

    # ------------------------------------------------------------------ server half
    def initial_arrays(self, model: nn.Module, spec: AdapterSpec) -> dict[str, np.ndarray]:
        out = super().initial_arrays(model, spec)
        self.initial_personal = {}
        if spec.adapter is not None and spec.adapter.frozen_source == "data":
            params = spec.parameters_of(model)
            self.initial_personal = {
                n: params[n].detach().cpu().numpy().copy() for n in self.personal_names(spec)
            }
        return out

    def downlink(self, server_round: int, client: int, arrays: ArrayRecord) -> ArrayRecord:
        out = super().downlink(server_round, client, arrays)
        if client in self.has_initial:
            return out
        return extend_record(out, with_prefix(INITIAL, self.initial_personal))

    def evaluate_downlink(self, arrays: ArrayRecord) -> ArrayRecord:
        out = super().evaluate_downlink(arrays)
        return extend_record(out, with_prefix(INITIAL, self.initial_personal))

    def acknowledge(self, server_round: int, updates: list[ClientUpdate]) -> None:
        super().acknowledge(server_round, updates)
        self.has_initial.update(u.client for u in updates)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "initial_personal": dict(self.initial_personal),
            "has_initial": sorted(self.has_initial),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.initial_personal = dict(state["initial_personal"])
        self.has_initial = {int(c) for c in state["has_initial"]}
        super().load_state_dict(state)

    # ------------------------------------------------------------------ client half
    def _load_personal(self, model: nn.Module, spec: AdapterSpec, state, initial: dict) -> None:
        if self._initial is None:
            params = spec.parameters_of(model)
            self._initial = {
                n: params[n].detach().cpu().numpy().copy() for n in self.personal_names(spec)
            }
        if keys.STATE_PERSONAL in state:
            spec.load(model, numpy_dict(state[keys.STATE_PERSONAL]))
        else:
            spec.load(model, initial or self._initial)

    def client_receive(self, model, spec, arrays, call) -> None:
        plain, initial = split_prefix(INITIAL, arrays)
        super().client_receive(model, spec, plain, call)
        self._load_personal(model, spec, call.state, initial)

    def client_send(self, model, spec, call) -> dict:
        params = spec.parameters_of(model)
        call.state[keys.STATE_PERSONAL] = array_record(
            {n: params[n] for n in self.personal_names(spec)}
        )
        return self.sent_arrays(model, spec, call)

    def sent_arrays(self, model, spec, call) -> dict:
        params = spec.parameters_of(model)
        return {n: params[n] for n in self.global_names(spec)}

    def client_evaluate(self, model, spec, arrays, call) -> None:
        plain, initial = split_prefix(INITIAL, arrays)
        super().client_evaluate(model, spec, plain, call)
        self._load_personal(model, spec, call.state, initial)
