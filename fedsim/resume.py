"""Resuming runs: which folder, which checkpoint, and whether the configuration matches.

``resume=true`` continues the unfinished run of the configuration the command composes: in the
folder the command names (``hydra.run.dir``, or each job's folder of ``hydra.sweep.dir``), or
else the newest run folder under the default runs folder (``results/runs``) that holds the same
configuration and a checkpoint. ``resume=<folder>`` continues the run in that folder with the
configuration it saved. In a folder, a finished run (``summary.json`` with status ``ok``) is
left alone; a checkpoint is continued after its round; a run stopped before its first
checkpoint starts again from round 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from fedsim.config import RESUME_FREE, SIM_OPTIONAL
from fedsim.errors import ConfigError
from fedsim.keys import CHECKPOINT_FILE
from fedsim.results import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE
from fedsim.targets import SAME_AS

DONE, CONTINUE, RESTART = "done", "continue", "restart"


def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a configuration a resumed run must share with the run it continues: what
    changes the computation. Keys newer than some saved configurations are left out at the
    value that changes nothing, so runs saved before they existed resume: a ``sim`` key of
    ``SIM_OPTIONAL`` at its value, and a group at its registry default with its other keys at
    the class's defaults (the ``none`` option of ``server_opt``, ``robust``, ``control``,
    ``logger``, ``system``)."""
    from fedsim.registry import GROUPS

    out = {k: v for k, v in cfg.items() if k not in RESUME_FREE}
    for g in GROUPS:
        if g.default is not None and _at_default(out.get(g.name), g.default):
            del out[g.name]
    later = {**{f"sim.{k}": v for k, v in SIM_OPTIONAL.items()}, **NESTED_OPTIONAL}
    for path, value in later.items():
        out = _without(out, path.split("."), value)
    engine = out.get("engine")
    if isinstance(engine, dict) and "num_threads" in engine:  # a resource, like the machine:
        out["engine"] = {k: v for k, v in engine.items() if k != "num_threads"}  # (and 1 -> auto)
    for group, node in out.items():  # two classes that compute the same thing
        if isinstance(node, dict) and node.get("_target_") in SAME_AS:
            out[group] = {**node, "_target_": SAME_AS[node["_target_"]]}
    adapter = out.get("adapter")
    if isinstance(adapter, dict) and isinstance(adapter.get("client_ranks"), dict):
        tiers = adapter["client_ranks"]  # rank tiers: a checkpoint's JSON keys are strings
        out["adapter"] = {**adapter, "client_ranks": {str(k): v for k, v in tiers.items()}}
    return out


#: keys inside a group's nested settings that configurations saved before them lack, with the
#: value that changes nothing (left out of the comparison at that value, as ``SIM_OPTIONAL``)
NESTED_OPTIONAL = {"adapter.init.eta1": "schedule", "adapter.init.warmup_ratio": 0.02}


def _without(node: Any, path: list[str], value: Any) -> Any:
    """``node`` without the key at ``path`` if it holds ``value`` (copies on the way down)."""
    if not isinstance(node, dict) or path[0] not in node:
        return node
    if len(path) == 1:
        return {k: v for k, v in node.items() if k != path[0] or v != value}
    return {**node, path[0]: _without(node[path[0]], path[1:], value)}


def _at_default(node: Any, default: str) -> bool:
    """Whether a group's node is its registry default, other keys at the class's defaults."""
    if not (isinstance(node, dict) and node.get("_target_") == default):
        return False
    defaults = _class_defaults(default)
    rest = {k: v for k, v in node.items() if k != "_target_"}
    return all(k in defaults and _plain(defaults[k]) == _plain(v) for k, v in rest.items())


def _plain(value: Any) -> Any:  # a tuple default and a list from YAML are the same
    return list(value) if isinstance(value, tuple) else value


def upgrade(cfg: dict[str, Any]) -> dict[str, Any]:
    """A configuration saved by an older fedsim in today's form: FLoRA's
    ``strategy.client_ranks`` is ``adapter.client_ranks`` since heterogeneous ranks became the
    adapter's (the same ranks, the same run)."""
    strategy = cfg.get("strategy")
    if not (isinstance(strategy, dict) and "client_ranks" in strategy):
        return cfg
    out = {**cfg, "strategy": {k: v for k, v in strategy.items() if k != "client_ranks"}}
    adapter = out.get("adapter")
    if strategy["client_ranks"] is not None and isinstance(adapter, dict):
        out["adapter"] = {**adapter, "client_ranks": strategy["client_ranks"]}
    return out


