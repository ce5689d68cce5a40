"""Plain-numpy ground truth for docs/reference.md, section 4 (compression, error feedback).

Independent of ``fedsim`` and ``strategies`` on purpose: other tests compare the simulator against
these direct transcriptions. Everything is float64 and works on flat 1-D vectors.

The update directions are inputs, not computed from ``x``: ``u_seq[t][i]`` is client ``i``'s
direction ``u_i`` in round ``t`` (indexable by client id: a list of length ``N`` or a dict), and
``sampled_seq[t]`` lists the clients sampled in round ``t``. A compressor is a callable
``compress(v, t, i) -> C(v)`` for client ``i`` in round ``t``. Every server step is
``x <- x - lr_server * lr * (aggregate)``; the ``run_*`` functions return the ``x`` after each
round (``x0`` excluded).

Run ``python tests/reference_feedback.py`` for the hand-worked self-checks at the bottom.
"""

from collections.abc import Callable, Sequence

import numpy as np

Compressor = Callable[[np.ndarray, int, int], np.ndarray]


def _f64(x) -> np.ndarray:
    return np.array(x, dtype=np.float64)  # a copy, so callers' arrays are never aliased


# ---------------------------------------------------------------- compressors


def topk(x, k: int) -> np.ndarray:
    """Top-K: keep the ``k`` entries of largest ``|x|``, zeros elsewhere (section 4).

    Contractive with ``a = k/d``: ``||topk(x) - x||^2 <= (1 - k/d) ||x||^2``. Ties are broken by the
    lower index (stable argsort of ``-|x|``). ``k <= 0`` gives zeros, ``k >= d`` gives ``x``.
    """
    x = _f64(x)
    out = np.zeros_like(x)
    k = max(0, min(int(k), x.size))
    keep = np.argsort(-np.abs(x), kind="stable")[:k]
    out[keep] = x[keep]
    return out


def _check_idx(x: np.ndarray, idx) -> np.ndarray:
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if np.unique(idx).size != idx.size:
        raise ValueError("Rand-K indices must be distinct")
    if idx.size and (idx.min() < 0 or idx.max() >= x.size):
        raise ValueError("Rand-K index out of range")
    return idx


def randk_unscaled(x, idx) -> np.ndarray:
    """Unscaled Rand-K: keep ``x`` at the (distinct) indices ``idx``, zeros elsewhere (section 4).

    With ``idx`` a uniform ``K``-subset it is contractive, ``a = K/d``.
    """
    x = _f64(x)
    idx = _check_idx(x, idx)
    out = np.zeros_like(x)
    out[idx] = x[idx]
    return out


def randk_scaled(x, idx) -> np.ndarray:
    """Scaled Rand-K: ``(d/K)`` times :func:`randk_unscaled`, ``K = len(idx)`` (section 4).

    With ``idx`` a uniform ``K``-subset it is unbiased with variance ``w = d/K - 1`` (not
    contractive). ``K = 0`` gives zeros.
    """
    x = _f64(x)
    idx = _check_idx(x, idx)
    out = np.zeros_like(x)
    if idx.size:
        out[idx] = x[idx] * (x.size / idx.size)
    return out


# ---------------------------------------------------------------- error feedback


