"""LoRA-GA (``adapter=lora adapter.init.method=lora_ga``): the initialisation against a numpy
reference and against peft's, the offset of the frozen weight (outputs unchanged at start, the
export on the pristine weights), the set-up's bytes and DP charge, and the strategies."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import yaml

import tests.reference_numpy as ref
from fedsim.adapters import LoRA
from fedsim.adapters.data_init import InitRun
from fedsim.adapters.gradients import base_gradients
from fedsim.adapters.lora import DEFAULT_INIT
from fedsim.adapters.lora_ga import lora_ga_factors
from fedsim.strategy import ClientSampler
from fedsim.training import ConstantSchedule
from tests.conftest import ROOT, tiny
from tests.test_exact_family import Tiny, adapted
from tests.test_export import assert_same_logits, captured, load_exported  # noqa: F401

LAYERS = [(32, 32)] * 3  # the tiny synthetic net
HEAD = 32 * 10 + 10
R, N, K, ROUNDS = 8, 4, 2, 3
RUN = [f"sim.clients_per_round={K}", f"sim.rounds={ROUNDS}"]
GA = "adapter.init.method=lora_ga"


def reference(grad: np.ndarray, r: int, gamma: float):
    """``A0^T A0`` and ``B0 B0^T`` of the paper's default from eigendecompositions (not an SVD):
    ``c^2 V_r V_r^T`` (top r right singular vectors: eigenvectors of ``G^T G``) and
    ``c^2 U_{r:2r} U_{r:2r}^T`` (the next r left ones: of ``G G^T``),
    ``c = m^(1/4) / sqrt(gamma)``."""
    m = grad.shape[0]
    _, v = np.linalg.eigh(grad.T @ grad)
    _, u = np.linalg.eigh(grad @ grad.T)
    v, u = v[:, ::-1], u[:, ::-1]  # decreasing
    c2 = np.sqrt(m) / gamma
    return c2 * v[:, :r] @ v[:, :r].T, c2 * u[:, r : 2 * r] @ u[:, r : 2 * r].T, np.sqrt(c2)


@pytest.mark.parametrize("shape", [(12, 10), (7, 15)])
def test_factors_are_the_papers_singular_vectors_at_the_stable_scale(shape):
    g = np.random.default_rng(0).normal(size=shape)
    a, b = lora_ga_factors(g, 3, gamma=16)
    proj_a, proj_b, c = reference(g, 3, 16)
    np.testing.assert_allclose(a.T @ a, proj_a, atol=1e-12)
    np.testing.assert_allclose(b @ b.T, proj_b, atol=1e-12)
    np.testing.assert_allclose(a @ a.T, c**2 * np.eye(3), atol=1e-12)  # orthogonal, norm c
    np.testing.assert_allclose(b.T @ b, c**2 * np.eye(3), atol=1e-12)
    rows = a[np.arange(3), np.argmax(np.abs(a), axis=1)]
    assert (rows > 0).all()  # the sign convention: each v_i's largest entry positive
    # A2rBr swaps the slices, unit drops the scale
    a2, b2 = lora_ga_factors(g, 3, direction="A2rBr", scale="unit")
    _, v = np.linalg.eigh(g.T @ g)
    v = v[:, ::-1][:, 3:6]
    np.testing.assert_allclose(a2.T @ a2, v @ v.T, atol=1e-12)
    _, u = np.linalg.eigh(g @ g.T)
    u = u[:, ::-1][:, :3]
    np.testing.assert_allclose(b2 @ b2.T, u @ u.T, atol=1e-12)


def test_the_first_step_is_the_gradients_best_rank_2r_direction():
    """The paper's Theorem 3.1: LoRA's first step from (A0, B0) changes the weight by
    ``-eta s^2 (B0 B0^T G + G A0^T A0)``, proportional to the SVD's rank-2r truncation
    ``U_2r S_2r V_2r^T`` of G when the scales of the two halves agree (unit scale)."""
    g = np.random.default_rng(1).normal(size=(9, 11))
    a, b = lora_ga_factors(g, 2, scale="unit")
    step = b @ b.T @ g + g @ a.T @ a
    u, s, vt = np.linalg.svd(g)
    best = u[:, :4] @ np.diag(s[:4]) @ vt[:4]
    np.testing.assert_allclose(step, best, atol=1e-10)


def init_tiny(r=2, **init):
    """The tiny two-layer model adapted by LoRA-GA, initialised from its gradient on a batch."""
    adapter = LoRA(r=r, alpha=4.0, init={"method": "lora_ga", **init})
    model, spec = adapted(adapter)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)

    def loss(model, batch):
        return torch.nn.functional.cross_entropy(model(batch["x"]), batch["label"])

    grads = base_gradients(model, spec, loss, {"x": x, "label": y}, batch_size=8)
    run = InitRun(lr=0.01, schedule=ConstantSchedule(), total_steps=1)
    info = adapter.data_init.initialize(model, spec, grads, run)
    return adapter, model, spec, grads, x, info


def test_the_adapted_model_equals_the_base_model_at_start():
    adapter, model, spec, grads, x, info = init_tiny()
    layer = model.fc1
    assert float(layer.lora_B.weight.detach().abs().max()) > 0  # B0 A0 is not zero...
    with torch.no_grad():
        assert torch.equal(model(x), Tiny()(x))  # ...yet the output is the base model's
        assert float(layer.delta_weight().abs().max()) == 0.0
    a, b = lora_ga_factors(grads["fc1"].astype(np.float64), 2)
    np.testing.assert_allclose(layer.lora_A0.weight.numpy(), a, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.lora_B0.weight.numpy(), b, rtol=1e-6, atol=1e-7)
    assert spec.frozen == [
        f"{m}.{s}" for m in ("fc1", "fc2") for s in ("lora_A0.weight", "lora_B0.weight")
    ]
    assert info["offset_bytes_per_client"] == 4 * 2 * (16 + 12 + 20 + 16)
    # the adapter's delta is the change from the pristine W0: s (B A - B0 A0), rank 2r form
    with torch.no_grad():
        layer.lora_B.weight.add_(0.1)
    factors = {k: p.detach().numpy() for k, p in layer.named_parameters() if "lora" in k}
    want = layer.delta_weight().detach().double().numpy()
    np.testing.assert_allclose(adapter.layer_delta(factors), want, atol=1e-6)
    a2, b2, s = adapter.lora_factors(factors)
    assert a2.shape == (4, 12) and b2.shape == (16, 4) and s == 4.0 / 2
    np.testing.assert_allclose(s * b2 @ a2, want, atol=1e-6)


def test_peft_lora_ga_on_the_same_gradient():
    """peft 0.21's ``lora_ga`` init on the same model and gradient: the same singular vectors
    (up to each one's sign); the documented differences: peft's ``B0`` is also multiplied by
    the singular values ``S[r:2r]``, and its stable scale ``m^(1/4)/sqrt(gamma)`` is on ``B0``
    only (the paper's and the authors' code put it on both). The same effective model at start
    (the base's)."""
    from peft import LoraConfig, LoraGAConfig, get_peft_model
    from peft.tuners.lora.loraga import preprocess_loraga

    r = 2
    adapter, model, spec, grads, x, _ = init_tiny(r=r)
    base = Tiny()
    config = LoraConfig(
        r=r,
        lora_alpha=4.0,
        target_modules=["fc1", "fc2"],
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=16),
    )
    g = torch.Generator().manual_seed(1)
    xb, yb = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)

    def train_step():  # fedsim's G: the sum over two batches of 8 of each batch's mean loss
        for i in (0, 8):
            loss = torch.nn.functional.cross_entropy(base(xb[i : i + 8]), yb[i : i + 8])
            loss.backward()

    preprocess_loraga(base, config, train_step)
    np.testing.assert_allclose(
        base.fc1._peft_loraga_grad.numpy() * 2, grads["fc1"], rtol=1e-5, atol=1e-7
    )  # peft averages over its backward calls; scale does not change singular vectors
    # peft takes the singular vectors from torch.svd_lowrank (randomised: a sketch of 4r columns,
    # 4 power iterations, drawn from torch's global generator), so its factors depend on that
    # generator's state: seeded here, or the result depends on the tests run before. With seeds
    # 1-7, five were up to 1.2e-4 off (0.8% of a small entry): the sketch's accuracy, not ours
    # (fedsim's factors equal an exact eigendecomposition to 1e-12 above)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, config)
    for name in ("fc1", "fc2"):
        ours = model.get_submodule(name)
        theirs = peft_model.base_model.model.get_submodule(name)
        a_p = theirs.lora_A["default"].weight.detach().double().numpy()
        b_p = theirs.lora_B["default"].weight.detach().double().numpy()
        a_f = ours.lora_A.weight.detach().double().numpy()
        b_f = ours.lora_B.weight.detach().double().numpy()
        sing = np.linalg.svd(grads[name].astype(np.float64) / 2, compute_uv=False)[r : 2 * r]
        c = theirs.out_features**0.25 / 16**0.5  # the stable scale, which peft puts on B only
        np.testing.assert_allclose(c * np.abs(a_p), np.abs(a_f), atol=1e-4)
        np.testing.assert_allclose(np.abs(b_p / sing), np.abs(b_f), atol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(peft_model(x).numpy(), model(x).numpy(), atol=1e-5)


def test_the_yaml_lists_the_class_default():
    """A run saved before LoRA had ``init`` resumes: the class default is the YAML's mapping."""
    cfg = yaml.safe_load((ROOT / "conf" / "adapter" / "lora.yaml").read_text())
    assert cfg["init"] == dict(DEFAULT_INIT)


def expected_bytes(first_time_offset: bool = True) -> list[tuple[int, int]]:
    """FedIT's bytes plus A0, B0 (r(m+n) per layer) at each client's first participation."""
    sampler, seen, out = ClientSampler(N, K, seed=0), set(), []
    offset = ref.VALUE_BYTES * sum(R * (m + n) for m, n in LAYERS)
    for t in range(1, ROUNDS + 1):
        clients = sampler.train_clients(t)
        down = sum(ref.bytes_fedit(LAYERS, R, HEAD) + offset * (c not in seen) for c in clients)
        out.append((K * ref.bytes_fedit(LAYERS, R, HEAD), down))
        seen.update(clients)
    return out


def test_source_server_and_clients_bytes(run_tiny):
    summary, rows, _ = run_tiny(GA, *RUN)
    init = summary["adapter_init"]
    assert init["method"] == "lora_ga" and init["source"] == "server" and init["examples"] == 256
    assert (rows[0]["bytes_up"], rows[0]["bytes_down"]) == (0, 0) == (init["bytes_up"], 0)
    assert init["epsilon"] is None and init["direction"] == "ArB2r"
    assert [(r["bytes_up"], r["bytes_down"]) for r in rows[1:]] == expected_bytes()

    _, base_rows, _ = run_tiny(*RUN)
    assert rows[0]["eval_loss"] == base_rows[0]["eval_loss"]  # the offset: unchanged at start

    summary, rows, _ = run_tiny(GA, "adapter.init.source=clients", *RUN)
    init = summary["adapter_init"]
    setup = ClientSampler(N, K, seed=0).train_clients(0)
    assert init["source"] == "clients" and init["clients"] == setup
    dense = len(setup) * sum(ref.VALUE_BYTES * m * n for m, n in LAYERS)  # G of every layer
    assert rows[0]["bytes_up"] == init["bytes_up"] == dense and rows[0]["bytes_down"] == 0
    assert [(r["bytes_up"], r["bytes_down"]) for r in rows[1:]] == expected_bytes()
    assert summary["bytes_up_total"] == dense + sum(r["bytes_up"] for r in rows[1:])


def test_dpsgd_charges_the_set_up_as_lora_sb_does(run_tiny):
    dp = ("privacy=dpsgd", "privacy.target_epsilon=null", "privacy.noise_multiplier=2.0")
    sb, sb_rows, _ = run_tiny(*dp, "strategy=fedsb", "adapter.init.source=clients")
    ga, ga_rows, _ = run_tiny(*dp, GA, "adapter.init.source=clients")
    assert ga_rows[0]["epsilon"] > 0 and ga["adapter_init"]["epsilon"] == ga_rows[0]["epsilon"]
    assert ga_rows[0]["epsilon"] == sb_rows[0]["epsilon"]
    dense = sum(ref.VALUE_BYTES * m * n for m, n in LAYERS)  # float32 G, noised as without DP
    for summary, rows in ((sb, sb_rows), (ga, ga_rows)):
        assert rows[0]["bytes_up"] == len(summary["adapter_init"]["clients"]) * dense
    assert ga["epsilon"] == pytest.approx(sb["epsilon"], rel=1e-12)
    assert "in the total" in ga["adapter_init"]["privacy"]


def test_fedex_is_exact_and_strategies_run(run_tiny):
    summary, rows, _ = run_tiny("strategy=fedex", GA, "adapter.init.source=clients", *RUN)
    assert max(r["aggregation_error"] for r in rows[1:]) <= 1e-12
    for strategy in ("fedsa", "local", "centralized"):
        summary, rows, _ = run_tiny(f"strategy={strategy}", GA, *RUN)
        assert summary["status"] == "ok", strategy


@pytest.mark.parametrize("strategy", ["fedavg", "fedex"])
def test_the_export_reproduces_the_model_on_the_pristine_weights(strategy, run_tiny, captured):  # noqa: F811
    extra = (f"strategy={strategy}", GA, "sim.rounds=2")
    summary, _, out = run_tiny(*extra)
    assert summary["export"]["max_relative_error"] < 1e-6
    if strategy == "fedavg":
        assert summary["export"]["rank_max"] == 2 * R  # [A; A0], [B, -B0]
    c, peft_model = load_exported(out / "adapter", tiny(*extra))
    simulated = captured["model"]
    assert_same_logits(c, simulated, peft_model)
    merged = peft_model.merge_and_unload()
    for module in ("blocks.0.fc", "blocks.1.fc", "blocks.2.fc"):
        layer = simulated.get_submodule(module)
        want = (layer.base.weight + layer.delta_weight()).detach().double()  # W0 (+ folds)
        got = merged.get_submodule(module).weight.detach().double()
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    from tests.test_checkpoint import interrupted_equals_uninterrupted

    args = tiny("sim.rounds=3", "sim.num_clients=5", "sim.clients_per_round=3", GA)
    interrupted_equals_uninterrupted(
        tmp_path / "a", monkeypatch, [*args, "adapter.init.source=clients"], at=0
    )
    interrupted_equals_uninterrupted(tmp_path / "b", monkeypatch, [*args, "strategy=fedex"], at=2)


def test_batched_engine_agrees(run_tiny):
    _, inline, _ = run_tiny(GA, *RUN)
    _, batched, _ = run_tiny(GA, "engine=batched", *RUN)
    for a, b in zip(inline, batched):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)


def test_copy_of_the_adapter_keeps_its_init():
    adapter = LoRA(init={"method": "lora_ga", "source": "clients"})
    twin = copy.deepcopy(adapter)
    assert twin.data_init.source == "clients" and twin.frozen_source == "data"
    assert LoRA().data_init is None and LoRA().frozen_suffixes == ()
