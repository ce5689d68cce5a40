"""Server optimisers (``server_opt``): against Flower's own strategy classes fed the same client
replies, against direct numpy versions of Reddi et al.'s Algorithm 2 and against PyTorch's
SGD with momentum; and in runs: where they apply, what they report, resume, engines, DP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

from fedsim import keys
from fedsim.adapters import AdapterSpec
from fedsim.records import array_record, numpy_dict
from fedsim.server_opt import Adagrad, Adam, AvgM, NoServerOpt, Yogi
from fedsim.strategy import ClientSampler, Federation, StrategyContext
from fedsim.uplink import Uplink
from strategies.fedavg import FedAvg
from tests.conftest import tiny
from tests.test_batched import UNEQUAL, _close
from tests.test_checkpoint import interrupted_equals_uninterrupted

NODE = {0: 101, 1: 102, 2: 103}
EXAMPLES = [10, 30, 60]
SHAPES = {"a": (3, 4), "b": (5,)}

#: (fedsim's optimiser, Flower's strategy) with the same settings (not the defaults of either)
PAIRS = {
    "avgm": (
        lambda: AvgM(lr=0.7, momentum=0.9),
        lambda: FedAvgM(server_learning_rate=0.7, server_momentum=0.9),
    ),
    "adagrad": (
        lambda: Adagrad(lr=0.1, tau=1e-3),
        lambda: FedAdagrad(eta=0.1, tau=1e-3),
    ),
    "adam": (
        lambda: Adam(lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3),
        lambda: FedAdam(eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3),
    ),
    "yogi": (
        lambda: Yogi(lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3),
        lambda: FedYogi(eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3),
    ),
}


@pytest.fixture(autouse=True)
def _server_app_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _federation(opt) -> Federation:
    spec = AdapterSpec(trained=list(SHAPES), sent=list(SHAPES))
    ctx = StrategyContext(ClientSampler(3, 3, seed=0), NODE, spec, seed=0)
    return Federation(FedAvg(weighted=True), Uplink([]), ctx, opt)


def _replies(instructions: list[Message], arrays: list[dict]) -> list[Message]:
    out = []
    for i, (m, a) in enumerate(zip(instructions, arrays)):
        m.metadata.__dict__["_message_id"] = f"id{i}"
        content = RecordDict(
            {
                keys.ARRAYS: array_record(a),
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: EXAMPLES[i], keys.TRAIN_LOSS: 1.0}),
            }
        )
        out.append(Message(content, reply_to=m))
    return out


def _client_arrays(rng, current: dict, dtype) -> list[dict]:
    """Three clients' trained arrays: the current ones moved by different amounts."""
    return [
        {
            k: (v + rng.normal(0.1 * (i - 1), 0.05 * (i + 1), v.shape)).astype(dtype)
            for k, v in current.items()
        }
        for i in range(3)
    ]


def _three_rounds(name: str, dtype) -> tuple[list[dict], list[dict]]:
    """The global arrays after each of 3 rounds: fedsim's Federation with the optimiser, and
    Flower's strategy, given the same replies (the same client arrays and example counts)."""
    ours, theirs = PAIRS[name]
    fed, flower = _federation(ours()), theirs()
    rng = np.random.default_rng(7)
    start = {k: rng.normal(0, 1, s).astype(dtype) for k, s in SHAPES.items()}
    mine, flowers = dict(start), dict(start)
    if isinstance(flower, FedAvgM):
        flower.current_arrays = array_record(start)  # what its configure_train keeps
    got, want = [], []
    for server_round in (1, 2, 3):
        trained = _client_arrays(rng, mine, dtype)
        record = array_record(mine)
        sent = list(fed.configure_train(server_round, record, ConfigRecord(), grid=None))
        new, _ = fed.aggregate_train(server_round, _replies(sent, trained))
        mine = numpy_dict(new)
        if not isinstance(flower, FedAvgM):
            flower.current_arrays = dict(flowers)  # what FedOpt.configure_train keeps
        out, _ = flower.aggregate_train(server_round, _replies(sent, trained))
        flowers = numpy_dict(out)
        got.append(mine)
        want.append(flowers)
    return got, want


@pytest.mark.parametrize("name", list(PAIRS))
def test_float64_equals_flowers_strategy_bit_for_bit(name):
    """In float64 both compute the same operations in the same order: the same bits."""
    got, want = _three_rounds(name, np.float64)
    for server_round, (g, w) in enumerate(zip(got, want), start=1):
        for k in SHAPES:
            assert g[k].dtype == np.float64
            np.testing.assert_array_equal(g[k], w[k], err_msg=f"{name} round {server_round} {k}")