def run_ef21_pp(
    u_seq: Sequence,
    sampled_seq: Sequence[Sequence[int]],
    num_clients: int,
    compress: Compressor,
    x0,
    lr: float,
    lr_server: float,
    compress_first: bool = False,
) -> tuple[list[np.ndarray], np.ndarray, dict[int, np.ndarray]]:
    """EF21 with partial participation (EF21-PP, section 4).

    Sampled client ``i``: ``c_i = C(u_i - g_i)``, ``g_i <- g_i + c_i``; server
    ``g <- g + (1/N) sum_received c_i``, ``x <- x - lr_server * lr * g``. Unsampled clients keep
    ``g_i``; the server always divides by ``N = num_clients``. ``g_i`` and ``g`` start at zero. A
    client's first message is ``c_i = u_i`` uncompressed (so ``g_i = u_i``, the paper's start),
    unless ``compress_first``, in which case it is ``C(u_i - 0)``.

    Returns
    -------
    xs : list of ``x`` after each round
    g : final server state
    g_i : dict client -> final client state, for all ``N`` clients (zeros if never sampled)
    """
    x = _f64(x0)
    g = np.zeros_like(x)
    gi = {i: np.zeros_like(x) for i in range(num_clients)}
    sent: set[int] = set()
    xs = []
    for t, sampled in enumerate(sampled_seq):
        total = np.zeros_like(x)
        for i in sampled:
            u = _f64(u_seq[t][i])
            if i not in sent and not compress_first:
                c = u
            else:
                c = _f64(compress(u - gi[i], t, i))
            sent.add(i)
            gi[i] = gi[i] + c
            total += c
        g = g + total / num_clients
        x = x - lr_server * lr * g
        xs.append(x.copy())
    return xs, g, gi


def run_ef14(
    u_seq: Sequence,
    sampled_seq: Sequence[Sequence[int]],
    compress: Compressor,
    x0,
    lr: float,
    lr_server: float,
    p_seq: Sequence,
) -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
    """Classic error feedback, EF14 (Seide et al. 2014, section 4).

    Sampled client ``i``: ``m_i = C(e_i + u_i)``, ``e_i <- e_i + u_i - m_i`` (``e_i`` starts at 0);
    server ``x <- x - lr_server * lr * sum_i p_i m_i``, ``p_seq[t]`` ordered as ``sampled_seq[t]``.

    Returns
    -------
    xs : list of ``x`` after each round
    e : dict client -> final residual, for the clients sampled at least once
    """
    x = _f64(x0)
    e: dict[int, np.ndarray] = {}
    xs = []
    for t, sampled in enumerate(sampled_seq):
        p = _f64(p_seq[t]).reshape(-1)
        assert p.size == len(sampled)
        agg = np.zeros_like(x)
        for pi, i in zip(p, sampled):
            u = _f64(u_seq[t][i])
            ei = e.get(i, np.zeros_like(x))
            m = _f64(compress(ei + u, t, i))
            e[i] = ei + u - m
            agg += pi * m
        x = x - lr_server * lr * agg
        xs.append(x.copy())
    return xs, e


def run_naive(
    u_seq: Sequence,
    sampled_seq: Sequence[Sequence[int]],
    compress: Compressor,
    x0,
    lr: float,
    lr_server: float,
    p_seq: Sequence,
) -> list[np.ndarray]:
    """Naive compression, no feedback (section 4): ``x <- x - lr_server * lr * sum_i p_i C(u_i)``.

    Returns the list of ``x`` after each round.
    """
    x = _f64(x0)
    xs = []
    for t, sampled in enumerate(sampled_seq):
        p = _f64(p_seq[t]).reshape(-1)
        assert p.size == len(sampled)
        agg = np.zeros_like(x)
        for pi, i in zip(p, sampled):
            agg += pi * _f64(compress(_f64(u_seq[t][i]), t, i))
        x = x - lr_server * lr * agg
        xs.append(x.copy())
    return xs


