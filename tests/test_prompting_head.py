"""Prompt-based fine-tuning: `unipeft train --head verbalizer` (the verbalizer's label scores are the logits)."""
from __future__ import annotations

import json
import re

import pytest
import torch

import tiny
import unipeft as up
from unipeft.cli import main
from unipeft.errors import UnipeftError
from unipeft.prompting import Scorer, Template, Verbalizer
from unipeft.prompting.head import PromptHead, VerbalizerModel

PATTERN = "{text} . it was {label} ."
VERB = "pos=good|very nice,neg=bad"


def with_mask(folder):
    tok = tiny.tokenizer("bert")
    tok.add_special_tokens({"mask_token": "[MASK]"})  # id 73 < VOCAB
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("head")
    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(120)]
    return {"gpt2": tiny.save(root / "gpt2", "gpt2", "lm", dropout=False),
            "bert": with_mask(tiny.save(root / "bert", "bert", "mlm", dropout=False)),
            "train": tiny.write_csv(root / "train.csv", ["text", "label"], rows[:96]),
            "dev": tiny.write_csv(root / "dev.csv", ["text", "label"], rows[96:])}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_head_logits_are_the_zero_shot_label_scores(family):
    model, tok = tiny.make(family, "mlm" if family == "bert" else "lm"), tiny.tokenizer(family)
    tok.add_special_tokens({"mask_token": "[MASK]"})
    t, v = Template(PATTERN), Verbalizer({"neg": "bad", "pos": ["good", "very nice"]})
    texts = ["the movie was great", "a dull plot", "it is very boring and the acting is poor"]
    head = PromptHead(t, v)
    head._masked = family == "bert"  # noqa: SLF001 -- what load() sets from the model
    prompts = [e["text"] for e in head.prompts([{"text": x, "target": 0} for x in texts], tok, 64)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    wrapped = VerbalizerModel(model, tok, t, v)
    out = wrapped(enc["input_ids"], enc["attention_mask"], labels=torch.tensor([1, 0, 0]))
    expect = Scorer(model, tok, t, v).scores([(x, None) for x in texts])
    assert torch.allclose(out.logits, expect, atol=1e-4)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(expect, torch.tensor([1, 0, 0])), atol=1e-4)


def test_texts_are_cut_so_the_label_place_fits():
    tok = tiny.tokenizer("gpt2")
    head = PromptHead.build(PATTERN, VERB)
    long = {"text": "the movie was " + "very " * 100 + "good", "target": 1}
    (p,) = head.prompts([long], tok, 32)
    ids = tok(p["text"])["input_ids"]
    assert len(ids) + 2 <= 32 and p["text"].endswith(". it was")


def cli(*args):
    return main([str(a) for a in args])


def train_args(f, family, *extra):
    return ["train", "--model", f[family], "--task", "sent", "--train", f["train"], "--dev", f["dev"],
            "--head", "verbalizer", "--template", PATTERN, "--verbalizer", VERB, "--precision", "fp32",
            "--threads", "1", "--batch-size", "16", "--quiet", "--json", *extra]


