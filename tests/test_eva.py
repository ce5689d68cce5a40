"""EVA (adapter=lora adapter.init.method=eva): the statistics, components and ranks against
numpy, the federated sum against the centralised computation, peft's EVA on a tiny model, and
whole runs (bytes, per-layer ranks in every strategy, DP-SGD, resume, export)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.adapters import LoRA
from fedsim.adapters.activations import layer_statistics, private_layer_statistics
from fedsim.adapters.data_init import InitRun
from fedsim.adapters.eva import principal_components, redistribute
from tests.conftest import tiny

# ----------------------------------------------------------------------------- a tiny model


class Tiny(nn.Module):
    """Embedding -> fc1 -> GELU -> fc2 -> mean over tokens -> head; token id 0 is padding."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(30, 16)
        self.fc1 = nn.Linear(16, 12)
        self.fc2 = nn.Linear(12, 10)
        self.head = nn.Linear(10, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.fc1.weight[:2] *= 6.0  # fc2's inputs: two dominant directions (unequal ranks)

    def forward(self, input_ids, attention_mask=None, **_):
        h = self.fc2(nn.functional.gelu(self.fc1(self.emb(input_ids))))
        return self.head(h.mean(1))


class TinyTask:
    label_key = "label"

    def logits(self, model, batch):
        return model(batch["input_ids"], batch["attention_mask"])


def tiny_data(n: int = 40, length: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 30, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # padding: id 0, whose embedding is not zero (the mask must remove it)
    return {"input_ids": ids, "attention_mask": mask, "label": torch.zeros(n, dtype=torch.long)}


def adapted(r: int = 3, rho: float = 2.0, **init):
    model = Tiny()
    adapter = LoRA(r=r, alpha=6.0, init={"method": "eva", "rho": rho, **init})
    spec = adapter.apply(model, default_targets=["fc1", "fc2"], head_modules=["head"], seed=0)
    return model, spec, adapter


def stacked_inputs(data) -> dict[str, np.ndarray]:
    """Every non-padding token's input of fc1 and fc2, computed directly (float64)."""
    base = Tiny().double()
    with torch.no_grad():
        x1 = base.emb(data["input_ids"])
        x2 = nn.functional.gelu(base.fc1(x1))
    keep = data["attention_mask"].bool()
    return {"fc1": x1[keep].numpy(), "fc2": x2[keep].numpy()}


def svd_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Right singular vectors of the centred stacked inputs (signed as sklearn's svd_flip on
    V: each row's largest-magnitude entry positive) and explained-variance ratios."""
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    signs = np.sign(vt[np.arange(len(vt)), np.argmax(np.abs(vt), axis=1)])
    return vt * signs[:, None], s**2 / np.sum(xc**2)


RUN = InitRun(lr=0.01, schedule=None, total_steps=1)

# ----------------------------------------------------------------------------- the math


def test_statistics_and_components_equal_the_svd_of_the_stacked_masked_inputs():
    data = tiny_data()
    model, spec, _ = adapted()
    stats = layer_statistics(model, spec, TinyTask(), data, batch_size=7)
    for module, x in stacked_inputs(data).items():
        np.testing.assert_allclose(stats[f"{module}/scatter"], x.T @ x, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats[f"{module}/sum"], x.sum(0), rtol=1e-5, atol=1e-5)
        assert stats[f"{module}/count"][0] == len(x)  # padding tokens excluded
        v, ratios = principal_components(
            stats[f"{module}/scatter"], stats[f"{module}/sum"], stats[f"{module}/count"][0]
        )
        want_v, want_ratios = svd_reference(x)
        k = len(want_ratios)
        np.testing.assert_allclose(ratios[:k], want_ratios, atol=1e-6)
        np.testing.assert_allclose(v[:6], want_v[:6], atol=1e-4)  # distinct leading values


def test_rank_redistribution_takes_the_largest_ratios_within_rho_r():
    ratios = {
        "a": np.array([0.5, 0.3, 0.1, 0.05, 0.04]),
        "b": np.array([0.4, 0.35, 0.2, 0.05, 0.0]),
        "c": np.array([0.9, 0.05, 0.03, 0.02, 0.0]),
    }
    # budget 3 x 2 = 6 of each layer's first round(2 x 2) = 4: .9c .5a .4b .35b .3a .2b
    assert redistribute(ratios, r=2, rho=2.0) == {"a": 2, "b": 3, "c": 1}
    assert redistribute(ratios, r=2, rho=1.0) == {"a": 2, "b": 2, "c": 2}  # uniform
    # rho = 1.5: at most round(3) = 3 each; budget 6: .9c .5a .4b .35b .3a .2b as above
    assert redistribute(ratios, r=2, rho=1.5) == {"a": 2, "b": 3, "c": 1}
    # a layer peft would give rank 0 keeps its first component; the budget stays r x layers
    low = {"a": np.array([0.5, 0.4, 0.3, 0.2]), "b": np.array([0.45, 0.35, 0.25, 0.15])}
    low["c"] = np.array([0.01, 0.005, 0.0, 0.0])
    assert redistribute(low, r=2, rho=2.0) == {"a": 3, "b": 2, "c": 1}


def test_initialisation_sets_a_from_the_components_at_per_layer_ranks_and_b_zero():
    data = tiny_data()
    model, spec, adapter = adapted(r=3, rho=2.0)
    stats = layer_statistics(model, spec, TinyTask(), data, batch_size=16)
    info = adapter.data_init.initialize(model, spec, stats, RUN)
    ratios = {m: svd_reference(x)[1] for m, x in stacked_inputs(data).items()}
    assert info["ranks"] == redistribute(ratios, 3, 2.0)
    assert sum(info["ranks"].values()) == 3 * 2 and len(set(info["ranks"].values())) == 2
    for module, x in stacked_inputs(data).items():
        layer = model.get_submodule(module)
        rank = info["ranks"][module]
        a = layer.lora_A.weight.detach().double().numpy()
        assert a.shape == (rank, x.shape[1]) and layer.lora_B.weight.shape == (
            10 if module == "fc2" else 12,
            rank,
        )
        np.testing.assert_allclose(a, svd_reference(x)[0][:rank], atol=1e-4)
        assert not layer.lora_B.weight.detach().any()
        assert layer.scaling == pytest.approx(6.0 / rank)
    # the spec follows the rebuilt layers: its parameters are the model's
    params = dict(model.named_parameters())
    assert all(spec.parameters_of(model)[n] is params[n] for n in spec.trained)


def test_federated_sum_of_client_statistics_equals_the_centralised_init():
    data = tiny_data(n=60)
    model, spec, adapter = adapted()
    central = layer_statistics(model, spec, TinyTask(), data, batch_size=8)
    parts = [slice(0, 13), slice(13, 41), slice(41, 60)]
    clients = [
        layer_statistics(model, spec, TinyTask(), {k: v[s] for k, v in data.items()}, 5)
        for s in parts
    ]
    summed = {k: sum(c[k] for c in clients) for k in central}
    for k in central:
        np.testing.assert_allclose(summed[k], central[k], rtol=1e-12, atol=1e-9)
    m1, s1, _ = adapted()
    m2, s2, _ = adapted()
    i1 = adapter.data_init.initialize(m1, s1, central, RUN)
    i2 = adapter.data_init.initialize(m2, s2, summed, RUN)
    assert i1["ranks"] == i2["ranks"]
    for name in s1.trained:
        torch.testing.assert_close(
            dict(m1.named_parameters())[name], dict(m2.named_parameters())[name], atol=1e-6, rtol=0
        )


def test_private_statistics_clip_each_example_jointly_then_add_noise():
    data = tiny_data(n=12)
    model, spec, _ = adapted()
    plain = layer_statistics(model, spec, TinyTask(), data, batch_size=5)
    g = torch.Generator().manual_seed(0)
    loose = private_layer_statistics(model, spec, TinyTask(), data, 1e9, 0.0, g, 5)
    for k in plain:
        np.testing.assert_allclose(loose[k], plain[k], rtol=1e-10, atol=1e-9)
    # numpy: each example's scatters, sums and counts of both layers as one vector, clipped
    clip, per = 3.0, []
    for i in range(12):
        one = {k: v[i : i + 1] for k, v in data.items()}
        per.append(layer_statistics(model, spec, TinyTask(), one, batch_size=1))
    want = {k: 0.0 for k in plain}
    for stats in per:
        norm = np.sqrt(sum(float(np.sum(v**2)) for v in stats.values()))
        for k, v in stats.items():
            want[k] = want[k] + v * min(1.0, clip / norm)
    clipped = private_layer_statistics(model, spec, TinyTask(), data, clip, 0.0, g, 5)
    for k in plain:
        np.testing.assert_allclose(clipped[k], want[k], rtol=1e-9, atol=1e-9)
    noisy = private_layer_statistics(
        model, spec, TinyTask(), data, clip, 2.0, torch.Generator().manual_seed(1), 5
    )
    residual = np.concatenate([(noisy[k] - want[k]).ravel() for k in plain])
    assert residual.std() == pytest.approx(2.0 * clip, rel=0.1)  # N(0, (sigma C)^2)


# ----------------------------------------------------------------------------- peft's EVA


def test_equals_peft_eva_up_to_its_incremental_svd():
    """peft's ``get_eva_state_dict`` (incremental PCA, stopped when the components' cosine
    similarity passes tau) on one batch repeated: the same ranks and, row by row, the same
    components (both sign each vector so its largest-magnitude entry is positive), to the
    tolerance of its randomised low-rank SVD."""
    from peft import EvaConfig, LoraConfig
    from peft.tuners.lora import get_eva_state_dict

    data = tiny_data(n=50)
    batch = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    config = LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=["fc1", "fc2"],
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=2.0, tau=0.99999, adjust_scaling_factors=False),
    )
    torch.manual_seed(0)
    peft_state = get_eva_state_dict(Tiny(), [batch], config, show_progress_bar=False)
    model, spec, adapter = adapted(r=3, rho=2.0)
    stats = layer_statistics(model, spec, TinyTask(), data, batch_size=50)
    info = adapter.data_init.initialize(model, spec, stats, RUN)
    assert info["ranks"] == {m: int(v.shape[0]) for m, v in peft_state.items()}
    assert info["ranks"] == {"fc1": 4, "fc2": 2}  # redistributed, not uniform
    for module, theirs in peft_state.items():
        ours = model.get_submodule(module).lora_A.weight.detach().numpy()
        np.testing.assert_allclose(ours, theirs.numpy(), atol=2e-3)


# ----------------------------------------------------------------------------- whole runs

LAYERS = [(32, 32)] * 3  # the tiny synthetic net
HEAD = 32 * 10 + 10
EVA = ("adapter.init.method=eva",)


def ranks_of(summary) -> list[int]:
    return list(summary["adapter_init"]["ranks"].values())


def fedit_bytes(ranks: list[int]) -> int:
    return 4 * (sum(r * (m + n) for r, (m, n) in zip(ranks, LAYERS)) + HEAD)


def test_a_server_run_states_its_ranks_and_pays_bytes_at_them(run_tiny):
    summary, rows, out = run_tiny(*EVA)
    init = summary["adapter_init"]
    assert init["method"] == "eva" and init["source"] == "server" and init["examples"] == 256
    assert init["bytes_up"] == init["bytes_down"] == 0 and init["epsilon"] is None
    ranks = ranks_of(summary)
    assert sum(ranks) == 8 * 3 and max(ranks) <= 16 and len(set(ranks)) > 1
    assert rows[0]["bytes_up"] == rows[0]["bytes_down"] == 0
    k = rows[1]["clients_sampled"]
    assert rows[1]["bytes_up"] == k * fedit_bytes(ranks)
    assert rows[1]["bytes_down"] == k * (fedit_bytes(ranks) + 4 * len(ranks))  # + the ranks
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    names = [m for m in init["ranks"]]
    assert {m: config["rank_pattern"].get(m, config["r"]) for m in names} == init["ranks"]
    assert set(config["alpha_pattern"].values()) == {16.0}  # scaling alpha / r_l


def test_a_set_up_round_of_clients_sends_the_statistics_and_gives_the_server_init(run_tiny):
    server, _, _ = run_tiny(*EVA, "task.server_examples=256")
    summary, rows, _ = run_tiny(*EVA, "adapter.init.source=clients")
    init = summary["adapter_init"]
    setup = init["clients"]
    # each set-up client: n x n scatter, n sum, 1 count per layer, float64
    per_client = 8 * sum(n * n + n + 1 for _, n in LAYERS)
    assert rows[0]["bytes_up"] == init["bytes_up"] == len(setup) * per_client
    assert rows[0]["bytes_down"] == init["bytes_down"] == 0
    assert sum(ranks_of(summary)) == 24
    assert rows[1]["bytes_up"] == rows[1]["clients_sampled"] * fedit_bytes(ranks_of(summary))
    assert server["adapter_init"]["source"] == "server"


@pytest.mark.parametrize("strategy", ["fedavg", "fedex", "fedsa", "local", "centralized"])
def test_every_strategy_that_keeps_the_adapter_runs_at_the_per_layer_ranks(strategy, run_tiny):
    summary, rows, _ = run_tiny(*EVA, f"strategy={strategy}")
    assert summary["status"] == "ok"
    assert sum(ranks_of(summary)) == 24 and len(set(ranks_of(summary))) > 1
    if strategy == "fedex":
        assert summary["aggregation_error_max"] < 1e-5


def test_the_batched_engine_learns_the_ranks_too(run_tiny):
    inline, a, _ = run_tiny(*EVA)
    batched, b, _ = run_tiny(*EVA, "engine=batched")
    assert ranks_of(inline) == ranks_of(batched)
    for x, y in zip(a, b):
        assert x["eval_accuracy"] == pytest.approx(y["eval_accuracy"], abs=0.02)
        assert x["bytes_up"] == y["bytes_up"] and x["bytes_down"] == y["bytes_down"]


def test_rho_one_keeps_every_layer_at_r_and_sends_no_ranks(run_tiny):
    summary, rows, _ = run_tiny(*EVA, "adapter.init.rho=1")
    assert ranks_of(summary) == [8, 8, 8]
    assert rows[1]["bytes_down"] == rows[1]["clients_sampled"] * fedit_bytes([8, 8, 8])


def test_the_set_up_round_under_dp_sgd_is_charged_to_each_client(run_tiny):
    from fedsim.build import build_components
    from fedsim.config import compose
    from fedsim.privacy import Accountant

    extra = (*EVA, "adapter.init.source=clients", "privacy=dpsgd")
    extra = (*extra, "privacy.target_epsilon=null", "privacy.noise_multiplier=2.0")
    summary, rows, _ = run_tiny(*extra)
    init = summary["adapter_init"]
    assert "in the total" in init["privacy"]
    c = build_components(compose(tiny(*extra))[0])
    n = max(c.data.num_train(client) for client in init["clients"])
    one = Accountant.from_array(None, c.privacy.accountant)
    one.step(2.0, 1.0)  # the set-up: one Gaussian mechanism at sample rate 1
    assert init["epsilon"] == rows[0]["epsilon"] > 0
    assert init["epsilon"] == pytest.approx(one.epsilon(c.privacy.delta_for(n)), rel=1e-9)
    assert summary["epsilon"] > init["epsilon"]


def test_a_run_resumes_bit_identically_at_per_layer_ranks(tmp_path, monkeypatch):
    from tests.test_checkpoint import interrupted_equals_uninterrupted

    for strategy in ("fedavg", "fedsa"):
        args = tiny(*EVA, f"strategy={strategy}", "sim.rounds=3", "adapter.init.source=clients")
        folder = tmp_path / strategy
        folder.mkdir()
        full, _ = interrupted_equals_uninterrupted(folder, monkeypatch, args, at=1)
        assert len(set(full["adapter_init"]["ranks"].values())) > 1


def test_a_hugging_face_model_counts_only_its_real_tokens_and_trains(run_tiny, hf_task):
    """On a tiny BERT with padded texts: every adapted layer sees each non-padding token once
    (the attention mask removes the rest), and a run from a set-up round of clients trains."""
    from fedsim.build import build_components
    from fedsim.config import compose

    c = build_components(compose(tiny(*hf_task, *EVA))[0])
    model, spec = c.model()
    train = c.data.client(0).train
    data = {k: v[:20] for k, v in train.items()}
    assert int(data["attention_mask"].sum()) < data["attention_mask"].numel()  # padded
    stats = layer_statistics(model, spec, c.task, data, batch_size=8)
    counts = {m: stats[f"{m}/count"][0] for m in spec.adapted_modules}
    tokens = int(data["attention_mask"].sum())
    # the encoder's layers see every real token once; BERT's pooler one vector per example
    assert counts == {m: 20 if m.endswith("pooler.dense") else tokens for m in counts}
    assert sum(c == tokens for c in counts.values()) >= 6
    summary, rows, _ = run_tiny(*hf_task, *EVA, "adapter.init.source=clients", "sim.rounds=2")
    assert summary["status"] == "ok"
    assert sum(ranks_of(summary)) == 8 * len(spec.adapted_modules)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
