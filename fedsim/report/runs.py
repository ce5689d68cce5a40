"""Finding run folders and reading each into a :class:`Run` (the row of ``report.csv``, the
Hydra overrides, the test-accuracy curve, and with a simulated clock its time curve and times
to the target accuracies). A row also carries the run's ``aggregation_error_max`` and, for
plug-in aggregators, each ``aggregator_*`` metric's value in the last round that logged it."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedsim.results import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE


@dataclass
class Run:
    """One run folder, read."""

    path: Path
    row: dict[str, Any]
    overrides: dict[str, str]
    curve: list[tuple[int, float | None]] = field(default_factory=list)
    #: with a simulated clock: (round, simulated seconds at its end, test accuracy)
    time_curve: list[tuple[int, float, float | None]] = field(default_factory=list)
    #: with a simulated clock: ``summary.json``'s ``time_to_accuracy`` (target: seconds or None)
    time_to_accuracy: dict[str, float | None] | None = None
    #: the run's resolved configuration (``config.yaml``)
    config: dict[str, Any] = field(default_factory=dict)

    #: the run's config-group choices (Hydra's record), read when first asked for
    group_choices: dict[str, str] | None = field(default=None, repr=False)

    def setting(self, key: str) -> str:
        """An override's value for this run, written one way whatever way the command line
        wrote it: the value its configuration resolved to (``false`` and ``0.001`` for a sweep's
        ``False`` and ``1e-3``; a run that kept ``sim.lr``'s default ran at it); for a config
        group, the option chosen (``control=none`` when only another run chose ``scaffold``);
        else the command line's text, else ''."""
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return self.overrides.get(key, "")
            node = node[part]
        if isinstance(node, dict):
            if key in self.overrides:
                return self.overrides[key]
            if self.group_choices is None:
                self.group_choices = hydra_choices(self.path)
            return self.group_choices.get(key, "")
        if isinstance(node, list):
            return self.overrides.get(key, "")
        return (
            "null" if node is None else str(node).lower() if isinstance(node, bool) else str(node)
        )


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """Run folders under ``paths`` (each a run folder or a folder holding some), sorted."""
    found: set[Path] = set()
    for root in paths:
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
        if root.is_file():
            root = root.parent
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .hydra, .git
            if CONFIG_FILE in files and (METRICS_FILE in files or SUMMARY_FILE in files):
                found.add(Path(folder))
    return sorted(found, key=_natural)


def _natural(path: Path) -> list:
    """Sort key: sweep job folders 2 before 10 (numbers before names, never compared)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line cut short by a kill
                    break
    except OSError:
        pass
    return rows


#: overrides that set the machine's resources, not the experiment (results on 1 and 2 torch
#: threads agree to about 2e-8): runs that differ only in them are one configuration
RESOURCES = ("engine.num_threads",)


def _overrides(folder: Path) -> dict[str, str]:
    """The command-line overrides of a Hydra job (``.hydra/overrides.yaml``), as key: value,
    less :data:`RESOURCES`."""
    path = folder / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return {}
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if key not in RESOURCES:
            out[key] = value
    return out


def read_run(folder: Path) -> Run:
    cfg = {}
    try:
        cfg = yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        pass
    summary = _read_json(folder / SUMMARY_FILE)
    metrics = _read_metrics(folder / METRICS_FILE)
    sim = cfg.get("sim", {}) if isinstance(cfg, dict) else {}
    adapter = cfg.get("adapter", {}) if isinstance(cfg, dict) else {}
    last = metrics[-1] if metrics else {}
    s = summary or {}
    choice = _choices(folder, cfg) if summary is None else {}
    row: dict[str, Any] = {
        "task": s.get("task", choice.get("task")),
        "strategy": s.get("strategy", choice.get("strategy")),
        "adapter": s.get("adapter", choice.get("adapter")),
        "r": adapter.get("r"),
        "compressor": s.get("compressor", choice.get("compressor")),
        "feedback": s.get("feedback", choice.get("feedback")),
        "privacy": s.get("privacy", choice.get("privacy")),
        "partition": s.get("partition", choice.get("partition")),
        "num_clients": s.get("num_clients", sim.get("num_clients")),
        "clients_per_round": s.get("clients_per_round", sim.get("clients_per_round")),
        "rounds": s.get("rounds", sim.get("rounds")),
        "lr": sim.get("lr"),
        "seed": s.get("seed", sim.get("seed")),
        "rounds_completed": s.get("rounds_completed", last.get("round", 0)),
        "final_accuracy": s.get("final_eval_accuracy", last.get("eval_accuracy")),
        "final_loss": s.get("final_eval_loss", last.get("eval_loss")),
        "final_val_accuracy": s.get("final_val_accuracy", last.get("val_accuracy")),
        "final_val_loss": s.get("final_val_loss", last.get("val_loss")),
        "bytes_up": s.get("bytes_up_total", sum(m.get("bytes_up", 0) or 0 for m in metrics)),
        "bytes_down": s.get("bytes_down_total", sum(m.get("bytes_down", 0) or 0 for m in metrics)),
        "epsilon": s.get("epsilon", last.get("epsilon")),
        "wall_time_s": s.get("wall_time_s"),
        "system": _system(s, cfg, choice),
        "sim_time_s": s.get("sim_time_s", last.get("sim_time_s")),
        "aggregation_error_max": s.get("aggregation_error_max", _largest(metrics)),
        **_aggregator_metrics(s, metrics),
    }
    if summary is None:
        row["status"] = "incomplete"
        row["reason"] = (
            f"no {SUMMARY_FILE}: killed or still running ({len(metrics)} rounds in {METRICS_FILE})"
        )
    else:
        row["status"] = "ok" if s.get("status") == "ok" else "failed"
        row["reason"] = "" if row["status"] == "ok" else str(s.get("error") or s.get("status"))
    curve = [(int(m["round"]), m.get("eval_accuracy")) for m in metrics if "round" in m]
    timed = [m for m in metrics if "round" in m and m.get("sim_time_s") is not None]
    times = [(int(m["round"]), float(m["sim_time_s"]), m.get("eval_accuracy")) for m in timed]
    reached = s.get("time_to_accuracy")
    reached = dict(reached) if isinstance(reached, dict) else None
    config = cfg if isinstance(cfg, dict) else {}
    return Run(folder, row, _overrides(folder), curve, times, reached, config)


def _largest(metrics: Sequence[dict[str, Any]]) -> float | None:
    """The largest ``aggregation_error`` of the rounds written (a run without a summary)."""
    errors = [m.get("aggregation_error") for m in metrics]
    return max((float(e) for e in errors if isinstance(e, (int, float))), default=None)


def _aggregator_metrics(summary: dict[str, Any], metrics: Sequence[dict[str, Any]]) -> dict:
    """A plug-in aggregator's ``aggregator_*`` metrics: each one's value in the last round that
    logged it (``summary.json``'s, should it hold one)."""
    out: dict[str, Any] = {}
    for m in metrics:
        for key, value in m.items():
            if key.startswith("aggregator_") and value is not None:
                out[key] = value
    out.update({k: v for k, v in summary.items() if k.startswith("aggregator_")})
    return dict(sorted(out.items()))


def _system(summary: dict[str, Any], cfg: Any, choice: dict[str, Any]) -> str:
    """The run's system profile (``system.name``): ``none`` for a run without a clock, empty
    for a run from before the clock existed (its config has no ``system``)."""
    for block in (summary.get("system"), cfg.get("system") if isinstance(cfg, dict) else None):
        if isinstance(block, dict) and block.get("name") is not None:
            return str(block["name"])
    return str(choice.get("system", ""))


def _choices(folder: Path, cfg: Any) -> dict[str, Any]:
    """Config-group choices of a run without a summary: Hydra's record of them
    (``.hydra/hydra.yaml``), else the class each group built."""
    choices = hydra_choices(folder)
    if choices:
        return choices
    out = {}
    for group, value in cfg.items() if isinstance(cfg, dict) else []:
        if isinstance(value, dict) and "_target_" in value:
            out[group] = str(value["_target_"]).rsplit(".", 1)[-1]
    return out


def hydra_choices(folder: Path) -> dict[str, str]:
    """The config-group choices Hydra recorded for a run (``.hydra/hydra.yaml``), less Hydra's
    own; {} without that record."""
    try:
        hydra_cfg = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())
        choices = hydra_cfg["hydra"]["runtime"]["choices"]
        return {
            k: "null" if v is None else str(v)
            for k, v in choices.items()
            if not k.startswith("hydra/")
        }
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return {}
