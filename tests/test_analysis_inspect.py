"""Attention statistics and scalar-mix probing on tiny models with known answers."""
import argparse
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers as tf

from unipeft.analysis import attention as att_mod
from unipeft.analysis.attention import attention_statistics, is_punctuation
from unipeft.analysis.probing import (ProbeData, centre_of_gravity, expected_layer, extract_features,
                                      load_probe_data, probe_features)
from unipeft.analysis import inspect_cli
from unipeft.errors import UnipeftError

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "a", "runs", "fast", "big", "red", "and", "bird", "sings"]
TEXTS = ["the cat sat on the mat .", "a dog runs fast !", "the big red bird sings , and the dog runs .",
         "a cat"]


@pytest.fixture
def tok(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!"] + WORDS
    f = tmp_path / "vocab.txt"
    f.write_text("\n".join(vocab) + "\n")
    tok = tf.BertTokenizerFast(vocab=str(f), do_lower_case=True)
    assert tok("the cat .")["input_ids"] == [2, 8, 9, 5, 3]  # a real WordPiece vocabulary, not all [UNK]
    return tok


def tiny_bert():
    cfg = tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return tf.BertModel(cfg).eval()


class Forced(torch.nn.Module):
    """Looks like a model returning attentions, but the attention pattern is constructed."""

    def __init__(self, pattern, layers=2, heads=4):
        super().__init__()
        self.pattern, self.L, self.H = pattern, layers, heads
        self.config = SimpleNamespace(_attn_implementation="sdpa")
        self.switches = []

    def set_attn_implementation(self, name):
        self.switches.append(name)
        self.config._attn_implementation = name

    def forward(self, input_ids, attention_mask, token_type_ids=None, output_attentions=False):
        assert output_attentions and self.config._attn_implementation == "eager"
        B, T = input_ids.shape
        real = attention_mask.float()
        a = torch.zeros(B, T, T)
        for b in range(B):
            n = int(real[b].sum())
            for i in range(T):
                if self.pattern == "cls":
                    a[b, i, 0] = 1
                elif self.pattern == "sep":
                    a[b, i, n - 1] = 1
                elif self.pattern == "uniform":
                    a[b, i, :n] = 1.0 / n
                elif self.pattern == "prev":
                    a[b, i, max(i - 1, 0)] = 1
                elif self.pattern == "next":
                    a[b, i, min(i + 1, n - 1)] = 1
                elif self.pattern == "punct":
                    p = [j for j in range(n) if int(input_ids[b, j]) in (5, 6, 7)]
                    a[b, i, p[0] if p else 0] = 1
        atts = tuple(a[:, None].expand(B, self.H, T, T).clone() for _ in range(self.L))
        return SimpleNamespace(attentions=atts)


def test_all_mass_on_cls(tok):
    m = Forced("cls")
    r = attention_statistics(m, tok, TEXTS, batch_size=3)
    assert r.to_cls.shape == (2, 4)
    np.testing.assert_allclose(r.to_cls, 1.0, atol=1e-6)
    np.testing.assert_allclose(r.entropy, 0.0, atol=1e-6)
    np.testing.assert_allclose(r.to_sep, 0.0, atol=1e-6)
    assert m.switches == ["eager", "sdpa"] and m.config._attn_implementation == "sdpa"  # restored


def test_uniform_entropy_is_log_n(tok):
    r = attention_statistics(Forced("uniform"), tok, TEXTS, batch_size=2)
    lens = [len(tok(t)["input_ids"]) for t in TEXTS]
    expect = sum(n * math.log(n) for n in lens) / sum(lens)  # mean over real query tokens
    np.testing.assert_allclose(r.entropy, expect, rtol=1e-5)
    np.testing.assert_allclose(r.to_cls, len(lens) / sum(lens), rtol=1e-5)  # 1/n from each of n queries
    assert r.n_tokens == sum(lens) and r.n_texts == len(TEXTS)


def test_previous_next_sep_and_punct(tok):
    r = attention_statistics(Forced("prev"), tok, TEXTS, batch_size=4)
    np.testing.assert_allclose(r.to_prev, 1.0, atol=1e-6)
    np.testing.assert_allclose(r.to_next, 0.0, atol=1e-6)
    r = attention_statistics(Forced("next"), tok, TEXTS)
    np.testing.assert_allclose(r.to_next, 1.0, atol=1e-6)
    r = attention_statistics(Forced("sep"), tok, TEXTS)
    np.testing.assert_allclose(r.to_sep, 1.0, atol=1e-6)
    r = attention_statistics(Forced("punct"), tok, TEXTS[:3])  # every text has punctuation
    np.testing.assert_allclose(r.to_punct, 1.0, atol=1e-6)
    top = r.table()
    assert "attention to [CLS]" in top and "layer 1" in top
    d = json.loads(json.dumps(r.to_dict()))
    assert d["num_layers"] == 2 and d["num_heads"] == 4 and len(d["to_prev"]) == 2


def test_is_punctuation():
    assert is_punctuation(".") and is_punctuation(" ,") and is_punctuation("##!") and is_punctuation("\u0120.")
    assert not is_punctuation("cat") and not is_punctuation("") and not is_punctuation("a.")


def test_real_tiny_bert_sdpa_switched_and_restored(tok):
    m = tiny_bert()
    before = m.config._attn_implementation
    r = attention_statistics(m, tok, TEXTS, batch_size=2)
    assert m.config._attn_implementation == before
    for name in ("to_cls", "to_sep", "to_punct", "to_prev", "to_next"):
        a = getattr(r, name)
        assert a.shape == (2, 4) and (a >= 0).all() and (a <= 1 + 1e-6).all()
    assert (r.to_cls + r.to_sep + r.to_punct <= 1 + 1e-5).all()
    assert (r.entropy > 0).all() and (r.entropy <= math.log(16) + 1e-5).all()


def test_attention_empty_corpus(tok):
    with pytest.raises(UnipeftError, match="empty"):
        attention_statistics(Forced("cls"), tok, ["", "  "])


def test_plot_attention(tok, tmp_path):
    pytest.importorskip("matplotlib")
    r = attention_statistics(Forced("cls"), tok, TEXTS)
    png = tmp_path / "a.png"
    att_mod.plot_attention_statistics(r, png)
    assert png.stat().st_size > 1000


# ------------------------------------------------------------------------------------ probing
def synthetic(k, n=360, layers=5, dim=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = rng.normal(size=(n, layers, dim)).astype(np.float32)
    X[:, k, :classes] += 2.5 * np.eye(classes)[y]
    return X, y


@pytest.mark.parametrize("k", [1, 3])
def test_probe_finds_the_informative_layer(k):
    X, y = synthetic(k)
    r = probe_features(X, y, epochs=250)
    assert r.accuracy > 0.85 and r.majority_baseline < 0.5
    assert int(np.argmax(r.weights)) == k and r.weights[k] > 0.5
    assert abs(r.centre_of_gravity - k) < 0.75
    assert abs(r.expected_layer - k) < 0.5
    assert r.cumulative_scores[k] - r.cumulative_scores[k - 1] > 0.4
    assert abs(r.weights.sum() - 1) < 1e-6
    d = json.loads(json.dumps(r.to_dict()))
    assert len(d["mixing_weights"]) == 5 and d["deltas"][0] == 0
    assert "centre of gravity" in r.table()


def test_formulas():
    assert centre_of_gravity([0, 0, 1]) == 2
    assert centre_of_gravity([0.5, 0.5]) == 0.5
    delta, e = expected_layer([0.5, 0.5, 0.9, 0.9])
    np.testing.assert_allclose(delta, [0, 0, 0.4, 0])
    assert e == pytest.approx(2.0)
    _, e = expected_layer([0.5, 0.7, 0.9])  # equal gains at layers 1 and 2
    assert e == pytest.approx(1.5)
    assert math.isnan(expected_layer([0.5, 0.5])[1])


def test_plot_probe(tmp_path):
    pytest.importorskip("matplotlib")
    from unipeft.analysis.probing import plot_probe

    X, y = synthetic(2, n=120, layers=3)
    r = probe_features(X, y, epochs=60)
    plot_probe(r, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------- files
def test_load_files(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("sentence\ttags\nthe cat sat\tD N V\na dog\tD N\n")
    d = load_probe_data(f, "sentence", "tags", "token")
    assert d.texts[0] == ["the", "cat", "sat"] and d.label_names == ["D", "N", "V"]
    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"text": "a cat", "label": "pos"}) + "\n\n" + json.dumps({"text": "a dog", "label": "neg"}) + "\n")
    d = load_probe_data(j)
    assert d.labels == ["pos", "neg"] and d.level == "sentence"
    c = tmp_path / "d.csv"
    c.write_text("text,label\n\"the cat, sat\",x\na dog,y\n")
    assert load_probe_data(c).texts[0] == "the cat, sat"


@pytest.mark.parametrize("name,content,kwargs,match", [
    ("missing.csv", None, {}, "not found"),
    ("d.csv", "text,lab\na,b\n", {}, "no column 'label'"),
    ("d.csv", "", {}, "no rows"),
    ("d.csv", "text,label\n,x\n  ,y\n", {}, "no rows with both"),
    ("d.csv", "text,label\na,x\nb,x\n", {}, "only one label"),
    ("d.tsv", "text\tlabel\nthe cat\tD\n", {"level": "token"}, "2 words but 1 labels"),
    ("d.txt", "hello\n", {}, "unknown file format"),
    ("d.jsonl", "{not json}\n", {}, "d.jsonl:1: not valid JSON"),
    ("d.csv", "text,label\na,x\n", {"level": "word"}, "unknown probing level"),
])
def test_file_errors(tmp_path, name, content, kwargs, match):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(UnipeftError, match=match) as e:
        load_probe_data(p, **kwargs)
    assert "\n" not in str(e.value)


def test_extract_features_token_and_sentence(tok):
    m = tiny_bert()
    data = ProbeData("token", [t.split() for t in TEXTS], [["a"] * len(t.split()) for t in TEXTS], ["a"])
    X, y, g = extract_features(m, tok, data, batch_size=3)
    assert X.shape == (sum(len(t.split()) for t in TEXTS), 3, 32)
    assert g.tolist()[:7] == [0] * 7
    data = ProbeData("sentence", TEXTS, ["x", "y", "x", "y"], ["x", "y"])
    X, y, g = extract_features(m, tok, data)
    assert X.shape == (4, 3, 32) and y.tolist() == [0, 1, 0, 1]
    with torch.no_grad():
        out = m(**tok(TEXTS[3:], return_tensors="pt"), output_hidden_states=True)
    np.testing.assert_allclose(X[3, 2], out.hidden_states[2][0].mean(0).numpy(), atol=1e-5)


# --------------------------------------------------------------------------------------- cli
@pytest.fixture
def model_dir(tmp_path, tok):
    d = tmp_path / "model"
    tiny_bert().save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_attention_json(tmp_path, model_dir, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(TEXTS) + "\n\n")
    p = inspect_cli.add_attention_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--texts", str(texts), "--model", str(model_dir), "--json"])
    assert inspect_cli.run_attention(args) == 0
    out = capsys.readouterr().out.strip()
    d = json.loads(out)
    assert d["n_texts"] == 4 and d["num_layers"] == 2 and len(d["entropy"][0]) == 4


def test_cli_probe_json_and_errors(tmp_path, model_dir, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"s": t, "y": "long" if len(t.split()) > 4 else "short"} for t in TEXTS * 5]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    p = inspect_cli.add_probe_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--data", str(data), "--text-column", "s", "--label-column", "y", "--model",
                         str(model_dir), "--json", "--epochs", "30"])
    assert inspect_cli.run_probe(args) == 0
    d = json.loads(capsys.readouterr().out.strip())
    assert len(d["mixing_weights"]) == 3 and d["labels"] == ["long", "short"]
    assert 0 <= d["centre_of_gravity"] <= 2 and len(d["cumulative_scores"]) == 3
    bad = p.parse_args(["--data", str(data), "--text-column", "nope", "--model", str(model_dir)])
    with pytest.raises(UnipeftError, match="no column 'nope'"):
        inspect_cli.run_probe(bad)
    bad = p.parse_args(["--data", str(data), "--text-column", "s", "--label-column", "y",
                        "--model", str(tmp_path / "nowhere")])
    with pytest.raises(UnipeftError, match="--model"):
        inspect_cli.run_probe(bad)
    a = inspect_cli.add_attention_arguments(argparse.ArgumentParser())
    with pytest.raises(UnipeftError, match="not found"):
        inspect_cli.run_attention(a.parse_args(["--texts", str(tmp_path / "no.txt")]))