def run_econtrol(
    u_seq: Sequence,
    sampled_seq: Sequence[Sequence[int]],
    num_clients: int,
    compress: Compressor,
    x0,
    lr: float,
    lr_server: float,
    eta: float,
    compress_first: bool = False,
) -> tuple[list[np.ndarray], np.ndarray, dict[int, np.ndarray], dict[int, np.ndarray]]:
    """EControl (arXiv 2311.05645, section 4) with partial participation.

    Sampled client ``i``: ``D_i = C(eta e_i + u_i - h_i)``, ``e_i <- e_i + u_i - h_i - D_i``,
    ``h_i <- h_i + D_i``; server ``h <- h + (1/N) sum_received D_i``,
    ``x <- x - lr_server * lr * h``. All states start at zero. A client's first message is
    ``D_i = u_i`` uncompressed (``e_i`` stays 0, ``h_i = u_i``) unless ``compress_first``.

    Returns
    -------
    xs : list of ``x`` after each round
    h : final server state
    e_i, h_i : dicts client -> final client states, for all ``N`` clients
    """
    x = _f64(x0)
    h = np.zeros_like(x)
    e = {i: np.zeros_like(x) for i in range(num_clients)}
    hi = {i: np.zeros_like(x) for i in range(num_clients)}
    sent: set[int] = set()
    xs = []
    for t, sampled in enumerate(sampled_seq):
        total = np.zeros_like(x)
        for i in sampled:
            u = _f64(u_seq[t][i])
            if i not in sent and not compress_first:
                d = u
            else:
                d = _f64(compress(eta * e[i] + u - hi[i], t, i))
                e[i] = e[i] + u - hi[i] - d
            sent.add(i)
            hi[i] = hi[i] + d
            total += d
        h = h + total / num_clients
        x = x - lr_server * lr * h
        xs.append(x.copy())
    return xs, h, e, hi


# ---------------------------------------------------------------- self-checks


