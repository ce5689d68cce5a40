"""Composing a run's configuration with Hydra, with one-line errors and nothing written.

Hydra's own error path prints a traceback-like report and exits with status 1, after it has
created the output folder. fedsim composes every job's configuration first (expanding a
``--multirun`` sweep into its jobs); any problem is one line naming the key, the value and
what is allowed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedsim.errors import ConfigCompositionError, ConfigError

if not OmegaConf.has_resolver("min"):  # ${min:5,${sim.num_clients}}: a preset's value, capped
    OmegaConf.register_new_resolver("min", lambda *values: min(values))

CONFIG_MODULE = "fedsim.conf"
#: keys that moved: given at their old place, one line names the new one
MOVED = {"strategy.client_ranks": "adapter.client_ranks"}
CONFIG_NAME = "config"


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


@contextmanager
def shared_group_listings() -> Iterator[None]:
    """Hydra's ``--help`` lists the options of every config group, and for each listing
    deep-copies its whole config repository (about 150 copies: 1 s of the 1.5 s the help
    took). Inside this context the listings of one config loader share one copy (they only
    read it), so the help prints the same text in half the time."""
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl

        original = ConfigLoaderImpl._parse_overrides_and_create_caching_repo
    except (ImportError, AttributeError):  # another Hydra: its own way, unchanged
        yield
        return
    made: dict[tuple, Any] = {}

    def shared(loader, config_name, overrides):
        key = (id(loader), config_name, tuple(overrides))
        if key not in made:
            made[key] = original(loader, config_name, overrides)
        return made[key]

    ConfigLoaderImpl._parse_overrides_and_create_caching_repo = shared
    try:
        yield
    finally:
        ConfigLoaderImpl._parse_overrides_and_create_caching_repo = original


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
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

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
            full = _hydra_compose(config_name, overrides)
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


def _hydra_compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Hydra's composition (inside an initialised context), its errors in one line."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException

    try:
        return hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
    except MissingConfigException as e:
        raise ConfigCompositionError(_missing_option(e, overrides)) from None
    except OverrideParseException as e:
        raise ConfigCompositionError(_parse_error(e, overrides)) from None
    except HydraException as e:
        text = str(e)
        if text.startswith("Could not override '"):
            raise ConfigCompositionError(_unknown_key(text, overrides, config_name)) from None
        raise ConfigCompositionError(_one_line(text)) from None


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
        raise ConfigCompositionError(_parse_error(e, overrides)) from None
    axes = []
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(job) for job in itertools.product(*axes)]


def _parse_error(e: Exception, overrides: Sequence[str]) -> str:
    """Hydra's parse error on one line, led by the override it could not parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except Exception:
            return f"{override}: cannot be parsed: {_one_line(str(e))}"
    return _one_line(str(e))


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
    if key in MOVED:
        return f"{key}={value or chr(39) * 2}: moved to {MOVED[key]} ({MOVED[key]}={value})"
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
    keys = f"allowed: {', '.join(map(str, allowed))}" if allowed else "it takes no keys"
    line = f"{key}={shown}: unknown key{where}; {keys}"
    return line + _elsewhere(parent, key.rsplit(".", 1)[-1])


def _elsewhere(group: str, leaf: str) -> str:
    """``" (a key of privacy=central)"``: the other options of ``group`` that have ``leaf``."""
    from fedsim import registry

    if group not in registry.names():
        return ""
    have = [o for o in registry.options(group) if leaf in registry.option_node(group, o)]
    return f" (a key of {', '.join(f'{group}={o}' for o in have)})" if have else ""


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        if ln.startswith(("Config search path", "provider=", "full_key", "object_type")):
            break
        keep.append(ln)
    return " ".join(keep) if keep else text.strip()
