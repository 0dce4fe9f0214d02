"""The architecture table, discovery for unknown models, and target resolution."""
import pytest
import torch
import transformers as tf

import tiny
import unipeft as up
from unipeft.architectures import TABLE, map_model


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_table_maps_every_family(family):
    model = tiny.make(family)
    m = map_model(model)
    assert not m.discovered
    stacks = {b.stack for b in m.blocks}
    assert len(m.blocks) == 2 * len(stacks)
    for role in ("q", "k", "v", "o", "ffn_in", "ffn_out"):
        assert m.modules_with_role(role), role
    kinds = [k for _, _, k in m.attention]
    assert kinds.count("self") == len(m.blocks)
    if family in ("t5", "bart"):
        assert kinds.count("cross") == 2  # one per decoder block


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_discovery_agrees_with_the_table(family, monkeypatch):
    """Without its table entry a family is still found: the same blocks and attention modules."""
    model = tiny.make(family)
    known = map_model(model)
    monkeypatch.delitem(TABLE, model.config.model_type)
    found = map_model(model)
    assert found.discovered
    assert [b.path for b in found.blocks] == [b.path for b in known.blocks]
    assert sorted(p for p, _, _ in found.attention) == sorted(p for p, _, _ in known.attention)
    for role in ("q", "v"):
        assert set(found.modules_with_role(role)) == set(known.modules_with_role(role))


def test_unknown_model_type_gets_lora_and_prefix():
    cfg = tf.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                       word_embed_proj_dim=32, max_position_embeddings=32)
    torch.manual_seed(0)
    model = tf.OPTForCausalLM(cfg).eval()
    assert cfg.model_type not in TABLE
    x = torch.randint(0, 64, (2, 6))
    base = model(x).logits.detach()
    up.attach(model, up.LoRA(r=2, targets=("q", "v")), name="l")  # roles q, v found by discovery
    assert sum(1 for n, _ in model.named_parameters() if "lora_A" in n) == 4
    assert torch.equal(model(x).logits, base)
    up.attach(model, up.PrefixTuning(length=2, reparam_hidden=0), name="p")
    assert not torch.allclose(model(x).logits, base)
    up.detach(model, "p")
    up.detach(model, "l")
    assert torch.equal(model(x).logits, base)


def test_prefix_on_a_model_outside_the_attention_interface_is_refused_cleanly():
    cfg = tf.GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                          attention_types=[[["global"], 2]], max_position_embeddings=32)
    model = tf.GPTNeoForCausalLM(cfg).eval()
    impl = model.config._attn_implementation
    with pytest.raises(up.UnipeftError, match="does not use transformers' attention interface"):
        up.attach(model, up.PrefixTuning(length=2), name="p")
    assert model.config._attn_implementation == impl and not up.deltas(model)
    up.attach(model, up.LoRA(r=2), name="l")  # other methods still work there


def lora_paths(model):
    return sorted(n.rsplit(".unipeft_deltas", 1)[0] for n, _ in model.named_parameters() if n.endswith("lora_A"))


