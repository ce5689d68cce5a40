"""The batched engine: each round's clients trained together in vmapped groups give the inline
engine's results (eval loss within 1e-5 relative after 3 rounds), for every adapter, strategy,
compressor, optimizer and privacy setting (DP-SGD's per-example clipping and noise included;
FedProx's proximal term and SCAFFOLD's correction too),
on the synthetic task and on text, with clients of unequal dataset sizes; its stacked
optimizers equal torch's; what it cannot do yet is a one-line error."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from fedsim.batched import ClientJob, StackedAdamW, StackedSGD, stacked_optimizer, train_group
from fedsim.build import build_components
from fedsim.config import compose
from fedsim.training import client_generator, seed_torch, train_local
from tests.conftest import tiny

#: clients with 20 to 44 training examples (Dirichlet 0.5 over 40 x 6), batches of 16: short
#: batches at different steps for different clients
UNEQUAL = [
    "sim.rounds=3",
    "sim.num_clients=6",
    "partition=dirichlet",
    "partition.min_partition_size=2",
    "task.examples_per_client=40",
]


def _close(inline_rows, batched_rows, rel=1e-5):
    assert len(inline_rows) == len(batched_rows)
    for a, b in zip(inline_rows, batched_rows):
        for key in ("eval_loss", "train_loss", "eval_loss_client_mean", "epsilon"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=rel), (a["round"], key)
        for key in ("bytes_up", "bytes_down", "clients_ok", "failures", "round_skipped"):
            assert a[key] == b[key], key


@pytest.mark.parametrize(
    "extra",
    [
        ("adapter=lora",),
        ("adapter=lora", "adapter.dropout=0.2"),
        ("strategy=fedsb", "adapter.dropout=0.3"),
        ("adapter=ffa", "strategy=ffa"),
        ("strategy=fedsb",),
        ("strategy=fedsb", "adapter.init.source=clients"),
        ("strategy=fedex",),
        ("strategy=flora",),
        ("strategy=fedsa",),
        ("strategy=local",),
        ("strategy=centralized",),
        ("compressor=topk", "compressor.ratio=0.2", "feedback=ef21", "downlink=topk"),
        ("privacy=central", "privacy.target_epsilon=8"),
        ("sim.keep_optimizer_state=true", "schedule=cosine", "schedule.warmup_steps=2"),
        ("optimizer=sgd", "optimizer.momentum=0.9", "sim.keep_optimizer_state=true"),
        ("optimizer=sgd", "optimizer._target_=torch.optim.RMSprop", "sim.lr=0.002"),
        ("faults=mixed", "faults.corrupt_prob=0.3", "sim.clients_per_round=4"),
        ("privacy=dpsgd",),
        # clipping active, empty Poisson batches (noise-only steps), kept AdamW state
        (
            "privacy=dpsgd",
            "privacy.clip_norm=0.05",
            "sim.batch_size=1",
            "sim.keep_optimizer_state=true",
            "adapter=lora",
            "adapter.dropout=0.3",
        ),
        (
            "strategy=fedsb",
            "privacy=dpsgd",
            "privacy.target_epsilon=null",
            "privacy.noise_multiplier=0.8",
        ),
        ("sim.prox_mu=0.1",),
        ("control=scaffold", "schedule=cosine", "sim.keep_optimizer_state=true"),
        ("control=scaffold", "optimizer=sgd", "sim.prox_mu=0.05", "sim.lr=0.05"),
        ("control=scaffold", "strategy=fedsa", "sim.prox_mu=0.1", "faults=mixed"),
        ("control=scaffold", "sim.prox_mu=0.1", "privacy=dpsgd", "privacy.clip_norm=0.05"),
        ("control=scaffold", "compressor=topk", "compressor.ratio=0.2", "downlink=topk"),
    ],
    ids=[
        "lora",
        "lora-dropout",
        "lora_sb-dropout",
        "ffa",
        "lora_sb",
        "lora_sb-setup-round",
        "fedex",
        "flora",
        "fedsa",
        "local",
        "centralized",
        "ef21-ef21p",
        "central-dp",
        "adamw-kept",
        "sgd-momentum-kept",
        "rmsprop-per-client",
        "faults",
        "dpsgd",
        "dpsgd-clipped-empty-batches-dropout",
        "dpsgd-fedsb-sigma",
        "fedprox",
        "scaffold-cosine-kept",
        "scaffold-fedprox-sgd",
        "scaffold-fedprox-fedsa-faults",
        "scaffold-fedprox-dpsgd-clipped",
        "scaffold-topk-ef21p",
    ],
)
def test_batched_equals_inline(extra, run_tiny):
    _, inline, _ = run_tiny(*UNEQUAL, *extra)
    _, batched, _ = run_tiny(*UNEQUAL, *extra, "engine=batched", "engine.group_size=4")
    _close(inline, batched)


def test_client_sizes_really_are_unequal():
    cfg, _ = compose(tiny(*UNEQUAL))
    c = build_components(cfg)
    sizes = {c.data.client(i).num_train for i in range(6)}
    assert len(sizes) == 6 and sum(n % 16 != 0 for n in sizes) >= 4  # short batches


def test_group_size_does_not_change_results(run_tiny):
    a = run_tiny(*UNEQUAL, "engine=batched", "engine.group_size=1")[1]
    b = run_tiny(*UNEQUAL, "engine=batched", "engine.group_size=6")[1]
    _close(a, b, rel=1e-6)


def test_a_batched_run_resumes_exactly(tmp_path, monkeypatch):
    from tests.test_checkpoint import interrupted_equals_uninterrupted

    args = tiny(*UNEQUAL, "engine=batched", "compressor=topk", "feedback=ef21", "sim.rounds=4")
    interrupted_equals_uninterrupted(tmp_path, monkeypatch, args, at=2)


def test_train_group_equals_each_client_trained_alone():
    """Direct: the vmapped trainer against fedsim's own per-client loop, parameter by
    parameter, with per-client schedule positions and unequal data."""
    cfg, _ = compose(tiny(*UNEQUAL, "adapter=lora", "schedule=linear"))
    c = build_components(cfg)
    torch.set_num_threads(1)
    model, spec = c.model()
    params = spec.parameters_of(model)
    init = {n: params[n].detach().clone() for n in spec.trained}
    alone, jobs = {}, []
    for client in range(6):
        spec.load(model, {n: v.numpy() for n, v in init.items()})
        opt = c.make_optimizer(spec.trained_parameters(model), lr=0.01)
        g = client_generator(0, 1, client)
        seed_torch(g.initial_seed() + 1)
        data = c.data.client(client).train
        kw = {"batch_size": 16, "lr": 0.01, "schedule": c.schedule, "total_steps": 20}
        res = train_local(
            model, c.task, data, opt, steps=7, start_step=2 * client, generator=g, **kw
        )
        alone[client] = ({n: params[n].detach().clone() for n in spec.trained}, res.loss)
        jobs.append(
            ClientJob(
                params=dict(init),
                context={},
                data=data,
                generator=client_generator(0, 1, client),
                start_step=2 * client,
            )
        )
    out = train_group(model, c.task, jobs, c.make_optimizer, steps=7, **kw)
    for client, outcome in enumerate(out):
        want, loss = alone[client]
        assert outcome.result.loss == pytest.approx(loss, rel=1e-6)
        for n, v in want.items():
            torch.testing.assert_close(outcome.params[n], v, rtol=1e-5, atol=1e-6)


def test_clients_with_different_frozen_bases_train_on_their_own():
    """The stacked-context path: tensors that differ between clients (folded bases) are
    stacked, each client trains against its own."""
    cfg, _ = compose(tiny(*UNEQUAL, "adapter=lora"))
    c = build_components(cfg)
    torch.set_num_threads(1)
    model, spec = c.model()
    params = spec.parameters_of(model)
    base = spec.base_weight(spec.adapted_modules[0])
    w0 = params[base].detach().clone()
    init = {n: params[n].detach().clone() for n in spec.trained}
    kw = {"batch_size": 16, "lr": 0.01, "schedule": c.schedule, "total_steps": 20}
    alone, jobs = [], []
    for client in range(3):
        mine = w0 + 0.05 * (client + 1) * torch.randn(
            w0.shape, generator=torch.Generator().manual_seed(client)
        )
        spec.load(model, {**{n: v.numpy() for n, v in init.items()}, base: mine.numpy()})
        opt = c.make_optimizer(spec.trained_parameters(model), lr=0.01)
        data = c.data.client(client).train
        train_local(
            model,
            c.task,
            data,
            opt,
            steps=4,
            start_step=0,
            generator=client_generator(0, 2, client),
            **kw,
        )
        alone.append({n: params[n].detach().clone() for n in spec.trained})
        jobs.append(ClientJob(dict(init), {base: mine}, data, client_generator(0, 2, client), 0))
    out = train_group(model, c.task, jobs, c.make_optimizer, steps=4, **kw)
    for want, outcome in zip(alone, out):
        for n, v in want.items():
            torch.testing.assert_close(outcome.params[n], v, rtol=1e-5, atol=1e-6)
    assert not torch.equal(out[0].params[spec.trained[0]], out[1].params[spec.trained[0]])


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.05, betas=(0.8, 0.99)),
        lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.05),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.3),
        lambda p: torch.optim.SGD(p, lr=0.1),
    ],
    ids=["adamw", "adam-l2", "sgd-nesterov", "sgd-dampening", "sgd"],
)
def test_stacked_optimizers_equal_one_torch_optimizer_per_client(make):
    rng = np.random.default_rng(0)
    clients, shapes = 3, [(4, 5), (5,)]
    start = [[torch.tensor(rng.standard_normal(s), dtype=torch.float32) for s in shapes]]
    start = [[t.clone() for t in start[0]] for _ in range(clients)]
    mine = [[torch.nn.Parameter(t.clone()) for t in ts] for ts in start]
    torch_opts = [make(ps) for ps in mine]
    stacked = [torch.stack([start[i][k] for i in range(clients)]) for k in range(len(shapes))]
    stack_opt = stacked_optimizer(make([torch.nn.Parameter(torch.zeros(1))]), stacked)
    assert isinstance(stack_opt, (StackedAdamW, StackedSGD))
    for step in range(5):
        lrs = torch.tensor([0.1, 0.05 * (step + 1), 0.02], dtype=torch.float64)
        grads = [
            [torch.tensor(rng.standard_normal(s), dtype=torch.float32) for s in shapes]
            for _ in range(clients)
        ]
        for i, (opt, ps) in enumerate(zip(torch_opts, mine)):
            for g in opt.param_groups:
                g["lr"] = float(lrs[i])
            for p, grad in zip(ps, grads[i]):
                p.grad = grad.clone()
            opt.step()
        for k, p in enumerate(stacked):
            p.grad = torch.stack([grads[i][k] for i in range(clients)])
        stack_opt.step(lrs)
        for i in range(clients):
            for k in range(len(shapes)):
                torch.testing.assert_close(stacked[k][i], mine[i][k].detach(), rtol=1e-6, atol=1e-7)
    for i, opt in enumerate(torch_opts):  # the state a client keeps between rounds
        want = opt.state_dict()["state"]
        got = stack_opt.client_state(i)
        assert got.keys() == want.keys()
        for k in want:
            for key, value in want[k].items():
                torch.testing.assert_close(got[k][key].float(), value.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["strategy=flora", "adapter.client_ranks=[2,4]"], "adapter.client_ranks=[2, 4]"),
        (["engine.group_size=0"], "engine.group_size=0: must be an integer >= 1"),
    ],
)
def test_what_the_batched_engine_cannot_do_is_one_line(extra, message, tmp_path, capsys):
    from fedsim.cli import main

    with pytest.raises(SystemExit) as info:
        main(tiny("engine=batched", *extra, f"hydra.run.dir={tmp_path / 'r'}"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_a_task_without_per_example_losses_is_refused(tmp_path, monkeypatch):
    """A user's task whose loss knows only "mean" and "sum": padded batches would bias it."""
    from fedsim.config import check
    from fedsim.errors import ConfigError
    from fedsim.tasks.synthetic import SyntheticTask

    def mean_only(self, model, batch, reduction="mean"):
        loss = torch.nn.functional.cross_entropy(self.logits(model, batch), batch["label"])
        return loss * len(batch["label"]) if reduction == "sum" else loss

    monkeypatch.setattr(SyntheticTask, "loss", mean_only)
    cfg, _ = compose(tiny("engine=batched", "sim.seed=5"))
    with pytest.raises(ConfigError, match="must return one loss per example"):
        check(cfg)


