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

import torch
from torch import nn

from fedsim.config import RunSpec
from fedsim.engines.inline import InlineEngine, InlineGrid
from fedsim.errors import ConfigError
from fedsim.validate import integer


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
    group_size : int
        Clients trained together (>= 1); a round's clients are split into groups of this size.
    num_threads : int
        torch threads (1 was fastest on the project's 2-core machine; larger models and
        groups may gain from more).
    """

    name = "batched"
    checkpoints = True

    def __init__(self, group_size: int = 32, num_threads: int = 1) -> None:
        super().__init__(num_threads)
        self.group_size = integer("engine.group_size", group_size, low=1)

    def check_components(self, components) -> None:
        """Refuse, in one line, what the batched trainer cannot do yet."""
        c = components
        if c.privacy.client_dp:
            raise ConfigError(
                "engine",
                "batched",
                "privacy=dpsgd clips each example's gradient inside every client's steps, "
                "which the batched engine does not do yet: use engine=inline",
            )
        if not getattr(c.task, "batchable", False):
            raise ConfigError(
                "engine",
                "batched",
                f"task {c.task.name} cuts each batch to its longest example, so clients' "
                "batches differ in shape; the batched engine needs batchable tasks "
                "(task=synthetic) for now: use engine=inline",
            )
        model, _ = c.model()
        batch_norm = nn.modules.batchnorm._NormBase
        norms = [n for n, m in model.named_modules() if isinstance(m, batch_norm)]
        if norms:
            raise ConfigError(
                "engine",
                "batched",
                f"the model normalises over the batch ({norms[0]}), so padded examples would "
                "change it: use engine=inline",
            )
        probe = {k: v[:2] for k, v in c.task.test_set().items()}
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
        dropout = sorted(
            {m.p for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p}
        )
        if dropout:
            raise ConfigError(
                "engine",
                "batched",
                f"the task's model uses dropout (p={dropout[0]:g}) whose per-client random "
                "streams the batched engine does not reproduce yet (adapter.dropout it does): "
                "use engine=inline",
            )
        ranks = getattr(c.strategy, "client_ranks", None)
        if ranks is not None and len(set(ranks)) > 1:
            raise ConfigError(
                "strategy.client_ranks",
                ranks,
                "clients of different ranks cannot train in one batched call: give every "
                "client the same rank or use engine=inline",
            )

    def run(self, spec: RunSpec) -> None:
        from fedsim.apps.client import runtime_for

        self.run_grid(
            spec,
            lambda app, n, seed: BatchedGrid(
                app, n, lambda: runtime_for(spec.cfg), self.group_size, seed=seed
            ),
        )
