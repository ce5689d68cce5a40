"""HetLoRA (Cho et al., 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", https://arxiv.org/abs/2401.06432): zero-padded, sparsity-weighted
aggregation of heterogeneous ranks, with rank self-pruning.

The server holds the global adapter at the largest rank ``r_max = adapter.r`` (``A``:
``r_max x n``, ``B``: ``m x r_max``, scale ``s = alpha / r_max``). Each round:

1. **Distribution by truncation.** Client ``i`` of current rank ``r_i`` receives the first
   ``r_i`` rows of ``A`` and columns of ``B`` (and the task head): ``r_i (m + n)`` values a
   layer. It keeps the global scale ``s``, so its model is the global adapter truncated to its
   rank (with ``alpha / r_i`` the truncated components would be rescaled by ``r_max / r_i``).
2. **Local training with rank self-pruning.** With ``k = min(floor(gamma r_i), r_i - 1)`` the
   client adds ``lambda sum_layers ||B[:, k:r_i]||_F ||A[k:r_i]||_F`` to its loss (the
   gradient is added to the loss's, after DP-SGD's noise: it does not depend on the data). If
   after training that sum is smaller than in what it received, it prunes: it sends (and from
   then on trains) rank ``k``. One rank per client, over all layers.
3. **Zero-padded, sparsity-weighted aggregation.** Every client's factors are zero-padded to
   ``r_max`` and averaged over all the round's clients with weights, per layer,
   ``w_i = ||B_i A_i||_F / sum_j ||B_j A_j||_F`` (``sparsity_weighted: false``: the example
   weights ``p_i``; also when every norm is 0): ``A = sum_i w_i pad(A_i)``,
   ``B = sum_i w_i pad(B_i)``. A rank component held by few clients is averaged with the
   others' zeros, as in the paper. The head: ``sum_i p_i h_i``.

The exactness diagnostic compares the change of ``s B A`` with
``dW* = sum_i w_i s (B_i A_i - B[:, :r_i] A[:r_i])`` (each client's change from the truncation
it started from, with the same weights ``w_i``): it measures what the product of averaged
factors and the zero padding lose, not the choice of weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedsim.adapters.base import AdapterSpec
from fedsim.records import array_record, numpy_dict
from fedsim.strategy import AdapterStrategy, ClientCall, ClientUpdate, weighted_mean
from fedsim.validate import boolean, number

A, B = "lora_A.weight", "lora_B.weight"


def keep_rank(r: int, gamma: float) -> int:
    """The rank a client of rank ``r`` prunes to: ``min(floor(gamma r), r - 1)``, at least 1."""
    return max(1, min(math.floor(gamma * r), r - 1))


class HetLoRA(AdapterStrategy):
    """Truncate the global adapter to each client's rank; zero-pad and weight by sparsity.

    Parameters
    ----------
    weighted : bool
        Weight the head (and the fallback of the factors' weights) by examples.
    sparsity_weighted : bool
        Weight the factors by ``||B_i A_i||_F`` (the paper); false: by ``p_i``.
    prune_gamma : float
        The pruning factor ``gamma`` in (0, 1): a pruned client keeps ``floor(gamma r_i)``.
    prune_lambda : float
        The regulariser's weight ``lambda`` (>= 0); 0 turns self-pruning off.
    """

    adapters = ("lora",)
    heterogeneous_ranks = True
    compressible = False

    def __init__(
        self,
        weighted: bool = True,
        sparsity_weighted: bool = True,
        prune_gamma: float = 0.99,
        prune_lambda: float = 0.01,
    ) -> None:
        super().__init__(weighted)
        self.sparsity_weighted = boolean("strategy.sparsity_weighted", sparsity_weighted)
        self.prune_gamma = number(
            "strategy.prune_gamma", prune_gamma, 0, 1, low_open=True, high_open=True
        )
        self.prune_lambda = number("strategy.prune_lambda", prune_lambda, low=0)
        self.pruned: dict[int, int] = {}  # client -> its rank after self-pruning (server)
        self._received: dict[int, tuple[int, float]] = {}  # client -> (rank, tail) (client)

    @property
    def prunes_ranks(self) -> bool:
        return self.prune_lambda > 0

    def rank(self, client: int, spec: AdapterSpec) -> int:
        return self.pruned.get(client, super().rank(client, spec))

    # ------------------------------------------------------------------ server half
    def downlink(self, server_round: int, client: int, arrays: ArrayRecord) -> ArrayRecord:
        spec = self.context.spec
        r = self.rank(client, spec)
        out = numpy_dict(arrays)
        for names in spec.factors.values():
            out[names[A]] = np.ascontiguousarray(out[names[A]][:r])
            out[names[B]] = np.ascontiguousarray(out[names[B]][:, :r])
        return array_record(out)

    def check_reply(self, client: int, arrays: ArrayRecord) -> str | None:
        spec = self.context.spec
        first = spec.factors[spec.adapted_modules[0]][A]
        shape = tuple(arrays[first].shape) if first in arrays else ()
        r = shape[0] if shape else 0
        if not 1 <= r <= self.rank(client, spec):
            return f"{first}: rank {r}; client {client} trains rank {self.rank(client, spec)}"
        return self.check_reply_at_rank(arrays, r)

    def layer_weights(self, spec: AdapterSpec, module: str, updates: list[ClientUpdate]):
        """``w_i`` of one layer: ``||B_i A_i||_F`` normalised, or ``p_i``."""
        p = self.weights(updates)
        if not self.sparsity_weighted:
            return p
        names = spec.factors[module]
        norms = np.array(
            [
                np.linalg.norm(
                    u.arrays[names[B]].astype(np.float64) @ u.arrays[names[A]].astype(np.float64)
                )
                for u in updates
            ]
        )
        return norms / norms.sum() if norms.sum() > 0 else p

    def aggregate(
        self, server_round: int, current: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        spec = self.context.spec
        p = self.weights(updates)
        out = weighted_mean([{h: u.arrays[h] for h in spec.heads} for u in updates], p)
        for module in spec.adapted_modules:
            names = spec.factors[module]
            w = self.layer_weights(spec, module, updates)
            a = np.zeros(current[names[A]].shape)
            b = np.zeros(current[names[B]].shape)
            for wi, u in zip(w, updates):
                r = u.arrays[names[A]].shape[0]
                a[:r] += float(wi) * u.arrays[names[A]].astype(np.float64)
                b[:, :r] += float(wi) * u.arrays[names[B]].astype(np.float64)
            out[names[A]], out[names[B]] = a, b
        first = spec.factors[spec.adapted_modules[0]][A]
        self.round_metrics["client_rank_mean"] = float(
            np.mean([u.arrays[first].shape[0] for u in updates])
        )
        return out

    def acknowledge(self, server_round: int, updates: list[ClientUpdate]) -> None:
        super().acknowledge(server_round, updates)
        spec = self.context.spec
        first = spec.factors[spec.adapted_modules[0]][A]
        for u in updates:
            self.pruned[u.client] = int(u.arrays[first].shape[0])

    def diagnostic_ideal(self, spec, frozen, current, updates) -> dict[str, np.ndarray]:
        s = spec.adapter.alpha / spec.adapter.r
        p = self.weights(updates)
        ideal = {
            h: sum(float(w) * (u.arrays[h] - current[h]) for w, u in zip(p, updates))
            for h in spec.heads
        }
        for module in spec.adapted_modules:
            names = spec.factors[module]
            w = self.layer_weights(spec, module, updates)
            a0, b0 = current[names[A]].astype(np.float64), current[names[B]].astype(np.float64)
            total = 0.0
            for wi, u in zip(w, updates):
                r = self.rank(u.client, spec)  # what it started from (before it pruned)
                mine = u.arrays[names[B]].astype(np.float64) @ u.arrays[names[A]].astype(np.float64)
                total = total + float(wi) * s * (mine - b0[:, :r] @ a0[:r])
            ideal[module] = total
        return ideal

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pruned": dict(self.pruned)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pruned = {int(c): int(r) for c, r in state.get("pruned", {}).items()}
        super().load_state_dict(state)

    # ------------------------------------------------------------------ client half
    def client_receive(self, model, spec, arrays, call: ClientCall) -> None:
        factors = {n for names in spec.factors.values() for n in names.values()}
        spec.load(model, {k: v for k, v in arrays.items() if k not in factors})
        params = spec.parameters_of(model)
        r = arrays[spec.factors[spec.adapted_modules[0]][A]].shape[0]
        with torch.no_grad():
            for names in spec.factors.values():
                a, b = params[names[A]], params[names[B]]
                a.zero_()
                b.zero_()
                a[:r].copy_(torch.from_numpy(np.asarray(arrays[names[A]])))
                b[:, :r].copy_(torch.from_numpy(np.asarray(arrays[names[B]])))
        self._received[call.client] = (r, self._tail(model, spec, r))

    def _tail(self, model, spec: AdapterSpec, r: int) -> float:
        """``sum_layers ||B[:, k:r]||_F ||A[k:r]||_F`` of the model's factors."""
        k = keep_rank(r, self.prune_gamma)
        params = spec.parameters_of(model)
        total = 0.0
        for names in spec.factors.values():
            a, b = params[names[A]].detach(), params[names[B]].detach()
            total += float(a[k:r].double().norm()) * float(b[:, k:r].double().norm())
        return total

    def local_penalty(self, spec: AdapterSpec, call: ClientCall):
        r = self._received[call.client][0]
        if self.prune_lambda == 0 or r < 2:
            return None
        k, lam = keep_rank(r, self.prune_gamma), self.prune_lambda
        pairs = [(names[A], names[B]) for names in spec.factors.values()]

        @torch.no_grad()
        def penalty(names, tensors) -> None:  # the gradient of lam ||A_t|| ||B_t||
            by = dict(zip(names, tensors))
            for a_name, b_name in pairs:
                a, b = by[a_name], by[b_name]
                at, bt = a[k:r], b[:, k:r]
                na, nb = at.norm(), bt.norm()
                if float(na) == 0.0 or float(nb) == 0.0:
                    continue
                for p, part, grad in (
                    (a, (slice(k, r),), lam * nb * at / na),
                    (b, (slice(None), slice(k, r)), lam * na * bt / nb),
                ):
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad[part] += grad

        return penalty

    def sent_arrays(self, model, spec, call: ClientCall) -> dict:
        r, before = self._received.get(call.client, (self.rank(call.client, spec), 0.0))
        if self.prune_lambda > 0 and r > 1 and self._tail(model, spec, r) < before:
            r = keep_rank(r, self.prune_gamma)
        params = spec.parameters_of(model)
        out = {h: params[h] for h in spec.heads}
        for names in spec.factors.values():
            out[names[A]] = params[names[A]][:r]
            out[names[B]] = params[names[B]][:, :r]
        return out
