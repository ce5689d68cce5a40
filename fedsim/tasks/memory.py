"""Memory of big models: gradient checkpointing, 16-bit frozen bases, quantised bases.

Three options of the Hugging Face tasks (``task.gradient_checkpointing``, ``task.dtype``,
``task.quantization``; docs/tasks.md, "Memory"):

* **gradient checkpointing** keeps only each transformer block's input in a training forward
  pass and recomputes the block in the backward pass (:func:`enable_checkpointing`). The
  recomputation draws the same dropout masks: the CPU generator's state is restored (PyTorch's
  ``preserve_rng_state``) and the model's own dropout runs through fedsim's
  :class:`~fedsim.dropout.StreamedDropout` again where the forward pass did;
* **a 16-bit frozen base** (``bfloat16`` or ``float16``) is loaded in that dtype and computes in
  it, while what trains stays float32: the task head (:func:`float32_module`) and every
  adapter's own parameters (:func:`float32_adapter`), so the optimizer's state is float32
  too. An adapted layer's input reaches its adapter in float32 and its base in the base's
  dtype; its output is the base's dtype, what the next 16-bit layer takes (PEFT's LoRA layers
  do the same with ``autocast_adapter_dtype``);
* **a quantised base** (bitsandbytes' 4-bit / 8-bit) is refused (:func:`check_quantization`).

:func:`check_run` refuses the combinations that cannot work, in one line each.
"""

from __future__ import annotations

import importlib.util
from contextlib import nullcontext

import torch
from torch import nn

from fedsim.errors import ConfigError
from fedsim.validate import boolean

#: ``task.dtype``: the frozen base's weights (and its computation)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: the 16-bit dtypes, whose adapters and heads are kept in float32
HALF = (torch.bfloat16, torch.float16)
#: significant bits of the 16-bit dtypes' weights
BITS = {"bfloat16": 8, "float16": 11}
#: ``task.quantization``: only ``none`` runs (see :func:`check_quantization`)
QUANTIZATIONS = ("none", "4bit", "8bit")


def check_dtype(value: str) -> str:
    if value not in DTYPES:
        raise ConfigError("task.dtype", value, f"must be one of {', '.join(DTYPES)}")
    return value


def check_quantization(value: str) -> str:
    """``none``; a quantised base is refused, naming what this machine lacks for one, or, where
    it has both, that fedsim does not implement it."""
    if value not in QUANTIZATIONS:
        raise ConfigError("task.quantization", value, f"must be one of {', '.join(QUANTIZATIONS)}")
    if value == "none":
        return value
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package")
    if missing:
        has = "neither" if len(missing) == 2 else f"no {missing[0].split(' ', 1)[1]}"
        why = f"needs a CUDA GPU and the bitsandbytes package; this machine has {has}"
    else:
        why = (
            "is not implemented: fedsim's adapters, aggregation diagnostics and export read "
            "each adapted layer's base weight as a dense matrix, which a packed quantised "
            "weight is not"
        )
    raise ConfigError("task.quantization", value, f"{why} (task.dtype=bfloat16 halves the base)")


def check_settings(
    precision: str, dtype: str, gradient_checkpointing: bool, quantization: str
) -> tuple[str, bool, str]:
    """The validated ``(dtype, gradient_checkpointing, quantization)`` of a task."""
    dtype = check_dtype(dtype)
    if precision == "bfloat16" and dtype == "float16":
        raise ConfigError(
            "task.precision",
            precision,
            "autocast to bfloat16 over a float16 base mixes two 16-bit formats: use "
            "task.precision=float32 (task.dtype=float16 computes in float16 already)",
        )
    flag = boolean("task.gradient_checkpointing", gradient_checkpointing)
    return dtype, flag, check_quantization(quantization)


# ----------------------------------------------------------------------------- 16-bit bases


def _floating(x):
    return torch.is_tensor(x) and x.is_floating_point()


def _inputs_to_float32(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if _floating(a) else a for a in args)


def _inputs_to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    dtype = module.weight.dtype
    return tuple(a.to(dtype) if _floating(a) else a for a in args)


def _output_to_base_dtype(module: nn.Module, args: tuple, output: torch.Tensor):
    return output.to(module.base.weight.dtype)


def float32_module(module: nn.Module) -> None:
    """A trained module inside a 16-bit model (the task head): float32 parameters, inputs
    cast to float32 (its output stays float32: the logits)."""
    module.float()
    module.register_forward_pre_hook(_inputs_to_float32)


def float32_adapter(layer: nn.Module) -> None:
    """An adapted layer on a 16-bit frozen ``layer.base``: its own parameters float32, its
    input float32 for the adapter and the base's dtype for the base, its output in the base's
    dtype."""
    base = layer.base
    for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
        if not name.startswith("base.") and tensor.is_floating_point():
            tensor.data = tensor.data.float()
    layer.register_forward_pre_hook(_inputs_to_float32)
    base.register_forward_pre_hook(_inputs_to_weight_dtype)
    layer.register_forward_hook(_output_to_base_dtype)


def factor_dtype(base: nn.Module) -> torch.dtype:
    """The dtype of an adapter's own parameters on the frozen ``base``: float32 over a 16-bit
    base, else the base's."""
    dtype = base.weight.dtype
    return torch.float32 if dtype in HALF else dtype


def base_bytes(model: nn.Module) -> int:
    """Bytes of the model's frozen parameters (``numel * element_size``)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


# ----------------------------------------------------------------------------- checkpointing


def _recompute_contexts():
    """The forward pass's context and the recomputation's: fedsim's streamed dropout again
    where the forward pass ran under it (a text task's training pass)."""
    from fedsim.dropout import StreamedDropout

    modes = torch.overrides._get_current_function_mode_stack()
    streamed = any(isinstance(m, StreamedDropout) for m in modes)
    return nullcontext(), (StreamedDropout() if streamed else nullcontext())


def enable_checkpointing(model: nn.Module) -> None:
    """Hugging Face's gradient checkpointing of ``model``'s blocks, non-reentrant, in training
    passes (the model's ``training`` flag and autograd on)."""
    kwargs = {"use_reentrant": False, "context_fn": _recompute_contexts}
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            "task.gradient_checkpointing",
            True,
            f"{type(model).__name__} does not support Hugging Face's gradient checkpointing",
        )
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ----------------------------------------------------------------------------- the run


def check_run(task, strategy, engine, privacy) -> None:
    """One-line refusals of the memory options with the run's other choices."""
    dtype = getattr(task, "dtype", "float32")
    if dtype != "float32" and getattr(strategy, "folds_into_base", False):
        raise ConfigError(
            "task.dtype",
            dtype,
            f"strategy {strategy.name} folds each round's change into the frozen base "
            f"weights, and a {dtype} weight ({BITS[dtype]} significant bits) would round "
            "small changes away; use task.dtype=float32",
        )
    if not getattr(task, "gradient_checkpointing", False):
        return
    if getattr(engine, "name", None) == "batched":
        raise ConfigError(
            "task.gradient_checkpointing",
            True,
            "engine=batched runs a group of clients under torch.func.vmap, where Hugging "
            "Face's checkpointing cannot run (it sets requires_grad on the embeddings' output); "
            "use engine=inline",
        )
    if getattr(privacy, "client_dp", False):
        raise ConfigError(
            "task.gradient_checkpointing",
            True,
            "privacy=dpsgd: Opacus records each layer's inputs in the forward pass for its "
            "per-example gradients, and a checkpoint's recomputation would record them twice; "
            "use task.gradient_checkpointing=false",
        )
