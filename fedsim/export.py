"""Export of the global model's change as a PEFT LoRA adapter.

After the last round the server writes ``adapter/`` into the run folder:
``adapter_config.json`` and ``adapter_model.safetensors``, loadable with
``peft.PeftModel.from_pretrained(base, path)`` on the task's pretrained model. Per adapted layer
the exported LoRA reproduces the layer's whole change from the pretrained weight ``W0``:

* LoRA and FFA-LoRA: their own factors and scaling (``alpha / r``);
* LoRA-SB: ``A`` and ``B' = B R`` at scaling 1;
* strategies that fold updates into the base (FedEx-LoRA, FLoRA), or any adapter without a
  LoRA form: the accumulated change ``(W - W0) + delta`` in float64, factorised by SVD at the
  rank it needs (singular values above ``1e-7`` times the largest); the ranks are reported.

The task head (the modules the checkpoint lacks) travels through ``modules_to_save``.
A run on a 16-bit base (``task.dtype``) exports the same float32 factors, and its ``export``
block names the base's dtype (``base_dtype``): PEFT on the base loaded in that dtype computes
what the simulation did (PEFT's LoRA layers keep float32 factors over a 16-bit base, as
fedsim's do).
``summary.json``'s ``export`` block says where the adapter is, its ranks and the largest
relative difference between the exported and the simulated effective weights (float64).
Personal strategies (FedSA-LoRA, local training) have no global model: nothing is exported and
the summary says so.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.adapters.base import AdapterSpec

#: singular values below this share of the largest are dropped (float64 SVD)
RANK_TOLERANCE = 1e-7


class NotFinite(ValueError):
    """The model to export holds a NaN or an infinity: nothing is written."""


def refuse_non_finite(arrays: dict[str, np.ndarray], what: str) -> None:
    """NotFinite naming the first array of ``arrays`` that holds a NaN or an infinity."""
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            count = int(value.size - np.isfinite(value).sum())
            raise NotFinite(
                f"{what} {name} holds {count} non-finite value(s) of {value.size}: "
                "no adapter is exported"
            )


def lora_form(spec: AdapterSpec, module: str, arrays: dict[str, np.ndarray]):
    """``(A, B, scaling)`` with ``delta = scaling * B @ A`` from the adapter's own factors, or
    None if the adapter has no LoRA form."""
    form = getattr(spec.adapter, "lora_factors", None)
    if form is None:
        return None
    factors = {suffix: arrays[full] for suffix, full in spec.factors[module].items()}
    return form(factors)


def svd_factors(change: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``(A, B, rank)`` with ``B @ A`` equal to ``change`` up to the rank tolerance."""
    u, s, vt = np.linalg.svd(change, full_matrices=False)
    rank = int(np.sum(s > RANK_TOLERANCE * s[0])) if s.size and s[0] > 0 else 0
    if rank == 0:  # no change: a rank-1 zero LoRA (PEFT needs r >= 1)
        return np.zeros((1, change.shape[1])), np.zeros((change.shape[0], 1)), 1
    return vt[:rank], u[:, :rank] * s[:rank], rank


def export_peft(
    model: nn.Module,
    spec: AdapterSpec,
    pristine: nn.Module,
    head_modules: tuple[str, ...],
    out_dir: Path,
    base_model: str | None = None,
    base_changes: dict[str, np.ndarray] | None = None,
    task_type: str | None = None,
) -> dict[str, Any]:
    """Write ``model``'s change from ``pristine`` (the task's model before any adapter, a
    throwaway copy: PEFT's layers are put into it) as a PEFT LoRA adapter into ``out_dir``;
    returns the summary's ``export`` block.

    ``base_changes``: what a folding strategy added to each base weight, exactly (float64);
    without it the change is read off the float32 weights, whose rounding would make an SVD
    see full rank. ``task_type``: PEFT's (``SEQ_CLS``, ``CAUSAL_LM``), so that
    ``AutoPeftModelFor...`` classes can load the adapter too."""

    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            count = int((~torch.isfinite(param)).sum())
            raise NotFinite(
                f"parameter {name} holds {count} non-finite value(s) of {param.numel()}: "
                "no adapter is exported"
            )
    refuse_non_finite(dict(base_changes or {}), "the change folded into")
    layers, folded, wanted = _layer_forms(model, spec, pristine, base_changes)
    base_dtype = _base_dtype(pristine, spec)  # before PEFT's layers go into it
    ranks = {m: int(a.shape[0]) for m, (a, _, _) in layers.items()}
    config = _lora_config(spec, layers, ranks, head_modules, base_model, task_type)
    peft_model = _peft_model(pristine, config, base_model)
    inner = peft_model.base_model.model
    with torch.no_grad():
        _load_peft(inner, model, layers, head_modules)
        errors = _read_back_errors(inner, wanted, ranks)
    refuse_non_finite({m: np.asarray(e) for m, e in zip(wanted, errors)}, "the read-back error of")
    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model.save_pretrained(
            str(out_dir), safe_serialization=True, save_embedding_layers=False
        )
    values = list(ranks.values())
    return {
        "path": out_dir.name,
        "format": "peft LoRA (adapter_config.json, adapter_model.safetensors)",
        "base_model": base_model,
        "task_type": task_type,
        "modules": len(ranks),
        "rank_min": min(values),
        "rank_max": max(values),
        "ranks_from_svd": len(folded),
        "modules_to_save": list(head_modules),
        "max_relative_error": max(errors, default=0.0),
        **base_dtype,
    }


