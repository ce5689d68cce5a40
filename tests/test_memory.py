"""Memory options of the Hugging Face tasks (fedsim.tasks.memory): gradient checkpointing gives
the gradients and the runs of plain training; a 16-bit frozen base halves the base's bytes
while the head, the adapters and the optimizer state stay float32, and its PEFT export loads
on the base in that dtype; what cannot run is refused in one line."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import tiny
from tests.test_export import assert_same_logits, captured, load_exported  # noqa: F401


def _components(*overrides):
    from fedsim.build import build_components
    from fedsim.config import compose

    return build_components(compose(tiny(*overrides))[0])


def _gradients(overrides, checkpointing: bool):
    """The trained parameters' gradients after one training batch (seeded dropout), and how
    often the first adapted layer ran forward."""
    c = _components(*overrides, f"task.gradient_checkpointing={str(checkpointing).lower()}")
    model, spec = c.model()
    calls = []
    model.get_submodule(spec.adapted_modules[0]).register_forward_hook(lambda *_: calls.append(1))
    batch = {k: v[:8] for k, v in c.task.test_set().items()}
    model.train()
    torch.manual_seed(3)
    c.task.loss(model, batch).backward()
    return {n: p.grad for n, p in zip(spec.trained, spec.trained_parameters(model))}, len(calls)


@pytest.mark.parametrize("which", ["hf", "math"])
def test_checkpointing_gives_the_same_adapter_gradients(which, request):
    """LoRA on the tiny BERT (its own dropout and the adapter's on) and the tiny Llama: the
    backward pass recomputes each block (the adapted layer runs twice) and every trained
    parameter's gradient is the plain one."""
    overrides = [*request.getfixturevalue(f"{which}_task"), "adapter=lora"]
    if which == "hf":
        overrides += ["task.dropout=0.3", "adapter.dropout=0.1"]
    plain, once = _gradients(overrides, False)
    recomputed, twice = _gradients(overrides, True)
    assert (once, twice) == (1, 2)
    assert plain.keys() == recomputed.keys() and len(plain) > 4
    for name, grad in plain.items():
        assert torch.allclose(recomputed[name], grad, rtol=1e-6, atol=1e-9), name


@pytest.mark.parametrize("which", ["hf", "math"])
def test_a_checkpointed_run_has_the_plain_runs_metrics(which, run_tiny, request):
    extra = [*request.getfixturevalue(f"{which}_task"), "adapter=lora", "sim.rounds=1"]
    if which == "hf":
        extra += ["task.dropout=0.2", "adapter.dropout=0.1", "sim.rounds=2"]
    _, plain, _ = run_tiny(*extra)
    _, checkpointed, _ = run_tiny(*extra, "task.gradient_checkpointing=true")
    assert len(plain) == len(checkpointed)
    for a, b in zip(plain, checkpointed):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-6, abs=1e-9)
        assert b["eval_accuracy"] == a["eval_accuracy"]


def _parameter_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize(
    "which, strategy", [("hf", "fedsb"), ("hf", "fedavg"), ("hf", "ffa"), ("math", "fedsb")]
)
def test_a_16_bit_base_trains_float32_adapters_at_half_the_bytes(which, strategy, dtype, request):
    """The base's weights in ``dtype`` (half the bytes), the head and the adapters' own
    parameters (LoRA's A and B, LoRA-SB's A, B and the trained R) in float32, and so the
    optimizer's state; a training step gives a finite loss and float32 gradients."""
    overrides = [*request.getfixturevalue(f"{which}_task"), f"strategy={strategy}"]
    models = {}
    for d in ("float32", dtype):
        c = _components(*overrides, f"task.dtype={d}")
        models[d] = c, *c.model()
    c, model, spec = models[dtype]
    adapter = set(spec.trained) | set(spec.frozen)
    base = [p for n, p in model.named_parameters() if n not in adapter]
    assert {p.dtype for p in base} == {getattr(torch, dtype)}
    assert {p.dtype for n, p in model.named_parameters() if n in adapter} == {torch.float32}
    assert (which == "hf") == bool(spec.heads)  # the classifier's head trains; an LM has none
    _, model32, spec32 = models["float32"]
    base32 = [p for n, p in model32.named_parameters() if n not in adapter]
    assert 2 * _parameter_bytes(base) == _parameter_bytes(base32)
    optimizer = c.make_optimizer(spec.trained_parameters(model), lr=1e-3)
    model.train()
    loss = c.task.loss(model, {k: v[:8] for k, v in c.task.test_set().items()})
    loss.backward()
    optimizer.step()
    assert math.isfinite(float(loss.detach())) and loss.dtype == torch.float32
    state = [t for s in optimizer.state.values() for t in s.values() if t.is_floating_point()]
    assert state and {t.dtype for t in state if t.dim()} == {torch.float32}


