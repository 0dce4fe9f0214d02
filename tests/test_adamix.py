"""AdaMix: M copies per adapter projection, a random copy per pass in training, two passes with a
symmetric KL term, the average in eval mode and on disk (a plain adapter)."""
import json

import pytest
import torch
import torch.nn.functional as F

import tiny
import unipeft as up
from unipeft.methods.adamix import MixDelta, MixedLinear


def delta_record(model, name="t"):
    return up.engine.registry(model).deltas[name]


def scramble(model, name="t", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta_record(model, name).parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def labelled(family="bert"):
    x = tiny.batch(family, head="cls")
    return {**x, "labels": torch.tensor([0, 2])}


def test_training_draws_one_copy_per_pass_and_eval_uses_their_average():
    layer = MixedLinear(3, 4, 5)
    with torch.no_grad():
        layer.weights.normal_()
        layer.biases.normal_()
    x = torch.randn(2, 4)
    copies = [F.linear(x, layer.weights[j], layer.biases[j]) for j in range(3)]
    layer.train()
    seen = set()
    for _ in range(30):
        y = layer(x)
        hits = [j for j, c in enumerate(copies) if torch.equal(y, c)]
        assert len(hits) == 1
        seen.add(hits[0])
    assert seen == {0, 1, 2}
    layer.eval()
    torch.testing.assert_close(layer(x), sum(copies) / 3)


def test_saved_delta_is_a_single_adapter_that_gives_the_eval_outputs(tmp_path):
    from safetensors.torch import load_file

    model, x = tiny.make("bert"), tiny.batch("bert")
    up.attach(model, up.AdaMix(experts=4, bottleneck=8, train_head=False), name="t")
    scramble(model)
    model.eval()
    expected = tiny.logits(model, x).detach()
    up.save(model, tmp_path / "d", name="t")
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert meta["method"]["kind"] == "adapter" and meta["method"]["options"]["style"] == "houlsby"
    tensors = load_file(str(tmp_path / "d" / "delta.safetensors"))
    mixes = [p for p, d in delta_record(model).linear.items() if isinstance(d, MixDelta)]
    assert len(tensors) == 4 * len(mixes)  # down and up, weight and bias: one adapter per place
    assert all(t.shape in {(8, 32), (8,), (32, 8), (32,)} for t in tensors.values())
    one_adapter = 2 * 2 * (32 * 8 + 8 + 8 * 32 + 32)  # L x 2 sublayers
    assert meta["parameters"] == one_adapter
    assert up.trainable_parameters(model)[0] == 4 * one_adapter  # M copies while training
    fresh = tiny.make("bert")
    up.load(fresh, tmp_path / "d")
    torch.testing.assert_close(tiny.logits(fresh, x), expected, rtol=0, atol=1e-6)


def test_training_loss_adds_the_symmetric_kl_of_two_passes():
    model = tiny.make("bert", head="cls")
    batch = labelled()
    up.attach(model, up.AdaMix(experts=4, bottleneck=8, consistency=0.5), name="t")
    scramble(model)
    model.train()
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    torch.manual_seed(3)
    loss = model(**batch).loss
    assert len(calls) == 2  # every batch runs twice
    site = up.engine.registry(model).loss_site
    site.refresh([])  # the two passes by hand, with the same draws
    torch.manual_seed(3)
    first = model(**batch)
    second = model(**batch).logits
    a, b = F.log_softmax(first.logits, -1), F.log_softmax(second, -1)
    kl = lambda p, q: (p.exp() * (p - q)).sum(-1).mean()  # noqa: E731
    torch.testing.assert_close(loss, first.loss + 0.5 * 0.5 * (kl(a, b) + kl(b, a)))
    assert not torch.allclose(first.logits, second)  # the passes drew different copies
    site.refresh(["t"])
    loss.backward()
    grads = [p.grad for p in delta_record(model).parameters() if p.grad is not None]
    assert grads and any(g.abs().max() > 0 for g in grads)
    hook.remove()


def test_no_second_pass_in_eval_mode_without_labels_or_under_no_grad():
    model = tiny.make("bert", head="cls")
    batch = labelled()
    up.attach(model, up.AdaMix(experts=2, bottleneck=4), name="t")
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    model.eval()
    model(**batch)
    model.train()
    model(**{k: v for k, v in batch.items() if k != "labels"})
    with torch.no_grad():
        model(**batch)
    assert len(calls) == 3
    assert len(model._forward_hooks) == 1  # the loss site's hook
    up.detach(model, "t")
    assert not model._forward_hooks and up.engine.registry(model) is None


def test_consistency_zero_adds_no_term():
    model = tiny.make("bert", head="cls")
    up.attach(model, up.AdaMix(experts=2, bottleneck=4, consistency=0), name="t")
    assert up.engine.registry(model).loss_site is None


@pytest.mark.parametrize("make,message", [
    (lambda: up.AdaMix(experts=0), r"experts must be an integer >= 1"),
    (lambda: up.AdaMix(consistency=-1), r"consistency must be >= 0"),
    (lambda: up.AdaMix(locations=["head"]), r"locations must be 'attention' or 'ffn'"),
    (lambda: up.AdaMix(activation="softmax"), r"activation must be 'relu', 'gelu', 'tanh' or 'silu'"),
    (lambda: up.AdaMix(copies=2), r"unknown option 'copies'; valid options: 'experts'"),
])
def test_bad_options_are_one_line_errors(make, message):
    with pytest.raises(up.UnipeftError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


def test_inference_keeps_the_average_until_a_copy_changes():
    layer = MixedLinear(2, 4, 3).eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        first = layer(x)
        kept = layer.__dict__["_kept"][1]
        assert layer(x) is not first and layer.__dict__["_kept"][1] is kept  # reused
        layer.weights.add_(1.0)  # an optimizer step moves the copies: the average follows
        torch.testing.assert_close(layer(x), F.linear(x, layer.weights.mean(0), layer.biases.mean(0)))