def _base_dtype(pristine: nn.Module, spec: AdapterSpec) -> dict[str, str]:
    """``{"base_dtype": ...}`` for a 16-bit base (``task.dtype``; PEFT's users load the base
    in it), else nothing."""
    dtype = pristine.get_submodule(spec.adapted_modules[0]).weight.dtype
    return {} if dtype == torch.float32 else {"base_dtype": str(dtype).removeprefix("torch.")}


def _layer_forms(
    model: nn.Module,
    spec: AdapterSpec,
    pristine: nn.Module,
    base_changes: dict[str, np.ndarray] | None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, float]], list[str], dict[str, np.ndarray]]:
    """Per adapted module: the exported ``(A, B, scaling)`` (the adapter's own LoRA form, or
    an SVD of the whole change where the base changed or there is no LoRA form); the modules
    factorised by SVD; and each module's whole change ``(W - W0) + delta`` (float64)."""
    params = {k: v.detach().cpu().double().numpy() for k, v in model.named_parameters()}
    layers: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    folded: list[str] = []
    wanted: dict[str, np.ndarray] = {}
    for module in spec.adapted_modules:
        if base_changes is not None and module in base_changes:
            base_change = np.asarray(base_changes[module], dtype=np.float64)
        else:
            w0 = pristine.get_submodule(module).weight.detach().cpu().double().numpy()
            base_change = params[spec.base_weight(module)] - w0
        form = None if np.any(base_change) else lora_form(spec, module, params)
        factors = {suffix: params[full] for suffix, full in spec.factors[module].items()}
        delta = spec.adapter.layer_delta(factors)
        if form is None:
            folded.append(module)
            a, b, rank = svd_factors(base_change + delta)
            form = (a, b, 1.0)
        layers[module] = form
        wanted[module] = base_change + delta
    return layers, folded, wanted


def _peft_model(pristine: nn.Module, config, base_model: str | None):
    """PEFT's model of ``pristine`` for ``config``, naming ``base_model`` (peft's
    ``get_peft_model`` replaces the config's name by the model's local path, with a warning:
    the portable name is put back)."""
    from peft import get_peft_model

    with warnings.catch_warnings():  # deprecation notices between peft and transformers
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="The PEFT config's `base_model_name_or_path`")
        peft_model = get_peft_model(pristine, config)
    if base_model is not None:
        peft_model.peft_config["default"].base_model_name_or_path = base_model
    return peft_model


def _lora_config(spec: AdapterSpec, layers, ranks, head_modules, base_model, task_type):
    """PEFT's ``LoraConfig`` for the exported layers: each module's rank and alpha (its
    scaling times its rank), the head in ``modules_to_save``."""
    from peft import LoraConfig

    # full module names: peft matches pattern keys as a suffix after a dot (or the whole name)
    pattern = dict(ranks)
    alphas = {m: scaling * ranks[m] for m, (_, _, scaling) in layers.items()}
    first = next(iter(ranks))
    return LoraConfig(
        r=ranks[first],
        lora_alpha=alphas[first],
        target_modules=list(spec.adapted_modules),
        rank_pattern=pattern,
        alpha_pattern=alphas,
        modules_to_save=list(head_modules) or None,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,
        base_model_name_or_path=base_model,
        task_type=task_type,
    )


def _load_peft(inner: nn.Module, model: nn.Module, layers, head_modules) -> None:
    """The exported factors into PEFT's layers of ``inner``, ``model``'s head into its
    ``modules_to_save`` copies."""
    for module, (a, b, _) in layers.items():
        layer = inner.get_submodule(module)
        layer.lora_A["default"].weight.copy_(torch.from_numpy(a))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(b))
    for head in head_modules:
        trained = model.get_submodule(head).state_dict()
        inner.get_submodule(head).modules_to_save["default"].load_state_dict(trained)


def _read_back_errors(inner: nn.Module, wanted, ranks) -> list[float]:
    """What PEFT will add, read back from its layers, against each module's change: the
    relative differences (float64)."""
    errors = []
    for module, want in wanted.items():
        layer = inner.get_submodule(module)
        if int(layer.r["default"]) != ranks[module]:
            raise RuntimeError(f"peft built rank {layer.r['default']} for {module}")
        got = layer.get_delta_weight("default").detach().cpu().double().numpy()
        scale = float(np.linalg.norm(want))
        errors.append(float(np.linalg.norm(got - want)) / scale if scale > 0 else 0.0)
    return errors
