"""layers=: every method on a subset of the blocks; compositions assign methods to layer groups."""
import json

import pytest
import torch

import tiny
import unipeft as up
from unipeft.layers import normalize


def delta_record(model, name="t"):
    return up.engine.registry(model).deltas[name]


def blocks_of(model, name="t"):
    reg = up.engine.registry(model)
    paths = list(delta_record(model, name).linear) + list(delta_record(model, name).attention)
    return sorted({reg.map.block_of(p).index for p in paths if reg.map.block_of(p) is not None})


def test_specs_normalise_to_indices_and_group_names():
    assert normalize("LoRA", "0-2,5") == (0, 1, 2, 5)
    assert normalize("LoRA", [0, "2-3", 3]) == (0, 2, 3)
    assert normalize("LoRA", 4) == (4,)
    assert normalize("LoRA", "upper-half") == ("upper-half",)
    assert up.LoRA(layers=["1"]).to_dict()["layers"] == [1]


@pytest.mark.parametrize("spec,message", [
    ("x", r"layers: 'x' is not an index, a range 'a-b' or one of 'all', 'encoder', 'decoder'"),
    ("3-1", r"layers: range '3-1' runs backwards"),
    ([], r"layers must be an index, a range 'a-b', a list of those"),
    (-1, r"layers: index -1 is negative"),
    ([1.5], r"layers: 1.5 is not an index"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(up.UnipeftError, match=message) as err:
        up.LoRA(layers=spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("make", [lambda s: up.LoRA(r=2, layers=s), lambda s: up.Adapter(bottleneck=4, layers=s),
                                  lambda s: up.PrefixTuning(length=2, reparam_hidden=0, layers=s),
                                  lambda s: up.IA3(layers=s), lambda s: up.Compacter(n=2, bottleneck=4, layers=s),
                                  lambda s: up.AdaMix(experts=2, bottleneck=4, layers=s)])
def test_a_method_acts_on_the_chosen_blocks_only_and_sizes_its_parameters_for_them(family, make):
    whole, part = tiny.make(family), tiny.make(family)
    up.attach(whole, make(None), name="t", activate=True)
    up.attach(part, make("1"), name="t")
    n_blocks = len(up.engine.registry(part).map.blocks)
    assert blocks_of(part) == [1] and len(blocks_of(whole)) == n_blocks
    def count(m):  # per-layer parameters: not the head, not Compacter's A_i shared by every layer
        from unipeft.methods.compacter import PHMRule

        rec = delta_record(m)
        own = sum(p.numel() for path, d in rec.linear.items() if path not in rec.head for p in d.parameters())
        return own + (0 if rec.module is None or isinstance(rec.module, PHMRule) else
                      sum(p.numel() for p in rec.module.parameters()))
    head = 0
    if family in ("t5", "bart"):  # decoder blocks hold cross-attention too: not alike
        assert 0 < count(part) - head < count(whole) - head
    else:  # the same per block
        assert (count(part) - head) * n_blocks == count(whole) - head


def test_compose_assigns_methods_to_layer_groups_and_saves_them(tmp_path):
    model, x = tiny.make("bert"), tiny.batch("bert")
    up.attach(model, up.Compose([up.LoRA(r=2, layers="0"), up.Adapter(bottleneck=4, layers="1")]), name="t")
    reg = up.engine.registry(model)
    kinds = {reg.map.block_of(p).index: type(d).__name__ for p, d in delta_record(model).linear.items()
             if reg.map.block_of(p) is not None}
    assert kinds == {0: "LoRADelta", 1: "AdapterDelta"}
    with torch.no_grad():
        for p in delta_record(model).parameters():
            p.add_(torch.randn_like(p) * 0.3)
    expected = tiny.logits(model, x).detach()
    up.save(model, tmp_path / "d", name="t")
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert [p["options"]["layers"] for p in meta["method"]["options"]["methods"]] == [[0], [1]]
    fresh = tiny.make("bert")
    up.load(fresh, tmp_path / "d")
    assert torch.equal(tiny.logits(fresh, x), expected)


def test_selective_methods_train_the_chosen_blocks_parameters_only():
    model = tiny.make("bert")
    up.attach(model, up.BitFit(layers="upper-half", train_head=False), name="t")
    selected = list(delta_record(model).selected)
    assert selected and all(p.startswith("bert.encoder.layer.1.") for p in selected)


def test_pasta_on_some_layers_leaves_the_others_alone():
    model, x = tiny.make("bert"), tiny.batch("bert")

    def block_inputs():
        seen = []
        hooks = [b.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0] if a else kw["hidden_states"]),
                                             with_kwargs=True) for b in model.bert.encoder.layer]
        with torch.no_grad():
            tiny.logits(model, x)
        for h in hooks:
            h.remove()
        return seen
    base = block_inputs()
    up.attach(model, up.PASTA(tokens=[13, 5], layers=[1]), name="t")
    assert delta_record(model).module.table.shape[0] == 1
    with torch.no_grad():
        delta_record(model).module.table.normal_()
    got = block_inputs()
    assert torch.equal(got[0], base[0]) and not torch.equal(got[1], base[1])


def test_encoder_and_decoder_groups():
    model = tiny.make("t5")
    up.attach(model, up.LoRA(r=2, layers="decoder"), name="t")
    reg = up.engine.registry(model)
    assert {reg.map.block_of(p).stack for p in delta_record(model).linear if reg.map.block_of(p)} == {"decoder.block"}
    with pytest.raises(up.UnipeftError, match=r"layers: 'gpt2' has no encoder stack; give indices 0 to 1"):
        up.attach(tiny.make("gpt2"), up.LoRA(layers="encoder"), name="t")


@pytest.mark.parametrize("make,message", [
    (lambda: up.LoRA(layers=7), r"LoRA: layers: block 7 does not exist; 'bert' has blocks 0 to 1"),
    (lambda: up.PromptTuning(length=2, layers=0), r"PromptTuning: acts on the input embeddings, before any layer, "
                                                 r"so layers= does not apply"),
])
def test_attach_errors_leave_the_model_unchanged(make, message):
    model = tiny.make("bert")
    with pytest.raises(up.UnipeftError, match=message):
        up.attach(model, make(), name="t")
    assert up.engine.registry(model) is None


# Methods that work on the base's own tensors (through a subspace, sparse entries, a quantized copy): with
# layers="0" the trainable parameters and every tensor that ends up changed are block 0's (train_head=False:
# the head, trained whole by every method, is not what is checked).
BASE_TENSOR_METHODS = {
    "intrinsic": lambda: up.Intrinsic(d=20, layers="0", train_head=False),  # not the embedding: it is in no block
    "sparse_ft": lambda: up.SparseFT(select="magnitude", density=0.1, layers="0", train_head=False),
    "sparse_ft_lt": lambda: up.SparseFT(select="lt-sft", select_after=2, density=0.1, layers="0", train_head=False),
    "diff_pruning": lambda: up.DiffPruning(layers="0", train_head=False),
    "qlora": lambda: up.QLoRA(bits=2, r=2, layers="0", train_head=False),
}


@pytest.mark.parametrize("kind", list(BASE_TENSOR_METHODS))
def test_methods_on_the_base_tensors_train_and_change_the_chosen_block_only(kind):
    model, x = tiny.make("bert"), tiny.batch("bert")
    base = tiny.make("bert").state_dict()
    up.attach(model, BASE_TENSOR_METHODS[kind](), name="t")
    block0 = "bert.encoder.layer.0."
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith((block0, "unipeft_modules.")) for n in trainable), trainable
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(4):  # lt-sft selects its entries after step 2
        model(**x, labels=torch.tensor([0, 2])).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    if kind == "diff_pruning":
        up.finalize(model, "t")
    if kind != "qlora":  # (QLoRA's base is already changed: block 0's maps are quantized)
        up.merge(model, "t")
    changed = {n for n, t in model.state_dict().items() if "unipeft_" not in n
               and (n not in base or t.shape != base[n].shape or not torch.equal(t, base[n]))}
    assert changed and all(n.startswith(block0) for n in changed), sorted(changed)


def test_new_tokens_refuses_layers_on_construction():
    with pytest.raises(up.UnipeftError, match=r"^NewTokens: layers= does not apply: it acts on the token embedding "
                                              r"\(and the LM head\), which belong to no block") as err:
        up.NewTokens(corpus=["a b"], layers="0")
    assert "\n" not in str(err.value)
    assert up.NewTokens(corpus=["a b"]).layers is None  # the default is fine


@pytest.mark.parametrize("make", [lambda: up.AdapterDrop(n=1, bottleneck=4, layers="0"),
                                  lambda: up.Freeze(train_last=1, layers="0")])
def test_options_that_place_nothing_in_the_chosen_layers_are_refused(make):
    model = tiny.make("bert")  # the lowest layer dropped / only the last trained: nothing left in block 0
    with pytest.raises(up.UnipeftError, match=r"places nothing in layers \[0\] with these options"):
        up.attach(model, make(), name="t")
    assert up.engine.registry(model) is None
