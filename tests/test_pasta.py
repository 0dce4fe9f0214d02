"""PASTA and its position, the hidden states at chosen tokens: h_t + v_l at the input of every layer."""
import json

import pytest
import torch

import tiny
import unipeft as up


def delta_record(model, name="t"):
    return up.engine.registry(model).deltas[name]


def block_inputs(model, x, stack):
    """The hidden states entering each block of ``stack`` (a ModuleList)."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).detach()),
                                         with_kwargs=True) for b in stack]
    with torch.no_grad():
        tiny.logits(model, x)
    for h in hooks:
        h.remove()
    return seen


def stack_of(model, family):
    return {"bert": lambda: model.bert.encoder.layer, "gpt2": lambda: model.transformer.h,
            "t5": lambda: model.encoder.block, "llama": lambda: model.model.layers}[family]()


def assert_layer0_vectors(got, base, ids, table):
    """The first block's input changed by exactly v_0 at tokens 13 and 5 (PASTA(tokens=[13, 5])), nowhere else."""
    expected = torch.zeros_like(base[0])
    expected[ids == 13] = table[0, 0]
    expected[ids == 5] = table[0, 1]
    torch.testing.assert_close(got[0] - base[0], expected)


def pair_batch():
    """Row 0: [CLS] a b [SEP] c [SEP]  (a pair); row 1: [CLS] a [SEP] then padding."""
    ids = torch.tensor([[2, 10, 11, 3, 12, 3], [2, 13, 3, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5", "llama"])
def test_each_layer_gets_its_vector_at_the_chosen_tokens_only(family):
    model, x = tiny.make(family), tiny.batch(family)
    stack = stack_of(model, family)
    base = block_inputs(model, x, stack)
    up.attach(model, up.PASTA(tokens=[13, 5]), name="t")
    table = delta_record(model).module.table
    with torch.no_grad():
        table.normal_()
    got = block_inputs(model, x, stack)
    assert_layer0_vectors(got, base, x["input_ids"], table)     # layer 0: exactly v_0 at the two tokens
    assert table.shape == (len(stack), 2, 32)                  # L x K x d parameters
    # a later layer's input is its own v_l plus what the layers below made of the change
    assert not torch.allclose(got[1], base[1])


def test_default_tokens_come_from_the_tokenizer_and_are_saved_as_ids(tmp_path):
    tok = tiny.tokenizer("bert")
    model, x = tiny.make("bert"), pair_batch()
    up.attach(model, up.PASTA(), name="t", tokenizer=tok)
    expected = list(dict.fromkeys(tok.convert_tokens_to_ids(t) for t in (tok.cls_token, tok.sep_token, tok.eos_token)))
    assert list(up.deltas(model)["t"].tokens) == expected == [2, 3, 4]
    with torch.no_grad():
        delta_record(model).module.table.normal_()
    out = tiny.logits(model, x)
    up.save(model, tmp_path / "d", name="t")
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert meta["method"]["options"]["tokens"] == [2, 3, 4]
    assert meta["parameters"] == 2 * 3 * 32 + 32 * 3 + 3  # L x K x d, and the classifier head
    fresh = tiny.make("bert")
    up.load(fresh, tmp_path / "d")  # no tokenizer needed
    assert torch.equal(tiny.logits(fresh, x), out)


def test_token_strings_resolve_through_the_tokenizer():
    tok = tiny.tokenizer("bert")
    model = tiny.make("bert")
    up.attach(model, up.PASTA(tokens=["[SEP]", "[CLS]"]), name="t", tokenizer=tok)
    assert up.deltas(model)["t"].tokens == (3, 2)


def test_a_mixed_batch_gives_each_row_its_own_positions():
    """A pair and a single sentence in one batch: each row equals the row alone (the reference
    code counts special tokens from the batch's first example, which breaks this)."""
    model, x = tiny.make("bert"), pair_batch()
    up.attach(model, up.PASTA(tokens=[2, 3], occurrences=2), name="t")
    with torch.no_grad():
        delta_record(model).module.table.normal_()
        together = tiny.logits(model, x)
        alone = torch.cat([tiny.logits(model, {k: v[i:i + 1] for k, v in x.items()}) for i in range(2)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_occurrences_give_the_second_sep_of_a_pair_its_own_vector():
    model = tiny.make("bert")
    up.attach(model, up.PASTA(tokens=[2, 3], occurrences=2), name="t")
    vectors = delta_record(model).module
    rows, cols, which = vectors.hits(pair_batch()["input_ids"])
    got = sorted(zip(rows.tolist(), cols.tolist(), which.tolist()))
    # [CLS] -> 0, first [SEP] -> 2, second [SEP] -> 3 (token 1's second occurrence)
    assert got == [(0, 0, 0), (0, 3, 2), (0, 5, 3), (1, 0, 0), (1, 2, 2)]
    assert vectors.table.shape[1] == 4


def test_with_a_soft_prompt_in_front_the_columns_shift_by_its_length():
    model, x = tiny.make("bert"), pair_batch()
    stack = model.bert.encoder.layer
    up.attach(model, up.PromptTuning(length=3, init="random"), name="p")
    up.attach(model, up.PASTA(tokens=[3], train_head=False), name="t")
    with torch.no_grad():
        delta_record(model).module.table.normal_()
    up.activate(model, ["p"])
    before = block_inputs(model, x, stack)[0]
    up.activate(model, ["p", "t"])
    after = block_inputs(model, x, stack)[0]
    changed = (after - before).abs().sum(-1) > 0
    expected = torch.zeros_like(changed)
    expected[:, 3:] = x["input_ids"] == 3
    assert torch.equal(changed, expected)


def test_inputs_embeds_are_refused_with_a_clear_error():
    model, x = tiny.make("bert"), pair_batch()
    up.attach(model, up.PASTA(tokens=[3]), name="t")
    embeds = model.get_input_embeddings()(x["input_ids"]).detach()
    tiny.logits(model, x)  # the ids of this earlier call must not be reused for the next
    with pytest.raises(up.UnipeftError, match="needs the token ids: call the model with input_ids"):
        model(inputs_embeds=embeds, attention_mask=x["attention_mask"])


@pytest.mark.parametrize("make,message", [
    (lambda: up.PASTA(tokens=[]), r"tokens must be a non-empty list of token strings or ids"),
    (lambda: up.PASTA(tokens=[3, 3]), r"tokens repeat in \[3, 3\]"),
    (lambda: up.PASTA(tokens=[-1]), r"tokens must be a non-empty list"),
    (lambda: up.PASTA(occurrences=0), r"occurrences must be an integer >= 1"),
    (lambda: up.PASTA(vectors=2), r"unknown option 'vectors'; valid options: 'tokens', 'occurrences'"),
])
def test_bad_options_are_one_line_errors(make, message):
    with pytest.raises(up.UnipeftError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("tokens,tokenizer,message", [
    (None, False, r"the default \(the tokenizer's special tokens\) need a tokenizer"),
    (["[CLS]"], False, r"token strings need a tokenizer"),
    (["[NOPE]"], True, r"'\[NOPE\]' is not a token of this tokenizer; its special tokens: "),
    ([500], False, r"token id 500 is outside the model's vocabulary of 96"),
])
def test_attach_errors_leave_the_model_unchanged(tokens, tokenizer, message):
    model = tiny.make("bert")
    with pytest.raises(up.UnipeftError, match=message):
        up.attach(model, up.PASTA(tokens=tokens), name="t", tokenizer=tiny.tokenizer("bert") if tokenizer else None)
    assert up.engine.registry(model) is None
    assert not model.bert.embeddings.word_embeddings._forward_hooks



@pytest.mark.parametrize("family", ["t5", "bart", "llama"])
def test_resizing_the_embeddings_after_attach_keeps_the_delta_working(family):
    """resize_token_embeddings (adding a chat template's tokens) gives T5's and BART's encoders a new
    embedding module: the PASTA site follows it (it refused every call before 2026-12-03, the ids being
    read at the old module), its vectors land exactly where they did, and a soft prompt in front embeds
    the new tokens with the new table."""
    model, x = tiny.make(family), tiny.batch(family)
    stack = {"t5": lambda: model.encoder.block, "bart": lambda: model.model.encoder.layers,
             "llama": lambda: model.model.layers}[family]()
    up.attach(model, up.PASTA(tokens=[13, 5]), name="t")
    n = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(n + 8)
    x = {k: v.clone() for k, v in x.items()}
    x["input_ids"][0, 1] = n + 3                                   # a new token in the batch
    table = delta_record(model).module.table
    with torch.no_grad():
        table.zero_()
        base = block_inputs(model, x, stack)
        table.normal_()
    assert_layer0_vectors(block_inputs(model, x, stack), base, x["input_ids"], table)
    # a soft prompt in front reads the new token's row of the resized table
    up.attach(model, up.PromptTuning(length=2), name="p")
    up.activate(model, "p")
    before = tiny.logits(model, x).detach()
    with torch.no_grad():
        model.get_input_embeddings().weight[n + 3] += 1.0
    assert not torch.allclose(tiny.logits(model, x), before)