#: text: 6 clients with unequal numbers of snippets of unequal lengths, the model's own
#: dropout off (the tests that turn it on say so)
TEXT = ["sim.rounds=3", "sim.num_clients=6", "partition=dirichlet", "task.dropout=0"]
#: the same with the model's own dropout on (hidden states and attention weights)
DROPPED = [o if o != "task.dropout=0" else "task.dropout=0.3" for o in TEXT]


@pytest.mark.parametrize(
    "extra",
    [
        ("adapter=lora", "adapter.dropout=0.2"),
        ("strategy=fedsb",),
        ("strategy=fedex",),
        ("privacy=dpsgd", "privacy.clip_norm=0.1"),
    ],
    ids=["lora-dropout", "lora_sb", "fedex", "dpsgd"],
)
def test_text_task_batched_equals_inline(extra, hf_task, run_tiny):
    """A group's batch is cut to its longest text (each client alone: to its own), masks
    are 4-D, adapter dropout draws each client's masks at its own cut length."""
    _, inline, _ = run_tiny(*hf_task, *TEXT, *extra)
    _, batched, _ = run_tiny(*hf_task, *TEXT, *extra, "engine=batched", "engine.group_size=4")
    _close(inline, batched)


def test_text_task_in_bfloat16_agrees_to_its_rounding(hf_task, run_tiny):
    """Under bfloat16 autocast different cuts and groupings round differently: the engines
    agree to bfloat16's rounding, not float32's; with the model's dropout on too (the check
    of its masks runs in float32)."""
    extra = ("task.precision=bfloat16", "adapter=lora")
    _, inline, _ = run_tiny(*hf_task, *DROPPED, *extra)
    _, batched, _ = run_tiny(*hf_task, *DROPPED, *extra, "engine=batched", "engine.group_size=4")
    _close(inline, batched, rel=2e-3)  # measured: 5.9e-4 (train loss), 8.1e-5 without dropout


