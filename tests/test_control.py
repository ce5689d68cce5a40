"""FedProx (``sim.prox_mu``) and SCAFFOLD (``control=scaffold``).

* on a small least-squares problem, fedsim's own pieces (the local loop with its
  :class:`~fedsim.training.LocalTerms`, the control stage's client and server halves, the
  strategy's mean inside the stage's wrapper) against the algorithms written out in numpy
  (Li et al., 2020, FedProx; Karimireddy et al., 2020, SCAFFOLD option II), over rounds of
  partial participation with a lost reply;
* a full FedProx run against a hand-written PyTorch loop whose loss carries the proximal term;
* ``sim.prox_mu=0`` is FedIT bit for bit; SCAFFOLD's bytes; the server's ``c`` stays the mean of
  the clients' ``c_i``; a SCAFFOLD run resumes exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn

from fedsim import keys
from fedsim.control import ControlVariates, Scaffold
from fedsim.messages import ClientCall, ClientUpdate
from fedsim.records import array_record, numpy_dict
from fedsim.strategy.rounds import _StrategyReduction
from fedsim.training import LinearSchedule, LocalTerms, step_sizes, train_local
from fedsim.uplink import Outgoing, RoundInfo, Sending, Uplink
from strategies.fedavg import FedAvg
from tests.conftest import strip_timings, tiny

# ----------------------------------------------------------------------------- the small problem

N, D, K, LR = 4, 3, 5, 0.05
SIZES = [6, 9, 4, 7]


def _problem():
    rng = np.random.default_rng(7)
    data = []
    for i, n in enumerate(SIZES):
        a = rng.normal(size=(n, D)) + i  # heterogeneous clients
        b = rng.normal(size=n) + 2.0 * i
        data.append((a, b))
    return data


class _LeastSquares:
    """``f_i(w) = mean_j 0.5 (a_j . w - b_j)^2`` as a fedsim task's loss."""

    label_key = "y"

    def loss(self, model, batch):
        return 0.5 * ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()


def _grad(a, b, w):
    return a.T @ (a @ w - b) / len(b)


def _numpy_round(x, c, c_i, data, sampled, lost, mu, scaffold, eta_g, lrs):
    """One round of FedProx / SCAFFOLD (option II) in numpy: each sampled client's K
    full-batch SGD steps ``y <- y - eta_t (g_i(y) + mu (y - x) + c - c_i)``; the server's
    ``x + eta_g (sum_i p_i y_i - x)`` over the clients whose reply arrived and ``c + (1/N) sum
    Delta c_i``; a lost client's ``c_i`` is as before."""
    ys, deltas, weights = {}, {}, {}
    for i in sampled:
        a, b = data[i]
        y = x.copy()
        for eta in lrs:
            y = y - eta * (_grad(a, b, y) + mu * (y - x))
            if scaffold:
                y = y - eta * (c - c_i[i])
        if i in lost:
            continue
        ys[i], weights[i] = y, len(b)
        if scaffold:
            new_ci = c_i[i] - c + (x - y) / sum(lrs)
            deltas[i] = new_ci - c_i[i]
    if not ys:
        return x, c
    total = sum(weights.values())
    mean = sum(weights[i] / total * ys[i] for i in ys)
    x_new = x + eta_g * (mean - x)
    for i, d in deltas.items():
        c_i[i] = c_i[i] + d
        c = c + d / N
    return x_new, c


def _fedsim_round(server_round, x, stage, client_stage, states, data, sampled, lost, mu, lrs):
    """The same round through fedsim's pieces (what the runtime and Federation call)."""
    current = {"w": x.reshape(1, D)}
    info = RoundInfo(server_round, current, current, lambda c: current, N, len(sampled), 0)
    stage.begin_round(info)
    model = nn.Linear(D, 1, bias=False).double()
    task = _LeastSquares()
    schedule = LinearSchedule(final_factor=0.2)
    updates = []
    for i in sampled:
        arrays, config = stage.outgoing(info, i, array_record(current), ConfigRecord())
        call = ClientCall(i, server_round, 0, states[i], config=config)
        received = client_stage.receive(call, numpy_dict(arrays)) if client_stage else current
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(received["w"]))
        offset = client_stage.step_offset(call) if client_stage else None
        anchors = [model.weight.detach().clone()] if mu else [None]
        offsets = [torch.from_numpy(offset["w"])] if offset else [None]
        terms = LocalTerms(["weight"], mu, anchors, offsets)
        a, b = data[i]
        batch = {"x": torch.from_numpy(a), "y": torch.from_numpy(b)}
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        kw = {"schedule": schedule, "start_step": 0, "total_steps": len(lrs)}
        g = torch.Generator().manual_seed(i)
        train_local(
            model,
            task,
            batch,
            opt,
            steps=K,
            batch_size=len(b),
            lr=LR,
            generator=g,
            **kw,
            terms=terms,
        )
        y = {"w": model.weight.detach().numpy().copy()}
        out = Outgoing(arrays=dict(y))
        if client_stage:
            lr_sum = step_sizes(LR, schedule, 0, K, len(lrs))
            client_stage.send(Sending(call, config, dict(current), lr_sum), out)
        if i in lost:
            continue
        if client_stage:
            record = RecordDict({keys.CONTROL: array_record(out.records[keys.CONTROL])})
            assert stage.screen(info, i, SimpleNamespace(content=record)) is None
        updates.append(ClientUpdate(i, y, len(b), {}))
    if not updates:
        return x
    reduction = Uplink([stage] if client_stage else []).reduction(_StrategyReduction(FedAvg()))
    new = reduction.aggregate(info, updates)
    stage.acknowledge(server_round, [u.client for u in updates])
    return np.asarray(new["w"], np.float64).reshape(D)


