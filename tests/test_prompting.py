"""Templates, verbalizers, batched label scoring with a reused prefix cache, `up.prompting.classify`, `unipeft icl`."""
from __future__ import annotations

import json
import re

import pytest
import torch

import tiny
import unipeft as up
from unipeft.cli import main
from unipeft.errors import UnipeftError
from unipeft.prompting import Scorer, Template, Verbalizer, classify, sample_demonstrations
from unipeft.prompting import icl

PATTERN = "{text} . it was {label} ."
WORDS = {"neg": ["bad", "awful poor"], "pos": ["good", "very nice"]}   # two-token words too
EXAMPLES = [("the movie was great", None), ("a plot", None), ("it is very dull and boring", None), ("film", None),
            ("really quite lovely acting", None)]
DEMOS = [("a good film", "pos"), ("a bad plot", "neg"), ("the story was dull", "neg")]


def lm(family):
    head = "mlm" if family == "bert" else "lm"
    model, tok = tiny.make(family, head), tiny.tokenizer(family)
    tok.add_special_tokens({"mask_token": "[MASK]"})  # id 73 < VOCAB
    return model, tok


# ---------------------------------------------------------------------------
# templates and verbalizers
# ---------------------------------------------------------------------------

def test_template_parts_and_filling():
    assert up.prompting.Template is Template and up.prompting.classify is classify
    t = Template("Review: {text}\nSentiment: {label}!", description="Classify.")
    assert t.prompt("a {b} c") == "Review: a {b} c\nSentiment:"  # braces in texts are plain characters
    assert t.gap == " " and t.after == "!"
    assert t.filled("x", None, "good") == "Review: x\nSentiment: good!"
    assert t.prefix([("x", None, "good")]) == "Classify.\n\nReview: x\nSentiment: good!\n\n"
    assert t.cloze("x", None, "[MASK]") == "Review: x\nSentiment: [MASK]!"
    pair = Template("{text} ? {label} , {text_pair}")
    assert pair.pair and pair.filled("a", "b", "yes") == "a ? yes , b"
    with pytest.raises(UnipeftError, match="text_pair"):
        pair.prompt("a")


@pytest.mark.parametrize("pattern, msg", [
    ("Sentiment: {label}", "has no {text}"),
    ("{text} was", "has no {label}"),
    ("{text} {label} {label}", "{label} 2 times"),
    ("{text} {lable}", "unknown field"),
    ("{label} {text}", "must come before"),
])
def test_template_errors(pattern, msg):
    with pytest.raises(UnipeftError, match=msg.replace("{", r"\{").replace("}", r"\}")) as e:
        Template(pattern)
    assert "\n" not in str(e.value)


def test_verbalizer_parse_order_and_errors():
    v = Verbalizer.parse("pos=good|great,neg=bad")
    assert v.words == {"pos": ["good", "great"], "neg": ["bad"]}
    assert v.order(["neg", "pos"]).labels == ("neg", "pos")
    with pytest.raises(UnipeftError, match=r"no word for label\(s\) \['neutral'\]"):
        v.order(["neg", "pos", "neutral"])
    with pytest.raises(UnipeftError, match="not labels of the task"):
        v.order(["pos"])
    with pytest.raises(UnipeftError, match="at least 2 labels"):
        Verbalizer({"pos": "good"})
    with pytest.raises(UnipeftError, match="non-empty words"):
        Verbalizer({"pos": [" "], "neg": "bad"})
    tok = tiny.tokenizer("gpt2")
    with pytest.raises(UnipeftError, match="not in the tokenizer's vocabulary"):
        Verbalizer({"pos": "excellent", "neg": "bad"}).token_ids(tok)

    class Empty:  # a tokenizer that drops the word (e.g. a normalizer stripping its characters)
        unk_token_id = None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [] if "zz" in text else [5]}

    with pytest.raises(UnipeftError, match="'zz' \\(label 'pos'\\) tokenises to nothing"):
        Verbalizer({"pos": "zz", "neg": "bad"}).token_ids(Empty())


