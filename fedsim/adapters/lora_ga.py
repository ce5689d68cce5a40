"""LoRA-GA (Wang, Yu, Li, 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
https://arxiv.org/abs/2407.05000): ``adapter=lora adapter.init.method=lora_ga``.

The adapter is LoRA's, ``y = W0 x + s B A x`` with ``s = alpha / r``; only its start differs.
``G`` (m x n) is the gradient of the loss with respect to each adapted base weight ``W0`` on
``init.examples`` examples (the same statistics as LoRA-SB's, from the server split or a set-up
round of clients, plain or per-example clipped and noised under DP-SGD). With the SVD
``G = U S V^T`` (float64, singular values in decreasing order), the paper's default
(``direction: ArB2r``) takes

    A0 = c V[:, :r]^T   (r x n),      B0 = c U[:, r:2r]   (m x r),      c = m^(1/4) / sqrt(gamma)

(``scale: stable``, the paper's scale-stable factor, ``stable_gamma`` = ``gamma`` = 16, the
authors' default; ``scale: unit``: ``c = 1``). Then the first step of LoRA on ``(A0, B0)``
changes the effective weight by ``-eta s^2 (B0 B0^T G + G A0^T A0)``, which for these slices
is the best rank-2r approximation of full fine-tuning's first step ``-eta G`` up to scale (the
paper's Theorem 3.1). ``direction: A2rBr`` swaps the slices (``A0`` from ``V[:, r:2r]``,
``B0`` from ``U[:, :r]``); ``ArBr`` interleaves them (``A0`` from the odd, ``B0`` from the even
of the first ``2r``), as peft's ``LoraGAConfig.direction`` does. Each singular pair's sign is
fixed (the entry of ``v_i`` largest in magnitude is positive) so that the result does not
depend on the LAPACK build.

``B0 A0`` is not zero, so the frozen weight is offset, ``W0' = W0 - s B0 A0``: the model's
output is unchanged at start. The offset is part of the global model and every client needs
it. It travels as the factors: ``A0`` and ``B0`` are frozen parameters of the layer
(``lora_A0``, ``lora_B0``), sent by the server to each client once, at its first
participation, with the other data-derived frozen factors (:class:`fedsim.init.FrozenFactors`,
``r (m + n)`` values per layer, counted), and each client applies them itself: the layer
computes ``W0 x - s B0 (A0 x) + s B (A x)``, whose weight is ``W0' + s B A``. The shared frozen
base ``W0`` stays the one built from the seed, so strategies that fold changes into it (FedEx)
compose with the offset by addition, and the PEFT export (which starts from the pristine
``W0``) exports the rank-2r LoRA ``[B, -B0] [A; A0]`` (as peft converts PiSSA, OLoRA and
LoRA-GA adapters with ``path_initial_model_for_weight_conversion``).

Differences from peft 0.21's ``lora_ga_init``: peft also multiplies ``B0`` by the singular
values ``S[r:2r]`` and puts the stable scale on ``B0`` only (the paper and the authors' code
scale both factors by ``c`` and use no singular values; fedsim follows them), uses a
randomised SVD (``torch.svd_lowrank``) with arbitrary signs, and subtracts the offset from
``W0`` in place; it averages ``G`` over backward calls where fedsim sums batch-mean gradients
(a scale, which the singular vectors do not see).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.adapters.data_init import DataInit, InitRun
from fedsim.adapters.gradients import base_gradients, private_base_gradients
from fedsim.adapters.lora import LoRALinear
from fedsim.errors import ConfigError
from fedsim.tasks.memory import factor_dtype
from fedsim.validate import number

#: ``init.direction``: which of the first ``2r`` singular vectors go to ``A0`` and ``B0``
DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
#: ``init.scale``: ``stable`` multiplies both by ``m^(1/4) / sqrt(stable_gamma)``
SCALES = ("stable", "unit")
A0, B0 = "lora_A0.weight", "lora_B0.weight"


def signed_svd(grad: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``U, S, V^T`` of ``grad`` in float64, each pair's sign fixed so that the entry of
    ``v_i`` largest in magnitude is positive."""
    u, s, vt = np.linalg.svd(np.asarray(grad, dtype=np.float64), full_matrices=False)
    flip = np.sign(vt[np.arange(len(vt)), np.argmax(np.abs(vt), axis=1)])
    flip[flip == 0] = 1.0
    return u * flip, s, vt * flip[:, None]


def lora_ga_factors(
    grad: np.ndarray, r: int, direction: str = "ArB2r", scale: str = "stable", gamma: float = 16
) -> tuple[np.ndarray, np.ndarray]:
    """``(A0, B0)`` (r x n, m x r, float64) from the gradient ``grad`` (m x n): see the module
    docstring."""
    u, _, vt = signed_svd(grad)
    if direction == "ArB2r":
        a, b = vt[:r], u[:, r : 2 * r]
    elif direction == "A2rBr":
        a, b = vt[r : 2 * r], u[:, :r]
    elif direction == "ArBr":
        a, b = vt[1 : 2 * r : 2], u[:, 0 : 2 * r : 2]
    else:
        raise ValueError(f"unknown direction {direction!r}")
    c = grad.shape[0] ** 0.25 / gamma**0.5 if scale == "stable" else 1.0
    return c * a, c * b


