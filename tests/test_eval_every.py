"""``sim.eval_every`` and ``sim.eval_examples``: evaluating less often, or on a subset, changes
nothing but the evaluation fields of the rounds it skips."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data import eval_subset

EVAL_FIELDS = (
    "eval_loss",
    "eval_accuracy",
    "eval_loss_client_mean",
    "eval_accuracy_client_mean",
    "eval_accuracy_client_min",
)
#: what a skipped evaluation may change: its own fields and the times
FREE = {
    *EVAL_FIELDS,
    "val_loss",
    "val_accuracy",
    "clients_evaluated",
    "round_time_s",
    "eval_time_s",
    "eval_examples",
}


@pytest.mark.parametrize(
    "extra",
    [
        ("strategy=fedsb", "adapter=lora_sb"),
        ("strategy=fedavg", "adapter=lora", "compressor=topk", "feedback=ef21"),
        ("strategy=local",),
        ("strategy=fedavg", "adapter=lora", "sim.validation_fraction=0.3"),
    ],
    ids=["fedsb", "ef21", "local", "validation"],
)
def test_skipped_rounds_are_null_and_training_is_unchanged(run_tiny, extra):
    rounds = ["sim.rounds=5"]
    s1, every, _ = run_tiny(*extra, *rounds)
    s3, sparse, _ = run_tiny(*extra, *rounds, "sim.eval_every=3")
    assert [r["round"] for r in sparse] == [0, 1, 2, 3, 4, 5]
    evaluated = [r["round"] for r in sparse if r["clients_evaluated"] > 0]
    assert evaluated == [0, 3, 5]  # round 0, every third, and the last
    for a, b in zip(every, sparse, strict=True):
        for key in a.keys() - FREE:
            assert a[key] == b[key], (a["round"], key)
        if b["round"] in evaluated:
            assert all(a.get(k) == b.get(k) for k in (*EVAL_FIELDS, "val_accuracy"))
            assert b["eval_time_s"] > 0
        else:
            assert all(b[k] is None for k in EVAL_FIELDS)
            assert b["clients_evaluated"] == 0
            if "val_accuracy" in a:
                assert b["val_accuracy"] is None and a["val_accuracy"] is not None
    for key in ("final_eval_accuracy", "final_eval_loss", "adapter_sha256", "bytes_up_total"):
        assert s1.get(key) == s3.get(key), key


def test_eval_examples_subset_between_first_and_last_round(run_tiny):
    _, whole, _ = run_tiny("sim.rounds=3")
    _, sub, _ = run_tiny("sim.rounds=3", "sim.eval_examples=40")
    n = whole[0].get("eval_examples")
    assert n is None  # the field is only written when a subset is set
    assert [r["eval_examples"] for r in sub][1:-1] == [40, 40]
    assert sub[0]["eval_examples"] == sub[-1]["eval_examples"] > 40
    assert sub[-1]["eval_accuracy"] == whole[-1]["eval_accuracy"]
    assert sub[0]["eval_accuracy"] == whole[0]["eval_accuracy"]
    # between them the subset's accuracy is a multiple of 1/40
    for r in sub[1:-1]:
        assert abs(r["eval_accuracy"] * 40 - round(r["eval_accuracy"] * 40)) < 1e-9


def test_eval_subset_is_fixed_and_independent_of_the_seed():
    import torch

    test = {"x": torch.arange(100).reshape(100, 1), "y": torch.arange(100)}
    a, b = eval_subset(test, 10), eval_subset(test, 10)
    assert torch.equal(a["y"], b["y"]) and len(a["y"]) == 10
    assert len(np.unique(a["y"].numpy())) == 10
    assert torch.equal(a["x"][:, 0], a["y"])  # rows stay together
    assert eval_subset(test, "all") is None and eval_subset(test, 100) is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("sim.eval_every=0", "sim.eval_every=0: must be an integer >= 1"),
        ("sim.eval_examples=some", "sim.eval_examples=some: must be 'all' or a positive integer"),
        ("sim.eval_examples=0", "sim.eval_examples=0: must be 'all' or a positive integer"),
    ],
)
def test_bad_eval_settings_are_config_errors(override, message):
    from fedsim.config import check, compose
    from fedsim.errors import ConfigError

    cfg, _ = compose(["task=synthetic", override])
    with pytest.raises(ConfigError) as e:
        check(cfg)
    assert message in str(e.value)