ROUNDS = [  # (sampled clients, whose reply is lost)
    ([0, 1, 2, 3], []),
    ([1, 3], [3]),
    ([0, 3], []),
    ([2, 3, 1], [1]),
    ([1, 0], []),
]


@pytest.mark.parametrize(
    "mu, scaffold, eta_g",
    [(0.1, False, 1.0), (0.0, True, 1.0), (0.3, True, 0.5)],
    ids=["fedprox", "scaffold", "both-eta_g"],
)
def test_local_terms_and_control_variates_against_numpy(mu, scaffold, eta_g):
    data = _problem()
    schedule = LinearSchedule(final_factor=0.2)
    lrs = [LR * schedule.factor(t, K) for t in range(K)]  # K eta_l becomes their sum
    x_np, c_np = np.zeros(D), np.zeros(D)
    c_i = {i: np.zeros(D) for i in range(N)}
    stage = ControlVariates(Scaffold(lr_server=eta_g))
    client_stage = ControlVariates(Scaffold(lr_server=eta_g)) if scaffold else None
    states = {i: RecordDict() for i in range(N)}
    x = np.zeros(D)
    for r, (sampled, lost) in enumerate(ROUNDS, start=1):
        x_np, c_np = _numpy_round(x_np, c_np, c_i, data, sampled, lost, mu, scaffold, eta_g, lrs)
        x = _fedsim_round(r, x, stage, client_stage, states, data, sampled, lost, mu, lrs)
        np.testing.assert_allclose(x, x_np, rtol=1e-10, atol=1e-12)
        if scaffold:
            np.testing.assert_allclose(stage.c["w"].reshape(D), c_np, rtol=1e-10, atol=1e-12)
    if scaffold:  # the clients' committed variates: the lost messages were dropped
        assert not np.allclose(c_np, 0)
        for i in range(N):
            config = {keys.CONTROL_ABSORBED: stage.absorbed.get(i, 0)}
            call = ClientCall(i, len(ROUNDS) + 1, 0, states[i], config=config)
            got = client_stage.client_variate(call, {"w": np.zeros((1, D))})["w"]
            np.testing.assert_allclose(got.reshape(D), c_i[i], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.mean([c_i[i] for i in range(N)], axis=0), c_np)


# ----------------------------------------------------------------------------- full runs


def _same_run(a, b):
    (sa, ra, fa), (sb, rb, fb) = a, b
    assert strip_timings(ra) == strip_timings(rb)
    drop = ("wall_time_s", "checkpoint")
    assert {k: v for k, v in sa.items() if k not in drop} == {
        k: v for k, v in sb.items() if k not in drop
    }
    weights = "adapter/adapter_model.safetensors"
    assert (fa / weights).exists() == (fb / weights).exists()
    if (fa / weights).exists():  # a personalised strategy exports no global model
        assert (fa / weights).read_bytes() == (fb / weights).read_bytes()


@pytest.mark.parametrize(
    "extra", [(), ("engine=batched", "privacy=dpsgd", "strategy=fedsa")], ids=["fedit", "dp"]
)
def test_prox_mu_zero_is_fedit_bit_for_bit(run_tiny, extra):
    _same_run(run_tiny(*extra), run_tiny(*extra, "sim.prox_mu=0.0"))