def test_group_batches_are_cut_to_the_longest_text(hf_task):
    from fedsim.tasks.base import GROUP_MASK

    c = build_components(compose(tiny(*hf_task, "task.dropout=0"))[0])
    data = c.task.eval_order(c.task.test_set())
    lengths = data["attention_mask"].sum(1)
    short, long = {k: v[:4] for k, v in data.items()}, {k: v[-4:] for k, v in data.items()}
    stacked = {k: torch.stack([short[k], long[k]]) for k in data}
    batch, cut = c.task.group_batch(stacked)
    assert cut == [int(lengths[:4].max()), int(lengths[-4:].max())] and cut[0] < cut[1]
    assert batch["input_ids"].shape == (2, 4, cut[1])
    assert batch[GROUP_MASK].shape == (2, 4, 1, 1, cut[1])
    assert torch.equal(batch[GROUP_MASK][:, :, 0, 0], batch["attention_mask"].bool())


def _eager(monkeypatch):
    """Every text model loaded from here on attends with Hugging Face's eager attention (its
    dropout is functional dropout on the 4-D attention weights) instead of sdpa."""
    import fedsim.tasks.hf_models as hf_models

    loaded = hf_models._pristine

    def eager(*args, **kwargs):
        model, head = loaded(*args, **kwargs)  # the cached model: undone after the test
        monkeypatch.setattr(model.config, "_attn_implementation", "eager")
        return model, head

    monkeypatch.setattr(hf_models, "_pristine", eager)  # every caller looks it up there


