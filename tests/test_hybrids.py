"""Compositions: up.Compose, the MAM adapter and UniPELT are the existing methods on one delta."""
import json

import pytest
import torch

import tiny
import unipeft as up
from unipeft.methods.adapter import AdapterDelta
from unipeft.methods.compose import Stacked
from unipeft.methods.lora import LoRADelta
from unipeft.methods.prefix_tuning import Prefix
from unipeft.methods.unipelt import Gated, GatedPrefix, gate_values, record_gates


def delta_record(model, name="t"):
    return up.engine.registry(model).deltas[name]


def scramble(model, name, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta_record(model, name).parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def run(model, x):
    with torch.no_grad():
        return tiny.logits(model, x)


def copy_into(model, source: dict, name):
    """Copy tensors (by their names in delta_tensors) into delta ``name``."""
    up.storage._load_tensors(model, delta_record(model, name), source)


@pytest.mark.parametrize("family", ["bert", "gpt2", "bart"])
def test_mam_is_prefix_tuning_plus_a_scaled_parallel_ffn_adapter(family):
    """MAM's output equals a prefix-tuning delta and a scaled parallel adapter delta active together,
    with the same weights: a composition of the two methods, not a copy."""
    model, x = tiny.make(family), tiny.batch(family)
    up.attach(model, up.MAM(prefix_length=3, reparam_hidden=0, bottleneck=8, scale=2.0, train_head=False), name="t")
    scramble(model, "t")
    mam = run(model, x)
    record = delta_record(model)
    assert isinstance(record.module["0"], Prefix)
    assert len(record.attention) == len(up.engine.registry(model).map.attention)
    adapters = [d for d in record.linear.values() if isinstance(d, AdapterDelta)]
    assert adapters and all(a.parallel and a.scale == 2.0 for a in adapters)
    roles = up.engine.registry(model).map.roles
    assert all("ffn_out" in roles[p] for p, d in record.linear.items() if isinstance(d, AdapterDelta))
    tensors = up.storage.delta_tensors(model, record)
    up.attach(model, up.PrefixTuning(length=3, reparam_hidden=0, train_head=False), name="p")
    copy_into(model, {"model:prefix": tensors["model:0.prefix"]}, "p")
    up.attach(model, up.Adapter(style="scaled_parallel", bottleneck=8, scale=2.0, train_head=False), name="a")
    copy_into(model, {k: v for k, v in tensors.items() if k.startswith("linear:")}, "a")
    up.activate(model, ["p", "a"])
    torch.testing.assert_close(run(model, x), mam, rtol=0, atol=1e-6)


def test_mam_saves_the_prefix_without_its_mlp(tmp_path):
    from safetensors.torch import load_file

    model, x = tiny.make("bert"), tiny.batch("bert")
    up.attach(model, up.MAM(prefix_length=3, reparam_hidden=16, bottleneck=8), name="t")
    scramble(model, "t")
    expected = run(model, x)
    up.save(model, tmp_path / "d", name="t")
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert meta["method"]["kind"] == "mam" and meta["method"]["options"]["reparam_hidden"] == 0
    tensors = load_file(str(tmp_path / "d" / "delta.safetensors"))
    assert {k for k in tensors if k.startswith("model:")} == {"model:0.prefix"}
    fresh = tiny.make("bert")
    up.load(fresh, tmp_path / "d")
    torch.testing.assert_close(run(fresh, x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
def test_unipelt_gates_scale_each_submodule(family):
    """Closed gates (sigmoid -> 0) give the base; open gates (-> 1) give the ungated adapter + LoRA."""
    model, x = tiny.make(family), tiny.batch(family)
    base = run(model, x)
    up.attach(model, up.UniPELT(components=("adapter", "lora"), bottleneck=8, r=2, train_head=False), name="t")
    scramble(model, "t")
    record = delta_record(model)
    gates = [d for d in record.linear.values() if isinstance(d, Gated)]
    assert {type(g.inner) for g in gates} == {AdapterDelta, LoRADelta}
    with torch.no_grad():
        for g in gates:
            g.gate.weight.zero_()
            g.gate.bias.fill_(-1e4)
    torch.testing.assert_close(run(model, x), base, rtol=0, atol=1e-6)
    with torch.no_grad():
        for g in gates:
            g.gate.bias.fill_(1e4)
    opened = run(model, x)
    # the same adapters and LoRA factors, ungated, as two deltas active together
    up.attach(model, up.Adapter(style="pfeiffer", bottleneck=8, train_head=False), name="a")
    up.attach(model, up.LoRA(r=2, alpha=16.0, targets=("q", "v"), train_head=False), name="l")
    with torch.no_grad():
        for path, g in record.linear.items():
            other = delta_record(model, "a" if isinstance(g.inner, AdapterDelta) else "l").linear[path]
            other.load_state_dict(g.inner.state_dict())
    up.activate(model, ["a", "l"])
    torch.testing.assert_close(run(model, x), opened, rtol=1e-5, atol=1e-5)


def test_unipelt_prefix_gate_is_per_token_and_recorded():
    model, x = tiny.make("bert"), tiny.batch("bert")
    up.attach(model, up.UniPELT(components=("prefix",), prefix_length=3, reparam_hidden=0), name="t")
    record = delta_record(model)
    sources = list(record.attention.values())
    assert sources and all(isinstance(s, GatedPrefix) for s in sources)
    record_gates(model, "t")
    run(model, x)
    values = gate_values(model, "t")
    assert len(values) == len(sources) and all(0 < v < 1 for v in values.values())
    assert sources[0].query_gate().shape == x["input_ids"].shape  # one gate per row and token
    record_gates(model, "t", on=False)
    assert gate_values(model, "t") == {}


def _unipelt_prefix_and_plain_prefix(family, attn=None):
    """UniPELT's gated prefix ("t") and a PrefixTuning delta ("p") with the same P on one model."""
    model = tiny.make(family, attn=attn)
    up.attach(model, up.UniPELT(components=("prefix",), prefix_length=3, reparam_hidden=0, train_head=False),
              name="t")
    scramble(model, "t")
    prefix = up.storage.delta_tensors(model, delta_record(model))["model:0.prefix"]
    up.attach(model, up.PrefixTuning(length=3, reparam_hidden=0, train_head=False), name="p")
    return model, prefix


@pytest.mark.parametrize("family,attn", [("bert", "eager"), ("bert", "sdpa"), ("gpt2", "eager"), ("llama", "sdpa"),
                                         ("t5", None), ("bart", "sdpa")])
def test_unipelt_constant_prefix_gate_is_the_prefix_scaled_by_it(family, attn):
    """With every token's gate at g, each query sees g P_K and g P_V: the plain prefix with P scaled by g
    (checks the widened-head computation against the paper's form, including each family's attention scale)."""
    model, prefix = _unipelt_prefix_and_plain_prefix(family, attn)
    x = tiny.batch(family)
    for bias, g in ((1e4, 1.0), (0.0, 0.5), (-1.0, torch.sigmoid(torch.tensor(-1.0)).item())):
        with torch.no_grad():
            for tap in delta_record(model).attention.values():
                tap.tap.gate.weight.zero_()
                tap.tap.gate.bias.fill_(bias)
        up.activate(model, "t")
        gated = run(model, x)
        copy_into(model, {"model:prefix": prefix * g}, "p")
        up.activate(model, "p")
        torch.testing.assert_close(gated, run(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "bart"])
def test_unipelt_prefix_gate_reads_no_padding_and_no_later_token(family):
    """Per-token gates: a row alone gives its rows of a padded batch, and in a decoder an earlier
    position does not change when a later token does (a sequence-mean gate did both, before 2026-12-03)."""
    model = tiny.make(family)
    up.attach(model, up.UniPELT(prefix_length=3, reparam_hidden=16, bottleneck=8, r=2), name="t")
    scramble(model, "t")
    x = tiny.batch(family)  # row 1 is right-padded by 2
    full = run(model, x)
    alone = run(model, {k: v[1:, :5] if k != "decoder_input_ids" else v[1:] for k, v in x.items()})
    if family in ("bert", "bart"):  # logits of the label / of the decoder's tokens
        torch.testing.assert_close(full[1], alone[0], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(full[1, :5], alone[0], rtol=1e-5, atol=1e-5)
        changed = {k: v.clone() for k, v in x.items()}
        changed["input_ids"][0, 5] = 7
        torch.testing.assert_close(run(model, changed)[0, :5], full[0, :5], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_unipelt_cached_generation_equals_recomputing_the_sequence(family):
    model = tiny.make(family)
    up.attach(model, up.UniPELT(prefix_length=3, reparam_hidden=16, bottleneck=8, r=2), name="t")
    scramble(model, "t")
    x = tiny.batch(family)
    kw = dict(attention_mask=x["attention_mask"], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(x["input_ids"], use_cache=True, **kw)
        recomputed = model.generate(x["input_ids"], use_cache=False, **kw)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_unipelt_all_three_save_and_load(tmp_path):
    model, x = tiny.make("gpt2"), tiny.batch("gpt2")
    up.attach(model, up.UniPELT(bottleneck=8, prefix_length=3, reparam_hidden=16, r=2), name="t")
    scramble(model, "t")
    expected = run(model, x)
    # on GPT-2 q and v are one map (c_attn): gated LoRA and the prefix gate's tap share it
    assert any(isinstance(d, Stacked) for d in delta_record(model).linear.values())
    up.save(model, tmp_path / "d", name="t")
    fresh = tiny.make("gpt2")
    up.load(fresh, tmp_path / "d")
    torch.testing.assert_close(run(fresh, x), expected, rtol=0, atol=1e-6)


def test_compose_stacks_parts_that_meet_at_one_map_and_equals_them_side_by_side(tmp_path):
    model, x = tiny.make("llama"), tiny.batch("llama")
    parts = [up.LoRA(r=2, targets="all-linear", train_head=False), up.Adapter(style="parallel", bottleneck=4,
                                                                           train_head=False)]
    up.attach(model, up.Compose(parts), name="t")
    scramble(model, "t")
    composed = run(model, x)
    record = delta_record(model)
    stacked = [d for d in record.linear.values() if isinstance(d, Stacked)]
    kinds = sorted(sorted(type(p).__name__ for p in s.parts) for s in stacked)
    assert kinds == [["AdapterDelta", "LoRADelta"]] * 2 + [["InputTap", "LoRADelta"]] * 2  # ffn_out, ffn_in x 2 layers
    # the same weights as two deltas, both active
    up.attach(model, parts[0], name="l")
    up.attach(model, parts[1], name="a")
    with torch.no_grad():
        for path, d in record.linear.items():
            for p in (d.parts if isinstance(d, Stacked) else [d]):
                target = delta_record(model, "l" if isinstance(p, LoRADelta) else "a").linear[path]
                target.load_state_dict(p.state_dict())
    up.activate(model, ["l", "a"])
    torch.testing.assert_close(run(model, x), composed, rtol=0, atol=1e-6)
    # saved as one directory whose config names its parts
    up.save(model, tmp_path / "d", name="t")
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert [p["kind"] for p in meta["method"]["options"]["methods"]] == ["lora", "adapter"]
    fresh = tiny.make("llama")
    up.load(fresh, tmp_path / "d")
    assert torch.equal(run(fresh, x), composed)


def test_compose_keeps_what_a_part_resolved_at_install():
    model = tiny.make("bert")
    up.attach(model, up.Compose([up.PASTA(tokens=["[SEP]"]), up.BitFit()]), name="t", tokenizer=tiny.tokenizer("bert"))
    assert up.deltas(model)["t"].methods[0].tokens == (3,)


def test_two_parts_at_one_attention_are_refused_and_leave_the_model_unchanged():
    model = tiny.make("bert")
    with pytest.raises(up.UnipeftError, match=r"two parts \('prefix_tuning' or 'p_tuning'\) put a delta at the "
                                             r"attention of 'bert.encoder.layer.0.attention.self'"):
        up.attach(model, up.Compose([up.PrefixTuning(length=2), up.PTuning(version=2, length=2)]), name="t")
    assert up.engine.registry(model) is None


@pytest.mark.parametrize("make,message", [
    (lambda: up.Compose([]), r"Compose: methods is empty"),
    (lambda: up.Compose(["lora"]), r"every part must be a method config such as up.LoRA\(\.\.\.\), got str"),
    (lambda: up.MAM(bottleneck=0), r"MAM: bottleneck must be an integer >= 1"),
    (lambda: up.MAM(scale=0), r"MAM: scale must be > 0"),
    (lambda: up.UniPELT(components=("adapter", "bitfit")), r"components must be 'adapter', 'prefix' or 'lora'"),
    (lambda: up.UniPELT(components=()), r"components is empty"),
    (lambda: up.UniPELT(rank=8), r"unknown option 'rank'; valid options: 'components'"),
])
def test_bad_options_are_one_line_errors(make, message):
    with pytest.raises(up.UnipeftError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


def test_a_gated_prefix_keeps_the_attention_scale_when_the_base_defaults_it():
    """The widened head dimension must not change the softmax scale: with no ``scaling`` keyword the base
    implementation (sdpa) takes 1/sqrt(head dim) from the query's width, so the gated call compensates."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from unipeft.positions.attention import _gated_attention

    sdpa_attention_forward = ALL_ATTENTION_FUNCTIONS["sdpa"]

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    pk, pv = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 4, 3, 8, generator=g)
    gate = torch.rand(2, 5, generator=g)
    module = torch.nn.Module()
    module.is_causal = False
    default = _gated_attention(sdpa_attention_forward, module, q, k, v, None, {}, (pk,), (pv,), (gate,))[0]
    given = _gated_attention(sdpa_attention_forward, module, q, k, v, None, {"scaling": 8 ** -0.5}, (pk,), (pv,),
                             (gate,))[0]
    torch.testing.assert_close(default, given)
    # and the reference: each query with its own gated prefix, by hand
    for t in range(5):
        g_t = gate[:, None, t, None, None]
        gk, gv = torch.cat([pk * g_t, k], 2), torch.cat([pv * g_t, v], 2)
        w = torch.softmax(q[:, :, t:t + 1] @ gk.transpose(-1, -2) * 8 ** -0.5, dim=-1)
        torch.testing.assert_close(given[:, t], (w @ gv)[:, :, 0], rtol=1e-5, atol=1e-6)
