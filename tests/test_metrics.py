"""Metrics with known answers: classification, regression, generation, grouping and errors."""
import math
import warnings
from types import SimpleNamespace

import pytest

from unipeft.errors import UnipeftError
from unipeft.training.metrics import compute, group_references, is_better
from unipeft.training.tasks import Task

BINARY = Task("sst2", "classification", labels=("neg", "pos"), metrics=("accuracy", "f1", "matthews", "loss"))
THREE = Task("news", "classification", labels=("a", "b", "c"), metrics=("accuracy", "f1"))
STSB = Task("stsb", "regression", metrics=("pearson", "spearman"))
E2E = Task("e2e", "causal_lm", metrics=("bleu", "rouge_l"))


def test_binary_classification_hand_computed():
    refs = [1, 0, 1, 1, 0, 0]
    preds = [1, 0, 0, 1, 1, 0]  # TP=2 FN=1 FP=1 TN=2
    out = compute(BINARY, preds, refs)
    assert list(out) == ["accuracy", "f1", "matthews"]  # "loss" is not computed here
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["f1"] == pytest.approx(2 / 3)         # 2TP / (2TP + FP + FN) = 4/6
    assert out["matthews"] == pytest.approx(1 / 3)   # (4 - 1) / sqrt(3^4)


def test_multiclass_f1_is_macro():
    refs = [0, 1, 2, 0]
    preds = [0, 2, 2, 1]  # per-class F1: 2/3, 0, 2/3
    out = compute(THREE, preds, refs)
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["f1"] == pytest.approx(4 / 9)


def test_single_label_matthews_is_zero_and_quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = compute(BINARY, [0, 0, 0], [0, 0, 0])
    assert out == {"accuracy": 1.0, "f1": 0.0, "matthews": 0.0}


def test_regression_linear_and_monotone():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert compute(STSB, x, [2 * v + 1 for v in x])["pearson"] == pytest.approx(1.0)
    out = compute(STSB, x, [math.exp(v) for v in x])
    assert out["spearman"] == pytest.approx(1.0)
    assert out["pearson"] < 0.99


def test_constant_prediction_is_zero_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = compute(STSB, [3.0, 3.0, 3.0, 3.0], [1.0, 2.0, 4.0, 5.0])
    assert out == {"pearson": 0.0, "spearman": 0.0}


def test_bleu_exact_match_with_one_of_several_refs():
    preds = ["the quick brown fox jumps over the lazy dog", "there is a cheap pub in the city centre"]
    refs = [
        ["a completely different sentence here", "the quick brown fox jumps over the lazy dog", "one more"],
        ["there is a cheap pub in the city centre"],  # ragged: fewer references
    ]
    out = compute(E2E, preds, refs)
    assert out["bleu"] == pytest.approx(100.0)
    assert out["rouge_l"] == pytest.approx(100.0)


def test_rouge_l_partial_match_known_value():
    # LCS 3 of 3 predicted / 6 reference tokens: P=1, R=1/2, F=2/3; best over references
    preds = ["the cat sat", "hello world"]
    refs = [["completely unrelated words", "the cat sat on the mat"], ["hello world"]]
    out = compute(E2E, preds, refs)
    assert out["rouge_l"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert 0 <= out["bleu"] < 100  # no 4-gram matches: corpus BLEU is 0


def test_chrf_and_nist_when_asked():
    task = SimpleNamespace(name="e2e", kind="seq2seq", metrics=("chrf", "nist"), labels=None)
    exact = compute(task, ["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert list(exact) == ["chrf", "nist"]
    assert exact["chrf"] == pytest.approx(100.0)
    assert exact["nist"] > 1.0
    worse = compute(task, ["the dog"], [["the cat sat on the mat"]])  # shorter than n=5: no crash
    assert worse["chrf"] < exact["chrf"] and 0 <= worse["nist"] < exact["nist"]


def test_only_requested_metrics():
    task = Task("e2e", "seq2seq", metrics=("rouge_l",))
    assert list(compute(task, ["a b"], [["a b"]])) == ["rouge_l"]


def test_group_references_first_seen_order():
    examples = [
        {"text": "name[Pub]", "target": "Pub is a pub."},
        {"text": "name[Cafe]", "target": "Cafe is a cafe."},
        {"text": "name[Pub]", "target": "There is a pub called Pub."},
    ]
    sources, refs = group_references(examples)
    assert sources == ["name[Pub]", "name[Cafe]"]
    assert refs == [["Pub is a pub.", "There is a pub called Pub."], ["Cafe is a cafe."]]


def test_is_better():
    assert is_better(BINARY, "accuracy", 0.5, None)
    assert is_better(BINARY, "accuracy", 0.6, 0.5)
    assert not is_better(BINARY, "accuracy", 0.5, 0.5)
    assert is_better(BINARY, "loss", 0.4, 0.5)
    assert not is_better(BINARY, "loss", 0.6, 0.5)


@pytest.mark.parametrize("task, preds, refs, match", [
    (BINARY, [1, 0], [1], "2 predictions but 1 references"),
    (BINARY, [], [], "nothing to score"),
    (BINARY, [2], [1], "label id in 0..1"),
    (STSB, ["x"], [1.0], "expected a number"),
    (E2E, ["a"], [[]], "non-empty list of strings"),
    (E2E, [1], [["a"]], "expected a string"),
    (Task("bad", "classification", labels=("a", "b"), metrics=("bleu",)), [1], [1], "does not apply"),
])
def test_errors(task, preds, refs, match):
    with pytest.raises(UnipeftError, match=match):
        compute(task, preds, refs)


def test_group_references_rejects_non_strings():
    with pytest.raises(UnipeftError, match="example 0"):
        group_references([{"text": "a", "target": 1}])
