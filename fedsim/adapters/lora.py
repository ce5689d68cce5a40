"""LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) and FFA-LoRA.

``y = W0 x + s B A x`` with ``s = alpha / r``; ``A`` (r x n) is initialised like a linear layer
(Kaiming-uniform), ``B`` (m x r) to zero, so the adapted model equals the base at start. ``A`` and
``B`` are ``nn.Linear`` modules so that Opacus can compute per-sample gradients for them.

FFA-LoRA (Sun et al., 2024, https://arxiv.org/abs/2403.12313) freezes ``A`` at its random
initialisation, drawn from the run's seed so that every client and the server hold the same
``A`` at no communication cost, and trains ``B`` only: averaging ``B`` is then exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.adapters.base import AdaptedLinear, Adapter, check_rank
from fedsim.dropout import AdapterDropout
from fedsim.validate import integer, number

#: ``adapter.init`` as conf/adapter/lora.yaml sets it (read-only): a run saved before the key
#: existed ran with it, so it resumes (:func:`fedsim.resume.with_later_keys`)
DEFAULT_INIT = MappingProxyType(
    {"method": "default", "source": "server", "examples": 256, "batch_size": 32, "rho": 2.0}
)


class LoRALinear(AdaptedLinear):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``s * B A``."""

    def __init__(
        self, base: nn.Linear, r: int, alpha: float, dropout: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.base = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        kw = {"bias": False, "dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Linear(base.in_features, r, **kw)
        self.lora_B = nn.Linear(r, base.out_features, **kw)
        with torch.no_grad():
            a = torch.empty_like(self.lora_A.weight, device="cpu")
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()
        self.dropout = AdapterDropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update to the effective weight, ``s B A`` (m x n)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)


class LoRA(Adapter):
    """LoRA adapter config.

    Parameters
    ----------
    r : int
        Rank of the update (> 0).
    alpha : float
        Scale numerator; the update is multiplied by ``alpha / r``.
    dropout : float
        Dropout on the adapter's input, in [0, 1).
    target_modules : list of str, or str, optional
        Linear layers to adapt (suffix names, or a full-name regex); default: the task's.
    init : dict, optional
        ``method``: ``default`` (Kaiming-uniform ``A``, zero ``B``) or ``eva`` (EVA,
        :mod:`fedsim.adapters.eva`: ``A`` from the layer inputs' principal directions, ranks
        redistributed across layers; with ``source``, ``examples``, ``batch_size``, ``rho``).
    """

    name = "lora"
    trained_suffixes = ("lora_A.weight", "lora_B.weight")

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: Sequence[str] | str | None = None,
        init: Mapping[str, Any] | None = DEFAULT_INIT,
    ) -> None:
        super().__init__(target_modules)
        self.r = integer("adapter.r", r, low=1)
        self.alpha = number("adapter.alpha", alpha, low=0, low_open=True)
        self.dropout = number("adapter.dropout", dropout, 0, 1, high_open=True)
        self.init_method, self.data_init = lora_init(self, init)

    def make_module(self, base: nn.Linear, generator: torch.Generator) -> nn.Module:
        return LoRALinear(base, self.r, self.alpha, self.dropout, generator)

    def check_layers(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """``r <= min(m, n)`` of every adapted layer: ``B A`` has rank at most ``min(m, n)``,
        so a larger rank reaches no new update and only costs ``r (m + n)`` values a layer."""
        check_rank(
            self.r,
            shapes,
            "min(m, n)",
            "B A (m x r times r x n) has rank at most min(m, n), so a larger r adds nothing "
            "but r (m + n) values per layer",
        )
        if self.data_init is not None:  # a data-driven init's own bounds (EVA's rho r)
            self.data_init.check_layers(shapes)

    def layer_delta(self, factors: Mapping[str, np.ndarray]) -> np.ndarray:
        """``s B A`` with ``s = alpha / r``; ``r`` is read from ``A`` (ranks may differ)."""
        a = np.asarray(factors["lora_A.weight"], dtype=np.float64)
        b = np.asarray(factors["lora_B.weight"], dtype=np.float64)
        return (self.alpha / a.shape[0]) * (b @ a)

    def lora_factors(self, factors: Mapping[str, np.ndarray]):
        """``(A, B, scaling)`` for a PEFT LoRA export: the factors themselves."""
        a = np.asarray(factors["lora_A.weight"], dtype=np.float64)
        b = np.asarray(factors["lora_B.weight"], dtype=np.float64)
        return a, b, self.alpha / a.shape[0]


#: ``adapter.init``'s keys (every method's; each method reads its own) and methods
INIT_KEYS = ("method", "source", "examples", "batch_size", "rho")
INIT_METHODS = ("default", "eva")


def lora_init(adapter: LoRA, init: Mapping[str, Any] | None):
    """``(method, data_init)`` from ``adapter.init``: ``default`` needs no data."""
    from fedsim.errors import ConfigError

    init = dict(init or {})
    for key in init:
        if key not in INIT_KEYS:
            raise ConfigError(
                f"adapter.init.{key}", init[key], f"unknown key; allowed: {', '.join(INIT_KEYS)}"
            )
    method = init.get("method", "default")
    if method not in INIT_METHODS:
        raise ConfigError("adapter.init.method", method, "must be " + " or ".join(INIT_METHODS))
    if method == "default":
        return "default", None
    from fedsim.adapters.eva import make_init

    return method, make_init(adapter, init)


class FFALoRA(LoRA):
    """FFA-LoRA adapter config: LoRA with ``A`` frozen (from the run's seed), ``B`` trained.

    Same parameters as :class:`LoRA`. The FFA-LoRA paper notes that a frozen ``A`` calls for a
    larger ``alpha`` than LoRA's usual setting.
    """

    name = "ffa"
    trained_suffixes = ("lora_B.weight",)
    frozen_suffixes = ("lora_A.weight",)

    def check_layers(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """``r <= n`` of every adapted layer: with ``A`` (r x n) frozen, the reachable updates
        ``B A`` are the m x n matrices whose rows lie in ``A``'s row space, which grows with
        ``r`` up to ``n`` (then it is every m x n matrix), even where ``m < r``."""
        check_rank(
            self.r,
            shapes,
            "n",
            "with A (r x n) frozen, B A reaches every m x n matrix once r = n, so a larger r "
            "adds nothing but m r trained values per layer",
        )
