"""Composing and validating run configurations, before anything runs.

Hydra's own error path prints a traceback-like report and exits with status 1, after it has
created the output folder. fedsim composes every job's configuration first (expanding a
``--multirun`` sweep into its jobs), validates it and builds its components; any problem is one
line naming the key, the value and what is allowed, and the command exits with status 2 having
written nothing.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedsim.errors import ConfigCompositionError, ConfigError
from fedsim.validate import boolean, integer, number

CONFIG_MODULE = "fedsim.conf"
CONFIG_NAME = "config"

SIM_KEYS = {
    "aggregation_error",
    "device",
    "round_timeout",
    "num_clients",
    "clients_per_round",
    "min_clients",
    "rounds",
    "local_steps",
    "batch_size",
    "lr",
    "seed",
    "keep_optimizer_state",
    "eval_clients",
    "client_test_fraction",
    "validation_fraction",
}
TOP_KEYS = {
    "task",
    "adapter",
    "strategy",
    "partition",
    "engine",
    "optimizer",
    "schedule",
    "compressor",
    "feedback",
    "downlink",
    "privacy",
    "logger",
    "faults",
    "sim",
    "quiet",
    "export",
    "checkpoint",
    "resume",
}
CHECKPOINT_KEYS = {"every", "keep"}
#: keys a resumed run may change: they do not change what the run computes
RESUME_FREE = ("resume", "quiet", "checkpoint")


@dataclass
class RunSpec:
    """Everything a run needs: the resolved config, the chosen options, where to write."""

    cfg: dict[str, Any]
    choices: dict[str, str]
    output_dir: Path
    quiet: bool = False
    #: a checkpoint to continue from (``resume``); None: start at round 0
    resume: Path | None = None


# ----------------------------------------------------------------------------- composition


def config_search_path() -> str:
    """Where the configs are: the ``fedsim.conf`` package, or ``conf/`` beside the package.

    An install maps the repository's ``conf/`` to ``fedsim.conf``; a bare copy of the source
    tree (such as the app bundle ``flwr run`` unpacks) has only ``conf/`` next to ``fedsim/``.
    """
    import importlib.util

    try:
        if importlib.util.find_spec(CONFIG_MODULE) is not None:
            return f"pkg://{CONFIG_MODULE}"
    except ModuleNotFoundError:
        pass
    beside = Path(__file__).resolve().parent.parent / "conf"
    if (beside / f"{CONFIG_NAME}.yaml").exists():
        return f"file://{beside}"
    raise ConfigCompositionError(f"cannot find fedsim's configs ({CONFIG_MODULE} or {beside})")


def initialize_config_source():
    """A Hydra compose context over :func:`config_search_path`."""
    from hydra import initialize_config_dir, initialize_config_module

    source = config_search_path()
    if source.startswith("pkg://"):
        return initialize_config_module(CONFIG_MODULE, version_base="1.3")
    return initialize_config_dir(source[len("file://") :], version_base="1.3")


@dataclass
class Composed:
    """A composed job: its resolved config, chosen options, and the Hydra settings fedsim reads."""

    cfg: dict[str, Any]
    choices: dict[str, str]
    run_dir: str  # hydra.run.dir, resolved
    sweep_dir: str  # hydra.sweep.dir, resolved
    sweeper_params: dict[str, str]  # hydra.sweeper.params: key -> sweep string


def compose(
    overrides: Sequence[str],
    config_name: str = CONFIG_NAME,
    config_dir: str | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Compose the config as ``fedsim`` would; returns (resolved config, chosen options)."""
    job = compose_job(overrides, config_name, config_dir)
    return job.cfg, job.choices


