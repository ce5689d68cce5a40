"""Strategies that fold low-rank changes into the frozen base weights (FedEx-LoRA, FLoRA).

After aggregating, such a strategy adds a change ``F_t`` (m x n per adapted layer) to the frozen
base ``W0`` of every client, sampled or not. The server keeps the sum of all folds in float64
and, for each recent fold, a low-rank factorisation ``F_t = L_t R_t`` (``None`` when the rank is
so high that dense is smaller). A client learns the folds it missed at its next participation:
per layer, the factors of every missed fold, or the layer's whole folded change as one dense
``m x n`` matrix, whichever has fewer values (docs/results.md, "What bytes count"). A client
keeps its folded change and the round it is current to in its ``Context.state``; catch-up
messages are idempotent, so a client the server believes to be behind (its last reply was lost)
is not corrupted by receiving a fold twice.

Message layout (names in the ``arrays`` record): ``fold/<round>/<module>/left`` and ``.../right``
for factors, ``fold/upto<round>/<module>/dense`` for a whole folded change; evaluation messages
carry ``base/<module>`` (dense, not counted as traffic).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from torch import nn

from fedsim import keys
from fedsim.adapters.base import AdapterSpec
from fedsim.messages import ClientCall, ClientUpdate, extend_record, split_prefix
from fedsim.records import array_record, numpy_dict
from fedsim.strategy.base import AdapterStrategy

FOLD = "fold/"
BASE = "base/"


@dataclass
class Fold:
    """One round's fold: per module, ``(left, right)`` factors, or None (sent dense only)."""

    round: int
    factors: dict[str, tuple[np.ndarray, np.ndarray] | None]

    def values(self, module: str, dense: int) -> int:
        if module not in self.factors:
            return 0
        f = self.factors[module]
        return dense if f is None else f[0].size + f[1].size