def with_later_keys(saved: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with the keys a group's YAML gained since the run was saved filled in from
    the group's class defaults (the run ran with them: ``privacy.accountant`` is ``rdp`` for a
    run saved before the key existed). Only for a group whose ``_target_`` is unchanged, and
    only keys the class has a default for (and keys that moved, :func:`upgrade`)."""
    saved = upgrade(saved)
    out = dict(saved)
    for group, node in cfg.items():
        old = saved.get(group)
        if not (isinstance(node, dict) and isinstance(old, dict)):
            continue
        target = node.get("_target_")
        if not isinstance(target, str) or target != old.get("_target_") or set(node) <= set(old):
            continue
        defaults = _class_defaults(target)
        out[group] = {**old, **{k: defaults[k] for k in set(node) - set(old) if k in defaults}}
    return out


def _class_defaults(target: str) -> dict[str, Any]:
    """The keyword defaults of the class ``target`` names (empty if it cannot be imported:
    the comparison then names the missing key)."""
    import importlib
    import inspect

    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first key (dotted) where two configurations differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return (f"{prefix}{key}", a.get(key), b.get(key))
            found = first_difference(a[key], b[key], f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def saved_config(folder: Path) -> dict[str, Any] | None:
    """The configuration a run folder saved (``config.yaml``), or None (missing or unreadable:
    for searching folders; :func:`read_config` says what is wrong)."""
    try:
        return read_config(folder)
    except ConfigError:
        return None


def read_config(folder: Path) -> dict[str, Any] | None:
    """The configuration a run folder saved (``config.yaml``); None if it has none, a
    ConfigError if the file is not UTF-8 YAML holding a mapping."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    text = _text(folder, path)
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        shown = " ".join(str(e).split())
        raise _damaged(folder, CONFIG_FILE, f"is not YAML ({shown})") from None
    if not isinstance(cfg, dict):
        raise _damaged(folder, CONFIG_FILE, f"holds a {type(cfg).__name__}, not a mapping")
    return upgrade(cfg)


