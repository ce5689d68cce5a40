"""The batched engine: the inline engine, with each round's sampled clients trained together.

Simulating a round client after client costs (clients x local steps) forward and backward
passes, each too small to keep a CPU's vector units (let alone a GPU) busy. Every client shares
the frozen base and differs only in a small adapter, so :class:`BatchedGrid` hands the round's
training messages to the ClientApp's runtime in groups of ``group_size``: each client's
message is received, checked and loaded one by one exactly as on the inline engine, then the
group's local steps run as one vmapped forward and backward per step
(:mod:`fedsim.batched`), then each client's reply is built one by one again. Everything else
(evaluation, LoRA-SB's set-up round, the clients' ``Context`` states, checkpoints) is the inline
engine's.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from fedsim.config import RunSpec
from fedsim.engines import group_size as auto_group
from fedsim.engines.inline import InlineEngine, InlineGrid
from fedsim.errors import ConfigError
from fedsim.strategy import AdapterStrategy
from fedsim.training import to_device


class BatchedGrid(InlineGrid):
    """An :class:`InlineGrid` that delivers a round's training messages in groups."""

    def __init__(self, client_app, num_nodes, runtime, group_size: int, seed: int = 0) -> None:
        super().__init__(client_app, num_nodes, seed=seed)
        self.runtime, self.group_size = runtime, group_size

    def pull_messages(self, message_ids):
        from flwr.app import MessageType

        ids = list(message_ids)
        train = [
            i
            for i in ids
            if i in self._pending and self._pending[i].metadata.message_type == MessageType.TRAIN
        ]
        for start in range(0, len(train), self.group_size):
            chunk = train[start : start + self.group_size]
            messages = [self._pending.pop(i) for i in chunk]
            items = [(m, self.context(m.metadata.dst_node_id)) for m in messages]
            for msg_id, msg, reply in zip(chunk, messages, self.runtime().train_group(items)):
                self._store_reply(msg_id, msg, reply)
        return super().pull_messages(ids)


