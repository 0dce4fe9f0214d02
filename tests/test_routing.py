"""Per-example routing (up.route): a routed batch gives each row what that row gives alone.

For every routable method on every family, two deltas of the method (different values, and for
prompt and prefix tuning different lengths) and the base share one batch; each row's logits must
equal those of the row run alone with its delta activated (same padding). Generation (greedy and
beam search, with the KV cache) must give each row its own tokens. Mixed methods share a batch.
After the block the model is exactly as before, also when the forward raises.
"""
import pytest
import torch

import tiny
import unipeft as up
from unipeft.errors import UnipeftError

# two configurations per method: "a" and "b" differ (values; lengths for prompt and prefix)
ROUTABLE = {
    "lora": (lambda: up.LoRA(r=4, alpha=8), lambda: up.LoRA(r=2, alpha=4, targets="all-linear")),
    "lora_range": (lambda: up.LoRA(r=(1, 6), alpha=4, seed=1),
                   lambda: up.LoRA(r=(2, 3), alpha=4, seed=2, targets="all-linear")),
    "dylora": (lambda: up.DyLoRA(r=4, alpha=8), lambda: up.DyLoRA(r=6, alpha=6, rank=3, targets="all-linear")),
    "adalora": (lambda: up.AdaLoRA(init_r=4, target_r=2), lambda: up.AdaLoRA(init_r=3, target_r=3, targets="all-linear")),
    "ia3": (lambda: up.IA3(), lambda: up.IA3()),
    "houlsby": (lambda: up.Adapter(style="houlsby", bottleneck=8), lambda: up.Adapter(style="houlsby", bottleneck=4)),
    "pfeiffer": (lambda: up.Adapter(style="pfeiffer", bottleneck=8), lambda: up.Adapter(style="pfeiffer", bottleneck=4)),
    "parallel": (lambda: up.Adapter(style="parallel", bottleneck=8, locations=("attention", "ffn")),
                 lambda: up.Adapter(style="parallel", bottleneck=4)),
    "scaled_parallel": (lambda: up.Adapter(style="scaled_parallel", bottleneck=8, scale=2.0),
                        lambda: up.Adapter(style="scaled_parallel", bottleneck=8, scale=4.0)),
    "compacter": (lambda: up.Compacter(n=4, bottleneck=8), lambda: up.Compacter(n=2, bottleneck=4, rank=2)),
    "compacter_plus": (lambda: up.Compacter(n=4, bottleneck=8, plus=True), lambda: up.Compacter(n=4, bottleneck=4)),
    "adapter_bias": (lambda: up.AdapterBias(), lambda: up.AdapterBias(locations="ffn")),
    "intrinsic": (lambda: up.Intrinsic(d=64), lambda: up.Intrinsic(d=48, projection="sparse", said=True, seed=3)),
    "adapter_drop": (lambda: up.AdapterDrop(n=1, bottleneck=8), lambda: up.AdapterDrop(n=0, robust=True, bottleneck=4)),
    "p_tuning": (lambda: up.PTuning(length=3, encoder="mlp", hidden=8), lambda: up.PTuning(length=2)),
    "p_tuning_v2": (lambda: up.PTuning(version=2, length=3), lambda: up.PTuning(version=2, length=5)),
    "pasta": (lambda: up.PASTA(tokens=[13, 59, 42, 17, 40, 16, 86, 21]), lambda: up.PASTA(tokens=[5, 4], occurrences=2)),
    "adamix": (lambda: up.AdaMix(experts=3, bottleneck=8), lambda: up.AdaMix(experts=2, bottleneck=4, locations="ffn")),
    "compose_layers": (lambda: up.Compose([up.LoRA(r=2, layers="0"), up.Adapter(bottleneck=4, layers="1")]),
                       lambda: up.Compose([up.Adapter(bottleneck=8, layers="0"), up.IA3(layers="1")])),
    "mam": (lambda: up.MAM(prefix_length=3, reparam_hidden=16, bottleneck=8),
            lambda: up.MAM(prefix_length=2, reparam_hidden=0, bottleneck=4, scale=2.0)),
    "unipelt": (lambda: up.UniPELT(bottleneck=8, prefix_length=3, reparam_hidden=16, r=2),
                lambda: up.UniPELT(components=("adapter", "lora"), bottleneck=4, r=4)),
    "compose": (lambda: up.Compose([up.LoRA(r=2, targets="all-linear"), up.Adapter(style="parallel", bottleneck=4)]),
                lambda: up.Compose([up.PrefixTuning(length=2, reparam_hidden=0), up.IA3()])),
    "prompt": (lambda: up.PromptTuning(length=4, init="random"), lambda: up.PromptTuning(length=2, init="random")),
    "prefix": (lambda: up.PrefixTuning(length=3, reparam_hidden=16), lambda: up.PrefixTuning(length=5, reparam_hidden=0)),
    "bitfit": (lambda: up.BitFit(), lambda: up.BitFit(targets=("ffn_in", "ffn_out"))),
    # LoRA on a quantized base: the first attach quantizes the linear maps, the second reuses them
    "qlora": (lambda: up.QLoRA(bits=4, r=4, alpha=8), lambda: up.QLoRA(bits=4, r=2, alpha=4, targets="all-linear")),
    "qlora_2bit": (lambda: up.QLoRA(bits=2, r=4, alpha=8), lambda: up.QLoRA(bits=2, r=2, targets="all-linear")),
}
GRID = [(f, m) for f in tiny.FAMILIES for m in ROUTABLE]
ATOL = 1e-5
# the tiny random T5 amplifies float rounding (no 1/sqrt(d) in its attention): a routed LoRA batch
# differs from the rows alone by up to 8e-5 in float32 and by 5e-15 in float64, i.e. order of summation
FAMILY_ATOL = {"t5": 1e-4}