def test_verbalizer_reduce_sums_and_normalises():
    v = Verbalizer({"a": ["x", "y z"], "b": ["w"]})
    s = torch.tensor([[-1.0, -4.0, -2.0]])
    assert torch.allclose(v.reduce(s, [1, 2, 1]), torch.tensor([[torch.logaddexp(torch.tensor(-1.), torch.tensor(-4.)),
                                                                  -2.0]]))
    vn = Verbalizer({"a": ["x", "y z"], "b": ["w"]}, normalize=True)
    assert torch.allclose(vn.reduce(s, [1, 2, 1])[0, 0], torch.logaddexp(torch.tensor(-1.), torch.tensor(-2.)))


# ---------------------------------------------------------------------------
# scoring: cached and batched == the naive loop
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_batched_scores_equal_naive_loop(family):
    model, tok = lm(family)
    s = Scorer(model, tok, Template(PATTERN, description="the movie"), Verbalizer(WORDS), DEMOS, batch_size=2)
    cached, naive = s.scores(EXAMPLES), s.naive(EXAMPLES)
    assert cached.shape == (len(EXAMPLES), 2)
    assert torch.allclose(cached, naive, atol=1e-4)
    # the demonstrations matter (the cache holds them): scores without them differ
    bare = Scorer(model, tok, Template(PATTERN), Verbalizer(WORDS)).scores(EXAMPLES)
    assert not torch.allclose(cached, bare, atol=1e-3)
    assert torch.allclose(bare, Scorer(model, tok, Template(PATTERN), Verbalizer(WORDS)).naive(EXAMPLES), atol=1e-4)


def test_prefix_encoded_once_and_each_batch_holds_only_its_own_tokens():
    model, tok = lm("gpt2")
    s = Scorer(model, tok, Template(PATTERN, description="the movie"), Verbalizer(WORDS), DEMOS, batch_size=2)
    widths = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        s.scores(EXAMPLES)
        s.scores(EXAMPLES)
    finally:
        hook.remove()
    prefix = len(s.prefix)
    assert widths[0] == (1, prefix)                       # the prefix, once
    batches = widths[1:]
    assert len(batches) == 2 * 3                          # 5 examples in batches of 2, twice; no second prefix pass
    words = [len(w) for w in s.words]
    for shape in batches:
        assert shape[1] < prefix                          # the rows never repeat the prefix
        assert shape[0] <= 2 * len(words)                 # all words of the batch's examples in one pass


def test_one_token_words_need_one_row_per_example():
    model, tok = lm("gpt2")
    s = Scorer(model, tok, Template(PATTERN), Verbalizer({"neg": "bad", "pos": ["good", "nice"]}), DEMOS,
               batch_size=8)
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: shapes.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        got = s.scores(EXAMPLES)
    finally:
        hook.remove()
    assert shapes[-1][0] == len(EXAMPLES)
    assert torch.allclose(got, s.naive(EXAMPLES), atol=1e-4)


def test_scores_with_a_lora_delta_attached():
    model, tok = lm("llama")
    before = Scorer(model, tok, Template(PATTERN), Verbalizer(WORDS), DEMOS).scores(EXAMPLES)
    up.attach(model, up.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]), name="d")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)  # LoRA's B starts at zero: give the delta an effect
    s = Scorer(model, tok, Template(PATTERN), Verbalizer(WORDS), DEMOS, batch_size=3)
    after = s.scores(EXAMPLES)
    assert torch.allclose(after, s.naive(EXAMPLES), atol=1e-4)
    assert not torch.allclose(after, before, atol=1e-3)


@pytest.mark.parametrize("method", [up.PromptTuning(length=3, init="random"), up.PrefixTuning(length=3), up.IA3()],
                         ids=["prompt", "prefix", "ia3"])
