"""The results contract (docs/results.md): config.yaml, metrics.jsonl, summary.json.

``metrics.jsonl`` gets one line per round, flushed and synced when the round ends;
``config.yaml`` and ``summary.json`` are written to a temporary name and renamed, so a killed run
never leaves a half-written file. Non-finite floats are written as ``null`` (JSON has no NaN).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
#: the run's log (Hydra's job log, named after the job): a failed run's traceback, and what
#: Flower's Ray engine logs, go there
LOG_FILE = "fedsim.log"


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _clean(value.item())
    return value


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ResultsWriter:
    """Writes one run's files into ``out_dir``."""

    def __init__(self, out_dir: Path | str) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = None

    def write_config(self, cfg: dict[str, Any]) -> None:
        write_atomic(self.out_dir / CONFIG_FILE, yaml.safe_dump(cfg, sort_keys=False))

    def append_round(self, record: dict[str, Any]) -> None:
        if self._metrics is None:
            # "x": a run never appends to, or overwrites, another run's metrics
            self._metrics = open(self.out_dir / METRICS_FILE, "x", encoding="utf-8")
        self._metrics.write(json.dumps(_clean(record)) + "\n")
        self._metrics.flush()
        os.fsync(self._metrics.fileno())

    def resume(self, upto_round: int) -> None:
        """Continue this folder's run after ``upto_round``: ``metrics.jsonl`` keeps its lines
        up to that round (rounds after the checkpoint, and a line half-written by a kill, are
        dropped; rewritten atomically), a stale ``summary.json`` goes, and new rounds append."""
        path = self.out_dir / METRICS_FILE
        kept: list[str] = []
        if path.exists():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a kill in the middle of writing this line
                    if not line.endswith("\n") or row.get("round", upto_round + 1) > upto_round:
                        break
                    kept.append(line)
        rounds = [json.loads(line)["round"] for line in kept]
        if rounds != list(range(upto_round + 1)):
            raise ValueError(
                f"{path} holds rounds {rounds[:3]}...{rounds[-3:]}; the checkpoint is after "
                f"round {upto_round}, so rounds 0..{upto_round} must be there"
            )
        write_atomic(path, "".join(kept))
        (self.out_dir / SUMMARY_FILE).unlink(missing_ok=True)
        self._metrics = open(path, "a", encoding="utf-8")

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_atomic(self.out_dir / SUMMARY_FILE, json.dumps(_clean(summary), indent=2) + "\n")

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """The rounds of a ``metrics.jsonl`` (or of the run folder holding it). A last line that
    a kill cut short (no newline, not valid JSON) is left out; any other bad line is an error."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break
            raise
    return rows
