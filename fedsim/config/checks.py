"""Checking a composed configuration before anything runs: the values fedsim interprets itself,
then every component built once, and the combinations of components that cannot work together.

Any problem is a :class:`~fedsim.errors.ConfigError`: one line naming the key, the value and
what is allowed; hints that list options come from the config registry
(:mod:`fedsim.registry`), so a new option never needs one edited.
"""

from __future__ import annotations

import re
from typing import Any

from fedsim import registry
from fedsim.config.adversary import check_adversary
from fedsim.config.hints import compressors_with as _compressors
from fedsim.config.hints import listed as _listed
from fedsim.config.hints import strategies_where as _strategies
from fedsim.config.spec import CHECKPOINT_KEYS, SIM_KEYS, SIM_OPTIONAL, TOP_KEYS
from fedsim.config.steps import check_local_terms, check_server_opt, keeps_aggregation
from fedsim.config.system import check_system
from fedsim.errors import ConfigError
from fedsim.validate import boolean, integer, number

#: the largest sim.seed: PyTorch's generators overflow past 64 bits, NumPy's legacy seeds past
#: 32, and fedsim derives seeds by adding to it; an unsigned 32-bit seed fits them all
MAX_SEED = 2**32 - 1


def validate(cfg: dict[str, Any]) -> None:
    """Check the values fedsim itself interprets; component values are checked when built."""
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            key, cfg[key], f"unknown top-level key; allowed: {', '.join(sorted(TOP_KEYS))}"
        )
    n = _validate_sim(cfg.get("sim"))
    _validate_settings(cfg)
    for group in registry.GROUPS:
        node = cfg.get(group.name)
        if group.required and (not isinstance(node, dict) or "_target_" not in node):
            raise ConfigError(
                group.name,
                node,
                f"must be a config with a _target_ (pick one from conf/{group.name})",
            )
    parts = cfg["partition"].get("num_partitions")
    if parts != n:
        raise ConfigError("partition.num_partitions", parts, f"must equal sim.num_clients ({n})")


def _validate_sim(sim: Any) -> int:
    """The ``sim`` block; returns ``sim.num_clients``."""
    if not isinstance(sim, dict):
        raise ConfigError("sim", sim, "must be a mapping")
    unknown = set(sim) - SIM_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            f"sim.{key}", sim[key], f"unknown key; allowed: {', '.join(sorted(SIM_KEYS))}"
        )
    missing = SIM_KEYS - set(SIM_OPTIONAL) - set(sim)
    if missing:
        key = sorted(missing)[0]
        raise ConfigError(f"sim.{key}", None, "is required")

    n = integer("sim.num_clients", sim["num_clients"], low=1)
    k = integer("sim.clients_per_round", sim["clients_per_round"], 1, n, "sim.num_clients")
    integer("sim.min_clients", sim["min_clients"], 1, k, "sim.clients_per_round")
    for key in ("rounds", "local_steps", "batch_size"):
        integer(f"sim.{key}", sim[key], low=1)
    number("sim.lr", sim["lr"], low=0, low_open=True)
    integer("sim.seed", sim["seed"], 0, MAX_SEED, "2**32 - 1")
    boolean("sim.keep_optimizer_state", sim["keep_optimizer_state"])
    boolean("sim.aggregation_error", sim["aggregation_error"])
    e = sim["eval_clients"]
    if e != "all":
        try:
            integer("sim.eval_clients", e, 0, n, "sim.num_clients")
        except ConfigError:
            raise ConfigError(
                "sim.eval_clients",
                e,
                f"must be 'all' or an integer from 0 to sim.num_clients ({n})",
            ) from None
    integer("sim.eval_every", sim.get("eval_every", 1), low=1)
    x = sim.get("eval_examples", "all")
    if x != "all":
        try:
            integer("sim.eval_examples", x, low=1)
        except ConfigError:
            raise ConfigError(
                "sim.eval_examples", x, "must be 'all' or a positive integer"
            ) from None
    number("sim.client_test_fraction", sim["client_test_fraction"], 0, 1, high_open=True)
    number("sim.validation_fraction", sim.get("validation_fraction", 0.0), 0, 1, high_open=True)
    number("sim.prox_mu", sim.get("prox_mu", 0.0), low=0)
    if sim["round_timeout"] is not None:
        number("sim.round_timeout", sim["round_timeout"], low=0, low_open=True)
    device = sim["device"]
    if not isinstance(device, str) or not re.fullmatch(r"cpu|auto|cuda(:\d+)?", device):
        raise ConfigError("sim.device", device, "must be cpu, cuda, cuda:<index> or auto")
    return n