@pytest.mark.parametrize("family,targets,expected", [
    ("bert", ["query", "value"], ["attention.self.query", "attention.self.value"]),
    ("bert", "attention", ["attention.output.dense", "attention.self.key", "attention.self.query",
                           "attention.self.value"]),
    ("bert", "ffn", ["intermediate.dense", "output.dense"]),
    ("llama", ["query", "value"], ["self_attn.q_proj", "self_attn.v_proj"]),  # role aliases
    ("llama", ["q_proj"], ["self_attn.q_proj"]),  # suffix
    ("llama", r".*layers\.1\.mlp\.(up|down)_proj", None),  # regex over the full path
    ("llama", "all-linear", ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                             "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]),
    ("gpt2", ["q", "v"], ["attn.c_attn"]),  # fused projection
    ("t5", ["q", "v"], ["layer.0.SelfAttention.q", "layer.0.SelfAttention.v", "layer.1.EncDecAttention.q",
                  "layer.1.EncDecAttention.v"]),
])
def test_target_resolution(family, targets, expected):
    """(LoRA's default, targets=None, is all-linear: the llama all-linear case.)"""
    model = tiny.make(family)
    up.attach(model, up.LoRA(r=2, targets=targets, train_head=False), name="t")
    paths = lora_paths(model)
    if expected is None:
        assert paths == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
        return
    m = map_model(model)
    rel = sorted({p[len(m.block_of(p).path) + 1:] for p in paths})
    assert rel == sorted(expected)
    # every block got them
    assert len(paths) == len(expected) * len(m.blocks) or family == "t5"


def test_heads_are_found_and_trained_per_delta():
    model = tiny.make("roberta", "cls")  # head: classifier.dense + classifier.out_proj
    assert up.engine.head_modules(model) == ["classifier"]
    up.attach(model, up.LoRA(r=2), name="a")
    heads = up.engine.registry(model).deltas["a"].head
    assert heads == ["classifier.dense", "classifier.out_proj"]
    for name in ("gpt2", "llama"):
        assert up.engine.head_modules(tiny.make(name, "lm")) == []  # the LM head is pretrained (tied)
    assert up.engine.head_modules(tiny.make("bert", "mlm")) == []
    assert up.engine.head_modules(tiny.make("t5")) == []
    m = tiny.make("bert", "cls")
    up.attach(m, up.LoRA(r=2, train_head=False), name="x")
    assert not any(p.requires_grad for n, p in m.named_parameters() if n.startswith("classifier"))


def test_ia3_on_fused_gpt2_projection_scales_only_keys_and_values():
    model = tiny.make("gpt2")
    up.attach(model, up.IA3(), name="t")
    d = up.engine.registry(model).deltas["t"]
    c_attn = d.linear["transformer.h.0.attn.c_attn"]
    assert c_attn.ia3_l.numel() == 64  # k and v slices of the 96-wide output
    with torch.no_grad():
        c_attn.ia3_l.fill_(2.0)
    s = c_attn.scale()
    assert torch.equal(s[:32], torch.ones(32)) and torch.equal(s[32:], torch.full((64,), 2.0))


def selected(model, name="t"):
    return sorted(up.engine.registry(model).deltas[name].selected)


def test_bitfit_all_or_chosen_biases():
    model = tiny.make("bert", "cls")
    up.attach(model, up.BitFit(), name="t")
    names = selected(model)
    assert names and all(n.endswith(".bias") for n in names)
    assert "bert.embeddings.LayerNorm.bias" in names  # every bias term, LayerNorms included
    assert not any(n.startswith("classifier") for n in names)  # the head is the delta's own copy
    up.attach(model, up.BitFit(targets=["query", "value"]), name="qv")
    assert selected(model, "qv") == sorted(f"bert.encoder.layer.{i}.attention.self.{m}.bias"
                                           for i in range(2) for m in ("query", "value"))


def test_freeze_train_share_counts_blocks_as_a_share_of_each_stack():
    cfg = tiny.config("gpt2")
    cfg.n_layer = 6
    model = tf.GPT2LMHeadModel(cfg)
    up.attach(model, up.Freeze(train_share=1 / 3), name="t")  # the last 2 of 6
    assert {n.split(".")[2] for n in selected(model)} == {"4", "5"}
    cfg.n_layer = 12
    model = tf.GPT2LMHeadModel(cfg)
    up.attach(model, up.Freeze(), name="t")  # the default: a third of the depth, 4 of 12 (not a fixed 2)
    assert {n.split(".")[2] for n in selected(model)} == {"8", "9", "10", "11"}
    model = tiny.make("bart")  # 2 blocks per stack: a third rounds to none, and one is the least
    up.attach(model, up.Freeze(train_share=1 / 3), name="t")
    names = selected(model)
    assert names and all(n.startswith(("model.encoder.layers.1.", "model.decoder.layers.1.")) for n in names)
    for bad in (0, 1.5, "half"):
        with pytest.raises(up.UnipeftError, match="train_share"):
            up.Freeze(train_share=bad)


def test_freeze_selects_the_last_blocks_of_each_stack():
    model = tiny.make("bart")
    up.attach(model, up.Freeze(train_last=1), name="t")
    names = selected(model)
    assert names and all(n.startswith(("model.encoder.layers.1.", "model.decoder.layers.1.")) for n in names)
    model = tiny.make("bert", "cls")
    up.attach(model, up.Freeze(train_last=0), name="t")  # linear probing: the head alone
    assert selected(model) == []
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.unipeft_deltas.t.weight", "classifier.unipeft_deltas.t.bias"}
