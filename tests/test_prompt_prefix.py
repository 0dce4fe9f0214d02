"""Prompt and prefix tuning against independent references, in training and in generation.

References are written from the notes' formulas with plain transformers calls:
prompt tuning == the model run on concat(P, E(x)) with the mask extended;
prefix tuning initialised from the activations of words t == (for a causal
decoder) the model run on concat(t, x); generation with the KV cache == a
greedy loop that re-runs the whole sequence without a cache.
"""
import pytest
import torch
from transformers import DynamicCache, StaticCache

import tiny
import unipeft as up
from unipeft.prompting.scoring import cache_argument


class FakeTokenizer:
    """Maps characters to ids; enough for init_text / label_words."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + (ord(c) % (tiny.VOCAB - 3)) for c in text.strip()]}


def prompt_of(model, name="t"):
    return up.engine.registry(model).deltas[name].module.weight


@pytest.mark.parametrize("family,head", [("gpt2", "lm"), ("llama", "lm"), ("bert", "cls"), ("roberta", "cls"),
                                         ("t5", "seq2seq"), ("bart", "seq2seq"), ("bert", "mlm")])
def test_prompt_tuning_equals_concatenated_embeddings(family, head):
    """P is prepended to E(x) with the mask extended; for a decoder-only or encoder-only
    model the p prompt positions are then dropped from the output, so heads read the
    user's tokens (the encoder of an encoder-decoder model keeps them for cross-attention)."""
    model, x = tiny.make(family, head), tiny.batch(family, head)
    up.attach(model, up.PromptTuning(length=5, init="random"), name="t")
    with torch.no_grad():
        got = model(**x).logits
        hidden = model.base_model(**{k: v for k, v in x.items() if k != "decoder_input_ids"}) \
            if head != "seq2seq" else None
        P = prompt_of(model)
        up.activate(model, [])
        emb = up.engine.input_stacks(model)[0][2](x["input_ids"])
        b = emb.shape[0]
        ref_in = {k: v for k, v in x.items() if k != "input_ids"}
        ref_in["inputs_embeds"] = torch.cat([P.unsqueeze(0).expand(b, -1, -1), emb], dim=1)
        ref_in["attention_mask"] = torch.cat([torch.ones(b, 5, dtype=torch.long), x["attention_mask"]], dim=1)
        if head == "seq2seq":
            ref = model(**ref_in).logits
        else:
            ref_hidden = model.base_model(**ref_in).last_hidden_state[:, 5:]
            torch.testing.assert_close(hidden.last_hidden_state, ref_hidden, rtol=1e-5, atol=1e-5)
            if head in ("lm", "mlm"):
                ref = model(**ref_in).logits[:, 5:]
            elif family == "bert":
                ref = model.classifier(model.bert.pooler(ref_hidden))
            else:
                ref = model.classifier(ref_hidden)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompt_tuning_classification_uses_the_last_real_token(family):
    model, x = tiny.make(family, "cls"), tiny.batch(family, "cls")
    up.attach(model, up.PromptTuning(length=5, init="random"), name="t")
    with torch.no_grad():
        got = model(**x).logits
        lm_hidden = model.base_model(**x).last_hidden_state  # prompt positions stripped
        last = x["attention_mask"].sum(1) - 1
        ref = model.score(lm_hidden[torch.arange(2), last])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def _next(model, logits):
    """Greedy choice with EOS suppressed, as generate(min_new_tokens=...) does."""
    logits = logits[:, -1:].clone()
    eos = model.generation_config.eos_token_id
    if isinstance(eos, int) and eos < logits.shape[-1]:
        logits[..., eos] = -float("inf")
    return logits.argmax(-1)


def greedy_without_cache(model, ids, steps, **kw):
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False, **kw).logits
        ids = torch.cat([ids, _next(model, logits)], dim=1)
    return ids


def greedy_seq2seq_without_cache(model, ids, steps):
    dec = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, decoder_input_ids=dec, use_cache=False).logits
        dec = torch.cat([dec, _next(model, logits)], dim=1)
    return dec


METHODS = {
    "prompt": lambda: up.PromptTuning(length=4, init="random"),
    "prefix": lambda: up.PrefixTuning(length=3, reparam_hidden=16),
}