@pytest.mark.parametrize(
    "attention, private",
    [("sdpa", []), ("eager", []), ("sdpa", ["privacy=dpsgd", "privacy.clip_norm=0.1"])],
    ids=["sdpa", "eager", "sdpa-dpsgd"],
)
def test_the_models_own_dropout_is_each_clients_on_the_batched_engine(
    attention, private, hf_task, run_tiny, monkeypatch
):
    """The model's dropout layers and attention-weight dropout (sdpa's dropout_p, or eager's
    functional dropout) draw each client's masks from its own stream at its own cut length,
    together with adapter dropout: the inline engine's results. Under DP-SGD each example's
    masks are its slice of its client's Poisson batch's, as under Opacus."""
    if attention == "eager":
        _eager(monkeypatch)
    extra = [*hf_task, *DROPPED, "adapter=lora", "adapter.dropout=0.2", *private]
    _, inline, _ = run_tiny(*extra)
    _, batched, _ = run_tiny(*extra, "engine=batched", "engine.group_size=4")
    _close(inline, batched)
    _, undropped, _ = run_tiny(*hf_task, *TEXT, "adapter=lora", "adapter.dropout=0.2", *private)
    assert inline[-1]["eval_loss"] != undropped[-1]["eval_loss"]  # the dropout was on


