"""What every adapter provides: injection into a frozen model; which parameters train and travel.

An adapter replaces selected ``nn.Linear`` modules of a model by adapter modules, freezes the
rest of the model, and declares, by parameter-name suffix, which of its parameters are trained,
which are sent to the server, and which are frozen parts of the adapter (peft's
``adapter_layer_names`` plays the same role). Task heads (a classifier) are trained and sent like
adapter weights.

Every adapter also states, in numpy, what it adds to a layer's effective weight
(:meth:`Adapter.layer_delta`), which is how fedsim measures the exactness of aggregation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.errors import ConfigError
from fedsim.tasks.memory import HALF, float32_adapter


@dataclass
class AdapterSpec:
    """The result of applying an adapter to a model: full parameter names, in model order.

    ``trained`` have ``requires_grad=True``; ``sent`` is what a client sends and the server
    aggregates (a subset of ``trained``, or equal to it); ``frozen`` are adapter parameters that
    are not trained (FFA-LoRA's ``A``, LoRA-SB's ``A`` and ``B``). ``factors`` maps each adapted
    module to its adapter parameters by suffix, ``heads`` lists the sent parameters that belong
    to no adapted module (the task head), ``shapes`` the base weight shape ``(m, n)`` of each
    adapted module. The spec keeps its model's name-to-parameter map, so the per-round loads and
    reads need no walk over the modules.
    """

    trained: list[str]
    sent: list[str]
    adapted_modules: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    factors: dict[str, dict[str, str]] = field(default_factory=dict)
    heads: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    adapter: Adapter | None = field(default=None, repr=False, compare=False)
    _model: nn.Module | None = field(default=None, repr=False, compare=False)
    _params: dict[str, nn.Parameter] = field(default_factory=dict, repr=False, compare=False)

    def bind(self, model: nn.Module) -> AdapterSpec:
        """Remember ``model``'s parameters (its structure must not change afterwards)."""
        self._model, self._params = model, dict(model.named_parameters())
        return self

    @property
    def bound_model(self) -> nn.Module | None:
        """The model :meth:`bind` was given (None before)."""
        return self._model

    def parameters_of(self, model: nn.Module) -> dict[str, nn.Parameter]:
        if self._model is model:
            return self._params
        return dict(model.named_parameters())

    def sent_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = self.parameters_of(model)
        return {name: params[name] for name in self.sent}

    def trained_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        params = self.parameters_of(model)
        return [params[name] for name in self.trained]

    def num_trained(self, model: nn.Module) -> int:
        return sum(p.numel() for p in self.trained_parameters(model))

    def frozen_state(self, model: nn.Module) -> dict[str, np.ndarray]:
        """Copies of the frozen adapter parameters."""
        params = self.parameters_of(model)
        return {name: params[name].detach().cpu().numpy().copy() for name in self.frozen}

    def base_weight(self, module: str) -> str:
        """The full name of an adapted module's frozen base weight ``W0``."""
        return f"{module}.base.weight"

    def deltas(
        self, arrays: Mapping[str, np.ndarray], modules: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Each adapted module's contribution to its effective weight, in float64 (m x n).

        ``arrays`` holds adapter parameters by full name; a module whose factors are not all
        there contributes zero (an adapter that starts from zero, such as FLoRA's re-initialised
        ones, need not be sent).
        """
        if self.adapter is None and self.adapted_modules:
            raise RuntimeError("this AdapterSpec was not made by Adapter.apply")
        out = {}
        for module in self.adapted_modules if modules is None else modules:
            names = self.factors[module]
            if all(full in arrays for full in names.values()):
                factors = {suffix: np.asarray(arrays[full]) for suffix, full in names.items()}
                out[module] = self.adapter.layer_delta(factors)
            else:
                out[module] = np.zeros(self.shapes[module])
        return out

    def load(self, model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
        """Copy named arrays into the model's parameters (names must exist, shapes must match)."""
        params = self.parameters_of(model)
        with torch.no_grad():
            for name, value in arrays.items():
                if name not in params:
                    raise KeyError(f"the model has no parameter named {name!r}")
                params[name].copy_(torch.from_numpy(np.asarray(value)))


class AdaptedLinear(nn.Module):
    """Base of adapter modules: a frozen ``nn.Linear`` (``self.base``) plus an adapter.

    Model code often reads ``weight``, ``bias`` and the feature counts from its linear layers
    (dtype checks, fast paths); they are the base layer's.
    """

    base: nn.Linear

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features


class Adapter:
    """Base class of adapter configs (one per method, built from ``conf/adapter/*.yaml``).

    Subclasses implement :meth:`make_module` and set ``trained_suffixes`` / ``sent_suffixes``.
    """

    name = "adapter"
    #: parameter-name suffixes (after the adapted module's name) that are trained
    trained_suffixes: tuple[str, ...] = ()
    #: those that are sent to the server; ``None`` means the same as trained
    sent_suffixes: tuple[str, ...] | None = None
    #: adapter parameters that are not trained (but define the adapter's output)
    frozen_suffixes: tuple[str, ...] = ()
    #: a data-driven initialisation (:class:`~fedsim.adapters.data_init.DataInit`), or None
    data_init = None
    #: what ``summary.json`` calls an initialisation that needs no data
    init_method = "default"

    def __init__(self, target_modules: Sequence[str] | str | None = None) -> None:
        if target_modules is not None and not (
            isinstance(target_modules, str)
            or (
                isinstance(target_modules, Sequence)
                and all(isinstance(t, str) and t for t in target_modules)
            )
        ):
            raise ConfigError(
                "adapter.target_modules",
                target_modules,
                "must be a list of module names or a regex",
            )
        if isinstance(target_modules, str):
            try:
                re.compile(target_modules)
            except re.error as e:
                raise ConfigError(
                    "adapter.target_modules", target_modules, f"is not a valid regex ({e})"
                ) from None
        self.target_modules = target_modules

    def make_module(self, base: nn.Linear, generator: torch.Generator) -> nn.Module:
        raise NotImplementedError

    def check_layers(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Refuse settings that do not fit the layers to adapt (base weight shapes ``(m, n)``
        by module name), with a ConfigError, before any module is made. The base class
        accepts every layer; low-rank adapters bound their rank (:func:`check_rank`)."""

    def layer_delta(self, factors: Mapping[str, np.ndarray]) -> np.ndarray:
        """What the adapter adds to the layer's weight, from its parameters by suffix (float64)."""
        raise NotImplementedError

    @property
    def frozen_source(self) -> str:
        """``"seed"``: the frozen parameters follow from the run's seed, so the server and every
        client build them identically at no cost; ``"data"``: they come from a data-driven
        initialisation (:attr:`data_init`) and the server sends them to each client once."""
        return "seed" if self.data_init is None else "data"

    def apply(
        self,
        model: nn.Module,
        *,
        default_targets: Sequence[str],
        head_modules: Sequence[str],
        seed: int,
    ) -> AdapterSpec:
        """Freeze ``model``, replace the targeted linear layers in place, unfreeze heads."""
        names = self._targets(model, default_targets, head_modules)
        self.check_layers({n: tuple(model.get_submodule(n).weight.shape) for n in names})
        for p in model.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(int(seed))
        for name in names:
            parent, child = _parent(model, name)
            layer = self.make_module(getattr(parent, child), generator)
            base = getattr(layer, "base", None)
            if base is not None and base.weight.dtype in HALF:  # task.dtype: float32 adapter
                float32_adapter(layer)
            setattr(parent, child, layer)
        heads = []
        for head in head_modules:
            module = model.get_submodule(head)
            for p in module.parameters():
                p.requires_grad_(True)
            heads.append(head)
        spec = self._classify(model, names, heads)
        spec.shapes = {n: tuple(model.get_submodule(n).base.weight.shape) for n in names}
        return spec.bind(model)

    def _targets(
        self, model: nn.Module, default_targets: Sequence[str], head_modules: Sequence[str]
    ) -> list[str]:
        """The linear layers to adapt: ``target_modules``, else the task's default; none in
        the task head."""
        targets = self.target_modules
        if targets is None:  # the task's default: names, or one regular expression
            targets = default_targets if isinstance(default_targets, str) else list(default_targets)
        names = matching_linear_modules(model, targets)
        if not names:
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise ConfigError(
                "adapter.target_modules",
                targets,
                f"matches no nn.Linear of the model; its linear layers are {linears}",
            )
        in_head = [n for n in names if any(n == h or n.startswith(h + ".") for h in head_modules)]
        if in_head:
            raise ConfigError(
                "adapter.target_modules",
                targets,
                f"selects {in_head}, part of the task head {list(head_modules)}, which is trained "
                "and sent in full; adapt other layers",
            )
        return names

    def _classify(self, model: nn.Module, names: list[str], heads: list[str]) -> AdapterSpec:
        """Which parameters train, travel and stay frozen (by suffix), in model order."""
        trained, sent, frozen, head_names = [], [], [], []
        factors: dict[str, dict[str, str]] = {name: {} for name in names}
        sent_suffixes = (
            self.sent_suffixes if self.sent_suffixes is not None else self.trained_suffixes
        )
        adapter_suffixes = (*self.trained_suffixes, *self.frozen_suffixes)
        for pname, param in model.named_parameters():
            owner = _owner(pname, names)
            if owner is not None:
                suffix = pname[len(owner) + 1 :]
                if suffix in adapter_suffixes:
                    factors[owner][suffix] = pname
                param.requires_grad_(suffix in self.trained_suffixes)  # new modules default True
                if suffix in self.trained_suffixes:
                    trained.append(pname)
                if suffix in sent_suffixes:
                    sent.append(pname)
                if suffix in self.frozen_suffixes:
                    frozen.append(pname)
            elif any(pname.startswith(h + ".") for h in heads):
                trained.append(pname)
                sent.append(pname)
                head_names.append(pname)
        return AdapterSpec(
            trained=trained,
            sent=sent,
            adapted_modules=names,
            frozen=frozen,
            factors=factors,
            heads=head_names,
            adapter=self,
        )


#: what an older fedsim read of an adapter initialised from data; ``data_init`` replaced them
OLD_INIT_PROTOCOL = ("needs_data_init", "init_source", "init_examples", "base_gradients")


def check_protocol(adapter: Adapter, target: str) -> None:
    """A ConfigError if an adapter class of the user's still speaks the data-driven
    initialisation protocol of an older fedsim (it would run without being initialised)."""
    for cls in type(adapter).__mro__:
        if cls.__module__.startswith("fedsim.") or cls is object:
            continue
        old = [name for name in OLD_INIT_PROTOCOL if name in vars(cls)]
        if old:
            raise ConfigError(
                "adapter._target_",
                target,
                f"{cls.__name__} defines {', '.join(old)}: a data-driven initialisation is now "
                "an adapter's data_init, a fedsim.adapters.data_init.DataInit "
                "(docs/architecture.md, where a new piece goes)",
            )


def check_rank(
    r: int,
    shapes: Mapping[str, tuple[int, int]],
    bound: str,
    why: str,
    key: str = "adapter.r",
    setting: Any = None,
) -> None:
    """A ConfigError naming ``key`` if ``r`` exceeds the bound of the smallest layer.

    ``bound`` is ``"min(m, n)"`` (the rank a product ``B A`` of an ``m x r`` and an ``r x n``
    matrix can reach) or ``"n"`` (a layer's input width); ``why`` says what a larger rank
    would (not) add. ``setting``: ``key``'s whole value when ``r`` is one rank of several
    (``adapter.client_ranks``), shown with the rank named.
    """

    def limit(shape: tuple[int, int]) -> int:
        return min(shape) if bound == "min(m, n)" else shape[1]

    name = min(shapes, key=lambda k: limit(shapes[k]), default=None)
    if name is None or r <= limit(shapes[name]):
        return
    m, n = shapes[name]
    raise ConfigError(
        key,
        r if setting is None else setting,
        ("" if setting is None else f"its rank {r} ")
        + f"must be at most {bound} = {limit(shapes[name])} of the smallest adapted layer, "
        f"{name} ({m} x {n}, m x n): {why}",
    )


def matching_linear_modules(model: nn.Module, targets: Sequence[str] | str) -> list[str]:
    """Names of the ``nn.Linear`` modules selected by ``targets``.

    A list selects modules whose name equals an entry or ends with ``"." + entry`` (as peft's
    ``target_modules``); a string is a regular expression that must match the full name.
    """
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not name:
            continue
        if isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit:
            out.append(name)
    return out


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." in name:
        parent_name, child = name.rsplit(".", 1)
        return model.get_submodule(parent_name), child
    return model, name


def _owner(pname: str, modules: Sequence[str]) -> str | None:
    for m in modules:
        if pname.startswith(m + "."):
            return m
    return None
