"""Every option in conf/ composes and builds; bad input is one line, exit status 2, no files."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedsim.cli import main
from fedsim.config import check, compose, expand_sweep
from fedsim.errors import ConfigError
from tests.conftest import ROOT, synthetic, tiny

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
def test_every_option_composes_and_builds(group, option, hf_task):
    if group in ("experiment", "sweep"):  # presets are added, not chosen; shrunk to tiny
        clients = ["sim.num_clients=8"] if option == "robust_vs_attacks" else []  # 1 attacker
        cfg, choices = compose(tiny(f"+{group}={option}", "sim.clients_per_round=2", *clients))
    elif (group, option) in (("task", "hf"), ("partition", "natural")):  # a task with groups
        cfg, choices = compose(tiny(*hf_task, f"{group}={option}"))
    elif (group, option) == ("system", "trace"):  # the example trace in examples/system/
        cfg, choices = compose(
            tiny(f"system.file={ROOT}/examples/system/trace.json", "system=trace")
        )
    elif group == "robust" or (group, option) == ("faults", "byzantine"):
        # Bulyan's f = 1 needs 7 clients per round, 20% attackers need 5 clients
        cfg, choices = compose(tiny(f"{group}={option}", "sim.num_clients=8"))
    else:
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
    (["strategy=fedsb", "adapter=lora"], "adapter=lora: strategy FedSB needs adapter=lora_sb"),
    (["strategy=ffa", "adapter=lora"], "adapter=lora: strategy FFA needs adapter=ffa"),
    (["strategy=fedsa", "adapter=lora_sb"], "adapter=lora_sb: strategy FedSA needs adapter=lora"),
    (["strategy=flora", "adapter.client_ranks=[16]"], "ranks must be at most adapter.r=8"),
    (["strategy=flora", "adapter.client_ranks=[0]"], "adapter.client_ranks=[0]: ranks must be"),
    (["strategy=flora", "adapter.client_ranks=3"], "adapter.client_ranks=3"),
    (["strategy=flora", "strategy.client_ranks=[2]"], "moved to adapter.client_ranks"),
    (["adapter=lora_sb", "adapter.r=64"], "adapter.r=64: must be at most min(m, n) = 32"),
    (["adapter=lora_sb", "adapter.init.examples=10000"], "the task's server split (512"),
    (["adapter=lora_sb", "adapter.init.method=svd"], "adapter.init.method=svd: must be gradient"),
    (["adapter=lora_sb", "adapter.init.source=public"], "adapter.init.source=public: must be"),
    (["adapter=lora_sb", "+adapter.init.foo=1"], "adapter.init.foo=1: unknown key"),
    (["strategy=fedsb", "task.server_examples=0"], "has no server split; use adapter.init"),
    (["strategy=centralized", "sim.min_clients=2"], "sim.min_clients=2: must be 1 with"),
    (["sim.aggregation_error=maybe"], "sim.aggregation_error=maybe: must be true or false"),
    (["compressor=qsgd", "feedback=ef21"], "feedback=ef21: error feedback needs a contractive"),
    (["compressor=randk", "feedback=ef14"], "compressor=randk is not"),
    (["compressor=compeft", "feedback=econtrol"], "feedback=econtrol: error feedback needs"),
    (["strategy=fedex", "compressor=topk", "feedback=ef21"], "strategy FedEx does not average"),
    (["strategy=flora", "compressor=topk", "feedback=ef14"], "trains fresh parameters every round"),
    (["strategy=local", "compressor=topk"], "strategy Local sends no updates to compress"),
    (["strategy=centralized", "downlink=topk"], "strategy Centralized sends no global arrays"),
    (["downlink=randk", "downlink.scaled=true"], "EF21-P needs a contractive compressor"),
    (["compressor=topk", "compressor.k=5"], "give exactly one of compressor.ratio and"),
    (["compressor=topk", "compressor.ratio=2"], "compressor.ratio=2: must be a number in (0, 1]"),
    (["compressor=qsgd", "compressor.bits=1"], "compressor.bits=1"),
    (["compressor=topk", "compressor.scope=rows"], "compressor.scope=rows: must be tensor or flat"),
    (["feedback=ef21", "feedback.lr_server=0"], "feedback.lr_server=0"),
    (["feedback.lr_server=0.5"], "feedback.lr_server=0.5: applies to compressed updates only"),
    (["privacy=dpsgd", "privacy.noise_multiplier=1.0"], "give exactly one of privacy.noise"),
    (["privacy=dpsgd", "privacy.clip_norm=0"], "privacy.clip_norm=0"),
    (["privacy=central", "strategy=fedex"], "strategy FedEx does not release one"),
    (["privacy=central", "strategy=flora"], "privacy=central: central DP noises an average"),
    (["privacy=central", "strategy=fedsa"], "strategy FedSA does not release one"),
    (["privacy=central", "compressor=qsgd"], "compressor=qsgd: under central DP a client's"),
    (["privacy=central", "compressor=randk"], "compressor=randk: under central DP a client's"),
    (["privacy=central", "compressor=compeft"], "this compressor can enlarge it"),
    (["privacy=dpsgd", "privacy.target_epsilon=-1"], "privacy.target_epsilon=-1"),
    (["export=maybe"], "export=maybe"),
    (["engine=warp"], "engine=warp: unknown option; allowed: batched, inline, ray"),
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
    (["sim.lr=-0.1"], "sim.lr=-0.1: must be a finite number > 0"),
    (["sim.lr=inf"], "sim.lr=inf: must be a finite number > 0"),
    (["sim.lr=nan"], "sim.lr=nan"),
    (["adapter.alpha=nan"], "adapter.alpha=nan"),
    (["task.separation=inf"], "task.separation=inf"),
    (["task.client_shift=nan"], "task.client_shift=nan"),
    (["adapter.target_modules=[1,2]"], "adapter.target_modules=[1, 2]: must be a list"),
    (["adapter.target_modules='[('"], "is not a valid regex"),
    (["adapter.target_modules=[classifier]"], "part of the task head"),
    (["optimizer.betas=[0.9]"], "optimizer (torch.optim.AdamW) rejected its settings"),
    (["sim.device=tpu"], "sim.device=tpu: must be cpu, cuda"),
    (["sim.round_timeout=0"], "sim.round_timeout=0"),
    (["hydra.run.dir=${oops}"], "hydra.run.dir"),
    (["sim.lr=fast"], "sim.lr=fast"),
    (["sim.batch_size=0"], "sim.batch_size=0"),
    (["sim.eval_clients=some"], "sim.eval_clients=some"),
    (["sim.nope=1"], "sim.nope=1: unknown key in sim"),
    (["+sim.nope=1"], "sim.nope=1: unknown key"),
    (["strategy.nope=1"], "strategy.nope=1: unknown key in strategy; allowed: weighted"),
    (["+strategy.nope=1"], "strategy.nope=1: unknown key; allowed: weighted"),
    (["strategy.weighted=maybe"], "strategy.weighted=maybe"),
    (["+privacy.clip_norm=1"], "privacy.clip_norm=1: unknown key; allowed: (none)"),
    (["partition.alpha=0"], "partition (fedsim.partitioners.DirichletPartitioner) rejected"),
    (["optimizer.weight_decay=-1"], "optimizer (torch.optim.AdamW) rejected"),
    (
        ["optimizer._target_=torch.optim.Nope"],
        "optimizer._target_=torch.optim.Nope: cannot be imported",
    ),
    (["engine=ray", "engine.num_cpus=0"], "engine.num_cpus=0"),
    (
        ["engine=ray", "engine.address=auto", "engine.num_cpus=2"],
        "engine.num_cpus=2: sizes a local Ray; the cluster at engine.address=auto",
    ),
    (["engine=ray", "engine.address=' '"], "engine.address= : must be null (a local Ray)"),
    (["engine=batched", "engine.group_size=0"], "engine.group_size=0: must be an integer >= 1"),
    (
        ["engine=batched", "strategy=flora", "adapter.client_ranks=[2,4]"],
        "adapter.client_ranks=[2, 4]: clients of different ranks cannot train in one batched",
    ),
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
    # fault injection, checkpoints, resume
    (["faults=explode"], "faults=explode: unknown option; allowed: byzantine, corrupt, crash"),
    (["faults=crash", "faults.crash_prob=2"], "faults.crash_prob=2: must be a number in [0, 1]"),
    (["faults.crash_prob=often"], "faults.crash_prob=often: must be a number"),
    (["faults.straggler_prob=-0.5"], "faults.straggler_prob=-0.5: must be a number in [0, 1]"),
    (["faults.delay=gamma"], "faults.delay=gamma: must be one of constant, uniform, exponential"),
    (["faults.delay_scale=0"], "faults.delay_scale=0: must be a finite number > 0"),
    (["faults.deadline=-1"], "faults.deadline=-1: must be a finite number > 0"),
    (["faults.corrupt_kinds=[zero]"], "faults.corrupt_kinds=['zero']: must be a non-empty list"),
    (["faults.corrupt_kinds=nan"], "faults.corrupt_kinds=nan: must be a list of strings or"),
    (["faults.corrupt_kinds=[1]"], "faults.corrupt_kinds=[1]: must be a non-empty list of"),
    (["+faults.flaky=1"], "faults.flaky=1: unknown key; allowed: alie_z, attack, boost, byzantine"),
    (["checkpoint.every=-1"], "checkpoint.every=-1: must be an integer >= 0"),
    (["checkpoint.every=often"], "checkpoint.every=often: must be an integer >= 0"),
    (["checkpoint.keep=maybe"], "checkpoint.keep=maybe: must be true or false"),
    (["+checkpoint.when=1"], "checkpoint.when=1: unknown key; allowed: every, keep"),
    (["resume=1"], "resume=1: is not a run folder"),
    (["resume=true", "engine=ray"], "resume=True: engine ray keeps client states in its own"),
    # the schema: each group's keys have the types of its class's signature
    (["task.hidden_dim=wide"], "task.hidden_dim=wide: must be an integer"),
    (["adapter.r=1.5"], "adapter.r=1.5: must be an integer"),
    (["strategy.weighted=2"], "strategy.weighted=2: must be true or false"),
    (["engine.num_threads=1.5"], "engine.num_threads=1.5: must be an integer or auto"),
    (["compressor=topk", "compressor.scope=1"], "compressor.scope=1: must be a string"),
    (["optimizer.eps=tiny"], "optimizer.eps=tiny: must be a number"),
    (["adapter.target_modules={a: 1}"], "adapter.target_modules={'a': 1}: must be a list of"),
]


@pytest.mark.parametrize("overrides, expected", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(overrides, expected, tmp_path, capsys):
    out = tmp_path / "run"
    run_dir = (
        [] if any(o.startswith("hydra.run.dir") for o in overrides) else [f"hydra.run.dir={out}"]
    )
    with pytest.raises(SystemExit) as exit_info:
        main(synthetic(*overrides, *run_dir))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fedsim: error: ")
    assert expected in err
    assert not out.exists()


def test_a_key_of_a_swept_option_must_itself_be_swept(tmp_path, capsys):
    """Hydra composes the fixed overrides before the jobs; fedsim says how to write it."""
    sweep = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    with pytest.raises(SystemExit) as exit_info:
        main(["-m", "feedback=ef21,econtrol", "feedback.compress_first=true", sweep])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "key=choice(value)" in err
    assert not (tmp_path / "sweep").exists()
    jobs = expand_sweep(["feedback=ef21,econtrol", "feedback.compress_first=choice(true)"])
    assert len(jobs) == 2 and all("feedback.compress_first=True" in j for j in jobs)


def test_bad_value_in_one_sweep_job_stops_the_sweep_before_any_job(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["-m", "sim.num_clients=4,0", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert exit_info.value.code == 2
    assert "sim.num_clients=0" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["sim.device=cuda"], "sim.device=cuda: CUDA is not available here"),
        (["engine=ray", "engine.num_gpus_per_client=1"], "engine.num_gpus_per_client=1"),
        (
            ["engine=ray", "engine.num_cpus=1", "engine.num_cpus_per_client=2"],
            "engine.num_cpus_per_client=2",
        ),
    ],
)
def test_resources_the_machine_lacks_are_config_errors(overrides, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(synthetic(*overrides, f"hydra.run.dir={tmp_path / 'r'}"))
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_unusable_folders_and_paths_are_config_errors(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        ([f"hydra.run.dir={a_file}/run"], f"cannot be created: {a_file} is a file"),
        ([f"hydra.run.dir={a_file}"], "is a file"),
        (["--config-dir", str(tmp_path / "nope")], "--config-dir="),
        (["-cp", str(tmp_path / "nope")], "--config-path="),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
        assert expected in capsys.readouterr().err, argv


def test_config_path_and_sweeper_params_are_validated_too(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["-cp", str(ROOT / "conf"), "sim.num_clients=0", f"hydra.run.dir={tmp_path / 'a'}"])
    assert "sim.num_clients=0" in capsys.readouterr().err
    presets = tmp_path / "presets" / "sweep"
    presets.mkdir(parents=True)
    (presets / "bad.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      sim.num_clients: 5,0\n"
    )
    with pytest.raises(SystemExit):
        main(
            [
                "-m",
                "--config-dir",
                str(tmp_path / "presets"),
                "+sweep=bad",
                f"hydra.sweep.dir={tmp_path / 'b'}",
            ]
        )
    assert "sim.num_clients=0" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_sweeper_params_from_the_config_expand_into_jobs():
    assert expand_sweep(["adapter.r=2,4"], {"sim.seed": "0,1", "adapter.r": "8,16"}) == [
        ["sim.seed=0", "adapter.r=2"],
        ["sim.seed=0", "adapter.r=4"],
        ["sim.seed=1", "adapter.r=2"],
        ["sim.seed=1", "adapter.r=4"],
    ]


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
        [sys.executable, "-m", "fedsim", *synthetic(*args), f"hydra.run.dir={tmp_path / 'r'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_docs_config_holds_the_current_schema_of_every_group():
    """docs/config.md's reference is what `python -m fedsim.schema` prints now."""
    from fedsim.schema import conf_folder, reference

    generated = reference(conf_folder())
    assert generated in (ROOT / "docs" / "config.md").read_text(), (
        "docs/config.md is stale: regenerate its reference with python -m fedsim.schema"
    )
    groups = {p.name for p in (ROOT / "conf").iterdir() if p.is_dir()} - {"experiment", "sweep"}
    assert all(f"### `{g}`" in generated for g in groups - {"__pycache__"})