def _self_check() -> None:
    from itertools import combinations

    def close(a, b, tol=1e-12):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)

    rng = np.random.default_rng(0)

    # topk, by hand: |x| = [1, 3, 3, 2]; the two 3s win (indices 1, 2).
    close(topk([1.0, -3.0, 3.0, 2.0], 2), [0.0, -3.0, 3.0, 0.0])
    close(topk([2.0, 2.0, 2.0], 1), [2.0, 0.0, 0.0])  # all tied: lowest index
    close(topk([1.0, -2.0, 2.0, -2.0], 2), [0.0, -2.0, 2.0, 0.0])  # tie at the cut: 1 and 2
    close(topk([0.0, 0.0, 5.0], 2), [0.0, 0.0, 5.0])  # zero tie: index 0 kept, value 0
    close(topk([1.0, 2.0], 0), [0.0, 0.0])
    close(topk([1.0, 2.0], 5), [1.0, 2.0])
    # contraction ||topk(x) - x||^2 <= (1 - k/d) ||x||^2
    for _ in range(200):
        d = int(rng.integers(1, 40))
        k = int(rng.integers(0, d + 1))
        x = rng.standard_normal(d) * rng.exponential(size=d)
        assert np.sum((topk(x, k) - x) ** 2) <= (1 - k / d) * np.sum(x**2) + 1e-12

    # Rand-K by hand, and exact expectations over all K-subsets (d = 5, K = 2).
    x = np.array([1.0, -2.0, 3.0, 4.0, -5.0])
    close(randk_unscaled(x, [3, 0]), [1.0, 0, 0, 4.0, 0])
    close(randk_scaled(x, [3, 0]), [2.5, 0, 0, 10.0, 0])
    subsets = list(combinations(range(5), 2))
    close(np.mean([randk_scaled(x, s) for s in subsets], axis=0), x)  # unbiased
    var = np.mean([np.sum((randk_scaled(x, s) - x) ** 2) for s in subsets])
    close(var, (5 / 2 - 1) * np.sum(x**2))  # w = d/K - 1, attained exactly
    err = np.mean([np.sum((randk_unscaled(x, s) - x) ** 2) for s in subsets])
    close(err, (1 - 2 / 5) * np.sum(x**2))  # a = K/d, attained exactly

    ident = lambda v, t, i: np.array(v, dtype=np.float64)  # noqa: E731
    T, N, d = 6, 4, 7
    u_seq = [[rng.standard_normal(d) for _ in range(N)] for _ in range(T)]
    full = [list(range(N))] * T
    x0 = rng.standard_normal(d)
    lr = 0.3

    # EF21 / EControl with identity, everyone sampled, lr_server = 1: x_{t+1} = x_t - lr mean u.
    expect, x = [], x0.copy()
    for t in range(T):
        x = x - lr * np.mean(u_seq[t], axis=0)
        expect.append(x)
    for first in (False, True):
        xs, g, gi = run_ef21_pp(u_seq, full, N, ident, x0, lr, 1.0, compress_first=first)
        close(np.array(xs), np.array(expect))
        close(g, np.mean(u_seq[-1], axis=0))
        for i in range(N):
            close(gi[i], u_seq[-1][i])
        xs, h, e, hi = run_econtrol(u_seq, full, N, ident, x0, lr, 1.0, 0.5, compress_first=first)
        close(np.array(xs), np.array(expect))
        close(h, np.mean(u_seq[-1], axis=0))
        for i in range(N):
            close(e[i], 0.0)
            close(hi[i], u_seq[-1][i])

    # EF14 with identity equals naive (residual stays 0), here with partial participation.
    part = [[0, 2], [1], [3, 0, 1], [2], [0, 1, 2, 3], []]
    p_seq = [rng.dirichlet(np.ones(len(s))) if s else np.zeros(0) for s in part]
    xs14, e14 = run_ef14(u_seq, part, ident, x0, lr, 2.0, p_seq)
    close(np.array(xs14), np.array(run_naive(u_seq, part, ident, x0, lr, 2.0, p_seq)))
    for ei in e14.values():
        close(ei, 0.0)

    # EF21-PP by hand: N = 2, lr = 0.5, lr_server = 2, Top-1.
    top1 = lambda v, t, i: topk(v, 1)  # noqa: E731
    u = [{0: np.array([2.0, 0.0])}, {1: np.array([0.0, 4.0])}, {0: np.array([3.0, 1.0])}]
    xs, g, gi = run_ef21_pp(u, [[0], [1], [0]], 2, top1, np.zeros(2), 0.5, 2.0)
    # r0: c_0 = u_0 (first), g = [1, 0]; r1: c_1 = u_1 (first), g = [1, 2];
    # r2: c_0 = top1([3, 1] - [2, 0]) = top1([1, 1]) = [1, 0] -> g_0 = [3, 0], g = [1.5, 2].
    close(np.array(xs), [[-1.0, 0.0], [-2.0, -2.0], [-3.5, -4.0]])
    close(g, [1.5, 2.0])
    close(gi[0], [3.0, 0.0])
    close(gi[1], [0.0, 4.0])
    close(g, (gi[0] + gi[1]) / 2)  # g = (1/N) sum_i g_i is kept
    # compress_first: r0 sends top1([2, 0]) = [2, 0] as well, same result here; r1 top1([0, 4]).
    xs_cf, _, _ = run_ef21_pp(u, [[0], [1], [0]], 2, top1, np.zeros(2), 0.5, 2.0, True)
    close(np.array(xs_cf), np.array(xs))

    # EF14 by hand: one client, Top-1, p = 1, lr = lr_server = 1.
    u = [[np.array([1.0, 0.9])], [np.array([0.0, 0.5])]]
    xs, e = run_ef14(u, [[0], [0]], top1, np.zeros(2), 1.0, 1.0, [[1.0], [1.0]])
    # r0: m = [1, 0], e = [0, 0.9]; r1: m = top1([0, 1.4]) = [0, 1.4], e = [0, 0].
    close(np.array(xs), [[-1.0, 0.0], [-1.0, -1.4]])
    close(e[0], [0.0, 0.0])
    xs = run_naive(u, [[0], [0]], top1, np.zeros(2), 1.0, 1.0, [[1.0], [1.0]])
    close(np.array(xs), [[-1.0, 0.0], [-1.0, -0.5]])

    # EControl by hand: one client, Top-1, eta = 0.5, lr = lr_server = 1.
    u = [[np.array([1.0, 2.0])], [np.array([4.0, 2.5])], [np.array([4.0, 2.5])]]
    xs, h, e, hi = run_econtrol(u, [[0]] * 3, 1, top1, np.zeros(2), 1.0, 1.0, 0.5)
    # r0: D = u (first), h_0 = [1, 2], e = 0.
    # r1: D = top1([3, 0.5]) = [3, 0], e = [0, 0.5], h_0 = [4, 2].
    # r2: D = top1([0, 0.25] + [0, 0.5]) = [0, 0.75], e = [0, 0.5] + [0, 0.5] - [0, 0.75]
    #     = [0, 0.25], h_0 = [4, 2.75].
    close(np.array(xs), [[-1.0, -2.0], [-5.0, -4.0], [-9.0, -6.75]])
    close(h, [4.0, 2.75])
    close(hi[0], [4.0, 2.75])
    close(e[0], [0.0, 0.25])