def compose_job(
    overrides: Sequence[str],
    config_name: str = CONFIG_NAME,
    config_dir: str | None = None,
    config_path: str | None = None,
) -> Composed:
    """Compose one job. ``config_dir`` is added to the search path (``--config-dir``);
    ``config_path`` replaces fedsim's configs as the primary source (``--config-path``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException

    overrides = list(overrides)
    for flag, folder in (("--config-dir", config_dir), ("--config-path", config_path)):
        if folder is not None and not Path(folder).is_dir():
            raise ConfigError(flag, folder, "is not a folder")
    if config_dir is not None:
        overrides.append(f"hydra.searchpath=[file://{Path(config_dir).resolve()}]")
    if GlobalHydra.instance().is_initialized():  # e.g. called from inside a Hydra job
        GlobalHydra.instance().clear()
    source = (
        initialize_config_dir(str(Path(config_path).resolve()), version_base="1.3")
        if config_path is not None
        else initialize_config_source()
    )
    try:
        with source:
            try:
                full = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
            except MissingConfigException as e:
                raise ConfigCompositionError(_missing_option(e, overrides)) from None
            except OverrideParseException as e:
                raise ConfigCompositionError(_one_line(str(e))) from None
            except HydraException as e:
                text = str(e)
                if text.startswith("Could not override '"):
                    raise ConfigCompositionError(
                        _unknown_key(text, overrides, config_name)
                    ) from None
                raise ConfigCompositionError(_one_line(text)) from None
            hydra_node = full.hydra
            choices = {
                k: v
                for k, v in OmegaConf.to_container(hydra_node.runtime.choices).items()
                if not k.startswith("hydra/")
            }
            cfg = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
            params = OmegaConf.select(hydra_node, "sweeper.params", default=None)
            return Composed(
                cfg=to_container(cfg),
                choices=choices,
                run_dir=str(OmegaConf.select(hydra_node, "run.dir")),
                sweep_dir=str(OmegaConf.select(hydra_node, "sweep.dir")),
                sweeper_params={str(k): str(v) for k, v in (params or {}).items()},
            )
    except ConfigError:
        raise
    except Exception as e:  # interpolation errors and the like
        if isinstance(e, ConfigCompositionError):
            raise
        raise ConfigCompositionError(_with_key(e)) from None


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """A resolved plain-dict copy of a config."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception as e:
        raise ConfigCompositionError(_with_key(e)) from None


def _with_key(e: Exception) -> str:
    """An OmegaConf error on one line, led by the key it concerns when it knows it."""
    text, key, cause = _one_line(str(e)), None, e
    while cause is not None and not key:
        key = getattr(cause, "full_key", None)
        for line in str(cause).splitlines():  # some errors carry it only in their text
            if not key and line.strip().startswith("full_key:"):
                key = line.split(":", 1)[1].strip()
        cause = cause.__cause__ or cause.__context__
    return f"{key}: {text}" if key and not text.startswith(f"{key}:") else text


def expand_sweep(
    overrides: Sequence[str], sweeper_params: dict[str, str] | None = None
) -> list[list[str]]:
    """The override lists of the jobs a ``--multirun`` would launch (cartesian product).

    ``sweeper_params`` (``hydra.sweeper.params`` of the config, ``key: "v1,v2"``) come first;
    a key given on the command line replaces the config's sweep of it.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    try:
        given = {o.get_key_element() for o in parser.parse_overrides(list(overrides))}
        from_config = [f"{k}={v}" for k, v in (sweeper_params or {}).items() if k not in given]
        parsed = parser.parse_overrides([*from_config, *overrides])
    except OverrideParseException as e:
        raise ConfigCompositionError(_one_line(str(e))) from None
    axes = []
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(job) for job in itertools.product(*axes)]


def _missing_option(e: Exception, overrides: Sequence[str]) -> str:
    missing = getattr(e, "missing_cfg_file", "") or ""
    options = getattr(e, "options", None)
    group = missing.rsplit("/", 1)[0] if "/" in missing else missing
    value = missing.rsplit("/", 1)[-1]
    for o in overrides:
        if o.lstrip("+~").split("=", 1)[0] == group:
            value = o.split("=", 1)[1] if "=" in o else value
    if options:
        return f"{group}={value}: unknown option; allowed: {', '.join(sorted(options))}"
    return f"{missing}: config not found"


def _unknown_key(text: str, overrides: Sequence[str], config_name: str) -> str:
    """Hydra's "Could not override 'a.b'" as "a.b=value: unknown key; allowed: ..."."""
    from hydra import compose as hydra_compose

    key = text.split("'")[1]
    value, rest = "", []
    for o in overrides:
        if o.split("=", 1)[0] == key:
            value = o.split("=", 1)[1] if "=" in o else ""
        else:
            rest.append(o)
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    try:
        base = hydra_compose(config_name, overrides=rest)
        node = OmegaConf.select(base, parent) if parent else base
        allowed = (
            sorted(k for k in node.keys() if not str(k).startswith("_")) if node is not None else []
        )
    except Exception:
        return _one_line(text)
    where = f" in {parent}" if parent else ""
    shown = value if value else "''"
    return f"{key}={shown}: unknown key{where}; allowed: {', '.join(map(str, allowed))}"


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        if ln.startswith(("Config search path", "provider=", "full_key", "object_type")):
            break
        keep.append(ln)
    return " ".join(keep) if keep else text.strip()


