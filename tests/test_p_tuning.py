"""P-tuning: v1 (a prompt encoder over trainable embeddings, at the input; stored without the
encoder) and v2 (prompts at every layer, no reparameterisation)."""
import json

import pytest
import torch

import tiny
import unipeft as up
from unipeft.methods.p_tuning import PromptEncoder


def delta_record(model, name="t"):
    return up.engine.registry(model).deltas[name]


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_v1_prepends_the_encoded_virtual_tokens_and_trains_embeddings_and_encoder(family, encoder):
    model, x = tiny.make(family), tiny.batch(family)
    up.attach(model, up.PTuning(length=3, encoder=encoder, hidden=16), name="t")
    prompt = delta_record(model).module
    assert isinstance(prompt, PromptEncoder) and prompt.embedding.shape == (3, 32)
    seen = {}
    stack = up.engine.registry(model).input_sites
    site = next(iter(stack.values()))
    hook = site.stack.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("e", kw["inputs_embeds"]),
                                                with_kwargs=True)
    out = tiny.logits(model, x)
    hook.remove()
    # the first p positions are the encoder's output, the same for every row
    torch.testing.assert_close(seen["e"][:, :3], prompt.encoded().detach().expand(2, -1, -1))
    assert not torch.allclose(prompt.encoded().detach(), prompt.embedding.detach())  # really encoded
    out.float().pow(2).mean().backward()
    assert prompt.embedding.grad.abs().max() > 0
    enc = prompt.lstm if encoder == "lstm" else prompt.mlp
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in enc.parameters() if p.dim() > 1)


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_v1_saves_the_encoded_table_without_the_encoder(encoder, tmp_path):
    from safetensors.torch import load_file

    model, x = tiny.make("bert"), tiny.batch("bert")
    up.attach(model, up.PTuning(length=4, encoder=encoder), name="t")
    trainable = up.trainable_parameters(model)[0]
    expected = tiny.logits(model, x).detach()
    up.save(model, tmp_path / "d", name="t")
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert meta["method"]["options"]["encoder"] == "none" and meta["method"]["options"]["version"] == 1
    tensors = load_file(str(tmp_path / "d" / "delta.safetensors"))
    assert {k for k in tensors if k.startswith("model:")} == {"model:embedding"}
    assert tensors["model:embedding"].shape == (4, 32)
    assert meta["parameters"] < trainable  # the encoder is gone
    fresh = tiny.make("bert")
    up.load(fresh, tmp_path / "d")
    torch.testing.assert_close(tiny.logits(fresh, x), expected, rtol=0, atol=1e-6)
    assert not any(isinstance(m, torch.nn.LSTM) for m in fresh.modules())


@pytest.mark.parametrize("family", ["bert", "llama", "bart"])
def test_v2_is_prefix_tuning_trained_directly_at_every_layer(family):
    from unipeft.methods.prefix_tuning import Prefix

    model = tiny.make(family)
    up.attach(model, up.PTuning(version=2, length=3), name="t")
    record = delta_record(model)
    assert isinstance(record.module, Prefix) and record.module.prefix is not None  # no MLP
    assert len(record.attention) == len(up.engine.registry(model).map.attention)
    assert sum(p.numel() for p in record.module.parameters()) == record.module.prefix.numel()


def test_v2_generates():
    model, x = tiny.make("gpt2"), tiny.batch("gpt2")
    up.attach(model, up.PTuning(version=2, length=3), name="t")
    out = model.generate(**x, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, x["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("make,message", [
    (lambda: up.PTuning(version=3), r"version must be 1 or 2, got 3"),
    (lambda: up.PTuning(encoder="gru"), r"encoder must be 'lstm', 'mlp' or 'none', got 'gru'"),
    (lambda: up.PTuning(version=2, encoder="lstm"), r"version=2 trains the prompts of every layer directly"),
    (lambda: up.PTuning(length=0), r"length must be an integer >= 1"),
    (lambda: up.PTuning(hidden=0), r"hidden must be an integer >= 1"),
    (lambda: up.PTuning(prompt_length=4), r"unknown option 'prompt_length'; valid options: 'version', 'length'"),
])
def test_bad_options_are_one_line_errors(make, message):
    with pytest.raises(up.UnipeftError, match=message) as err:
        make()
    assert "\n" not in str(err.value)
