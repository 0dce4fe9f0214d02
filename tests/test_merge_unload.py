"""up.merge(model, name, unload=True): the delta folded into the base for good (peft's
merge_and_unload). The grid (tests/test_grid.py) checks every mergeable method on every family
leaves a plain model with the merged outputs; here: a checkpoint plain transformers loads, deltas
that stay attached, tensors two deltas share, and the refusals."""
import pytest
import torch
import transformers as tf

import tiny
import unipeft as up
from tiny import scramble


def run(model, x):
    with torch.no_grad():
        return tiny.logits(model, x)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_save_pretrained_after_unload_is_a_checkpoint_transformers_loads_alone(family, tmp_path):
    model, x = tiny.make(family), tiny.batch(family)
    up.attach(model, up.LoRA(r=4, alpha=8, targets="all-linear"), name="t")
    scramble(model, "t")
    expected = run(model, x)
    up.merge(model, "t", unload=True)
    model.save_pretrained(tmp_path / "merged")
    loaded, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    torch.testing.assert_close(run(loaded.eval(), x), expected, rtol=1e-5, atol=1e-5)


def test_a_delta_that_stays_attached_runs_on_the_new_base():
    model, x = tiny.make("llama"), tiny.batch("llama")
    up.attach(model, up.LoRA(r=4, alpha=8, targets=("q", "v")), name="a")
    scramble(model, "a")
    up.attach(model, up.IA3(), name="b")   # at v too, after a: scales what a added
    scramble(model, "b", seed=1)
    up.activate(model, ["a", "b"])
    both = run(model, x)
    up.merge(model, "a", unload=True)
    assert up.active(model) == ["b"] and list(up.deltas(model)) == ["b"]
    torch.testing.assert_close(run(model, x), both, rtol=1e-5, atol=1e-6)
    up.activate(model, [])
    up.activate(model, ["b"])
    torch.testing.assert_close(run(model, x), both, rtol=1e-5, atol=1e-6)


