"""The issue-20 baselines together: server optimisers, FedProx, SCAFFOLD, robust rules, Byzantine
clients, adaptive clipping and the PRV accountant, with each other and with the existing
mechanisms. Each combination either runs (the decisions pinned here against an independent
computation) or is refused in one line (the rows of tests/bad_inputs/)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.api import run
from fedsim.checkpoint import load
from tests.conftest import tiny

#: five clients, all in every round, uniform weights: client weights are 1/5 exactly
FIVE = ("sim.num_clients=5", "strategy.weighted=false")


def test_scaffold_with_a_server_optimiser_steps_once(run_tiny):
    """SCAFFOLD's eta_g and a server optimiser are one server step, not two: FedAvgM without
    momentum at rate 0.5 on SCAFFOLD's mean gives, bit for bit, SCAFFOLD's own step with
    eta_g = 0.5 (both are x + 0.5 (mean - x) in float64), and c is updated the same way."""
    _, own, _ = run_tiny("control=scaffold", "control.lr_server=0.5", "sim.rounds=3")
    _, opt, _ = run_tiny(
        "control=scaffold",
        "server_opt=avgm",
        "server_opt.momentum=0",
        "server_opt.lr=0.5",
        "sim.rounds=3",
    )
    assert [r["eval_loss"] for r in own] == [r["eval_loss"] for r in opt]
    _, plain, _ = run_tiny("control=scaffold", "sim.rounds=3")
    assert plain[-1]["eval_loss"] != own[-1]["eval_loss"]  # the rate mattered


def _checkpointed(tmp_path, name, *extra):
    args = tiny(*FIVE, "control=scaffold", "sim.rounds=1", "checkpoint.keep=true", *extra)
    run(args, output_dir=tmp_path / name)
    return load(tmp_path / name / "checkpoint.safetensors")


def test_a_sign_flipping_attacker_sends_the_variate_change_of_its_attacked_update(tmp_path):
    """Under SCAFFOLD the attacker's ``Delta c_i`` is computed from what it sends, ``r - d``:
    in round 1 (``c = 0``, uniform weights ``1/N``) flipping its update moves the global arrays
    by ``-2 d / N`` and ``c`` by ``+2 d / (N S)`` (``S``: the sum of its local rates), so
    ``x_honest - x_attacked = -S (c_honest - c_attacked)``."""
    honest = _checkpointed(tmp_path, "honest")
    attacked = _checkpointed(
        tmp_path, "attacked", "faults=byzantine", "faults.byzantine_fraction=0.2"
    )
    lr_sum = 3 * 0.01  # sim.local_steps * sim.lr, constant schedule
    c_h, c_a = honest["uplink"]["control"]["c"], attacked["uplink"]["control"]["c"]
    moved = 0.0
    for k, x_h in honest["arrays"].items():
        dx = np.asarray(x_h, np.float64) - np.asarray(attacked["arrays"][k], np.float64)
        dc = np.asarray(c_h[k], np.float64) - np.asarray(c_a[k], np.float64)
        np.testing.assert_allclose(dx, -lr_sum * dc, rtol=1e-4, atol=1e-7)
        moved = max(moved, float(np.abs(dc).max()))
    assert moved > 1e-3  # the attack changed c


@pytest.mark.parametrize(
    "extra",
    [
        # SCAFFOLD + a server optimiser + Byzantine clients (sign flipping, as sent)
        (
            "control=scaffold",
            "server_opt=adam",
            "faults=byzantine",
            "faults.byzantine_fraction=0.4",
        ),
        # a robust rule + a server optimiser + FedProx + ALIE (the server-side attack)
        (
            "robust=median",
            "server_opt=avgm",
            "sim.prox_mu=0.01",
            "faults=byzantine",
            "faults.byzantine_fraction=0.4",
            "faults.attack=alie",
        ),
    ],
    ids=["scaffold-adam-signflip", "median-avgm-prox-alie"],
)
@pytest.mark.parametrize("engine", ["inline", "batched"])
def test_the_stateful_baselines_together_resume_exactly(extra, engine, tmp_path, monkeypatch):
    from tests.test_checkpoint import interrupted_equals_uninterrupted

    args = tiny(
        *extra, f"engine={engine}", "sim.rounds=4", "sim.num_clients=5", "sim.clients_per_round=3"
    )
    _, resumed = interrupted_equals_uninterrupted(tmp_path, monkeypatch, args, at=2)
    assert resumed["resumed_from"] == [2]


#: allowed pairs the combination matrix ran, kept as a quick smoke (each a few seconds)
RUNS = {
    "adaptive-clip-adam": (
        "privacy=central",
        "privacy.adaptive_clip=true",
        "privacy.noise_multiplier=0.3",
        "privacy.target_epsilon=null",
        "server_opt=adam",
        "sim.num_clients=8",
    ),
    "byzantine-label-flip-dpsgd": (
        "faults=byzantine",
        "faults.byzantine_fraction=0.25",
        "faults.attack=label_flip",
        "privacy=dpsgd",
        "privacy.accountant=prv",
    ),
    "prv-central-byzantine": (
        "privacy=central",
        "privacy.accountant=prv",
        "faults=byzantine",
        "faults.byzantine_fraction=0.25",
    ),
    "krum-alie-fedsb": (
        "strategy=fedsb",
        "adapter=lora_sb",
        "robust=krum",
        "faults=byzantine",
        "faults.attack=alie",
        "sim.num_clients=5",
    ),
    "scaffold-prox-ef14-downlink": (
        "control=scaffold",
        "sim.prox_mu=0.01",
        "compressor=topk",
        "feedback=ef14",
        "downlink=topk",
    ),
    "median-fedsa-batched": ("strategy=fedsa", "robust=median", "engine=batched"),
}


@pytest.mark.parametrize("extra", RUNS.values(), ids=RUNS.keys())
def test_allowed_combinations_run(extra, run_tiny):
    summary, rows, _ = run_tiny(*extra)
    assert summary["status"] == "ok"
    assert summary["rounds_completed"] == 2
    for r in rows[1:]:  # FedSA's model is personal: the clients' own test splits
        loss = r["eval_loss"] if r.get("eval_loss") is not None else r["eval_loss_client_mean"]
        assert math.isfinite(loss)
