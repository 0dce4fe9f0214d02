"""The chat task kind: assistant-only loss masks, prompts, bad data, packing, and train/eval/predict end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch

import tiny
import unipeft as up
from unipeft.cli import main
from unipeft.errors import UnipeftError
from unipeft.training import chat, run
from unipeft.training.batching import IGNORE, Collator, encode
from unipeft.training.data import load_task
from unipeft.training.tasks import Task

# a chat template in the tiny tokenizer's words: roles become [UNK], [EOS] ends every turn
TEMPLATE = ("{% for m in messages %}[CLS] {{ m['role'] }} {{ m['content'] }} [EOS] {% endfor %}"
            "{% if add_generation_prompt %}[CLS] assistant {% endif %}")
CHAT = Task("c", "chat", chat_template=TEMPLATE)
CONV = [{"role": "system", "content": "a"}, {"role": "user", "content": "good movie"},
        {"role": "assistant", "content": "great film"}, {"role": "user", "content": "bad"},
        {"role": "assistant", "content": "awful"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {f: tiny.save(root / f, f, "lm", dropout=False) for f in ("gpt2", "llama")}


def tok():
    return tiny.tokenizer("gpt2")


def ids_of(words: str) -> list[int]:
    return tok().convert_tokens_to_ids(words.split())


def write_jsonl(path, convs):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return str(path)


def table_chats(n, seed=0):
    return [[{"role": "user", "content": s}, {"role": "assistant", "content": t}] for s, t in tiny.table_rows(n, seed)]


# ---------------------------------------------------------------------------
# masks and prompts
# ---------------------------------------------------------------------------

def test_loss_covers_exactly_the_assistant_turns():
    enc = encode(CHAT, [chat.to_example(CONV)], tok(), 64, cache_dir=None)
    ex = enc.example(0)
    words = ("[CLS] [UNK] a [EOS] [CLS] [UNK] good movie [EOS] [CLS] [UNK] great film [EOS] "
             "[CLS] [UNK] bad [EOS] [CLS] [UNK] awful [EOS]")
    assert ex["input_ids"].tolist() == ids_of(words)
    # the positions with a loss: both assistant turns with their end-of-turn token, nothing else
    taught = ["great", "film", "[EOS]", "awful", "[EOS]"]
    expected = [i if w in taught and k in (11, 12, 13, 20, 21) else IGNORE
                for k, (w, i) in enumerate(zip(words.split(), ids_of(words)))]
    assert ex["labels"].tolist() == expected
    assert [k for k, v in enumerate(ex["labels"].tolist()) if v != IGNORE] == [11, 12, 13, 20, 21]


def test_generation_prompt_is_the_training_sequence_up_to_the_reply():
    t = tok()
    full = encode(CHAT, [chat.to_example(CONV)], t, 64, cache_dir=None).example(0)
    prompt = encode(CHAT, [chat.to_example(CONV)], t, 64, prompts_only=True, cache_dir=None).example(0)
    first_label = int((full["labels"][17:] != IGNORE).nonzero()[0]) + 17
    assert prompt["input_ids"].tolist() == full["input_ids"][:first_label].tolist()
    assert chat.prompt_ids(t, CONV[:-1], TEMPLATE) == prompt["input_ids"].tolist()


def test_generation_stops_at_the_templates_end_of_turn(models):
    """A template that closes turns with [SEP] (not the tokenizer's end-of-text [EOS]): replies stop there."""
    sep_template = TEMPLATE.replace("[EOS]", "[SEP]")
    assert chat.end_of_turn_ids(tok(), sep_template) == [tok().sep_token_id]
    assert chat.end_of_turn_ids(tok(), TEMPLATE) == [tok().eos_token_id]
    assert chat.end_of_turn_ids(tok(), "{% for m in messages %}{{ m['content'] }} {% endfor %}") == []
    from unipeft.training.evaluation import generate

    model, seen = run.load_model(models["gpt2"], CHAT)[0], []
    original = model.generate
    model.generate = lambda **kw: seen.append(kw["eos_token_id"]) or original(**kw)
    source = json.dumps([{"role": "user", "content": "good movie"}])
    generate(model, Task("c", "chat", chat_template=sep_template), [source], tok(), max_new_tokens=2)
    assert seen == [[tok().eos_token_id, tok().sep_token_id]]


def test_real_chat_template_masks_the_assistant_turns_when_smollm2_is_present():
    from unipeft import zoo

    try:
        path = zoo.smollm2_path()
    except UnipeftError:
        pytest.skip("SmolLM2 is not in the local cache")
    import transformers as tf

    t = tf.AutoTokenizer.from_pretrained(path)
    ids, labels = chat.tokens_and_labels(t, CONV, None)
    taught = t.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert taught == "great film<|im_end|>\nawful<|im_end|>\n"
    assert t.decode(ids) == t.apply_chat_template(CONV, tokenize=False)


# ---------------------------------------------------------------------------
# bad data: one line, before training
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("conv, message", [
    ([{"role": "user", "content": "good"}], "no assistant turn"),
    ([{"role": "user", "content": "good"}, {"role": "bot", "content": "fine"}], "unknown role 'bot'"),
    ([{"role": "user", "content": "good"}, {"role": "assistant", "content": "fine"},
      {"role": "user", "content": "bad"}], "ends with a user turn"),
    ([{"role": "user"}], "must be an object with 'role' and 'content'"),
])
def test_bad_conversations_are_one_line_errors_naming_the_line(tmp_path, conv, message):
    good = table_chats(3)
    path = write_jsonl(tmp_path / "train.jsonl", good + [conv])
    with pytest.raises(UnipeftError, match=message) as e:
        load_task("c", train=path, kind="chat")
    assert "train.jsonl:4" in str(e.value) and "\n" not in str(e.value)


def test_missing_messages_key_and_csv_are_refused(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(UnipeftError, match="no 'messages' key"):
        load_task("c", train=str(p), kind="chat")
    with pytest.raises(UnipeftError, match="must be JSONL"):
        load_task("c", train=str(tmp_path / "t.csv"), kind="chat")


def test_model_without_a_chat_template_needs_template(models, tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", table_chats(20))
    args = ["train", "--model", models["gpt2"], "--task", "c", "--kind", "chat", "--train", path,
            "--max-steps", "1", "--threads", "1", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no chat template" in err[0] and "--template" in err[0]


def test_template_that_rewrites_earlier_turns_is_refused():
    # a template that drops earlier assistant turns (as some "thinking" templates do)
    rewriting = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}[CLS] {{ m['content'] }} [EOS] "
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}[CLS] {% endif %}")
    with pytest.raises(UnipeftError, match="rewrites earlier turns"):
        chat.tokens_and_labels(tok(), CONV, rewriting)


def test_template_not_for_chat_tasks_and_not_a_template(tmp_path):
    rows = tiny.write_csv(tmp_path / "t.csv", ["text", "label"], [(t, y) for t, y in tiny.sentiment_rows(20)])
    ds = load_task("s", train=rows)
    with pytest.raises(UnipeftError, match="applies to chat tasks"):
        chat.with_template(ds, TEMPLATE)
    with pytest.raises(UnipeftError, match="neither a Jinja chat template nor a file"):
        chat.read_template("no-such-file.jinja")


# ---------------------------------------------------------------------------
# packing: attention does not cross examples
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_rows_give_every_example_its_own_logits(models, family):
    t = tok()
    model, _ = run.load_model(models[family], CHAT)
    examples = [chat.to_example(c) for c in table_chats(7, seed=3)]
    enc = encode(CHAT, examples, t, 64, cache_dir=None)
    packed = chat.pack(enc, 40)
    assert len(packed) < len(enc) and packed.num_tokens() == enc.num_tokens()
    batch = Collator(t.pad_token_id)([packed.example(i) for i in range(len(packed))])
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        k = 0
        for row in range(len(packed)):
            pos = packed.positions[packed.offsets[row]:packed.offsets[row + 1]].tolist()
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for a, b in zip(starts, starts[1:]):
                alone = model(input_ids=enc.example(k)["input_ids"][None]).logits[0]
                assert torch.allclose(logits[row, a:b], alone, atol=1e-5), (family, row, a, b)
                k += 1
    assert k == len(enc)


def test_packing_refuses_methods_that_add_positions(models, tmp_path):
    model, t = run.load_model(models["gpt2"], CHAT)
    up.attach(model, up.PromptTuning(length=2), name="p")
    with pytest.raises(UnipeftError, match="adds virtual tokens"):
        chat.check_packing(model)


# ---------------------------------------------------------------------------
# end to end: train, eval, predict through the template
# ---------------------------------------------------------------------------

def test_train_eval_predict_chat_with_lora_and_packing(models, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", table_chats(96))
    dev = write_jsonl(tmp_path / "dev.jsonl", table_chats(12, seed=9))
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    out = tmp_path / "run"
    args = ["train", "--model", models["llama"], "--task", "c", "--kind", "chat", "--train", train, "--dev", dev,
            "--template", template, "--method", "lora", "--lr", "1e-2", "--max-steps", "40", "--batch-size", "8",
            "--packing", "--max-length", "48", "--precision", "fp32", "--threads", "1", "--quiet", "--out", out,
            "--json"]
    assert main([str(a) for a in args]) == 0
    res = json.loads(capsys.readouterr().out)
    info = json.loads((out / "run.json").read_text())
    assert info["task"]["kind"] == "chat" and info["task"]["chat_template"] == TEMPLATE
    assert info["train"]["packing"] is True
    assert main(["eval", str(out), "--json", "--quiet"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["loss"] == pytest.approx(res["dev"]["loss"], rel=1e-4)
    assert metrics["bleu"] > 0.5  # the tiny model learned "<name> serves <food> food ."
    inp = tmp_path / "in.txt"
    inp.write_text("name = Kilo food = french\n" + json.dumps([{"role": "user", "content": "name = Kilo food = french"}])
                   + "\n")
    assert main(["predict", str(out), "--input", str(inp), "--quiet"]) == 0
    preds = [json.loads(line)["prediction"] for line in capsys.readouterr().out.splitlines()]
    # a plain line is a user turn: both forms are the same conversation, generated through the template
    assert preds[0] == preds[1] and preds[0].endswith("serves french food ."), preds


@pytest.mark.parametrize("method", ["prefix", "prompt", "ia3", "bitfit", "adapter", "full"])
def test_every_causal_lm_method_trains_and_generates_on_chats(models, tmp_path, method):
    train = write_jsonl(tmp_path / "train.jsonl", table_chats(16))
    dev = write_jsonl(tmp_path / "dev.jsonl", table_chats(3, seed=5))
    res = run.train(models["gpt2"], "c", method, data={"train": train, "dev": dev, "kind": "chat"},
                    chat_template=TEMPLATE, max_steps=2, batch_size=8, max_length=40, max_new_tokens=4,
                    precision="fp32", progress=False)
    assert res["steps"] == 2 and math.isfinite(res["dev"]["loss"]) and "bleu" in res["dev"]
