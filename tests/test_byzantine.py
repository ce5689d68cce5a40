"""Byzantine clients (fedsim.byzantine): a fixed seeded set of attackers; each attack against a
numpy computation of what the attacker sends; attacked updates pass the server's screening
(with and without compression); metrics.jsonl records them; a resumed run attacks the same."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fedsim.byzantine import (
    ATTACKS,
    Attack,
    ByzantineClients,
    alie_arrays,
    alie_z,
    flip_labels,
)
from fedsim.errors import ConfigError
from fedsim.faults import Faults
from fedsim.messages import ClientCall, ClientUpdate
from fedsim.uplink import Outgoing, Sending
from tests.conftest import tiny
from tests.test_checkpoint import interrupted_equals_uninterrupted


def test_the_attackers_are_a_fixed_seeded_set_of_floor_fraction_n():
    a = Attack(0.3, "sign_flip")
    assert a.count(10) == 3 and Attack(0.29, "scaled").count(100) == 29
    assert a.attackers(10, seed=0) == a.attackers(10, seed=0)  # the same set on every call
    sets = {tuple(a.attackers(10, seed=s)) for s in range(20)}
    assert len(sets) > 5 and all(len(s) == 3 and len(set(s)) == 3 for s in sets)
    assert all(0 <= c < 10 for s in sets for c in s)
    # the set does not depend on the attack nor on the round
    assert Attack(0.3, "alie").attackers(10, 0) == a.attackers(10, 0)
    assert Faults(byzantine_fraction=0.0).byzantine is None
    assert Faults(byzantine_fraction=0.2, attack="gaussian").byzantine.kind == "gaussian"


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"byzantine_fraction": 1.0}, "faults.byzantine_fraction"),
        ({"byzantine_fraction": -0.1}, "faults.byzantine_fraction"),
        ({"byzantine_fraction": 0.2, "attack": "flip"}, "faults.attack"),
        ({"byzantine_fraction": 0.2, "noise_std": 0.0}, "faults.noise_std"),
        ({"byzantine_fraction": 0.2, "alie_z": -1.0}, "faults.alie_z"),
    ],
)
def test_bad_byzantine_settings_name_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        Faults(**kw)


def _send(stage, client, reference, trained, server_round=3, seed=5):
    call = ClientCall(client=client, server_round=server_round, seed=seed, state=None)
    out = Outgoing(arrays={k: torch.from_numpy(v.copy()) for k, v in trained.items()})
    stage.send(Sending(call, {}, reference), out)
    return out.numpy()


def _arrays(seed):
    rng = np.random.default_rng(seed)
    return {
        "b": rng.normal(size=(4, 2)).astype(np.float32),
        "a": rng.normal(size=(2, 3)).astype(np.float32),
    }


@pytest.mark.parametrize("kind", ["sign_flip", "scaled", "gaussian"])
def test_each_update_attack_sends_what_numpy_computes(kind):
    attack = Attack(0.5, kind, boost=7.0, noise_std=3.0)
    stage = ByzantineClients(attack, num_clients=4, seed=5)
    bad, good = stage.attackers[0], next(c for c in range(4) if c not in stage.malicious)
    r, x = _arrays(1), _arrays(2)
    sent = _send(stage, bad, r, x)
    rng = np.random.default_rng([5, 3, bad, 67])  # the attacker's generator: (seed, round, client)
    for k in sorted(x):
        r64, d = r[k].astype(np.float64), x[k].astype(np.float64) - r[k]
        if kind == "sign_flip":
            want = r64 - d
        elif kind == "scaled":
            want = r64 + 7.0 * d
        else:
            want = r64 + 3.0 * rng.standard_normal(d.shape)
        assert sent[k].dtype == np.float32 and sent[k].shape == x[k].shape
        np.testing.assert_array_equal(sent[k], want.astype(np.float32))
    honest = _send(stage, good, r, x)
    assert all(np.array_equal(honest[k], x[k]) for k in x)  # an honest client is untouched


def test_alie_is_mu_minus_z_sigma_of_the_benign_replies():
    # z_max of Baruch et al. (2019): s = floor(n/2 + 1) - f, z = Phi^-1((n - s) / n)
    for n, f in [(10, 2), (10, 3), (50, 12), (7, 1), (5, 4)]:
        s = max(math.floor(n / 2 + 1) - f, 1)
        assert alie_z(n, f) == pytest.approx(stats.norm.ppf((n - s) / n), rel=1e-9)
    attack = Attack(0.5, "alie")
    stage = ByzantineClients(attack, num_clients=6, seed=0)
    updates = [ClientUpdate(c, _arrays(10 + c), 10, {}) for c in range(6)]
    out = stage.replace_alie(updates)
    benign = [u.arrays for u in updates if u.client not in stage.malicious]
    z = stats.norm.ppf((6 - max(math.floor(6 / 2 + 1) - 3, 1)) / 6)
    for u, o in zip(updates, out):
        for k in u.arrays:
            if u.client in stage.malicious:
                stack = np.stack([b[k].astype(np.float64) for b in benign])
                want = stack.mean(axis=0) - z * stack.std(axis=0)
                np.testing.assert_allclose(o.arrays[k], want.astype(np.float32), rtol=1e-6)
                assert o.arrays[k].dtype == np.float32
            else:
                assert o.arrays[k] is u.arrays[k]
    fixed = ByzantineClients(Attack(0.5, "alie", alie_z=1.5), 6, 0).replace_alie(updates)
    bad = next(o for o in fixed if o.client in stage.malicious)
    want = alie_arrays(benign, 1.5)
    np.testing.assert_allclose(bad.arrays["a"], want["a"].astype(np.float32), rtol=1e-6)


def test_label_flip_flips_the_attackers_labels_only():
    class Task:
        label_key, num_classes = "label", 4

    stage = ByzantineClients(Attack(0.5, "label_flip"), 4, seed=1, task=Task())
    data = {"x": torch.zeros(5, 2), "label": torch.tensor([0, 1, 2, 3, 1])}
    for client in range(4):
        call = ClientCall(client=client, server_round=1, seed=1, state=None)
        got = stage.train_data(call, data)
        want = [3, 2, 1, 0, 2] if client in stage.malicious else [0, 1, 2, 3, 1]
        assert got["label"].tolist() == want and got["x"] is data["x"]
    assert data["label"].tolist() == [0, 1, 2, 3, 1]  # the client's own data is not changed
    assert flip_labels(np.array([0, 9]), 10).tolist() == [9, 0]


# ----------------------------------------------------------------------------- runs

SIX = ("sim.num_clients=6", "sim.clients_per_round=4", "sim.rounds=3", "faults=byzantine")


@pytest.mark.parametrize("attack", ATTACKS)
def test_attacked_updates_pass_screening_and_are_recorded(attack, run_tiny):
    summary, rows, _ = run_tiny(*SIX, f"faults.attack={attack}", "faults.byzantine_fraction=0.34")
    attackers = summary["byzantine"]["attackers"]
    assert summary["status"] == "ok" and len(attackers) == 2  # floor(0.34 * 6)
    assert summary["byzantine"] == {"attack": attack, "fraction": 0.34, "attackers": attackers}
    assert summary["clients_failed_total"] == 0  # finite, well-shaped: nothing rejected
    seen = 0
    for row in rows[1:]:
        b = row["byzantine"]
        assert b["attack"] == attack and set(b["attackers"]) <= set(attackers)
        assert b["attackers_sampled"] == len(b["attackers"])
        seen += b["attackers_sampled"]
    assert seen > 0


@pytest.mark.parametrize("attack", ["sign_flip", "gaussian", "scaled"])
def test_attacks_apply_before_compression_and_still_decode(attack, run_tiny):
    summary, rows, _ = run_tiny(
        *SIX,
        f"faults.attack={attack}",
        "compressor=topk",
        "compressor.ratio=0.2",
        "feedback=ef14",
        "robust=median",
    )
    assert summary["status"] == "ok" and summary["clients_failed_total"] == 0
    assert sum(r["byzantine"]["attackers_sampled"] for r in rows[1:]) > 0


def test_a_resumed_run_attacks_with_the_same_clients(tmp_path, monkeypatch):
    args = tiny(*SIX, "sim.rounds=4", "faults.attack=gaussian", "robust=median")
    full, _ = interrupted_equals_uninterrupted(tmp_path, monkeypatch, args, at=2)
    assert full["byzantine"]["attackers"]


def test_label_flip_trains_the_same_on_the_batched_engine(run_tiny):
    args = (*SIX, "faults.attack=label_flip")
    _, inline, _ = run_tiny(*args)
    _, batched, _ = run_tiny(*args, "engine=batched", "engine.group_size=3")
    _, honest, _ = run_tiny("sim.num_clients=6", "sim.clients_per_round=4", "sim.rounds=3")
    for a, b in zip(inline, batched):
        for key in ("train_loss", "eval_loss"):
            if a[key] is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-5)
    assert inline[1]["train_loss"] != pytest.approx(honest[1]["train_loss"], rel=1e-3)