def test_cache_reuse_is_exact_with_input_and_attention_deltas(method):
    model, tok = lm("llama")
    up.attach(model, method, name="d")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    s = Scorer(model, tok, Template(PATTERN), Verbalizer(WORDS), DEMOS, batch_size=2)
    assert torch.allclose(s.scores(EXAMPLES), s.naive(EXAMPLES), atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_logits_at_runs_the_output_layer_on_the_scored_positions_only(family):
    from unipeft.model_parts import logits_at

    model, _ = lm(family)
    up.attach(model, up.LoRA(r=2), name="d")  # gradients must reach a delta through the picked positions
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    ids = torch.randint(5, 60, (3, 7))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    rows, pos = torch.tensor([0, 1, 1, 2]), torch.tensor([6, 2, 3, 4])
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape))
    try:
        got = logits_at(model, rows, pos, input_ids=ids, attention_mask=mask)
    finally:
        hook.remove()
    assert seen == [(1, 4, model.config.vocab_size)]  # 4 positions, not 3 x 7
    full = model(input_ids=ids, attention_mask=mask).logits[rows, pos]
    assert torch.allclose(got, full, atol=1e-5)
    grads = []
    for logits in (got, full):
        model.zero_grad()
        logits.log_softmax(-1)[:, 7].sum().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))
    # a model whose output layer is not what get_output_embeddings() names: every position, picked
    model.get_output_embeddings = lambda: None
    assert torch.allclose(logits_at(model, rows, pos, input_ids=ids, attention_mask=mask), full, atol=1e-5)


def test_masked_lm_scores_multi_token_words_at_expanded_masks():
    model, tok = lm("bert")
    t, v = Template(PATTERN), Verbalizer(WORDS)
    s = Scorer(model, tok, t, v, DEMOS[:1])
    got = s.scores(EXAMPLES[:2])
    assert torch.allclose(got, s.naive(EXAMPLES[:2]), atol=1e-4)
    # by hand: 'very nice' (two tokens) at two [MASK]s, summed
    text = "a good film . it was good . \n\nthe movie was great . it was [MASK] [MASK] ."
    ids = tok(s.prefix_text + t.cloze("the movie was great", None, "[MASK] [MASK]"))["input_ids"]
    assert ids == tok(text.replace(" \n\n", "\n\n"))["input_ids"]
    at = ids.index(tok.mask_token_id)
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    very, nice = tok(" very nice", add_special_tokens=False)["input_ids"]
    good = tok(" good", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        one = tok(s.prefix_text + t.cloze("the movie was great", None, "[MASK]"))["input_ids"]
        logp1 = model(input_ids=torch.tensor([one])).logits[0].log_softmax(-1)
    expect = torch.logaddexp(logp1[one.index(tok.mask_token_id), good], logp[at, very] + logp[at + 1, nice])
    assert torch.allclose(got[0, 1], expect, atol=1e-4)


def test_calibration_divides_by_the_content_free_probabilities():
    model, tok = lm("gpt2")
    s = Scorer(model, tok, Template(PATTERN), Verbalizer(WORDS), DEMOS)
    raw = s.scores(EXAMPLES).log_softmax(-1)
    cf = s.scores([("N/A", None)]).log_softmax(-1)[0]
    cal = s.scores(EXAMPLES, calibrate=True)
    assert torch.allclose(cal, (raw - cf).log_softmax(-1), atol=1e-5)
    assert torch.allclose(s.scores([("N/A", None)], calibrate=True).exp(), torch.full((1, 2), 0.5), atol=1e-5)


def test_classify_returns_labels_and_scores():
    model, tok = lm("gpt2")
    labels, scores = classify(model, tok, [t for t, _ in EXAMPLES], template=PATTERN, verbalizer=WORDS,
                              demonstrations=DEMOS, scores=True)
    assert labels == [("neg", "pos")[i] for i in scores.argmax(-1).tolist()]
    assert classify(model, tok, "a film", template=PATTERN, verbalizer="neg=bad,pos=good") in (["neg"], ["pos"])


def test_prompt_longer_than_the_context_is_an_error():
    model, tok = lm("gpt2")  # 64 positions
    with pytest.raises(UnipeftError, match=r"longer than the model's context \(64\)") as e:
        classify(model, tok, ["the movie was " + "very " * 70], template=PATTERN, verbalizer=WORDS)
    assert "\n" not in str(e.value)
    assert classify(model, tok, ["the movie was " + "very " * 70], template=PATTERN, verbalizer=WORDS,
                    max_text_tokens=20)


def test_demonstrations_seeded_balanced_and_bounded():
    train = [{"text": f"t{i}", "target": int(i < 30)} for i in range(40)]  # 30 of label 1, 10 of label 0
    a = sample_demonstrations(train, 8, seed=3, balanced=True)
    assert a == sample_demonstrations(train, 8, seed=3, balanced=True)
    assert sum(d["target"] for d in a) == 4
    assert sample_demonstrations(train, 8, seed=4) != sample_demonstrations(train, 8, seed=5)
    with pytest.raises(UnipeftError, match="41 shots asked for but the training set has only 40 examples"):
        sample_demonstrations(train, 41)


# ---------------------------------------------------------------------------
# unipeft icl
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("icl")
    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(60)]
    tables = tiny.table_rows(30)
    return {"model": tiny.save(root / "gpt2", "gpt2", "lm"),
            "train": tiny.write_csv(root / "train.csv", ["text", "label"], rows[:40]),
            "dev": tiny.write_csv(root / "dev.csv", ["text", "label"], rows[40:]),
            "gtrain": tiny.write_csv(root / "gtrain.csv", ["text", "target"], tables[:20]),
            "gdev": tiny.write_csv(root / "gdev.csv", ["text", "target"], tables[20:])}


