"""Across the methods of issue 16 built here: bf16 bases, and generation with the KV cache."""
import pytest
import torch

import tiny
import unipeft as up

METHODS = {
    "adapter_drop": lambda: up.AdapterDrop(n=1, robust=True, bottleneck=8),
    "p_tuning": lambda: up.PTuning(length=3, encoder="lstm", hidden=8),
    "p_tuning_v2": lambda: up.PTuning(version=2, length=3),
    "pasta": lambda: up.PASTA(tokens=[13, 5, 59]),
    "mam": lambda: up.MAM(prefix_length=3, reparam_hidden=8, bottleneck=8),
    "unipelt": lambda: up.UniPELT(bottleneck=8, prefix_length=3, reparam_hidden=8, r=2),
    "adamix": lambda: up.AdaMix(experts=2, bottleneck=8),
    "compose_layers": lambda: up.Compose([up.LoRA(r=2, layers="0"), up.Adapter(bottleneck=4, layers="1")]),
}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_bfloat16_base(family, method):
    """The delta follows the base's dtype; forward and backward run in bf16."""
    model, x = tiny.make(family).to(torch.bfloat16), tiny.batch(family)
    up.attach(model, METHODS[method](), name="t")
    for p in up.engine.registry(model).deltas["t"].parameters():
        assert p.dtype == torch.bfloat16
    model.train()
    tiny.logits(model, x).float().pow(2).mean().backward()
    model.eval()
    with torch.no_grad():
        out = tiny.logits(model, x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["pasta", "mam", "adamix", "p_tuning", "adapter_drop"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generation_with_the_cache_matches_generation_without(family, method):
    """(UniPELT is left out: its prefix gate reads the tokens of each step, see unipelt.py.)"""
    model, x = tiny.make(family), tiny.batch(family)
    x = {k: v[:1, :5] for k, v in x.items()}
    x["input_ids"][0, 1] = 13  # a PASTA token in the prompt
    up.attach(model, METHODS[method](), name="t")
    with torch.no_grad():
        for p in up.engine.registry(model).deltas["t"].parameters():
            p.add_(torch.randn_like(p) * 0.5)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**x, **kw)
        uncached = model.generate(**x, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
