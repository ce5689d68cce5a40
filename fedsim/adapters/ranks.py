"""Heterogeneous client ranks: ``adapter.client_ranks`` (a list, or tiers with fractions).

Clients with different compute train LoRA adapters of different ranks (HetLoRA, Cho et al.,
2024, https://arxiv.org/abs/2401.06432; FlexLoRA, Bai et al., 2024,
https://arxiv.org/abs/2402.11505; FLoRA, Wang et al., 2024, https://arxiv.org/abs/2409.05976).
``adapter.client_ranks`` says which client trains which rank:

* a **list** ``[2, 4, 8, 8]``: client ``i`` trains ``ranks[i % len(ranks)]`` (a list shorter
  than ``sim.num_clients`` repeats; a longer one is refused);
* **tiers** ``{4: 0.5, 8: 0.3, 16: 0.2}``: rank to fraction of the clients. The fractions must
  sum to 1 (within 1e-9). Whole clients per tier by the largest-remainder rule: tier ``k``
  gets ``floor(f_k N)`` clients, and the ``N - sum floor(f_k N)`` left go one each to the
  tiers with the largest remainders ``f_k N - floor(f_k N)`` (ties: the tier listed first).
  Which client is in which tier is a permutation drawn from ``sim.seed``.

Every rank is at least 1 and at most ``adapter.r``, which sizes the model's adapter (the
global adapter of HetLoRA); a client of rank ``r_i`` uses the first ``r_i`` rows of ``A`` and
columns of ``B``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedsim.errors import ConfigError
from fedsim.validate import is_int, is_number

KEY = "adapter.client_ranks"
#: tier fractions must sum to 1 within this
TOLERANCE = 1e-9
#: mixed into the run's seed for the tier permutation
SALT = 2101


def parse(value: Any, r: int) -> list[int] | dict[int, float] | None:
    """``adapter.client_ranks`` checked: None, a list of ranks, or tiers (rank -> fraction);
    every rank from 1 to ``r`` (``adapter.r``)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        tiers: dict[int, float] = {}
        for key, frac in value.items():
            rank = int(key) if isinstance(key, str) and key.strip().isdigit() else key
            if not is_int(rank) or not is_number(frac) or not 0 < float(frac) <= 1:
                raise ConfigError(
                    KEY, _shown(value), "tiers map ranks (integers) to fractions in (0, 1]"
                )
            tiers[int(rank)] = float(frac)
        if not tiers:
            raise ConfigError(KEY, _shown(value), "must name at least one tier")
        total = math.fsum(tiers.values())
        if abs(total - 1.0) > TOLERANCE:
            raise ConfigError(
                KEY, _shown(value), f"tier fractions must sum to 1 (they sum to {total:g})"
            )
        _check_ranks(list(tiers), value, r)
        return tiers
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
    if not ok or not all(is_int(v) for v in value):
        raise ConfigError(
            KEY,
            _shown(value),
            "must be null, a list of ranks ([2, 4, 8]) or tiers with fractions ({4: 0.5, 8: 0.5})",
        )
    ranks = [int(v) for v in value]
    _check_ranks(ranks, value, r)
    return ranks


def _check_ranks(ranks: list[int], value: Any, r: int) -> None:
    if min(ranks) < 1:
        raise ConfigError(KEY, _shown(value), "ranks must be at least 1")
    if max(ranks) > r:
        raise ConfigError(
            KEY, _shown(value), f"ranks must be at most adapter.r={r} (the model's adapter size)"
        )


def _shown(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


def assign(spec: list[int] | dict[int, float], num_clients: int, seed: int) -> list[int]:
    """Each client's rank (index: the client's partition id), from a parsed spec."""
    if isinstance(spec, list):
        if len(spec) > num_clients:
            raise ConfigError(KEY, spec, f"has more entries than sim.num_clients={num_clients}")
        return [spec[i % len(spec)] for i in range(num_clients)]
    return _tiers(spec, num_clients, seed)


def tier_counts(tiers: Mapping[int, float], num_clients: int) -> dict[int, int]:
    """Whole clients per tier by the largest-remainder rule (see the module docstring)."""
    ranks = list(tiers)
    exact = [tiers[k] * num_clients for k in ranks]
    counts = [math.floor(x + 1e-9) for x in exact]
    left = num_clients - sum(counts)
    order = sorted(range(len(ranks)), key=lambda j: (-(exact[j] - counts[j]), j))
    for j in order[: max(left, 0)]:
        counts[j] += 1
    return dict(zip(ranks, counts))


def _tiers(tiers: Mapping[int, float], num_clients: int, seed: int) -> list[int]:
    counts = tier_counts(tiers, num_clients)
    flat = [rank for rank, c in counts.items() for _ in range(c)]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SALT]))
    return [flat[i] for i in rng.permutation(num_clients)]
