"""Trainable new tokens (up.NewTokens): BPE-learned domain words, new embedding rows only, a small
delta with its tokens, the tokenizer extended on attach and on load, tied and untied output rows,
transformers' own LM loss over the widened logits, combination with a task delta, the training
recipe, and bad input.

The contract grid's rows do not fit this method (its batches hold no new token, so nothing would
train, and a tied LM head's logits grow by the new tokens): the same promises are checked here on
every family."""
import json
import math

import pytest
import torch
import transformers as tf

import tiny
import unipeft as up
from unipeft.methods.new_tokens import InputRows, OutputRows, learn_tokens

DOMAIN = ["the enzyme kinase binds the protein", "protein kinase enzyme assay", "the assay was good",
          "kinase protein enzyme binds", "a protein assay"] * 3
NEW = ("enzyme", "kinase", "protein", "assay", "binds")


def base_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def subword_tokenizer():
    """A small BPE tokenizer trained on general text (no download): domain words come out in pieces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    general = ["the movie was good and the plot was fine", "a film is a story", "it was really quite nice",
               "the price is high near the centre", "pro tein kin ase en zy me as say bin ds"] * 4
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(general, trainers.BpeTrainer(vocab_size=90, special_tokens=["[PAD]", "[UNK]"],
                                                         show_progress=False))
    return tf.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[PAD]", unk_token="[UNK]")


def subword_pieces(word):
    return subword_tokenizer()(word, add_special_tokens=False)["input_ids"]


def gpt2_for(tok, size=None):
    """A tiny GPT-2 whose vocabulary is exactly the tokenizer's (new ids lie past the embedding)."""
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=size or len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
                        bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel._from_config(cfg).eval()


