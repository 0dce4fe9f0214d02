"""Compacter / Compacter++ and AdapterBias (seed 001): what the grid does not check.

The PHM weight is the notes' sum of Kronecker products, the A_i are one tensor shared by every
layer (trained by all of them, saved once), the parameter counts are the notes' table's,
Compacter++ sits only after the FFN, AdapterBias adds alpha(x) v with alpha read from the
sublayer's input, and bad options are one-line errors naming the valid choices.
"""
import pytest
import torch
import torch.nn.functional as F

import tiny
import unipeft as up
from unipeft.methods.adapter_bias import ShiftDelta
from unipeft.methods.compacter import CompacterDelta, PHMLinear, PHMRule

L, D_H = 2, 32  # the tiny models (tests/tiny.py): 2 layers, hidden size 32


def delta_record(model, name="t"):
    return up.engine.registry(model).deltas[name]


def count(model, name="t"):
    return up.engine.delta_parameter_count(model, delta_record(model, name))


def test_phm_weight_is_the_sum_of_kronecker_products():
    torch.manual_seed(0)
    rule = PHMRule(4)
    layer = PHMLinear(rule, 32, 8, rank=2, zero=False)
    A, s, t = rule.phm_rule, layer.phm_s, layer.phm_t
    expected = sum(torch.kron(A[i], s[i] @ t[i].T) for i in range(4))  # (d_in, d_out), x W
    torch.testing.assert_close(layer.weight.T, expected)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(layer(x), x @ expected)
    assert torch.linalg.matrix_rank(s[0] @ t[0].T) == 2  # each B_i has the chosen rank


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_the_a_matrices_are_one_tensor_shared_by_every_layer_and_saved_once(family, tmp_path):
    model, x = tiny.make(family), tiny.batch(family)
    up.attach(model, up.Compacter(n=4, bottleneck=8, train_head=False), name="t")
    record = delta_record(model)
    deltas = [d for d in record.linear.values() if isinstance(d, CompacterDelta)]
    assert len(deltas) == L * 2
    for d in deltas:
        assert d.down.rule is record.module and d.up.rule is record.module
    A = record.module.phm_rule
    tiny.logits(model, x).float().pow(2).mean().backward()
    # at init W_up = 0: only the up-projections' t get a gradient (A's is zero, as LoRA's A is)
    assert all(d.up.phm_t.grad.abs().sum() > 0 for d in deltas)
    assert torch.count_nonzero(A.grad) == 0
    opt = torch.optim.SGD(record.parameters(), lr=1.0)
    opt.step()
    opt.zero_grad()
    tiny.logits(model, x).float().pow(2).mean().backward()
    assert A.grad.abs().sum() > 0  # one tensor, trained through every layer's projections
    tensors = up.storage.delta_tensors(model, record)
    assert [k for k in tensors if "phm_rule" in k] == ["model:phm_rule"]
    assert sum(t.numel() for t in tensors.values()) == count(model)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("n,m,rank", [(4, 8, 1), (2, 8, 2), (8, 16, 1)])
def test_parameter_count_is_the_notes_formula(family, n, m, rank):
    """The notes' table: Compacter L x 2 x (2(d_h + d_m)) at rank 1; r times that at rank r, plus the
    n^3 entries of the shared A_i. Compacter++ keeps one adapter of the two per layer."""
    model = tiny.make(family)
    up.attach(model, up.Compacter(n=n, bottleneck=m, rank=rank, train_head=False), name="t")
    assert count(model) == L * 2 * (2 * rank * (D_H + m)) + n ** 3
    up.detach(model, "t")
    up.attach(model, up.Compacter(n=n, bottleneck=m, rank=rank, plus=True, train_head=False), name="t")
    assert count(model) == L * 1 * (2 * rank * (D_H + m)) + n ** 3


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_adapter_bias_parameter_count(family):
    """W (d_h x 1) and v (d_h) after each of the 2 sublayers of the L layers: L x 2 x (2 d_h)."""
    model = tiny.make(family)
    up.attach(model, up.AdapterBias(train_head=False), name="t")
    assert count(model) == L * 2 * (2 * D_H)
    up.detach(model, "t")
    up.attach(model, up.AdapterBias(locations="ffn", train_head=False), name="t")
    assert count(model) == L * 1 * (2 * D_H)


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_compacter_plus_sits_only_after_the_ffn(family):
    model = tiny.make(family)
    roles = up.engine.registry(model, create=True).map.roles
    up.attach(model, up.Compacter(n=4, bottleneck=8), name="c")
    up.attach(model, up.Compacter(n=4, bottleneck=8, plus=True), name="p")
    placed = {name: [roles[p] for p, d in delta_record(model, name).linear.items() if isinstance(d, CompacterDelta)]
              for name in ("c", "p")}
    assert placed["p"] and all("ffn_out" in r for r in placed["p"])
    assert any("o" in r for r in placed["c"]) and any("ffn_out" in r for r in placed["c"])
    assert len(placed["c"]) > len(placed["p"])


def test_compacter_starts_at_the_base_because_its_up_projection_is_zero():
    model = tiny.make("bert")
    up.attach(model, up.Compacter(n=4, bottleneck=8), name="t")
    for d in delta_record(model).linear.values():
        if isinstance(d, CompacterDelta):
            assert torch.count_nonzero(d.up.weight) == 0
            assert torch.count_nonzero(d.down.weight) > 0  # so the up-projection gets a gradient


