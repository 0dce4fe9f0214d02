"""Fused training paths compute what the plain reference path computes: outputs and gradients."""
import contextlib

import pytest
import torch

import tiny
import unipeft as up
from unipeft import fused
from unipeft.compat import enable_activation_checkpointing
from unipeft.methods.lora import LoRALinear


def _scrambled(family, method, head=None):
    model = up.attach(tiny.make(family, head), method)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _run(model, family, plain: bool, autocast=False):
    model.zero_grad(set_to_none=True)
    ctx = fused.disabled() if plain else contextlib.nullcontext()
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        with amp:
            out = model(**tiny.batch(family)).logits
        out.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach().float(), grads


PATHS = ["factored", "merged"]  # the fused node's two ways (fused.lora_path forces one; default: by cost)


@pytest.fixture(params=PATHS)
def lora_path(request):
    with fused.lora_path(request.param):
        yield request.param


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "t5"])
def test_fused_lora_matches_plain_path(family, lora_path):
    model = _scrambled(family, up.LoRA(r=4, alpha=8, targets="all-linear")).eval()
    out_f, g_f = _run(model, family, plain=False)
    out_p, g_p = _run(model, family, plain=True)
    torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=1e-5)
    assert set(g_f) == set(g_p) and len(g_f) > 0
    for n in g_f:
        torch.testing.assert_close(g_f[n], g_p[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("family", ["llama", "bert"])  # bert: the q, k, v group has biases
def test_fused_lora_matches_plain_path_under_bf16_autocast(family, lora_path):
    model = _scrambled(family, up.LoRA(r=4, alpha=8, targets="all-linear")).eval()
    out_f, g_f = _run(model, family, plain=False, autocast=True)
    out_p, g_p = _run(model, family, plain=True, autocast=True)
    # both round to bf16 at the same points, in a different order of accumulation
    torch.testing.assert_close(out_f, out_p, atol=3e-2, rtol=3e-2)
    for n in g_f:
        assert g_f[n].dtype == torch.float32  # gradients of fp32 master weights stay fp32
        cos = torch.nn.functional.cosine_similarity(g_f[n].flatten(), g_p[n].flatten(), dim=0)
        assert cos > 0.99, n


def test_fused_path_is_taken_only_where_it_applies():
    model = _scrambled("bert", up.LoRA(r=4, targets=("q",)), head="cls").train()
    x = torch.randn(2, 5, 32, requires_grad=True)
    q = model.bert.encoder.layer[0].attention.self.query
    assert type(q(x).grad_fn).__name__ == LoRALinear.__name__ + "Backward"
    with fused.disabled():
        assert type(q(x).grad_fn).__name__ != LoRALinear.__name__ + "Backward"
    with torch.no_grad():  # inference keeps the in-place path: nothing to save for a backward
        assert q(x).grad_fn is None
    # dropout needs its mask in the backward: the plain path handles it
    drop = up.attach(tiny.make("bert", "cls"), up.LoRA(r=4, targets=("q",), dropout=0.1)).train()
    q2 = drop.bert.encoder.layer[0].attention.self.query
    assert type(q2(x).grad_fn).__name__ != LoRALinear.__name__ + "Backward"


def test_fused_lora_trains_under_gradient_checkpointing(lora_path):
    model = _scrambled("llama", up.LoRA(r=4, targets="all-linear")).train()
    model.config.use_cache = False
    out_plain, g_plain = _run(model, "llama", plain=True)
    enable_activation_checkpointing(model)
    out_ckpt, g_ckpt = _run(model, "llama", plain=False)
    torch.testing.assert_close(out_ckpt, out_plain, atol=1e-5, rtol=1e-5)
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], atol=1e-5, rtol=1e-4, msg=n)


def test_plain_switch_restores_previous_state():
    assert fused.enabled()
    with fused.disabled():
        assert not fused.enabled()
    assert fused.enabled()


def test_maps_reading_one_input_share_one_node(lora_path):
    """Llama: q, k, v share one LoRALinear node, gate and up another; o and down are alone."""
    from unipeft.methods import lora

    model = _scrambled("llama", up.LoRA(r=4, targets="all-linear")).train()
    calls = []
    real = lora.LoRALinear.forward

    def counting(ctx, x, scales, *params):
        calls.append(len(scales))
        return real(ctx, x, scales, *params)

    lora.LoRALinear.forward = staticmethod(counting)
    try:
        model(**tiny.batch("llama")).logits.sum().backward()
    finally:
        lora.LoRALinear.forward = staticmethod(real)
    assert sorted(calls) == sorted([3, 1, 2, 1] * 2)  # per layer: qkv, o, gate+up, down


