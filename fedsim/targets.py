"""The ``_target_``s of a configuration: which ones fedsim trusts to import and call when it
reads a configuration from a results folder (``resume=<folder>``), and which ones compute the
same thing as another (compared as that one when a run is resumed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fedsim.errors import ConfigError

#: targets that compute what another does (tested to the bit), compared as that one: a run
#: started with flwr-datasets' Dirichlet, IID or pathological partitioner (conf/partition's
#: targets before fedsim had its own: tests/test_partitioners_dirichlet.py,
#: tests/test_partitioners_shards.py) resumes with fedsim's
SAME_AS = {
    f"flwr_datasets.partitioner.{name}": f"fedsim.partitioners.{name}"
    for name in ("DirichletPartitioner", "IidPartitioner", "PathologicalPartitioner")
}


def config_dir_arg(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--config-dir <dir>`` (``-cd``, or ``--config-dir=<dir>``) of a command line, and the
    command line without it."""
    folder, rest, it = None, [], iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name in ("--config-dir", "-cd"):
            folder = value if eq else next(it, "")
        else:
            rest.append(arg)
    return folder, rest


def targets(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every ``_target_`` of a configuration, at any depth: ``(dotted key, value)``."""
    found: list[tuple[str, Any]] = []
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, value in items:
        if key == "_target_":
            found.append((f"{prefix}{key}", value))
        else:
            found.extend(targets(value, f"{prefix}{key}."))
    return found


def trusted_targets(config_dir: str | None) -> set[str]:
    """The ``_target_``s fedsim ships (every one in its ``conf/``, the groups' defaults and
    those its ``conf/`` named before: :data:`SAME_AS`) and those of the YAML files in
    ``config_dir`` (the user's own plug-ins)."""
    from fedsim.registry import GROUPS, conf_folder

    folders = [conf_folder(), *([Path(config_dir)] if config_dir else [])]
    found = {g.default for g in GROUPS if g.default} | set(SAME_AS)
    for folder in folders:
        for path in sorted(folder.rglob("*.yaml")):
            try:
                node = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, ValueError, yaml.YAMLError):
                continue
            found.update(v for _, v in targets(node) if isinstance(v, str))
    return found


def refuse_foreign_targets(cfg: dict[str, Any], config_dir: str | None) -> None:
    """A configuration read from a results folder is data: every ``_target_`` in it (each is
    imported and called) must be one fedsim ships or one of ``--config-dir``; a ConfigError
    naming the key and the target otherwise, before anything is built."""
    if config_dir is not None and not Path(config_dir).is_dir():
        raise ConfigError("--config-dir", config_dir, "is not a folder")
    allowed = trusted_targets(config_dir)
    for key, target in targets(cfg):
        if not isinstance(target, str) or target not in allowed:
            raise ConfigError(
                key,
                target,
                "is neither a target fedsim ships nor one in --config-dir; a results folder is "
                "data, so resume=<folder> builds only those (if you trust this folder's "
                "target, give the folder of its YAML with --config-dir <dir>)",
            )
