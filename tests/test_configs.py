"""Every option in conf/ composes and builds; bad input is one line, exit status 2, no files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.cli import main
from fedsim.config import check, compose, expand_sweep
from tests.conftest import ROOT, tiny

GROUPS = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((ROOT / "conf" / g).glob("*.yaml"))]


def test_every_group_has_options():
    assert set(GROUPS) >= {
        "task",
        "adapter",
        "strategy",
        "partition",
        "engine",
        "optimizer",
        "schedule",
        "compressor",
        "feedback",
        "privacy",
        "faults",
    }


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_builds(group, option):
    cfg, choices = compose(tiny(f"{group}={option}"))
    assert choices[group] == option
    check(cfg)  # validates, instantiates every _target_ and builds the adapted model


def test_sweep_expansion():
    jobs = expand_sweep(["sim.num_clients=10,50", "adapter.r=4,8", "sim.rounds=2"])
    assert jobs == [
        ["sim.num_clients=10", "adapter.r=4", "sim.rounds=2"],
        ["sim.num_clients=10", "adapter.r=8", "sim.rounds=2"],
        ["sim.num_clients=50", "adapter.r=4", "sim.rounds=2"],
        ["sim.num_clients=50", "adapter.r=8", "sim.rounds=2"],
    ]


BAD = [
    # (overrides, text the one line must contain)
    (["engine=warp"], "engine=warp: unknown option; allowed: inline, ray"),
    (["strategy=nope"], "strategy=nope: unknown option"),
    (["sim.num_clients=0"], "sim.num_clients=0: must be an integer >= 1"),
    (["sim.num_clients=-5"], "sim.num_clients=-5"),
    (
        ["sim.clients_per_round=11"],
        "sim.clients_per_round=11: must be an integer from 1 to sim.num_clients (10)",
    ),
    (["sim.clients_per_round=0"], "sim.clients_per_round=0"),
    (["sim.min_clients=20"], "sim.min_clients=20"),
    (["adapter.r=0"], "adapter.r=0: must be an integer >= 1"),
    (["adapter.r=-4"], "adapter.r=-4"),
    (["adapter.alpha=0"], "adapter.alpha=0"),
    (["adapter.dropout=1.5"], "adapter.dropout=1.5"),
    (["adapter.target_modules=[nope]"], "adapter.target_modules"),
    (["sim.rounds=0"], "sim.rounds=0"),
    (["sim.lr=-0.1"], "sim.lr=-0.1: must be a number > 0"),
    (["sim.lr=fast"], "sim.lr=fast"),
    (["sim.batch_size=0"], "sim.batch_size=0"),
    (["sim.eval_clients=some"], "sim.eval_clients=some"),
    (["sim.nope=1"], "sim.nope=1: unknown key in sim"),
    (["+sim.nope=1"], "sim.nope=1: unknown key"),
    (["strategy.nope=1"], "strategy.nope=1: unknown key in strategy; allowed: weighted"),
    (["+strategy.nope=1"], "strategy.nope=1: unknown key; allowed: weighted"),
    (["strategy.weighted=maybe"], "strategy.weighted=maybe"),
    (["partition.alpha=0"], "partition (flwr_datasets.partitioner.DirichletPartitioner) rejected"),
    (["optimizer.weight_decay=-1"], "optimizer (torch.optim.AdamW) rejected"),
    (
        ["optimizer._target_=torch.optim.Nope"],
        "optimizer._target_=torch.optim.Nope: cannot be imported",
    ),
    (["engine=ray", "engine.num_cpus=0"], "engine.num_cpus=0"),
    (["schedule=cosine", "schedule.final_factor=3"], "schedule.final_factor=3"),
    (["task.hidden_dim=0"], "task.hidden_dim=0"),
    (["task.signal_dim=64"], "task.signal_dim=64"),
    (["sim.rounds=1,2"], "Ambiguous value for argument 'sim.rounds=1,2'"),
    (["sim.rounds="], "sim.rounds"),
    (
        ["partition=pathological", "partition.num_classes_per_partition=20"],
        "partition (PathologicalPartitioner) rejected its settings",
    ),
    (["partition.min_partition_size=300"], "partition (DirichletPartitioner) rejected"),
    (
        ["partition=iid", "sim.num_clients=300", "task.examples_per_client=1"],
        "get fewer than 2 examples",
    ),
]


@pytest.mark.parametrize("overrides, expected", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(overrides, expected, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main([*overrides, f"hydra.run.dir={out}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fedsim: error: ")
    assert expected in err
    assert not out.exists()


def test_bad_value_in_one_sweep_job_stops_the_sweep_before_any_job(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["-m", "sim.num_clients=4,0", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert exit_info.value.code == 2
    assert "sim.num_clients=0" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_an_existing_run_folder_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "done"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"round": 0}\n')
    with pytest.raises(SystemExit) as exit_info:
        main([f"hydra.run.dir={out}"])
    assert exit_info.value.code == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == '{"round": 0}\n'


@pytest.mark.parametrize("args", [["engine=nope"], ["sim.clients_per_round=50"]])
def test_command_line_exit_status_and_no_traceback(args, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", *args, f"hydra.run.dir={tmp_path / 'r'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_packaged_config_matches_the_repository():
    import fedsim.conf

    assert (
        Path(fedsim.conf.__file__).parent.resolve() == (ROOT / "conf").resolve()
        or (Path(fedsim.conf.__file__).parent / "config.yaml").read_text()
        == (ROOT / "conf" / "config.yaml").read_text()
    )