def test_adapter_bias_adds_alpha_of_the_sublayer_input_times_v():
    """At the FFN: y = F(x) + (x W) v, x the FFN's input (read at its first map)."""
    model, x = tiny.make("bert"), tiny.batch("bert")
    up.attach(model, up.AdapterBias(locations="ffn"), name="t")
    roles = up.engine.registry(model).map.roles
    record = delta_record(model)
    out_path = next(p for p, d in record.linear.items() if isinstance(d, ShiftDelta))
    block = up.engine.registry(model).map.block_of(out_path)
    in_path = next(p for p in roles if "ffn_in" in roles[p] and up.engine.registry(model).map.block_of(p) is block)
    shift = record.linear[out_path]
    with torch.no_grad():
        shift.bias_v.normal_()
    seen = {}
    out_site, in_site = model.get_submodule(out_path), model.get_submodule(in_path)
    hooks = [in_site.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
             out_site.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0])),
             out_site.register_forward_hook(lambda m, a, y: seen.__setitem__("y", y))]
    with torch.no_grad():
        tiny.logits(model, x)
    for h in hooks:
        h.remove()
    base = F.linear(seen["h"], out_site.weight, out_site.bias)
    expected = base + (seen["x"] @ shift.bias_alpha)[..., None] * shift.bias_v
    torch.testing.assert_close(seen["y"], expected)
    assert (seen["y"] - base).abs().max() > 0


def test_routed_tables_follow_the_shared_a_matrices():
    """Routing keeps stacked weights between calls until a parameter changes; a Compacter's
    weights are built from the shared A too, so changing A alone must rebuild them."""
    model, x = tiny.make("bert"), tiny.batch("bert")
    up.attach(model, up.Compacter(n=4, bottleneck=8), name="a")
    up.attach(model, up.Compacter(n=2, bottleneck=8), name="b")
    with torch.no_grad():
        for name in ("a", "b"):
            for p in delta_record(model, name).parameters():
                p.add_(torch.randn_like(p) * 0.5)
    names = ["a", "b"] + [None] * (x["input_ids"].shape[0] - 2)
    model.eval()

    def routed():
        with up.route(model, names), torch.no_grad():
            return tiny.logits(model, x)

    def alone(name):
        up.activate(model, [name])
        with torch.no_grad():
            return tiny.logits(model, x)[:1] if name == "a" else tiny.logits(model, x)[1:2]

    first = routed()
    with torch.no_grad():
        delta_record(model, "a").module.phm_rule.mul_(3.0)
    second = routed()
    assert not torch.allclose(first[:1], second[:1])
    torch.testing.assert_close(second[:1], alone("a"), rtol=0, atol=1e-5)
    torch.testing.assert_close(second[1:2], alone("b"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("make,message", [
    (lambda: up.Compacter(n=3, bottleneck=8), r"n=3 must divide bottleneck=8; valid n: 1, 2, 4 or 8$"),
    (lambda: up.Compacter(n=0), r"n must be an integer >= 1"),
    (lambda: up.Compacter(rank=0), r"rank must be an integer >= 1"),
    (lambda: up.Compacter(plus="yes"), r"plus must be True \(Compacter\+\+\) or False"),
    (lambda: up.Compacter(activation="softmax"), r"activation must be 'relu', 'gelu', 'tanh' or 'silu'"),
    (lambda: up.Compacter(reduction=16), r"unknown option 'reduction'; valid options: 'n', 'bottleneck'"),
    (lambda: up.AdapterBias(locations=["embeddings"]), r"locations must be 'attention' or 'ffn'"),
    (lambda: up.AdapterBias(locations=[]), r"locations is empty"),
])
def test_bad_options_are_one_line_errors(make, message):
    with pytest.raises(up.UnipeftError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


def test_n_must_divide_the_hidden_size():
    """bottleneck 48 takes n = 3, the hidden size 32 does not: the error lists the n that fit both."""
    model = tiny.make("bert")
    with pytest.raises(up.UnipeftError, match=r"n=3 must divide the hidden size 32 of 'bert' and bottleneck=48; "
                                             r"valid n: 1, 2, 4, 8 or 16$") as err:
        up.attach(model, up.Compacter(n=3, bottleneck=48), name="t")
    assert "\n" not in str(err.value)
    assert up.engine.registry(model) is None  # nothing left behind


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_routed_batch_mixing_adapters_compacters_and_adapter_bias(family):
    """A Compacter is an adapter subclass at the adapters' sites: in a routed batch each class
    applies only its own deltas (a Houlsby adapter's gather must not also apply the Compacter)."""
    model, x = tiny.make(family), tiny.batch(family)
    # two of each class (so each gathers) with the same activation (so only the class tells them apart)
    configs = {"houlsby": up.Adapter(style="houlsby", bottleneck=4, activation="gelu"),
               "pfeiffer": up.Adapter(style="pfeiffer", bottleneck=8, activation="gelu"),
               "compacter": up.Compacter(n=4, bottleneck=8), "plus": up.Compacter(n=2, bottleneck=4, plus=True),
               "bias": up.AdapterBias()}
    for name, cfg in configs.items():
        up.attach(model, cfg, name=name)
        with torch.no_grad():
            for p in delta_record(model, name).parameters():
                p.add_(torch.randn_like(p) * 0.5)
    model.eval()
    names = ["houlsby", "compacter", None, "plus", "bias", "pfeiffer"]
    batch = {k: torch.cat([v] * 3)[:len(names)] for k, v in x.items()}
    expected = []
    for i, name in enumerate(names):
        up.activate(model, [] if name is None else [name])
        with torch.no_grad():
            expected.append(tiny.logits(model, {k: v[i:i + 1] for k, v in batch.items()}))
    with up.route(model, names), torch.no_grad():
        got = tiny.logits(model, batch)
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-4)
