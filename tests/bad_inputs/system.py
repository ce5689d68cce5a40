"""The simulated clock (``system``, ``sim.deadline``, ``sim.over_selection``): bad profiles,
bad traces, and what a clock cannot run with."""

import json
from pathlib import Path

from tests.bad_inputs import Case, small

MOBILE = ("system=mobile",)
BUFFERED = (*MOBILE, "sim.async_buffer=2")


def _trace(records):
    def write(run: Path, tmp: Path) -> None:
        (tmp / "trace.json").write_text(json.dumps(records))

    return write


GOOD = {"gflops": 1.0, "communication": 1000.0}
FOUR = {str(c): dict(GOOD) for c in range(4)}  # the small run has 4 clients
TRACE = ("system=trace", "system.file={tmp}/trace.json")

CASES = [
    Case("system-unknown", small("system=phone"), "system=phone"),
    Case("system-deadline-no-clock", small("sim.deadline=5"), "needs a simulated clock"),
    Case("system-over-no-clock", small("sim.over_selection=0.3"), "needs a simulated clock"),
    Case("system-deadline-negative", small(*MOBILE, "sim.deadline=-1"), "sim.deadline=-1"),
    Case("system-over-negative", small(*MOBILE, "sim.over_selection=-0.1"), "[0, 10]"),
    Case("system-gflops-zero", small(*MOBILE, "system.gflops=0"), "system.gflops=0"),
    Case("system-offline-negative", small(*MOBILE, "system.offline_s=-1"), "system.offline_s"),
    Case("system-target-above-one", small(*MOBILE, "system.targets=[1.5]"), "(0, 1]"),
    Case("system-unknown-key", small(*MOBILE, "+system.speed=3"), "system.speed"),
    Case(
        "system-tiers-fractions",
        small("system=tiers", "system.tiers.0.fraction=0.9"),
        "fractions must sum to 1",
    ),
    Case(
        "system-faults-deadline",
        small(*MOBILE, "faults=stragglers"),
        "use faults.deadline=null sim.deadline=10",
    ),
    Case("system-central-dp", small(*MOBILE, "privacy=central"), "Poisson sampling"),
    Case(
        "system-centralized",
        small("system=datacenter", "strategy=centralized"),
        "strategy=centralized trains one model",
    ),
    Case("system-trace-no-file", small("system=trace"), "system.file=???"),
    Case("system-trace-missing-file", small(*TRACE), "no such file"),
    Case(
        "system-trace-missing-clients",
        small(*TRACE),
        "has no record for 2 of the sim.num_clients=4 clients (ids 2, 3)",
        prepare=_trace({"0": GOOD, "1": GOOD}),
    ),
    Case(
        "system-trace-negative-speed",
        small(*TRACE),
        "gflops=-2: must be a finite number > 0",
        prepare=_trace({**FOUR, "2": {"gflops": -2, "communication": 10}}),
    ),
    Case(
        "system-trace-unsorted",
        small(*TRACE),
        "intervals must be sorted",
        prepare=_trace({**FOUR, "1": {**GOOD, "active": [50, 0], "inactive": [60, 10]}}),
    ),
    Case("fedbuff-no-clock", small("sim.async_buffer=2"), "needs a simulated clock"),
    Case("fedbuff-buffer-too-big", small(*BUFFERED[:1], "sim.async_buffer=9"), "from 1 to"),
    Case("fedbuff-concurrency-alone", small(*MOBILE, "sim.concurrency=2"), "set sim.async_buffer"),
    Case("fedbuff-concurrency-zero", small(*BUFFERED, "sim.concurrency=0"), "sim.concurrency=0"),
    Case("fedbuff-exponent-negative", small(*BUFFERED, "sim.staleness_exponent=-1"), "[0, 10]"),
    Case("fedbuff-deadline", small(*BUFFERED, "sim.deadline=5"), "synchronous rounds"),
    Case("fedbuff-fedex", small(*BUFFERED, "strategy=fedex"), "use fedavg, fedsa, fedsb or ffa"),
    Case(
        "fedbuff-ef21-weighted",
        small(*BUFFERED, "compressor=topk", "feedback=ef21"),
        "set sim.staleness_exponent=0",
    ),
    Case("fedbuff-scaffold", small(*BUFFERED, "control=scaffold"), "SCAFFOLD's variates"),
    Case("fedbuff-downlink", small(*BUFFERED, "downlink=topk"), "turn downlink off"),
    Case(
        "fedbuff-central-dp",
        small(*BUFFERED, "system.offline_s=0", "privacy=central"),
        "turn privacy=central off",
    ),
    Case(
        "system-trace-not-json",
        small(*TRACE),
        "is not valid JSON",
        prepare=lambda run, tmp: (tmp / "trace.json").write_text("{client 0: fast}"),
    ),
]