def icl_args(f, *extra):
    return ["icl", "--model", f["model"], "--task", "sent", "--train", f["train"], "--dev", f["dev"],
            "--template", "{text} . it was {label} .", "--verbalizer", "pos=good|very nice,neg=bad", *extra]


def test_cli_icl_json(files, capsys):
    assert main(icl_args(files, "--shots", "4", "--balanced", "--calibrate", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shots"] == 4 and out["examples"] == 20 and 0 <= out["accuracy"] <= 1 and "f1" in out
    # the same numbers from Python
    model, tok = icl.load_lm(files["model"])
    again = icl.run(files["model"], "sent", shots=4, balanced=True, calibrate=True, template=PATTERN,
                    verbalizer="pos=good|very nice,neg=bad", data={"train": files["train"], "dev": files["dev"]},
                    lm=(model, tok))
    assert again["accuracy"] == out["accuracy"]


@pytest.mark.parametrize("extra, msg", [
    (["--shots", "41"], "41 shots asked for but the training set has only 40 examples"),
    (["--template", "it was {label}"], "has no {text}"),
    (["--verbalizer", "pos=good,neutral=fine"], r"no word for label\(s\) \['neg'\]"),
    (["--verbalizer", "pos=good,neg=zzz"], "not in the tokenizer's vocabulary"),
])
def test_cli_icl_errors_are_one_line(files, capsys, extra, msg):
    assert main(icl_args(files, *extra)) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("[unipeft]")]  # progress
    err = "\n".join(errors)
    assert len(errors) == 1 and re.search(msg.replace("{", r"\{").replace("}", r"\}"), err), err


def test_icl_generation_task_fills_the_template_and_generates(files):
    model, tok = icl.load_lm(files["model"])
    out = icl.run(files["model"], "tables", shots=2, template="{text} = {label}", lm=(model, tok),
                  data={"train": files["gtrain"], "dev": files["gdev"], "kind": "causal_lm"}, max_new_tokens=4)
    assert out["examples"] == 10 and "bleu" in out and "rouge_l" in out