if __name__ == "__main__":
    _self_check()
    print("reference_feedback: all self-checks passed")


def _clip(v: np.ndarray, bound: float) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v * (bound / norm) if norm > bound else v


def run_central_dp(
    u_seq: Sequence,
    sampled_seq: Sequence[Sequence[int]],
    num_clients: int,
    expected: float,
    compress: Compressor,
    x0,
    lr: float,
    lr_server: float,
    clip: float,
    noise_seq: Sequence[np.ndarray],
    method: str,
    eta: float = 1.0,
) -> list[np.ndarray]:
    """Compressed updates under central DP (docs/reference.md, 5.3: clip the message, a
    norm-non-increasing compressor, the first ``g_i`` privatised). ``clip`` bounds ``lr`` times
    a message's norm, so what a client compresses is clipped to ``b = clip / lr`` first;
    ``noise_seq[t]`` is round ``t``'s Gaussian noise (in the messages' units); the server clips
    each message again and sums: ``s = sum clip_b(m_i) + z``.

    ``naive``: ``m_i = C(clip_b(u_i))``; ``x <- x - lr_server * lr * s / expected``.
    ``ef14``: ``m_i = C(clip_b(e_i + u_i))``, ``e_i <- e_i + u_i - m_i``; the same step.
    ``ef21``: ``c_i = C(clip_b(u_i - g_i))`` (first message ``clip_b(u_i)``, dense),
    ``g_i <- g_i + c_i``; ``g <- g + s / N``, ``x <- x - lr_server * lr * g``.
    ``econtrol``: ``D_i = C(clip_b(eta e_i + u_i - h_i))``, ``e_i <- e_i + u_i - h_i - D_i``,
    ``h_i <- h_i + D_i`` (first message ``clip_b(u_i)``, dense, ``e_i`` stays 0); ``h`` as ``g``.
    """
    b = clip / lr
    x = _f64(x0)
    g = np.zeros_like(x)
    mem = {i: np.zeros_like(x) for i in range(num_clients)}  # g_i, h_i
    err = {i: np.zeros_like(x) for i in range(num_clients)}  # e_i (EF14, EControl)
    sent: set[int] = set()
    xs = []
    for t, sampled in enumerate(sampled_seq):
        s = _f64(noise_seq[t]).copy()
        for i in sampled:
            u = _f64(u_seq[t][i])
            if method == "naive":
                m = _f64(compress(_clip(u, b), t, i))
            elif method == "ef14":
                v = err[i] + u
                m = _f64(compress(_clip(v, b), t, i))
                err[i] = v - m
            elif i not in sent:
                m = _clip(u, b)
                mem[i] = mem[i] + m
            elif method == "ef21":
                m = _f64(compress(_clip(u - mem[i], b), t, i))
                mem[i] = mem[i] + m
            else:
                m = _f64(compress(_clip(eta * err[i] + u - mem[i], b), t, i))
                err[i] = err[i] + u - mem[i] - m
                mem[i] = mem[i] + m
            sent.add(i)
            s += _clip(m, b)
        if method in ("naive", "ef14"):
            x = x - lr_server * lr * s / expected
        else:
            g = g + s / num_clients
            x = x - lr_server * lr * g
        xs.append(x.copy())
    return xs
