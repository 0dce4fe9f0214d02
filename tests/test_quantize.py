"""Quantized bases (up.quantize, up.QLoRA; unipeft.quantization): 4-bit NF4 and 8-bit through
bitsandbytes, 2-bit through the project's packed format.

Checked here: the packed 2-bit format (4 codes a byte, scale and zero point per group, its error
against plain min-max rounding and NF4), that its autograd function keeps nothing for the backward
but the packed tensors, that every linear map of the blocks (never the head or the embeddings) is
swapped, that LoRA on a quantized base computes exactly what LoRA on the dequantised float weights
computes (outputs and gradients, fused switch on or off), that other methods using linear sites
(IA3, adapters, BitFit) train on it with the packed base untouched, that merge gives dequantised
merged maps and says so, that deltas move between quantized and float bases, the contract on every
family, bf16 bases, gradient checkpointing, and that bad input is one line with the model unchanged.
(up.QLoRA itself, BitsAndBytesConfig models, the CLI and peft: tests/test_qlora.py.)
"""
import logging
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import tiny
import unipeft as up
from unipeft import fused
from unipeft.architectures import map_model
from unipeft.compat import enable_activation_checkpointing
from unipeft.errors import UnipeftError
from unipeft.positions import LinearSite
from unipeft.quantization import dequantize, quantized_modules
from unipeft.quantization.packed2bit import Dequantized2bitMatmul, Packed2bitLinear, dequantize_2bit, quantize_2bit
from unipeft.targets import resolve

bnb = pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # LLM.int8() logs its fp16 cast on every call

BITS = (2, 4, 8)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "unipeft_" not in k}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def float_copy(model):
    """The model with every quantized map replaced by an nn.Linear holding its dequantised weight:
    the reference a quantized base must compute exactly."""
    import copy

    ref = copy.deepcopy(model)
    for path in quantized_modules(ref):
        q = ref.get_submodule(path)
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        lin.weight.data = dequantize(q).float()
        if q.bias is not None:
            lin.bias.data = q.bias.detach().float().clone()
        parent, _, child = path.rpartition(".")
        setattr(ref.get_submodule(parent), child, lin)
    return ref


def run(model, x):
    with torch.no_grad():  # as the grid compares (attention kernels differ with autograd on)
        return tiny.logits(model, x)


def rel_error(w, w_hat):
    return ((w - w_hat).norm() / w.norm()).item()


# ---------------------------------------------------------------------------
# the packed 2-bit format
# ---------------------------------------------------------------------------

def test_packed_2bit_layout_and_error():
    torch.manual_seed(0)
    w = torch.randn(48, 200)  # 200 inputs: 4 groups of 64, the last padded
    packed, scale, zero = quantize_2bit(w, 64)
    assert packed.dtype == torch.int8 and packed.shape == (48, 256 // 4)  # four codes a byte
    assert scale.shape == zero.shape == (48, 4) and scale.dtype == torch.float16
    w_hat = dequantize_2bit(packed, scale, zero, 200)
    assert w_hat.shape == w.shape
    # byte layout: weight 4j + k in bits 2k, 2k+1 of byte j
    codes = (packed.view(torch.uint8).unsqueeze(-1) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)) & 3
    by_hand = (codes.view(48, 4, 64).float() - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    assert torch.equal(w_hat, by_hand.view(48, 256)[:, :200])
    # every weight is one of the four levels of its group
    g0 = (w_hat[:, :64] / scale[:, :1].float() + zero[:, :1].float())
    torch.testing.assert_close(g0, g0.round(), atol=1e-3, rtol=0)
    assert g0.round().min() >= 0 and g0.round().max() <= 3
    # the clipping search beats plain min-max rounding, and 2 bits lose more than NF4
    lo, hi = w[:, :192].view(48, 3, 64).aminmax(dim=-1)
    s = ((hi - lo) / 3).unsqueeze(-1)
    plain = ((w[:, :192].view(48, 3, 64) - lo.unsqueeze(-1)) / s).round().clamp(0, 3) * s + lo.unsqueeze(-1)
    err2 = rel_error(w[:, :192], w_hat[:, :192])
    assert err2 < rel_error(w[:, :192], plain.view(48, 192))
    nf4 = bnb.functional.dequantize_4bit(*bnb.functional.quantize_4bit(w[:, :192].contiguous(), quant_type="nf4"))
    assert rel_error(w[:, :192], nf4) < err2 < 0.5


def test_packed_2bit_matmul_gradients_and_nothing_kept_for_backward():
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    q = Packed2bitLinear.from_weight(lin.weight, lin.bias, group_size=32)
    q.bias.requires_grad_(True)
    w = q.dequantize()
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    # only the packed codes, scales and zero points: no float copy of W, no copy of x
    assert sorted(t.data_ptr() for t in saved) == sorted(t.data_ptr() for t in (q.weight, q.scale, q.zero))
    g = torch.randn_like(y)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    b2 = q.bias.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, w, b2)
    y2.backward(g)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(q.bias.grad, b2.grad)
    assert not q.weight.requires_grad and q.weight.grad is None
    # under bf16 autocast the product runs in bf16, the input gradient comes back in x's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = Dequantized2bitMatmul.apply(x, q.weight, q.scale, q.zero, q.bias, 64)
    assert yb.dtype == torch.bfloat16
    x.grad = None
    yb.float().sum().backward()
    assert x.grad.dtype == torch.float32
    # the output may be changed in place, as a plain linear map's may
    x.grad = None
    y = q(x)
    torch.relu_(y).sum().backward()
    x3 = x.detach().clone().requires_grad_(True)
    torch.relu_(torch.nn.functional.linear(x3, w, q.bias.detach())).sum().backward()
    torch.testing.assert_close(x.grad, x3.grad)