def test_the_models_own_dropout_matches_plain_pytorch(hf_task, monkeypatch):
    """fedsim's dropout changes nothing for a client that trains alone: the same masks as
    torch's own dropout on a CPU, so the inline engine's results are plain PyTorch's."""
    c = build_components(compose(tiny(*hf_task, "task.dropout=0.3"))[0])
    model, _ = c.model()
    model.train()
    data = c.task.eval_order(c.task.test_set())
    batch = {k: v[:8] for k, v in data.items()}
    losses = []
    for _ in range(2):
        torch.manual_seed(4)
        losses.append(c.task.loss(model, batch, reduction="none"))
        # then torch's own dropout layers and sdpa's own dropout
        monkeypatch.setattr("fedsim.tasks.text.model_dropout", lambda m: contextlib.nullcontext())
    torch.manual_seed(5)
    assert not torch.allclose(losses[0], c.task.loss(model, batch, reduction="none"))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_dropout_drawn_at_the_wrong_shape_is_refused_by_the_group_check(
    precision, hf_task, tmp_path, capsys, monkeypatch
):
    """Were the masks drawn at the group's cut length instead of each client's own, the
    group's losses with dropout would differ from the plain ones: refused, nothing written.
    The check runs in float32 whatever task.precision is (bfloat16's rounding would hide it)."""
    from fedsim.cli import main

    monkeypatch.setattr("fedsim.dropout.sequence_dims", lambda shape, length: ())
    with pytest.raises(SystemExit) as info:
        args = [f"task.precision={precision}", f"hydra.run.dir={tmp_path / 'r'}"]
        main(tiny(*hf_task, "engine=batched", *args))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "loss with dropout computed for a group" in err, err
    assert not (tmp_path / "r").exists()


def test_per_example_dropout_that_cannot_be_drawn_is_refused_before_a_dp_run(
    hf_task, tmp_path, capsys, monkeypatch
):
    """DP-SGD with dropout: the check also computes each probe client's per-example losses
    in the nested vmap with its own masks; were the examples' level not handed to the
    clients' (here: the flag dropped), the run is refused in one line, nothing written."""
    from contextlib import contextmanager

    import fedsim.dropout
    from fedsim.cli import main

    streams = fedsim.dropout.client_streams

    @contextmanager
    def flat(generators, sizes, lengths=None, per_example=False):
        with streams(generators, sizes, lengths):
            yield

    monkeypatch.setattr(fedsim.dropout, "client_streams", flat)
    with pytest.raises(SystemExit) as info:
        args = ["privacy=dpsgd", "engine=batched", f"hydra.run.dir={tmp_path / 'r'}"]
        main(tiny(*hf_task, *args))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "dropout cannot be drawn for each example" in err, err
    assert not (tmp_path / "r").exists()


def _llama_classifier(hf_task, folder):
    from tests.tiny_lm import make_llama

    llama = make_llama(folder)
    return [o if not o.startswith("task.model=") else f"task.model={llama}" for o in hf_task]


