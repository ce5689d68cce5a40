"""FlexLoRA (Bai et al., 2024, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", https://arxiv.org/abs/2402.11505): aggregate the
full-size update, give each client its truncated SVD.

Client ``i`` trains a LoRA adapter of its own rank ``r_i`` (``adapter.client_ranks``) with the
scale ``s_i = alpha / r_i`` and sends ``B_i``, ``A_i`` (``r_i (m + n)`` values a layer). The
server forms, per layer, the full-size weighted mean of the clients' adapters

    dW = sum_i p_i s_i B_i A_i                      (m x n, float64)

and keeps it as the global adapter: the global model the server evaluates (and exports) is
the dense ``W0 + dW``. Client ``i`` is sent dW's best rank-``r_i`` approximation, as factors
of its own scale: with ``dW = U S V^T``,

    B = U_r sqrt(S_r / s_i),  A = sqrt(S_r / s_i) V_r^T,   so  s_i B A = U_r S_r V_r^T,

``r_i (m + n)`` values a layer (and the task head). Before anything is aggregated (``dW = 0``)
a client starts from LoRA's initialisation at its rank: the first ``r_i`` rows of the model's
initial ``A`` (from the run's seed) and ``B = 0``, sent all the same.

The exactness diagnostic compares the change of the global model, ``dW_new - dW``, with the
mean of the clients' changes from what they started from, ``sum_i p_i (s_i B_i A_i - T_i(dW))``
(``T_i``: the rank-``r_i`` truncation): their difference is ``sum_i p_i T_i(dW) - dW``, exactly
what the truncations to the clients' ranks lose.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.adapters.base import AdapterSpec
from fedsim.records import array_record, numpy_dict
from fedsim.strategy import (
    AdapterStrategy,
    ClientCall,
    ClientUpdate,
    extend_record,
    split_prefix,
    weighted_mean,
)
from fedsim.strategy.folding import set_frozen_base

A, B = "lora_A.weight", "lora_B.weight"
BASE = "base/"


def truncation(dw: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``U_r``, ``S_r``, ``V_r^T`` of ``dw`` (float64)."""
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    return u[:, :r], s[:r], vt[:r]