def scramble(model, name, seed):
    """Move delta ``name`` well away from its initial values (its own parameters and, for
    selective methods, the base parameters it trains in place)."""
    reg = up.engine.registry(model)
    delta = reg.deltas[name]
    g = torch.Generator().manual_seed(seed)
    up.activate(model, [name])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in delta.parameters() + [params[n] for n in delta.selected]:
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def with_deltas(family, configs: dict, head=None):
    model = tiny.make(family, head)
    for i, (name, cfg) in enumerate(configs.items()):
        up.attach(model, cfg, name=name)
        scramble(model, name, seed=10 + i)
    up.activate(model, [])
    return model.eval()


def rows_of(batch, i):
    return {k: v[i:i + 1] for k, v in batch.items()}


def alone(model, batch, names):
    """Each row run alone with its delta active (None: no delta)."""
    outs = []
    saved = up.active(model)
    for i, name in enumerate(names):
        up.activate(model, [] if name is None else [name])
        with torch.no_grad():
            outs.append(tiny.logits(model, rows_of(batch, i)))
    up.activate(model, saved)
    return torch.cat(outs)


def four_rows(family, head=None):
    """Two tiny batches stacked: 4 rows, one of them right-padded."""
    a, b = tiny.batch(family, head, seed=1), tiny.batch(family, head, seed=2)
    return {k: torch.cat([a[k], b[k]]) for k in a}