def test_sparse_deltas_on_the_same_tensors_keep_their_own_values():
    """Two sparse deltas on shared tensors: unloading one makes its values part of the original the
    other composes on (switching the other off leaves the unloaded one's values in)."""
    model, x = tiny.make("bert"), tiny.batch("bert")
    base = run(model, x)
    up.attach(model, up.SparseFT(select="magnitude", density=0.2, train_head=False), name="x")
    # y's entries lie inside x's mask: training both, y takes those and x the rest
    up.attach(model, up.SparseFT(select="magnitude", density=0.05, train_head=False), name="y")
    up.activate(model, ["x", "y"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):
        tiny.logits(model, x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    both = run(model, x)
    up.activate(model, ["x"])
    only_x = run(model, x)
    up.activate(model, ["x", "y"])
    up.merge(model, "x", unload=True)
    assert up.active(model) == ["y"]
    torch.testing.assert_close(run(model, x), both, rtol=1e-5, atol=1e-6)
    up.activate(model, [])
    torch.testing.assert_close(run(model, x), only_x, rtol=1e-5, atol=1e-6)   # x is the base now
    assert not torch.allclose(only_x, base)
    up.detach(model, "y")
    torch.testing.assert_close(run(model, x), only_x, rtol=1e-5, atol=1e-6)


def test_an_inactive_selective_delta_on_the_same_tensors_goes_back_to_the_new_base():
    model, x = tiny.make("bert"), tiny.batch("bert")
    up.attach(model, up.BitFit(), name="x")
    scramble(model, "x") if up.engine.registry(model).deltas["x"].parameters() else None
    with torch.no_grad():
        for n in up.engine.registry(model).deltas["x"].selected:
            model.get_parameter(n).add_(0.1)
    with_x = run(model, x)
    up.attach(model, up.BitFit(), name="y")   # attached and active: x goes off
    with torch.no_grad():
        for n in up.engine.registry(model).deltas["y"].selected:
            model.get_parameter(n).add_(-0.2)
    with_y = run(model, x)
    up.activate(model, ["x"])
    up.merge(model, "x", unload=True)
    torch.testing.assert_close(run(model, x), with_x, rtol=0, atol=0)
    up.activate(model, ["y"])
    torch.testing.assert_close(run(model, x), with_y, rtol=0, atol=0)   # y's own trained values
    up.activate(model, [])
    torch.testing.assert_close(run(model, x), with_x, rtol=1e-6, atol=1e-6)   # off: the new base, x's


def test_refusals_name_the_problem_and_change_nothing():
    model, x = tiny.make("llama"), tiny.batch("llama")
    up.attach(model, up.LoRA(r=2), name="a")
    up.attach(model, up.LoRA(r=2, targets=("o",)), name="b")
    scramble(model, "a")
    scramble(model, "b", seed=1)
    up.activate(model, ["a", "b"])
    up.merge(model, "a")
    before = run(model, x)
    with pytest.raises(up.UnipeftError, match=r"delta\(s\) 'a' are merged too.*Unmerge them first"):
        up.merge(model, "b", unload=True)
    assert set(up.deltas(model)) == {"a", "b"} and torch.equal(run(model, x), before)
    up.unmerge(model, "a")
    up.activate(model, ["b"])
    with pytest.raises(up.UnipeftError, match="'a' is not active; activate it before merging"):
        up.merge(model, "a", unload=True)
    with pytest.raises(up.UnipeftError, match="cannot be merged"):
        m = tiny.make("llama")
        up.attach(m, up.PromptTuning(length=2), name="p")
        up.merge(m, "p", unload=True)


def test_quantized_maps_are_refused():
    model, x = tiny.make("llama"), tiny.batch("llama")
    up.attach(model, up.QLoRA(bits=4, r=2), name="q")
    scramble(model, "q")
    before = run(model, x)
    with pytest.raises(up.UnipeftError, match="4-bit quantized.*second rounding"):
        up.merge(model, "q", unload=True)
    assert list(up.deltas(model)) == ["q"] and torch.equal(run(model, x), before)


def test_merging_where_another_active_delta_composes_with_it_is_refused():
    """At a map, input deltas run before W and output deltas after it in activation order, each
    reading the map's input x. Folded into W, a delta is exact only next to W: LoRA beside (IA)3's
    FFN scaling (which scales only what W sees) or (IA)3 scaling what LoRA added before it would
    change the outputs (before 2026-12-03 merge did it silently: logits moved by 0.12)."""
    model, x = tiny.make("llama"), tiny.batch("llama")
    up.attach(model, up.LoRA(r=4, alpha=8, targets="all-linear"), name="a")
    scramble(model, "a")
    up.attach(model, up.IA3(), name="b")
    scramble(model, "b", seed=1)
    up.activate(model, ["a", "b"])
    before = run(model, x)
    with pytest.raises(up.UnipeftError, match=r"merging delta 'a' into 'model.layers.0.mlp.down_proj' would change "
                                              r"the outputs: delta\(s\) 'b' are active there"):
        up.merge(model, "a")
    with pytest.raises(up.UnipeftError, match=r"merging delta 'b' into 'model.layers.0.self_attn.k_proj' .* 'a'"):
        up.merge(model, "b", unload=True)
    assert torch.equal(run(model, x), before) and not any(d.merged for d in up.engine.registry(model).deltas.values())
    # a parallel adapter's tap only reads the input: LoRA still merges exactly beside it
    up.activate(model, ["a"])
    up.attach(model, up.Adapter(style="parallel", bottleneck=4), name="c")
    scramble(model, "c", seed=2)
    up.activate(model, ["a", "c"])
    with_c = run(model, x)
    up.merge(model, "a")
    torch.testing.assert_close(run(model, x), with_c, rtol=1e-5, atol=1e-5)
