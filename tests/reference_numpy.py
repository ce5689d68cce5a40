"""Plain-numpy ground truth for the equations of docs/reference.md, sections 1-3.

Independent of ``fedsim`` and ``strategies`` on purpose: other tests compare the simulator against
these direct transcriptions. Everything is float64. Conventions: a base weight ``W0`` is ``m x n``
(out x in); LoRA ``A`` is ``r x n``, ``B`` is ``m x r`` and ``s = alpha / r`` with
``r = A.shape[0]`` (per-client ranks give per-client scales); LoRA-SB has ``B (m x r)``,
``R (r x r)``, ``A (r x n)`` and scale 1. Client weights ``p`` sum to 1. Byte counts are for one
client in one round, values float32 (4 bytes).

Run ``python tests/reference_numpy.py`` for the hand-worked self-checks at the bottom.
"""

from collections.abc import Sequence

import numpy as np

VALUE_BYTES = 4  # float32

Shape = tuple[int, int]


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _scale(A: np.ndarray, alpha: float) -> float:
    return float(alpha) / A.shape[0]


# ---------------------------------------------------------------- section 1: adapters


def lora_delta(B, A, alpha: float) -> np.ndarray:
    """LoRA's contribution to the effective weight, ``s B A`` with ``s = alpha / r`` (section 1).

    Parameters
    ----------
    B : (m, r) array
    A : (r, n) array
    alpha : LoRA alpha; ``r`` is ``A.shape[0]``.

    Returns
    -------
    (m, n) float64 array
    """
    B, A = _f64(B), _f64(A)
    return _scale(A, alpha) * (B @ A)


def lora_sb_delta(B, R, A) -> np.ndarray:
    """LoRA-SB's contribution to the effective weight, ``B R A`` (scale 1, section 1)."""
    return _f64(B) @ _f64(R) @ _f64(A)


