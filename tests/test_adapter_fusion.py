"""AdapterFusion: attention over trained adapters' outputs, the adapters frozen; the contract tests
of the grid (it cannot join the grid's table: it needs adapters attached first)."""
import json

import pytest
import torch

import tiny
import unipeft as up
from unipeft.methods.adapter_fusion import FusionDelta


def delta_record(model, name):
    return up.engine.registry(model).deltas[name]


def with_adapters(family, style="pfeiffer", seed=0):
    model = tiny.make(family)
    g = torch.Generator().manual_seed(seed)
    for name in ("sst2", "news"):
        up.attach(model, up.Adapter(style=style, bottleneck=4, train_head=False), name=name)
        with torch.no_grad():
            for p in delta_record(model, name).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def run(model, x):
    with torch.no_grad():
        return tiny.logits(model, x)


def base_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "unipeft_" not in n}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_only_the_fusion_trains_and_detach_gives_the_adapters_back(family):
    model, x = with_adapters(family), tiny.batch(family)
    up.activate(model, ["sst2"])
    sst2 = run(model, x)
    before = base_state(model)
    adapters = {n: {k: v.clone() for k, v in up.storage.delta_tensors(model, delta_record(model, n)).items()}
                for n in ("sst2", "news")}
    up.attach(model, up.AdapterFusion(adapters=["sst2", "news"], train_head=False), name="f")
    own = {id(p) for p in delta_record(model, "f").parameters()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if id(p) in own}
    fusion_before = {k: v.clone() for k, v in up.storage.delta_tensors(model, delta_record(model, "f")).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        tiny.logits(model, x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for n, p in model.named_parameters():
        if "unipeft_" not in n:
            assert torch.equal(p, before[n]), n
    for n in ("sst2", "news"):
        after = up.storage.delta_tensors(model, delta_record(model, n))
        assert all(torch.equal(after[k], v) for k, v in adapters[n].items()), f"adapter {n} moved"
    after = up.storage.delta_tensors(model, delta_record(model, "f"))
    assert any(not torch.equal(after[k], v) for k, v in fusion_before.items())
    up.detach(model, "f")
    up.activate(model, ["sst2"])
    assert torch.equal(run(model, x), sst2)


@pytest.mark.parametrize("style", ["pfeiffer", "houlsby"])
def test_fusion_attends_over_the_adapters_outputs(style):
    """Uniform attention (W_Q = 0) and W_V = I give the mean of the adapted sublayer outputs."""
    model = with_adapters("bert", style)
    up.attach(model, up.AdapterFusion(adapters=["sst2", "news"]), name="f")
    fusions = {p: d for p, d in delta_record(model, "f").linear.items() if isinstance(d, FusionDelta)}
    assert len(fusions) == (4 if style == "houlsby" else 2)  # the sublayers the adapters share
    path, fusion = next(iter(fusions.items()))
    with torch.no_grad():
        fusion.query.weight.zero_()
        fusion.query.bias.zero_()
        fusion.value.weight.copy_(torch.eye(32))
    site = model.get_submodule(path)
    y = torch.randn(2, 5, 32)
    with torch.no_grad():
        got = fusion.output(None, y)
        expected = (site.unipeft_deltas["sst2"].output(None, y) + site.unipeft_deltas["news"].output(None, y)) / 2
    torch.testing.assert_close(got, expected)


def test_saved_fusion_names_its_adapters_and_loads_onto_them(tmp_path):
    model, x = with_adapters("bert"), tiny.batch("bert")
    for n in ("sst2", "news"):
        up.save(model, tmp_path / n, name=n)
    up.attach(model, up.AdapterFusion(adapters=["sst2", "news"]), name="f")
    with torch.no_grad():
        for p in delta_record(model, "f").parameters():
            p.add_(torch.randn_like(p) * 0.1)
    expected = run(model, x)
    up.save(model, tmp_path / "f", name="f")
    meta = json.loads((tmp_path / "f" / "delta.json").read_text())
    assert meta["method"]["options"]["adapters"] == ["sst2", "news"]
    assert not [k for k in meta["tensors"] if ".down." in k or ".up." in k]  # no adapter weights
    fresh = tiny.make("bert")
    with pytest.raises(up.UnipeftError, match=r"no delta named 'sst2' is attached \(nor a directory of that name\)"):
        up.load(fresh, tmp_path / "f")
    for n in ("sst2", "news"):
        up.load(fresh, tmp_path / n)
    up.load(fresh, tmp_path / "f")
    assert torch.equal(run(fresh, x), expected)


def test_routing_mixes_the_fusion_and_the_adapters_it_fuses():
    model = with_adapters("bert")
    up.attach(model, up.AdapterFusion(adapters=["sst2", "news"]), name="f")
    with torch.no_grad():
        for p in delta_record(model, "f").parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    a, b = tiny.batch("bert", seed=1), tiny.batch("bert", seed=2)
    batch = {k: torch.cat([a[k], b[k]]) for k in a}
    names = ["f", "sst2", None, "news"]
    expected = []
    for i, n in enumerate(names):
        up.activate(model, [] if n is None else [n])
        expected.append(run(model, {k: v[i:i + 1] for k, v in batch.items()}))
    with up.route(model, names):
        got = run(model, batch)
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make,message", [
    (lambda: up.AdapterFusion(adapters=["a"]), r"adapters must name two or more adapter deltas"),
    (lambda: up.AdapterFusion(adapters=["a", "a"]), r"adapters repeat in \['a', 'a'\]"),
    (lambda: up.AdapterFusion(adapters=["a", "b"], heads=1), r"unknown option 'heads'; valid options: 'adapters'"),
])
def test_bad_options_are_one_line_errors(make, message):
    with pytest.raises(up.UnipeftError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


def test_fusing_what_is_not_a_sequential_adapter_is_refused():
    model = tiny.make("bert")
    up.attach(model, up.Adapter(style="pfeiffer", bottleneck=4), name="a")
    up.attach(model, up.LoRA(r=2), name="l")
    up.attach(model, up.Adapter(style="parallel", bottleneck=4), name="p")
    with pytest.raises(up.UnipeftError, match=r"the method of delta 'l' must be 'adapter' or 'compacter', got 'lora'"):
        up.attach(model, up.AdapterFusion(adapters=["a", "l"]), name="f")
    with pytest.raises(up.UnipeftError, match=r"delta 'p' is a parallel adapter; fusion reads sequential adapters"):
        up.attach(model, up.AdapterFusion(adapters=["a", "p"]), name="f")
    assert list(up.deltas(model)) == ["a", "l", "p"]


def test_adapters_given_as_saved_directories_are_loaded_and_remembered(tmp_path):
    model, x = with_adapters("bert"), tiny.batch("bert")
    for n in ("sst2", "news"):
        up.save(model, tmp_path / n, name=n)
    bare = tiny.make("bert")
    up.attach(bare, up.AdapterFusion(adapters=[str(tmp_path / "sst2"), str(tmp_path / "news")]), name="f")
    assert up.active(bare) == ["f"] and set(up.deltas(bare)) == {"sst2", "news", "f"}
    cfg = up.deltas(bare)["f"]
    assert cfg.adapters == ("sst2", "news") and cfg.sources == {n: str(tmp_path / n) for n in ("sst2", "news")}
    with torch.no_grad():
        for p in delta_record(bare, "f").parameters():
            p.add_(torch.randn_like(p) * 0.1)
    expected = run(bare, x)
    up.save(bare, tmp_path / "f", name="f")
    fresh = tiny.make("bert")
    up.load(fresh, tmp_path / "f")  # the adapters come from the sources it names
    assert set(up.deltas(fresh)) == {"sst2", "news", "f"} and torch.equal(run(fresh, x), expected)


def test_a_failed_fusion_leaves_no_adapter_it_loaded(tmp_path):
    model = with_adapters("bert")
    up.save(model, tmp_path / "sst2", name="sst2")
    up.attach(model, up.LoRA(r=2), name="lora")
    up.save(model, tmp_path / "lora", name="lora")
    bare = tiny.make("bert")
    with pytest.raises(up.UnipeftError, match=r"the method of delta 'lora' must be 'adapter' or 'compacter'"):
        up.attach(bare, up.AdapterFusion(adapters=[str(tmp_path / "sst2"), str(tmp_path / "lora")]), name="f")
    assert up.engine.registry(bare) is None


def test_the_fusion_cannot_take_the_name_of_an_adapter_it_fuses(tmp_path):
    model = with_adapters("bert")
    up.save(model, tmp_path / "sst2", name="sst2")
    with pytest.raises(up.UnipeftError, match=r"is named 'sst2', the name this fusion is being attached under"):
        up.attach(tiny.make("bert"), up.AdapterFusion(adapters=[str(tmp_path / "sst2"), "news"]), name="sst2")