def _scramble(model, name="t"):
    """Move the delta away from its init so generation actually depends on it."""
    with torch.no_grad():
        for p in up.engine.registry(model).deltas[name].parameters():
            p.add_(torch.randn_like(p) * 0.5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_matches_full_recomputation(family, method):
    model = tiny.make(family)
    ids = tiny.batch(family)["input_ids"][:1, :5]
    up.attach(model, METHODS[method](), name="t")
    _scramble(model)
    ref = greedy_without_cache(model, ids, 6)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(out, ref)
    # the delta really steered generation: its scores differ from the base's (tokens alone can
    # coincide when a tiny random model repeats one token whatever comes before)
    kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6, output_scores=True, return_dict_in_generate=True)
    steered = torch.stack(model.generate(ids, **kw).scores)
    up.activate(model, [])
    plain = torch.stack(model.generate(ids, **kw).scores)
    finite = torch.isfinite(steered) & torch.isfinite(plain)  # min_new_tokens sets EOS to -inf in both
    assert (steered - plain)[finite].abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_generate_matches_full_recomputation(family, method):
    model = tiny.make(family)
    ids = tiny.batch(family)["input_ids"][:1, :5]
    up.attach(model, METHODS[method](), name="t")
    _scramble(model)
    ref = greedy_seq2seq_without_cache(model, ids, 6)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(out[:, : ref.shape[1]], ref)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_with_left_padding_and_beams(family):
    model = tiny.make(family)
    ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    up.attach(model, up.PrefixTuning(length=3, reparam_hidden=0), name="t")
    _scramble(model)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    # the unpadded row alone gives the same continuation
    alone = model.generate(ids[1:], attention_mask=mask[1:], max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert torch.equal(out[1:], alone)
    alone0 = model.generate(ids[:1, 2:], max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert torch.equal(out[:1, 2:], alone0)
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False)
    assert beams.shape[0] == 2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prefix_is_independent_of_the_cache_class(family):
    """The prefix never enters the cache: every cache class gives the same tokens."""
    model = tiny.make(family)
    ids = tiny.batch(family)["input_ids"][:1, :5]
    up.attach(model, up.PrefixTuning(length=3, reparam_hidden=16), name="t")
    _scramble(model)
    ref = greedy_without_cache(model, ids, 5)
    dyn = DynamicCache(config=model.config)
    keyword = cache_argument(model)  # past_key_values, or cache from transformers 5.24 on
    out_dyn = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5, **{keyword: dyn})
    assert dyn.get_seq_length() == ids.shape[1] + 5 - 1  # real tokens only
    static = StaticCache(config=model.config, max_cache_len=32)
    out_static = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5, **{keyword: static})
    out_none = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5, use_cache=False)
    for out in (out_dyn, out_static, out_none):
        assert torch.equal(out, ref)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prefix_from_word_activations_equals_prepending_the_words(family):
    """Li & Liang's init: P = the frozen model's keys/values of real words t. For a
    causal decoder that is exactly running the model on concat(t, x)."""
    model = tiny.make(family)
    text = "table"
    t_ids = torch.tensor([FakeTokenizer()(text)["input_ids"]])
    p = t_ids.shape[1]
    x = tiny.batch(family)["input_ids"][:, :6]
    with torch.no_grad():
        ref = model(input_ids=torch.cat([t_ids.expand(2, -1), x], dim=1)).logits[:, p:]
    up.attach(model, up.PrefixTuning(length=p, reparam_hidden=0, init="text", init_text=text),
              name="t", tokenizer=FakeTokenizer())
    with torch.no_grad():
        got = model(input_ids=x, position_ids=torch.arange(p, p + 6).expand(2, -1)).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # with the reparameterisation, P starts at the same activations
    model2 = tiny.make(family)
    up.attach(model2, up.PrefixTuning(length=p, reparam_hidden=8, init="text", init_text=text),
              name="t", tokenizer=FakeTokenizer())
    with torch.no_grad():
        got2 = model2(input_ids=x, position_ids=torch.arange(p, p + 6).expand(2, -1)).logits
    torch.testing.assert_close(got2, ref, rtol=1e-4, atol=1e-5)


