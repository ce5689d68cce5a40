"""Engines asked for more than the machine has, and Ray clusters that are not there: each is
refused before Ray (or anything else) starts, in one line naming the key, the value and, for
resources, what the machine has."""

from tests.bad_inputs import Case, small


def ray(*extra: str) -> tuple[str, ...]:
    return small("engine=ray", *extra)


CASES = [
    # resources larger than the machine (engine.num_cpus=100000 hung with 56 processes)
    Case("engine-num-cpus-huge", ray("engine.num_cpus=100000"), "engine.num_cpus=100000: must"),
    Case("engine-num-cpus-zero", ray("engine.num_cpus=0"), "engine.num_cpus=0: must"),
    Case(
        "engine-num-gpus-more-than-machine",
        ray("engine.num_gpus=1000"),
        "engine.num_gpus=1000: must be at most the",
    ),
    Case("engine-num-gpus-negative", ray("engine.num_gpus=-1"), "engine.num_gpus=-1: must"),
    Case(
        "engine-num-cpus-per-client-above-num-cpus",
        ray("engine.num_cpus=1", "engine.num_cpus_per_client=2"),
        "engine.num_cpus_per_client=2",
    ),
    Case(
        "engine-num-cpus-per-client-huge",
        ray("engine.num_cpus_per_client=100000"),
        "engine.num_cpus_per_client=100000",
    ),
    Case(
        "engine-num-cpus-per-client-zero",
        ray("engine.num_cpus_per_client=0"),
        "engine.num_cpus_per_client=0: must",
    ),
    Case(
        "engine-num-gpus-per-client-too-many",
        ray("engine.num_gpus_per_client=1000", "sim.device=cpu"),
        "engine.num_gpus_per_client=1000",
    ),
    # torch threads far above the CPUs (inline: 'libgomp: Out of memory' after the folder
    # was written)
    Case(
        "engine-inline-num-threads-huge",
        small("engine.num_threads=100000"),
        "engine.num_threads=100000: must be at most the",
    ),
    Case(
        "engine-batched-num-threads-huge",
        small("engine=batched", "engine.num_threads=100000"),
        "engine.num_threads=100000: must be at most the",
    ),
    Case(
        "engine-ray-num-threads-huge",
        ray("engine.num_threads=100000"),
        "engine.num_threads=100000: must be at most the",
    ),
    Case(
        "engine-batched-group-size-zero",
        small("engine=batched", "engine.group_size=0"),
        "engine.group_size=0: must",
    ),
    # clusters that are not there (auto: a ConnectionError traceback; an address nobody
    # serves: ray.init retried for more than 300 s)
    Case(
        "engine-address-auto-no-cluster",
        ray("engine.address=auto"),
        "engine.address=auto: ",
        alone=True,
    ),
    Case(
        "engine-address-unreachable",
        ray("engine.address=127.0.0.1:1"),
        "engine.address=127.0.0.1:1: nothing accepts connections",
    ),
    Case(
        "engine-address-unknown-host",
        ray("engine.address=no-such-host.invalid:6379"),
        "engine.address=no-such-host.invalid:6379: nothing accepts connections",
    ),
    Case(
        "engine-address-no-port",
        ray("engine.address=somewhere"),
        "engine.address=somewhere: must be null",
    ),
    Case(
        "engine-address-port-out-of-range",
        ray("engine.address=127.0.0.1:99999"),
        "engine.address=127.0.0.1:99999: must be null",
    ),
    Case(
        "engine-address-with-num-cpus",
        ray("engine.address=127.0.0.1:1", "engine.num_cpus=2"),
        "engine.num_cpus=2: sizes a local Ray",
    ),
    # a run that fails on Ray: Flower's engine logs a traceback per failed client; the terminal
    # gets one line, the log the rest
    Case(
        "engine-ray-run-fails-one-line",
        ray(
            "sim.num_clients=2",
            "sim.clients_per_round=2",
            "sim.rounds=1",
            "faults=crash",
            "faults.crash_prob=1.0",
        ),
        "fedsim: run failed: every round was skipped",
        code=1,
    ),
]
