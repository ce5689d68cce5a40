"""task=math: generated problems, the causal-LM example layout, the answer loss and greedy exact
match against direct computations, federated runs on a tiny Llama, and SmolLM2 offline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.errors import ConfigError

MODULES = ["arithmetic__add_or_sub", "numbers__place_value"]


@pytest.fixture(scope="module")
def task(math_task):
    """The tiny-Llama math task of ``math_task``'s overrides, built directly."""
    from fedsim.tasks import MathTask

    model = next(o.split("=", 1)[1] for o in math_task if o.startswith("task.model="))
    return MathTask(
        model=model,
        modules=MODULES,
        examples=400,
        system_prompt=None,
        answer_tokens=8,
        test_examples=40,
        server_examples=64,
    )


def test_problems_are_seeded_distinct_balanced_and_cached(tmp_path, monkeypatch):
    from fedsim.tasks.generative import math_problems

    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path))
    state = random.getstate(), np.random.get_state()[1].copy()
    q, a, m = math_problems(MODULES, "easy", 101, seed=3)
    assert random.getstate() == state[0]  # the global generators are left as they were
    assert np.array_equal(np.random.get_state()[1], state[1])
    assert len(q) == len(set(q)) == 101 and all(isinstance(x, str) and x for x in a)
    assert np.bincount(m).tolist() == [51, 50]  # the modules interleaved, then cut
    cached = list((tmp_path / "math").glob("*.jsonl"))
    assert len(cached) == 1
    assert [json.loads(line)["q"] for line in cached[0].read_text().splitlines()] == q
    cached[0].write_text("damaged\n")  # rebuilt, not trusted
    assert math_problems(MODULES, "easy", 101, seed=3) == (q, a, m)
    other, _, _ = math_problems(MODULES, "easy", 101, seed=4)
    assert other != q
    hard, _, _ = math_problems(MODULES, "hard", 101, seed=3)
    assert np.mean([len(x) for x in hard]) > np.mean([len(x) for x in q])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"modules": ["arithmetic__nope"]}, "task.modules=arithmetic__nope: is not a module"),
        ({"modules": ["polynomials__expand"]}, "does not run with numpy"),
        ({"difficulty": "extreme"}, "task.difficulty=extreme: must be one of easy, medium"),
        ({"modules": []}, "give a list of mathematics_dataset modules"),
    ],
)
def test_bad_problem_settings_name_the_value(kwargs, message, tmp_path, monkeypatch):
    from fedsim.tasks.generative import math_problems

    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path))
    args = {"modules": MODULES, "difficulty": "easy", "count": 10, "seed": 0, **kwargs}
    with pytest.raises(ConfigError) as e:
        math_problems(**args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_settings_exit_2_without_a_traceback(math_task, capsys):
    from fedsim.cli import main
    from tests.conftest import tiny

    for bad in ("task.modules=[calculus__nope]", "task.modules=[calculus__differentiate]"):
        with pytest.raises(SystemExit) as info:
            main(tiny(*math_task, bad))
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"fedsim: error: {bad.replace('[', '').replace(']', '')}:"), err


def test_examples_are_the_prompt_then_the_answer_and_end_token(task):
    from fedsim.tasks.generative import IGNORE

    tok = task.tokenizer()
    questions, answers, _, _ = task.load_pairs()
    data = task.data
    for i in (0, 1, 57, 399):
        p = int(data["prompt_length"][i])
        n = int(data["attention_mask"][i].sum())
        prompt = tok(task.prompt(questions[i]), add_special_tokens=False)["input_ids"]
        assert data["input_ids"][i, :p].tolist() == prompt
        labels = data["labels"][i]
        assert (labels[:p] == IGNORE).all() and (labels[n:] == IGNORE).all()
        assert tok.decode(labels[p:n].tolist()) == answers[i] + "<|im_end|>"
        assert torch.equal(labels[p:n], data["input_ids"][i, p:n])
    assert task.prompt("Q?").endswith("<|im_start|>assistant\n")


def _unpadded_answer_loss(model, row_ids, row_labels) -> float:
    """Mean negative log-likelihood of the answer tokens, one unpadded example, float64."""
    from fedsim.tasks.generative import IGNORE

    n = int((row_labels != IGNORE).nonzero().max()) + 1
    with torch.no_grad():
        logits = model(input_ids=row_ids[None, :n]).logits[0].double().numpy()
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
    logp -= logits.max(1, keepdims=True)
    targets = [(t, int(row_labels[t])) for t in range(1, n) if int(row_labels[t]) != IGNORE]
    return float(np.mean([-logp[t - 1, y] for t, y in targets]))