@pytest.mark.parametrize("bias", [False, True])
def test_group_under_autocast_stacks_its_weight_copies_into_one_base_product(bias):
    """Under autocast a shared-input group's bf16 weight copies lie side by side in one buffer (one
    base product); outputs and gradients equal n separate products', and no output is a slice of the
    stacked product (each has storage of its own)."""
    g = torch.Generator().manual_seed(3)
    shapes = [(12, 8), (4, 8), (4, 8)]
    x = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    ws = [torch.randn(o, i, generator=g) for o, i in shapes]
    bs = [torch.randn(o, generator=g) if bias and k != 1 else None for k, (o, _) in enumerate(shapes)]
    As = [torch.randn(3, i, generator=g, requires_grad=True) for _, i in shapes]
    Bs = [torch.randn(o, 3, generator=g, requires_grad=True) for o, _ in shapes]
    gs = [torch.randn(2, 5, o, generator=g).bfloat16() for o, _ in shapes]

    def run(stack):
        with fused.lora_path("factored"), fused.stacked_base(stack), torch.autocast("cpu", dtype=torch.bfloat16):
            ys = LoRALinear.apply(x, (2.0, 0.5, 1.0), *ws, *bs, *As, *Bs)
        saved = ys[0].grad_fn.saved_tensors[3:6]  # the members' weight copies
        grads = torch.autograd.grad(ys, [x, *As, *Bs], gs)
        return list(ys), [t.float() for t in grads], saved

    ys1, g1, saved1 = run("auto")   # k and v are narrower than the input: auto stacks
    ys0, g0, saved0 = run(False)
    assert len({t.untyped_storage().data_ptr() for t in saved1}) == 1   # one buffer
    assert len({t.untyped_storage().data_ptr() for t in saved0}) == 3
    for a, b in zip(ys1 + g1, ys0 + g0):
        torch.testing.assert_close(a.detach().float(), b.detach().float(), atol=2e-2, rtol=2e-2)
    # each output has storage of its own: none is a slice of the stacked product
    assert len({y.untyped_storage().data_ptr() for y in ys1}) == 3


def test_auto_stacks_only_groups_with_a_member_narrower_than_the_input():
    assert not fused.stack_base([(12, 8), (4, 8), (4, 8)])      # default: off (no whole-step gain measured)
    with fused.stacked_base("auto"):
        assert fused.stack_base([(12, 8), (4, 8), (4, 8)])      # grouped-query q, k, v
        assert not fused.stack_base([(8, 8)] * 3)                # equal q, k, v: either way between runs
        assert not fused.stack_base([(24, 8), (24, 8)])          # gate, up
    with fused.stacked_base(True):
        assert fused.stack_base([(8, 8)] * 3)
    with fused.stacked_base(False):
        assert not fused.stack_base([(12, 8), (4, 8), (4, 8)])
    with pytest.raises(ValueError, match="valid values"):
        with fused.stacked_base("sometimes"):
            pass


def test_shared_input_group_is_right_when_inputs_differ_or_parameters_change(lora_path):
    model = _scrambled("llama", up.LoRA(r=4, targets=("q", "k", "v"))).train()
    attn = model.model.layers[0].self_attn
    x1 = torch.randn(2, 3, 32, requires_grad=True)
    x2 = torch.randn(2, 3, 32, requires_grad=True)

    def reference(proj, x):
        with fused.disabled():
            return proj(x)

    attn.q_proj(x1)                    # computes q, k and v for x1
    torch.testing.assert_close(attn.k_proj(x2), reference(attn.k_proj, x2))  # another input: computed anew
    attn.q_proj(x1)
    with torch.no_grad():
        attn.v_proj.unipeft_deltas["default"].lora_B.add_(1.0)   # as an optimizer step would
    torch.testing.assert_close(attn.v_proj(x1), reference(attn.v_proj, x1))  # kept output is stale: recomputed
    y = attn.q_proj(x1)
    torch.testing.assert_close(attn.v_proj(x1), reference(attn.v_proj, x1))  # kept output, still right
    y.sum().backward()                 # only q's output is used: the others send no gradient
    assert x1.grad is not None and torch.isfinite(x1.grad).all()


def test_the_cost_model_picks_merged_for_many_tokens_and_factored_for_few():
    """Generation and short calls keep the factored path; a training batch of many tokens over a
    narrow layer forms W_eff; the setting forces either."""
    layer = [(576, 576, 16)]
    assert not fused.lora_merged_is_cheaper(1, layer)        # a generation step
    assert not fused.lora_merged_is_cheaper(64, layer)
    assert fused.lora_merged_is_cheaper(8 * 512, layer)
    assert not fused.lora_merged_is_cheaper(8 * 512, layer, torch.bfloat16)  # half precision: factored (measured)
    with fused.lora_path("merged"):
        assert fused.lora_merged_is_cheaper(1, layer)
    with fused.lora_path("factored"):
        assert not fused.lora_merged_is_cheaper(10 ** 6, layer)
    with pytest.raises(ValueError, match="factored"):
        with fused.lora_path("fast"):
            pass