class LoRAGALinear(LoRALinear):
    """LoRA plus the frozen offset ``-s B0 A0`` of its base weight (see the module docstring);
    ``A0``, ``B0`` are bias-free ``nn.Linear`` modules like ``A`` and ``B`` (Opacus, vmap)."""

    def __init__(
        self, base: nn.Linear, r: int, alpha: float, dropout: float, generator: torch.Generator
    ) -> None:
        super().__init__(base, r, alpha, dropout, generator)
        kw = {"bias": False, "dtype": factor_dtype(base), "device": base.weight.device}
        self.lora_A0 = nn.Linear(base.in_features, r, **kw)
        self.lora_B0 = nn.Linear(r, base.out_features, **kw)
        with torch.no_grad():  # the offset of the default start, zero (B = 0)
            self.lora_A0.weight.copy_(self.lora_A.weight)
            self.lora_B0.weight.copy_(self.lora_B.weight)
        for p in (self.lora_A0.weight, self.lora_B0.weight):
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_B(self.lora_A(self.dropout(x))) - self.lora_B0(self.lora_A0(x))
        return self.base(x) + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The change from the pristine base weight, ``s (B A - B0 A0)`` (m x n)."""
        low = self.lora_B.weight @ self.lora_A.weight
        return self.scaling * (low - self.lora_B0.weight @ self.lora_A0.weight)


class LoRAGAInit(DataInit):
    """LoRA-GA's initialisation of a :class:`~fedsim.adapters.LoRA` adapter (see the module
    docstring): the statistics are the gradients ``G`` of the adapted base weights."""

    method = "lora_ga"
    title = "LoRA-GA initialisation"
    statistic = "gradient"
    central_note = (
        "each client's gradient direction scaled to privacy.clip_norm, the sum noised (LoRA-GA "
        "uses its singular vectors); one more step at rate q, included in epsilon"
    )
    #: the keys of ``adapter.init`` this method reads besides the set-up's
    keys = ("direction", "scale", "stable_gamma")
    #: the layer's frozen parameters: the offset's factors, sent to each client once
    frozen_suffixes = (A0, B0)
    #: ``summary.json``'s ``adapter_init`` also gives the set-up round's bytes and epsilon
    summary_costs = True

    def __init__(
        self,
        adapter,
        source: str = "server",
        examples: int = 256,
        batch_size: int = 32,
        direction: str = "ArB2r",
        scale: str = "stable",
        stable_gamma: float = 16,
    ) -> None:
        super().__init__(source, examples, batch_size, key="adapter.init")
        self.adapter = adapter
        for key, value, allowed in (("direction", direction, DIRECTIONS), ("scale", scale, SCALES)):
            if value not in allowed:
                raise ConfigError(f"adapter.init.{key}", value, "must be " + " or ".join(allowed))
        self.direction, self.scale = direction, scale
        self.gamma = number("adapter.init.stable_gamma", stable_gamma, low=0, low_open=True)

    # ------------------------------------------------------------------ the adapter's hooks
    def make_module(self, base: nn.Linear, generator: torch.Generator) -> nn.Module:
        a = self.adapter
        return LoRAGALinear(base, a.r, a.alpha, a.dropout, generator)

    def check_layers(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """``2r <= min(m, n)`` of every adapted layer: ``A0`` and ``B0`` take ``2r`` distinct
        singular vectors of its gradient."""
        r = self.adapter.r
        name = min(shapes, key=lambda k: min(shapes[k]), default=None)
        if name is None or 2 * r <= min(shapes[name]):
            return
        m, n = shapes[name]
        raise ConfigError(
            "adapter.r",
            r,
            f"adapter.init.method=lora_ga takes 2r = {2 * r} singular vectors of each layer's "
            f"gradient; r must be at most min(m, n) / 2 = {min(m, n) // 2} of the smallest "
            f"adapted layer, {name} ({m} x {n}, m x n)",
        )

    @staticmethod
    def with_offset(a: np.ndarray, b: np.ndarray, factors: Mapping[str, np.ndarray]):
        """``([A; A0], [B, -B0])``: ``s B A - s B0 A0`` as one LoRA of rank ``2r``."""
        a0 = np.asarray(factors[A0], dtype=np.float64)
        b0 = np.asarray(factors[B0], dtype=np.float64)
        return np.concatenate([a, a0], axis=0), np.concatenate([b, -b0], axis=1)

    # ------------------------------------------------------------------ DataInit
    def statistic_shapes(self, spec) -> dict[str, tuple[int, ...]]:
        return {m: spec.shapes[m] for m in spec.adapted_modules}

    def wire_name(self, spec, name: str) -> str:
        return spec.base_weight(name)

    def statistics(self, model, spec, task, data, device):
        return base_gradients(model, spec, task.loss, data, self.batch_size, device)

    def private_statistics(self, model, spec, task, data, clip_norm, sigma, generator, device):
        return private_base_gradients(
            model, spec, task.loss, data, clip_norm, sigma, generator, device=device
        )

    def initialize(self, model, spec, statistics, run: InitRun) -> dict[str, Any]:
        """``A = A0``, ``B = B0`` and the offset's factors of every adapted layer."""
        r, sent = self.adapter.r, 0
        with torch.no_grad():
            for module in spec.adapted_modules:
                layer = model.get_submodule(module)
                a, b = lora_ga_factors(
                    statistics[module], r, self.direction, self.scale, self.gamma
                )
                for targets, value in (
                    ((layer.lora_A, layer.lora_A0), a),
                    ((layer.lora_B, layer.lora_B0), b),
                ):
                    for target in targets:
                        target.weight.copy_(torch.from_numpy(value).to(target.weight.dtype))
                sent += layer.lora_A0.weight.nbytes + layer.lora_B0.weight.nbytes
        return {
            "direction": self.direction,
            "scale": self.scale,
            "stable_gamma": self.gamma,
            "offset": "W0 - s B0 A0, applied by each client from A0, B0 (sent once per client)",
            "offset_bytes_per_client": int(sent),
        }
