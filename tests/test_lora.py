"""LoRA: unchanged outputs at initialisation, the exact forward, and only adapters train."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.adapters import LoRA, LoRALinear, matching_linear_modules
from fedsim.errors import ConfigError
from fedsim.tasks import SyntheticTask


def _model_and_spec(r=4, alpha=8.0, dropout=0.0, targets=None):
    task = SyntheticTask(num_clients=2, hidden_dim=16, examples_per_client=8, test_examples=8)
    model = task.build_model()
    spec = LoRA(r=r, alpha=alpha, dropout=dropout, target_modules=targets).apply(
        model, default_targets=task.default_target_modules, head_modules=task.head_modules, seed=0
    )
    return task, model, spec


def test_output_unchanged_at_init():
    task = SyntheticTask(num_clients=2, hidden_dim=16, examples_per_client=8, test_examples=8)
    base = task.build_model()
    _, adapted, _ = _model_and_spec()
    x = torch.randn(5, task.input_dim)
    assert torch.equal(base(x), adapted(x))


def test_output_unchanged_on_a_plain_torch_model():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(layer, nn.Linear(16, 3))
    model.eval()
    x = torch.randn(2, 5, 16)
    before = model(x)
    spec = LoRA(r=2, target_modules=["linear1", "linear2"]).apply(
        model, default_targets=(), head_modules=("1",), seed=0
    )
    assert spec.adapted_modules == ["0.linear1", "0.linear2"]
    # Before adaptation PyTorch takes its fused inference path (no parameter requires grad),
    # after it the regular one: equal up to float32 rounding.
    assert torch.allclose(before, model(x), atol=1e-6, rtol=0)


def test_hugging_face_model_unchanged_at_init_and_only_adapters_train():
    """A tiny, randomly initialised BERT (nothing from a hub): LoRA on query/value + head."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 50, (2, 7))
    before = model(input_ids=ids).logits
    spec = LoRA(r=2, target_modules=["query", "value"]).apply(
        model, default_targets=(), head_modules=("classifier",), seed=0
    )
    assert torch.equal(before, model(input_ids=ids).logits)
    assert len(spec.adapted_modules) == 4  # 2 layers x (query, value)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set(spec.trained)
    assert all("lora_" in n or n.startswith("classifier.") for n in trained)
    assert spec.num_trained(model) == 4 * 2 * (16 + 16) + 16 * 3 + 3


def test_forward_matches_the_equation_in_numpy():
    """y = W0 x + b + (alpha / r) B A x, computed independently in float64 numpy."""
    g = torch.Generator().manual_seed(1)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, r=3, alpha=9.0, dropout=0.0, generator=g)
    with torch.no_grad():  # give B non-zero values so the update term is exercised
        layer.lora_B.weight.copy_(torch.randn(5, 3, generator=g))
    x = torch.randn(4, 6, generator=g)
    w0 = base.weight.detach().double().numpy()
    b0 = base.bias.detach().double().numpy()
    a = layer.lora_A.weight.detach().double().numpy()
    b = layer.lora_B.weight.detach().double().numpy()
    expected = x.double().numpy() @ (w0 + (9.0 / 3) * b @ a).T + b0
    np.testing.assert_allclose(layer(x).detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        layer.delta_weight().detach().double().numpy(), 3.0 * b @ a, rtol=1e-6, atol=1e-7
    )


def test_only_adapter_and_head_weights_train():
    task, model, spec = _model_and_spec()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == set(spec.trained) == set(spec.sent)
    assert all(("lora_A" in n or "lora_B" in n or n.startswith("classifier.")) for n in names)
    assert spec.adapted_modules == ["blocks.0.fc", "blocks.1.fc", "blocks.2.fc"]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(spec.trained_parameters(model), lr=0.1)
    x = torch.randn(16, task.input_dim)
    y = torch.randint(0, task.num_classes, (16,))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    params = dict(model.named_parameters())
    for n, v in frozen.items():
        assert torch.equal(params[n], v), f"frozen parameter {n} changed"
    changed = [n for n, v in trained.items() if not torch.equal(params[n], v)]
    assert set(changed) == set(trained)  # B moves at step 1, then A
    # rank r=4 on 32->16, 16->16, 16->16 plus a 16->10 head
    assert spec.num_trained(model) == 4 * (32 + 16) + 4 * (16 + 16) * 2 + 16 * 10 + 10


def test_target_selection_by_suffix_and_regex():
    task = SyntheticTask(num_clients=2, hidden_dim=16, examples_per_client=8, test_examples=8)
    model = task.build_model()
    assert matching_linear_modules(model, ["fc"]) == ["blocks.0.fc", "blocks.1.fc", "blocks.2.fc"]
    assert matching_linear_modules(model, r"blocks\.[12]\.fc") == ["blocks.1.fc", "blocks.2.fc"]
    assert matching_linear_modules(model, ["blocks.0.fc"]) == ["blocks.0.fc"]
    assert matching_linear_modules(model, ["c"]) == []  # whole name components only


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"r": 0}, "adapter.r"),
        ({"r": -2}, "adapter.r"),
        ({"r": 2.5}, "adapter.r"),
        ({"alpha": 0}, "adapter.alpha"),
        ({"dropout": 1.0}, "adapter.dropout"),
    ],
)
def test_bad_lora_settings_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        LoRA(**kwargs)
    assert err.value.key == key


