"""RoLoRA (Chen, Guo, Ju, Dalal, Zhu, Khisti, 2025, "Robust Federated Finetuning of LLMs via
Alternating Optimization of LoRA", https://arxiv.org/abs/2502.01755).

Rounds alternate between the two LoRA factors. In a ``B`` round every client trains ``B_i``
from the global ``B`` with ``A`` frozen at the global ``A`` (the same on every client) and
sends ``B_i`` (and the task head); the server sets ``B = sum_i p_i B_i``. In an ``A`` round the
roles swap. Because the frozen factor is shared,

    sum_i p_i s B_i A = s (sum_i p_i B_i) A        (B round)
    sum_i p_i s B A_i = s B (sum_i p_i A_i)        (A round)

so FedIT's product average becomes exact: the new global product is the mean of the clients'
products, to float rounding, in every round. Round 1 trains ``B`` (``first: B``): LoRA starts
from ``B = 0``, where ``A``'s gradient ``s B^T dL/dy x^T`` is zero, so an ``A`` round first would
leave the adapter unchanged.

Bytes. A client uploads only the factor it trained (``r m`` or ``r n`` numbers per layer: half
of FedIT's ``r (m + n)`` when ``m = n``) and the head. Downlink: a client must hold the current
global ``A`` and ``B`` before it trains. The server tracks the last round each client was sent
the global factors (acknowledged by its reply) and sends only the factors that changed since:
a client that took part in the previous round gets the factor aggregated in it (the one frozen
now); a client absent for two rounds or more, or new, gets both. The client keeps the global
factors it received in its ``Context.state`` (``fedsim.rolora``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedsim.adapters.base import AdapterSpec
from fedsim.errors import ConfigError
from fedsim.records import array_record, numpy_dict
from fedsim.strategy import AdapterStrategy, ClientUpdate, check_arrays

#: a client's Context.state record: the global factors it last received
STATE_HELD = "fedsim.rolora"
FACTORS = {"A": "lora_A.weight", "B": "lora_B.weight"}


class RoLoRA(AdapterStrategy):
    """Alternate which LoRA factor is trained and averaged (see the module docstring).

    Parameters
    ----------
    weighted : bool
        Weight clients by examples (FedIT's weights; the paper averages uniformly over its
        equal-sized clients).
    first : str
        The factor trained in round 1, ``B`` (default) or ``A``; round ``t`` trains ``first``
        when ``t`` is odd.
    """

    adapters = ("lora",)
    averages = True
    persistent_parameters = False
    #: what the refusals that need the same parameters every round say about this strategy
    changing_parameters = "trains A and B in alternate rounds"

    def __init__(self, weighted: bool = True, first: str = "B") -> None:
        super().__init__(weighted)
        if first not in FACTORS:
            raise ConfigError("strategy.first", first, "must be A or B")
        self.first = first
        self.synced: dict[int, int] = {}  # client -> the round it was last sent both factors
        self._sent: dict[int, int] = {}
        self._round = 0  # the round whose messages were built last

    # ------------------------------------------------------------------ which factor
    def factor(self, server_round: int) -> str:
        """``"A"`` or ``"B"``: the factor trained in ``server_round``."""
        other = "A" if self.first == "B" else "B"
        return self.first if server_round % 2 == 1 else other

    def factor_names(self, spec: AdapterSpec, which: str) -> list[str]:
        return [names[FACTORS[which]] for names in spec.factors.values()]

    def round_trained(self, spec: AdapterSpec, server_round: int) -> list[str]:
        frozen = set(self.factor_names(spec, "B" if self.factor(server_round) == "A" else "A"))
        return [n for n in spec.trained if n not in frozen]

    # ------------------------------------------------------------------ client half
    def client_receive(self, model, spec, arrays, call) -> None:
        factors = set(self.factor_names(spec, "A") + self.factor_names(spec, "B"))
        state = call.state
        held = numpy_dict(state[STATE_HELD]) if STATE_HELD in state else {}
        held.update({k: v for k, v in arrays.items() if k in factors})
        missing = sorted(factors - set(held))
        if missing:
            raise RuntimeError(f"RoLoRA: client {call.client} holds no global {missing[0]}")
        state[STATE_HELD] = array_record(held)
        spec.load(model, {**held, **arrays})

    def sent_arrays(self, model, spec, call) -> dict:
        params = spec.parameters_of(model)
        return {n: params[n] for n in self.round_trained(spec, call.server_round)}

    # ------------------------------------------------------------------ server half
    def downlink(self, server_round: int, client: int, arrays: ArrayRecord) -> ArrayRecord:
        """The head and the factors ``client`` lacks: both if it was last sent them two or
        more rounds ago (or never), else the one aggregated in the previous round."""
        self._sent[client], self._round = server_round, server_round
        last = self.synced.get(client)
        if last is None or server_round - last >= 2:
            return arrays
        spec = self.context.spec
        held = set(self.factor_names(spec, self.factor(server_round)))
        return ArrayRecord({k: v for k, v in arrays.items() if k not in held})

    def acknowledge(self, server_round: int, updates: list[ClientUpdate]) -> None:
        super().acknowledge(server_round, updates)
        for u in updates:
            self.synced[u.client] = self._sent.get(u.client, server_round)

    def _round_names(self, server_round: int) -> list[str]:
        return self.round_trained(self.context.spec, server_round)

    def reference(self, client: int, server_round: int) -> dict[str, np.ndarray]:
        return {k: self.held[k] for k in self._round_names(server_round)}

    def check_reply(self, client: int, arrays: ArrayRecord) -> str | None:
        names = self._round_names(self._round)
        return check_arrays(arrays, {n: self.current[n].shape for n in names})

    def aggregate(
        self, server_round: int, current: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        return {**current, **self.average(updates)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "synced": dict(self.synced)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.synced = {int(c): int(r) for c, r in state["synced"].items()}
        super().load_state_dict(state)