def test_full_prompt_fine_tuning_learns_and_eval_predict_reload_it(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(*train_args(files, "gpt2", "--method", "full", "--lr", "3e-3", "--max-steps", "100",
                           "--out", out)) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["dev"]["accuracy"] >= 0.9
    assert json.loads((out / "run.json").read_text())["head"]["template"] == PATTERN
    assert cli("eval", out, "--json", "--quiet") == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == res["dev"]["accuracy"]
    inp = tmp_path / "in.txt"
    inp.write_text("a great film\nan awful movie\n")
    assert cli("predict", out, "--input", inp, "--quiet") == 0
    preds = [json.loads(line)["prediction"] for line in capsys.readouterr().out.splitlines()]
    assert preds == ["pos", "neg"]


@pytest.mark.parametrize("family, method", [("gpt2", "lora"), ("gpt2", "bitfit"), ("gpt2", "prompt"),
                                            ("bert", "lora"), ("gpt2", "sparse_ft"), ("gpt2", "diff_pruning")])
def test_combines_with_peft_methods(files, tmp_path, capsys, family, method):
    out = tmp_path / method
    assert cli(*train_args(files, family, "--method", method, "--max-steps", "4", "--out", out)) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["steps"] == 4 and 0 < res["trainable_params"] < res["total_params"]
    # only the delta changed: the base's output layer is not part of it, and the delta reloads to the same scores
    assert cli("eval", out, "--json", "--quiet") == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == res["dev"]["accuracy"]


@pytest.mark.parametrize("extra, msg", [
    (["--verbalizer", "pos=good,neutral=fine"], r"no word for label\(s\) \['neg'\]"),
    (["--template", "it was {label}"], "has no {text}"),
])
def test_bad_prompt_input_is_one_line(files, capsys, extra, msg):
    assert cli(*train_args(files, "gpt2", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and re.search(msg.replace("{", r"\{").replace("}", r"\}"), err), err


def test_head_options_need_each_other(files, capsys, tmp_path):
    args = [a for a in train_args(files, "gpt2") if a not in ("--head", "verbalizer")]
    assert cli(*args) == 2
    assert "need --head verbalizer" in capsys.readouterr().err
    with pytest.raises(UnipeftError, match="needs --verbalizer"):
        PromptHead.build(PATTERN, None)
    with pytest.raises(UnipeftError, match="needs a classification task"):
        reg = tiny.write_csv(tmp_path / "reg.csv", ["text", "label"], [("a good film", 0.5)] * 20)
        up.train(model=files["gpt2"], task="reg", method="bitfit", head=PromptHead.build(PATTERN, VERB),
                 data={"train": reg, "dev": reg, "kind": "regression"})


def test_sentence_pairs_go_into_the_template(tmp_path, capsys):
    model = tiny.save(tmp_path / "gpt2", "gpt2", "lm", dropout=False)
    rows = [(t, "it was", ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(60)]
    train = tiny.write_csv(tmp_path / "train.csv", ["a", "b", "label"], rows[:48])
    dev = tiny.write_csv(tmp_path / "dev.csv", ["a", "b", "label"], rows[48:])
    out = tmp_path / "run"
    assert cli("train", "--model", model, "--task", "pairs", "--train", train, "--dev", dev, "--text-column", "a",
               "--text-pair-column", "b", "--head", "verbalizer", "--template", "{text} . {text_pair} {label} .",
               "--verbalizer", VERB, "--method", "bitfit", "--max-steps", "2", "--precision", "fp32", "--quiet",
               "--json", "--out", out) == 0
    capsys.readouterr()
    inp = tmp_path / "in.txt"
    inp.write_text("a great film\tit was\nan awful movie\tit was\n")
    assert cli("predict", out, "--input", inp, "--quiet") == 0
    preds = [json.loads(line)["prediction"] for line in capsys.readouterr().out.splitlines()]
    assert len(preds) == 2 and set(preds) <= {"pos", "neg"}
    with pytest.raises(UnipeftError, match="has {text_pair}: give every input's second text"):
        PromptHead.build("{text} . {text_pair} {label} .", VERB).prompts([{"text": "a", "target": 0}],
                                                                         tiny.tokenizer("gpt2"), 32)


def test_compare_trains_every_method_prompt_based_with_head_verbalizer(files, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli("compare", "--model", files["gpt2"], "--task", "sent", "--train", files["train"], "--dev",
               files["dev"], "--methods", "lora,bitfit", "--head", "verbalizer", "--template", PATTERN,
               "--verbalizer", VERB, "--max-steps", "3", "--batch-size", "16", "--precision", "fp32",
               "--threads", "1", "--in-process", "--json", "--out", out) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in report["methods"]] == ["LoRA, verbalizer head", "BitFit, verbalizer head"]
    for rec in report["methods"]:
        assert rec["error"] is None and 0 <= rec["metrics"]["accuracy"] <= 1
        run = json.loads((out / "runs" / rec["method"] / "run.json").read_text())
        assert run["head"]["template"] == PATTERN  # saved as a prompt-based run: eval/predict reload it so
        assert rec["trainable_params"] < rec["base_params"]


@pytest.mark.parametrize("extra, msg", [
    (["--head", "verbalizer", "--template", PATTERN, "--verbalizer", "pos=good,meh=fine"],
     r"no word for label\(s\) \['neg'\]"),
    (["--template", PATTERN, "--verbalizer", VERB], "need --head verbalizer"),
])
def test_compare_head_errors_come_before_any_training(files, tmp_path, capsys, extra, msg):
    out = tmp_path / "cmp"
    assert cli("compare", "--model", files["gpt2"], "--task", "sent", "--train", files["train"], "--dev",
               files["dev"], "--methods", "lora", "--max-steps", "2", "--in-process", "--quiet", "--out", out,
               *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and re.search(msg, err), err
    assert not (out / "runs").exists()
