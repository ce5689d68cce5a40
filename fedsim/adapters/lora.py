"""LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) and FFA-LoRA.

``y = W0 x + s B A x`` with ``s = alpha / r``; ``A`` (r x n) is initialised like a linear layer
(Kaiming-uniform), ``B`` (m x r) to zero, so the adapted model equals the base at start. ``A`` and
``B`` are ``nn.Linear`` modules so that Opacus can compute per-sample gradients for them.
``adapter.init.method`` picks a data-driven initialisation instead (:data:`INIT_METHODS`; each
in its own module: LoRA-GA in :mod:`fedsim.adapters.lora_ga`), set up by :mod:`fedsim.init`.

FFA-LoRA (Sun et al., 2024, https://arxiv.org/abs/2403.12313) freezes ``A`` at its random
initialisation, drawn from the run's seed so that every client and the server hold the same
``A`` at no communication cost, and trains ``B`` only: averaging ``B`` is then exact.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.adapters import ranks as client_ranks_
from fedsim.adapters.base import AdaptedLinear, Adapter, check_rank
from fedsim.dropout import AdapterDropout
from fedsim.errors import ConfigError
from fedsim.tasks.memory import factor_dtype
from fedsim.validate import integer, number

#: ``adapter.init.method`` -> the ``module:class`` of its :class:`~fedsim.adapters.data_init.
#: DataInit` (imported when needed); ``default``: Kaiming ``A``, ``B = 0``, no data
INIT_METHODS = {
    "default": None,
    "lora_ga": "fedsim.adapters.lora_ga:LoRAGAInit",
    "eva": "fedsim.adapters.eva:EVAInit",
}
#: the keys every method shares (the set-up's: :class:`~fedsim.adapters.data_init.DataInit`)
SETUP_KEYS = ("source", "examples", "batch_size")
#: ``adapter.init`` as ``conf/adapter/lora.yaml`` lists it (a run saved before LoRA had the
#: key resumes: it ran with these values)
DEFAULT_INIT = MappingProxyType(
    {
        "method": "default",
        "source": "server",
        "examples": 256,
        "batch_size": 32,
        "direction": "ArB2r",
        "scale": "stable",
        "stable_gamma": 16,
        "rho": 2.0,
    }
)


class LoRALinear(AdaptedLinear):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``s * B A``."""

    def __init__(
        self, base: nn.Linear, r: int, alpha: float, dropout: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.base = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        kw = {"bias": False, "dtype": factor_dtype(base), "device": base.weight.device}
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
    client_ranks : list of int, or dict of int to float, optional
        Each client's own rank (heterogeneous ranks, :mod:`fedsim.adapters.ranks`): a list
        (client ``i`` gets ``client_ranks[i % len]``) or tiers with fractions; every rank at
        most ``r``, which sizes the model's adapter. None: every client trains ``r``.
    init : dict
        ``method``: ``default`` (Kaiming ``A``, ``B = 0``) or a data-driven method of
        :data:`INIT_METHODS`; ``source``, ``examples``, ``batch_size``: where its statistics come
        from (:class:`~fedsim.adapters.data_init.DataInit`); plus the method's own keys. A key
        of another method is ignored. ``eva``: EVA (:mod:`fedsim.adapters.eva`), ``A``
        from the layer inputs' principal directions, ranks redistributed across layers
        (``rho``); ``lora_ga``: LoRA-GA (:mod:`fedsim.adapters.lora_ga`).
    """

    name = "lora"
    trained_suffixes = ("lora_A.weight", "lora_B.weight")

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: Sequence[str] | str | None = None,
        client_ranks: Sequence[int] | Mapping[int, float] | None = None,
        init: Mapping[str, Any] | None = DEFAULT_INIT,
    ) -> None:
        super().__init__(target_modules)
        self.r = integer("adapter.r", r, low=1)
        self.alpha = number("adapter.alpha", alpha, low=0, low_open=True)
        self.dropout = number("adapter.dropout", dropout, 0, 1, high_open=True)
        self.client_ranks = client_ranks_.parse(client_ranks, self.r)
        self.data_init = lora_data_init(self, init)
        self.init_method = "default" if self.data_init is None else self.data_init.method
        if self.data_init is not None:  # its layer's frozen parameters (LoRA-GA's offset)
            self.frozen_suffixes = getattr(self.data_init, "frozen_suffixes", ())
        if self.client_ranks is not None and self.data_init is not None:
            raise ConfigError(
                "adapter.client_ranks",
                client_ranks,
                f"clients of their own ranks cannot share adapter.init.method="
                f"{self.data_init.method}'s initialisation (made at rank r={self.r}); "
                "use adapter.init.method=default",
            )

    def ranks_for(self, num_clients: int, seed: int) -> list[int] | None:
        """Each client's rank (None: every client trains ``r``)."""
        if self.client_ranks is None:
            return None
        return client_ranks_.assign(self.client_ranks, num_clients, seed)

    def make_module(self, base: nn.Linear, generator: torch.Generator) -> nn.Module:
        make = getattr(self.data_init, "make_module", None)
        if make is not None:
            return make(base, generator)
        return LoRALinear(base, self.r, self.alpha, self.dropout, generator)

    def check_layers(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """``r <= min(m, n)`` of every adapted layer: ``B A`` has rank at most ``min(m, n)``,
        so a larger rank reaches no new update and only costs ``r (m + n)`` values a layer.
        A client's own rank (``client_ranks``) is bounded the same way, and named first."""
        why = (
            "B A (m x r times r x n) has rank at most min(m, n), so a larger r adds nothing "
            "but r (m + n) values per layer"
        )
        if self.client_ranks is not None:
            top = max(self.client_ranks)
            check_rank(top, shapes, "min(m, n)", why, "adapter.client_ranks", self.client_ranks)
        check_rank(self.r, shapes, "min(m, n)", why)
        check = getattr(self.data_init, "check_layers", None)
        if check is not None:
            check(shapes)

    def layer_delta(self, factors: Mapping[str, np.ndarray]) -> np.ndarray:
        """``s B A`` with ``s = alpha / r``; ``r`` is read from ``A`` (ranks may differ). With
        the frozen factors of an initialisation that offsets ``W0`` among ``factors`` (LoRA-GA),
        the offset too: the change from the pristine ``W0``."""
        a, b, s = self.lora_factors(factors)
        return s * (b @ a)

    def lora_factors(self, factors: Mapping[str, np.ndarray]):
        """``(A, B, scaling)`` for a PEFT LoRA export: the factors themselves (with LoRA-GA's
        offset among ``factors``: ``[A; A0]``, ``[B, -B0]``, rank ``2r``)."""
        a = np.asarray(factors["lora_A.weight"], dtype=np.float64)
        b = np.asarray(factors["lora_B.weight"], dtype=np.float64)
        s = self.alpha / a.shape[0]
        offset = getattr(self.data_init, "with_offset", None)
        if offset is not None and all(k in factors for k in self.frozen_suffixes):
            a, b = offset(a, b, factors)
        return a, b, s


def lora_data_init(adapter: LoRA, init: Mapping[str, Any] | None):
    """The :class:`~fedsim.adapters.data_init.DataInit` ``adapter.init`` asks for, or None
    (``method: default``). Every method's keys are allowed (the YAML lists them all); a method
    reads the set-up's keys and its own."""
    init = dict(DEFAULT_INIT if init is None else init)
    method = init.get("method", "default")
    if method not in INIT_METHODS:
        raise ConfigError("adapter.init.method", method, "must be " + " or ".join(INIT_METHODS))
    classes = {}
    for name, path in INIT_METHODS.items():
        if path is not None:
            module, cls = path.split(":")
            classes[name] = getattr(importlib.import_module(module), cls)
    allowed = {"method", *SETUP_KEYS}.union(*(c.keys for c in classes.values()))
    for key in init:
        if key not in allowed:
            raise ConfigError(
                f"adapter.init.{key}",
                init[key],
                f"unknown key; allowed: {', '.join(sorted(allowed))}",
            )
    if INIT_METHODS[method] is None:  # no set-up; its keys are still checked, as for a method
        from fedsim.adapters.data_init import DataInit

        DataInit(**{k: init[k] for k in SETUP_KEYS if k in init}, key="adapter.init")
        return None
    cls = classes[method]
    return cls(adapter, **{k: v for k, v in init.items() if k in SETUP_KEYS or k in cls.keys})


class FFALoRA(LoRA):
    """FFA-LoRA adapter config: LoRA with ``A`` frozen (from the run's seed), ``B`` trained.

    Same parameters as :class:`LoRA`. The FFA-LoRA paper notes that a frozen ``A`` calls for a
    larger ``alpha`` than LoRA's usual setting.
    """

    name = "ffa"
    trained_suffixes = ("lora_B.weight",)
    frozen_suffixes = ("lora_A.weight",)

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: Sequence[str] | str | None = None,
    ) -> None:  # one frozen A from the seed, shared by every client: no per-client ranks,
        # no adapter.init
        super().__init__(r, alpha, dropout, target_modules, client_ranks=None, init=None)

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