@pytest.mark.parametrize("name", list(PAIRS))
def test_float32_equals_flowers_strategy_to_float32_rounding(name):
    """With float32 arrays fedsim computes in float64 and rounds once per round; Flower
    computes in float32 throughout: equal to float32 rounding."""
    got, want = _three_rounds(name, np.float32)
    for g, w in zip(got, want):
        for k in SHAPES:
            assert g[k].dtype == np.float32
            np.testing.assert_allclose(g[k], w[k], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- the paper's equations


def _algorithm2(rule: str, deltas: list[dict], eta, b1, b2, tau, x0: dict) -> list[dict]:
    """Reddi et al. (2021), Algorithm 2, written out per coordinate with Python floats (v and
    m start at 0, as in the authors' experiments; no bias correction, as printed)."""
    xs, m, v, x = [], {}, {}, {k: a.astype(np.float64).ravel().tolist() for k, a in x0.items()}
    for delta in deltas:
        for k, d in delta.items():
            flat = d.ravel().tolist()
            m.setdefault(k, [0.0] * len(flat))
            v.setdefault(k, [0.0] * len(flat))
            for j, dj in enumerate(flat):
                m[k][j] = b1 * m[k][j] + (1 - b1) * dj
                if rule == "adagrad":
                    v[k][j] = v[k][j] + dj * dj
                elif rule == "adam":
                    v[k][j] = b2 * v[k][j] + (1 - b2) * dj * dj
                else:  # yogi
                    sign = (v[k][j] > dj * dj) - (v[k][j] < dj * dj)
                    v[k][j] = v[k][j] - (1 - b2) * dj * dj * sign
                x[k][j] = x[k][j] + eta * m[k][j] / (v[k][j] ** 0.5 + tau)
        xs.append({k: np.array(x[k]).reshape(x0[k].shape) for k in x0})
    return xs


def _run_steps(opt, x0: dict, aggregates: list) -> list[dict]:
    """fedsim's optimiser given the aggregates of 3 rounds (each relative to the arrays it
    returned the round before)."""
    x, out = dict(x0), []
    for server_round, make in enumerate(aggregates, start=1):
        x = opt.apply(server_round, x, make(x))
        out.append(x)
    return out


@pytest.mark.parametrize("rule", ["adagrad", "adam", "yogi"])
def test_adaptive_rules_are_algorithm_2(rule):
    rng = np.random.default_rng(3)
    x0 = {k: rng.normal(0, 1, s) for k, s in SHAPES.items()}
    deltas = [{k: rng.normal(0, 0.1, s) for k, s in SHAPES.items()} for _ in range(3)]
    eta, b1, b2, tau = 0.03, 0.8, 0.95, 1e-2
    opt = {
        "adagrad": Adagrad(lr=eta, beta1=b1, tau=tau),
        "adam": Adam(lr=eta, beta1=b1, beta2=b2, tau=tau, bias_correction=False),
        "yogi": Yogi(lr=eta, beta1=b1, beta2=b2, tau=tau),
    }[rule]
    aggregates = [lambda x, d=d: {k: x[k] + d[k] for k in x} for d in deltas]
    got = _run_steps(opt, x0, aggregates)
    # the reference takes the pseudo-gradients fedsim saw ((x + d) - x rounds d)
    seen, x = [], x0
    for d, g in zip(deltas, got):
        seen.append({k: (x[k] + d[k]) - x[k] for k in x})
        x = g
    want = _algorithm2(rule, seen, eta, b1, b2, tau, x0)
    for g, w in zip(got, want):
        for k in SHAPES:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-12, atol=1e-14)


def test_adams_bias_correction_is_flowers_exponent():
    """With bias correction, round t's rate is eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))."""
    d = {"w": np.array([0.3, -0.2])}
    plain = Adam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3, bias_correction=False)
    corrected = Adam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    for t in (1, 2, 3):
        a = plain.step(t, d, plain.state)["w"]
        b = corrected.step(t, d, corrected.state)["w"]
        np.testing.assert_allclose(b, a * np.sqrt(1 - 0.99 ** (t + 1)) / (1 - 0.9 ** (t + 1)))