def test_answer_loss_equals_a_direct_per_example_computation(task):
    model = task.build_model()
    model.eval()
    test = task.test_set()
    batch = {k: v[:6] for k, v in test.items()}  # different lengths: padding is exercised
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1
    want = [
        _unpadded_answer_loss(model, batch["input_ids"][i], batch["labels"][i]) for i in range(6)
    ]
    with torch.no_grad():
        mean = float(task.loss(model, batch))
        total = float(task.loss(model, batch, reduction="sum"))
    assert mean == pytest.approx(np.mean(want), rel=1e-5)
    assert total == pytest.approx(np.sum(want), rel=1e-5)


def _greedy_one(model, prompt_ids, steps, end) -> list[int]:
    ids = prompt_ids[None]
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == end:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_greedy_answers_equal_an_unpadded_greedy_loop(task):
    """Left-padded batched decoding (with its KV cache) against one example at a time."""
    from fedsim.adapters import LoRA

    model = task.build_model()
    LoRA(r=2).apply(model, default_targets=task.default_target_modules, head_modules=(), seed=0)
    with torch.no_grad():  # a non-zero adapter, so that decoding goes through it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    model.eval()
    batch = {k: v[:8] for k, v in task.test_set().items()}
    tok = task.tokenizer()
    _, end = task._end()
    got = task.greedy_answers(model, batch)
    for i in range(8):
        p = int(batch["prompt_length"][i])
        ids = _greedy_one(model, batch["input_ids"][i, :p], task.answer_tokens, end)
        assert got[i] == tok.decode(ids, skip_special_tokens=True)


def test_exact_match_counts_answers_equal_to_the_reference(task, monkeypatch):
    from fedsim.training import evaluate

    tok = task.tokenizer()
    questions, answers, _, _ = task.load_pairs()
    by_prompt = {task.prompt(q): a for q, a in zip(questions, answers)}

    def oracle(model, batch):  # right for even rows, with spaces around: still a match
        out = []
        for ids, p in zip(batch["input_ids"], batch["prompt_length"]):
            answer = by_prompt[tok.decode(ids[: int(p)].tolist())]
            out.append(f" {answer} " if len(out) % 2 == 0 else answer + "0")
        return out

    monkeypatch.setattr(task, "greedy_answers", oracle)
    res = evaluate(task.build_model(), task, task.test_set(), batch_size=10)
    assert res.accuracy == pytest.approx(0.5) and res.num_examples == 40
    assert np.isfinite(res.loss)


@pytest.mark.parametrize("strategy", ["fedavg", "fedsb"])
def test_a_federated_run_lowers_the_answer_loss(strategy, run_tiny, math_task):
    summary, rows, out = run_tiny(*math_task, f"strategy={strategy}", "sim.rounds=3")
    assert summary["status"] == "ok"
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert 0.0 <= rows[-1]["eval_accuracy"] <= 1.0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not config["modules_to_save"]


def test_dp_sgd_trains_the_causal_lm(run_tiny, math_task):
    """Per-example clipping of the answer loss through Opacus on the Llama blocks."""
    summary, rows, _ = run_tiny(
        *math_task,
        "privacy=dpsgd",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=0.5",
        "sim.rounds=1",
    )
    assert summary["status"] == "ok" and np.isfinite(rows[-1]["eval_loss"])
    assert 0 < summary["epsilon"] < float("inf")


def test_natural_partition_gives_clients_whole_modules(math_task):
    from fedsim.build import build_components
    from fedsim.config import compose
    from tests.conftest import tiny

    c = build_components(compose(tiny(*math_task, "partition=natural", "sim.num_clients=2"))[0])
    kinds = c.task.pool_labels()
    seen = [set(kinds[c.data.indices(k)].tolist()) for k in range(2)]
    assert sorted(map(sorted, seen)) == [[0], [1]]


def test_smollm2_loads_offline_and_answers():
    """The packaged GGUF, converted once into the cache, as a plain float32 model."""
    from fedsim.tasks import MathTask
    from fedsim.tasks.generative import SMOLLM2, gguf_model

    folder = Path(gguf_model(*SMOLLM2))
    assert (folder / "model.safetensors").exists()
    assert gguf_model(*SMOLLM2) == str(folder)  # cached: no second conversion
    task = MathTask(examples=300, test_examples=8, server_examples=16, answer_tokens=8)
    model = task.build_model()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    batch = task.eval_order(task.test_set())
    with torch.no_grad():
        loss, correct = task.eval_sums(model, batch)
        answers = task.greedy_answers(model, batch)
    assert 0 < loss / 8 < 10 and 0 <= correct <= 8
    assert all(isinstance(a, str) for a in answers) and any(a.strip() for a in answers)
