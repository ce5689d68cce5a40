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

from fedsim.checkpoint import CHECKPOINT_FILE
from fedsim.config import RESUME_FREE
from fedsim.errors import ConfigError
from fedsim.results import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE

DONE, CONTINUE, RESTART = "done", "continue", "restart"


def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a configuration a resumed run must share with the run it continues."""
    return {k: v for k, v in cfg.items() if k not in RESUME_FREE}


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
    """The configuration a run folder saved (``config.yaml``), or None."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    return cfg if isinstance(cfg, dict) else None


def finished(folder: Path) -> bool:
    """Whether the folder holds a finished run (``summary.json`` with status ok)."""
    try:
        return json.loads((folder / SUMMARY_FILE).read_text())["status"] == "ok"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def plan(folder: Path, cfg: dict[str, Any]) -> tuple[str, Path | None]:
    """What ``resume=true`` does in ``folder`` for ``cfg``: ``(DONE, None)``,
    ``(CONTINUE, checkpoint)`` or ``(RESTART, None)``; a ConfigError if the folder holds a run
    of another configuration."""
    saved = saved_config(folder)
    if saved is not None:
        diff = first_difference(comparable(cfg), comparable(saved))
        if diff is not None:
            key, mine, theirs = diff
            raise ConfigError(
                key,
                mine,
                f"the run in {folder} has {key}={theirs!r}; resume continues a run with the "
                "configuration it started with (or give resume=<folder> alone)",
            )
    ckpt = folder / CHECKPOINT_FILE
    if finished(folder):
        return DONE, None
    if ckpt.is_file():
        readable(ckpt, folder)
        return CONTINUE, ckpt
    return RESTART, None


def readable(ckpt: Path, folder: Path) -> dict[str, Any]:
    """The checkpoint's header; a ConfigError if it cannot be read or does not match the
    folder's ``metrics.jsonl`` (a file damaged or edited from outside)."""
    from fedsim.checkpoint import header

    try:
        head = header(ckpt)
    except ValueError as e:
        raise ConfigError("resume", str(folder), f"its checkpoint is damaged: {e}") from None
    rounds = 0
    path = folder / METRICS_FILE
    if path.exists():
        with open(path, encoding="utf-8") as f:
            rounds = sum(1 for line in f if line.endswith("\n"))
    if rounds <= int(head.get("round", -1)):
        raise ConfigError(
            "resume",
            str(folder),
            f"its checkpoint is after round {head.get('round')} but {METRICS_FILE} holds "
            f"{rounds} complete lines (rounds 0..{head.get('round')} are needed)",
        )
    return head


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
        if saved is not None and comparable(saved) == want:
            return folder
    return None