def llama_for(tok):
    """A tiny Llama with an untied LM head and the tokenizer's vocabulary exactly."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    return tf.LlamaForCausalLM._from_config(cfg).eval()


LM_FOR = {"gpt2": gpt2_for, "llama": llama_for}


def test_learn_tokens_keeps_whole_domain_words_the_tokenizer_lacks():
    tok = tiny.tokenizer("bert")
    words = learn_tokens(DOMAIN, tok, count=10)
    assert set(words) == set(NEW)  # 'the', 'good', 'was', 'a' are known; pieces of words are not words
    assert learn_tokens(DOMAIN, tok, count=2) == words[:2]  # merge order: the first merges first
    assert learn_tokens(DOMAIN, tok, count=10, min_frequency=100) == []


def test_subword_base_rows_start_at_the_mean_of_the_pieces():
    tok = subword_tokenizer()
    pieces = {w: tok(w, add_special_tokens=False)["input_ids"] for w in NEW}
    assert all(len(p) > 1 for p in pieces.values())  # the base cuts each domain word
    model = gpt2_for(tok)
    E = model.get_input_embeddings().weight.detach().clone()
    up.attach(model, up.NewTokens(corpus=DOMAIN, count=10), name="tok", tokenizer=tok)
    cfg = up.deltas(model)["tok"]
    assert cfg.corpus is None and cfg.first_id == E.shape[0] and set(cfg.tokens) == set(NEW)
    rows = up.engine.registry(model).deltas["tok"].module.rows
    for i, w in enumerate(cfg.tokens):
        assert tok.convert_tokens_to_ids(w) == cfg.first_id + i
        torch.testing.assert_close(rows[i], E[pieces[w]].mean(0))
    # the text now encodes to one id per domain word (whole words only: 'proteins' stays in pieces)
    ids = tok("the protein kinase", add_special_tokens=False)["input_ids"]
    assert ids[1:] == [tok.convert_tokens_to_ids("protein"), tok.convert_tokens_to_ids("kinase")]


def test_tied_lm_head_predicts_the_new_tokens_with_the_same_rows():
    tok = subword_tokenizer()
    model = gpt2_for(tok)
    V = model.config.vocab_size
    up.attach(model, up.NewTokens(corpus=DOMAIN, count=10), name="tok", tokenizer=tok)
    rows = up.engine.registry(model).deltas["tok"].module.rows
    ids = torch.tensor([tok("the protein kinase binds", add_special_tokens=False)["input_ids"]])
    assert ids.max() >= V  # new ids lie past the base embedding: never looked up in it
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    assert out.logits.shape[-1] == V + len(NEW)
    h = out.hidden_states[-1]
    torch.testing.assert_close(out.logits[..., V:], h @ rows.T)
    # trained through the logits (a loss over the extended vocabulary), the input rows move too
    logits = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    assert rows.grad is not None and rows.grad.abs().sum() > 0
    assert up.trainable_parameters(model)[0] == len(NEW) * 32
    assert model.get_input_embeddings().weight.shape[0] == V  # nothing resized



def shifted_cross_entropy(logits, labels):
    """The causal LM loss by hand: token t predicts t + 1, -100 ignored, the mean over the rest."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lm_loss_over_the_widened_vocabulary_trains_saves_loads_and_detaches(family, tmp_path):
    """GPT-2 (tied head) and Llama (untied head) whose vocabularies end at the tokenizer's last id:
    transformers' loss would flatten V + n columns by V; model(ids, labels=ids) gives the causal LM
    loss over all of them, in a plain loop, saved, loaded and detached."""
    tok = subword_tokenizer()
    model = LM_FOR[family](tok)
    V = model.config.vocab_size
    before = base_state(model)
    plain = torch.tensor([tok("the movie was good", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        base_logits, base_loss = model(plain).logits, model(plain, labels=plain).loss
    head = model.get_output_embeddings().weight.detach().clone()
    up.attach(model, up.NewTokens(corpus=DOMAIN, count=10), name="tok", tokenizer=tok)
    table = up.engine.registry(model).deltas["tok"].module
    n = len(up.deltas(model)["tok"].tokens)
    enc = tok(["the protein kinase binds the enzyme", "a protein assay"], return_tensors="pt", padding=True)
    ids = enc["input_ids"]
    labels = ids.masked_fill(enc["attention_mask"] == 0, -100)
    assert ids.max() >= V
    with torch.no_grad():
        out = model(**enc, labels=labels, output_hidden_states=True)
    assert out.logits.shape[-1] == V + n  # the new ids are predicted, tied head or not
    if family == "llama":  # its own output rows, starting at the mean of the head's rows of the pieces
        assert table.out_rows.shape == (n, 32)
        for i, w in enumerate(up.deltas(model)["tok"].tokens):
            torch.testing.assert_close(table.out_rows[i], head[subword_pieces(w)].mean(0))
        torch.testing.assert_close(out.logits[..., V:], out.hidden_states[-1] @ table.out_rows.T)
    else:
        assert table.out_rows is None
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, shifted_cross_entropy(out.logits, labels))
    as_tuple = model(**enc, labels=labels, return_dict=False)  # the loss first, as transformers has it
    torch.testing.assert_close(as_tuple[0], out.loss)
    assert torch.equal(as_tuple[1], out.logits)
    # a Trainer's num_items_in_batch (gradient accumulation) reaches the loss as transformers passes it: sum / k
    with torch.no_grad():
        summed = model(**enc, labels=labels, num_items_in_batch=torch.tensor(4)).loss
    torch.testing.assert_close(summed, out.loss * (labels[:, 1:] != -100).sum() / 4)
    assert up.trainable_parameters(model)[0] == n * 32 * (2 if family == "llama" else 1)

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(5):
        loss = model(**enc, labels=labels).loss
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        trained = model(**enc, labels=labels)
    assert trained.loss.item() < first - 0.05
    for name, p in model.named_parameters():
        if "unipeft_" not in name:
            assert torch.equal(p, before[name]), name

    target = up.save(model, tmp_path / "d", name="tok")
    meta = json.loads((target / "delta.json").read_text())
    shapes = {k: v["shape"] for k, v in meta["tensors"].items()}
    assert shapes == ({"model:rows": [n, 32], "model:out_rows": [n, 32]} if family == "llama" else
                      {"model:rows": [n, 32]})  # the n new rows, never a V x H matrix
    fresh_tok = subword_tokenizer()
    fresh = LM_FOR[family](fresh_tok)
    up.load(fresh, target, tokenizer=fresh_tok)
    again = fresh_tok(["the protein kinase binds the enzyme", "a protein assay"], return_tensors="pt", padding=True)
    with torch.no_grad():
        loaded = fresh(**again, labels=labels)
    assert torch.equal(loaded.logits, trained.logits) and torch.equal(loaded.loss, trained.loss)

    up.detach(model, "tok")
    assert up.engine.registry(model) is None
    assert not any(isinstance(m, (InputRows, OutputRows)) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(plain).logits, base_logits)
        assert torch.equal(model(plain, labels=plain).loss, base_loss)


def test_masked_lm_loss_over_the_widened_vocabulary():
    """BERT's MLM decoder (tied, with a bias) on a vocabulary that ends at the tokenizer's last id:
    the masked LM loss (no shift) over V + n columns, new ids as targets."""
    tok = subword_tokenizer()
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    model = tf.BertForMaskedLM._from_config(cfg).eval()
    V = cfg.vocab_size
    up.attach(model, up.NewTokens(corpus=DOMAIN, count=10), name="tok", tokenizer=tok)
    ids = torch.tensor([tok("the protein kinase binds the enzyme", add_special_tokens=False)["input_ids"]])
    labels = torch.full_like(ids, -100)
    labels[0, 1:3] = ids[0, 1:3]  # protein, kinase: new ids
    assert labels.max() >= V
    out = model(input_ids=ids, labels=labels)
    n = len(up.deltas(model)["tok"].tokens)
    assert out.logits.shape[-1] == V + n and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits[0], labels[0], ignore_index=-100))
    out.loss.backward()
    table = up.engine.registry(model).deltas["tok"].module
    assert table.rows.grad.abs().sum() > 0 and table.bias.grad.abs().sum() > 0


