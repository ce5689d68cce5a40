"""Damaged, edited and hostile run folders: what comes back from disk (issue 19).

Each row damages its copy of a prepared run (``stopped``: killed after its checkpoint of round
1; ``finished``) and resumes it, with ``resume={run}`` or with ``hydra.run.dir={run}
resume=true`` and the arguments that made it. A damaged or edited file is a configuration
error (exit 2) found before anything in the folder is touched; a results folder is data, so a
``_target_`` found only in its ``config.yaml`` is refused before anything is built.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import yaml

from tests.bad_inputs import STOPPED_ARGS, Case

CKPT, METRICS, CONFIG, SUMMARY = (
    "checkpoint.safetensors",
    "metrics.jsonl",
    "config.yaml",
    "summary.json",
)


def again(*extra: str) -> tuple[str, ...]:
    """``resume=true`` of the copied folder, with the arguments that made it (and ``extra``)."""
    return (*STOPPED_ARGS, *extra, "hydra.run.dir={run}", "resume=true")


FOLDER = ("resume={run}",)


# ----------------------------------------------------------------------------- checkpoints


def _data_start(data: bytes) -> int:
    """Where a safetensors file's tensor bytes begin (after its length and JSON header)."""
    return 8 + struct.unpack("<Q", data[:8])[0]


def xor_tensor_bytes(run: Path, tmp: Path) -> None:
    """64 bytes of tensor data flipped, the header intact (the issue's first report)."""
    data = bytearray((run / CKPT).read_bytes())
    start = _data_start(bytes(data))
    assert len(data) - start >= 64 + 16, "the checkpoint holds too little tensor data"
    for i in range(start + 16, start + 16 + 64):
        data[i] ^= 0x5A
    (run / CKPT).write_bytes(bytes(data))


def edit_header_round(run: Path, tmp: Path) -> None:
    """The header's round changed from 1 to 0 (same length: the tensors stay where they were)."""
    data = (run / CKPT).read_bytes()
    old, new = b'\\"round\\": 1,', b'\\"round\\": 0,'
    assert old in data[: _data_start(data)], "the header does not say round 1"
    (run / CKPT).write_bytes(data.replace(old, new, 1))