@pytest.mark.parametrize("family,method", GRID)
def test_routed_batch_equals_each_row_alone(family, method):
    make_a, make_b = ROUTABLE[method]
    model = with_deltas(family, {"a": make_a(), "b": make_b()})
    batch = four_rows(family)
    names = ["a", "b", None, "a"]
    expected = alone(model, batch, names)
    up.activate(model, ["b"])
    with torch.no_grad():
        active_before = tiny.logits(model, batch)
    with up.route(model, names):
        with torch.no_grad():
            got = tiny.logits(model, batch)
    torch.testing.assert_close(got, expected, atol=FAMILY_ATOL.get(family, ATOL), rtol=1e-4)
    with torch.no_grad():  # after the block: the active delta again, bit for bit
        torch.testing.assert_close(tiny.logits(model, batch), active_before, atol=0, rtol=0)
    # the deltas really differ from each other and from the base on these rows
    assert (expected[0] - alone(model, batch, [None, "b", None, "a"])[0]).abs().max() > 1e-3


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("method", ["lora", "lora_range", "dylora", "adalora"])
def test_lora_routing_with_autograd_gives_each_row_its_result_and_gradients(family, method):
    """LoRA's gathered per-row factors, with and without autograd, give each row its result alone,
    and the routed rows' gradients reach each delta as its rows alone would."""
    make_a, make_b = ROUTABLE[method]
    model = with_deltas(family, {"a": make_a(), "b": make_b()})
    batch = four_rows(family)
    names = ["a", "b", None, "a"]
    expected = alone(model, batch, names)
    with up.route(model, names):
        with torch.no_grad():
            got = tiny.logits(model, batch)
        grad_got = tiny.logits(model, batch)
    atol = FAMILY_ATOL.get(family, ATOL)
    torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4)
    torch.testing.assert_close(grad_got.detach(), expected, atol=atol, rtol=1e-4)
    # gradients: the routed batch's loss reaches delta b only through row 1, as row 1 alone does
    # (in float64: float32 rounding, amplified by the tiny random T5 and BART, moves them by up to 2e-3)
    model.double()
    params = list(up.engine.registry(model).deltas["b"].parameters())
    for p in params:
        p.requires_grad_(True)
    with up.route(model, names):
        routed = torch.autograd.grad(tiny.logits(model, batch)[1].sum(), params, allow_unused=True)
    up.activate(model, ["b"])
    solo = torch.autograd.grad(tiny.logits(model, rows_of(batch, 1)).sum(), params, allow_unused=True)
    for r, s in zip(routed, solo):
        if s is None:
            assert r is None or r.abs().max() == 0
        else:
            torch.testing.assert_close(r, s, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_mixed_methods_in_one_batch(family):
    configs = {"lora": up.LoRA(r=4, alpha=8), "prompt": up.PromptTuning(length=3, init="random"),
               "ia3": up.IA3(), "prefix": up.PrefixTuning(length=2, reparam_hidden=0),
               "adapter": up.Adapter(style="parallel", bottleneck=4)}
    configs["bitfit"] = up.BitFit()  # bias-free families: new zero biases (BiasDelta)
    # a gated prefix (one gate per query) beside the ungated one: the routed rows of the prefix get gates of 1
    configs["unipelt"] = up.UniPELT(components=("prefix",), prefix_length=3, reparam_hidden=0)
    model = with_deltas(family, configs)
    names = ["lora", "prompt", "ia3", None, "prefix", "adapter", "bitfit", "unipelt"]
    batch = {k: torch.cat([v] * 4)[:len(names)] for k, v in four_rows(family).items()}
    expected = alone(model, batch, names)
    with up.route(model, names), torch.no_grad():
        got = tiny.logits(model, batch)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


def test_classifier_heads_route_with_their_deltas():
    """Each delta owns its task head: routed rows get their own classifier."""
    model = with_deltas("bert", {"a": up.LoRA(r=4), "b": up.PromptTuning(length=2, init="random")}, head="cls")
    batch = four_rows("bert", "cls")
    names = ["b", "a", "a", None]
    expected = alone(model, batch, names)
    with up.route(model, names), torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


# ---------------------------------------------------------------------------
# generation with the KV cache
# ---------------------------------------------------------------------------

GEN_GRID = [(f, m) for f in ("gpt2", "llama", "t5", "bart") for m in ROUTABLE]


def gen_alone(model, inputs, names, **kw):
    outs = []
    for i, name in enumerate(names):
        up.activate(model, [] if name is None else [name])
        with torch.no_grad():
            outs.append(model.generate(**rows_of(inputs, i), **kw))
    up.activate(model, [])
    return outs


@pytest.mark.parametrize("family,method", GEN_GRID)
@pytest.mark.parametrize("beams", [1, 3])
def test_routed_generate_gives_each_row_its_own_tokens(family, method, beams):
    make_a, make_b = ROUTABLE[method]
    model = with_deltas(family, {"a": make_a(), "b": make_b()})
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, tiny.VOCAB, (3, 5), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    names = ["a", None, "b"]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=beams, pad_token_id=0)
    expected = gen_alone(model, inputs, names, **kw)
    with up.route(model, names), torch.no_grad():
        got = model.generate(**inputs, **kw)
    for i in range(len(names)):
        assert got[i].tolist() == expected[i][0].tolist(), f"row {i} ({names[i]})"