def _validate_settings(cfg: dict[str, Any]) -> None:
    """The top-level settings: quiet, export, estimate, checkpoint, resume."""
    boolean("quiet", cfg.get("quiet", False))
    boolean("export", cfg.get("export", True))
    boolean("estimate", cfg.get("estimate", False))
    ck = cfg.get("checkpoint", {})
    if not isinstance(ck, dict):
        raise ConfigError("checkpoint", ck, "must be a mapping with keys every, keep")
    for key in sorted(set(ck) - CHECKPOINT_KEYS):
        allowed = ", ".join(sorted(CHECKPOINT_KEYS))
        raise ConfigError(f"checkpoint.{key}", ck[key], f"unknown key; allowed: {allowed}")
    integer("checkpoint.every", ck.get("every", 1), low=0)
    boolean("checkpoint.keep", ck.get("keep", False))
    resume = cfg.get("resume", False)
    if not isinstance(resume, bool) and not (isinstance(resume, str) and resume.strip()):
        raise ConfigError("resume", resume, "must be true, false or the folder of a run")


_CHECKED: set[str] = set()  # configs this process has already checked


def check(cfg: dict[str, Any]) -> None:
    """Validate, build every component and the adapted model once (nothing is trained).

    A config checked before in this process (the command line checks every job up front, the
    job checks again) is not rebuilt.
    """
    import json

    key = json.dumps(cfg, sort_keys=True, default=str)
    if key in _CHECKED:
        return
    validate(cfg)  # before the components' modules (PyTorch, flwr-datasets) are imported
    from fedsim.build import build_components, check_optimizer

    components = build_components(cfg)
    _check_ranks(components)
    components.strategy.check_setup(components.adapter, cfg["sim"])
    _, spec = components.model()
    from fedsim.init import check as check_adapter_init

    check_adapter_init(components.adapter, components.task)
    _check_init_kept(components)
    from fedsim.adapters.eva import check_run as check_eva

    check_eva(components.adapter, components.strategy, components.privacy)
    _check_validation(components)
    _check_codec(components)
    _check_privacy(components)
    check_server_opt(components)
    check_system(components)
    check_adversary(components)
    check_local_terms(components, spec)
    # the partitioning, then what depends on the clients' data (after the combinations above:
    # partitioning imports flwr-datasets and may take a while for many clients)
    components.data.check(cfg["sim"]["num_clients"])
    if components.privacy.client_dp:
        _check_client_accountant(components)
    if hasattr(components.engine, "check"):
        components.engine.check(cfg["sim"])
    if hasattr(components.engine, "check_components"):
        components.engine.check_components(components)
    if cfg.get("resume", False) is not False and not getattr(
        components.engine, "checkpoints", False
    ):
        raise ConfigError(
            "resume",
            cfg["resume"],
            f"engine {components.engine.name} keeps client states in its own processes; "
            "checkpoints and resume need engine=inline or engine=batched",
        )
    from fedsim.training import resolve_device

    resolve_device(cfg["sim"]["device"])
    check_optimizer(components)
    _CHECKED.add(key)