# ----------------------------------------------------------------------------- validation


def validate(cfg: dict[str, Any]) -> None:
    """Check the values fedsim itself interprets; component values are checked when built."""
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            key, cfg[key], f"unknown top-level key; allowed: {', '.join(sorted(TOP_KEYS))}"
        )
    sim = cfg.get("sim")
    if not isinstance(sim, dict):
        raise ConfigError("sim", sim, "must be a mapping")
    unknown = set(sim) - SIM_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            f"sim.{key}", sim[key], f"unknown key; allowed: {', '.join(sorted(SIM_KEYS))}"
        )
    missing = SIM_KEYS - set(sim)
    if missing:
        key = sorted(missing)[0]
        raise ConfigError(f"sim.{key}", None, "is required")

    n = integer("sim.num_clients", sim["num_clients"], low=1)
    k = integer("sim.clients_per_round", sim["clients_per_round"], 1, n, "sim.num_clients")
    integer("sim.min_clients", sim["min_clients"], 1, k, "sim.clients_per_round")
    for key in ("rounds", "local_steps", "batch_size"):
        integer(f"sim.{key}", sim[key], low=1)
    number("sim.lr", sim["lr"], low=0, low_open=True)
    integer("sim.seed", sim["seed"], low=0)
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
    number("sim.client_test_fraction", sim["client_test_fraction"], 0, 1, high_open=True)
    number("sim.validation_fraction", sim.get("validation_fraction", 0.0), 0, 1, high_open=True)
    if sim["round_timeout"] is not None:
        number("sim.round_timeout", sim["round_timeout"], low=0, low_open=True)
    device = sim["device"]
    if not isinstance(device, str) or not re.fullmatch(r"cpu|auto|cuda(:\d+)?", device):
        raise ConfigError("sim.device", device, "must be cpu, cuda, cuda:<index> or auto")
    boolean("quiet", cfg.get("quiet", False))
    boolean("export", cfg.get("export", True))
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

    groups = ("task", "adapter", "strategy", "partition", "engine", "optimizer", "schedule")
    for group in (*groups, "compressor", "feedback", "downlink", "privacy", "faults"):
        node = cfg.get(group)
        if not isinstance(node, dict) or "_target_" not in node:
            raise ConfigError(
                group, node, "must be a config with a _target_ (pick one from conf/" + group + ")"
            )
    parts = cfg["partition"].get("num_partitions")
    if parts != n:
        raise ConfigError("partition.num_partitions", parts, f"must equal sim.num_clients ({n})")


_CHECKED: set[str] = set()  # configs this process has already checked


