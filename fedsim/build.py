"""Every object of a run is built here, from the config, through ``_target_``."""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import get_object, instantiate
from torch import nn

from fedsim import registry
from fedsim.adapters.base import Adapter, AdapterSpec, check_protocol
from fedsim.adapters.eva import LayerRanks
from fedsim.byzantine import ByzantineClients
from fedsim.codec import Codec, compresses
from fedsim.compression import Compressor
from fedsim.control import Control, ControlVariates
from fedsim.data import FederatedData
from fedsim.downlink import EF21P
from fedsim.errors import ComponentError, ConfigError
from fedsim.faults import FaultInjection, Faults
from fedsim.feedback import Feedback
from fedsim.init import FrozenFactors
from fedsim.privacy import CentralNoise, Privacy
from fedsim.robust import Robust
from fedsim.schema import check_node
from fedsim.server_opt import ServerOpt
from fedsim.sinks import Sink
from fedsim.staleness import Rebase
from fedsim.strategy import AdapterStrategy, ClientSampler
from fedsim.system.profiles import System
from fedsim.tasks.base import Task
from fedsim.tasks.memory import check_run as check_memory
from fedsim.training import Schedule
from fedsim.uplink import Stage, Uplink


def build(group: str, node: dict[str, Any], **extra: Any) -> Any:
    """Instantiate one config group's ``_target_``, turning every failure into a ConfigError."""
    from hydra.errors import InstantiationException

    target = node.get("_target_")
    try:
        hydra_log = logging.getLogger("hydra.utils")
        level = hydra_log.level
        hydra_log.setLevel(logging.CRITICAL)  # get_object logs the error too; report it once
        try:
            obj = get_object(target)
        finally:
            hydra_log.setLevel(level)
    except Exception as e:
        reason = " ".join(str(e).split())
        raise ConfigError(f"{group}._target_", target, f"cannot be imported: {reason}") from None
    missing = _missing(node)
    if missing is not None:  # OmegaConf's "???": instantiate would raise a traceback's worth
        raise ConfigError(
            f"{group}.{missing}",
            "???",
            f"is required and has no default: give it on the command line ({group}.{missing}=...)",
        )
    check_node(group, obj, node)  # the group's schema: the target's typed signature
    try:
        built = instantiate(node, **extra, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            raise ComponentError(group, str(target), _one_line(str(cause))) from None
        raise ComponentError(group, str(target), _one_line(str(e))) from None
    except ConfigError:
        raise
    if isinstance(built, functools.partial) and type(built) is not functools.partial:
        # Hydra's _partial_ objects re-run its target policy on every call (125 us against 11 us
        # for an optimizer, every client, every round); the target was authorised just above.
        built = functools.partial(built.func, *built.args, **built.keywords)
    if group == "strategy":  # a plug-in aggregator (docs/plugins.md) is wrapped, contract checked
        from fedsim.strategy import as_strategy

        built = as_strategy(built, str(target))
    if group == "adapter" and isinstance(built, Adapter):
        check_protocol(built, str(target))
    expected = registry.base_class(group)
    if expected is not None and not isinstance(built, expected):
        raise ConfigError(
            f"{group}._target_", target, f"must build a {expected.__module__}.{expected.__name__}"
        )
    return built


def _one_line(text: str) -> str:
    """A library's message whole, its lines joined (never cut)."""
    return " ".join(text.split())


def _missing(node: Any, prefix: str = "") -> str | None:
    """The first key of ``node`` (dotted, nested dicts included) whose value is ``???``."""
    if not isinstance(node, dict):
        return None
    for key, value in node.items():
        if isinstance(value, str) and value == "???":
            return f"{prefix}{key}"
        found = _missing(value, f"{prefix}{key}.")
        if found is not None:
            return found
    return None


@dataclass
class Components:
    """The built objects of a run."""

    cfg: dict[str, Any]
    task: Task
    adapter: Adapter
    strategy: AdapterStrategy
    data: FederatedData
    make_optimizer: Callable[..., torch.optim.Optimizer]
    schedule: Schedule
    engine: Any
    compressor: Compressor
    feedback: Feedback
    downlink: Compressor
    privacy: Privacy
    logger: Sink
    faults: Faults
    server_opt: ServerOpt
    robust: Robust
    control: Control
    system: System

    @property
    def compresses(self) -> bool:
        """Whether client updates travel in any other form than the plain arrays (the chain
        then has a compression stage)."""
        return compresses(self.compressor, self.feedback)

    @property
    def sim(self) -> dict[str, Any]:
        return self.cfg["sim"]

    def uplink(self, spec: AdapterSpec) -> Uplink:
        """The run's uplink chain (:mod:`fedsim.uplink`) for a model with adapter ``spec``.
        The order here is the order of the client halves (the server's run in reverse):

        0. ``fedbuff``: FedBuff's rebasing of stale updates (innermost: it sees the decoded
           updates, :mod:`fedsim.staleness`);
        1. ``ranks``: EVA's per-layer ranks, with every message while they differ from r;
        2. ``frozen``: the adapter's data-derived frozen factors, sent once per client;
        3. ``downlink``: EF21-P (clients train from ``w``; the server rebases their updates);
        4. ``byzantine``: malicious clients' attacks (before encoding: the payload stays
           well-formed; ALIE's substitution on the server, right after decoding);
        5. ``control``: SCAFFOLD's control variates (its server step wraps the rebased
           aggregation, inside the decoding of compressed replies);
        6. ``compression``: compression with error feedback (under central DP it also clips);
        7. ``central_dp``: clipping (when nothing compresses) and the noised sum;
        8. ``faults``: crashes, corrupted payloads and late replies.
        """
        sim, privacy = self.sim, self.privacy
        stages: list[Stage] = []
        if sim.get("async_buffer"):  # FedBuff: rebase stale updates, right before the strategy
            stages.append(Rebase(sim["staleness_exponent"]))
        if LayerRanks.needed(spec):  # EVA's per-layer ranks: first, every message
            stages.append(LayerRanks(spec))
        if FrozenFactors.needed(spec):
            stages.append(FrozenFactors(spec))
        if self.downlink.active:
            stages.append(EF21P(self.downlink, sim["seed"]))
        if self.faults.byzantine is not None:
            attack = self.faults.byzantine
            stages.append(ByzantineClients(attack, sim["num_clients"], sim["seed"], self.task))
        if self.control.active:
            stages.append(ControlVariates(self.control))
        if self.compresses:
            clip = privacy.clip_norm if privacy.central else None
            diagnose = sim["aggregation_error"]
            stages.append(
                Codec(self.compressor, self.feedback, sim["lr"], sim["seed"], clip, diagnose)
            )
        if privacy.central:
            stages.append(
                CentralNoise(
                    privacy,
                    num_clients=sim["num_clients"],
                    clients_per_round=sim["clients_per_round"],
                    seed=sim["seed"],
                    clip_on_client=not self.compresses,
                    diagnose=sim["aggregation_error"],
                )
            )
        if self.faults.active:
            stages.append(FaultInjection(self.faults, sim["seed"]))
        return Uplink(stages)

    @property
    def device(self) -> torch.device:
        from fedsim.training import resolve_device

        return resolve_device(self.sim["device"])

    def model(self, device: torch.device | None = None) -> tuple[nn.Module, AdapterSpec]:
        """The task's pretrained model with the adapter applied (identical on every call)."""
        model = self.task.build_model()
        if device is not None:
            model.to(device)
        spec = self.adapter.apply(
            model,
            default_targets=self.task.default_target_modules,
            head_modules=self.task.head_modules,
            seed=self.sim["seed"],
        )
        return model, spec

    def sampler(self) -> ClientSampler:
        e = self.sim["eval_clients"]
        return ClientSampler(
            self.sim["num_clients"],
            self.sim["clients_per_round"],
            self.sim["seed"],
            eval_clients=None if e == "all" else int(e),
        )

    @property
    def total_local_steps(self) -> int:
        return self.sim["rounds"] * self.sim["local_steps"]


def small_cache(cache: OrderedDict, key: str, make: Callable[[], Any], size: int = 2) -> Any:
    """``cache[key]``, made with ``make()`` if missing; the least recently used entries go
    beyond ``size`` (sweeps build one configuration after another in one process)."""
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
        while len(cache) > size:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


_DATA: OrderedDict[str, FederatedData] = OrderedDict()


def shared_data(cfg: dict[str, Any], task: Task, partitioner: Any) -> FederatedData:
    """The clients' partitions for ``cfg``, shared by every build of the same data settings in
    this process (the up-front check, the server and the inline clients), so that a
    partitioner's assignment of a large pool (10,000 clients) is computed once."""
    import json

    sim = cfg["sim"]
    key = json.dumps(
        [cfg["task"], cfg["partition"], sim["client_test_fraction"], sim["seed"]],
        sort_keys=True,
        default=str,
    )
    return small_cache(
        _DATA,
        key,
        lambda: FederatedData(task, partitioner, sim["client_test_fraction"], sim["seed"]),
    )


def build_components(cfg: dict[str, Any]) -> Components:
    """Every config group of ``cfg`` built (:data:`fedsim.registry.GROUPS`, in that order),
    and the clients' data."""
    built = {}
    for group in registry.GROUPS:
        node = cfg.get(group.name)
        if node is None and group.default is not None:
            node = {"_target_": group.default}
        if group.name == "partition":  # built when first used (flwr-datasets is slow to import)
            built[group.name] = functools.partial(build, group.name, node)
        else:
            built[group.name] = build(group.name, node)
    check_memory(built["task"], built["strategy"], built["engine"], built["privacy"])
    data = shared_data(cfg, built["task"], built["partition"])
    if built["robust"].active:  # it replaces the mean of an averaging strategy
        built["strategy"].robust = built["robust"]
    ranks_for = getattr(built["adapter"], "ranks_for", None)
    if ranks_for is not None:  # adapter.client_ranks, resolved to one rank per client
        sim = cfg["sim"]
        built["strategy"].client_ranks = ranks_for(sim["num_clients"], sim["seed"])
    return Components(
        cfg,
        data=data,
        make_optimizer=built.pop("optimizer"),
        **{k: v for k, v in built.items() if k != "partition"},
    )


def check_optimizer(components: Components) -> None:
    """The optimizer's own checks of its settings, on a probe parameter (last in the check of a
    configuration: PyTorch imports its compiler, about 1.5 s, at the first optimizer built)."""
    cfg = components.cfg
    probe = [nn.Parameter(torch.zeros(1))]
    try:
        components.make_optimizer(probe, lr=cfg["sim"]["lr"])
    except Exception as e:  # the optimizer's own checks: ValueError, IndexError (betas=[0.9]), ...
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ComponentError("optimizer", str(cfg["optimizer"].get("_target_")), reason) from None
