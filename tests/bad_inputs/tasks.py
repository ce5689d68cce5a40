"""Bad task inputs (``task=hf``'s data files and model folders, a partitioner that cannot
satisfy its settings) and adapter ranks larger than the layers they adapt.

The synthetic task of :func:`small` has 32 x 32 layers (``blocks.{0,1,2}.fc``): a LoRA rank
is at most ``min(m, n) = 32`` there, an FFA-LoRA rank at most ``n = 32`` (its ``A`` is frozen;
fedsim/adapters/lora.py says why the bounds differ).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tests.bad_inputs import Case, small


def _model(tmp: Path) -> Path:
    from tests.tiny_text import make_model

    return make_model(tmp / "m")


def _corpus(tmp: Path, name: str = "c.csv") -> Path:
    from tests.tiny_text import make_corpus

    return make_corpus(tmp / name, rows=60)


def _ready(run: Path, tmp: Path) -> None:
    """A tiny BERT in {tmp}/m and a good corpus in {tmp}/c.csv."""
    _model(tmp)
    _corpus(tmp)


def _latin1(run: Path, tmp: Path) -> None:
    _model(tmp)
    text = _corpus(tmp, "good.csv").read_text(encoding="utf-8").replace("film", "café")
    (tmp / "c.csv").write_bytes(text.encode("latin-1"))


def _pickle_only(run: Path, tmp: Path) -> None:
    """A model folder whose weights file is named pytorch_model.bin (its bytes are the
    safetensors file's: fedsim refuses it by its name, without reading it)."""
    _ready(run, tmp)
    weights = tmp / "m" / "model.safetensors"
    weights.rename(weights.with_name("pytorch_model.bin"))


def _single_class(run: Path, tmp: Path) -> None:
    _ready(run, tmp)
    rows = list(csv.DictReader(open(tmp / "c.csv", newline="")))
    with open(tmp / "one.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([r["text"], "pos"] for r in rows)


def _empty(run: Path, tmp: Path) -> None:
    _ready(run, tmp)
    (tmp / "empty.csv").write_text("")
    (tmp / "header.csv").write_text("text,label\n")


def _two_files(run: Path, tmp: Path) -> None:
    _ready(run, tmp)
    (tmp / "other.csv").write_text("body,label\nthe film was good,pos\nthe plot was dull,neg\n")


def _bad_json(run: Path, tmp: Path) -> None:
    _ready(run, tmp)
    (tmp / "c.jsonl").write_text('{"text": "a good film", "label": "pos"}\n{"text": oops}\n')
    (tmp / "c.json").write_text(json.dumps({"text": "a good film", "label": "pos"}))


#: the small run's settings that are not the synthetic task's
NOT_TASK = tuple(a for a in small() if not a.startswith("task"))


def hf(*extra: str) -> tuple[str, ...]:
    """``task=hf`` on {tmp}/m and {tmp}/c.csv, small and valid, with ``extra``."""
    return (
        *NOT_TASK,
        "task=hf",
        "task.model={tmp}/m",
        "task.data_files=[{tmp}/c.csv]",
        "task.test_examples=10",
        "task.server_examples=5",
        "task.max_length=16",
        "partition=iid",
        *extra,
    )


_HF = {"prepare": _ready}
TOO_LARGE = "must be at most min(m, n) = 32 of the smallest adapted layer, blocks.0.fc (32 x 32"

CASES = [
    # ------------------------------------------------------------------ adapter ranks
    Case(
        "adapter-lora-rank-above-layer",
        small("strategy=fedavg", "adapter.r=100000"),
        f"adapter.r=100000: {TOO_LARGE}",
    ),
    Case(
        "adapter-ffa-rank-above-layer",
        small("strategy=ffa", "adapter.r=33"),
        "adapter.r=33: must be at most n = 32 of the smallest adapted layer, blocks.0.fc",
    ),
    Case(
        "adapter-lora-sb-rank-above-layer",
        small("strategy=fedsb", "adapter.r=33"),
        f"adapter.r=33: {TOO_LARGE}",
    ),
    Case(
        "adapter-flora-rank-above-layer",
        small("strategy=flora", "adapter.r=64"),
        f"adapter.r=64: {TOO_LARGE}",
    ),
    Case(
        "adapter-fedex-rank-above-targeted-layer",
        small("strategy=fedex", "adapter.r=40", "adapter.target_modules=[blocks.2.fc]"),
        "adapter.r=40: must be at most min(m, n) = 32 of the smallest adapted layer, blocks.2.fc",
    ),
    Case("adapter-rank-zero", small("strategy=fedavg", "adapter.r=0"), "adapter.r=0"),
    Case("adapter-rank-negative", small("strategy=fedavg", "adapter.r=-1"), "adapter.r=-1"),
    Case("adapter-rank-string", small("strategy=fedavg", "adapter.r=eight"), "adapter.r=eight"),
    Case("adapter-lora-sb-rank-negative", small("strategy=fedsb", "adapter.r=-3"), "adapter.r=-3"),
    Case(
        "adapter-lora-sb-eta1",
        small("strategy=fedsb", "adapter.init.eta1=fast"),
        "adapter.init.eta1=fast: must be schedule, reference or a number > 0",
    ),
    Case(
        "adapter-alpha-negative", small("strategy=fedavg", "adapter.alpha=-16"), "adapter.alpha=-16"
    ),
    Case("adapter-dropout-one", small("strategy=fedavg", "adapter.dropout=1"), "adapter.dropout=1"),
    # ------------------------------------------------------------------ task=hf inputs
    Case(
        "task-hf-latin1-csv",
        hf(),
        "c.csv: is not utf-8 text: byte 0xe9 on line",
        prepare=_latin1,
    ),
    Case(
        "task-hf-without-model",
        (*NOT_TASK, "task=hf", "task.data_files=[{tmp}/c.csv]"),
        "task.model=???: is required and has no default",
        **_HF,
    ),
    Case(
        "task-hf-without-data-files",
        (*NOT_TASK, "task=hf", "task.model={tmp}/m"),
        "task.data_files=???: is required and has no default",
        **_HF,
    ),
    Case(
        "task-hf-pickle-only-model",
        hf(),
        "holds its weights only as pytorch_model.bin, a pickle format, which fedsim never loads",
        prepare=_pickle_only,
    ),
    Case(
        "task-hf-model-is-a-file",
        hf("task.model={tmp}/m/config.json"),
        "config.json: is a file; give the model's folder",
        **_HF,
    ),
    Case(
        "task-hf-model-missing",
        hf("task.model={tmp}/nothing"),
        "nothing: cannot be loaded offline",
        **_HF,
    ),
    Case(
        "task-hf-single-class",
        hf("task.data_files=[{tmp}/one.csv]"),
        "task.label_column=label: holds 1 class ('pos') in all 60 rows of",
        prepare=_single_class,
    ),
    Case(
        "task-hf-empty-csv",
        hf("task.data_files=[{tmp}/c.csv,{tmp}/empty.csv]"),
        "empty.csv: is empty",
        prepare=_empty,
    ),
    Case(
        "task-hf-header-only-csv",
        hf("task.data_files=[{tmp}/header.csv]"),
        "header.csv: holds no rows (only a header)",
        prepare=_empty,
    ),
    Case(
        "task-hf-missing-text-column",
        hf("task.text_column=body"),
        "task.text_column=body: is not a column of",
        **_HF,
    ),
    Case(
        "task-hf-column-missing-in-second-file",
        hf("task.data_files=[{tmp}/c.csv,{tmp}/other.csv]"),
        "task.text_column=text: is not a column of",
        prepare=_two_files,
    ),
    Case(
        "task-hf-missing-label-column",
        hf("task.label_column=sentiment"),
        "task.label_column=sentiment: is not a column of",
        **_HF,
    ),
    Case(
        "task-hf-data-file-missing",
        hf("task.data_files=[{tmp}/nope.csv]"),
        "nope.csv: is not a file (no such file)",
        **_HF,
    ),
    Case(
        "task-hf-bad-jsonl",
        hf("task.data_files=[{tmp}/c.jsonl]"),
        "c.jsonl: cannot be read as a jsonl table: line 2:",
        prepare=_bad_json,
    ),
    Case(
        "task-hf-json-not-a-list",
        hf("task.data_files=[{tmp}/c.json]"),
        "c.json: cannot be read as a json table: it holds a dict, not a list of objects",
        prepare=_bad_json,
    ),
    # ------------------------------------------------------------------ partitioners
    Case(
        "task-dirichlet-unsatisfiable-advice-whole",
        small("partition=dirichlet", "partition.min_partition_size=100"),
        "It is recommended to adjust the alpha or min_partition_size instead.",
    ),
]
