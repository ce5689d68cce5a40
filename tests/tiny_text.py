"""A tiny BERT (random weights, 2 layers, hidden 32) with its own word-level tokenizer, and a
labelled CSV corpus whose label is readable from its words: text tasks in tests, offline."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

POSITIVE = ["good", "great", "fine", "superb", "lovely", "bright"]
NEGATIVE = ["bad", "awful", "poor", "dull", "grim", "weak"]
NEUTRAL = ["the", "film", "movie", "plot", "cast", "story", "was", "and", "a", "very"]


def make_model(folder: Path) -> Path:
    """Save a tiny BERT encoder (no classification head) and its tokenizer into ``folder``."""
    import torch
    import transformers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    transformers.utils.logging.disable_progress_bar()
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "config.json").exists():
        return folder
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *NEUTRAL]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = BertModel(config)
    with torch.no_grad():  # "pretrained": the cue words point two opposite ways
        v = torch.randn(config.hidden_size)
        table = model.embeddings.word_embeddings.weight
        for word in POSITIVE:
            table[vocab.index(word)] += 0.5 * v
        for word in NEGATIVE:
            table[vocab.index(word)] -= 0.5 * v
    model.save_pretrained(str(folder))
    return folder


def make_corpus(path: Path, rows: int = 800, seed: int = 0) -> Path:
    """``text,label,author`` rows: a label's words appear more often in its texts."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "author"])
        for i in range(rows):
            label = ["neg", "pos"][int(rng.integers(2))]
            cue = POSITIVE if label == "pos" else NEGATIVE
            other = NEGATIVE if label == "pos" else POSITIVE
            words = list(rng.choice(NEUTRAL, size=int(rng.integers(3, 9))))
            words += list(rng.choice(cue, size=2)) + list(rng.choice(other, size=1))
            rng.shuffle(words)
            w.writerow([" ".join(words), label, f"author{i % 23}"])
    return path


def hf_overrides(root: Path) -> list[str]:
    """Overrides that select ``task=hf`` on the tiny model and corpus under ``root``."""
    model = make_model(root / "tiny-bert")
    data = make_corpus(root / "corpus.csv")
    return [
        "task=hf",
        f"task.model={model}",
        f"task.data_files=[{data}]",
        "task.group_column=author",
        "task.max_length=16",
        "task.test_examples=80",
        "task.server_examples=256",
    ]