def test_prefix_grouped_query_attention_shapes():
    model = tiny.make("llama")  # 4 query heads, 2 key/value heads
    up.attach(model, up.PrefixTuning(length=3, reparam_hidden=0), name="t")
    prefix = up.engine.registry(model).deltas["t"].module
    assert prefix.kv_heads == 2 and prefix.head_dim == 8
    assert prefix.prefix.shape == (3, 2 * 2 * 2 * 8)  # p x (layers * (k, v) * kv_heads * head_dim)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "t5", "bart"])
def test_prefix_same_under_eager_and_sdpa(family, attn):
    torch.manual_seed(3)
    model = tiny.make(family, attn=attn)
    x = tiny.batch(family)
    up.attach(model, up.PrefixTuning(length=3, reparam_hidden=0), name="t")
    _scramble(model)
    state = {k: v.clone() for k, v in up.storage.delta_tensors(model, up.engine.registry(model).deltas["t"]).items()}
    other = tiny.make(family, attn="sdpa" if attn == "eager" else "eager")
    up.attach(other, up.PrefixTuning(length=3, reparam_hidden=0), name="t")
    up.storage._load_tensors(other, up.engine.registry(other).deltas["t"], state)
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, other(**x).logits, rtol=1e-4, atol=1e-5)


def test_prompt_init_from_text_and_labels():
    model = tiny.make("bert", "cls")
    tok = FakeTokenizer()
    up.attach(model, up.PromptTuning(length=4, init="text", init_text="ab"), name="t", tokenizer=tok)
    emb = model.get_input_embeddings().weight
    ids = tok("ab")["input_ids"]
    assert torch.equal(prompt_of(model)[0], emb[ids[0]]) and torch.equal(prompt_of(model)[2], emb[ids[0]])
    up.attach(model, up.PromptTuning(length=4, init="labels", label_words=["x", "y"]), name="l", tokenizer=tok)
    P = prompt_of(model, "l")
    assert torch.equal(P[0], emb[tok("x")["input_ids"][0]]) and torch.equal(P[1], emb[tok("y")["input_ids"][0]])
    with pytest.raises(up.UnipeftError, match="needs a tokenizer"):
        up.attach(model, up.PromptTuning(length=4, init="text", init_text="ab"), name="n")
    assert "n" not in up.deltas(model)


def test_prompt_vocab_init_samples_real_embeddings():
    model = tiny.make("gpt2")
    up.attach(model, up.PromptTuning(length=6, init="vocab"), name="t")
    emb = model.get_input_embeddings().weight
    for row in prompt_of(model):
        assert (emb == row).all(dim=1).any()


def test_prompt_tuning_trains_with_labels_on_causal_lm():
    model = tiny.make("llama")
    x = tiny.batch("llama")
    up.attach(model, up.PromptTuning(length=4), name="t")
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    out = model(**x, labels=labels)
    assert out.logits.shape[1] == x["input_ids"].shape[1]
    out.loss.backward()
    assert prompt_of(model).grad is not None and prompt_of(model).grad.abs().sum() > 0


def test_prompt_tuning_on_a_bare_backbone_called_positionally():
    """A backbone used directly (no head), with input_ids and the mask given positionally."""
    model = tiny.make("bert", "cls").bert
    x = tiny.batch("bert", "cls")
    up.attach(model, up.PromptTuning(length=3, init="random"), name="t")
    with torch.no_grad():
        a = model(x["input_ids"], x["attention_mask"]).last_hidden_state
        b = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state
    assert a.shape == (2, 7, 32)
    assert torch.equal(a, b)


def test_prompt_site_finds_the_cache_by_type_whatever_its_keyword():
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; the next release may rename it again.
    The prompt site must see a generation step by the argument's type (or the mask's shape), not its name."""
    from transformers import DynamicCache

    from unipeft.positions.inputs import _tokens_in_cache

    model = tiny.make("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True, **{cache_argument(model): cache})
    mask = torch.ones(1, 4, dtype=torch.long)
    for keyword in ("past_key_values", "cache", "some_future_name"):
        assert _tokens_in_cache({keyword: cache, "attention_mask": mask}, mask, q_len=1, p=0) == 3
    # no Cache visible: a mask longer than the new tokens still says 3 + p positions are cached
    assert _tokens_in_cache({"attention_mask": mask}, mask, q_len=1, p=2) == 5
    assert _tokens_in_cache({"attention_mask": mask[:, :1]}, mask[:, :1], q_len=1, p=2) == 0  # a fresh pass