class BatchedEngine(InlineEngine):
    """Run the apps in this process, training each round's clients in vmapped groups.

    Parameters
    ----------
    group_size : int or "auto"
        Clients trained together (>= 1); a round's clients are split into groups of this size.
        ``auto``: the largest group that fits in the GPU's free memory (on the CPU: 32;
        :mod:`fedsim.engines.group_size`).
    num_threads : int or "auto"
        torch threads; ``auto``: every usable CPU for a model above 1M parameters, else 1
        (:mod:`fedsim.threads`).
    """

    name = "batched"
    checkpoints = True

    def __init__(
        self, group_size: int | Literal["auto"] = 32, num_threads: int | Literal["auto"] = "auto"
    ) -> None:
        super().__init__(num_threads)
        self.group_size = auto_group.check_group_size(group_size)

    def _check_strategy(self, c) -> None:
        """Refuse what the strategy asks of clients that one vmapped call cannot give: ranks
        that differ per client or change as they train, trained sets that alternate with
        kept optimizer state."""
        ranks = getattr(c.adapter, "client_ranks", None)
        if ranks is not None and len(set(c.strategy.client_ranks or ())) > 1:
            raise ConfigError(
                "adapter.client_ranks",
                ranks,
                "clients of different ranks cannot train in one batched call: give every "
                "client the same rank or use engine=inline",
            )
        if getattr(c.strategy, "prunes_ranks", False):
            raise ConfigError(
                "engine",
                "batched",
                f"strategy {c.strategy.name} prunes each client's rank as it trains (its "
                "regulariser acts on one client's factors): use engine=inline or "
                "strategy.prune_lambda=0",
            )
        varies = type(c.strategy).round_trained is not AdapterStrategy.round_trained
        if c.sim["keep_optimizer_state"] and varies:
            raise ConfigError(
                "sim.keep_optimizer_state",
                True,
                f"the batched trainer keeps the state of the parameters a round trains; strategy "
                f"{c.strategy.name} {c.strategy.changing_parameters}: use engine=inline or "
                "sim.keep_optimizer_state=false",
            )

    def check_components(self, components) -> None:
        """Refuse, in one line, what the batched trainer cannot do yet; then check on a few
        test examples that the task's loss computed for a group equals its plain loss."""
        c = components
        if not getattr(c.task, "batchable", False):
            raise ConfigError(
                "engine",
                "batched",
                f"task {c.task.name} cannot train clients together in one vmapped call "
                "(its batchable is false): use engine=inline",
            )
        self._check_strategy(c)
        device = c.device  # the check runs where the clients will train
        model, _ = c.model(device)
        batch_norm = nn.modules.batchnorm._NormBase
        norms = [n for n, m in model.named_modules() if isinstance(m, batch_norm)]
        if norms:
            raise ConfigError(
                "engine",
                "batched",
                f"the model normalises over the batch ({norms[0]}), so padded examples would "
                "change it: use engine=inline",
            )
        data = to_device(c.task.eval_order(c.task.test_set()), device)
        probe = {k: v[:2] for k, v in data.items()}
        try:
            per_example = c.task.loss(model, probe, reduction="none")
        except Exception as e:
            per_example = e
        n = len(probe[c.task.label_key])
        if not isinstance(per_example, torch.Tensor) or tuple(per_example.shape) != (n,):
            raise ConfigError(
                "engine",
                "batched",
                f"task {c.task.name}'s loss(..., reduction='none') must return one loss per "
                "example (the batched engine weights them); it does not: use engine=inline",
            )
        _check_group_loss(c.task, model, data, private=c.privacy.client_dp)
        if self.group_size == auto_group.AUTO:
            self.group_size = auto_group.resolve(c, model, data)

    def run(self, spec: RunSpec) -> None:
        from fedsim.apps.client import runtime_for

        size = self.group_size  # auto is resolved by check_components (else: the CPU's)
        size = auto_group.CPU_GROUP if size == auto_group.AUTO else size
        self.run_grid(
            spec,
            lambda app, n, seed: BatchedGrid(
                app, n, lambda: runtime_for(spec.cfg), size, seed=seed
            ),
        )


@contextmanager
def _float32(task):
    """Inside: the task's forward passes run in float32 (dropout's masks do not depend on the
    precision, and bfloat16's rounding would hide a wrong one)."""
    precision = getattr(task, "precision", None)
    if precision is not None:
        task.precision = "float32"
    try:
        yield
    finally:
        if precision is not None:
            task.precision = precision


def _check_group_loss(task, model: nn.Module, data, private: bool = False) -> None:
    """The model's only randomness in training must be dropout that goes through
    :mod:`fedsim.dropout` (whose per-client streams the engine reproduces), and two clients'
    losses computed as one group (the shortest and the longest test examples: different cuts
    for text, and padding) must equal their plain losses, without dropout and with it (each
    client's masks from its own stream, in float32); under DP-SGD, so must each example's
    gradient (without dropout) and, with dropout, the mean of each client's per-example losses
    from the nested vmap."""
    model.train()
    _nudge(model)
    drawn = _probe_clients(task, data)
    seeds = [1, 2]
    plain, plain_dropped = _plain_losses(task, model, drawn, seeds)
    # bfloat16 forward passes round differently with different cuts and groupings
    tolerance = 1e-2 if getattr(task, "precision", "float32") == "bfloat16" else 1e-4
    _check_group_losses(task, model, drawn, seeds, plain, plain_dropped, tolerance)
    if private:
        _check_per_example(task, model, drawn, seeds, plain_dropped, tolerance)