def check(cfg: dict[str, Any]) -> None:
    """Validate, build every component and the adapted model once (nothing is trained).

    A config checked before in this process (the command line checks every job up front, the
    job checks again) is not rebuilt.
    """
    import json

    from fedsim.build import build_components

    key = json.dumps(cfg, sort_keys=True, default=str)
    if key in _CHECKED:
        return
    validate(cfg)
    components = build_components(cfg)
    components.strategy.check_setup(components.adapter, cfg["sim"])
    components.model()
    components.data.check(cfg["sim"]["num_clients"])
    _check_adapter_init(components)
    _check_validation(components)
    _check_codec(components)
    _check_privacy(components)
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
    _CHECKED.add(key)


def _check_validation(components) -> None:
    """A validation split leaves at least one example on each side."""
    fraction = float(components.sim.get("validation_fraction", 0.0))
    if fraction == 0.0:
        return
    from fedsim.data import validation_split

    n = len(next(iter(components.task.test_set().values())))
    validation_split(n, fraction)


def _check_adapter_init(components) -> None:
    """An adapter initialised from server data needs a task with enough server examples."""
    adapter, task = components.adapter, components.task
    if not adapter.needs_data_init or getattr(adapter, "init_source", None) != "server":
        return
    available = task.server_size()
    if available == 0:
        raise ConfigError(
            "adapter.init.source",
            "server",
            f"task {task.name} has no server split; use adapter.init.source=clients",
        )
    if adapter.init_examples > available:
        raise ConfigError(
            "adapter.init.examples",
            adapter.init_examples,
            f"must be at most the task's server split ({available} examples)",
        )


def _check_codec(components) -> None:
    """Compressor, feedback method and strategy must make sense together."""
    compressor, feedback, strategy = components.compressor, components.feedback, components.strategy
    name = type(strategy).__name__
    if feedback.needs_contractive and not compressor.contractive:
        raise ConfigError(
            "feedback",
            feedback.name,
            f"error feedback needs a contractive compressor; compressor={compressor.name} "
            "is not (use topk, or randk with scaled=false)",
        )
    downlink = components.downlink
    if downlink.active and not downlink.contractive:
        raise ConfigError(
            "downlink",
            downlink.name,
            "EF21-P needs a contractive compressor (topk, or randk with scaled=false)",
        )
    if downlink.active and not strategy.communicates:
        raise ConfigError("downlink", downlink.name, f"strategy {name} sends no global arrays")
    active = compressor.active or feedback.name != "none"
    if not active and feedback.lr_server != 1.0:
        raise ConfigError(
            "feedback.lr_server",
            feedback.lr_server,
            "applies to compressed updates only; without a compressor it must be 1",
        )
    if active and not strategy.communicates:
        raise ConfigError(
            "compressor", compressor.name, f"strategy {name} sends no updates to compress"
        )
    if feedback.replaces_aggregation and not strategy.averages:
        raise ConfigError(
            "feedback",
            feedback.name,
            f"replaces the server's averaging with its own step; strategy {name} does not "
            "average the arrays clients send (use fedavg, fedsb, ffa or fedsa)",
        )
    if feedback.states and not strategy.persistent_parameters:
        raise ConfigError(
            "feedback",
            feedback.name,
            f"keeps memories of a fixed set of parameters; strategy {name} trains fresh ones "
            "every round (use feedback=none)",
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
        name = type(strategy).__name__
        if not strategy.averages or strategy.personalised or not strategy.communicates:
            raise ConfigError(
                "privacy",
                privacy.name,
                f"central DP noises an average of clipped updates; strategy {name} "
                "does not release one (FedEx and FLoRA fold in individual clients' products, "
                "FedSA keeps personal factors, the references send nothing): use fedavg, ffa "
                "or fedsb",
            )
        compressor = components.compressor
        if components.codec() is not None and not compressor.norm_non_increasing:
            raise ConfigError(
                "compressor",
                compressor.name,
                "under central DP a client's clipped message must stay within "
                "privacy.clip_norm after compression; this compressor can enlarge it (use topk, "
                "randk with compressor.scaled=false, or none)",
            )
