"""FedEx-LoRA (Singhal et al., 2025, https://arxiv.org/abs/2410.09432).

The server averages ``A`` and ``B`` as FedIT does, then folds the residual that FedIT leaves out,
``s (sum_i p_i B_i A_i - B A)``, into the frozen base ``W0`` of every client (sampled or not).
The global effective weight ``W0 + s B A`` then moves by exactly the mean of the clients'
updates. Uplink ``r(m+n)`` per layer; downlink ``r(m+n)`` plus the residuals the client has not
received yet (see :mod:`fedsim.strategy.folding`): a residual has rank at most ``(k-1) r`` and
travels as factors, or dense when that is smaller.

The residual folded on the server is computed in float64 against the averaged ``A`` and ``B``
as they are sent (rounded to the parameters' dtype), so the global model is exact however the
means were rounded. Clients receive it as factors in the parameters' dtype,
``[B_1 - B .. B_{k-1} - B] [p_1 s (A_1 - A_k); ..; p_{k-1} s (A_{k-1} - A_k)]`` (an identity
that needs ``sum_i p_i (B_i - B) = 0``), which equals the folded residual to that dtype's
precision.
"""

from __future__ import annotations

import numpy as np

from fedsim.strategy import ClientUpdate, FoldingStrategy, weighted_mean


class FedEx(FoldingStrategy):
    """FedIT averages plus the exact residual folded into the frozen base."""

    adapters = ("lora",)

    def aggregate(
        self, server_round: int, current: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        spec = self.context.spec
        p = self.weights(updates)
        mean = weighted_mean([u.arrays for u in updates], p)
        # The factors as clients will hold them: the means rounded to the global arrays' dtype
        # (the residual is folded against exactly these; heads stay exact until the final cast).
        sent = dict(mean)
        for names in spec.factors.values():
            for name in (names["lora_A.weight"], names["lora_B.weight"]):
                sent[name] = mean[name].astype(current[name].dtype).astype(np.float64)
        change, factors = {}, {}
        for module, names in spec.factors.items():
            a_name, b_name = names["lora_A.weight"], names["lora_B.weight"]
            mine = [_product(spec, names, u.arrays) for u in updates]
            target = sum(float(w) * d for w, d in zip(p, mine))
            change[module] = target - _product(spec, names, sent)
            bs = [u.arrays[b_name] for u in updates]
            as_ = [u.arrays[a_name] for u in updates]
            factors[module] = self._factors(bs, as_, p, mean[b_name])
        self.fold_in(server_round, change, factors)
        return sent  # the means as clients hold them: the fold above completes exactly these

    def _factors(self, bs, as_, p, b_mean) -> tuple[np.ndarray, np.ndarray] | None:
        """Rank-``(k-1) r`` factors of the residual, or None where dense is smaller."""
        k = len(bs)
        if k < 2:
            return _empty(bs[0], as_[0])
        m, r = bs[0].shape
        n = as_[0].shape[1]
        if (k - 1) * r * (m + n) >= m * n:
            return None
        s = self.context.spec.adapter.alpha / r
        dtype = bs[0].dtype
        b64 = [b.astype(np.float64) for b in bs]
        a64 = [a.astype(np.float64) for a in as_]
        left = np.concatenate([b - b_mean for b in b64[:-1]], axis=1)
        right = np.concatenate([w * s * (a - a64[-1]) for w, a in zip(p[:-1], a64[:-1])], axis=0)
        return left.astype(dtype), right.astype(dtype)


def _product(spec, names, arrays) -> np.ndarray:
    """``s B A`` of one layer (float64), from its trained factors only: a frozen offset of the
    base weight (LoRA-GA's ``-s B0 A0``) is the same on both sides of the residual."""
    trained = {k: arrays[names[k]] for k in ("lora_A.weight", "lora_B.weight")}
    return spec.adapter.layer_delta(trained)


def _empty(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Factors of rank 0 (one client: FedIT is already exact, nothing to fold)."""
    return np.zeros((b.shape[0], 0), b.dtype), np.zeros((0, a.shape[1]), a.dtype)