def _nudge(model: nn.Module) -> None:
    """Move the trained parameters of a throwaway copy off LoRA's B = 0, where A has no
    gradient."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p) * 0.01)


def _probe_clients(task, data) -> list:
    """Two probe clients' batches: the first examples of ``data`` and its last ones."""
    n = len(data[task.label_key])
    k = max(1, min(3, n // 2))
    drawn = [{key: v[: max(1, k - 1)] for key, v in data.items()}]
    drawn.append({key: v[n - k :] for key, v in data.items()})
    return drawn


def _plain_losses(task, model: nn.Module, drawn, seeds):
    """Each probe client's plain loss without dropout and, if the model drops anything in
    training, with it (in float32, client ``i``'s torch seeded ``seeds[i]``), else None;
    refuses a model that is random in training other than through :mod:`fedsim.dropout`."""
    from fedsim.dropout import without_dropout
    from fedsim.training import seed_torch

    def alone() -> torch.Tensor:
        losses = []
        for seed, b in zip(seeds, drawn):
            seed_torch(seed)
            losses.append(task.loss(model, b))
        return torch.stack(losses).double()

    plain_dropped = None
    with torch.no_grad():
        with without_dropout():
            seed_torch(1)
            first = task.loss(model, drawn[0], reduction="none")
            seed_torch(2)
            again = task.loss(model, drawn[0], reduction="none")
            if not torch.equal(first, again):
                raise ConfigError(
                    "engine",
                    "batched",
                    f"task {task.name}'s model is random in training other than through "
                    "fedsim.dropout (adapter dropout; the text tasks' dropout layers and "
                    "attention dropout), whose per-client streams the batched engine "
                    "reproduces: use engine=inline",
                )
            plain = alone()
        seed_torch(1)
        dropped = not torch.equal(first, task.loss(model, drawn[0], reduction="none"))
        if dropped:
            with _float32(task):
                plain_dropped = alone()
    return plain, plain_dropped


def _dropout_hint(task) -> str:
    """What turns dropout off, for the refusals of dropout that cannot be batched."""
    hint = "task.dropout=0 and " if hasattr(task, "dropout") else ""
    return f"set {hint}adapter.dropout=0 or use engine=inline"


def _check_group_losses(task, model, drawn, seeds, plain, plain_dropped, tolerance) -> None:
    """The probe clients' losses computed as one group must equal their plain losses, without
    dropout and (if the model drops anything) with it."""
    from fedsim.batched import group_mean_losses
    from fedsim.dropout import without_dropout

    name = task.name
    with without_dropout():
        _must_agree(
            lambda: _relative(group_mean_losses(model, task, drawn), plain),
            tolerance,
            f"task {name}'s loss cannot run for a group of clients under torch.func.vmap",
            f"task {name}'s loss computed for a group of clients differs from each client's own",
            "a model whose attention takes the 4-D padding mask differently?",
            "use engine=inline",
        )
    if plain_dropped is None:
        return
    with _float32(task):
        _must_agree(
            lambda: _relative(group_mean_losses(model, task, drawn, seeds), plain_dropped),
            1e-4,
            f"task {name}'s dropout cannot be drawn for a group of clients under torch.func.vmap",
            f"task {name}'s loss with dropout computed for a group of clients differs from "
            "each client's own",
            "dropout on tensors that are not (examples, tokens, features) or attention weights?",
            _dropout_hint(task),
        )


def _check_per_example(task, model, drawn, seeds, plain_dropped, tolerance) -> None:
    """Under DP-SGD: each example's gradient from the nested vmap must equal autograd's
    (without dropout), and, if the model drops anything, each probe client's mean of its
    per-example losses with dropout must equal its plain loss."""
    from fedsim.dropout import without_dropout

    name = task.name
    with without_dropout():
        _must_agree(
            lambda: _per_example_error(task, model, drawn),
            tolerance,
            f"with privacy=dpsgd, task {name}'s per-example gradients cannot be computed in a "
            "nested torch.func.vmap",
            f"with privacy=dpsgd, task {name}'s per-example gradients computed for a group of "
            "clients differ from autograd's",
            "",
            "use engine=inline",
        )
    if plain_dropped is None:
        return
    with _float32(task):
        _must_agree(
            lambda: _relative(
                _per_example_dropped_losses(task, model, drawn, seeds), plain_dropped
            ),
            1e-4,
            f"with privacy=dpsgd, task {name}'s dropout cannot be drawn for each example "
            "in a nested torch.func.vmap",
            f"with privacy=dpsgd, task {name}'s losses with dropout computed example by "
            "example for a group of clients differ from each client's own",
            "",
            _dropout_hint(task),
        )


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.double() - want).abs() / want.abs().clamp(min=1e-12)).max())