@pytest.mark.parametrize("in_features", [32, 40, 48, 64, 96])
def test_4bit_maps_dequantise_what_was_quantized(in_features):
    """bitsandbytes' CPU kernel misreads rows that are not whole blocks: make_4bit picks blocks of 32 for
    such rows and refuses a map it would still misread, never a silently garbled weight."""
    from unipeft.quantization.bnb import make_4bit

    torch.manual_seed(0)
    w = torch.randn(64, in_features)
    try:
        q = make_4bit(w, None, torch.float32)
    except UnipeftError as e:
        assert f"misreads rows of {in_features} inputs" in str(e) and in_features % 32
        return
    assert rel_error(w, dequantize(q)) < 0.12  # NF4's error on a Gaussian: ~0.09
    x = torch.randn(3, in_features)
    torch.testing.assert_close(q(x), x @ dequantize(q).T)


# ---------------------------------------------------------------------------
# up.quantize
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "t5"])
@pytest.mark.parametrize("bits", BITS)
def test_quantize_swaps_the_linear_maps_of_the_blocks_only(family, bits):
    model, x = tiny.make(family), tiny.batch(family)
    float_out = tiny.logits(model, x).detach()
    linear = resolve(model, map_model(model), ("all-linear",), "t")
    head_and_embeddings = {n: p.detach().clone() for n, p in model.named_parameters()
                           if not any(n.startswith(p_ + ".") for p_ in linear)}
    assert up.quantize(model, bits=bits) is model
    assert quantized_modules(model) == {p: bits for p in linear}
    kinds = {2: Packed2bitLinear, 4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}
    assert all(isinstance(model.get_submodule(p), kinds[bits]) for p in linear)
    for n, p in model.named_parameters():
        if n in head_and_embeddings:
            assert torch.equal(p, head_and_embeddings[n]), n
    out = tiny.logits(model, x).detach()
    # tiny random models: a loose sanity bound on the logits' relative error (8 < 4 < 2 bits)
    assert rel_error(float_out, out) < {2: 0.8, 4: 0.4, 8: 0.05}[bits]
    if bits != 8:  # LLM.int8() also rounds the activations; 2 and 4 bits compute exactly with W_deq
        torch.testing.assert_close(out, tiny.logits(float_copy(model), x).detach(), atol=1e-5, rtol=1e-4)