@pytest.mark.parametrize("nesterov", [False, True])
def test_avgm_is_torch_sgd_with_momentum_on_the_negative_pseudo_gradient(nesterov):
    rng = np.random.default_rng(5)
    x0 = {"w": rng.normal(0, 1, (4, 3))}
    deltas = [rng.normal(0, 0.1, (4, 3)) for _ in range(4)]
    opt = AvgM(lr=0.5, momentum=0.8, nesterov=nesterov)
    got = _run_steps(opt, x0, [lambda x, d=d: {"w": x["w"] + d} for d in deltas])
    p = torch.nn.Parameter(torch.tensor(x0["w"]))
    sgd = torch.optim.SGD([p], lr=0.5, momentum=0.8, nesterov=nesterov)
    for g, d in zip(got, deltas):
        seen = (p.detach().numpy() + d) - p.detach().numpy()
        p.grad = torch.tensor(-seen)
        sgd.step()
        np.testing.assert_allclose(g["w"], p.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_no_server_opt_returns_the_aggregate_itself():
    new = {"w": np.array([1.0, 2.0])}
    opt = NoServerOpt()
    assert opt.apply(1, {"w": np.zeros(2)}, new) is new
    assert opt.state_dict() == {} and not opt.round_metrics


def test_the_moments_survive_a_state_dict_round_trip():
    a, b = Yogi(lr=0.05), Yogi(lr=0.05)
    x = {"w": np.array([0.5, -1.0, 2.0])}
    for t in (1, 2):
        x = a.apply(t, x, {"w": x["w"] * 1.1 + 0.01})
    b.load_state_dict(a.state_dict())
    nxt = {"w": x["w"] - 0.2}
    np.testing.assert_array_equal(a.apply(3, x, nxt)["w"], b.apply(3, x, nxt)["w"])


# --------------------------------------------------------------------------- runs


def test_a_run_reports_the_step_and_measures_the_aggregate_before_it(run_tiny):
    """Fed-SB's average is exact: the diagnostic, on the aggregate before the server step,
    stays at float rounding although Adam's step is not the clients' mean."""
    summary, rows, _ = run_tiny("strategy=fedsb", "server_opt=adam", "sim.rounds=3")
    assert summary["server_opt"] == "adam"
    assert summary["aggregation_error_max"] < 1e-12
    for row in rows[1:]:
        assert row["server_opt_delta_norm"] > 0 and row["server_opt_step_norm"] > 0
    assert "server_opt_delta_norm" not in rows[0]
    plain, plain_rows, _ = run_tiny("strategy=fedsb", "sim.rounds=3")
    assert "server_opt" not in plain and "server_opt_step_norm" not in plain_rows[-1]
    assert rows[-1]["eval_loss"] != plain_rows[-1]["eval_loss"]  # the step changed the model


def test_server_opt_under_central_dp_post_processes_the_noised_mean(run_tiny):
    """Central DP's epsilon is the same with a server optimiser: it only post-processes."""
    dp = ("strategy=fedsb", "privacy=central", "privacy.target_epsilon=8", "sim.rounds=3")
    with_opt, rows, _ = run_tiny(*dp, "server_opt=avgm")
    plain, plain_rows, _ = run_tiny(*dp)
    assert with_opt["epsilon"] == plain["epsilon"]
    assert [r.get("epsilon") for r in rows] == [r.get("epsilon") for r in plain_rows]
    assert rows[-1]["eval_loss"] != plain_rows[-1]["eval_loss"]


@pytest.mark.parametrize(
    "extra",
    [
        ("strategy=fedsb", "adapter=lora_sb", "server_opt=adam"),
        ("compressor=topk", "compressor.ratio=0.2", "feedback=ef21", "server_opt=avgm"),
        ("strategy=fedsa", "server_opt=yogi"),
    ],
    ids=["fedsb-adam", "ef21-avgm", "fedsa-yogi"],
)
def test_a_resumed_run_with_a_server_optimiser_is_bit_identical(extra, tmp_path, monkeypatch):
    args = tiny("sim.rounds=4", "sim.num_clients=5", "sim.clients_per_round=3", *extra)
    interrupted_equals_uninterrupted(tmp_path, monkeypatch, args, at=2)


def test_batched_engine_gives_the_inline_engines_results(run_tiny):
    extra = ("strategy=fedavg", "server_opt=adagrad")
    _, inline, _ = run_tiny(*UNEQUAL, *extra)
    _, batched, _ = run_tiny(*UNEQUAL, *extra, "engine=batched", "engine.group_size=4")
    _close(inline, batched)
    for a, b in zip(inline[1:], batched[1:]):
        assert b["server_opt_step_norm"] == pytest.approx(a["server_opt_step_norm"], rel=1e-5)