def _check_init_kept(components) -> None:
    """A data-driven initialisation of the trained parameters needs a strategy that keeps
    training them (FLoRA starts fresh adapters every round, FlexLoRA re-factorises)."""
    init, strategy = components.adapter.data_init, components.strategy
    if init is None or strategy.keeps_adapters or not components.adapter.trained_suffixes:
        return
    raise ConfigError(
        "adapter.init.method",
        init.method,
        f"strategy {strategy.name} does not keep the clients' adapters from round to round, so "
        "the initialisation would be thrown away after round 1: use "
        f"adapter.init.method=default, or strategy {_strategies(_keeps_adapters)}",
    )


def _keeps_adapters(cls) -> bool:
    return cls.keeps_adapters and "lora" in (cls.adapters or ("lora",))


def _check_validation(components) -> None:
    """A validation split leaves at least one example on each side."""
    fraction = float(components.sim.get("validation_fraction", 0.0))
    if fraction == 0.0:
        return
    from fedsim.data import validation_split

    n = len(next(iter(components.task.test_set().values())))
    validation_split(n, fraction)


def _check_ranks(components) -> None:
    """Per-client ranks need a strategy that can aggregate them."""
    ranks, strategy = getattr(components.adapter, "client_ranks", None), components.strategy
    if ranks is not None and not strategy.heterogeneous_ranks:
        raise ConfigError(
            "adapter.client_ranks",
            ranks,
            f"strategy {strategy.name} gives every client adapter.r; ranks that differ per "
            f"client need strategy={_strategies(lambda s: s.heterogeneous_ranks)}",
        )


def _check_codec(components) -> None:
    """Compressor, feedback method and strategy must make sense together."""
    compressor, feedback, strategy = components.compressor, components.feedback, components.strategy
    name = strategy.name
    if feedback.needs_contractive and not compressor.contractive:
        raise ConfigError(
            "feedback",
            feedback.name,
            f"error feedback needs a contractive compressor; compressor={compressor.name} "
            f"is not (use {_compressors('compressor', 'contractive')})",
        )
    downlink = components.downlink
    if downlink.active and not downlink.contractive:
        raise ConfigError(
            "downlink",
            downlink.name,
            f"EF21-P needs a contractive compressor ({_compressors('downlink', 'contractive')})",
        )
    if downlink.active and not strategy.communicates:
        raise ConfigError("downlink", downlink.name, f"strategy {name} sends no global arrays")
    active = components.compresses
    if not active and feedback.lr_server != 1.0:
        raise ConfigError(
            "feedback.lr_server",
            feedback.lr_server,
            "applies to compressed updates only; without a compressor it must be 1",
        )
    for group, on in (("compressor", active), ("downlink", downlink.active)):
        if on and not strategy.compressible:
            raise ConfigError(
                group,
                getattr(components, group).name,
                f"strategy {name}'s clients send and receive factors at a rank of their own "
                f"(use {group}=none)",
            )
    if active and not strategy.communicates:
        raise ConfigError(
            "compressor", compressor.name, f"strategy {name} sends no updates to compress"
        )
    if feedback.replaces_aggregation:
        from fedsim.strategy.plugins import refuse_uncalled

        instead = _listed(registry.options_where("feedback", keeps_aggregation))
        refuse_uncalled(strategy, "feedback", feedback.name, "its server step", instead)
    if feedback.replaces_aggregation and not strategy.averages:
        raise ConfigError(
            "feedback",
            feedback.name,
            f"replaces the server's averaging with its own step; strategy {name} does not "
            f"average the arrays clients send "
            f"(use {_strategies(lambda s: s.averages and s.persistent_parameters)})",
        )
    if feedback.states and not strategy.persistent_parameters:
        raise ConfigError(
            "feedback",
            feedback.name,
            f"keeps memories of a fixed set of parameters; strategy {name} "
            f"{strategy.changing_parameters} (use feedback=none)",
        )


