"""Checkpoints and resume: a run stopped at any round and resumed writes the same metrics.jsonl
(timings aside) as an uninterrupted run, for every strategy and every kind of state; files are
written atomically; resuming the wrong thing is a one-line error."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim import checkpoint
from fedsim.api import run
from fedsim.apps.server import FederatedRun
from fedsim.checkpoint import CHECKPOINT_FILE
from fedsim.cli import main
from fedsim.records import array_record, numpy_dict
from fedsim.results import ResultsWriter, read_metrics
from tests.conftest import ROOT, strip_timings, tiny


class SimulatedKill(BaseException):
    """Stops a run like a kill: no ``except Exception`` sees it, no summary is written."""


@contextlib.contextmanager
def crash_after(server_round: int, monkeypatch, before_checkpoint: bool = False):
    """Stop the run right after ``server_round``'s checkpoint (or, with
    ``before_checkpoint``, after its metrics line but before its checkpoint)."""
    original = FederatedRun.checkpoint

    def checkpoint_then_die(self, r, arrays, t_start):
        if r == server_round and before_checkpoint:
            raise SimulatedKill(r)
        original(self, r, arrays, t_start)
        if r == server_round:
            raise SimulatedKill(r)

    with monkeypatch.context() as m:
        m.setattr(FederatedRun, "checkpoint", checkpoint_then_die)
        with pytest.raises(SimulatedKill):
            yield


def interrupted_equals_uninterrupted(tmp_path, monkeypatch, args, at, **kw):
    full = run(args, output_dir=tmp_path / "full")
    with crash_after(at, monkeypatch, **kw):
        run(args, output_dir=tmp_path / "cut")
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = run(args, output_dir=tmp_path / "cut", resume=True)
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["round"] for r in b] == list(range(len(a)))  # no round twice, none missing
    assert strip_timings(b) == strip_timings(a)
    assert full["status"] == resumed["status"] == "ok"
    drop = ("wall_time_s", "checkpoint", "resumed_from")
    assert {k: v for k, v in resumed.items() if k not in drop} == {
        k: v for k, v in full.items() if k not in drop
    }
    assert not (tmp_path / "cut" / CHECKPOINT_FILE).exists()  # a finished run drops it
    return full, resumed


STRATEGIES = ["fedavg", "fedsb", "ffa", "fedex", "flora", "fedsa", "centralized", "local"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_resumes_exactly(strategy, tmp_path, monkeypatch):
    args = tiny(
        f"strategy={strategy}",
        "sim.rounds=4",
        "sim.num_clients=5",
        "sim.clients_per_round=3",
        "faults=mixed",
    )
    _, resumed = interrupted_equals_uninterrupted(tmp_path, monkeypatch, args, at=2)
    assert resumed["resumed_from"] == [2]


@pytest.mark.parametrize(
    "extra, at",
    [
        (("compressor=topk", "compressor.ratio=0.2", "feedback=ef21", "downlink=topk"), 2),
        (("compressor=topk", "compressor.ratio=0.2", "feedback=econtrol"), 1),
        (
            (
                "compressor=randk",
                "compressor.ratio=0.3",
                "compressor.scaled=false",
                "feedback=ef14",
            ),
            2,
        ),
        (("privacy=dpsgd", "privacy.target_epsilon=5"), 2),
        (("strategy=fedsb", "privacy=central", "privacy.target_epsilon=8"), 2),
        (("strategy=fedsb", "adapter.init.source=clients"), 0),
        (("sim.keep_optimizer_state=true", "schedule=cosine"), 1),
        (("strategy=fedsa", "adapter.dropout=0.1"), 2),
    ],
    ids=[
        "ef21-ef21p",
        "econtrol",
        "ef14-randk",
        "dpsgd",
        "central-dp",
        "setup-round",
        "optim",
        "dropout",
    ],
)
def test_resume_restores_every_kind_of_state(extra, at, tmp_path, monkeypatch):
    args = tiny("sim.rounds=4", "sim.num_clients=5", "sim.clients_per_round=3", *extra)
    interrupted_equals_uninterrupted(tmp_path, monkeypatch, args, at=at)


def test_a_kill_between_the_metrics_line_and_the_checkpoint_repeats_no_round(tmp_path, monkeypatch):
    args = tiny("sim.rounds=4", "compressor=topk", "feedback=ef21")
    _, resumed = interrupted_equals_uninterrupted(
        tmp_path, monkeypatch, args, at=3, before_checkpoint=True
    )
    assert resumed["resumed_from"] == [2]  # round 3's line was written, then cut back


def test_checkpoints_every_n_rounds_resume_from_the_last_one(tmp_path, monkeypatch):
    args = tiny("sim.rounds=5", "checkpoint.every=2", "feedback=ef21", "compressor=topk")
    full = run(args, output_dir=tmp_path / "full")
    assert full["checkpoint"]["written"] == 3  # after rounds 0, 2 and 4 (the last needs none)
    with crash_after(4, monkeypatch, before_checkpoint=True):
        run(args, output_dir=tmp_path / "cut")
    assert len(read_metrics(tmp_path / "cut")) == 5  # rounds 0..4 written, the last ckpt: 2
    resumed = run(args, output_dir=tmp_path / "cut", resume=True)
    assert resumed["resumed_from"] == [2]
    assert strip_timings(read_metrics(tmp_path / "cut")) == strip_timings(
        read_metrics(tmp_path / "full")
    )


def test_checkpoint_keep_and_off(tmp_path):
    kept = run(tiny("checkpoint.keep=true"), output_dir=tmp_path / "kept")
    assert (tmp_path / "kept" / CHECKPOINT_FILE).exists()
    assert kept["checkpoint"]["last_round"] == 2 and kept["checkpoint"]["kept"]
    head = checkpoint.header(tmp_path / "kept" / CHECKPOINT_FILE)
    assert head["round"] == 2 and head["choices"]["strategy"] == "fedavg"
    off = run(tiny("checkpoint.every=0"), output_dir=tmp_path / "off")
    assert off["checkpoint"]["written"] == 0
    assert not (tmp_path / "off" / CHECKPOINT_FILE).exists()


def test_a_resume_delivers_replies_in_the_uninterrupted_order(tmp_path, monkeypatch):
    """Replies are delivered in message-id order, and that order is, for instance, the order
    DP-SGD's epsilons are summed in (epsilon_mean's last digit): a resumed run numbers its
    training messages as the uninterrupted run did (the checkpoint saves the grid's count)."""
    import fedsim.engines.inline as inline_mod

    ids: dict[str, list[str]] = {}
    push = inline_mod.InlineGrid.push_messages

    def recording(self, messages):
        messages = list(messages)
        out = list(push(self, messages))
        for msg, msg_id in zip(messages, out):
            if msg.metadata.message_type == "train" and msg.metadata.group_id == "1":
                ids.setdefault(key, []).append(msg_id)
        return out

    monkeypatch.setattr(inline_mod.InlineGrid, "push_messages", recording)
    args = tiny("sim.rounds=2", "privacy=dpsgd")
    key = "full"
    run(args, output_dir=tmp_path / "full")
    key = "cut"
    with crash_after(0, monkeypatch):
        run(args, output_dir=tmp_path / "cut")
    key = "resumed"
    run(args, output_dir=tmp_path / "cut", resume=True)
    assert "cut" not in ids and ids["resumed"] == ids["full"]  # m9..m12, not m5..m8
    assert strip_timings(read_metrics(tmp_path / "cut")) == strip_timings(
        read_metrics(tmp_path / "full")
    )


def test_kill_9_at_a_random_round_then_resume_is_identical(tmp_path):
    """The issue's test: a real SIGKILL of a ``fedsim`` process, with EF21 memories and DP-SGD
    accountants in the clients' states; ``resume=true`` continues it."""
    rounds = 10
    args = tiny(
        f"sim.rounds={rounds}",
        "sim.local_steps=8",
        "compressor=topk",
        "compressor.ratio=0.2",
        "feedback=ef21",
        "privacy=dpsgd",
        "privacy.target_epsilon=8",
        "faults=crash",
        "faults.crash_prob=0.1",
    )
    full = run(args, output_dir=tmp_path / "full")
    folder = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "fedsim", *args, f"hydra.run.dir={folder}"]
    target = random.randint(1, rounds - 3)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL)
    metrics = folder / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") > target:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (folder / "summary.json").exists()
    done = subprocess.run(
        [*cmd, "resume=true"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((folder / "summary.json").read_text())
    assert len(summary["resumed_from"]) == 1 and summary["resumed_from"][0] >= target - 1
    assert strip_timings(read_metrics(folder)) == strip_timings(read_metrics(tmp_path / "full"))
    assert summary["epsilon"] == full["epsilon"] and summary["status"] == "ok"
    assert not any(p.name.endswith(".tmp") for p in folder.iterdir())


# ----------------------------------------------------------------------------- the file


def test_state_trees_round_trip_exactly(tmp_path):
    tree = {
        "ints": {3: 4, 10: [1, 2]},
        "floats": [0.1, 1e-300, float("inf"), float("-inf")],
        "nan": float("nan"),
        "np": [np.float32(0.5), np.int64(7), np.bool_(True)],
        "arrays": {"a": np.arange(6.0).reshape(2, 3), "e": np.zeros((0, 2), np.float32)},
        "0d": np.array(3.25),
        "tuple": (1, "x", None),
        "set": {5, 1, 3},
        "bytes": b"\x00\xff",
        "$odd": "a key that looks like a marker",
        "nested": [{"k": np.ones(2, np.float16)}],
    }
    size = checkpoint.save(tmp_path / "c.safetensors", tree)
    assert size == (tmp_path / "c.safetensors").stat().st_size
    got = checkpoint.load(tmp_path / "c.safetensors")
    assert got["ints"] == {3: 4, 10: [1, 2]}
    assert got["floats"][:2] == [0.1, 1e-300] and got["floats"][2:] == [np.inf, -np.inf]
    assert np.isnan(got["nan"])
    assert [type(v) for v in got["np"]] == [np.float32, np.int64, np.bool_]
    assert got["np"][0] == np.float32(0.5)
    assert np.array_equal(got["arrays"]["a"], tree["arrays"]["a"])
    assert got["arrays"]["e"].shape == (0, 2) and got["arrays"]["e"].dtype == np.float32
    assert got["0d"].shape == () and got["0d"] == 3.25
    assert got["tuple"] == (1, "x", None) and got["set"] == {1, 3, 5}
    assert got["bytes"] == b"\x00\xff" and got["$odd"] == tree["$odd"]
    assert got["nested"][0]["k"].dtype == np.float16
    with pytest.raises(TypeError, match="object"):
        checkpoint.save(tmp_path / "d.safetensors", {"x": object()})


def test_client_states_round_trip_byte_for_byte():
    rd = RecordDict(
        {
            "arr": array_record({"w": np.arange(4, dtype=np.float64), "i": np.arange(2)}),
            "cfg": ConfigRecord({"steps": 3, "first": True, "name": "x", "blob": b"ab"}),
            "met": MetricRecord({"loss": 0.25, "n": 4}),
        }
    )
    back = checkpoint.record_dict_from_state(
        checkpoint.decode_tree(*checkpoint.encode_tree(checkpoint.record_dict_state(rd)))
    )
    assert type(back["arr"]) is ArrayRecord and type(back["cfg"]) is ConfigRecord
    assert [a.data for a in back["arr"].values()] == [a.data for a in rd["arr"].values()]
    assert dict(back["cfg"]) == dict(rd["cfg"]) and dict(back["met"]) == dict(rd["met"])
    assert {k: v.dtype for k, v in numpy_dict(back["arr"]).items()} == {
        "w": np.float64,
        "i": np.arange(2).dtype,
    }


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_FILE
    checkpoint.save(path, {"round": 1, "x": np.ones(3)})

    def no_rename(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(checkpoint.os, "replace", no_rename)
    with pytest.raises(OSError):
        checkpoint.save(path, {"round": 2, "x": np.zeros(3)})
    assert checkpoint.load(path)["round"] == 1
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="not a fedsim checkpoint|cannot be read"):
        checkpoint.load(tmp_path / "junk.safetensors")


def test_resume_cuts_a_half_written_line_and_later_rounds(tmp_path):
    w = ResultsWriter(tmp_path)
    for r in range(4):
        w.append_round({"round": r, "x": r})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"round": 4, "x"')  # a kill in the middle of a line
    (tmp_path / "summary.json").write_text('{"status": "failed"}')
    w = ResultsWriter(tmp_path)
    w.resume(2)
    w.append_round({"round": 3, "x": 30})
    w.close()
    assert [r["x"] for r in read_metrics(tmp_path)] == [0, 1, 2, 30]
    assert not (tmp_path / "summary.json").exists()
    with pytest.raises(ValueError, match="rounds 0..5 must be there"):
        ResultsWriter(tmp_path).resume(5)


# ----------------------------------------------------------------------------- the command line


def _cut_run(folder: Path, monkeypatch, *extra: str) -> list[str]:
    args = tiny("sim.rounds=3", *extra)
    with crash_after(1, monkeypatch):
        run(args, output_dir=folder)
    return args


def test_resume_true_finds_the_newest_unfinished_run_of_the_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    older = tmp_path / "results" / "runs" / "2026-01-01" / "00-00-00-000000"
    newer = tmp_path / "results" / "runs" / "2026-01-02" / "00-00-00-000000"
    other = tmp_path / "results" / "runs" / "2026-01-03" / "00-00-00-000000"
    args = _cut_run(older, monkeypatch)
    _cut_run(newer, monkeypatch)
    _cut_run(other, monkeypatch, "sim.lr=0.02")  # newest, but another configuration
    main([*args, "resume=true"])
    assert json.loads((newer / "summary.json").read_text())["resumed_from"] == [1]
    assert not (older / "summary.json").exists() and not (other / "summary.json").exists()


def test_resume_a_folder_alone_continues_it_with_its_saved_config(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    _cut_run(folder, monkeypatch, "sim.lr=0.02")
    main([f"resume={folder}", "quiet=true"])
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["resumed_from"] == [1]
    assert summary["strategy"] == "fedavg"  # the choices come from the checkpoint


@pytest.mark.parametrize(
    "argv, message",
    [
        (["resume=true", "sim.lr=0.5"], "sim.lr=0.5: the run in"),
        (["resume={folder}", "sim.lr=0.5"], "drop the other arguments (sim.lr=0.5)"),
        (["resume={empty}"], "is not a run folder"),
        (["resume=true", "engine=ray"], "checkpoints and resume need engine=inline"),
        (["resume=maybe?"], "is not a run folder"),
    ],
)
def test_resuming_the_wrong_thing_is_one_line_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    folder, empty = tmp_path / "run", tmp_path / "empty"
    empty.mkdir()
    args = _cut_run(folder, monkeypatch)
    before = (folder / "metrics.jsonl").read_text()
    argv = [a.format(folder=folder, empty=empty) for a in argv]
    full = [*args, f"hydra.run.dir={folder}", *argv] if "resume=true" in argv else argv
    with pytest.raises(SystemExit) as info:
        main(full)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert (folder / "metrics.jsonl").read_text() == before  # nothing touched


def test_nothing_to_resume_is_said_plainly(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([*tiny(), "resume=true"])
    assert info.value.code == 2
    assert "no unfinished run of this configuration" in capsys.readouterr().err
    done = tmp_path / "done"
    run(tiny(), output_dir=done)
    main([*tiny(), "resume=true", f"hydra.run.dir={done}"])
    assert "has finished already; nothing to resume" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main([f"resume={done}"])
    assert info.value.code == 2
    assert "holds a finished run" in capsys.readouterr().err


def test_a_sweep_resumes_its_unfinished_jobs_only(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    argv = ["-m", *tiny("sim.rounds=3"), "sim.seed=0,1,2", f"hydra.sweep.dir={sweep}"]
    with pytest.raises(SystemExit):
        main([*argv[:-1], "sim.seed=0,1,2", "resume=true"])  # no folder named: refused
    assert "give hydra.sweep.dir" in capsys.readouterr().err
    main(argv)
    finished = (sweep / "0" / "summary.json").read_text()
    # job 1: killed after its checkpoint of round 1; job 2: killed before its first checkpoint
    shutil.rmtree(sweep / "1")
    with crash_after(1, monkeypatch):
        run(tiny("sim.rounds=3", "sim.seed=1"), output_dir=sweep / "1")
    (sweep / "2" / "summary.json").unlink()
    (sweep / "2" / "metrics.jsonl").write_text('{"round": 0}\n')
    main([*argv, "resume=true"])
    assert (sweep / "0" / "summary.json").read_text() == finished  # left alone
    assert json.loads((sweep / "1" / "summary.json").read_text())["resumed_from"] == [1]
    assert json.loads((sweep / "2" / "summary.json").read_text())["resumed_from"] == []
    out = capsys.readouterr().out
    assert "has finished already" in out and "starting it again from round 0" in out
    fresh = tmp_path / "fresh"
    main(["-m", *tiny("sim.rounds=3"), "sim.seed=0,1,2", f"hydra.sweep.dir={fresh}"])
    for job in ("0", "1", "2"):
        assert strip_timings(read_metrics(sweep / job)) == strip_timings(read_metrics(fresh / job))


# ----------------------------------------------------------------------------- no pickle


def test_nothing_fedsim_writes_is_a_pickle(tmp_path):
    """Every file of a run (a kept checkpoint, the PEFT export, Hydra's config copies)
    is JSON, YAML, safetensors or text; no file starts with a pickle's protocol header."""
    main(
        [
            *tiny("strategy=fedex", "checkpoint.keep=true", "compressor=topk"),
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    allowed = {".json", ".jsonl", ".yaml", ".safetensors", ".md", ".log"}
    assert {p.suffix for p in files} <= allowed, sorted(p.name for p in files)
    assert {p.name for p in files} >= {"checkpoint.safetensors", "adapter_model.safetensors"}
    for p in files:
        assert p.read_bytes()[:2] not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"), p


def test_the_code_never_unpickles():
    """No pickle in fedsim's own code; torch.load only with weights_only=True; numpy never
    allows pickles."""
    import re

    sources = [
        p
        for d in ("fedsim", "strategies", "benchmarks", "examples")
        for p in (ROOT / d).rglob("*.py")
    ]
    assert len(sources) > 30
    for path in sources:
        text = path.read_text(encoding="utf-8")
        assert not re.search(
            r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib)\b", text, re.M
        ), path
        assert "allow_pickle=True" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_a_damaged_checkpoint_or_cut_metrics_is_one_line_and_nothing_changes(
    tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "run"
    args = _cut_run(folder, monkeypatch)
    ckpt = folder / CHECKPOINT_FILE
    good = ckpt.read_bytes()
    for damage in ("checkpoint", "metrics"):
        if damage == "checkpoint":
            ckpt.write_bytes(good[: len(good) // 2])
            expected = "its checkpoint is damaged"
        else:
            ckpt.write_bytes(good)
            (folder / "metrics.jsonl").write_text('{"round": 0}\n')
            expected = "holds 1 complete lines"
        before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        for argv in ([*args, f"hydra.run.dir={folder}", "resume=true"], [f"resume={folder}"]):
            with pytest.raises(SystemExit) as info:
                main(argv)
            assert info.value.code == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and expected in err, err
            assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_resuming_through_the_api_checks_before_touching_the_folder(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    args = _cut_run(folder, monkeypatch)
    before = (folder / "metrics.jsonl").read_text()
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match="need engine=inline"):
        run([*args, "engine=ray"], output_dir=folder, resume=True)
    assert (folder / "metrics.jsonl").read_text() == before
    with pytest.raises(ValueError, match="needs the output_dir"):
        run(args, resume=True)


def test_resume_leaves_the_record_of_the_starting_command(tmp_path, monkeypatch, capsys):
    """A finished run is not touched at all (a stale checkpoint aside); a resumed run keeps
    the .hydra/ record of the command that started it (fedsim-report reads its overrides)."""
    done = tmp_path / "done"
    main([*tiny(), f"hydra.run.dir={done}"])
    hydra_files = {p: p.read_bytes() for p in (done / ".hydra").iterdir()}
    (done / CHECKPOINT_FILE).write_bytes(b"left by a kill after the summary")
    main([*tiny(), f"hydra.run.dir={done}", "resume=true"])
    assert "nothing to resume" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in (done / ".hydra").iterdir()} == hydra_files
    assert not (done / CHECKPOINT_FILE).exists()
    cut = tmp_path / "cut"
    args = tiny("sim.rounds=3")
    original = FederatedRun.checkpoint

    def die(self, r, arrays, t_start):
        original(self, r, arrays, t_start)
        if r == 1:
            raise SimulatedKill(r)

    monkeypatch.setattr(FederatedRun, "checkpoint", die)
    with pytest.raises(SimulatedKill):
        main([*args, f"hydra.run.dir={cut}"])
    monkeypatch.setattr(FederatedRun, "checkpoint", original)
    overrides = (cut / ".hydra" / "overrides.yaml").read_text()
    main([*args, f"hydra.run.dir={cut}", "resume=true"])
    assert (cut / ".hydra" / "overrides.yaml").read_text() == overrides
    assert json.loads((cut / "summary.json").read_text())["resumed_from"] == [1]


# ----------------------------------------------------------------------------- trust nothing


def _tensor_start(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def test_the_digest_finds_a_flipped_byte_an_edited_round_and_a_cut(tmp_path):
    """Format 3 checks its SHA-256 over the header and every tensor, in load() and header()."""
    path = tmp_path / CHECKPOINT_FILE
    tree = {"format": checkpoint.FORMAT, "round": 4, "w": np.arange(64, dtype=np.float32)}
    checkpoint.save(path, tree)
    good = path.read_bytes()
    assert checkpoint.header(path) == {"format": 3, "round": 4}
    flipped = bytearray(good)
    flipped[_tensor_start(good) + 37] ^= 0x01  # one bit of one float
    edited = good.replace(b'\\"round\\": 4', b'\\"round\\": 3', 1)
    assert edited != good
    renamed = good.replace(b"fedsim_sha256", b"fedsim_sha999", 1)
    damaged = {
        "flipped": (bytes(flipped), "does not match its SHA-256 digest"),
        "edited": (edited, "does not match its SHA-256 digest"),
        "cut": (good[: len(good) - 5], "cannot be read as a checkpoint"),
        "no digest": (renamed, "has no SHA-256 digest"),
    }
    for what, (data, message) in damaged.items():
        path.write_bytes(data)
        for read in (checkpoint.load, checkpoint.header):
            with pytest.raises(ValueError, match=message) as info:
                read(path)
            assert str(path) in str(info.value), what
    path.write_bytes(good)
    assert np.array_equal(checkpoint.load(path)["w"], tree["w"])


def test_the_digest_covers_names_dtypes_and_shapes():
    w = np.arange(6, dtype=np.float32)
    base = checkpoint.digest("{}", {"a": w})
    assert checkpoint.digest("{}", {"a": w.copy()}) == base
    assert checkpoint.digest("{}", {"b": w}) != base
    assert checkpoint.digest("{}", {"a": w.view(np.int32)}) != base
    assert checkpoint.digest("{}", {"a": w.reshape(2, 3)}) != base
    assert checkpoint.digest('{"x": 1}', {"a": w}) != base


@pytest.mark.parametrize("fmt", [1, 2])
def test_formats_written_before_the_digest_still_load(fmt, tmp_path):
    from safetensors.numpy import save_file

    text, tensors = checkpoint.encode_tree({"format": fmt, "round": 2, "w": np.ones(3)})
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path), metadata={"fedsim": text})
    assert checkpoint.header(path) == {"format": fmt, "round": 2}
    assert np.array_equal(checkpoint.load(path)["w"], np.ones(3))
    text3, _ = checkpoint.encode_tree({"format": 3, "round": 2, "w": np.ones(3)})
    save_file(tensors, str(path), metadata={"fedsim": text3})  # format 3 without its digest
    with pytest.raises(ValueError, match="has no SHA-256 digest"):
        checkpoint.load(path)


def test_the_stored_format_1_checkpoints_are_read_without_a_digest():
    stored = sorted((ROOT / "tests" / "golden").glob("*/stopped/" + CHECKPOINT_FILE))
    assert len(stored) == 3
    for path in stored:
        assert checkpoint.header(path)["format"] == 1
        assert checkpoint.load(path)["round"] >= 0


def test_a_folder_s_own_target_is_never_built(tmp_path, monkeypatch, capsys):
    """resume=<folder> builds only targets fedsim ships or --config-dir holds: a target found
    only in the folder (here one that creates a file when built) is refused before anything
    is built; the same target named by the user's --config-dir is built."""
    import yaml

    folder = tmp_path / "run"
    _cut_run(folder, monkeypatch)
    marker = tmp_path / "marker.txt"
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg["logger"] = {"_target_": "logging.FileHandler", "filename": str(marker)}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    tree = checkpoint.load(folder / CHECKPOINT_FILE)  # a forger rewrites the checkpoint too
    tree["config"]["logger"] = cfg["logger"]  # (its digest is a checksum, not a signature)
    checkpoint.save(folder / CHECKPOINT_FILE, tree)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as info:
        main([f"resume={folder}"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "logger._target_=logging.FileHandler: is neither a target fedsim ships" in err
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    mine = tmp_path / "mine" / "logger"
    mine.mkdir(parents=True)
    (mine / "file.yaml").write_text("_target_: logging.FileHandler\n")
    with pytest.raises(SystemExit):  # trusted, so built: a FileHandler is no fedsim sink
        main(["--config-dir", str(tmp_path / "mine"), f"resume={folder}"])
    assert "must build a fedsim.sinks.Sink" in capsys.readouterr().err
    assert marker.exists()


def test_the_trusted_targets_are_fedsim_s_own_and_the_config_dir_s(tmp_path):
    from fedsim import targets as resume

    shipped = resume.trusted_targets(None)
    assert {"fedsim.sinks.NoSink", "strategies.fedavg.FedAvg", "torch.optim.SGD"} <= shipped
    # conf/partition's targets before fedsim had its own: old runs resume
    for name in ("DirichletPartitioner", "IidPartitioner", "PathologicalPartitioner"):
        assert f"flwr_datasets.partitioner.{name}" in shipped
    assert "joblib.load" not in shipped and "builtins.exec" not in shipped
    (tmp_path / "strategy").mkdir()
    (tmp_path / "strategy" / "median.yaml").write_text("_target_: my_plugins.Median\n")
    assert resume.trusted_targets(str(tmp_path)) == shipped | {"my_plugins.Median"}
    cfg = {"a": {"_target_": "x.Y", "b": [{"_target_": "z.W"}]}}
    assert resume.targets(cfg) == [("a._target_", "x.Y"), ("a.b.0._target_", "z.W")]