def test_merged_path_is_taken_and_keeps_no_copy_of_the_weight():
    """The merged node saves x, t and references only: no tensor the size of W beyond W itself."""
    model = _scrambled("llama", up.LoRA(r=4, targets=("o",))).train()
    o = model.model.layers[0].self_attn.o_proj
    x = torch.randn(2, 5, 32, requires_grad=True)
    for path in PATHS:
        with fused.lora_path(path):
            y = o(x)
        assert y.grad_fn.merged == (path == "merged")
        saved = y.grad_fn.saved_tensors
        assert sum(t.data_ptr() == o.weight.data_ptr() for t in saved) == 1   # W itself, by reference
        assert not any(t.shape == o.weight.shape and t.data_ptr() != o.weight.data_ptr() for t in saved)


def test_merged_path_under_autocast_keeps_w_eff_in_place_of_the_weight_copy():
    """Under autocast both paths keep one compute-dtype tensor the size of W for the backward (autocast's
    copy of W on the factored path): the merged path keeps W_eff there instead of forming it again, so it
    holds no more than the factored path and its gradients are the factored path's."""
    from unipeft.methods.lora import _effective_weight

    model = _scrambled("llama", up.LoRA(r=4, targets=("o",))).train()
    o = model.model.layers[0].self_attn.o_proj
    x = torch.randn(2, 5, 32, requires_grad=True)
    g = torch.randn(2, 5, 32).bfloat16()
    delta = next(iter(o._unipeft_post))
    grads, sizes = {}, {}
    for path in PATHS:
        with fused.lora_path(path), torch.autocast("cpu", dtype=torch.bfloat16):
            y = o(x)
        big = [t for t in y.grad_fn.saved_tensors if t.shape == o.weight.shape]
        assert len(big) == 1 and big[0].dtype == torch.bfloat16 and big[0].data_ptr() != o.weight.data_ptr()
        sizes[path] = sum(t.numel() * t.element_size() for t in y.grad_fn.saved_tensors)
        if path == "merged":
            want = _effective_weight(o.weight, delta.lora_A, delta.lora_B, delta.scale, torch.bfloat16)
            assert torch.equal(big[0], want)
        grads[path] = torch.autograd.grad(y, [x, delta.lora_A, delta.lora_B], g)
    assert sizes["merged"] == sizes["factored"]
    for a, b in zip(grads["merged"], grads["factored"]):
        assert torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0) > 0.99


def test_merged_weight_is_summed_in_float32_and_rounded_once_under_autocast():
    """W + s B A in bf16 is the float32 sum rounded once, also when autocast is on (the node's forward runs
    under it, and autocast would run the addmm in bf16: two roundings)."""
    from unipeft.methods.lora import _effective_weight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    a, b = torch.randn(4, 64, generator=g) * 1e-2, torch.randn(64, 4, generator=g) * 1e-2
    once = torch.addmm(w, b, a, alpha=2.0).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _effective_weight(w, a, b, 2.0, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, once)


@pytest.mark.parametrize("autocast", [False, True])
def test_outputs_can_be_changed_in_place_as_on_the_plain_path(lora_path, autocast):
    """A model may change a LoRA map's output in place (relu_, mul_): the fused node's outputs are
    tensors of their own, not views of its products (autograd forbids in-place changes of those),
    and the gradients are the plain path's."""
    model = _scrambled("llama", up.LoRA(r=4, alpha=8, targets="all-linear")).train()
    for layer in model.model.layers:
        mlp = layer.mlp

        def forward(x, mlp=mlp):
            h = mlp.up_proj(x).mul_(2.0)                          # a member of the gate/up group
            return mlp.down_proj(torch.relu_(mlp.gate_proj(x)) * h).add_(1.0)  # down: a single map
        mlp.forward = forward
    out_f, g_f = _run(model, "llama", plain=False, autocast=autocast)
    out_p, g_p = _run(model, "llama", plain=True, autocast=autocast)
    tol = dict(atol=3e-2, rtol=3e-2) if autocast else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_f, out_p, **tol)
    for n in g_f:
        if autocast:
            assert torch.nn.functional.cosine_similarity(g_f[n].flatten(), g_p[n].flatten(), dim=0) > 0.99, n
        else:
            torch.testing.assert_close(g_f[n], g_p[n], **tol, msg=n)