def test_a_causal_classifier_trains_batched_with_a_causal_mask(hf_task, run_tiny, tmp_path):
    """A Llama as a sequence classifier through task=hf: its attention is found causal, the
    group's 4-D mask is causal and padded, and the results are the inline engine's, with its
    own attention dropout on."""
    from fedsim.tasks.base import is_causal
    from fedsim.tasks.text import load_classifier

    task = _llama_classifier(hf_task, tmp_path / "llama")
    for overrides, causal in ((task, True), (hf_task, False)):
        path = dict(o.split("=", 1) for o in overrides)["task.model"]
        model = load_classifier(path, 2, 0)[0]
        assert is_causal(model, int(model.config.vocab_size)) == causal
    # its own attention dropout on too: causal attention weights with grouped key-value heads
    _, inline, _ = run_tiny(*task, *DROPPED, "adapter=lora", "adapter.dropout=0.2")
    _, batched, _ = run_tiny(
        *task,
        *DROPPED,
        "adapter=lora",
        "adapter.dropout=0.2",
        "engine=batched",
        "engine.group_size=4",
    )
    _close(inline, batched)


def test_a_wrong_attention_mask_is_refused_by_the_group_check(
    hf_task, tmp_path, capsys, monkeypatch
):
    """The check before a run: were the causal model given a bidirectional mask, the group's
    losses would differ from the plain ones; the run is refused, nothing written."""
    from fedsim.cli import main

    monkeypatch.setattr("fedsim.tasks.text.is_causal", lambda model, vocab: False)
    task = _llama_classifier(hf_task, tmp_path / "llama")
    with pytest.raises(SystemExit) as info:
        main(tiny(*task, "task.dropout=0", "engine=batched", f"hydra.run.dir={tmp_path / 'r'}"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "differs from each client's own" in err, err
    assert not (tmp_path / "r").exists()


def test_math_task_batched_equals_inline(math_task, run_tiny):
    """Causal-LM answers: the group's batch is cut to its longest example under a causal
    mask; answer-token losses, adapter dropout at each client's own cut length."""
    extra = ["sim.rounds=2", "adapter=lora", "adapter.dropout=0.2"]
    _, inline, _ = run_tiny(*math_task, *extra)
    _, batched, _ = run_tiny(*math_task, *extra, "engine=batched", "engine.group_size=4")
    _close(inline, batched)


def test_dp_settings_a_client_cannot_meet_fail_that_client_not_the_run(tmp_path, capsys):
    """An unreachable target epsilon: each client's DP set-up fails, as on the inline engine,
    and the run ends with one line, not a traceback."""
    from fedsim.cli import main

    for engine in ("inline", "batched"):
        with pytest.raises(SystemExit) as info:
            main(
                tiny(
                    "privacy=dpsgd",
                    "privacy.target_epsilon=1e-9",
                    f"engine={engine}",
                    f"hydra.run.dir={tmp_path / engine}",
                )
            )
        assert info.value.code == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "privacy budget is too low" in err, err


@pytest.mark.parametrize(
    "broken, message",
    [
        ("wrong", "per-example gradients computed for a group of clients differ"),
        ("raises", "per-example gradients cannot be computed in a nested"),
    ],
)
def test_per_example_gradients_are_checked_before_a_dp_run(
    broken, message, tmp_path, capsys, monkeypatch
):
    import fedsim.batched
    from fedsim.cli import main

    real = fedsim.batched.per_example_gradients

    def spoiled(model, task):
        f = real(model, task)

        def g(trained, context, batch):
            if broken == "raises":
                raise RuntimeError("no batching rule for this operator")
            grads, losses = f(trained, context, batch)
            return {n: 1.01 * v for n, v in grads.items()}, losses

        return g

    monkeypatch.setattr(fedsim.batched, "per_example_gradients", spoiled)
    with pytest.raises(SystemExit) as info:
        main(tiny("privacy=dpsgd", "engine=batched", f"hydra.run.dir={tmp_path / 'r'}"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_task_that_is_not_batchable_is_refused(tmp_path, capsys, monkeypatch):
    from fedsim.cli import main
    from fedsim.tasks.synthetic import SyntheticTask

    monkeypatch.setattr(SyntheticTask, "batchable", False)
    monkeypatch.setattr("fedsim.config.checks._CHECKED", set())  # checked before: not cached
    with pytest.raises(SystemExit) as info:
        main([*tiny("engine=batched"), f"hydra.run.dir={tmp_path / 'r'}"])
    assert info.value.code == 2
    assert "task synthetic cannot train clients together" in capsys.readouterr().err