class FlexLoRA(AdapterStrategy):
    """Average the clients' full-size updates; send each the truncated SVD at its rank."""

    adapters = ("lora",)
    heterogeneous_ranks = True
    compressible = False
    persistent_parameters = False  # each round's factors are a new SVD
    keeps_adapters = False
    folds_into_base = True  # the global change is dense, outside the global arrays

    def __init__(self, weighted: bool = True) -> None:
        super().__init__(weighted)
        self.base_delta: dict[str, np.ndarray] = {}  # module -> dW (float64)
        self.initial_a: dict[str, np.ndarray] = {}  # module -> the model's initial A
        self._start: dict[str, np.ndarray] = {}  # dW before this round's aggregation
        self._svd: dict[str, tuple] = {}  # module -> SVD of dW (this round's downlink)
        self._base0: dict[str, torch.Tensor] | None = None  # this process's pristine W0

    # ------------------------------------------------------------------ server half
    def global_names(self, spec: AdapterSpec) -> list[str]:
        return list(spec.heads)

    def initial_arrays(self, model: nn.Module, spec: AdapterSpec) -> dict[str, np.ndarray]:
        params = spec.parameters_of(model)
        self.initial_a = {
            m: params[spec.factors[m][A]].detach().cpu().numpy().copy()
            for m in spec.adapted_modules
        }
        return super().initial_arrays(model, spec)

    def factors(self, client: int) -> dict[str, np.ndarray]:
        """What ``client`` starts from: dW's rank-``r_i`` factors at its scale."""
        spec = self.context.spec
        r = self.rank(client, spec)
        s_i = spec.adapter.alpha / r
        dtype = next(iter(self.initial_a.values())).dtype
        out = {}
        for module, (m, _) in spec.shapes.items():
            names, dw = spec.factors[module], self.base_delta.get(module)
            if dw is None or not dw.any():
                a, b = self.initial_a[module][:r], np.zeros((m, r))
            else:
                if module not in self._svd:
                    self._svd[module] = np.linalg.svd(dw, full_matrices=False)
                u, s, vt = self._svd[module]
                root = np.sqrt(s[:r] / s_i)
                a, b = root[:, None] * vt[:r], u[:, :r] * root[None, :]
            out[names[A]] = np.ascontiguousarray(a, dtype=dtype)
            out[names[B]] = np.ascontiguousarray(b, dtype=dtype)
        return out

    def downlink(self, server_round: int, client: int, arrays: ArrayRecord) -> ArrayRecord:
        return array_record({**numpy_dict(arrays), **self.factors(client)})

    def evaluate_downlink(self, arrays: ArrayRecord) -> ArrayRecord:
        dtype = next(iter(self.initial_a.values())).dtype
        dense = {BASE + m: v.astype(dtype) for m, v in self.base_delta.items()}
        return extend_record(arrays, dense)

    def check_reply(self, client: int, arrays: ArrayRecord) -> str | None:
        return self.check_reply_at_rank(arrays, self.rank(client, self.context.spec))

    def aggregate(
        self, server_round: int, current: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        spec = self.context.spec
        p = self.weights(updates)
        heads = weighted_mean([{h: u.arrays[h] for h in spec.heads} for u in updates], p)
        self._start = dict(self.base_delta)
        for module, shape in spec.shapes.items():
            new = sum(
                float(w) * spec.deltas(u.arrays, [module])[module] for w, u in zip(p, updates)
            )
            self.round_fold[module] = new - self._start.get(module, np.zeros(shape))
            self.base_delta[module] = new
        self._svd = {}
        return heads

    def diagnostic_ideal(self, spec, frozen, current, updates) -> dict[str, np.ndarray]:
        p = self.weights(updates)
        ideal = {
            h: sum(float(w) * (u.arrays[h] - current[h]) for w, u in zip(p, updates))
            for h in spec.heads
        }
        for module in spec.adapted_modules:
            dw = self._start.get(module)
            total = 0.0
            for w, u in zip(p, updates):
                mine = spec.deltas(u.arrays, [module])[module]
                if dw is not None and dw.any():
                    us, s, vt = truncation(dw, self.rank(u.client, spec))
                    mine = mine - (us * s) @ vt
                total = total + float(w) * mine
            ideal[module] = total
        return ideal

    def load_global(self, model: nn.Module, spec: AdapterSpec, arrays: dict) -> None:
        self._set_base(model, spec, self.base_delta)
        super().load_global(model, spec, arrays)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "base_delta": dict(self.base_delta),
            "initial_a": dict(self.initial_a),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.base_delta = dict(state["base_delta"])
        self.initial_a = dict(state["initial_a"])
        self._svd = {}
        super().load_state_dict(state)

    # ------------------------------------------------------------------ client half
    def _set_base(self, model: nn.Module, spec: AdapterSpec, delta: Mapping[str, Any]) -> None:
        """The base weights ``W0 + delta`` (``W0``: as this process built the model) and the
        adapters off (``B = 0``)."""
        self._base0 = set_frozen_base(model, spec, self._base0, delta)
        params = spec.parameters_of(model)
        with torch.no_grad():
            for names in spec.factors.values():
                params[names[B]].zero_()

    def client_receive(self, model, spec, arrays, call: ClientCall) -> None:
        self._set_base(model, spec, {})
        factors = {n for names in spec.factors.values() for n in names.values()}
        spec.load(model, {k: v for k, v in arrays.items() if k not in factors})
        params = spec.parameters_of(model)
        r = self.rank(call.client, spec)
        with torch.no_grad():
            for module, names in spec.factors.items():
                a, b = params[names[A]], params[names[B]]
                a.zero_()
                a[:r].copy_(torch.from_numpy(np.asarray(arrays[names[A]])))
                b[:, :r].copy_(torch.from_numpy(np.asarray(arrays[names[B]])))
                model.get_submodule(module).scaling = spec.adapter.alpha / r

    def sent_arrays(self, model, spec, call: ClientCall) -> dict:
        r = self.rank(call.client, spec)
        params = spec.parameters_of(model)
        out = {h: params[h] for h in spec.heads}
        for names in spec.factors.values():
            out[names[A]] = params[names[A]][:r]
            out[names[B]] = params[names[B]][:, :r]
        return out

    def client_evaluate(self, model, spec, arrays, call) -> None:
        plain, dense = split_prefix(BASE, arrays)
        self._set_base(model, spec, dense)
        spec.load(model, plain)
