"""AdapterDrop: no adapters in the lowest n layers; robust training draws n per optimizer step."""
import copy

import pytest
import torch

import tiny
import unipeft as up
from unipeft.methods.adapter import AdapterDelta


def delta_record(model, name="t"):
    return up.engine.registry(model).deltas[name]


def adapters_by_layer(model, name="t"):
    reg = up.engine.registry(model)
    return {p: reg.map.block_of(p).position for p, d in delta_record(model, name).linear.items()
            if isinstance(d, AdapterDelta)}


def scramble(model, name, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta_record(model, name).parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def hidden(model, x):
    with torch.no_grad():
        return model(**x, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("style", ["houlsby", "pfeiffer", "parallel", "scaled_parallel"])
@pytest.mark.parametrize("family", ["bert", "gpt2", "bart"])
def test_every_style_drops_the_lowest_n_layers_of_each_stack(family, style):
    model = tiny.make(family)
    up.attach(model, up.Adapter(style=style, bottleneck=4), name="all")
    up.attach(model, up.Adapter(style=style, bottleneck=4, drop=1), name="t")
    full, kept = adapters_by_layer(model, "all"), adapters_by_layer(model, "t")
    assert kept and set(kept.values()) == {1}  # tiny stacks have 2 layers: only the top one keeps adapters
    assert set(kept) == {p for p, layer in full.items() if layer >= 1}
    n_full = sum(p.numel() for p in delta_record(model, "all").parameters() )
    n_kept = sum(p.numel() for p in delta_record(model, "t").parameters())
    head = sum(p.numel() for d in (delta_record(model, "t"),) for path in d.head for p in d.linear[path].parameters())
    assert n_kept - head == (n_full - head) // 2  # (L - n) / L of the adapters' parameters, L = 2


def test_parameter_count_is_the_notes_formula():
    """(L - n) x 2 x (2 d_h d_m) for Houlsby adapters, plus each projection's bias (d_m + d_h)."""
    model = tiny.make("bert")
    up.attach(model, up.AdapterDrop(n=1, bottleneck=8, train_head=False), name="t")
    L, n, d_h, d_m = 2, 1, 32, 8
    assert up.trainable_parameters(model)[0] == (L - n) * 2 * (2 * d_h * d_m + d_m + d_h)


def test_static_drop_leaves_the_lowest_layers_at_the_base():
    model, x = tiny.make("bert"), tiny.batch("bert")
    base = hidden(model, x)
    up.attach(model, up.AdapterDrop(n=1, bottleneck=8), name="t")
    scramble(model, "t")
    got = hidden(model, x)
    assert torch.equal(got[1], base[1])          # after layer 0: no adapter there
    assert not torch.allclose(got[2], base[2])   # after layer 1: its adapters act


def test_robust_draws_n_per_optimizer_step_and_dropped_layers_get_no_gradient():
    model, x = tiny.make("bert"), tiny.batch("bert")
    up.attach(model, up.AdapterDrop(n=1, robust=True, style="pfeiffer", bottleneck=8), name="t")
    layers = adapters_by_layer(model, "t")
    assert set(layers.values()) == {0, 1}  # robust: adapters everywhere
    schedule = next(iter(delta_record(model, "t").linear.values())).__dict__["drop_at"][0]
    params = [p for p in delta_record(model, "t").parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-2)
    model.train()
    drawn = []
    for _ in range(12):
        drawn.append(schedule.drawn)
        loss = tiny.logits(model, x).pow(2).mean()
        loss.backward()
        for path, layer in layers.items():
            g = delta_record(model, "t").linear[path].up.weight.grad  # (down: zero while up is zero)
            assert (g is None or g.abs().max() == 0) == (layer < schedule.drawn), (layer, schedule.drawn)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert set(drawn) == {0, 1}  # both values drawn, a new draw per step
    assert schedule.steps == 12
    # the draws are a function of the step: a second delta draws the same sequence
    from unipeft.methods.adapter_drop import DropSchedule
    assert [DropSchedule(1, 2).draw(t) for t in range(1, 13)] == drawn


def test_robust_run_resumed_from_a_checkpoint_trains_as_the_uninterrupted_one():
    """The controller's state (the n drawn for the next step) goes into training checkpoints
    (step_hooks.state_tensors; SaveDeltaCallback under transformers.Trainer): a resumed run drops the
    layers the uninterrupted run drops, from its first step on."""
    from unipeft import step_hooks

    x = tiny.batch("bert")

    def make():
        torch.manual_seed(0)
        model = up.attach(tiny.make("bert"), up.AdapterDrop(n=1, robust=True, style="pfeiffer", bottleneck=8), name="t")
        params = [p for p in delta_record(model).parameters() if p.requires_grad]
        return model.train(), params, torch.optim.Adam(params, lr=1e-2)

    def step(model, opt):
        tiny.logits(model, x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model, params, opt = make()
    schedule = next(iter(delta_record(model).linear.values())).__dict__["drop_at"][0]
    first, dropped_once = schedule.drawn, False
    # go on until a step has dropped a layer (the optimizer then skips its adapters: their step counts lag)
    # and the next step's n differs from step 1's (what a resumed run without the state would use)
    while not dropped_once or schedule.drawn == first:
        dropped_once |= schedule.drawn > 0
        step(model, opt)
    saved = ([p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()), step_hooks.state_tensors(model),
             torch.get_rng_state())  # the model's dropout draws, as a checkpoint keeps them
    for _ in range(3):
        step(model, opt)
    want = tiny.logits(model.eval(), x)

    again, params2, opt2 = make()
    with torch.no_grad():
        for p, v in zip(params2, saved[0]):
            p.copy_(v)
    opt2.load_state_dict(saved[1])
    step_hooks.load_state_tensors(again, saved[2], "the checkpoint")
    torch.set_rng_state(saved[3])
    for _ in range(3):
        step(again, opt2)
    assert next(iter(delta_record(again).linear.values())).__dict__["drop_at"][0].steps == schedule.steps
    torch.testing.assert_close(tiny.logits(again.eval(), x), want, rtol=0, atol=0)


def test_robust_delta_serves_any_n_at_inference_and_saves_it(tmp_path):
    model, x = tiny.make("bert"), tiny.batch("bert")
    base = hidden(model, x)
    up.attach(model, up.AdapterDrop(n=0, robust=True, bottleneck=8), name="t")
    scramble(model, "t")
    model.eval()
    every = hidden(model, x)
    assert not torch.allclose(every[1], base[1])
    up.set_drop(model, "t", 1)
    one = hidden(model, x)
    assert torch.equal(one[1], base[1]) and not torch.allclose(one[2], every[2])
    assert up.deltas(model)["t"].drop == 1
    up.save(model, tmp_path / "d", name="t")
    fresh = tiny.make("bert")
    up.load(fresh, tmp_path / "d")
    assert torch.equal(tiny.logits(fresh, x), tiny.logits(model, x))
    up.set_drop(fresh, "t", 0)
    torch.testing.assert_close(hidden(fresh, x)[-1], every[-1], rtol=0, atol=0)


def test_routing_robust_deltas_at_different_n():
    model = tiny.make("bert")
    for name, n in (("a", 0), ("b", 1)):
        up.attach(model, up.AdapterDrop(n=n, robust=True, bottleneck=8), name=name)
        scramble(model, name, seed=n)
    model.eval()
    a, b = tiny.batch("bert", seed=1), tiny.batch("bert", seed=2)
    batch = {k: torch.cat([a[k], b[k]]) for k in a}
    names = ["a", "b", None, "b"]
    expected = []
    for i, name in enumerate(names):
        up.activate(model, [] if name is None else [name])
        with torch.no_grad():
            expected.append(tiny.logits(model, {k: v[i:i + 1] for k, v in batch.items()}))
    with up.route(model, names), torch.no_grad():
        got = tiny.logits(model, batch)
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make,message", [
    (lambda: up.AdapterDrop(n=-1), r"drop must be an integer >= 0"),
    (lambda: up.AdapterDrop(n=1, robust="yes"), r"drop_robust must be True or False"),
    (lambda: up.AdapterDrop(n=1, style="lowrank"), r"style must be 'houlsby', 'pfeiffer', 'parallel' or "),
    (lambda: up.AdapterDrop(n=1, reduction=4), r"unknown option 'reduction'; valid options: 'style'"),
])
def test_bad_options_are_one_line_errors(make, message):
    with pytest.raises(up.UnipeftError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


def test_dropping_every_layer_is_refused_and_leaves_the_model_unchanged():
    model = tiny.make("bert")
    with pytest.raises(up.UnipeftError, match=r"drop=2 would leave no adapter in a stack of 2 layers; "
                                             r"valid drop: 0 to 1$"):
        up.attach(model, up.AdapterDrop(n=2), name="t")
    assert up.engine.registry(model) is None


def test_set_drop_errors():
    model = tiny.make("bert")
    up.attach(model, up.AdapterDrop(n=1), name="fixed")
    with pytest.raises(up.UnipeftError, match="not trained with robust AdapterDrop"):
        up.set_drop(model, "fixed", 0)
    up.attach(model, up.AdapterDrop(n=1, robust=True), name="r")
    with pytest.raises(up.UnipeftError, match=r"n must be an integer from 0 to 1, got 2"):
        up.set_drop(model, "r", 2)