def _check_privacy(components) -> None:
    """Nothing a client sends may escape its privacy mechanism."""
    privacy, strategy = components.privacy, components.strategy
    if privacy.client_dp and getattr(components.task, "precision", "float32") != "float32":
        raise ConfigError(
            "task.precision",
            components.task.precision,
            "privacy=dpsgd computes per-example gradients in float32: use task.precision=float32",
        )
    if privacy.central:
        from fedsim.strategy.plugins import refuse_uncalled

        name = strategy.name
        instead = _listed(registry.options_where("privacy", _not_central))
        refuse_uncalled(strategy, "privacy", privacy.name, "central DP's noised mean", instead)
        if not releases_an_average(strategy):
            raise ConfigError(
                "privacy",
                privacy.name,
                f"central DP noises an average of clipped updates; strategy {name} "
                "does not release one (FedEx and FLoRA fold in individual clients' products, "
                f"FedSA keeps personal factors, the references send nothing): use "
                + _strategies(releases_an_average),
            )
        _check_central_noise(components)
        compressor = components.compressor
        if components.compresses and not compressor.norm_non_increasing:
            raise ConfigError(
                "compressor",
                compressor.name,
                "under central DP a client's clipped message must stay within "
                "privacy.clip_norm after compression; this compressor can enlarge it (use "
                f"{_compressors('compressor', 'norm_non_increasing', plain='none')})",
            )


def _check_central_noise(components) -> None:
    """Central DP's noise found now (a target out of reach, adaptive clipping's share of the
    noise, an accountant that cannot account for the run: one line before anything runs)."""
    from fedsim.privacy.accountant import AccountingError

    privacy, sim = components.privacy, components.sim
    if privacy.adaptive is not None and components.compresses:
        raise ConfigError(
            "privacy.adaptive_clip",
            True,
            "adaptive clipping needs each update's norm before it is clipped; with "
            "compression the clip is applied inside the error-feedback encoder, which takes a "
            "fixed bound (use compressor=none feedback=none, or privacy.adaptive_clip=false)",
        )
    init = components.adapter.data_init
    steps = init.client_steps if init is not None else 0
    n, k, rounds = sim["num_clients"], sim["clients_per_round"], sim["rounds"]
    try:
        privacy.start(n, k, rounds, init_steps=steps)
        privacy.accountant.step(privacy.sigma_value, privacy.q, rounds + steps)
        privacy.accountant.epsilon(privacy.delta_for(n))
    except AccountingError as e:
        raise ConfigError("privacy.accountant", privacy.kind, str(e)) from None
    privacy.start(n, k, rounds, init_steps=steps)


def _check_client_accountant(components) -> None:
    """With the PRV accountant, the client with the most examples (the smallest default delta)
    is accounted for now: a delta too small for its discretisation is one line here."""
    from fedsim.privacy import Accountant
    from fedsim.privacy.accountant import AccountingError

    privacy, c = components.privacy, components
    if privacy.accountant != "prv":
        return
    data = c.data
    n = max(data.num_train(client) for client in range(c.sim["num_clients"]))
    init = c.adapter.data_init
    steps = init.client_steps if init is not None else 0
    batch_size = c.strategy.client_batch_size(c.sim["batch_size"])
    try:
        sigma = privacy.sigma_for(n, batch_size, c.total_local_steps, steps)
        q = privacy.sample_rate(n, batch_size)
        history = [(sigma, 1.0, steps), (sigma, q, c.total_local_steps)]
        Accountant(history, "prv").epsilon(privacy.delta_for(n))
    except AccountingError as e:
        raise ConfigError("privacy.accountant", "prv", str(e)) from None


def _not_central(cls) -> bool:
    return cls is None or not getattr(cls, "central", False)


def releases_an_average(strategy) -> bool:
    """A strategy whose server step is a mean of what its clients send, to every client."""
    return strategy.averages and not strategy.personalised and strategy.communicates
