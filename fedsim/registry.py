"""The config groups, in one registry: what the build, the validation, the packaging and every
"allowed values" hint read.

A group is a folder of ``conf/``; its YAML files are its options, each naming with ``_target_``
the class or function it builds. :data:`GROUPS` adds what the folders cannot say: the class an
option's target must build (its base class), whether every run has the group, and the target
used when an older saved configuration lacks it. ``conf/experiment`` and ``conf/sweep`` hold
presets (they pick options of other groups). A new option is one YAML file: nothing here
changes, and every hint that lists options (:func:`options_where`) lists it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Group:
    """One config group (a folder of ``conf/``)."""

    name: str
    #: ``"module:Class"`` an option's target must build (None: any callable)
    base: str | None
    #: every run's configuration has it (else :attr:`default` stands in)
    required: bool = True
    #: the ``_target_`` built when a configuration lacks the group
    default: str | None = None


#: the groups, in the order a run builds them
GROUPS: tuple[Group, ...] = (
    Group("task", "fedsim.tasks.base:Task"),
    Group("adapter", "fedsim.adapters.base:Adapter"),
    Group("strategy", "fedsim.strategy.base:AdapterStrategy"),
    Group("partition", None),  # any flwr-datasets partitioner
    Group("optimizer", None),  # any torch.optim class, partially applied
    Group("schedule", "fedsim.training:Schedule"),
    Group("engine", None),
    Group("compressor", "fedsim.compression:Compressor"),
    Group("feedback", "fedsim.feedback:Feedback"),
    Group("downlink", "fedsim.compression:Compressor"),
    Group("privacy", "fedsim.privacy:Privacy"),
    Group("control", "fedsim.control:Control", required=False, default="fedsim.control.NoControl"),
    Group("logger", "fedsim.sinks:Sink", required=False, default="fedsim.sinks.NoSink"),
    Group("faults", "fedsim.faults:Faults", default="fedsim.faults.Faults"),
    Group(
        "server_opt",
        "fedsim.server_opt:ServerOpt",
        required=False,
        default="fedsim.server_opt.NoServerOpt",
    ),
    Group(
        "robust",
        "fedsim.robust:Robust",
        required=False,
        default="fedsim.robust.Robust",
    ),
    Group(
        "system",
        "fedsim.system.profiles:System",
        required=False,
        default="fedsim.system.profiles.NoSystem",
    ),
)
#: folders of ``conf/`` that hold presets, not options of a group
PRESETS = ("experiment", "sweep")
#: top-level keys of a run's configuration besides the groups
SETTINGS = ("sim", "quiet", "export", "checkpoint", "resume", "estimate")


def names() -> list[str]:
    """The groups' names, in build order."""
    return [g.name for g in GROUPS]


def group(name: str) -> Group:
    for g in GROUPS:
        if g.name == name:
            return g
    raise KeyError(f"no config group {name!r}; the groups are {', '.join(names())}")


def base_class(name: str) -> type | None:
    """The class an option of group ``name`` must build (None: any)."""
    path = group(name).base
    if path is None:
        return None
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def folders() -> list[str]:
    """The folders of fedsim's ``conf/``: every group and the presets."""
    conf = conf_folder()
    return sorted(p.name for p in conf.iterdir() if p.is_dir() and not p.name.startswith("__"))


@cache
def options(name: str) -> tuple[str, ...]:
    """The options of group ``name`` in fedsim's ``conf/``, sorted."""
    return tuple(sorted(p.stem for p in (conf_folder() / name).glob("*.yaml")))


def option_node(name: str, option: str) -> dict[str, Any]:
    """An option's keys (with those of the options it extends), as its YAML file holds them."""
    return option_keys(conf_folder() / name / f"{option}.yaml")


def option_class(name: str, option: str) -> Any:
    """The class (or function) an option's ``_target_`` names; None if it names none."""
    from hydra.utils import get_object

    target = option_node(name, option).get("_target_")
    return get_object(target) if isinstance(target, str) else None


def options_where(name: str, test: Callable[[Any], bool]) -> list[str]:
    """The options of group ``name`` whose target passes ``test`` (for hints)."""
    return [o for o in options(name) if test(option_class(name, o))]


def either(items: list[str], last: str = "or") -> str:
    """``a, b or c`` (``last``: the word before the last item)."""
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} {last} {items[-1]}"


# ----------------------------------------------------------------------------- conf/


def option_keys(path: Path) -> dict[str, Any]:
    """An option's keys (``conf/<group>/<option>.yaml``), with those of the options it extends;
    an option that also sizes the run (a task's ``sim`` block) gives its group's node."""
    group = path.parent.name
    node = _resolved(path, path.parent)
    if "_target_" not in node and isinstance(node.get(group), dict):
        node = node[group]  # a global package (a task that sizes the run)
    return node


def _resolved(path: Path, group_dir: Path) -> dict[str, Any]:
    """An option's keys with those of the options it extends (``defaults: [other]``)."""
    import yaml

    node = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    out: dict[str, Any] = {}
    for entry in node.pop("defaults", []) or []:
        if isinstance(entry, str) and (group_dir / f"{entry}.yaml").exists():
            out.update(_resolved(group_dir / f"{entry}.yaml", group_dir))
    out.update(node)
    return out


def conf_folder() -> Path:
    """fedsim's own ``conf/`` (inside the package when installed, beside it in a checkout)."""
    here = Path(__file__).resolve().parent
    return here / "conf" if (here / "conf" / "config.yaml").exists() else here.parent / "conf"
