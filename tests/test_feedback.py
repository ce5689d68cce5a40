"""Error feedback against a direct numpy transcription of the methods' equations
(``tests/reference_feedback.py``): several rounds, partial participation, float64, Top-K with
its lower-index tie-break; the simulator's client and server halves must agree to 1e-12."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import RecordDict

import tests.reference_feedback as ref
from fedsim.codec import Codec
from fedsim.compression import TopK
from fedsim.feedback import EF14, EF21, EControl, Naive

N, D, ROUNDS, LR, LR_SERVER = 5, 50, 6, 0.5, 0.7
K = 5  # TopK(ratio=0.1) of 50


def scenario(seed=0):
    rng = np.random.default_rng(seed)
    u_seq = [[rng.normal(size=D) for _ in range(N)] for _ in range(ROUNDS)]
    sampled = [sorted(rng.choice(N, size=3, replace=False).tolist()) for _ in range(ROUNDS)]
    sampled[2] = [0, 1, 2, 3, 4]
    p_seq = [np.array([1.0 + c for c in s]) / sum(1.0 + c for c in s) for s in sampled]
    return u_seq, sampled, p_seq, rng.normal(size=D)


def simulate(feedback, u_seq, sampled, p_seq, x0):
    """fedsim's halves: clients encode, the server decodes and steps (or averages estimates)."""
    codec = Codec(TopK(ratio=0.1), feedback, LR, seed=0)
    states = {c: RecordDict() for c in range(N)}
    absorbed = dict.fromkeys(range(N), 0)  # the server aggregates every message here
    x, xs = {"w": x0.copy()}, []
    for t, clients in enumerate(sampled, start=1):
        decoded = []
        for c in clients:
            trained = {"w": x["w"] - LR * u_seq[t - 1][c]}  # so that u_i = (x - x_i) / lr
            payload = codec.client_encode(x, trained, c, t, states[c], absorbed[c])
            decoded.append(codec.decode(payload, x, c, t))
            absorbed[c] = t
        if feedback.replaces_aggregation:
            x = codec.step(x, decoded, N)
        else:  # the strategy (FedAvg) averages the server's estimates with weights p
            estimates = [codec.estimate(x, d) for d in decoded]
            x = {"w": sum(p * e["w"] for p, e in zip(p_seq[t - 1], estimates))}
        xs.append(x["w"].copy())
    return xs, states


def compress(v, t, i):
    return ref.topk(v, K)


def assert_trajectories_equal(got, want):
    assert len(got) == len(want) == ROUNDS
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12 * max(1.0, np.abs(w).max()))


@pytest.mark.parametrize("compress_first", [False, True])
def test_ef21_partial_participation_matches_numpy(compress_first):
    u, sampled, p, x0 = scenario()
    feedback = EF21(lr_server=LR_SERVER, compress_first=compress_first)
    got, states = simulate(feedback, u, sampled, p, x0)
    want, g, g_i = ref.run_ef21_pp(u, sampled, N, compress, x0, LR, LR_SERVER, compress_first)
    assert_trajectories_equal(got, want)
    np.testing.assert_allclose(feedback.server_state["w"], g, atol=1e-12)
    for c, state in states.items():  # clients never sampled hold nothing (g_i = 0)
        mine = state["fedsim.feedback"]["g/w"].numpy() if "fedsim.feedback" in state else 0.0
        np.testing.assert_allclose(mine, g_i[c], atol=1e-12)


def test_ef14_matches_numpy():
    u, sampled, p, x0 = scenario(1)
    got, _ = simulate(EF14(lr_server=LR_SERVER), u, sampled, p, x0)
    want, _ = ref.run_ef14(u, sampled, compress, x0, LR, LR_SERVER, p)
    assert_trajectories_equal(got, want)


def test_naive_matches_numpy():
    u, sampled, p, x0 = scenario(2)
    got, _ = simulate(Naive(lr_server=LR_SERVER), u, sampled, p, x0)
    want = ref.run_naive(u, sampled, compress, x0, LR, LR_SERVER, p)
    assert_trajectories_equal(got, want)


@pytest.mark.parametrize("eta", [1.0, 0.3, None])
def test_econtrol_matches_numpy(eta):
    u, sampled, p, x0 = scenario(3)
    feedback = EControl(lr_server=LR_SERVER, eta=eta)
    got, _ = simulate(feedback, u, sampled, p, x0)
    # the default: Top-K's contraction parameter, K/d = 5/50
    want_eta = K / D if eta is None else eta
    want, h, _, _ = ref.run_econtrol(u, sampled, N, compress, x0, LR, LR_SERVER, want_eta)
    assert_trajectories_equal(got, want)
    np.testing.assert_allclose(feedback.server_state["w"], h, atol=1e-12)