def test_quantize_targets_and_bytes_per_weight():
    model = tiny.make("llama")
    up.quantize(model, bits=2, targets=["q", "v"], group_size=32)
    assert sorted(quantized_modules(model)) == [f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qv"]
    q = model.model.layers[0].self_attn.q_proj
    stored = q.weight.numel() * 1 + (q.scale.numel() + q.zero.numel()) * 2
    assert stored / (q.in_features * q.out_features) == 0.25 + 4 / 32
    assert "bits=2, group_size=32" in repr(q)


# ---------------------------------------------------------------------------
# LoRA (and the other linear-site methods) on a quantized base
# ---------------------------------------------------------------------------

def _train_grads(model, x):
    model.zero_grad()
    loss = tiny.logits(model, x).float().pow(2).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_on_a_quantized_base_is_lora_on_the_dequantised_weights(family, bits):
    """Outputs and gradients equal those of the float model holding W_deq, with the fused switch on
    and off (a quantized site takes the plain path: the quantized module's own product)."""
    model, x = tiny.make(family), tiny.batch(family)
    up.quantize(model, bits=bits)
    ref = float_copy(model)
    for m in (model, ref):
        torch.manual_seed(3)
        up.attach(m, up.LoRA(r=4, targets="all-linear"), name="t")
        torch.manual_seed(4)
        for p in m.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.2)  # B != 0: the LoRA path and its gradients are all non-trivial
    for enabled in (True, False):
        fused.set_enabled(enabled)
        try:
            g, g_ref = _train_grads(model, x), _train_grads(ref, x)
        finally:
            fused.set_enabled(True)
        assert g.keys() == g_ref.keys() and len(g) == 2 * len(quantized_modules(model))
        for k in g:
            torch.testing.assert_close(g[k], g_ref[k], atol=1e-5, rtol=1e-4)
    # the site wraps the quantized module as it wraps nn.Linear
    site = model.get_submodule(next(iter(quantized_modules(model))))
    assert isinstance(site, LinearSite) and site._unipeft_quantized == bits