def lora_sb_init_factors(G, eta1: float, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LoRA-SB initialisation, steps 2-3 (section 1): rank-r SVD of ``dW = -eta1 sign(G)``.

    ``B = U_r``, ``R = diag(S_r)``, ``A = V_r^T``. ``sign(0) = 0`` (Adam's first step for a zero
    gradient is zero). If ``r > min(m, n)`` the factors have rank ``min(m, n)``. Singular vectors
    are defined only up to sign/rotation: compare ``B R A``, not the factors.

    Returns
    -------
    B : (m, r) array, R : (r, r) array, A : (r, n) array
    """
    dW = -float(eta1) * np.sign(_f64(G))
    U, S, Vt = np.linalg.svd(dW, full_matrices=False)
    return U[:, :r], np.diag(S[:r]), Vt[:r, :]


def lora_sb_init_product(G, eta1: float, r: int) -> np.ndarray:
    """Best rank-r approximation ``U_r S_r V_r^T`` of ``dW = -eta1 sign(G)`` (section 1), m x n."""
    return lora_sb_delta(*lora_sb_init_factors(G, eta1, r))


# ---------------------------------------------------------------- section 2: aggregation


def ideal_update(client_deltas: Sequence, old_delta, p) -> np.ndarray:
    """Ideal update of a round, ``dW* = sum_i p_i (W_eff_i - W_eff)`` (section 2), one layer.

    The frozen ``W0`` cancels, so only adapter contributions are needed.

    Parameters
    ----------
    client_deltas : list of (m, n) arrays, client i's adapter contribution after training
    old_delta : (m, n) array, the global adapter contribution before the round
    p : (k,) weights summing to 1
    """
    old = _f64(old_delta)
    return sum(pi * (_f64(d) - old) for pi, d in zip(_f64(p), client_deltas))


def fedit(Bs: Sequence, As: Sequence, p) -> tuple[np.ndarray, np.ndarray]:
    """FedIT / FedAvg-LoRA server step, ``B = sum p_i B_i``, ``A = sum p_i A_i`` (section 2)."""
    p = _f64(p)
    B = sum(pi * _f64(b) for pi, b in zip(p, Bs))
    A = sum(pi * _f64(a) for pi, a in zip(p, As))
    return B, A


def fedex_residual(Bs: Sequence, As: Sequence, p, alpha: float, B_mean, A_mean) -> np.ndarray:
    """FedEx-LoRA residual folded into ``W0``: ``s (sum p_i B_i A_i - B A)`` (section 2), m x n.

    Uses the first form of the equation with the ``B``, ``A`` the server actually holds (possibly
    rounded), so ``residual + s B A`` is exactly the weighted mean of the clients' ``s B_i A_i``.
    Each term uses its own scale ``alpha / r`` (one common scale when ranks are equal).
    """
    mean_of_products = sum(pi * lora_delta(b, a, alpha) for pi, b, a in zip(_f64(p), Bs, As))
    return mean_of_products - lora_delta(B_mean, A_mean, alpha)


def flora_stack(Bs: Sequence, As: Sequence, p, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """FLoRA stacking (section 2): ``B = [B_1 ... B_k]``, ``A = [p_1 s_1 A_1; ...; p_k s_k A_k]``.

    ``s_i = alpha / r_i``; ranks may differ. Returns ``(m, sum r_i)`` and ``(sum r_i, n)`` arrays.
    """
    B = np.hstack([_f64(b) for b in Bs])
    A = np.vstack([pi * _scale(_f64(a), alpha) * _f64(a) for pi, a in zip(_f64(p), As)])
    return B, A


def flora_merge(Bs: Sequence, As: Sequence, p, alpha: float) -> np.ndarray:
    """FLoRA merge folded into ``W0``: the stacked product ``B A`` (section 2), m x n."""
    B, A = flora_stack(Bs, As, p, alpha)
    return B @ A


def fedsb(Rs: Sequence, p) -> np.ndarray:
    """Fed-SB server step, ``R = sum p_i R_i`` (section 2; ``p_i = 1/k`` in the reference)."""
    return sum(pi * _f64(R) for pi, R in zip(_f64(p), Rs))


# ---------------------------------------------------------------- section 3: what is counted


def aggregation_error(dW_agg: dict, dW_star: dict) -> float:
    """``max over layers ||dW_agg - dW*||_F / ||dW*||_F`` in float64 (section 3).

    Both dicts must have the same layer names. A layer with ``dW* = 0`` gives 0 if ``dW_agg`` is
    also 0 there and ``inf`` otherwise.
    """
    if set(dW_agg) != set(dW_star):
        raise ValueError(f"layer names differ: {sorted(set(dW_agg) ^ set(dW_star))}")
    errors = []
    for name, star in dW_star.items():
        num = np.linalg.norm(_f64(dW_agg[name]) - _f64(star))
        den = np.linalg.norm(_f64(star))
        errors.append(num / den if den > 0 else (0.0 if num == 0 else np.inf))
    return float(max(errors))


def bytes_fedit(layers: Sequence[Shape], r: int, head: int) -> int:
    """FedIT bytes each way (up = down): ``4 (sum r(m+n) + head)`` (sections 2-3)."""
    return VALUE_BYTES * (sum(r * (m + n) for m, n in layers) + head)


def bytes_ffa(layers: Sequence[Shape], r: int, head: int) -> int:
    """FFA-LoRA bytes each way: ``4 (sum m r + head)``; the seed-derived ``A`` costs 0."""
    return VALUE_BYTES * (sum(m * r for m, _ in layers) + head)


def bytes_fedsa(layers: Sequence[Shape], r: int, head: int) -> int:
    """FedSA-LoRA bytes each way: ``4 (sum r n + head)``; each ``B_i`` stays local."""
    return VALUE_BYTES * (sum(r * n for _, n in layers) + head)


def bytes_fedsb_up(layers: Sequence[Shape], r: int, head: int) -> int:
    """Fed-SB uplink: ``4 (sum r^2 + head)``."""
    return VALUE_BYTES * (len(layers) * r * r + head)


def bytes_fedsb_down(
    layers: Sequence[Shape], r: int, head: int, first_participation: bool, data_derived: bool
) -> int:
    """Fed-SB downlink: ``4 (sum r^2 + head)``, plus ``4 sum r(m+n)`` for the data-derived ``B``,
    ``A`` at a client's first participation (seed-derived factors cost 0)."""
    once = sum(r * (m + n) for m, n in layers) if first_participation and data_derived else 0
    return bytes_fedsb_up(layers, r, head) + VALUE_BYTES * once


def catch_up_values(m: int, n: int, missed_ranks: Sequence[int]) -> int:
    """Values to catch up on missed low-rank folds of one layer: ``min(sum rho_t (m+n), m n)``.

    Either the stacked factors of all missed folds or their dense sum, whichever is smaller
    (section 2). Nothing missed, or only rank-0 folds, costs 0.
    """
    stacked = sum(missed_ranks) * (m + n)
    return min(stacked, m * n)


def fedex_rank(k: int, r: int, m: int, n: int) -> int:
    """Rank bound of a FedEx residual over ``k`` clients: ``min((k-1) r, m, n)`` (section 2)."""
    return min((k - 1) * r, m, n)


def bytes_fedex_up(layers: Sequence[Shape], r: int, head: int) -> int:
    """FedEx-LoRA uplink, as FedIT: ``4 (sum r(m+n) + head)``."""
    return bytes_fedit(layers, r, head)


def bytes_fedex_down(layers: Sequence[Shape], r: int, head: int, missed: Sequence[int]) -> int:
    """FedEx-LoRA downlink: the averaged factors plus the residuals not yet received.

    ``4 (sum_layers [r(m+n) + catch_up_values(m, n, [fedex_rank(k_t, r, m, n)])] + head)``, where
    ``missed`` lists the number of aggregated clients ``k_t`` of each round whose residual the
    client lacks.
    """
    total = head
    for m, n in layers:
        ranks = [fedex_rank(k_t, r, m, n) for k_t in missed]
        total += r * (m + n) + catch_up_values(m, n, ranks)
    return VALUE_BYTES * total


def bytes_flora_up(layers: Sequence[Shape], r_i: int, head: int) -> int:
    """FLoRA uplink of a client of rank ``r_i``: ``4 (sum r_i (m+n) + head)``."""
    return bytes_fedit(layers, r_i, head)


def bytes_flora_down(layers: Sequence[Shape], head: int, missed: Sequence[int]) -> int:
    """FLoRA downlink: ``4 (sum_layers catch_up_values(m, n, missed) + head)``.

    ``missed`` lists, per merge the client lacks, that round's stacked rank ``sum_j r_j``. The
    re-initialised local adapters are seed-derived and cost 0.
    """
    return VALUE_BYTES * (sum(catch_up_values(m, n, missed) for m, n in layers) + head)


def simulate_catch_up(sampled_per_round: Sequence[Sequence[int]], num_clients: int) -> list[dict]:
    """Which folds each sampled client still lacks, round by round (section 3, catch-up).

    Round ``t`` (1-based) folds at its end if anyone was sampled in it; a sampled client receives
    every fold made before round ``t`` at the start of round ``t``.

    Returns
    -------
    list, one dict per round: ``{client: [1-based rounds whose fold it lacks]}`` for the clients
    sampled in that round.
    """
    received_up_to = [0] * num_clients  # client has every fold of rounds <= this
    folded: list[int] = []  # rounds that produced a fold, in order
    out = []
    for t, sampled in enumerate(sampled_per_round, start=1):
        out.append({c: [s for s in folded if s > received_up_to[c]] for c in sampled})
        for c in sampled:
            received_up_to[c] = t - 1
        if len(sampled) > 0:
            folded.append(t)
    return out


# ---------------------------------------------------------------- self-checks


def _self_check() -> None:
    close = np.testing.assert_allclose
    rng = np.random.default_rng(0)

    # lora_delta / lora_sb_delta: s B A with s = alpha / r = 2 / 1.
    close(lora_delta([[1.0], [2.0]], [[3.0, 4.0]], 2.0), [[6.0, 8.0], [12.0, 16.0]])
    close(lora_sb_delta([[1.0], [2.0]], [[0.5]], [[3.0, 4.0]]), [[1.5, 2.0], [3.0, 4.0]])

    # FedIT, 2x2: mean(B) mean(A) = 0.25 * ones but mean(B A) = 0.5 * I.
    B1, A1 = np.array([[1.0], [0.0]]), np.array([[1.0, 0.0]])
    B2, A2 = np.array([[0.0], [1.0]]), np.array([[0.0, 1.0]])
    p = np.array([0.5, 0.5])
    Bm, Am = fedit([B1, B2], [A1, A2], p)
    close(Bm, [[0.5], [0.5]])
    close(Am, [[0.5, 0.5]])
    close(lora_delta(Bm, Am, 1.0), 0.25 * np.ones((2, 2)))
    star = ideal_update([lora_delta(B1, A1, 1.0), lora_delta(B2, A2, 1.0)], np.zeros((2, 2)), p)
    close(star, 0.5 * np.eye(2))
    # error: ||[[.25,-.25],[-.25,.25]]|| / ||0.5 I|| = 0.5 / sqrt(0.5) = 1 / sqrt(2)
    err = aggregation_error({"l": lora_delta(Bm, Am, 1.0)}, {"l": star})
    close(err, 1 / np.sqrt(2))
    assert aggregation_error({"l": star, "o": 0 * star}, {"l": star, "o": 0 * star}) == 0.0
    close(ideal_update([np.ones((2, 2)), 3 * np.ones((2, 2))], np.ones((2, 2)), [0.75, 0.25]), 0.5)

    # FedEx, same example with alpha = 2 (s = 2): residual = 2 [[.25,-.25],[-.25,.25]], rank 1.
    res = fedex_residual([B1, B2], [A1, A2], p, 2.0, Bm, Am)
    close(res, [[0.5, -0.5], [-0.5, 0.5]])
    close(res, 2.0 * sum(pi * (b - Bm) @ (a - Am) for pi, b, a in zip(p, [B1, B2], [A1, A2])))
    assert np.linalg.matrix_rank(res) == 1 == fedex_rank(2, 1, 2, 2)

    # FedEx exact: W0 + residual + s B_mean A_mean = W0 + mean s B_i A_i, also with fp32 means.
    m, n, r, k, alpha = 8, 10, 2, 3, 16.0
    Bs = [rng.standard_normal((m, r)) for _ in range(k)]
    As = [rng.standard_normal((r, n)) for _ in range(k)]
    pk = rng.dirichlet(np.ones(k))
    W0 = rng.standard_normal((m, n))
    target = W0 + sum(pi * lora_delta(b, a, alpha) for pi, b, a in zip(pk, Bs, As))
    Bm, Am = fedit(Bs, As, pk)
    for Bx, Ax in [(Bm, Am), (Bm.astype(np.float32), Am.astype(np.float32))]:
        res = fedex_residual(Bs, As, pk, alpha, Bx, Ax)
        close(W0 + res + lora_delta(Bx, Ax, alpha), target, rtol=0, atol=1e-12)
    # rank(residual) <= (k - 1) r with exact means (generically equal).
    res = fedex_residual(Bs, As, pk, alpha, Bm, Am)
    assert np.linalg.matrix_rank(res) == fedex_rank(k, r, m, n) == 4

    # FLoRA, hand example: s = 2 / 1, p = 1/2 each -> merge = B1 A1 + B2 A2 = I.
    close(flora_merge([B1, B2], [A1, A2], p, 2.0), np.eye(2))
    # heterogeneous ranks: merge = sum p_i s_i B_i A_i, stacked shapes (m, sum r_i), (sum r_i, n).
    ranks = [1, 2, 4]
    Bs = [rng.standard_normal((m, ri)) for ri in ranks]
    As = [rng.standard_normal((ri, n)) for ri in ranks]
    Bst, Ast = flora_stack(Bs, As, pk, alpha)
    assert Bst.shape == (m, 7) and Ast.shape == (7, n)
    close(
        flora_merge(Bs, As, pk, alpha),
        sum(pi * alpha / ri * b @ a for pi, ri, b, a in zip(pk, ranks, Bs, As)),
    )
    star = ideal_update([lora_delta(b, a, alpha) for b, a in zip(Bs, As)], np.zeros((m, n)), pk)
    assert aggregation_error({"l": flora_merge(Bs, As, pk, alpha)}, {"l": star}) < 1e-12

    # Fed-SB: mean of R_i; exact because B, A are shared.
    Rs = [np.diag([1.0, 2.0]), np.array([[3.0, 1.0], [0.0, 0.0]])]
    close(fedsb(Rs, [0.5, 0.5]), [[2.0, 0.5], [0.0, 1.0]])

    # LoRA-SB init: sign([[1,1,0],[1,1,0]]) is rank 1, so the rank-1 truncation is exact.
    G = np.array([[2.0, 5.0, 0.0], [0.1, 3.0, 0.0]])
    close(lora_sb_init_product(G, 0.1, 1), [[-0.1, -0.1, 0.0], [-0.1, -0.1, 0.0]], atol=1e-15)
    G = rng.standard_normal((6, 5))
    B, R, A = lora_sb_init_factors(G, 0.01, 2)
    assert B.shape == (6, 2) and R.shape == (2, 2) and A.shape == (2, 5)
    close(B.T @ B, np.eye(2), atol=1e-12)
    prod = lora_sb_init_product(G, 0.01, 2)
    close(prod, B @ R @ A)
    assert np.linalg.matrix_rank(prod) == 2
    S = np.linalg.svd(-0.01 * np.sign(G), compute_uv=False)  # Eckart-Young residual
    close(np.linalg.norm(-0.01 * np.sign(G) - prod), np.sqrt(np.sum(S[2:] ** 2)))

    # catch_up_values: factors (sum rho)(m+n) or dense m n, whichever is smaller.
    assert catch_up_values(10, 10, []) == 0
    assert catch_up_values(10, 10, [0, 0]) == 0
    assert catch_up_values(10, 10, [1]) == 20
    assert catch_up_values(10, 10, [2, 3]) == 100  # min(5 * 20, 100)
    assert catch_up_values(4, 6, [1, 1, 1]) == 24  # min(30, 24)
    assert fedex_rank(1, 8, 100, 100) == 0 and fedex_rank(5, 8, 100, 20) == 20

    # byte formulas, one layer 4 x 6, r = 2, head 3.
    L = [(4, 6)]
    assert bytes_fedit(L, 2, 3) == 4 * (20 + 3) == bytes_fedex_up(L, 2, 3)
    assert bytes_ffa(L, 2, 3) == 4 * (8 + 3)
    assert bytes_fedsa(L, 2, 3) == 4 * (12 + 3)
    assert bytes_fedsb_up(L, 2, 3) == 4 * (4 + 3)
    assert bytes_fedsb_down(L, 2, 3, True, True) == 4 * (4 + 3 + 20)
    assert bytes_fedsb_down(L, 2, 3, True, False) == bytes_fedsb_down(L, 2, 3, False, True) == 28
    assert bytes_fedsb_up([(4, 6), (5, 5)], 3, 0) == 4 * 18
    assert bytes_flora_up(L, 3, 3) == 4 * (30 + 3)
    assert bytes_flora_down(L, 3, []) == 12
    assert bytes_flora_down(L, 3, [3, 2]) == 4 * (24 + 3)  # min(50, 24)
    assert bytes_flora_down(L, 3, [1]) == 4 * (10 + 3)

    # simulate_catch_up: 3 clients; round 3 samples nobody, so it folds nothing.
    plan = simulate_catch_up([[0, 1], [1], [], [0, 2], [0]], 3)
    assert plan == [{0: [], 1: []}, {1: [1]}, {}, {0: [1, 2], 2: [1, 2]}, {0: [4]}]
    # client 0 in round 4 lacks the residuals of round 1 (k=2, rank 2) and round 2 (k=1, rank 0).
    k_of_round = {1: 2, 2: 1, 4: 2}
    missed = [k_of_round[t] for t in plan[3][0]]
    assert bytes_fedex_down(L, 2, 3, missed) == 4 * (20 + 20 + 3)
    assert bytes_fedex_down(L, 2, 3, []) == bytes_fedit(L, 2, 3)
    assert bytes_fedex_down(L, 2, 3, [3, 3]) == 4 * (20 + 24 + 3)  # dense wins: min(80, 24)


if __name__ == "__main__":
    _self_check()
    print("reference_numpy: all self-checks passed")