@pytest.mark.parametrize("method", ["ef21", "naive", "ef14", "econtrol"])
def test_compressed_updates_under_central_dp_match_numpy(method):
    """The clients clip what they compress (Top-K keeps the bound), the server clips again,
    sums, adds noise of standard deviation sigma * clip / lr and steps (EF21: g by 1/N)."""
    from fedsim.privacy import CentralDP, CentralNoise
    from fedsim.strategy import ClientSampler, ClientUpdate, Federation, StrategyContext
    from fedsim.uplink import RoundInfo, Uplink
    from strategies.fedavg import FedAvg

    clip, sigma = 1.2, 0.8  # clip / lr = 2.4, below most messages' norms: clipping is active
    u, sampled, _, x0 = scenario(4)
    feedback = {
        "ef21": EF21(lr_server=LR_SERVER),
        "naive": Naive(lr_server=LR_SERVER),
        "ef14": EF14(lr_server=LR_SERVER),
        "econtrol": EControl(lr_server=LR_SERVER, eta=0.5),
    }[method]
    codec = Codec(TopK(ratio=0.1), feedback, LR, seed=0, clip=clip)
    central = CentralDP(clip_norm=clip, noise_multiplier=sigma)
    central.start(num_clients=N, clients_per_round=3, rounds=ROUNDS)
    noise = CentralNoise(central, N, 3, seed=7, clip_on_client=False)
    uplink = Uplink([codec, noise])  # the chain's server halves: decode, then noise
    fed = Federation(
        FedAvg(weighted=False), uplink, StrategyContext(ClientSampler(N, 3, 0), {}, None, 7)
    )
    states = {c: RecordDict() for c in range(N)}
    x, got, norms = {"w": x0.copy()}, [], []
    for t, clients in enumerate(sampled, start=1):
        info = RoundInfo(t, x, x, lambda c, x=x: x, N, 3, 7)
        codec.begin_round(info)
        updates = []
        for c in clients:
            trained = {"w": x["w"] - LR * u[t - 1][c]}
            payload = codec.client_encode(x, trained, c, t, states[c], absorbed=t - 1)
            codec._decoded[c] = codec.decode(payload, x, c, t)
            norms.append(LR * np.linalg.norm(codec._decoded[c]["w"]))
            updates.append(ClientUpdate(c, payload, 1, {}))
        x = fed.reduction.aggregate(info, updates)
        got.append(x["w"].copy())
    std = sigma * clip / LR  # the noise convention: one generator per round from the seed
    noise = [np.random.default_rng([7, t, 59]).normal(0.0, std, D) for t in range(1, ROUNDS + 1)]
    want = ref.run_central_dp(
        u, sampled, N, 3, compress, x0, LR, LR_SERVER, clip, noise, method, eta=0.5
    )
    assert_trajectories_equal(got, want)
    assert max(norms) <= clip * (1 + 1e-6)  # what a client sends is bounded
    if method in ("ef21", "econtrol"):  # dense first messages sit on the bound: clipped
        assert max(norms) == pytest.approx(clip, rel=1e-6)


def test_econtrol_converges_at_its_default_eta_and_diverges_at_one():
    """Distributed least squares (5 heterogeneous clients, Top-K 10%, full gradients): at the
    default eta (K/d) EControl reaches the optimum to 1e-10; at eta = 1 its error memory
    blows up (the regime the old default sat in)."""
    rng = np.random.default_rng(0)
    A = [rng.normal(size=(60, D)) / np.sqrt(60) for _ in range(N)]
    b = [rng.normal(size=60) for _ in range(N)]
    hess = sum(a.T @ a for a in A) / N
    optimum = np.linalg.solve(hess, sum(a.T @ bb for a, bb in zip(A, b)) / N)
    lr = 0.5 / np.linalg.eigvalsh(hess).max()

    def distance(eta):
        codec = Codec(TopK(ratio=0.1), EControl(eta=eta), lr, seed=0)
        states = {c: RecordDict() for c in range(N)}
        x = {"w": np.zeros(D)}
        for t in range(1, 401):
            decoded = []
            for c in range(N):
                grad = A[c].T @ (A[c] @ x["w"] - b[c])
                payload = codec.client_encode(x, {"w": x["w"] - lr * grad}, c, t, states[c], t - 1)
                decoded.append(codec.decode(payload, x, c, t))
            x = codec.step(x, decoded, N)
            if not np.linalg.norm(x["w"] - optimum) < 1e10:
                return np.inf
        return np.linalg.norm(x["w"] - optimum)

    assert distance(None) < 1e-10
    assert distance(1.0) == np.inf
