"""LoRA-SB (Ponkshe et al., 2024, https://arxiv.org/abs/2411.19557), the adapter of Fed-SB.

``y = W0 x + B R A x`` (scale fixed to 1): ``A`` (r x n) and ``B`` (m x r) are frozen, only the
``r x r`` matrix ``R`` is trained, so averaging ``R`` over clients averages their updates
exactly (``B mean(R_i) A = mean(B R_i A)``) at ``r^2`` numbers per layer.

Initialisation (``init.method=gradient``, the paper's): accumulate the gradient ``G`` of the
loss with respect to each adapted base weight on ``init.examples`` examples, approximate the
first optimizer step as ``dW = -eta1 * sign(G)`` (Adam's first step; ``eta1`` is the learning
rate of the first step under the client schedule), and set ``B = U_r``, ``R = S_r``,
``A = V_r^T`` from its truncated SVD: training starts from the best rank-r approximation of
that step. Where ``G`` comes from is explicit: ``init.source=server`` (the task's held-out
server split) or ``clients`` (a set-up round in which sampled clients send their gradients).
``B`` and ``A`` then depend on data, so the server sends them to every client once.
``init.method=random`` (random orthonormal ``A``, ``B`` from the run's seed, ``R = 0``) is the
ablation; its ``B`` and ``A`` cost nothing to share.

``A``, ``R`` and ``B`` are three bias-free ``nn.Linear`` modules: Opacus computes per-sample
gradients for such a chain in all its grad-sample modes (a bare ``nn.Parameter`` in a matmul
breaks its ``ew`` mode; frozen factors stored as buffers are rejected).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.adapters.base import AdaptedLinear, Adapter, AdapterSpec, check_rank
from fedsim.adapters.data_init import DataInit, InitRun
from fedsim.adapters.gradients import base_gradients, private_base_gradients
from fedsim.dropout import AdapterDropout
from fedsim.errors import ConfigError
from fedsim.tasks.memory import factor_dtype
from fedsim.validate import integer, is_number, number

INIT_METHODS = ("gradient", "random")
#: rules for LoRA-SB's first step size (or a number)
ETA1_RULES = ("schedule", "reference")


class LoRASBLinear(AdaptedLinear):
    """A frozen ``nn.Linear`` plus ``B R A`` with frozen ``A``, ``B`` and trainable ``R``."""

    def __init__(self, base: nn.Linear, r: int, dropout: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.r = r
        kw = {"bias": False, "dtype": factor_dtype(base), "device": base.weight.device}
        self.lora_A = nn.Linear(base.in_features, r, **kw)
        self.lora_R = nn.Linear(r, r, **kw)
        self.lora_B = nn.Linear(r, base.out_features, **kw)
        with torch.no_grad():
            a = torch.linalg.qr(torch.randn(base.in_features, r, generator=generator))[0]
            b = torch.linalg.qr(torch.randn(base.out_features, r, generator=generator))[0]
            self.lora_A.weight.copy_(a.T)
            self.lora_B.weight.copy_(b)
            self.lora_R.weight.zero_()
        self.dropout = AdapterDropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_R(self.lora_A(self.dropout(x))))

    def delta_weight(self) -> torch.Tensor:
        """The update to the effective weight, ``B R A`` (m x n)."""
        return self.lora_B.weight @ self.lora_R.weight @ self.lora_A.weight


def first_step_factors(grad: np.ndarray, eta1: float, r: int) -> tuple[np.ndarray, ...]:
    """``(B, R, A)`` from the rank-r truncated SVD of ``-eta1 * sign(grad)``, in float64."""
    step = -float(eta1) * np.sign(np.asarray(grad, dtype=np.float64))
    u, s, vt = np.linalg.svd(step, full_matrices=False)
    return u[:, :r], np.diag(s[:r]), vt[:r]


class LoRASB(Adapter):
    """LoRA-SB adapter config (see the module docstring).

    Parameters
    ----------
    r : int
        Rank; ``R`` is ``r x r``. At most ``min(m, n)`` of every adapted layer.
    dropout : float
        Dropout on the adapter's input, in [0, 1).
    target_modules : list of str, or str, optional
        Linear layers to adapt (suffix names, or a full-name regex); default: the task's.
    init : dict
        ``method``: ``gradient`` (LoRA-SB's update approximation) or ``random``;
        ``source``: ``server`` or ``clients`` (where the gradient examples come from);
        ``examples``: ``N_init``, examples the gradient is accumulated on (the reference uses
        50 to 550); ``batch_size``: examples per gradient batch; ``eta1``: the first step's
        size, ``schedule`` (the client schedule's first learning rate), ``reference`` (the
        reference code's ``lr / (warmup_ratio * total steps)``: its first warm-up rate) or a
        number; ``warmup_ratio`` (for ``reference``; 0.02, the reference's default).
    """

    name = "lora_sb"
    trained_suffixes = ("lora_R.weight",)
    frozen_suffixes = ("lora_A.weight", "lora_B.weight")

    def __init__(
        self,
        r: int = 8,
        dropout: float = 0.0,
        target_modules: Sequence[str] | str | None = None,
        init: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(target_modules)
        self.r = integer("adapter.r", r, low=1)
        self.dropout = number("adapter.dropout", dropout, 0, 1, high_open=True)
        init = dict(init or {})
        allowed = {"method", "source", "examples", "batch_size", "eta1", "warmup_ratio"}
        for key in init:
            if key not in allowed:
                raise ConfigError(
                    f"adapter.init.{key}",
                    init[key],
                    f"unknown key; allowed: {', '.join(sorted(allowed))}",
                )
        self.init_method = init.get("method", "gradient")
        if self.init_method not in INIT_METHODS:
            raise ConfigError(
                "adapter.init.method", self.init_method, "must be " + " or ".join(INIT_METHODS)
            )
        gradient = GradientInit(
            self,
            source=init.get("source", "server"),
            examples=init.get("examples", 256),
            batch_size=init.get("batch_size", 32),
            eta1=init.get("eta1", "schedule"),
            warmup_ratio=init.get("warmup_ratio", 0.02),
        )
        self.data_init = gradient if self.init_method == "gradient" else None

    def make_module(self, base: nn.Linear, generator: torch.Generator) -> nn.Module:
        return LoRASBLinear(base, self.r, self.dropout, generator)

    def check_layers(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """``r <= min(m, n)`` of every adapted layer: ``B`` (m x r) and ``A`` (r x n) have
        orthonormal columns / rows, which needs ``r <= m`` and ``r <= n``."""
        check_rank(
            self.r,
            shapes,
            "min(m, n)",
            "B (m x r) and A (r x n) have orthonormal columns / rows, and R is r x r",
        )

    def layer_delta(self, factors: Mapping[str, np.ndarray]) -> np.ndarray:
        """``B R A`` in float64."""
        a, r, b = (
            np.asarray(factors[k], dtype=np.float64)
            for k in ("lora_A.weight", "lora_R.weight", "lora_B.weight")
        )
        return b @ r @ a

    def lora_factors(self, factors: Mapping[str, np.ndarray]):
        """``(A, B R, 1)`` for a PEFT LoRA export."""
        a, r, b = (
            np.asarray(factors[k], dtype=np.float64)
            for k in ("lora_A.weight", "lora_R.weight", "lora_B.weight")
        )
        return a, b @ r, 1.0

    # ------------------------------------------------------------------ initialisation
    def initialize(
        self, model: nn.Module, spec: AdapterSpec, grads: Mapping[str, np.ndarray], eta1: float
    ) -> None:
        """Set ``B, R, A`` of every adapted layer from its gradient (see the module docstring)."""
        with torch.no_grad():
            for module in spec.adapted_modules:
                layer = model.get_submodule(module)
                b, r, a = first_step_factors(grads[module], eta1, self.r)
                for target, value in ((layer.lora_B, b), (layer.lora_R, r), (layer.lora_A, a)):
                    target.weight.copy_(torch.from_numpy(value).to(target.weight.dtype))


class GradientInit(DataInit):
    """LoRA-SB's initialisation (see the module docstring): the statistics are the summed
    gradients ``G`` of the adapted base weights; ``B, R, A`` come from the truncated SVD of
    ``-eta1 * sign(G)``, ``eta1`` the learning rate of the client schedule's first step."""

    method = "gradient"
    title = "LoRA-SB initialisation"
    statistic = "gradient"
    central_note = (
        "each client's gradient direction scaled to privacy.clip_norm, the sum noised (LoRA-SB "
        "uses its sign); one more step at rate q, included in epsilon"
    )

    def __init__(
        self,
        adapter: LoRASB,
        source: str,
        examples: int,
        batch_size: int,
        eta1: str | float = "schedule",
        warmup_ratio: float = 0.02,
    ) -> None:
        super().__init__(source, examples, batch_size, key="adapter.init")
        self.adapter = adapter
        if eta1 not in ETA1_RULES and not (is_number(eta1) and eta1 > 0):
            raise ConfigError(
                "adapter.init.eta1", eta1, "must be schedule, reference or a number > 0"
            )
        self.eta1 = eta1
        self.warmup_ratio = number("adapter.init.warmup_ratio", warmup_ratio, 0, 1, low_open=True)

    def first_step(self, run: InitRun) -> float:
        """``eta1`` by its rule (see :class:`LoRASB`)."""
        if self.eta1 == "schedule":
            return run.lr * run.schedule.factor(0, run.total_steps)
        if self.eta1 == "reference":
            return run.lr / max(1.0, self.warmup_ratio * run.total_steps)
        return float(self.eta1)

    def statistic_shapes(self, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        return {m: spec.shapes[m] for m in spec.adapted_modules}

    def wire_name(self, spec: AdapterSpec, name: str) -> str:
        return spec.base_weight(name)

    def statistics(self, model, spec, task, data, device):
        return base_gradients(model, spec, task.loss, data, self.batch_size, device)

    def private_statistics(self, model, spec, task, data, clip_norm, sigma, generator, device):
        return private_base_gradients(
            model, spec, task.loss, data, clip_norm, sigma, generator, device=device
        )

    def initialize(self, model, spec, statistics, run: InitRun) -> dict[str, Any]:
        eta1 = self.first_step(run)
        self.adapter.initialize(model, spec, statistics, eta1)
        rule = self.eta1 if isinstance(self.eta1, str) else "set"
        return {"eta1": eta1, "eta1_rule": rule}