def _must_agree(compute, within: float, cannot: str, differs: str, why: str, remedy: str):
    """``compute()``, a relative error, must be at most ``within``; otherwise a one-line
    refusal: ``differs`` with the error (and the likely ``why``), then ``remedy``. A failure of
    ``compute`` itself is refused as ``cannot`` (:func:`_or_refuse`)."""
    error = _or_refuse(compute, cannot)
    if error > within:
        cause = f"; {why}" if why else ""
        raise ConfigError("engine", "batched", f"{differs} (relative {error:.1e}{cause}): {remedy}")


def _per_example_dropped_losses(task, model: nn.Module, drawn, seeds) -> torch.Tensor:
    """Each probe client's mean loss over its examples as DP-SGD's nested vmap computes them
    (each example a batch of one), with dropout drawn from the client's generator seeded
    ``seeds[i]`` for its whole batch."""
    from fedsim.batched import padded_group, per_example_gradients, quiet_fallbacks
    from fedsim.dropout import client_streams

    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    device = next(model.parameters()).device
    batch, _, sizes = padded_group(drawn, device)
    batch, lengths = task.group_batch(batch)
    stacked = {n: p.detach().expand(len(drawn), *p.shape) for n, p in trained.items()}
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    with quiet_fallbacks(), client_streams(generators, sizes, lengths, per_example=True):
        _, losses = per_example_gradients(model, task)(stacked, {}, batch)
    return torch.stack([losses[i, :n].double().mean() for i, n in enumerate(sizes)])


def _or_refuse(compute, what: str):
    """``compute()``, or a one-line refusal saying ``what`` failed and why: any failure under
    vmap (an operator without a batching rule, data-dependent control flow) is the user's
    answer."""
    try:
        return compute()
    except Exception as e:  # noqa: BLE001
        reason = " ".join(str(e).split())
        raise ConfigError(
            "engine", "batched", f"{what} ({type(e).__name__}: {reason}): use engine=inline"
        ) from None


def _per_example_error(task, model: nn.Module, drawn) -> float:
    """The largest relative difference between the batched engine's per-example gradients
    (a nested vmap) and autograd's, example by example, over the probe's clients."""
    from fedsim.batched import padded_group, per_example_gradients, quiet_fallbacks

    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batch, _, sizes = padded_group(drawn, next(model.parameters()).device)
    batch, _ = task.group_batch(batch)
    stacked = {n: p.detach().expand(len(drawn), *p.shape) for n, p in trained.items()}
    with quiet_fallbacks():
        grads, _ = per_example_gradients(model, task)(stacked, {}, batch)
    worst = 0.0
    for i, b in enumerate(drawn):
        for j in range(sizes[i]):
            model.zero_grad(set_to_none=True)
            task.loss(model, {k: v[j : j + 1] for k, v in b.items()}).backward()
            want = {
                n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in trained.items()
            }
            # relative to the example's whole gradient: a tensor whose gradient is 0 in one and
            # rounding noise in the other is no difference
            scale = max(float(torch.cat([g.flatten() for g in want.values()]).norm()), 1e-12)
            diff = torch.cat([(grads[n][i, j] - want[n]).flatten() for n in trained])
            worst = max(worst, float(diff.norm()) / scale)
    model.zero_grad(set_to_none=True)
    return worst
