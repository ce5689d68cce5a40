"""Text tasks: the packaged corpora, any Hugging Face model on local table files, the natural
partition, the token cache, and short runs on a tiny BERT and on all-MiniLM-L6-v2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.tiny_text import make_corpus, make_model


def test_packaged_corpora_are_complete():
    from fedsim.tasks.text import bbc_news, rotten_tomatoes

    rt = rotten_tomatoes()
    assert len(rt.texts) == 12808 and rt.label_names == ["fresh", "rotten"]
    assert len(np.unique(rt.groups)) == 508  # movies with labelled snippets
    assert np.bincount(rt.labels)[0] == 7403  # fresh: the majority class, 0.578
    news = bbc_news()
    assert len(news.texts) == 2225 and len(news.label_names) == 5
    assert all(t and "\n" not in t for t in news.texts)  # headlines only


def test_table_formats_give_the_same_corpus(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fedsim.tasks.text import file_corpus, read_table

    csv_path = make_corpus(tmp_path / "c.csv", rows=30)
    rows = read_table(csv_path)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    want = file_corpus([str(csv_path)], "text", "label", "author")
    for name in ("c.jsonl", "c.json", "c.parquet"):
        got = file_corpus([str(tmp_path / name)], "text", "label", "author")
        assert got.texts == want.texts and np.array_equal(got.labels, want.labels)
        assert np.array_equal(got.groups, want.groups) and got.label_names == ["neg", "pos"]


def test_bad_columns_and_files_are_one_line_errors(tmp_path, capsys):
    from fedsim.cli import main
    from tests.conftest import tiny

    model = make_model(tmp_path / "m")
    data = make_corpus(tmp_path / "c.csv", rows=50)
    base = [
        "task=hf",
        f"task.model={model}",
        f"task.data_files=[{data}]",
        "task.test_examples=10",
        "task.server_examples=5",
    ]
    capsys.readouterr()  # what making the model printed
    cases = [
        (["task.text_column=body"], "task.text_column=body: is not a column of"),
        ([f"task.data_files=[{tmp_path / 'nope.csv'}]"], "is not a file"),
        (
            ["task.model=/nonexistent/model"],
            "task.model=/nonexistent/model: cannot be loaded offline",
        ),
        (["partition=natural"], "the task has no natural client ids"),
        (["partition=natural", "task.group_column=author", "sim.num_clients=30"], "23 natural"),
        (["task.precision=float16"], "task.precision=float16: must be one of float32, bfloat16"),
        (["task.precision=bfloat16", "privacy=dpsgd", "partition=iid"], "in float32"),
        (["task.dropout=1"], "task.dropout=1: must be a number in [0, 1)"),
        (["task.dropout=-0.1"], "task.dropout=-0.1"),
    ]
    for extra, expected in cases:
        with pytest.raises(SystemExit) as info:
            main(tiny(*base, *extra, f"hydra.run.dir={tmp_path / 'r'}"))
        assert info.value.code == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, (extra, err)
        assert not (tmp_path / "r").exists()


def test_natural_partition_keeps_groups_whole_and_balances_sizes(hf_task):
    from fedsim.build import build_components
    from fedsim.config import compose
    from tests.conftest import tiny

    c = build_components(compose(tiny(*hf_task, "partition=natural", "sim.num_clients=5"))[0])
    groups = c.task.pool_groups()
    owner = {}
    sizes = []
    for client in range(5):
        idx = c.data.indices(client)
        sizes.append(len(idx))
        for g in np.unique(groups[idx]):
            assert owner.setdefault(int(g), client) == client  # a group in one client only
    assert sum(sizes) == len(groups) and max(sizes) - min(sizes) <= 40


def test_tokens_are_cached_on_disk(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from fedsim.tasks.text import tokenize

    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    tok = AutoTokenizer.from_pretrained(str(make_model(tmp_path / "m")))
    texts = ["good film", "awful plot and cast", "the"]
    first = tokenize(texts, tok, 8)
    files = list((tmp_path / "cache" / "tokens").glob("*.safetensors"))
    assert len(files) == 1
    again = tokenize(texts, tok, 8)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert first["input_ids"].shape == (3, 8) and int(first["attention_mask"][2].sum()) == 3
    tokenize(texts, tok, 12)  # another length: another entry
    assert len(list((tmp_path / "cache" / "tokens").glob("*.safetensors"))) == 2


@pytest.mark.parametrize("strategy", ["fedavg", "fedsb"])
def test_hf_task_learns_on_a_tiny_bert(strategy, run_tiny, hf_task):
    summary, rows, _ = run_tiny(
        *hf_task, f"strategy={strategy}", "sim.rounds=4", "sim.local_steps=10", "sim.lr=0.01"
    )
    assert summary["status"] == "ok" and summary["task"] == "hf"
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    if strategy == "fedavg":  # the cue words are easy for LoRA on every layer
        assert rows[-1]["eval_accuracy"] >= 0.9


def test_minilm_sentiment_runs_offline(run_tiny, monkeypatch):
    """The packaged model and corpus: one short round, nothing fetched."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    summary, rows, out = run_tiny(
        "task=sentiment",
        "strategy=fedsb",
        "sim.num_clients=2",
        "sim.rounds=1",
        "sim.local_steps=2",
        "sim.batch_size=8",
        "task.test_examples=40",
        "task.pool_examples=200",
        "adapter.init.examples=32",
    )
    assert summary["status"] == "ok" and summary["export"]["modules"] == 36
    assert summary["export"]["modules_to_save"] == ["classifier"]
    assert rows[1]["eval_accuracy"] is not None
    # the export names the model portably (peft's get_peft_model had put the local path back)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_bfloat16_autocast_runs_close_to_float32(run_tiny, hf_task):
    common = (*hf_task, "sim.rounds=2", "sim.local_steps=5")
    _, full, _ = run_tiny(*common)
    _, half, _ = run_tiny(*common, "task.precision=bfloat16")
    assert half[0]["eval_loss"] == pytest.approx(full[0]["eval_loss"], rel=2e-2)
    assert half[-1]["eval_loss"] == pytest.approx(full[-1]["eval_loss"], rel=1e-1)
    assert half[-1]["eval_loss"] != full[-1]["eval_loss"]  # autocast did run in bfloat16