@pytest.mark.parametrize("which", ["hf", "math"])
def test_a_16_bit_run_exports_what_peft_computes_on_that_base(which, run_tiny, captured, request):  # noqa: F811
    """A bfloat16 run (Fed-SB: LoRA-SB's server initialisation from the 16-bit base's
    gradients) ends with a finite loss; its export names the dtype, and PEFT's adapter on the
    task's base in bfloat16 gives the simulated logits to one bfloat16 step (2**-7 of the
    largest logit; the weights agree to 1e-6): on some CPUs the two identical-looking
    computations round apart (measured on one without AVX512-BF16: 29 of the math task's
    284,000 logits one step, 2**-10, apart; bit-identical on others)."""
    extra = (*request.getfixturevalue(f"{which}_task"), "strategy=fedsb", "task.dtype=bfloat16")
    summary, rows, out = run_tiny(*extra)
    assert summary["status"] == "ok" and all(math.isfinite(r["eval_loss"]) for r in rows)
    assert summary["export"]["base_dtype"] == "bfloat16"
    assert summary["export"]["max_relative_error"] < 1e-6
    c, peft_model = load_exported(out / "adapter", tiny(*extra))
    assert_same_logits(c, captured["model"], peft_model, rtol=torch.finfo(torch.bfloat16).eps)


def test_a_float32_export_names_no_dtype(run_tiny, hf_task):
    summary, _, _ = run_tiny(*hf_task, "adapter=lora", "sim.rounds=1")
    assert "base_dtype" not in summary["export"]


def test_what_cannot_run_is_refused_in_one_line(hf_task, tmp_path, capsys):
    from fedsim.cli import main

    capsys.readouterr()
    no_bnb = "needs a CUDA GPU and the bitsandbytes package; this machine has"
    cases = [
        (["task.dtype=int8"], "task.dtype=int8: must be one of float32, bfloat16, float16"),
        (["task.quantization=4bit"], f"task.quantization=4bit: {no_bnb}"),
        (["task.quantization=8bit"], f"task.quantization=8bit: {no_bnb}"),
        (["task.quantization=2bit"], "must be one of none, 4bit, 8bit"),
        (["task.gradient_checkpointing=yes"], "task.gradient_checkpointing=yes"),
        (["task.dtype=float16", "task.precision=bfloat16"], "mixes two 16-bit formats"),
        (["task.dtype=bfloat16", "strategy=fedex"], "(8 significant bits) would round"),
        (["task.dtype=float16", "strategy=flora"], "(11 significant bits) would round"),
        (["task.gradient_checkpointing=true", "engine=batched"], "torch.func.vmap"),
        (
            ["task.gradient_checkpointing=true", "privacy=dpsgd", "partition=iid"],
            "record them twice",
        ),
    ]
    for extra, expected in cases:
        with pytest.raises(SystemExit) as info:
            main(tiny(*hf_task, *extra, f"hydra.run.dir={tmp_path / 'r'}"))
        assert info.value.code == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, (extra, err)
        assert not (tmp_path / "r").exists()
