"""The same configuration on the inline and the ray engine gives the same metrics, including
strategies whose clients keep state in their Context (folded bases, one-time broadcasts,
error-feedback memories, DP accountants) and LoRA-SB's set-up round (a custom message action)."""

from __future__ import annotations

import pytest

from tests.conftest import strip_timings, tiny


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
    ],
    ids=["fedavg", "fedex", "fedsb-clients-init", "topk-ef21-ef21p", "dpsgd", "faults"],
)
def test_inline_and_ray_agree(run_tiny, extra):
    _, inline, _ = run_tiny(base=tiny("sim.clients_per_round=3", *extra))
    _, ray_rows, _ = run_tiny(
        base=tiny("sim.clients_per_round=3", "engine=ray", "engine.num_cpus=2", *extra)
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
            elif isinstance(x[key], float):
                assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-6), key
            else:
                assert x[key] == y[key], key
