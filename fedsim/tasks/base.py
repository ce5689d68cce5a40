"""What a task provides: a frozen "pretrained" model with a head, and labelled examples.

A task owns the model architecture and the data; fedsim's :class:`~fedsim.data.FederatedData`
splits the task's client pool among clients with a flwr-datasets partitioner, and every batch
is a dict of tensors with the label under ``label_key``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]


class Task(ABC):
    """Base class of tasks (built from ``conf/task/*.yaml``)."""

    name = "task"
    label_key = "label"
    #: modules that are trained and sent like adapters (the task head)
    head_modules: tuple[str, ...] = ()
    #: linear layers adapted when ``adapter.target_modules`` is not set
    default_target_modules: tuple[str, ...] = ()
    #: PEFT's task type of the exported adapter (``SEQ_CLS``, ``CAUSAL_LM``; None: a plain
    #: ``torch.nn`` model that only ``PeftModel.from_pretrained`` loads)
    peft_task_type: str | None = None
    #: the batched engine may train clients together: after :meth:`group_batch`, a client's
    #: slice of a group's batch has the same shape as every other's and the loss is traceable
    #: under ``torch.func.vmap`` (no ``.item()`` on the batch); a batch's examples do not
    #: interact (no batch normalisation)
    batchable = True

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The pretrained base with a freshly initialised head; identical on every call."""

    @abstractmethod
    def pool_labels(self) -> np.ndarray:
        """Labels of the examples that are split among clients (for label-based partitioners)."""

    def pool_groups(self) -> np.ndarray | None:
        """Natural client ids of the pool's examples (for ``partition=natural``), or None."""
        return None

    @abstractmethod
    def pool_examples(self, indices: np.ndarray, client: int) -> Batch:
        """Examples of the client pool at ``indices``, as seen by ``client``."""

    @abstractmethod
    def test_set(self) -> Batch:
        """The held-out global test set the server evaluates on."""

    def server_size(self) -> int:
        """How many examples :meth:`server_set` holds (0: the task has no server split)."""
        return 0

    def server_set(self) -> Batch:
        """Examples the server holds (a public, held-out split, disjoint from the clients'
        pool and the test set), e.g. for LoRA-SB's initialisation."""
        raise NotImplementedError(f"task {self.name} has no server split")

    def group_batch(self, batch: Batch) -> tuple[Batch, list[int] | None]:
        """A group's batch for the batched engine: every tensor has a leading client
        dimension (``batch[k][i]`` is client ``i``'s batch). Called once per local step,
        outside ``torch.func.vmap``, where the task may look at the data (text tasks cut the
        group's batch to its longest text); returns the batch that :meth:`loss` sees, client
        by client, under vmap, and each client's own sequence length (what its batch is cut
        to when it trains alone, for per-client dropout masks), or None."""
        return batch, None

    #: batch size of evaluation passes (under ``torch.no_grad()``)
    eval_batch_size = 1024

    def eval_order(self, data: Batch) -> Batch:
        """``data`` reordered for evaluation passes (text: similar lengths together)."""
        return data

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch["x"])

    def loss(self, model: nn.Module, batch: Batch, reduction: str = "mean") -> torch.Tensor:
        """The training loss: each example's loss, averaged (``"mean"``) or summed (``"sum"``)
        over the batch's examples, or each example's (``"none"``, what the batched engine
        weights). Per-example terms are what DP-SGD clips, so a task whose example has many
        targets (tokens) averages them within the example first."""
        return F.cross_entropy(
            self.logits(model, batch), batch[self.label_key], reduction=reduction
        )

    def eval_sums(self, model: nn.Module, batch: Batch) -> tuple[float, int]:
        """``(summed loss, number correct)`` over an evaluation batch (under ``no_grad``)."""
        logits = self.logits(model, batch)
        y = batch[self.label_key]
        loss = float(F.cross_entropy(logits, y, reduction="sum"))
        return loss, int((logits.argmax(dim=-1) == y).sum())


#: the key of a group's 4-D attention mask in a batch (:func:`cut_group`)
GROUP_MASK = "group_attention_mask"


def cut_group(
    batch: Batch, attention: str, causal: bool, min_length: int = 1
) -> tuple[Batch, list[int]]:
    """A group's right-padded batch (``batch[k][i]``: client ``i``'s) cut to the group's
    longest text, with the model's 4-D attention mask under :data:`GROUP_MASK` (``sdpa``:
    True where a query attends a key; ``eager``: 0 there and the float minimum elsewhere;
    ``causal``: only keys at or before the query), and each client's own cut length (at least
    ``min_length``), the length its batch is cut to when it trains alone. Padding keys get no
    weight, so each client's outputs at its real tokens are those of its own cut batch up to
    float rounding."""
    mask = batch["attention_mask"]  # (clients, examples, max_length)
    lengths = mask.sum(-1).amax(-1).clamp(min=min_length)
    length = int(lengths.max())
    out = dict(batch)
    out["input_ids"] = batch["input_ids"][..., :length]
    out["attention_mask"] = mask = mask[..., :length]
    keys = mask[:, :, None, None, :].bool()  # (clients, examples, heads, queries, keys)
    if causal:
        keys = keys & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    if attention == "sdpa":
        out[GROUP_MASK] = keys
    elif attention == "eager":
        out[GROUP_MASK] = (~keys).float() * torch.finfo(torch.float32).min
    else:
        raise ValueError(
            f"the model's attention implementation {attention!r} takes no 4-D mask here "
            "(sdpa and eager do)"
        )
    return out, [int(n) for n in lengths]


def model_inputs(batch: Batch, min_length: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and the attention mask a Hugging Face model is called with: a group's
    batch (:func:`cut_group`) as it comes, cut and with its 4-D mask; any other batch cut to
    its longest text (at least ``min_length`` tokens; right padding)."""
    if GROUP_MASK in batch:
        return batch["input_ids"], batch[GROUP_MASK]
    mask = batch["attention_mask"]
    length = max(int(mask.sum(1).max()), min_length)
    return batch["input_ids"][:, :length], mask[:, :length]


def attention_of(model: nn.Module) -> str:
    """A Hugging Face model's attention implementation (``sdpa``, ``eager``, ...)."""
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def is_causal(model: nn.Module, vocab: int) -> bool:
    """Whether a Hugging Face model's attention is causal: its first position's hidden state
    does not change when a later token does (two tiny forward passes in eval mode)."""
    base = getattr(model, "base_model", model)
    a = torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab]])
    b = a.clone()
    b[0, -1] = 4 % vocab
    was = base.training
    base.eval()
    with torch.no_grad():
        ha = base(input_ids=a).last_hidden_state[0, 0]
        hb = base(input_ids=b).last_hidden_state[0, 0]
    base.train(was)
    return bool(torch.equal(ha, hb))


def by_length(data: Batch) -> Batch:
    """``data`` with the shortest examples (by attention mask) first: evaluation batches of
    right-padded text are then cut short."""
    order = torch.argsort(data["attention_mask"].sum(1), stable=True)
    return {k: v[order] for k, v in data.items()}


class SplitTask(Task):
    """A task whose examples are split once into the global test set, the server's split and
    the client pool. Subclasses give :meth:`split` (three index arrays) and :meth:`subset`."""

    server_examples = 0

    def split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def subset(self, indices: np.ndarray) -> Batch:
        raise NotImplementedError

    def pool_examples(self, indices: np.ndarray, client: int) -> Batch:
        return self.subset(self.split()[2][np.asarray(indices, dtype=np.int64)])

    def test_set(self) -> Batch:
        return self.subset(self.split()[0])

    def server_size(self) -> int:
        return self.server_examples

    def server_set(self) -> Batch:
        return self.subset(self.split()[1])

    def eval_order(self, data: Batch) -> Batch:
        return by_length(data) if "attention_mask" in data else data


def seeded_split(
    n: int, seed: list[int], test: int, server: int, cap: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One seeded permutation of ``n`` examples cut into the test set (``test``), the server
    split (``server``) and the client pool (the rest, at most ``cap``)."""
    perm = np.random.default_rng(seed).permutation(n)
    pool = perm[test + server :]
    if cap is not None:
        pool = pool[:cap]
    return np.sort(perm[:test]), np.sort(perm[test : test + server]), pool
