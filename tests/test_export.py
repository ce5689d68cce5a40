"""PEFT export: the adapter written after the last round, loaded with
``peft.PeftModel.from_pretrained`` on the task's pretrained model, gives the simulated global
model's logits (to 1e-5) for every strategy that has a global model."""

from __future__ import annotations

import json

import pytest
import torch

import fedsim.export


@pytest.fixture
def captured(monkeypatch):
    """The server's global model at export time (the simulated model)."""
    seen = {}
    original = fedsim.export.export_peft

    def spy(model, *args, **kwargs):
        import copy

        seen["model"] = copy.deepcopy(model)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(fedsim.export, "export_peft", spy)
    return seen


def load_exported(folder, cfg_overrides):
    from peft import PeftModel

    from fedsim.build import build_components
    from fedsim.config import compose

    c = build_components(compose(cfg_overrides)[0])
    peft_model = PeftModel.from_pretrained(c.task.build_model(), str(folder))
    peft_model.eval()
    return c, peft_model


def assert_same_logits(c, simulated, peft_model, rtol: float = 1e-5):
    batch = {k: v[:64] for k, v in c.task.test_set().items()}
    simulated.eval()
    with torch.no_grad():
        want = c.task.logits(simulated, batch)
        got = c.task.logits(peft_model, batch)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= rtol * max(scale, 1.0)


STRATEGIES = ["fedavg", "fedsb", "ffa", "fedex", "flora", "centralized"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exported_adapter_reproduces_the_global_model(strategy, run_tiny, captured):
    from tests.conftest import tiny

    extra = (f"strategy={strategy}", "sim.rounds=3")
    summary, _, out = run_tiny(*extra)
    info = summary["export"]
    assert info["path"] == "adapter" and info["max_relative_error"] < 1e-6
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["classifier"]
    if strategy in ("fedex", "flora"):  # their change lives partly in the base: SVD ranks
        assert info["ranks_from_svd"] == info["modules"] and info["rank_max"] > 8
    else:
        assert info["ranks_from_svd"] == 0 and info["rank_max"] == 8
    c, peft_model = load_exported(out / "adapter", tiny(*extra))
    assert_same_logits(c, captured["model"], peft_model)


@pytest.mark.parametrize("strategy", ["fedex", "flora"])
def test_folded_changes_export_at_the_rank_they_need(strategy, run_tiny):
    """Two clients, one round: a fold of rank <= 8 (FedEx's residual of 2 clients; FLoRA's
    stack of 2 rank-8 products is <= 16) plus the current adapter (rank 8 or 0). The SVD
    works on the exact float64 change, so float32 rounding does not inflate the rank."""
    summary, _, _ = run_tiny(f"strategy={strategy}", "sim.num_clients=2", "sim.rounds=1")
    info = summary["export"]
    assert info["ranks_from_svd"] == info["modules"] and 1 <= info["rank_max"] <= 16
    assert info["max_relative_error"] < 1e-6


def test_personal_strategies_say_why_they_do_not_export(run_tiny):
    summary, _, out = run_tiny("strategy=fedsa")
    assert "no global model" in summary["export"]["skipped"]
    assert not (out / "adapter").exists()
    summary, _, out = run_tiny("export=false")
    assert summary["export"] == {"skipped": "export=false"} and not (out / "adapter").exists()


@pytest.mark.parametrize(
    "which, strategy", [("hf", "fedsb"), ("hf", "fedex"), ("math", "fedsb"), ("math", "flora")]
)
def test_hugging_face_model_exports_load_on_the_base_model(
    which, strategy, run_tiny, captured, request
):
    """A classifier (tiny BERT) and a causal LM (tiny Llama): ``PeftModel`` on the task's model,
    and PEFT's ``AutoPeftModelFor...`` from the adapter folder alone, give the simulated logits."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

    from tests.conftest import tiny

    extra = (*request.getfixturevalue(f"{which}_task"), f"strategy={strategy}")
    summary, _, out = run_tiny(*extra)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == summary["export"]["base_model"]
    task_type = {"hf": "SEQ_CLS", "math": "CAUSAL_LM"}[which]
    assert config["task_type"] == summary["export"]["task_type"] == task_type
    c, peft_model = load_exported(out / "adapter", tiny(*extra))
    assert_same_logits(c, captured["model"], peft_model)
    auto = {"hf": AutoPeftModelForSequenceClassification, "math": AutoPeftModelForCausalLM}
    loaded = auto[which].from_pretrained(str(out / "adapter"))  # binary: the default 2 labels
    assert_same_logits(c, captured["model"], loaded.eval())


@pytest.mark.parametrize("where", ["factor", "head", "folded"])
def test_a_model_holding_nan_or_inf_is_refused_and_nothing_is_written(where, tmp_path):
    """export_peft checks every parameter (and a folding strategy's base changes) before it
    writes: a NaN adapter is never exported with a small reported error."""
    import numpy as np

    from fedsim.build import build_components
    from fedsim.config import compose
    from fedsim.export import NotFinite, export_peft
    from tests.conftest import tiny

    c = build_components(compose(tiny())[0])
    model, spec = c.model()
    params = dict(model.named_parameters())
    factor = next(n for n in params if "lora_A" in n)
    head = next(n for n in params if n.startswith(tuple(c.task.head_modules)))
    changes = None
    with torch.no_grad():
        if where == "factor":
            params[factor].view(-1)[3] = float("nan")
        elif where == "head":
            params[head].view(-1)[0] = float("inf")
    if where == "folded":
        module = spec.adapted_modules[0]
        shape = tuple(model.get_submodule(module).weight.shape)
        changes = {module: np.full(shape, np.nan)}
    out = tmp_path / "adapter"
    with pytest.raises(NotFinite, match="non-finite value"):
        export_peft(
            model,
            spec,
            c.task.build_model(),
            tuple(c.task.head_modules),
            out,
            base_changes=changes,
        )
    assert not out.exists()


def test_packaged_models_are_named_portably_in_the_export():
    """A packaged model's PEFT base is its Hub id, not this machine's site-packages path; a
    folder the user gives stays as written."""
    from fedsim.tasks import SentimentTask
    from fedsim.tasks.generative import SMOLLM2_ID
    from fedsim.tasks.text import MINILM_ID

    packaged = SentimentTask()
    assert packaged.model_id == MINILM_ID != packaged.model_path
    assert "site-packages" not in packaged.model_id
    given = SentimentTask(model=packaged.model_path)
    assert given.model_id == given.model_path == packaged.model_path
    assert SMOLLM2_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