def _text(folder: Path, path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"byte 0x{data[e.start]:02x} at offset {e.start}"
        raise _damaged(folder, path.name, f"is not UTF-8 text ({where})") from None


def _damaged(folder: Path, name: str, what: str) -> ConfigError:
    return ConfigError(
        "resume", str(folder), f"its {name} {what}: it was damaged or edited after the run"
    )


def finished(folder: Path) -> bool:
    """Whether the folder holds a finished run (``summary.json`` with status ok)."""
    try:
        return json.loads((folder / SUMMARY_FILE).read_text())["status"] == "ok"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def summary_status(folder: Path) -> str | None:
    """The ``status`` of the folder's ``summary.json`` (None: there is none); a ConfigError if
    the file is not a JSON object with a status."""
    path = folder / SUMMARY_FILE
    if not path.is_file():
        return None
    text = _text(folder, path)  # a ConfigError naming the byte that is not UTF-8
    try:
        status = json.loads(text)["status"]
    except (ValueError, KeyError, TypeError):
        status = None
    if not isinstance(status, str):
        raise _damaged(folder, SUMMARY_FILE, "is not a JSON object with a status")
    return status


def plan(folder: Path, cfg: dict[str, Any]) -> tuple[str, Path | None]:
    """What ``resume=true`` does in ``folder`` for ``cfg``: ``(DONE, None)``,
    ``(CONTINUE, checkpoint)`` or ``(RESTART, None)``; a ConfigError if the folder holds a run
    of another configuration, or a file in it is damaged."""
    saved = read_config(folder)
    if saved is not None:
        diff = first_difference(comparable(cfg), comparable(with_later_keys(saved, cfg)))
        if diff is not None:
            key, mine, theirs = diff
            raise ConfigError(
                key,
                mine,
                f"the run in {folder} has {key}={theirs!r}; resume continues a run with the "
                "configuration it started with (or give resume=<folder> alone)",
            )
    ckpt = folder / CHECKPOINT_FILE
    if summary_status(folder) == "ok":
        return DONE, None
    if ckpt.is_file():
        readable(ckpt, folder, cfg)
        return CONTINUE, ckpt
    return RESTART, None


def readable(ckpt: Path, folder: Path, cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint's header; a ConfigError if it cannot be read, fails its digest, was
    written for another configuration than ``cfg`` or does not match the folder's
    ``metrics.jsonl`` (a file damaged or edited from outside)."""
    from fedsim.checkpoint import FORMAT, UNDIGESTED, header

    try:
        head = header(ckpt)
    except ValueError as e:
        raise ConfigError("resume", str(folder), f"its checkpoint is damaged: {e}") from None
    upto, fmt = head.get("round"), head.get("format")
    if type(upto) is not int or upto < 0 or fmt not in (*UNDIGESTED, FORMAT):
        raise ConfigError(
            "resume",
            str(folder),
            f"its checkpoint is damaged: {ckpt} says round {upto!r}, format {fmt!r} (this "
            f"fedsim reads formats {', '.join(map(str, (*UNDIGESTED, FORMAT)))})",
        )
    if cfg is not None:
        _same_config(folder, cfg, head.get("config"))
    check_metrics(folder, upto)
    return head


def _same_config(folder: Path, cfg: dict[str, Any], stored: Any) -> None:
    """The checkpoint's configuration must be ``cfg``'s (the first key that differs named)."""
    stored = with_later_keys(stored, cfg) if isinstance(stored, dict) else {}
    diff = first_difference(comparable(cfg), comparable(stored))
    if diff is None:
        return
    key, mine, theirs = diff
    if (folder / CONFIG_FILE).is_file():  # cfg agrees with config.yaml: one of them was edited
        raise ConfigError(
            "resume",
            str(folder),
            f"its {CHECKPOINT_FILE} was written with {key}={theirs!r} but its {CONFIG_FILE} "
            f"says {key}={mine!r}: one of them was edited after the run",
        )
    raise ConfigError(
        key,
        mine,
        f"the run in {folder} has {key}={theirs!r} (its checkpoint says so; its {CONFIG_FILE} "
        "is missing); resume continues a run with the configuration it started with",
    )


def check_metrics(folder: Path, upto: int) -> None:
    """``metrics.jsonl`` must be UTF-8 and hold rounds 0, 1, ... in order, one JSON object a
    line, at least up to the checkpoint's round ``upto`` (a last line without its newline, cut
    by a kill, is let be: resuming drops it)."""
    path = folder / METRICS_FILE
    if not path.is_file():
        raise ConfigError(
            "resume",
            str(folder),
            f"its checkpoint is after round {upto} but it has no {METRICS_FILE} "
            f"(rounds 0..{upto} are needed)",
        )
    lines = _text(folder, path).split("\n")[:-1]  # the last piece: "" or a line a kill cut
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        found = row.get("round") if isinstance(row, dict) else None
        if type(found) is not int or found != i:
            what = "is not a JSON object" if not isinstance(row, dict) else f"has round {found!r}"
            raise _damaged(folder, METRICS_FILE, f"line {i + 1} {what} (round {i} belongs there)")
    if len(lines) <= upto:
        raise ConfigError(
            "resume",
            str(folder),
            f"its checkpoint is after round {upto} but {METRICS_FILE} holds "
            f"{len(lines)} complete lines (rounds 0..{upto} are needed)",
        )


def drop_stale_checkpoint(folder: Path, cfg: dict[str, Any]) -> None:
    """A finished run killed between its summary and deleting its checkpoint: delete it now
    (unless the run keeps its last checkpoint)."""
    if not cfg.get("checkpoint", {}).get("keep", False):
        (folder / CHECKPOINT_FILE).unlink(missing_ok=True)


def clear_partial(folder: Path) -> None:
    """Remove what a run stopped before its first checkpoint left (it starts again)."""
    for name in (METRICS_FILE, SUMMARY_FILE):
        (folder / name).unlink(missing_ok=True)


def find_run(root: Path, cfg: dict[str, Any]) -> Path | None:
    """The newest unfinished run folder under ``root`` (``<date>/<time>``, as the default
    ``hydra.run.dir``) with a checkpoint and ``cfg``'s configuration."""
    if not root.is_dir():
        return None
    want = comparable(cfg)
    for folder in sorted((p for p in root.glob("*/*") if p.is_dir()), reverse=True):
        if not (folder / CHECKPOINT_FILE).is_file() or finished(folder):
            continue
        saved = saved_config(folder)
        if saved is not None and comparable(with_later_keys(saved, cfg)) == want:
            plan(folder, cfg)  # a damaged file in it is a ConfigError naming the folder
            return folder
    return None