def test_fedprox_run_equals_a_torch_loop_with_the_proximal_loss(run_tiny):
    """Round 1 of a FedProx run (FedAvg, AdamW, the synthetic task) against a loop whose loss
    is the task's plus ``(mu/2) ||w - w_received||^2`` (autograd's gradient of it)."""
    from fedsim.build import build_components
    from fedsim.config import compose
    from fedsim.training import batches, client_generator, evaluate, seed_torch

    mu = 0.5
    args = tiny("sim.rounds=1", "sim.local_steps=6", f"sim.prox_mu={mu}", "sim.lr=0.05")
    _, rows, _ = run_tiny(base=args)
    _, plain, _ = run_tiny(base=[*args, "sim.prox_mu=0"])
    cfg, _ = compose(args)
    c = build_components(cfg)
    model, spec = c.model()
    sent, trained = spec.sent_state(model), spec.trained_parameters(model)
    start = {n: p.detach().clone() for n, p in sent.items()}
    states, sizes, losses = [], [], []
    for client in c.sampler().train_clients(1):
        with torch.no_grad():
            for n, p in sent.items():
                p.copy_(start[n])
        anchors = [p.detach().clone() for p in trained]
        opt = c.make_optimizer(trained, lr=0.05)
        generator = client_generator(0, 1, client)
        seed_torch(generator.initial_seed() + 1)
        data = c.data.client(client).train
        stream = batches(data, 16, generator)
        task_losses = []
        for _ in range(6):
            opt.zero_grad()
            task_loss = c.task.loss(model, next(stream))
            prox = sum(((p - a) ** 2).sum() for p, a in zip(trained, anchors))
            (task_loss + mu / 2 * prox).backward()
            opt.step()
            task_losses.append(float(task_loss.detach()))
        states.append({n: p.detach().clone() for n, p in sent.items()})
        sizes.append(len(data[c.task.label_key]))
        losses.append(sum(task_losses) / len(task_losses))
    w = [s / sum(sizes) for s in sizes]
    with torch.no_grad():
        for n, p in sent.items():
            p.copy_(sum(wi * st[n].double() for wi, st in zip(w, states)).to(p.dtype))
    want = evaluate(model, c.task, c.task.test_set())
    assert rows[1]["eval_loss"] == pytest.approx(want.loss, rel=1e-5)
    assert rows[1]["train_loss"] == pytest.approx(sum(a * b for a, b in zip(w, losses)), rel=1e-5)
    assert abs(plain[1]["eval_loss"] - want.loss) > 1e-3 * want.loss  # the term mattered


def test_scaffold_sends_c_down_and_delta_c_up(run_tiny):
    """Every array the strategy sends has its variate beside it, in both directions (float32
    like the arrays): twice FedIT's bytes each round."""
    _, fedit, _ = run_tiny("sim.clients_per_round=3")
    summary, scaffold, _ = run_tiny("sim.clients_per_round=3", "control=scaffold")
    for a, b in zip(fedit[1:], scaffold[1:]):
        assert b["bytes_down"] == 2 * a["bytes_down"] > 0
        assert b["bytes_up"] == 2 * a["bytes_up"] > 0
    assert fedit[1]["eval_loss"] == scaffold[1]["eval_loss"]  # c = c_i = 0 in round 1
    assert fedit[2]["eval_loss"] != scaffold[2]["eval_loss"]
    assert summary["control"] == "scaffold"


def test_server_variate_stays_the_mean_of_the_clients(tmp_path):
    """After rounds with partial participation, crashes, corrupted and late replies, the
    checkpointed server ``c`` equals the mean over all N clients of their ``c_i`` (each with
    the change it sent last, if the server aggregated it)."""
    from fedsim.api import run
    from fedsim.checkpoint import load, record_dict_from_state

    args = tiny(
        "control=scaffold",
        "sim.num_clients=5",
        "sim.clients_per_round=3",
        "sim.rounds=5",
        "faults=mixed",
        "faults.corrupt_prob=0.3",
        "checkpoint.keep=true",
    )
    summary = run(args, output_dir=tmp_path / "run")
    assert summary["clients_failed_total"] > 0
    tree = load(tmp_path / "run" / "checkpoint.safetensors")
    server = tree["uplink"]["control"]
    stage = ControlVariates(Scaffold())
    c = {k: np.asarray(v) for k, v in server["c"].items()}
    total = {k: np.zeros_like(v) for k, v in c.items()}
    for client in range(5):
        kept = tree["clients"].get(client)
        state = RecordDict() if kept is None else record_dict_from_state(kept)
        config = {keys.CONTROL_ABSORBED: int(server["absorbed"].get(client, 0))}
        mine = stage.client_variate(ClientCall(client, 99, 0, state, config=config), c)
        for k in total:
            total[k] += mine[k] / 5
    assert any(np.abs(v).max() > 0 for v in c.values())
    for k in c:
        np.testing.assert_allclose(total[k], c[k], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("engine", ["inline", "batched"])
def test_a_scaffold_run_resumes_exactly(engine, tmp_path, monkeypatch):
    from tests.test_checkpoint import interrupted_equals_uninterrupted

    args = tiny(
        "control=scaffold",
        "sim.prox_mu=0.01",
        f"engine={engine}",
        "sim.rounds=4",
        "sim.num_clients=5",
        "sim.clients_per_round=3",
        "faults=mixed",
    )
    _, resumed = interrupted_equals_uninterrupted(tmp_path, monkeypatch, args, at=2)
    assert resumed["resumed_from"] == [2]