@pytest.mark.parametrize("bits", BITS)
def test_a_lora_site_on_a_quantized_map_keeps_no_float_weight_for_the_backward(bits):
    model = tiny.make("llama")
    up.quantize(model, bits=bits)
    up.attach(model, up.LoRA(r=4, targets=["q"]), name="t")
    site = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, site.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = site(x)
    weight_size = site.in_features * site.out_features
    assert saved and not [t for t in saved if t.is_floating_point() and t.numel() >= weight_size]
    y.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in site.unipeft_deltas["t"].parameters())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_the_contract_on_a_quantized_base(family, bits, tmp_path):
    """The grid's promises for LoRA on a quantized base of every family: exact identity at init,
    only the delta trains (the packed base bit-identical), save -> fresh quantized base -> load gives
    the same outputs, merge == unmerged, unmerge and detach exact."""
    model, x = up.quantize(tiny.make(family), bits=bits), tiny.batch(family)
    base_out, base = run(model, x), state(model)
    up.attach(model, up.LoRA(r=4, alpha=8), name="t")
    assert torch.equal(run(model, x), base_out)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".unipeft_deltas.t." in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        tiny.logits(model, x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert same_state(state(model), base)
    out = run(model, x)
    assert not torch.equal(out, base_out)
    up.save(model, tmp_path / "d", name="t")
    fresh = up.load(up.quantize(tiny.make(family), bits=bits), tmp_path / "d")
    assert torch.equal(run(fresh, x), out)
    with pytest.warns(UserWarning, match="dequantised"):
        up.merge(model, "t")
    tol = dict(atol=1e-5, rtol=1e-4) if bits != 8 else dict(atol=5e-2, rtol=0)  # LLM.int8() rounds activations
    torch.testing.assert_close(run(model, x), out, **tol)
    up.unmerge(model, "t")
    assert torch.equal(run(model, x), out)
    up.detach(model, "t")
    assert torch.equal(run(model, x), base_out) and same_state(state(model), base)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_qlora_on_a_bfloat16_base(family, bits):
    """The packed maps' inputs are bf16: the LoRA factors follow the model's float dtype."""
    model, x = tiny.make(family).to(torch.bfloat16), tiny.batch(family)
    up.attach(model, up.QLoRA(bits=bits, r=4), name="t")
    assert {p.dtype for p in up.engine.registry(model).deltas["t"].parameters()} == {torch.bfloat16}
    out = tiny.logits(model, x)
    out.float().pow(2).mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(p.grad is not None for p in up.engine.registry(model).deltas["t"].parameters())


@pytest.mark.parametrize("bits", BITS)
def test_qlora_under_gradient_checkpointing_gives_the_same_gradients(bits):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, x = tiny.make("llama"), tiny.batch("llama")
        up.attach(model, up.QLoRA(bits=bits, r=4), name="t")
        for p in up.engine.registry(model).deltas["t"].parameters():
            p.data.normal_(0, 0.2)
        model.train()
        if checkpointing:  # the packed product runs again in the backward: same numbers
            enable_activation_checkpointing(model, use_reentrant=False)
        tiny.logits(model, x).float().pow(2).mean().backward()
        grads.append([p.grad for p in up.engine.registry(model).deltas["t"].parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_lora_on_8bit_trains_and_the_base_stays_packed():
    model, x = tiny.make("llama"), tiny.batch("llama")
    up.quantize(model, bits=8)
    before = state(model)
    up.attach(model, up.LoRA(r=4), name="t")
    x_emb = model.get_input_embeddings()(x["input_ids"]).detach().requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(inputs_embeds=x_emb, attention_mask=x["attention_mask"]).logits.float().pow(2).mean()
        loss.backward()
        assert x_emb.grad is not None and x_emb.grad.abs().sum() > 0  # through the int8 weights to the input
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    up.detach(model, "t")
    assert same_state(state(model), before)


@pytest.mark.parametrize("method", ["ia3", "adapter", "bitfit"])
@pytest.mark.parametrize("bits", BITS)
def test_other_linear_site_methods_train_on_a_quantized_base(method, bits, tmp_path):
    make = {"ia3": lambda: up.IA3(), "adapter": lambda: up.Adapter(style="pfeiffer", bottleneck=8),
            "bitfit": lambda: up.BitFit()}[method]
    family = "bert"  # biases everywhere: BitFit trains the quantized maps' own (float) biases in place
    model, x = tiny.make(family), tiny.batch(family)
    up.quantize(model, bits=bits)
    packed = {n: p.clone() for n, p in model.named_parameters() if not p.is_floating_point()}
    base = state(model)
    up.attach(model, make(), name="t")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        tiny.logits(model, x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for n, p in model.named_parameters():
        if n in packed:
            assert torch.equal(p, packed[n]) and not p.requires_grad, n
    out = tiny.logits(model, x).detach()
    up.save(model, tmp_path / "d", name="t")
    fresh = tiny.make(family)
    up.quantize(fresh, bits=bits)
    up.load(fresh, tmp_path / "d")
    torch.testing.assert_close(tiny.logits(fresh, x).detach(), out)
    up.detach(model, "t")
    assert same_state(state(model), base)


def test_routing_two_lora_deltas_on_a_quantized_base():
    model, x = tiny.make("llama"), tiny.batch("llama")
    up.quantize(model, bits=4)
    for name in ("a", "b"):
        up.attach(model, up.LoRA(r=2), name=name)
        for p in up.engine.registry(model).deltas[name].parameters():
            p.data.normal_(0, 0.2)
    alone = {}
    for name in ("a", "b"):
        up.activate(model, [name])
        alone[name] = tiny.logits(model, x).detach()
    with torch.no_grad(), up.route(model, ["a", "b"]):
        routed = tiny.logits(model, x)
    torch.testing.assert_close(routed[0], alone["a"][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(routed[1], alone["b"][1], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------
# merge, and deltas between quantized and float bases
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
def test_merge_on_a_quantized_base_gives_dequantised_merged_maps(bits):
    model, x = tiny.make("llama"), tiny.batch("llama")
    up.quantize(model, bits=bits)
    base = state(model)
    up.attach(model, up.LoRA(r=4), name="t")
    for p in up.engine.registry(model).deltas["t"].parameters():
        p.data.normal_(0, 0.2)
    out = tiny.logits(model, x).detach()
    with pytest.warns(UserWarning, match=f"{bits}-bit quantized linear maps: each now computes with a dequantised"):
        up.merge(model, "t")
    site = model.model.layers[0].self_attn.q_proj
    delta = up.engine.registry(model).deltas["t"].linear["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(site.unipeft_weight_out_in(), dequantize(site) + delta.delta_weight().detach())
    merged = tiny.logits(model, x).detach()
    # 8 bits: the quantized map also rounds the activations (LLM.int8()); the merged float map does not
    tol = dict(atol=1e-5, rtol=1e-4) if bits != 8 else dict(atol=2e-2, rtol=0)
    torch.testing.assert_close(merged, out, **tol)
    assert same_state(state(model), base)  # the packed weights are kept as they are
    up.unmerge(model, "t")
    assert site.unipeft_dense is None
    torch.testing.assert_close(tiny.logits(model, x).detach(), out)
    with pytest.warns(UserWarning):
        up.merge(model, "t")
    up.detach(model, "t")  # detach unmerges first
    assert same_state(state(model), base) and quantized_modules(model)
    # the merged weight is a (non-persistent) buffer: it follows the model's .to() and stays out of the state dict
    up.attach(model, up.LoRA(r=4), name="u")
    with pytest.warns(UserWarning):
        up.merge(model, "u")
    assert "model.layers.0.self_attn.q_proj.unipeft_dense" not in model.state_dict()
    model.to(torch.float64)
    assert model.model.layers[0].self_attn.q_proj.unipeft_dense.dtype == torch.float64
    assert run(model, x).dtype == torch.float64


@pytest.mark.parametrize("bits", BITS)
def test_a_delta_moves_between_the_quantized_and_the_float_base(bits, tmp_path):
    family = "gpt2"  # Conv1D: (in, out) float weights against (out, in) quantized ones
    x = tiny.batch(family)
    q = up.quantize(tiny.make(family), bits=bits)
    up.attach(q, up.LoRA(r=4), name="t")
    for p in up.engine.registry(q).deltas["t"].parameters():
        p.data.normal_(0, 0.2)
    up.save(q, tmp_path / "from_q", name="t")
    f = up.load(tiny.make(family), tmp_path / "from_q")  # accepted by the float base
    assert up.storage.read_meta(tmp_path / "from_q")["base"]["quantized"] == [bits]
    state_q = up.storage.delta_tensors(q, up.engine.registry(q).deltas["t"])
    state_f = up.storage.delta_tensors(f, up.engine.registry(f).deltas["t"])
    assert all(torch.equal(state_q[k], state_f[k]) for k in state_q)
    up.save(f, tmp_path / "from_f", name="t")
    q2 = up.load(up.quantize(tiny.make(family), bits=bits), tmp_path / "from_f")  # and the reverse
    torch.testing.assert_close(tiny.logits(q2, x).detach(), tiny.logits(q, x).detach())
    # another base (other weights) is still refused, quantized or not
    with pytest.raises(UnipeftError, match="different base model"):
        up.load(up.quantize(tiny.make(family, seed=5), bits=bits), tmp_path / "from_f")
    with pytest.raises(UnipeftError, match="different base model"):
        up.load(tiny.make(family, seed=5), tmp_path / "from_q")


@pytest.mark.parametrize("bits", BITS)
def test_a_delta_from_a_base_quantized_at_bfloat16_loads_onto_the_float32_original(bits, tmp_path):
    """A QLoRA base made from bfloat16 weights keeps its other tensors in bfloat16: the loose fingerprint
    rounded to bfloat16 matches the float32 original (and its bfloat16 copy), not another base."""
    q = up.quantize(tiny.make("llama").to(torch.bfloat16), bits=bits)
    up.attach(q, up.LoRA(r=4), name="t")
    up.save(q, tmp_path / "t", name="t")
    for base in (tiny.make("llama"), tiny.make("llama").to(torch.bfloat16), up.quantize(tiny.make("llama"), bits=bits)):
        assert up.active(up.load(base, tmp_path / "t")) == ["t"]
    with pytest.raises(UnipeftError, match="different base model"):
        up.load(tiny.make("llama", seed=5), tmp_path / "t")


# ---------------------------------------------------------------------------
# bad input: one line, the model unchanged
# ---------------------------------------------------------------------------

def test_bad_input_is_one_line_and_leaves_the_model_unchanged(monkeypatch):
    model = tiny.make("llama")
    before = state(model)
    cases = [
        (lambda: up.quantize(model, bits=3), "up.quantize: bits must be 2, 4 or 8, got 3"),
        (lambda: up.quantize(model, bits=2, targets="nothing_here"), "matches no linear module"),
        (lambda: up.quantize(model, bits=2, group_size=6), "group_size must be a multiple of 4"),
        (lambda: up.QLoRA(bits=16), "QLoRA: bits must be 2, 4 or 8, got 16"),
        (lambda: up.attach(model, up.QLoRA(bits=2, rank_pattern={"x": 2})), "rank_pattern"),
        (lambda: up.quantize(nn.Linear(4, 4).weight, bits=2), "expects a torch.nn.Module"),
    ]
    for call, match in cases:
        with pytest.raises(UnipeftError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
        assert same_state(state(model), before) and not quantized_modules(model)
        assert up.engine.registry(model) is None
    # twice
    up.quantize(model, bits=4, targets=["q"])
    once = state(model)
    with pytest.raises(UnipeftError, match="already quantized \\(4-bit\\); a model is quantized once"):
        up.quantize(model, bits=2)  # all-linear: q is among the targets
    assert same_state(state(model), once)
    with pytest.raises(UnipeftError, match="already quantized"):
        up.attach(model, up.QLoRA(bits=8), name="t")
    assert same_state(state(model), once) and up.engine.registry(model) is None
    # a map that holds a delta
    up.attach(model, up.LoRA(r=2, targets=["v"]), name="t")
    with pytest.raises(UnipeftError, match="holds deltas \\('t'\\); quantize the base before attaching"):
        up.quantize(model, bits=2, targets=["v"])
    assert "bits=2" not in repr(model)
    up.detach(model, "t")
    # bitsandbytes missing: the message says how to install it
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    fresh = tiny.make("llama")
    fresh_state = state(fresh)
    for bits in (4, 8):
        with pytest.raises(UnipeftError, match="pip install bitsandbytes"):
            up.quantize(fresh, bits=bits)
        with pytest.raises(UnipeftError, match="pip install bitsandbytes"):
            up.QLoRA(bits=bits)
    assert same_state(state(fresh), fresh_state) and not quantized_modules(fresh)
    up.quantize(fresh, bits=2)  # 2 bits is pure torch: no bitsandbytes needed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny.logits(fresh, tiny.batch("llama"))


def test_a_4bit_map_bitsandbytes_misreads_is_reported_when_a_site_wraps_it():
    """A map quantized elsewhere (as transformers' BitsAndBytesConfig does: blocks of 64) whose rows
    bitsandbytes' kernel misreads gets a warning when a delta is put on it."""
    from unipeft.quantization import prepare_site
    from unipeft.quantization.bnb import reads_rows_right

    m = bnb.nn.Linear4bit(32, 16, bias=False, compute_dtype=torch.float32, quant_type="nf4", device="meta")
    m.weight = bnb.nn.Params4bit(torch.randn(16, 32), requires_grad=False, quant_type="nf4").to("cpu")
    if reads_rows_right(m):  # a bitsandbytes (or a device) without the bug: nothing to report
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert prepare_site(m) == 4
    else:
        with pytest.warns(UserWarning, match="misreads the rows of this 32-input map"):
            assert prepare_site(m) == 4


# ---------------------------------------------------------------------------
# the memory estimator's QLoRA entry (unipeft estimate --bits)
# ---------------------------------------------------------------------------

def test_the_estimator_counts_the_maps_up_quantize_stores():
    """``block_linear`` from a config is exactly the weights up.quantize stores in fewer bits, and the
    weights term is QUANT_BYTES[bits] for those and size(float) for the rest."""
    from unipeft.analysis.memory import QUANT_BYTES, GiB, estimate, resolve_model
    from unipeft.analysis.memory_cpu import estimate_cpu

    model = tiny.make("llama")
    q = sum(m.in_features * m.out_features for m in up.quantize(tiny.make("llama"), bits=2).modules()
            if up.quantization.bits_of(m) is not None)
    _, shape = resolve_model(model.config)
    assert shape["block_linear"] == q
    n = shape["n_params"]
    for bits in (8, 4, 2):
        e = estimate(model.config, method="lora", dtype="fp32", seq_len=16, bits=bits)
        assert e.exact["weights_gb"] * GiB == pytest.approx(4 * (n - q) + QUANT_BYTES[bits] * q)
        assert e.gradients_gb * GiB == pytest.approx(4 * e.trainable_params)
        cpu = estimate_cpu(model.config, method="lora", trainable_params=1000, seq_len=16, bits=bits)
        assert cpu["parts_mb"]["weights"] * 2**20 == pytest.approx(4 * (n - q) + QUANT_BYTES[bits] * q)
    assert QUANT_BYTES[2] == 0.25 + 4 / 64  # the packed format at group 64 (test_quantize_targets_...)
    with pytest.raises(UnipeftError, match="full trains base weights, which cannot be stored quantized"):
        estimate("smollm2-135m", method="full", bits=4)
    with pytest.raises(UnipeftError, match="unknown bits 3"):
        estimate("smollm2-135m", method="lora", bits=3)


def test_unipeft_estimate_bits(capsys):
    import json

    from unipeft.cli import main

    totals = {}
    for bits in (None, 8, 4, 2):
        argv = ["estimate", "--model", "smollm2-135m", "--method", "lora", "--json"]
        assert main(argv + (["--bits", str(bits)] if bits else [])) == 0
        totals[bits] = json.loads(capsys.readouterr().out)["weights_gb"]
    assert totals[None] > totals[8] > totals[4] > totals[2] > 0
    assert main(["estimate", "--model", "smollm2-135m", "--method", "lora", "--bits", "4", "--device", "cpu"]) == 0
    assert "method=lora (base in 4 bits) device=cpu" in capsys.readouterr().out