def test_unipeft_train_causal_lm_with_new_ids_past_the_vocabulary(tmp_path):
    """``unipeft train`` on a causal LM task, on a GPT-2 whose vocabulary ends at its tokenizer's
    last id: the trainer's loss (the model's own, labels given) and the dev loss run over the widened
    logits."""
    from unipeft.training import run

    tok = tiny.tokenizer("gpt2")
    cfg = tiny.config("gpt2")
    cfg.vocab_size, cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = len(tok), 0, 4, 4
    torch.manual_seed(0)
    folder = tmp_path / "gpt2"
    tf.GPT2LMHeadModel._from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = [(f"the {a} was good", f"{b} {a} binds") for a, b in (("enzyme", "kinase"), ("protein", "assay"))] * 12
    data = {"train": tiny.write_csv(tmp_path / "train.csv", ["text", "target"], rows[:20]),
            "dev": tiny.write_csv(tmp_path / "dev.csv", ["text", "target"], rows[20:]), "kind": "causal_lm"}
    corpus = tmp_path / "domain.txt"
    corpus.write_text("\n".join(DOMAIN))
    res = run.train(str(folder), "gen", "new_tokens", out=tmp_path / "run", data=data, max_steps=4, batch_size=8,
                    lr=1e-2, max_new_tokens=8, method_options={"corpus": str(corpus), "count": 5}, progress=False,
                    precision="fp32", evaluate_test=False)
    assert res["trainable_params"] == 5 * 32 and math.isfinite(res["dev"]["loss"])
    model, tokenizer, _, _ = run.load_run(tmp_path / "run")
    enc = tokenizer(["kinase enzyme binds"], return_tensors="pt")
    assert enc["input_ids"].max() >= len(tok)
    with torch.no_grad():
        out = model(**enc, labels=enc["input_ids"])
    torch.testing.assert_close(out.loss, shifted_cross_entropy(out.logits, enc["input_ids"]))


def test_widened_loss_with_a_composition_and_with_a_loss_term():
    """The widened loss under a composition (NewTokens + LoRA in one delta), and under AdaMix's
    consistency term (another delta on the same loss position): the term adds to it in training."""
    tok = subword_tokenizer()
    model = gpt2_for(tok)
    up.attach(model, up.Compose([up.NewTokens(corpus=DOMAIN, count=5), up.LoRA(r=2, init="gaussian")]), name="c",
              tokenizer=tok)
    ids = tok(["the protein kinase binds"], return_tensors="pt")["input_ids"]
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, shifted_cross_entropy(out.logits, ids))

    tok = subword_tokenizer()
    model = gpt2_for(tok)
    up.attach(model, up.NewTokens(corpus=DOMAIN, count=5), name="tok", tokenizer=tok)
    up.attach(model, up.AdaMix(experts=2, bottleneck=4, consistency=1.0), name="mix")
    up.activate(model, ["tok", "mix"])
    site = up.engine.registry(model).loss_site
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.loss > shifted_cross_entropy(out.logits, ids)  # + the consistency term (a KL, >= 0)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, shifted_cross_entropy(out.logits, ids))
    with pytest.raises(IndexError):  # past GPT-2's 64 positions: a forward that raises keeps no labels
        model(input_ids=torch.zeros(1, 70, dtype=torch.long), labels=torch.zeros(1, 70, dtype=torch.long))
    assert site._taken == []