@pytest.mark.parametrize("task", ["sentiment", "news", "math"])
def test_each_packaged_task_checks_as_shipped(task):
    """``fedsim task=<name>`` with everything else at its default (Fed-SB, server init)."""
    from fedsim.config import check, compose

    check(compose([f"task={task}"])[0])


def test_seeds_share_the_test_set_and_differ_in_the_head():
    from fedsim.build import build_components
    from fedsim.config import compose

    tasks = [build_components(compose([f"sim.seed={s}"])[0]).task for s in (0, 1)]
    a, b = (t.split() for t in tasks)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # test, server split, pool
    heads = [dict(t.build_model().named_parameters())["classifier.weight"] for t in tasks]
    assert not np.allclose(heads[0].detach().numpy(), heads[1].detach().numpy())
    other = build_components(compose(["task.split_seed=1"])[0]).task.split()
    assert not np.array_equal(other[0], a[0])


def test_task_dropout_sets_every_dropout_of_the_model(hf_task):
    """task.dropout: every dropout layer (hidden, attention, classifier) takes the value;
    at 0 the model is deterministic in training, at 0.3 it is not."""
    from fedsim.build import build_components
    from fedsim.config import compose
    from tests.conftest import tiny

    for p in (0.0, 0.3):
        c = build_components(compose(tiny(*hf_task, f"task.dropout={p}"))[0])
        model, _ = c.model()
        rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
        assert rates == {p}
        model.train()
        batch = {k: v[:8] for k, v in c.task.test_set().items()}
        torch.manual_seed(1)
        a = c.task.loss(model, batch, reduction="none")
        torch.manual_seed(2)
        b = c.task.loss(model, batch, reduction="none")
        assert torch.equal(a, b) == (p == 0.0)
    c = build_components(compose(tiny(*hf_task))[0])  # null: the checkpoint's (BERT: 0.1)
    assert {m.p for m in c.model()[0].modules() if isinstance(m, torch.nn.Dropout)} == {0.1}


def test_data_files_are_refused_naming_the_file_and_what_is_wrong(tmp_path):
    from fedsim.errors import ConfigError
    from fedsim.tasks.text import file_corpus

    good = make_corpus(tmp_path / "c.csv", rows=20)
    text = good.read_text(encoding="utf-8").replace("film", "café")
    (tmp_path / "latin1.csv").write_bytes(text.encode("latin-1"))
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "one.csv").write_text("text,label\na good film,pos\na fine film,pos\n")
    (tmp_path / "gap.csv").write_text("text,label\na good film,pos\na dull film\n")
    (tmp_path / "c.jsonl").write_text('{"text": "a", "label": 1}\n\n{"text": oops}\n')
    (tmp_path / "list.json").write_text('[["a", 1]]')
    cases = [
        ("latin1.csv", "task.data_files", "is not utf-8 text: byte 0xe9 on line"),
        ("empty.csv", "task.data_files", "is empty"),
        ("one.csv", "task.label_column", "holds 1 class ('pos') in all 2 rows of"),
        ("gap.csv", "task.label_column", "has no value in row 2 of"),
        ("c.jsonl", "task.data_files", "cannot be read as a jsonl table: line 3:"),
        ("list.json", "task.data_files", "row 1 is a list, not an object of named columns"),
    ]
    for name, key, says in cases:
        with pytest.raises(ConfigError) as err:
            file_corpus([str(tmp_path / name)], "text", "label", None)
        assert err.value.key == key and says in str(err.value), (name, str(err.value))
        assert len(str(err.value).splitlines()) == 1
    # the same file read as what it is: task.encoding
    latin = file_corpus([str(tmp_path / "latin1.csv")], "text", "label", None, "latin-1")
    want = file_corpus([str(good)], "text", "label", None)
    assert latin.texts == [t.replace("film", "café") for t in want.texts]
    assert np.array_equal(latin.labels, want.labels)


def test_task_encoding_must_be_a_known_codec(tmp_path):
    from fedsim.errors import ConfigError
    from fedsim.tasks import HFTask

    data = [str(make_corpus(tmp_path / "c.csv", rows=20))]
    assert HFTask(model=str(tmp_path), data_files=data, encoding="cp1252").encoding == "cp1252"
    with pytest.raises(ConfigError, match="task.encoding=klingon: is not a text encoding"):
        HFTask(model=str(tmp_path), data_files=data, encoding="klingon")


def test_a_model_folder_with_only_pickled_weights_is_refused_unread(tmp_path):
    from fedsim.errors import ConfigError
    from fedsim.tasks.hf_models import check_weights, load_classifier

    folder = make_model(tmp_path / "m")
    check_weights(str(folder))  # safetensors: accepted
    weights = folder / "model.safetensors"
    weights.rename(folder / "pytorch_model.bin")  # its bytes are no pickle: refused by name
    for call in (lambda: check_weights(str(folder)), lambda: load_classifier(str(folder), 2, 0)):
        with pytest.raises(ConfigError) as err:
            call()
        assert err.value.key == "task.model"
        assert "holds its weights only as pytorch_model.bin, a pickle format" in str(err.value)
    with pytest.raises(ConfigError, match="is a file; give the model's folder"):
        check_weights(str(folder / "config.json"))
