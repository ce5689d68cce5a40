"""FLoRA (Wang et al., 2024, https://arxiv.org/abs/2409.05976): stacking, with per-client ranks.

Client ``i`` trains a fresh LoRA adapter of rank ``r_i`` every round (``A`` random from a seed
of the run, round and client; ``B = 0``) and sends ``B_i``, ``A_i`` (``r_i (m+n)`` per layer).
The server stacks them, ``B = [B_1 .. B_k]``, ``A = [p_1 s_1 A_1; ..; p_k s_k A_k]``
(``s_i = alpha / r_i``), and folds ``B A = sum_i p_i s_i B_i A_i`` into the frozen base of every
client: exact, whatever the ranks. Downlink: the task head and the merges the client lacks,
as stacked factors (``(sum_j r_j)(m+n)`` each) or dense ``m n``, whichever is smaller (see
:mod:`fedsim.strategy.folding`).

Per-client ranks come from ``adapter.client_ranks`` (:mod:`fedsim.adapters.ranks`; at most
``adapter.r``, which sizes the model's adapter): a client of lower rank uses its first ``r_i``
rows of ``A`` and columns of ``B`` and keeps the rest at zero. Without them every client trains
``adapter.r``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.adapters.base import AdapterSpec
from fedsim.strategy import ClientCall, ClientUpdate, FoldingStrategy, weighted_mean

A, B = "lora_A.weight", "lora_B.weight"


class FLoRA(FoldingStrategy):
    """Stack the clients' adapters, fold their product into the base, start afresh."""

    adapters = ("lora",)
    persistent_parameters = False
    keeps_adapters = False
    heterogeneous_ranks = True

    # ------------------------------------------------------------------ server half
    def global_names(self, spec: AdapterSpec) -> list[str]:
        return list(spec.heads)

    def check_reply(self, client: int, arrays: ArrayRecord) -> str | None:
        return self.check_reply_at_rank(arrays, self.rank(client, self.context.spec))

    def aggregate(
        self, server_round: int, current: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        spec = self.context.spec
        p = self.weights(updates)
        heads = weighted_mean([{h: u.arrays[h] for h in spec.heads} for u in updates], p)
        change, factors = {}, {}
        alpha = spec.adapter.alpha
        for module, (m, n) in spec.shapes.items():
            names = spec.factors[module]
            bs = [u.arrays[names[B]] for u in updates]
            as_ = [u.arrays[names[A]] for u in updates]
            change[module] = sum(
                float(w) * spec.deltas(u.arrays, [module])[module] for w, u in zip(p, updates)
            )
            stacked = sum(a.shape[0] for a in as_)
            if stacked * (m + n) >= m * n:
                factors[module] = None
            else:
                left = np.concatenate(bs, axis=1)
                right = np.concatenate(
                    [
                        (float(w) * alpha / a.shape[0]) * a.astype(np.float64)
                        for w, a in zip(p, as_)
                    ],
                    axis=0,
                )
                factors[module] = (left, right.astype(as_[0].dtype))
        self.fold_in(server_round, change, factors)
        return heads

    def load_global(self, model: nn.Module, spec: AdapterSpec, arrays: dict) -> None:
        super().load_global(model, spec, arrays)
        self._reset_adapters(model, spec, None)

    # ------------------------------------------------------------------ client half
    def client_receive(self, model, spec, arrays, call: ClientCall) -> None:
        super().client_receive(model, spec, arrays, call)
        self._reset_adapters(model, spec, call)

    def sent_arrays(self, model, spec, call: ClientCall) -> dict:
        r = self.rank(call.client, spec)
        params = spec.parameters_of(model)
        out = {h: params[h] for h in spec.heads}
        for names in spec.factors.values():
            out[names[A]] = params[names[A]][:r]
            out[names[B]] = params[names[B]][:, :r]
        return out

    def client_evaluate(self, model, spec, arrays, call) -> None:
        super().client_evaluate(model, spec, arrays, call)
        self._reset_adapters(model, spec, None)

    def fresh_a(self, spec: AdapterSpec, seed: int, server_round: int, client: int) -> dict:
        """The client's fresh ``A`` of every adapted module (``r_i x n``), drawn from the run's
        seed, the round and the client: the server reproduces it at no cost."""
        r = self.rank(client, spec)
        mixed = np.random.SeedSequence([seed, server_round, client, 17])
        g = torch.Generator().manual_seed(int(mixed.generate_state(1)[0]))
        out = {}
        for module in spec.adapted_modules:
            fresh = torch.empty(r, spec.shapes[module][1])
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=g)
            out[module] = fresh
        return out

    def reference(self, client: int, server_round: int) -> dict[str, np.ndarray]:
        spec = self.context.spec
        out = {h: self.held[h] for h in spec.heads}
        dtype = next(iter(self.current.values())).dtype if self.current else np.float32
        fresh = self.fresh_a(spec, self.context.seed, server_round, client)
        for module, (m, _) in spec.shapes.items():
            out[spec.factors[module][A]] = fresh[module].numpy().astype(dtype)
            out[spec.factors[module][B]] = np.zeros((m, fresh[module].shape[0]), dtype=dtype)
        return out

    def _reset_adapters(self, model: nn.Module, spec: AdapterSpec, call: ClientCall | None) -> None:
        """``B = 0``; with a call, the client's fresh ``A`` (the rows beyond its rank zero)
        and its scale ``alpha / r_i``."""
        r = self.rank(call.client, spec) if call is not None else spec.adapter.r
        fresh = (
            self.fresh_a(spec, call.seed, call.server_round, call.client)
            if call is not None
            else None
        )
        with torch.no_grad():
            for module in spec.adapted_modules:
                layer = model.get_submodule(module)
                layer.lora_B.weight.zero_()
                layer.scaling = spec.adapter.alpha / r
                if fresh is not None:
                    layer.lora_A.weight.zero_()
                    layer.lora_A.weight[:r].copy_(fresh[module])
