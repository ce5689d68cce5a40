"""``privacy.accountant``: rdp (the default) or prv, both Opacus'. Epsilon equals Opacus' own
accountant fed the same steps; the noise for a target epsilon is searched with the chosen one;
PRV's failures are one line; an older run (saved before the key existed) still resumes."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant

from fedsim.errors import ConfigError
from fedsim.privacy import DPSGD, Accountant, CentralDP
from fedsim.privacy.accountant import AccountingError
from fedsim.resume import first_difference, with_later_keys
from tests.test_privacy import opacus_epsilon


def opacus_prv(history, delta):
    accountant = PRVAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def test_prv_history_equals_opacus_prv_accountant_step_by_step():
    history = [(1.1, 0.05, 30), (0.8, 0.2, 10), (1.1, 0.05, 5)]
    acc = Accountant([], "prv")
    for sigma, q, steps in history:
        for _ in range(steps):
            acc.step(sigma, q)
    got = Accountant.from_array(acc.to_array(), "prv").epsilon(1e-5)
    assert got == pytest.approx(opacus_prv(history, 1e-5), rel=1e-9)
    assert got < Accountant(history).epsilon(1e-5)  # tighter than RDP here


def test_prv_failures_are_one_line_and_no_noise_is_infinite():
    with pytest.raises(AccountingError, match="privacy.accountant=rdp") as e:
        Accountant([(1.0, 0.01, 1000)], "prv").epsilon(1e-30)
    assert "\n" not in str(e.value)
    assert math.isinf(Accountant([(0.0, 0.1, 3)], "prv").epsilon(1e-5))
    assert math.isinf(Accountant([(0.0, 0.1, 3)], "rdp").epsilon(1e-5))


def test_unknown_accountant_is_refused():
    with pytest.raises(ConfigError, match="privacy.accountant=moments: must be rdp or prv"):
        DPSGD(noise_multiplier=1.0, accountant="moments")
    with pytest.raises(ConfigError, match="privacy.accountant"):
        CentralDP(noise_multiplier=1.0, accountant="gdp")


def test_target_search_uses_the_chosen_accountant():
    """The same target: PRV's noise is smaller, and each accountant reports at most the
    target for its own noise (Opacus' search stops within 0.01 of it)."""
    for kind in ("rdp", "prv"):
        dp = CentralDP(target_epsilon=3.0, accountant=kind)
        dp.start(num_clients=100, clients_per_round=10, rounds=30)
        eps = Accountant([(dp.sigma_value, 0.1, 30)], kind).epsilon(1e-3)
        assert 2.98 <= eps <= 3.0
    rdp = CentralDP(target_epsilon=3.0)
    rdp.start(100, 10, 30)
    prv = CentralDP(target_epsilon=3.0, accountant="prv")
    prv.start(100, 10, 30)
    assert prv.sigma_value < rdp.sigma_value
    dpsgd = DPSGD(target_epsilon=3.0, accountant="prv")
    sigma = dpsgd.sigma_for(200, 16, 60)
    eps = Accountant([(sigma, 16 / 200, 60)], "prv").epsilon(1 / 2000)
    assert 2.98 <= eps <= 3.0 and sigma < DPSGD(target_epsilon=3.0).sigma_for(200, 16, 60)


def test_central_run_with_prv_reports_opacus_prv_every_round(run_tiny):
    summary, rows, _ = run_tiny(
        "privacy=central",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.5",
        "privacy.accountant=prv",
        "sim.num_clients=8",
        "sim.clients_per_round=2",
        "sim.rounds=3",
    )
    for t, row in enumerate(rows[1:], start=1):
        assert row["epsilon"] == pytest.approx(opacus_prv([(1.5, 2 / 8, t)], 1 / 80), rel=1e-9)
        assert row["epsilon"] < opacus_epsilon([(1.5, 2 / 8, t)], 1 / 80)
    assert "PRV accountant" in summary["privacy"]


def test_dpsgd_run_with_prv_reports_opacus_prv_per_client(run_tiny):
    summary, rows, _ = run_tiny(
        "privacy=dpsgd",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.0",
        "privacy.accountant=prv",
        "sim.rounds=2",
    )
    from fedsim.build import build_components
    from fedsim.config import compose
    from tests.conftest import tiny

    c = build_components(compose(tiny("privacy=dpsgd", "sim.rounds=2"))[0])
    want = []
    for client in range(4):  # every client in both rounds, 3 steps each
        n = c.data.client(client).num_train
        want.append(opacus_prv([(1.0, min(1.0, 16 / n), 6)], 1 / (10 * n)))
    assert summary["epsilon"] == pytest.approx(max(want), rel=1e-9)
    assert "PRV accountant" in summary["privacy"]


def test_a_run_saved_before_a_key_existed_compares_with_its_default():
    saved = {"privacy": {"_target_": "fedsim.privacy.CentralDP", "clip_norm": 1.0}}
    now = {"privacy": {**saved["privacy"], "accountant": "rdp", "adaptive_clip": False}}
    assert first_difference(now, with_later_keys(saved, now)) is None
    other = {"privacy": {**now["privacy"], "accountant": "prv"}}
    assert first_difference(other, with_later_keys(saved, other)) == (
        "privacy.accountant",
        "prv",
        "rdp",
    )
    moved = {"privacy": {"_target_": "fedsim.privacy.DPSGD", "accountant": "rdp"}}
    assert first_difference(moved, with_later_keys(saved, moved)) is not None


def _gaussian_epsilon(sigma: float, steps: int, delta: float, orders) -> float:
    """Epsilon of ``steps`` unsubsampled Gaussian steps (RDP ``alpha / (2 sigma^2)`` each),
    converted with Balle et al.'s (2020) bound, the minimum over ``orders``: in numpy."""
    import numpy as np

    a = np.asarray(orders, dtype=float)
    rdp = steps * a / (2 * sigma**2)
    eps = rdp + np.log1p(-1 / a) - (np.log(delta) + np.log(a)) / (a - 1)
    return float(np.min(eps))


def test_rdp_orders_reach_beyond_opacus_grid_for_small_epsilons(recwarn):
    from opacus.accountants import RDPAccountant

    from fedsim.privacy.accountant import EXTRA_ORDERS

    grid = [*RDPAccountant.DEFAULT_ALPHAS, *EXTRA_ORDERS]
    got = Accountant([(20.0, 1.0, 1)]).epsilon(1e-5)
    assert got == pytest.approx(_gaussian_epsilon(20.0, 1, 1e-5, grid), rel=1e-9)
    opacus_only = _gaussian_epsilon(20.0, 1, 1e-5, RDPAccountant.DEFAULT_ALPHAS)
    assert got < opacus_only * 0.99  # the optimum lies beyond order 63
    # where the optimum is inside Opacus' grid, nothing changes
    mid = Accountant([(1.0, 1.0, 3)]).epsilon(1e-5)
    assert mid == pytest.approx(_gaussian_epsilon(1.0, 3, 1e-5, RDPAccountant.DEFAULT_ALPHAS))
    assert not [w for w in recwarn if "Optimal order" in str(w.message)]
