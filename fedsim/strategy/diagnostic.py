"""The exactness diagnostic: how far the server's update is from the mean of the clients'.

``max over layers ||dW_agg - dW*||_F / ||dW*||_F`` in float64, where ``dW*`` is the
``p``-weighted mean of the clients' changes to each layer's effective weight (the strategy's
weights ``p_i``) and ``dW_agg`` the change the server produced: the new global arrays'
contribution plus what the strategy folded into the frozen base this round. Head parameters
count as layers. Layers whose ideal change is exactly zero are left out (no relative error is
defined there). See docs/results.md ("The aggregation error").
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedsim.adapters.base import AdapterSpec
from fedsim.messages import ClientUpdate


def effective(
    spec: AdapterSpec, frozen: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Each layer's adapter contribution to its effective weight, and each head parameter,
    in float64, from arrays by parameter name (the frozen parameters are added)."""
    full = {**frozen, **arrays}
    out = spec.deltas(full)
    for name in spec.heads:
        if name in arrays:
            out[name] = np.asarray(arrays[name], dtype=np.float64)
    return out


def aggregation_error(
    spec: AdapterSpec,
    frozen: Mapping[str, np.ndarray],
    weights: np.ndarray,
    current: Mapping[str, np.ndarray],
    new: Mapping[str, np.ndarray],
    updates: list[ClientUpdate],
    folded: Mapping[str, np.ndarray],
    ideal: Mapping[str, np.ndarray] | None = None,
) -> float | None:
    """The diagnostic (see the module docstring) for clients' trained arrays ``updates``
    weighted by ``weights``; ``folded``: the change folded into the base this round, by
    module; ``ideal``: ``dW*`` by layer and head where the strategy computes it itself
    (clients that start from a truncation of the global adapter: HetLoRA, FlexLoRA). None
    when there is nothing to compare."""
    old = effective(spec, frozen, current)
    if ideal is None:
        ideal = {k: np.zeros_like(v) for k, v in old.items()}
        for w, update in zip(weights, updates):
            mine = effective(spec, frozen, update.arrays)
            for k in ideal:
                ideal[k] += float(w) * (mine.get(k, old[k]) - old[k])
    got = effective(spec, frozen, new)
    worst = None
    for k, want in ideal.items():
        change = got.get(k, old[k]) - old[k] + folded.get(k, 0.0)
        norm = float(np.linalg.norm(want))
        if norm == 0.0:
            continue
        err = float(np.linalg.norm(change - want)) / norm
        worst = err if worst is None else max(worst, err)
    return worst
