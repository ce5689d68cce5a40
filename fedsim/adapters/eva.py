"""EVA: Explained Variance Adaptation (Paischer et al., 2024, "One Initialization to Rule them
All: Fine-tuning via Explained Variance Adaptation", https://arxiv.org/abs/2410.07170).

``adapter=lora adapter.init.method=eva``: LoRA's ``A`` of each adapted layer is set to the top
right singular vectors of the layer's (centred) input activations, ``B = 0`` (the model is
unchanged at start), and the ranks are redistributed across layers by explained variance.

Per adapted layer ``l`` with inputs ``x_t`` (``n`` wide; padding tokens excluded by the
attention mask, as peft's EVA does), the statistics are the token count ``N``, the sum
``s = sum_t x_t`` and the scatter ``S = sum_t x_t x_t^T`` (``n x n``). The centred scatter
``C = S - s s^T / N`` equals ``X_c^T X_c`` for the stacked centred inputs ``X_c``, so its
eigenvectors ``v_1, v_2, ...`` (eigenvalues ``lambda_1 >= lambda_2 >= ...``) are the right
singular vectors of ``X_c`` and ``lambda_i / trace(C)`` the explained-variance ratio of
component ``i`` (peft's incremental PCA centres its inputs the same way). Sums over examples
add over clients, so a set-up round's sum of the clients' statistics gives exactly the
centralised ``C``: the federated initialisation equals the centralised one.

Rank redistribution (the paper's ``rho >= 1``): the budget is ``r`` times the number of
layers; each layer offers its first ``round(rho r)`` explained-variance ratios; the budget's
largest ratios over all layers give each layer its rank ``r_l`` (``rho = 1``: ``r_l = r``).
fedsim keeps every targeted layer adapted: each layer's first component is always taken (where
peft would give a layer rank 0 and drop its adapter). ``A_l = [v_1 .. v_{r_l}]^T`` (each
vector's sign fixed so its largest-magnitude entry is positive), ``B_l = 0``, scaling
``alpha / r_l`` (fedsim's LoRA convention; peft's ``adjust_scaling_factors=False``).

Layers whose rank changed are rebuilt at it (:func:`set_ranks`) before round 1; clients learn
the ranks from :class:`LayerRanks`, a stage of the uplink chain that adds them (``L`` int32)
to every message while they differ from ``r``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.adapters.activations import layer_statistics, private_layer_statistics
from fedsim.adapters.data_init import DataInit, InitRun
from fedsim.errors import ConfigError
from fedsim.messages import extend_record
from fedsim.tasks.memory import factor_dtype
from fedsim.uplink import Stage
from fedsim.validate import number

#: the name the per-layer ranks travel under in a message
RANKS = "adapter_ranks"
#: rho's default: the paper's and peft's (``EvaConfig.rho = 2``)
RHO = 2.0


class EVAInit(DataInit):
    """EVA's initialisation (see the module docstring)."""

    method = "eva"
    title = "EVA initialisation"
    statistic = "activation statistics"
    #: summary.json's adapter_init states the set-up's bytes and epsilon
    summary_costs = True
    #: the keys of ``adapter.init`` this method reads besides the set-up's
    keys = ("rho",)

    def __init__(
        self,
        adapter,
        source: str = "server",
        examples: int = 256,
        batch_size: int = 32,
        rho: float = RHO,
    ) -> None:
        super().__init__(source, examples, batch_size, key="adapter.init")
        self.adapter = adapter
        self.rho = number("adapter.init.rho", rho, low=1.0)

    @property
    def max_rank(self) -> int:
        """The most components a layer may take: ``round(rho r)`` (peft's rounding)."""
        return max(1, round(self.adapter.r * self.rho))

    @property
    def per_layer_ranks(self) -> bool:
        return self.rho > 1.0

    def check_layers(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """A layer's rank is at most ``round(rho r)``, which must fit ``min(m, n)``."""
        limit = self.max_rank
        name = min(shapes, key=lambda k: min(shapes[k]), default=None)
        if name is None or limit <= min(shapes[name]):
            return
        m, n = shapes[name]
        raise ConfigError(
            "adapter.init.rho",
            self.rho,
            f"gives a layer up to round(rho r) = {limit} components, more than min(m, n) = "
            f"{min(m, n)} of {name} ({m} x {n}): a layer's rank must fit its size; lower rho "
            "or adapter.r",
        )

    def statistic_shapes(self, spec) -> dict[str, tuple[int, ...]]:
        out = {}
        for module in spec.adapted_modules:
            n = spec.shapes[module][1]
            out.update(
                {f"{module}/scatter": (n, n), f"{module}/sum": (n,), f"{module}/count": (1,)}
            )
        return out

    def wire_name(self, spec, name: str) -> str:
        return "eva/" + name

    def statistics(self, model, spec, task, data, device):
        return layer_statistics(model, spec, task, data, self.batch_size, device)

    def private_statistics(self, model, spec, task, data, clip_norm, sigma, generator, device):
        return private_layer_statistics(
            model, spec, task, data, clip_norm, sigma, generator, self.batch_size, device
        )

    def initialize(self, model, spec, statistics, run: InitRun) -> dict[str, Any]:
        comps, ratios = {}, {}
        for module in spec.adapted_modules:
            comps[module], ratios[module] = principal_components(
                statistics[f"{module}/scatter"],
                statistics[f"{module}/sum"],
                float(np.asarray(statistics[f"{module}/count"]).sum()),
            )
        ranks = redistribute(ratios, self.adapter.r, self.rho)
        set_ranks(model, spec, ranks)
        with torch.no_grad():
            for module, rank in ranks.items():
                layer = model.get_submodule(module)
                a = torch.from_numpy(np.ascontiguousarray(comps[module][:rank]))
                layer.lora_A.weight.copy_(a.to(layer.lora_A.weight.dtype))
                layer.lora_B.weight.zero_()
        explained = {m: float(ratios[m][: ranks[m]].sum()) for m in ranks}
        return {"rho": self.rho, "ranks": dict(ranks), "explained_variance": explained}


# ----------------------------------------------------------------------------- the math


def principal_components(
    scatter: np.ndarray, total: np.ndarray, count: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(V, ratios)``: the rows of ``V`` are the eigenvectors of the centred scatter
    ``C = S - s s^T / N`` by decreasing eigenvalue (the right singular vectors of the stacked
    centred inputs), each signed so that its largest-magnitude entry is positive; ``ratios``
    their explained-variance ratios ``lambda_i / sum(lambda)`` (negative eigenvalues, which
    only DP noise makes, count as zero)."""
    s = np.asarray(scatter, dtype=np.float64)
    mean_part = np.asarray(total, dtype=np.float64)
    count = max(float(count), 1.0)
    c = s - np.outer(mean_part, mean_part) / count
    c = (c + c.T) / 2
    values, vectors = np.linalg.eigh(c)
    order = np.argsort(-values, kind="stable")
    values, v = np.clip(values[order], 0.0, None), vectors[:, order].T
    rows = np.arange(v.shape[0])
    signs = np.sign(v[rows, np.argmax(np.abs(v), axis=1)])
    v = v * np.where(signs == 0, 1.0, signs)[:, None]
    total_var = values.sum()
    ratios = values / total_var if total_var > 0 else np.zeros_like(values)
    return v, ratios


def redistribute(ratios: Mapping[str, np.ndarray], r: int, rho: float) -> dict[str, int]:
    """Each layer's rank from its explained-variance ratios: the ``r * len(ratios)`` largest
    among every layer's first ``round(rho r)`` (ties: the earlier layer, then the earlier
    component), every layer's first component taken first."""
    limit = max(1, round(r * rho))
    budget = r * len(ratios)
    entries = []
    for index, (module, values) in enumerate(ratios.items()):
        for i, value in enumerate(np.asarray(values)[:limit]):
            entries.append((i > 0, -float(value), index, i, module))
    entries.sort(key=lambda e: e[:4])
    ranks = {module: 0 for module in ratios}
    for entry in entries[:budget]:
        ranks[entry[4]] += 1
    return ranks


# ----------------------------------------------------------------------------- per-layer ranks


def set_ranks(model: nn.Module, spec, ranks: Mapping[str, int]) -> bool:
    """Rebuild the LoRA factors of every adapted layer whose rank differs from ``ranks``
    (``A`` zero until set, ``B = 0``, scaling ``alpha / r_l``), then rebind ``spec`` to the
    model's new parameters (their names are unchanged). Returns whether anything changed."""
    changed = False
    for module in spec.adapted_modules:
        layer = model.get_submodule(module)
        rank = int(ranks[module])
        if rank == layer.r:
            continue
        kw = {"bias": False, "dtype": factor_dtype(layer.base), "device": layer.base.weight.device}
        layer.lora_A = nn.Linear(layer.base.in_features, rank, **kw)
        layer.lora_B = nn.Linear(rank, layer.base.out_features, **kw)
        with torch.no_grad():
            layer.lora_A.weight.zero_()
            layer.lora_B.weight.zero_()
        layer.r, layer.scaling = rank, layer.alpha / rank
        trained = spec.adapter.trained_suffixes
        for suffix, param in (
            ("lora_A.weight", layer.lora_A.weight),
            ("lora_B.weight", layer.lora_B.weight),
        ):
            param.requires_grad_(suffix in trained)
        changed = True
    if changed:
        spec.bind(model)
    return changed


def model_ranks(model: nn.Module, spec) -> np.ndarray:
    """The adapted layers' ranks in module order (int32)."""
    return np.array([model.get_submodule(m).r for m in spec.adapted_modules], dtype=np.int32)


class LayerRanks(Stage):
    """The per-layer ranks EVA chose: the server adds them (``L`` int32, counted) to every
    message while they differ from ``adapter.r``; a client rebuilds its model's layers at them
    before anything is loaded (every process learns them from its first message)."""

    name = "ranks"

    def __init__(self, spec) -> None:
        self.spec = spec

    @staticmethod
    def needed(spec) -> bool:
        init = getattr(spec.adapter, "data_init", None)
        return bool(getattr(init, "per_layer_ranks", False))

    def _extra(self) -> dict[str, np.ndarray]:
        ranks = model_ranks(self.spec.bound_model, self.spec)
        return {} if np.all(ranks == self.spec.adapter.r) else {RANKS: ranks}

    # ------------------------------------------------------------------ server half
    def outgoing(self, info, client, arrays: ArrayRecord, config):
        return extend_record(arrays, self._extra()), config

    def evaluate_outgoing(self, arrays: ArrayRecord) -> ArrayRecord:
        return extend_record(arrays, self._extra())

    def state_dict(self):
        return {"ranks": model_ranks(self.spec.bound_model, self.spec)}

    def load_state_dict(self, state) -> None:
        """On resume: the server's model rebuilt at the checkpoint's ranks."""
        self._conform(np.asarray(state["ranks"]))

    # ------------------------------------------------------------------ client half
    def _conform(self, ranks: Sequence[int]) -> None:
        spec = self.spec
        if len(ranks) != len(spec.adapted_modules):
            raise RuntimeError(f"{len(ranks)} ranks for {len(spec.adapted_modules)} layers")
        set_ranks(spec.bound_model, spec, dict(zip(spec.adapted_modules, ranks)))

    def receive(self, call, arrays):
        if RANKS not in arrays:
            return arrays
        arrays = dict(arrays)
        self._conform(np.asarray(arrays.pop(RANKS)))
        return arrays

    def evaluate_receive(self, call, arrays):
        return self.receive(call, arrays)


def check_run(adapter, strategy, privacy) -> None:
    """Refuse what EVA cannot be combined with (one line each)."""
    init = getattr(adapter, "data_init", None)
    if not isinstance(init, EVAInit):
        return
    if getattr(privacy, "central", False) and init.source == "clients":
        raise ConfigError(
            "adapter.init.source",
            "clients",
            "EVA's set-up round cannot run under privacy=central: its statistics (an n x n "
            "scatter per layer, growing with the tokens seen) have no scale to clip at "
            "privacy.clip_norm, which is set for model updates, and noise on every entry drowns "
            "the spectrum the ranks come from; use privacy=dpsgd (per-example clipping) or "
            "adapter.init.source=server (no client data)",
        )
    if getattr(strategy, "heterogeneous_ranks", False) and init.per_layer_ranks:
        raise ConfigError(
            "adapter.init.rho",
            init.rho,
            f"strategy {strategy.name} sizes every layer's adapter at adapter.r (clients of "
            "their own ranks), not at EVA's per-layer ranks: use adapter.init.rho=1",
        )
