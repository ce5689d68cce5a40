"""The same configuration on the inline and the ray engine gives the same metrics, including
strategies whose clients keep state in their Context (folded bases, one-time broadcasts,
error-feedback memories, DP accountants) and LoRA-SB's set-up round (a custom message action)."""

from __future__ import annotations

import time

import pytest
import torch

from fedsim.errors import ConfigError
from fedsim.threads import usable_cpus
from tests.conftest import strip_timings, tiny

#: a local Ray may use at most the machine's CPUs (engine.num_cpus above them is refused)
CPUS = min(2, usable_cpus())


@pytest.mark.ray
@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["strategy=fedex", "sim.rounds=3"],
        ["strategy=fedsb", "adapter.init.source=clients", "sim.rounds=3"],
        ["compressor=topk", "feedback=ef21", "downlink=topk", "sim.rounds=3"],
        ["privacy=dpsgd", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0"],
        ["faults=mixed", "faults.crash_prob=0.3", "faults.corrupt_prob=0.3", "sim.rounds=3"],
        ["system=mobile", "sim.deadline=0.2", "sim.over_selection=0.5", "sim.rounds=3"],
    ],
    ids=["fedavg", "fedex", "fedsb-clients-init", "topk-ef21-ef21p", "dpsgd", "faults", "clock"],
)
def test_inline_and_ray_agree(run_tiny, extra):
    _, inline, _ = run_tiny(base=tiny("sim.clients_per_round=3", *extra))
    _, ray_rows, _ = run_tiny(
        base=tiny("sim.clients_per_round=3", "engine=ray", f"engine.num_cpus={CPUS}", *extra)
    )
    a, b = strip_timings(inline), strip_timings(ray_rows)
    assert len(a) == len(b) >= 3
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if key == "failures":  # Flower's Ray backend words a client's exception its way
                assert [(f["client"], f["kind"]) for f in x[key]] == [
                    (f["client"], f["kind"]) for f in y[key]
                ]
                for f, g in zip(x[key], y[key]):
                    assert f["reason"].split(": ", 1)[-1] in g["reason"]
            elif key.endswith("sim_time_s"):  # the clock is arithmetic: bit-identical
                assert x[key] == y[key], key
            elif isinstance(x[key], float):
                assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-6), key
            else:
                assert x[key] == y[key], key


def test_resources_up_to_the_machine_pass_and_one_more_is_refused():
    from fedsim.engines import BatchedEngine, InlineEngine, RayEngine

    sim = {"device": "cpu"}
    cpus = usable_cpus()
    RayEngine(num_cpus=cpus, num_threads=cpus).check(sim)
    InlineEngine(num_threads=cpus).check(sim)
    for engine, key in [
        (RayEngine(num_cpus=cpus + 1), "engine.num_cpus"),
        (RayEngine(num_threads=cpus + 1), "engine.num_threads"),
        (RayEngine(num_cpus_per_client=cpus + 1), "engine.num_cpus_per_client"),
        (RayEngine(num_gpus=torch.cuda.device_count() + 1), "engine.num_gpus"),
        (InlineEngine(num_threads=cpus + 1), "engine.num_threads"),
        (BatchedEngine(num_threads=cpus + 1), "engine.num_threads"),
    ]:
        with pytest.raises(ConfigError) as refused:
            engine.check(sim)
        assert refused.value.key == key
        assert str(refused.value).count("\n") == 0


def test_an_address_nobody_serves_is_refused_at_once(monkeypatch):
    from fedsim.engines.ray import check_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="nothing accepts connections at 127.0.0.1:1 "):
        check_address("127.0.0.1:1")
    assert time.monotonic() - t0 < 5
    with pytest.raises(ConfigError, match="must be null"):
        check_address("127.0.0.1:0")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # Ray lets it override any address
    with pytest.raises(ConfigError, match=r"127.0.0.1:1 \(from RAY_ADDRESS\)"):
        check_address("auto")


def test_the_loopback_switch_is_restored_after_a_local_run():
    """An attached run later in the same process must get the node's outward address."""
    from ray._private import ray_constants

    from fedsim.engines.ray import _on_loopback

    before = ray_constants.ENABLE_RAY_CLUSTER
    with _on_loopback(True):
        assert ray_constants.ENABLE_RAY_CLUSTER is False
    assert ray_constants.ENABLE_RAY_CLUSTER == before
    with _on_loopback(False):
        assert ray_constants.ENABLE_RAY_CLUSTER == before