@pytest.mark.parametrize(
    "hint, good, bad",
    [
        (int, [0, -3], [1.5, True, "1", None]),
        (float, [1, 0.5], [True, "x", None]),
        ("int | None", [None, 2], [2.0]),
        ("list[str]", [[], ["a"]], ["a", [1]]),
        ("dict", [{}], [[]]),
        ("typing.Literal['a', 'b']", ["a"], ["c"]),
    ],
)
def test_schema_types_admit_what_they_say(hint, good, bad):
    import typing  # noqa: F401  (used by the evaluated hints)

    from fedsim.schema import admits, describe

    h = eval(hint) if isinstance(hint, str) else hint
    assert all(admits(h, v) for v in good), describe(h)
    assert not any(admits(h, v) for v in bad), describe(h)


@pytest.mark.parametrize("task", ["news", "sentiment", "math"])
def test_task_presets_cap_their_clients_at_the_federation(task):
    """A preset's clients_per_round and eval_clients are at most sim.num_clients (a user's
    sim.num_clients=4 is not refused for values it never set); a user's own values still are."""
    cfg, _ = compose([f"task={task}", "sim.num_clients=1"])
    check(cfg)
    assert cfg["sim"]["clients_per_round"] == cfg["sim"]["eval_clients"] == 1
    cfg, _ = compose([f"task={task}"])
    assert cfg["sim"]["num_clients"] == 10 and cfg["sim"]["clients_per_round"] in (2, 5)
    with pytest.raises(ConfigError, match="sim.eval_clients=9"):
        check(compose([f"task={task}", "sim.num_clients=4", "sim.eval_clients=9"])[0])