@pytest.mark.parametrize("method", ["prompt", "prefix", "lora"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_routed_generate_with_left_padding(family, method):
    """Decoder-only batches are left-padded for generation; each row alone keeps its padding."""
    make_a, make_b = ROUTABLE[method]
    model = with_deltas(family, {"a": make_a(), "b": make_b()})
    ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25], [0, 31, 32, 33, 34]])
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    names = ["b", "a", None]
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = gen_alone(model, inputs, names, **kw)
    with up.route(model, names), torch.no_grad():
        got = model.generate(**inputs, **kw)
    for i in range(len(names)):
        assert got[i].tolist() == expected[i][0].tolist(), f"row {i} ({names[i]})"


# ---------------------------------------------------------------------------
# the model after the block, training, and errors
# ---------------------------------------------------------------------------

def test_model_is_unchanged_after_the_block_even_when_the_forward_raises():
    model = with_deltas("gpt2", {"a": up.LoRA(r=4), "b": up.PromptTuning(length=2, init="random"),
                                 "c": up.BitFit()})
    up.activate(model, ["a", "c"])
    batch = tiny.batch("gpt2")
    with torch.no_grad():
        before = tiny.logits(model, batch)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(UnipeftError, match="2 names but the model ran a batch of 3"):
        with up.route(model, ["b", "c"]), torch.no_grad():
            tiny.logits(model, {k: torch.cat([v, v[:1]]) for k, v in batch.items()})
    with pytest.raises(ZeroDivisionError):
        with up.route(model, ["b", None]):
            1 / 0
    assert up.active(model) == ["a", "c"]
    with torch.no_grad():
        torch.testing.assert_close(tiny.logits(model, batch), before, atol=0, rtol=0)
    for n, p in model.named_parameters():
        assert torch.equal(p, state[n]), n
        assert p.requires_grad == grads[n], n


def test_a_routed_batch_trains_each_delta_on_its_own_rows():
    model = with_deltas("llama", {"a": up.LoRA(r=4), "b": up.PromptTuning(length=2, init="random"),
                                  "c": up.IA3()})
    batch = four_rows("llama")
    model.train()
    with up.route(model, ["a", "b", "a", None]):
        tiny.logits(model, batch)[:, :, :].pow(2).mean().backward()
    reg = up.engine.registry(model)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n in ("a", "b") for p in reg.deltas[n].parameters())
    assert all(p.grad is None for p in reg.deltas["c"].parameters())  # routed to no row


def test_errors_name_the_problem_and_the_choices():
    model = with_deltas("gpt2", {"a": up.LoRA(r=4), "f": up.Freeze(train_last=1)})
    with pytest.raises(UnipeftError, match=r"no delta named 'x'; attached deltas: 'a' or 'f'"):
        with up.route(model, ["a", "x"]):
            pass
    with pytest.raises(UnipeftError, match=r"'f' \(freeze\) changes the base model's own weights.*Methods that route: .*lora"):
        with up.route(model, ["f", "a"]):
            pass
    with pytest.raises(UnipeftError, match="non-empty list"):
        with up.route(model, "a"):
            pass
    up.activate(model, ["a"])
    up.merge(model, "a")
    with pytest.raises(UnipeftError, match=r"merged.*up.unmerge\(model, 'a'\)"):
        with up.route(model, ["a", None]):
            pass
    up.unmerge(model, "a")
    with up.route(model, ["a"]):
        with pytest.raises(UnipeftError, match="do not nest"):
            with up.route(model, ["a"]):
                pass
    with pytest.raises(UnipeftError, match="no deltas attached"):
        with up.route(tiny.make("gpt2"), ["a"]):
            pass