def cut_checkpoint(run: Path, tmp: Path) -> None:
    data = (run / CKPT).read_bytes()
    (run / CKPT).write_bytes(data[: len(data) * 2 // 3])


def drop_digest(run: Path, tmp: Path) -> None:
    """The digest's key renamed (same length): a format-3 file without a digest."""
    data = (run / CKPT).read_bytes()
    assert b'"fedsim_sha256"' in data
    (run / CKPT).write_bytes(data.replace(b'"fedsim_sha256"', b'"fedsim_sha999"', 1))


# ----------------------------------------------------------------------------- results files


def random_metrics(run: Path, tmp: Path) -> None:
    (run / METRICS).write_bytes(random.Random(19).randbytes(300))


def garbage_line_in_the_middle(run: Path, tmp: Path) -> None:
    lines = (run / METRICS).read_text().splitlines(keepends=True)
    assert len(lines) >= 2
    (run / METRICS).write_text(lines[0] + "garbage, not JSON\n" + "".join(lines[1:]))


def rounds_out_of_order(run: Path, tmp: Path) -> None:
    lines = (run / METRICS).read_text().splitlines(keepends=True)
    (run / METRICS).write_text("".join([lines[1], lines[0], *lines[2:]]))


def delete_metrics(run: Path, tmp: Path) -> None:
    (run / METRICS).unlink()


def latin1_config(run: Path, tmp: Path) -> None:
    text = (run / CONFIG).read_text()
    (run / CONFIG).write_bytes(("# r\xe9sum\xe9\n" + text).encode("latin-1"))


def not_yaml_config(run: Path, tmp: Path) -> None:
    (run / CONFIG).write_text("sim: {rounds: 3\n  task: [unclosed\n")


def list_config(run: Path, tmp: Path) -> None:
    (run / CONFIG).write_text("- task\n- strategy\n")


def delete_config(run: Path, tmp: Path) -> None:
    (run / CONFIG).unlink()


def _edit_config(run: Path, edit) -> None:
    cfg = yaml.safe_load((run / CONFIG).read_text())
    edit(cfg)
    (run / CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))


def config_lr_edited(run: Path, tmp: Path) -> None:
    _edit_config(run, lambda cfg: cfg["sim"].update(lr=0.02))


def garbage_summary(run: Path, tmp: Path) -> None:
    (run / SUMMARY).write_text('{"status": "ok", "rounds": [1, 2')


def binary_summary(run: Path, tmp: Path) -> None:
    (run / SUMMARY).write_bytes(b"\x00\xff\xfe" + random.Random(7).randbytes(100))


def summary_without_status(run: Path, tmp: Path) -> None:
    (run / SUMMARY).write_text(json.dumps(["ok"]))


# ----------------------------------------------------------------------------- hostile targets


def joblib_logger(run: Path, tmp: Path) -> None:
    """The issue's exploit: a logger whose target loads a pickle that lies in the folder (here
    bytes that are no pickle: the row passes only if nothing reads them)."""
    (run / "payload.pkl").write_bytes(b"not read: refused before anything is built")
    target = {"_target_": "joblib.load", "filename": str(run / "payload.pkl")}
    _edit_config(run, lambda cfg: cfg.update(logger=target))


def file_handler_logger(run: Path, tmp: Path) -> None:
    """A target that would create a file when built (the table checks that no file appears)."""
    target = {"_target_": "logging.FileHandler", "filename": str(run / "marker.txt")}
    _edit_config(run, lambda cfg: cfg.update(logger=target))


def nested_numpy_load(run: Path, tmp: Path) -> None:
    """A target nested inside a shipped one (Hydra builds nested targets too)."""
    hostile = {"_target_": "numpy.load", "file": str(run / "x.npy"), "allow_pickle": True}
    _edit_config(run, lambda cfg: cfg["partition"].update(extra=hostile))


def plugin_dir_without_it(run: Path, tmp: Path) -> None:
    """``--config-dir`` names a folder of the user's plug-ins; the folder's target is not one."""
    (tmp / "plugins" / "strategy").mkdir(parents=True)
    (tmp / "plugins" / "strategy" / "mine.yaml").write_text("_target_: my_plugins.Median\n")
    file_handler_logger(run, tmp)


def stale_target(run: Path, tmp: Path) -> None:
    _edit_config(run, lambda cfg: cfg["strategy"].update(_target_="builtins.exec"))


REFUSED = "is neither a target fedsim ships nor one in --config-dir"

CASES = [
    # checkpoints verify themselves
    Case("folder-ckpt-xor-64-bytes", FOLDER, "does not match its SHA-256 digest",
         folder="stopped", prepare=xor_tensor_bytes),
    Case("folder-ckpt-xor-64-bytes-resume-true", again(), "does not match its SHA-256 digest",
         folder="stopped", prepare=xor_tensor_bytes),
    Case("folder-ckpt-round-edited", again(), "does not match its SHA-256 digest",
         folder="stopped", prepare=edit_header_round),
    Case("folder-ckpt-cut", FOLDER, "its checkpoint is damaged",
         folder="stopped", prepare=cut_checkpoint),
    Case("folder-ckpt-digest-removed", again(), "has no SHA-256 digest",
         folder="stopped", prepare=drop_digest),
    # results files
    Case("folder-metrics-random-bytes", again(), "metrics.jsonl is not UTF-8 text",
         folder="stopped", prepare=random_metrics),
    Case("folder-metrics-random-bytes-folder", FOLDER, "metrics.jsonl is not UTF-8 text",
         folder="stopped", prepare=random_metrics),
    Case("folder-metrics-garbage-line", again(), "line 2 is not a JSON object",
         folder="stopped", prepare=garbage_line_in_the_middle),
    Case("folder-metrics-out-of-order", FOLDER, "line 1 has round 1",
         folder="stopped", prepare=rounds_out_of_order),
    Case("folder-metrics-missing", again(), "it has no metrics.jsonl",
         folder="stopped", prepare=delete_metrics),
    Case("folder-config-latin-1", FOLDER, "config.yaml is not UTF-8 text",
         folder="stopped", prepare=latin1_config),
    Case("folder-config-latin-1-resume-true", again(), "config.yaml is not UTF-8 text",
         folder="stopped", prepare=latin1_config),
    Case("folder-config-not-yaml", FOLDER, "config.yaml is not YAML",
         folder="stopped", prepare=not_yaml_config),
    Case("folder-config-a-list", again(), "config.yaml holds a list, not a mapping",
         folder="stopped", prepare=list_config),
    Case("folder-config-deleted-and-changed", again("sim.lr=0.02"),
         "has sim.lr=0.01 (its checkpoint says so", folder="stopped", prepare=delete_config),
    Case("folder-config-deleted-resume-folder", FOLDER, "it has no config.yaml",
         folder="stopped", prepare=delete_config),
    Case("folder-config-edited-not-the-checkpoint", FOLDER,
         "was written with sim.lr=0.01 but its config.yaml says sim.lr=0.02",
         folder="stopped", prepare=config_lr_edited),
    Case("folder-summary-garbage", again(), "summary.json is not a JSON object with a status",
         folder="finished", prepare=garbage_summary),
    Case("folder-summary-garbage-folder", FOLDER, "summary.json is not UTF-8 text",
         folder="finished", prepare=binary_summary),
    Case("folder-summary-a-list", again(), "summary.json is not a JSON object with a status",
         folder="stopped", prepare=summary_without_status),
    Case("folder-finished-resume-folder", FOLDER, "holds a finished run; nothing to resume",
         folder="finished"),
    # a results folder is data
    Case("folder-target-joblib-load", FOLDER, f"logger._target_=joblib.load: {REFUSED}",
         folder="stopped", prepare=joblib_logger),
    Case("folder-target-file-handler", FOLDER, f"logger._target_=logging.FileHandler: {REFUSED}",
         folder="stopped", prepare=file_handler_logger),
    Case("folder-target-nested-numpy-load", FOLDER,
         f"partition.extra._target_=numpy.load: {REFUSED}",
         folder="stopped", prepare=nested_numpy_load),
    Case("folder-target-builtins-exec", FOLDER, f"strategy._target_=builtins.exec: {REFUSED}",
         folder="stopped", prepare=stale_target),
    Case("folder-target-config-dir-lacks-it", ("--config-dir", "{tmp}/plugins", "resume={run}"),
         f"logger._target_=logging.FileHandler: {REFUSED}",
         folder="stopped", prepare=plugin_dir_without_it),
    Case("folder-config-dir-missing", ("--config-dir={tmp}/nowhere", "resume={run}"),
         "/nowhere: is not a folder", folder="stopped"),
]  # fmt: skip