class FoldingStrategy(AdapterStrategy):
    """Base class of strategies that fold changes into the frozen base (see module docstring).

    Subclasses call :meth:`fold_in` from :meth:`aggregate`.
    """

    folds_into_base = True

    def __init__(self, weighted: bool = True) -> None:
        super().__init__(weighted)
        self.base_delta: dict[str, np.ndarray] = {}  # module -> sum of all folds (float64)
        self.folds: list[Fold] = []  # recent folds, oldest first
        self.pruned_upto = 0  # folds up to this round are no longer kept as factors
        self.latest_fold = 0  # round of the newest fold
        self.version: dict[int, int] = {}  # client -> newest fold it is known to hold
        self._sent_version: dict[int, int] = {}
        self._base0: dict[str, torch.Tensor] | None = None  # this process's pristine W0

    # ------------------------------------------------------------------ server half
    def fold_in(
        self,
        server_round: int,
        change: Mapping[str, np.ndarray],
        factors: Mapping[str, tuple[np.ndarray, np.ndarray] | None],
    ) -> None:
        """Fold ``change`` (float64, by module) into the base; ``factors`` are what a client
        is sent for it (a module missing from ``factors`` had a zero change)."""
        spec = self.context.spec
        self.round_fold = {m: np.asarray(v, dtype=np.float64) for m, v in change.items()}
        for module, value in self.round_fold.items():
            self.base_delta[module] = self.base_delta.get(module, 0.0) + value
        self.folds.append(Fold(server_round, dict(factors)))
        self.latest_fold = server_round
        # A client that misses the oldest kept fold misses all later ones too; once their
        # factors outweigh a dense matrix on every layer, such a client is sent dense anyway.
        while len(self.folds) > 1:
            sizes = [
                (sum(f.values(m, a * b) for f in self.folds), a * b)
                for m, (a, b) in spec.shapes.items()
            ]
            if not all(total >= dense for total, dense in sizes):
                break
            self.pruned_upto = self.folds.pop(0).round

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "base_delta": dict(self.base_delta),
            "folds": [
                {
                    "round": f.round,
                    "factors": {m: None if lr is None else list(lr) for m, lr in f.factors.items()},
                }
                for f in self.folds
            ],
            "pruned_upto": self.pruned_upto,
            "latest_fold": self.latest_fold,
            "version": dict(self.version),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.base_delta = dict(state["base_delta"])
        self.folds = [
            Fold(
                int(f["round"]),
                {m: None if lr is None else (lr[0], lr[1]) for m, lr in f["factors"].items()},
            )
            for f in state["folds"]
        ]
        self.pruned_upto = int(state["pruned_upto"])
        self.latest_fold = int(state["latest_fold"])
        self.version = {int(c): int(v) for c, v in state["version"].items()}
        super().load_state_dict(state)

    def catch_up(self, client: int) -> dict[str, np.ndarray]:
        """The arrays that make ``client``'s base current (the module docstring)."""
        spec = self.context.spec
        have = self.version.get(client, 0)
        missed = [f for f in self.folds if f.round > have]
        out: dict[str, np.ndarray] = {}
        dtype = self._dtype()
        for module, (m, n) in spec.shapes.items():
            if module not in self.base_delta:
                continue
            values = sum(f.values(module, m * n) for f in missed)
            if have < self.pruned_upto or values >= m * n:
                name = f"{FOLD}upto{self.latest_fold}/{module}/dense"
                out[name] = self.base_delta[module].astype(dtype)
            elif values:
                for f in missed:
                    pair = f.factors.get(module)
                    if pair is not None and pair[0].size:
                        out[f"{FOLD}{f.round}/{module}/left"] = pair[0]
                        out[f"{FOLD}{f.round}/{module}/right"] = pair[1]
        return out

    def _dtype(self) -> np.dtype:
        """The dtype folds travel in: the global arrays' (the model's parameter dtype)."""
        return next(iter(self.current.values())).dtype if self.current else np.dtype(np.float32)

    def downlink(self, server_round: int, client: int, arrays: ArrayRecord) -> ArrayRecord:
        self._sent_version[client] = self.latest_fold
        return extend_record(super().downlink(server_round, client, arrays), self.catch_up(client))

    def evaluate_downlink(self, arrays: ArrayRecord) -> ArrayRecord:
        dtype = self._dtype()
        dense = {BASE + m: v.astype(dtype) for m, v in self.base_delta.items()}
        return extend_record(super().evaluate_downlink(arrays), dense)

    def acknowledge(self, server_round: int, updates: list[ClientUpdate]) -> None:
        super().acknowledge(server_round, updates)
        for u in updates:
            self.version[u.client] = self._sent_version.get(u.client, 0)

    def load_global(self, model: nn.Module, spec: AdapterSpec, arrays: dict) -> None:
        self.set_base(model, spec, self.base_delta)
        super().load_global(model, spec, arrays)

    # ------------------------------------------------------------------ client half
    def set_base(
        self, model: nn.Module, spec: AdapterSpec, delta: Mapping[str, np.ndarray]
    ) -> None:
        """Set each adapted layer's frozen base to the pristine ``W0`` plus ``delta``."""
        self._base0 = set_frozen_base(model, spec, self._base0, delta)

    def receive_folds(
        self, model: nn.Module, spec: AdapterSpec, arrays: dict[str, np.ndarray], call: ClientCall
    ) -> dict[str, np.ndarray]:
        """Apply the catch-up in ``arrays`` to the client's stored folded change, store it,
        set the model's base; returns the other arrays."""
        plain, tagged = split_prefix(FOLD, arrays)
        state = call.state
        have = 0
        if keys.STATE_BASE_VERSION in state:
            have = int(state[keys.STATE_BASE_VERSION][keys.VERSION])
        delta = numpy_dict(state[keys.STATE_BASE]) if keys.STATE_BASE in state else {}
        delta = {m: v.astype(np.float64) for m, v in delta.items()}
        newest = have
        dense = {k: v for k, v in tagged.items() if k.endswith("/dense")}
        for name, value in dense.items():
            tag, module, _ = _parse(name)
            delta[module] = value.astype(np.float64)
            newest = max(newest, int(tag[len("upto") :]))
        for name, left in tagged.items():
            if not name.endswith("/left"):
                continue
            tag, module, _ = _parse(name)
            round_ = int(tag)
            if round_ <= have:
                continue  # already held (the server did not see this client's last reply)
            right = tagged[name[: -len("left")] + "right"]
            change = left.astype(np.float64) @ right.astype(np.float64)
            delta[module] = delta.get(module, 0.0) + change
            newest = max(newest, round_)
        if tagged:
            dtype = next(iter(tagged.values())).dtype
            state[keys.STATE_BASE] = array_record({m: v.astype(dtype) for m, v in delta.items()})
            state[keys.STATE_BASE_VERSION] = ConfigRecord({keys.VERSION: newest})
        self.set_base(model, spec, delta)
        return plain

    def client_receive(self, model, spec, arrays, call) -> None:
        plain = self.receive_folds(model, spec, arrays, call)
        super().client_receive(model, spec, plain, call)

    def client_evaluate(self, model, spec, arrays, call) -> None:
        plain, dense = split_prefix(BASE, arrays)
        self.set_base(model, spec, dense)
        super().client_evaluate(model, spec, plain, call)


def set_frozen_base(
    model: nn.Module,
    spec: AdapterSpec,
    base0: dict[str, torch.Tensor] | None,
    delta: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """Set each adapted layer's frozen base weight to ``W0 + delta[layer]`` (summed in float64,
    stored in the weight's dtype), or to ``W0`` for a layer ``delta`` lacks. ``base0``: the
    pristine ``W0`` by layer, None on the first call (taken from the model as built); returns
    it, for the caller to keep and pass again."""
    params = spec.parameters_of(model)
    if base0 is None:
        base0 = {m: params[spec.base_weight(m)].detach().clone() for m in spec.adapted_modules}
    with torch.no_grad():
        for module, w0 in base0.items():
            target = params[spec.base_weight(module)]
            if module in delta:
                change = torch.from_numpy(np.asarray(delta[module])).to(w0.device)
                target.copy_((w0.double() + change.double()).to(w0.dtype))
            else:
                target.copy_(w0)
    return base0


def _parse(name: str) -> tuple[str, str, str]:
    """``"<tag>/<module>/<part>"`` (module names contain dots, never slashes)."""
    tag, rest = name.split("/", 1)
    module, part = rest.rsplit("/", 1)
    return tag, module, part