def test_targets_that_match_nothing_are_a_config_error():
    with pytest.raises(ConfigError, match="matches no nn.Linear"):
        _model_and_spec(targets=["nothing"])


def test_dropout_is_only_active_in_training():
    _, model, spec = _model_and_spec(dropout=0.5)
    with torch.no_grad():  # non-zero B, so the adapter branch (where dropout sits) contributes
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_()
    x = torch.randn(4, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def _narrow_model():
    """A 4 x 8 layer (m = 4 outputs, n = 8 inputs), a 16 x 4 one, and a head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 16), nn.Linear(16, 2))


@pytest.mark.parametrize(
    "adapter, limit, says",
    [
        ("lora", 4, "min(m, n) = 4 of the smallest adapted layer, 0 (4 x 8, m x n)"),
        ("lora_sb", 4, "min(m, n) = 4 of the smallest adapted layer, 0 (4 x 8, m x n)"),
        ("ffa", 4, "n = 4 of the smallest adapted layer, 1 (16 x 4, m x n)"),
    ],
)
def test_a_rank_above_the_smallest_layer_is_refused_before_anything_is_built(adapter, limit, says):
    from fedsim.adapters import FFALoRA, LoRASB

    make = {"lora": LoRA, "lora_sb": lambda r: LoRASB(r=r, init={"method": "random"})}
    make["ffa"] = FFALoRA
    model = _narrow_model()
    make[adapter](r=limit).apply(model, default_targets=["0", "1"], head_modules=("2",), seed=0)
    model = _narrow_model()
    with pytest.raises(ConfigError) as err:
        make[adapter](r=limit + 1).apply(
            model, default_targets=["0", "1"], head_modules=("2",), seed=0
        )
    assert err.value.key == "adapter.r" and err.value.value == limit + 1
    assert says in str(err.value)
    assert all(type(m) is nn.Linear for m in model)  # refused before any layer was replaced
    assert all(p.requires_grad for p in model.parameters())  # nor frozen


def _best_fit_residual(a: np.ndarray, target: np.ndarray) -> float:
    """min over B of ||B A - target|| (A fixed): least squares, row by row."""
    b = np.linalg.lstsq(a.T, target.T, rcond=None)[0].T
    return float(np.linalg.norm(b @ a - target))


def test_the_rank_bounds_are_where_a_larger_rank_stops_adding_updates():
    """LoRA: rank min(m, n) already reaches every m x n matrix (B = U S, A = V^T). FFA-LoRA
    (A frozen, r x n): B A reaches the matrices whose rows lie in A's row space, which grows
    until r = n, past min(m, n) when m < n; so its bound is n, not min(m, n)."""
    rng = np.random.default_rng(0)
    m, n = 4, 8
    target = rng.standard_normal((m, n))
    u, s, vt = np.linalg.svd(target, full_matrices=False)
    assert np.allclose((u * s) @ vt, target)  # LoRA at r = min(m, n) = 4: exact
    residuals = [_best_fit_residual(rng.standard_normal((r, n)), target) for r in (4, 6, 8, 10)]
    assert residuals[0] > residuals[1] > 1e-6  # r = 6 > min(m, n) still adds updates
    assert residuals[2] < 1e-9 and residuals[3] < 1e-9  # r = n reaches everything
    from fedsim.adapters import FFALoRA

    def apply(adapter):
        return adapter.apply(_narrow_model(), default_targets=["0"], head_modules=("2",), seed=0)

    assert apply(FFALoRA(r=6)).shapes == {"0": (4, 8)}  # m = 4 < r = 6 <= n = 8: accepted
    for refused in (FFALoRA(r=9), LoRA(r=6)):
        with pytest.raises(ConfigError, match="adapter.r"):
            apply(refused)


def test_lora_sb_first_step_size_by_each_rule():
    """eta1: the client schedule's first rate, the reference code's lr / (warmup_ratio * total
    steps) (train_arithmetic.py's eff_lr), or a number; anything else is refused."""
    from fedsim.adapters import LoRASB
    from fedsim.adapters.data_init import InitRun
    from fedsim.training import ConstantSchedule

    run = InitRun(lr=0.01, schedule=ConstantSchedule(warmup_steps=4), total_steps=10000)
    first = {
        rule: LoRASB(init={"eta1": rule}).data_init.first_step(run)
        for rule in ("schedule", "reference", 0.003)
    }
    assert first["schedule"] == pytest.approx(0.01 / 5)  # the warm-up's first factor, 1/(4+1)
    assert first["reference"] == pytest.approx(0.01 / (0.02 * 10000))
    assert first[0.003] == 0.003
    ratio = LoRASB(init={"eta1": "reference", "warmup_ratio": 0.06}).data_init.first_step(run)
    assert ratio == pytest.approx(0.01 / 600)
    short = InitRun(lr=0.01, schedule=ConstantSchedule(), total_steps=20)  # < one warm-up step
    assert LoRASB(init={"eta1": "reference"}).data_init.first_step(short) == 0.01
    for bad in ("fast", -1, 0):
        with pytest.raises(ConfigError, match="must be schedule, reference or a number > 0"):
            LoRASB(init={"eta1": bad})
