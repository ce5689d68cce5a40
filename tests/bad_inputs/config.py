"""Configuration mistakes on the command line, and runs started into a folder in use."""

from pathlib import Path

from tests.bad_inputs import LONG, STOPPED_ARGS, Case, small

ADAPTIVE = ("privacy=central", "privacy.adaptive_clip=true")


def _file_in_the_way(run: Path, tmp: Path) -> None:
    (tmp / "afile").write_text("not a folder\n")


CASES = [
    Case("config-rounds-negative", small("sim.rounds=-1"), "sim.rounds=-1"),
    Case("config-rounds-text", small("sim.rounds=many"), "sim.rounds"),
    Case("config-rounds-float", small("sim.rounds=2.5"), "sim.rounds"),
    Case("config-lr-negative", small("sim.lr=-0.1"), "sim.lr"),
    Case("config-batch-zero", small("sim.batch_size=0"), "sim.batch_size"),
    Case("config-steps-zero", small("sim.local_steps=0"), "sim.local_steps"),
    Case("config-clients-zero", small("sim.num_clients=0"), "sim.num_clients"),
    Case("config-per-round-too-many", small("sim.clients_per_round=9"), "sim.clients_per_round"),
    Case("config-min-clients-too-many", small("sim.min_clients=9"), "sim.min_clients"),
    Case("config-seed-overflow", small("sim.seed=99999999999999999999999"), "sim.seed"),
    Case("config-seed-negative", small("sim.seed=-1"), "sim.seed"),
    Case("config-seed-text", small("sim.seed=abc"), "sim.seed"),
    Case("config-device-unknown", small("sim.device=tpu"), "sim.device"),
    Case("config-device-cuda-absent", small("sim.device=cuda:7"), "sim.device"),
    Case("config-timeout-negative", small("sim.round_timeout=-5"), "sim.round_timeout"),
    Case("config-eval-clients", small("sim.eval_clients=some"), "sim.eval_clients"),
    Case("config-test-fraction", small("sim.client_test_fraction=1.5"), "sim.client_test_fraction"),
    Case("config-quiet-maybe", small("quiet=maybe"), "quiet"),
    Case("config-checkpoint-every", small("checkpoint.every=-1"), "checkpoint.every"),
    Case("config-unknown-key", small("sim.roundz=3"), "sim.roundz"),
    Case("config-unknown-option", small("strategy=fedavgg"), "fedavgg"),
    Case("config-unknown-group", small("+nothing=1"), "nothing"),
    Case("config-bad-syntax", small("sim.rounds=[1,"), "sim.rounds"),
    Case("config-blocklisted-target", small("logger._target_=os.system"), "blocklisted"),
    Case("config-missing-target", small("logger._target_=nowhere.Thing"), "nowhere.Thing"),
    Case("config-topk-ratio", small("compressor=topk", "compressor.ratio=2"), "compressor"),
    Case(
        "config-synthetic-pool",
        small("task.pool=lazy"),
        "task.pool=lazy: must be one of stored, on_demand",
    ),
    Case(
        "config-cast-dtype",
        small("compressor=cast", "compressor.dtype=float32"),
        "compressor.dtype=float32: must be float16 or bfloat16",
    ),
    # FedProx and SCAFFOLD (docs/strategies.md)
    Case("config-prox-mu-negative", small("sim.prox_mu=-0.1"), "sim.prox_mu=-0.1"),
    Case("config-prox-mu-text", small("sim.prox_mu=much"), "sim.prox_mu"),
    Case("config-prox-mu-local", small("strategy=local", "sim.prox_mu=0.1"), "sim.prox_mu=0.1"),
    Case("config-scaffold-local", small("control=scaffold", "strategy=local"), "control=scaffold"),
    Case(
        "config-scaffold-centralized",
        small("control=scaffold", "strategy=centralized"),
        "aggregates nothing",
    ),
    Case("config-scaffold-fedex", small("control=scaffold", "strategy=fedex"), "not a mean"),
    Case("config-scaffold-flora", small("control=scaffold", "strategy=flora"), "not a mean"),
    Case(
        "config-scaffold-ef21",
        small("control=scaffold", "compressor=topk", "feedback=ef21"),
        "feedback=ef21",
    ),
    Case(
        "config-scaffold-econtrol",
        small("control=scaffold", "compressor=topk", "feedback=econtrol"),
        "feedback=econtrol",
    ),
    Case(
        "config-scaffold-central-dp",
        small("control=scaffold", "privacy=central"),
        "privacy=central",
    ),
    Case("config-scaffold-lr-zero", small("control=scaffold", "control.lr_server=0"), "lr_server"),
    Case("config-control-unknown", small("control=scaffolding"), "scaffolding"),
    Case(
        "config-dp-noise-negative", small("privacy=dpsgd", "privacy.noise_multiplier=-1"), "noise"
    ),
    Case(
        "config-dp-adaptive-with-dpsgd",
        small("privacy=dpsgd", "privacy.adaptive_clip=true"),
        "unknown key in privacy; allowed: accountant, clip_norm, delta, grad_sample_mode, "
        "noise_multiplier, target_epsilon (a key of privacy=central)",
    ),
    Case(
        "config-key-of-other-options-only",
        small("robust.f=2"),
        "robust.f=2: unknown key in robust; it takes no keys (a key of robust=bulyan, "
        "robust=krum, robust=multikrum)",
    ),
    Case(
        "config-dp-accountant-unknown",
        small("privacy=central", "privacy.accountant=moments"),
        "privacy.accountant=moments: must be rdp or prv",
    ),
    Case(
        "config-dp-accountant-unknown-dpsgd",
        small("privacy=dpsgd", "privacy.accountant=gdp"),
        "privacy.accountant=gdp: must be rdp or prv",
    ),
    Case(
        "config-dp-quantile-one",
        small(*ADAPTIVE, "privacy.target_quantile=1"),
        "privacy.target_quantile=1: must be a number in (0, 1)",
    ),
    Case(
        "config-dp-quantile-zero",
        small(*ADAPTIVE, "privacy.target_quantile=0"),
        "privacy.target_quantile=0: must be a number in (0, 1)",
    ),
    Case(
        "config-dp-clip-lr-negative",
        small(*ADAPTIVE, "privacy.clip_lr=-0.2"),
        "privacy.clip_lr=-0.2: must be a finite number > 0",
    ),
    Case(
        "config-dp-count-stddev-negative",
        small(*ADAPTIVE, "privacy.count_stddev=-1"),
        "privacy.count_stddev=-1: must be a finite number >= 0",
    ),
    Case(
        "config-dp-count-stddev-too-small",
        small(*ADAPTIVE),  # 4 clients a round: sigma_b = 0.2, too little for epsilon 8
        "adaptive clipping needs noise_multiplier 0.7257 < 2 * count_stddev",
    ),
    Case(
        "config-dp-adaptive-not-bool",
        small("privacy=central", "privacy.adaptive_clip=maybe"),
        "privacy.adaptive_clip=maybe: must be true or false",
    ),
    Case(
        "config-dp-adaptive-compression",
        small(*ADAPTIVE, "privacy.count_stddev=5", "compressor=topk"),
        "adaptive clipping needs each update's norm before it is clipped",
    ),
    Case(
        "config-dp-prv-tiny-delta",
        small("privacy=central", "privacy.accountant=prv", "privacy.delta=1e-30"),
        "Floating point errors will dominate",
    ),
    Case(
        "config-dp-prv-tiny-delta-dpsgd",
        small("privacy=dpsgd", "privacy.accountant=prv", "privacy.delta=1e-30"),
        "use privacy.accountant=rdp or a larger privacy.delta",
    ),
    Case("config-partition-alpha", small("partition=dirichlet", "partition.alpha=-1"), "Alpha"),
    Case("config-sweep-one-bad-job", ("-m", *small("sim.rounds=1,-1")), "sim.rounds=-1"),
    Case("config-config-dir-missing", ("--config-dir", "{tmp}/nowhere", *small()), "nowhere"),
    Case(
        "config-run-dir-is-a-file",
        small("hydra.run.dir={tmp}/afile/run"),
        "is a file",
        prepare=_file_in_the_way,
    ),
    Case(
        "config-run-dir-holds-a-run",
        small("hydra.run.dir={run}"),
        "already holds a run",
        folder="finished",
    ),
    Case("config-resume-no-run", small("resume=true"), "no unfinished run"),
    Case("config-resume-missing-folder", ("resume={tmp}/nowhere",), "not a run folder"),
    Case(
        "config-resume-with-ray",
        (*STOPPED_ARGS, "hydra.run.dir={run}", "resume=true", "engine=ray"),
        "engine",
        folder="stopped",
    ),
    Case(
        "config-every-client-crashes",
        small("faults=crash", "faults.crash_prob=1.0"),
        "every round was skipped",
        code=1,
    ),
    # a second command into a folder whose run is going on
    Case(
        "config-second-run-same-folder",
        (*LONG, "hydra.run.dir={run}"),
        "already holds a run",
        beside=(*LONG, "hydra.run.dir={run}"),
    ),
    Case(
        "config-second-run-other-overrides",
        small("sim.rounds=5", "hydra.run.dir={run}"),
        "already holds a run",
        beside=(*LONG, "hydra.run.dir={run}"),
    ),
    Case(
        "config-resume-true-of-a-running-run",
        (*LONG, "hydra.run.dir={run}", "resume=true"),
        "another fedsim run is using this folder",
        beside=(*LONG, "hydra.run.dir={run}"),
    ),
    Case(
        "config-resume-folder-of-a-running-run",
        ("resume={run}",),
        "another fedsim run is using this folder",
        beside=(*LONG, "hydra.run.dir={run}"),
    ),
]