@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_only_the_new_rows_train_and_detach_restores_the_base(family):
    tok, model = tiny.tokenizer(family), tiny.make(family)
    before = base_state(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    x = tiny.batch(family)
    first = len(tok)  # the tiny models' vocabulary (96) is padded past the tokenizer's 73 tokens
    for k in ("input_ids", "decoder_input_ids"):
        if k in x:
            x[k] = torch.where(x[k] >= first, x[k] - 30, x[k])  # base tokens only
    with torch.no_grad():
        base = unchanged = tiny.logits(model, x)
    up.attach(model, up.NewTokens(corpus=DOMAIN, count=5), name="tok", tokenizer=tok)
    delta = up.engine.registry(model).deltas["tok"]
    assert isinstance(next(iter(delta.linear.values())), InputRows)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= {"unipeft_modules.tok.rows", "unipeft_modules.tok.out_rows", "unipeft_modules.tok.bias"}
    assert ("unipeft_modules.tok.out_rows" in trainable) == (family == "llama")  # the one untied LM head
    with torch.no_grad():  # rows of the base vocabulary are untouched: the batch (old ids) sees the base
        out = tiny.logits(model, x)
        assert out.shape == base.shape  # the new ids fill the padded vocabulary's unused columns
        if out.dim() == 3:  # an LM head tied to the embeddings: columns first .. first + 4 are the new tokens'
            out, base = torch.cat([out[..., :first], out[..., first + 5:]], -1), \
                torch.cat([base[..., :first], base[..., first + 5:]], -1)
        assert torch.equal(out, base)
    enc = tok(["the protein kinase binds the enzyme"], return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if family in ("t5", "bart"):
        batch["decoder_input_ids"] = enc["input_ids"][:, :4]
    rows = delta.module.rows
    start = rows.detach().clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        tiny.logits(model, batch).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(rows.detach(), start)
    for n, p in model.named_parameters():
        if "unipeft_" not in n:
            assert torch.equal(p, before[n]), n
    up.detach(model, "tok")
    assert {n: type(m) for n, m in model.named_modules()} == classes
    with torch.no_grad():
        assert torch.equal(tiny.logits(model, x), unchanged)


@pytest.mark.parametrize("family", ["gpt2", "bert", "bart"])
def test_save_holds_rows_and_tokens_and_load_extends_a_fresh_tokenizer(family, tmp_path):
    tok, model = tiny.tokenizer(family), tiny.make(family)
    up.attach(model, up.NewTokens(corpus=DOMAIN, count=5), name="tok", tokenizer=tok)
    with torch.no_grad():
        up.engine.registry(model).deltas["tok"].module.rows.normal_()
    enc = tok(["the protein kinase binds the enzyme"], return_tensors="pt")
    batch = dict(enc)
    batch.pop("token_type_ids", None)
    if family == "bart":
        batch["decoder_input_ids"] = enc["input_ids"][:, :4]
    with torch.no_grad():
        expected = tiny.logits(model, batch)
    target = up.save(model, tmp_path / "d", name="tok")
    meta = json.loads((target / "delta.json").read_text())
    opts = meta["method"]["options"]
    assert opts["corpus"] is None and tuple(opts["tokens"]) == up.deltas(model)["tok"].tokens
    assert set(meta["tensors"]) <= {"model:rows", "model:bias"}  # tied heads: no output rows of their own
    assert meta["tensors"]["model:rows"]["shape"] == [5, 32]  # n new rows, never the V x H matrix
    assert (target / "delta.safetensors").stat().st_size < 5 * 32 * 4 + 5 * 4 + 400
    fresh_tok, fresh = tiny.tokenizer(family), tiny.make(family)
    up.load(fresh, target, tokenizer=fresh_tok)
    assert fresh_tok.get_vocab() == tok.get_vocab()
    assert fresh_tok(["the protein kinase binds the enzyme"])["input_ids"] == enc["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(tiny.logits(fresh, batch), expected)
    # without a tokenizer the delta loads; up.extend_tokenizer gives any tokenizer the tokens later
    later, bare = tiny.tokenizer(family), tiny.make(family)
    up.load(bare, target)
    assert up.extend_tokenizer(later, target).get_vocab() == tok.get_vocab()
    other = tiny.tokenizer(family)
    assert up.extend_tokenizer(other, bare).get_vocab() == tok.get_vocab()
    up.extend_tokenizer(other, bare)  # already extended: a no-op


def test_two_deltas_new_tokens_and_a_task_lora_active_together(tmp_path):
    tok, model = tiny.tokenizer("bert"), tiny.make("bert")
    up.attach(model, up.NewTokens(corpus=DOMAIN, count=5), name="tok", tokenizer=tok)
    up.attach(model, up.LoRA(r=2, init="gaussian"), name="task")
    up.activate(model, ["tok", "task"])
    enc = tok(["the protein kinase binds", "a good movie"], return_tensors="pt", padding=True)
    params = [p for p in model.parameters() if p.requires_grad]
    names = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and "unipeft_modules" in n}
    assert names == {"tok"} and len(params) > 2  # the rows, the LoRA factors and the task head
    loss = torch.nn.functional.cross_entropy(model(**enc).logits, torch.tensor([1, 0]))
    loss.backward()
    rows = up.engine.registry(model).deltas["tok"].module.rows
    lora_b = [p for n, p in model.named_parameters() if "lora" in n.lower() or "unipeft_deltas.task" in n]
    assert rows.grad.abs().sum() > 0 and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    with torch.no_grad():
        both = model(**enc).logits
    up.save(model, tmp_path / "tok", name="tok")
    up.save(model, tmp_path / "task", name="task")
    fresh_tok, fresh = tiny.tokenizer("bert"), tiny.make("bert")
    up.load(fresh, tmp_path / "tok", tokenizer=fresh_tok)
    up.load(fresh, tmp_path / "task")
    up.activate(fresh, ["tok", "task"])
    with torch.no_grad():
        assert torch.equal(fresh(**fresh_tok(["the protein kinase binds", "a good movie"], return_tensors="pt",
                                             padding=True)).logits, both)


def test_route_names_new_tokens_in_a_clear_error():
    tok, model = tiny.tokenizer("gpt2"), tiny.make("gpt2")
    up.attach(model, up.NewTokens(corpus=DOMAIN, count=3), name="tok", tokenizer=tok)
    with pytest.raises(up.UnipeftError, match=r"delta 'tok' \(new_tokens\) adds tokens to the vocabulary"):
        with up.route(model, ["tok", None]):
            pass


def test_unipeft_train_with_new_tokens_and_predict_with_the_extended_tokenizer(tmp_path):
    from unipeft.training import run

    folder = tiny.save(tmp_path / "bert", "bert", "cls")
    rows = [(t.replace("good", "good enzyme").replace("bad", "bad kinase"), ["neg", "pos"][y])
            for t, y in tiny.sentiment_rows(60)]
    data = {"train": tiny.write_csv(tmp_path / "train.csv", ["text", "label"], rows[:50]),
            "dev": tiny.write_csv(tmp_path / "dev.csv", ["text", "label"], rows[50:])}
    corpus = tmp_path / "domain.txt"
    corpus.write_text("\n".join(DOMAIN))
    res = run.train(folder, "sent", "new_tokens", out=tmp_path / "run", data=data, max_steps=3, batch_size=8,
                    method_options={"corpus": str(corpus), "count": 5, "train_head": True}, progress=False,
                    precision="fp32", evaluate_test=False)
    assert res["trainable_params"] == 5 * 32 + (32 * 2 + 2)
    saved = json.loads((tmp_path / "run" / "delta" / "delta.json").read_text())["method"]["options"]
    assert saved["corpus"] is None and len(saved["tokens"]) == 5
    model, tokenizer, _, _ = run.load_run(tmp_path / "run")
    assert len(tokenizer) == saved["first_id"] + 5  # unipeft eval / predict encode with the new tokens
    assert len(run.predict(tmp_path / "run", ["a good enzyme movie", "a bad kinase film"])) == 2


def test_compare_measures_new_tokens_the_base_reading_its_own_ids(tmp_path):
    """compare times the bare base on the same batches: ids of added tokens lie past its embedding
    (an IndexError in the base latency run before) and are read as its last id there."""
    from unipeft.comparison import compare

    folder = tiny.save(tmp_path / "bert", "bert", "cls")
    cfg = tf.AutoConfig.from_pretrained(folder)
    cfg.vocab_size = len(tf.AutoTokenizer.from_pretrained(folder))  # unpadded: the added ids lie past the rows
    torch.manual_seed(0)
    tf.BertForSequenceClassification._from_config(cfg).save_pretrained(folder)
    rows = [(t + " the enzyme kinase", ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(40)]
    data = {"train": tiny.write_csv(tmp_path / "train.csv", ["text", "label"], rows[:30]),
            "dev": tiny.write_csv(tmp_path / "dev.csv", ["text", "label"], rows[30:])}
    corpus = tmp_path / "domain.txt"
    corpus.write_text("\n".join(DOMAIN))
    report = compare(str(folder), "sent", ["new_tokens"], out=tmp_path / "cmp", data=data, in_process=True,
                     quiet=True, method_options={"new_tokens": {"corpus": str(corpus), "count": 5}},
                     max_steps=2, batch_size=8, precision="fp32")
    (row,) = report["methods"]
    assert not row.get("error") and row["trainable_params"] == 5 * 32 + (32 * 2 + 2)
    assert row["latency_ms"]["base"] > 0 and row["latency_ms"]["unmerged"] > 0


@pytest.mark.parametrize("corpus,match", [
    ([], "the corpus is empty"),
    (["", "   "], "the corpus is empty"),
    ("/nonexistent/domain.txt", "is not a file"),
    (42, "corpus must be a text file path or a list of strings"),
])
def test_bad_corpus_one_line_error(corpus, match):
    with pytest.raises(up.UnipeftError, match=match) as e:
        up.NewTokens(corpus=corpus)
    assert "\n" not in str(e.value)


def test_empty_corpus_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(up.UnipeftError, match="the corpus is empty"):
        up.NewTokens(corpus=str(tmp_path / "empty.txt"))


@pytest.mark.parametrize("kwargs,match", [
    ({"corpus": DOMAIN, "count": 0}, "count must be an integer >= 1"),
    ({"tokens": ["a", "a"], "first_id": 5}, "tokens must be a list of distinct non-empty strings"),
    ({"tokens": ["alpha"]}, "first_id must be an integer >= 0"),
    ({"corpus": DOMAIN, "first_id": 3}, "first_id comes with tokens"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(up.UnipeftError, match=match):
        up.NewTokens(**kwargs)


def test_attach_errors_leave_model_and_tokenizer_unchanged():
    tok, model = tiny.tokenizer("gpt2"), tiny.make("gpt2")
    vocab = tok.get_vocab()
    before = base_state(model)
    with pytest.raises(up.UnipeftError, match=r"give corpus= \(a text file"):
        up.attach(model, up.NewTokens(), name="tok", tokenizer=tok)
    with pytest.raises(up.UnipeftError, match="needs the tokenizer they extend"):
        up.attach(model, up.NewTokens(corpus=DOMAIN), name="tok")
    with pytest.raises(up.UnipeftError, match="no word .* that the tokenizer lacks"):
        up.attach(model, up.NewTokens(corpus=["the movie was good"] * 3), name="tok", tokenizer=tok)
    with pytest.raises(up.UnipeftError, match="past the 96 rows of the model's embeddings"):
        up.attach(model, up.NewTokens(tokens=["alpha"], first_id=200), name="tok", tokenizer=tok)
    assert up.engine.registry(model) is None and tok.get_vocab() == vocab
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert not any(isinstance(m, (InputRows, OutputRows)) for m in model.modules())


def test_load_with_the_already_extended_tokenizer_and_with_intrinsic_on_the_same_tables(tmp_path):
    """The training's own (extended) tokenizer loads the delta again; an Intrinsic delta on the same
    embedding and tied LM head leaves the new ids and their logits to NewTokens, in either order."""
    tok = subword_tokenizer()
    model = gpt2_for(tok)
    V = model.config.vocab_size
    up.attach(model, up.NewTokens(corpus=DOMAIN, count=5), name="tok", tokenizer=tok)
    up.save(model, tmp_path / "tok", name="tok")
    again = gpt2_for(tok, V)
    up.load(again, tmp_path / "tok", tokenizer=tok)  # tok already holds the tokens: a no-op for it
    up.attach(again, up.Intrinsic(d=32), name="sub")
    with torch.no_grad():
        up.engine.registry(again).deltas["sub"].module.theta.normal_()
    new = tok(["the protein kinase binds"], return_tensors="pt")["input_ids"]
    old = tok(["the movie was good"], return_tensors="pt")["input_ids"]
    assert new.max() >= V and old.max() < V
    with torch.no_grad():
        up.activate(again, ["sub"])
        sub_alone = again(input_ids=old).logits
        for order in (["tok", "sub"], ["sub", "tok"]):
            up.activate(again, order)
            out = again(input_ids=new).logits
            assert out.shape[-1] == V + 5 and torch.isfinite(out).all()
            torch.testing.assert_close(again(input_ids=old).logits[..., :V], sub_alone)


def test_new_tokens_make_words_the_tokenizer_cannot_see_learnable(tmp_path):
    """The tiny tokenizer reads every domain word as [UNK]: the label (enzyme, protein: pos; kinase,
    assay: neg) is invisible to the base, so even LoRA on every linear map stays at chance; the new
    tokens' rows (all starting at [UNK]'s) separate and the task is learnt."""
    import random

    from unipeft.training import run

    folder = tiny.save(tmp_path / "bert", "bert", "cls", dropout=False)
    rng = random.Random(0)
    fill = "the a movie film was is it very and plot acting story".split()
    rows = []
    for i in range(160):
        words = [rng.choice(fill) for _ in range(rng.randint(2, 6))]
        words.insert(rng.randint(0, len(words)), rng.choice(("enzyme", "protein") if i % 2 else ("kinase", "assay")))
        rows.append((" ".join(words), ["neg", "pos"][i % 2]))
    data = {"train": tiny.write_csv(tmp_path / "train.csv", ["text", "label"], rows[:120]),
            "dev": tiny.write_csv(tmp_path / "dev.csv", ["text", "label"], rows[120:])}
    (tmp_path / "domain.txt").write_text("\n".join(t for t, _ in rows[:120]))
    common = dict(data=data, max_steps=150, batch_size=16, progress=False, evaluate_test=False, precision="fp32")
    tokens = run.train(folder, "sent", "new_tokens", lr=0.1, **common,
                       method_options={"corpus": str(tmp_path / "domain.txt"), "count": 10})
    lora = run.train(folder, "sent", "lora", lr=1e-2, **common, method_options={"r": 4})
    assert tokens["trainable_params"] == 4 * 32 + 66  # enzyme, protein, kinase, assay + the head
    assert tokens["dev"]["accuracy"] >= 0.9 and lora["dev"]["accuracy"] <= 0.6


def test_in_one_composition_with_lora_saved_loaded_and_refused_by_route(tmp_path):
    tok, model = tiny.tokenizer("gpt2"), tiny.make("gpt2")
    up.attach(model, up.Compose([up.NewTokens(corpus=DOMAIN, count=5), up.LoRA(r=2, init="gaussian")]), name="c",
              tokenizer=tok)
    part = up.deltas(model)["c"].methods[0]
    assert part.corpus is None and set(part.tokens) == set(NEW)
    ids = tok(["the protein kinase binds"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    up.save(model, tmp_path / "c", name="c")
    fresh_tok, fresh = tiny.tokenizer("gpt2"), tiny.make("gpt2")
    up.load(fresh, tmp_path / "c", tokenizer=fresh_tok)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=fresh_tok(["the protein kinase binds"], return_tensors="pt")["input_ids"]
                                 ).logits, expected)
    with pytest.raises(up.UnipeftError, match=r"delta 'c' \(compose, whose part new_tokens\) adds tokens"):
        with up.route(fresh, ["c"]):
            pass
