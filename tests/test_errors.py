"""Bad input: a clear one-line error naming the problem and the choices, and nothing changed."""
import json
import re

import pytest
import torch
import torch.nn as nn

import tiny
import unipeft as up


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and len(msg) > 20
    return msg


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap, x=None, ref=None):
    state = model.state_dict()
    assert set(state) == set(snap)
    for k, v in snap.items():
        assert torch.equal(state[k], v), k
    assert up.engine.registry(model) is None or "bad" not in up.deltas(model)
    if x is not None:
        with torch.no_grad():
            assert torch.equal(tiny.logits(model, x), ref)


@pytest.mark.parametrize("make,pattern", [
    (lambda: up.LoRA(rank=8), r"unknown option 'rank'.*'r', 'alpha'"),
    (lambda: up.LoRA(r=0), r"r must be an integer >= 1, got 0"),
    (lambda: up.LoRA(r=-3), r"r must be an integer >= 1"),
    (lambda: up.LoRA(r=2.5), r"r must be an integer"),
    (lambda: up.LoRA(alpha=0), r"alpha must be > 0"),
    (lambda: up.LoRA(dropout=1.5), r"dropout must be <= 1"),
    (lambda: up.LoRA(init="xavier"), r"init must be 'kaiming' or 'gaussian'"),
    (lambda: up.LoRA(targets=[]), r"targets is an empty list"),
    (lambda: up.LoRA(targets=[3]), r"targets must be a string or a list"),
    (lambda: up.Adapter(style="sideways"), r"style must be 'houlsby', 'pfeiffer', 'parallel' or 'scaled_parallel'"),
    (lambda: up.Adapter(bottleneck=0), r"bottleneck must be an integer >= 1"),
    (lambda: up.Adapter(style="houlsby", scale=2.0), r"scale applies only to style 'scaled_parallel'"),
    (lambda: up.Adapter(activation="softmax"), r"activation must be 'relu', 'gelu', 'tanh' or 'silu'"),
    (lambda: up.Adapter(locations=["embeddings"]), r"locations must be 'attention' or 'ffn'"),
    (lambda: up.PromptTuning(length=0), r"length must be an integer >= 1"),
    (lambda: up.PromptTuning(init="zeros"), r"init must be 'random', 'vocab', 'text' or 'labels'"),
    (lambda: up.PromptTuning(init="text"), r"init='text' needs init_text"),
    (lambda: up.PromptTuning(init="labels"), r"init='labels' needs label_words"),
    (lambda: up.PrefixTuning(length=-1), r"length must be an integer >= 1"),
    (lambda: up.PrefixTuning(reparam_hidden=-5), r"reparam_hidden must be an integer >= 0"),
    (lambda: up.Freeze(train_last=-1), r"train_last must be an integer >= 0"),
    (lambda: up.BitFit(bias="all"), r"unknown option 'bias'"),
])
def test_bad_options(make, pattern):
    with pytest.raises(up.UnipeftError) as e:
        make()
    assert re.search(pattern, one_line(e)), str(e.value)


@pytest.mark.parametrize("targets", [["nonexistent"], ["re:.*zzz.*"], ["q_proj"], [".*\\.nothing"]])
def test_targets_that_match_nothing(targets):
    model, x = tiny.make("bert"), tiny.batch("bert")
    ref, snap = tiny.logits(model, x).detach(), snapshot(model)
    with pytest.raises(up.UnipeftError) as e:
        up.attach(model, up.LoRA(targets=targets), name="bad")
    msg = one_line(e)
    assert "matches no linear module" in msg and "'attention'" in msg and "'query'" in msg
    assert_unchanged(model, snap, x, ref)
    assert all(p.requires_grad for p in model.parameters())


def test_failure_after_partial_install_leaves_model_untouched():
    """The first target matches, the second does not: nothing may stay behind."""
    model, x = tiny.make("llama"), tiny.batch("llama")
    ref, snap = tiny.logits(model, x).detach(), snapshot(model)
    with pytest.raises(up.UnipeftError):
        up.attach(model, up.IA3(targets=["k", "nothing_here"]), name="bad")
    assert_unchanged(model, snap, x, ref)
    assert not any(type(m).__name__.startswith("Unipeft") for m in model.modules())


def test_prefix_on_a_model_without_attention():
    class MLPOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    model = MLPOnly()
    snap = snapshot(model)
    with pytest.raises(up.UnipeftError) as e:
        up.attach(model, up.PrefixTuning(), name="bad")
    assert "needs a model with attention" in one_line(e)
    assert_unchanged(model, snap)


def test_bitfit_with_targets_that_match_nothing():
    """A bias-free model gets new biases (test_grid); targets that match no map are an error."""
    model = tiny.make("llama")
    snap = snapshot(model)
    with pytest.raises(up.UnipeftError) as e:
        up.attach(model, up.BitFit(targets=("nonexistent_proj",)), name="bad")
    assert "BitFit: target 'nonexistent_proj' matches no linear module" in one_line(e)
    assert_unchanged(model, snap)


def test_freeze_more_layers_than_exist():
    model = tiny.make("bert")
    with pytest.raises(up.UnipeftError, match=r"only 2 blocks per stack; choose 0..2"):
        up.attach(model, up.Freeze(train_last=5), name="bad")


def test_wrong_arguments_to_api():
    model = tiny.make("bert")
    with pytest.raises(up.UnipeftError, match="expects a method config"):
        up.attach(model, "lora", name="x")
    with pytest.raises(up.UnipeftError, match="delta name"):
        up.attach(model, up.LoRA(), name="a.b")
    up.attach(model, up.LoRA(), name="x")
    with pytest.raises(up.UnipeftError, match="already attached"):
        up.attach(model, up.LoRA(), name="x")
    with pytest.raises(up.UnipeftError, match=r"no delta named 'y'; attached deltas: 'x'"):
        up.detach(model, "y")
    with pytest.raises(up.UnipeftError, match=r"no delta named 'y'"):
        up.activate(model, ["y"])
    with pytest.raises(up.UnipeftError, match=r"no delta named 'y'"):
        up.merge(model, "y")


def test_merged_delta_cannot_be_switched_off():
    model = tiny.make("bert")
    up.attach(model, up.LoRA(), name="x")
    up.merge(model, "x")
    with pytest.raises(up.UnipeftError, match="merged into the base weights; unmerge it"):
        up.activate(model, [])
    assert up.active(model) == ["x"]


def test_two_selective_deltas_on_the_same_parameters_cannot_both_be_on():
    model = tiny.make("bert")
    up.attach(model, up.BitFit(), name="a")
    up.attach(model, up.FullFineTune(), name="b")
    with pytest.raises(up.UnipeftError, match="both train parameter"):
        up.activate(model, ["a", "b"])
    assert up.active(model) == ["b"]


# --- files -------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    model, x = tiny.make("bert"), tiny.batch("bert")
    up.attach(model, up.LoRA(r=2), name="sst2")
    with torch.no_grad():
        for p in up.engine.registry(model).deltas["sst2"].parameters():
            p.add_(0.1)
    return up.save(model, tmp_path / "sst2"), x


def _fresh_with_other_delta():
    model = tiny.make("bert")
    up.attach(model, up.IA3(), name="keep")
    return model


def _check_load_fails(target, pattern, **kw):
    model = _fresh_with_other_delta()
    x = tiny.batch("bert")
    ref, snap = tiny.logits(model, x).detach(), snapshot(model)
    with pytest.raises(up.UnipeftError) as e:
        up.load(model, target, **kw)
    assert re.search(pattern, one_line(e)), str(e.value)
    assert_unchanged(model, snap, x, ref)
    assert list(up.deltas(model)) == ["keep"] and up.active(model) == ["keep"]


def test_truncated_tensor_file(saved):
    target, _ = saved
    f = target / "delta.safetensors"
    f.write_bytes(f.read_bytes()[:-50])
    _check_load_fails(target, r"truncated or corrupted")


def test_garbage_tensor_file(saved):
    target, _ = saved
    (target / "delta.safetensors").write_bytes(b"\x00" * 64)
    _check_load_fails(target, r"truncated or corrupted")


def test_corrupted_json(saved):
    target, _ = saved
    (target / "delta.json").write_text("{not json")
    _check_load_fails(target, r"corrupted \(not valid JSON")


def test_json_with_wrong_method(saved):
    target, _ = saved
    meta = json.loads((target / "delta.json").read_text())
    meta["method"]["kind"] = "magic"
    (target / "delta.json").write_text(json.dumps(meta))
    _check_load_fails(target, r"unknown method 'magic'; valid methods: .*'lora'")


def test_json_with_bad_option(saved):
    target, _ = saved
    meta = json.loads((target / "delta.json").read_text())
    meta["method"]["options"]["r"] = 0
    (target / "delta.json").write_text(json.dumps(meta))
    _check_load_fails(target, r"r must be an integer >= 1", check_base=False)


def test_json_and_tensors_disagree(saved):
    target, _ = saved
    meta = json.loads((target / "delta.json").read_text())
    meta["method"]["options"]["r"] = 3  # the tensors have rank 2
    (target / "delta.json").write_text(json.dumps(meta))
    _check_load_fails(target, r"has shape \(2, 32\) in the file but \(3, 32\) in the model", check_base=False)


def test_missing_files(tmp_path, saved):
    _check_load_fails(tmp_path / "nothing", r"no delta directory")
    target, _ = saved
    (target / "delta.json").unlink()
    _check_load_fails(target, r"delta.json is missing")


def test_different_base_is_refused_unless_overridden(saved):
    target, x = saved
    other = tiny.make("bert", seed=1)
    snap = snapshot(other)
    with pytest.raises(up.UnipeftError) as e:
        up.load(other, target)
    assert "different base model" in one_line(e) and "check_base=False" in str(e.value)
    assert_unchanged(other, snap)
    up.load(other, target, check_base=False)  # the user's explicit override
    assert up.active(other) == ["sst2"]
    with pytest.raises(up.UnipeftError, match="different base model"):
        up.load(tiny.make("roberta"), target)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_same_base_at_half_precision_is_the_same_base(saved, tmp_path, dtype):
    """A delta saved from float32 weights loads onto their bfloat16 or float16 copy (a base served or loaded
    with ``dtype=``) and, saved from that copy, back onto the float32 weights; another base at that
    precision is refused as before. (Before, the dtype and the unrounded values were in the one fingerprint:
    every such load was refused.)"""
    target, x = saved
    with torch.no_grad():
        want = tiny.logits(up.load(tiny.make("bert"), target), x)
    half = up.load(tiny.make("bert").to(dtype), target)
    with torch.no_grad():
        torch.testing.assert_close(tiny.logits(half, x).float(), want, atol=0.05, rtol=0.05)
    other = tiny.make("bert", seed=1).to(dtype)
    snap = snapshot(other)
    with pytest.raises(up.UnipeftError, match="different base model.*also at bfloat16 and float16 precision"):
        up.load(other, target)
    assert_unchanged(other, snap)
    back = up.save(half, tmp_path / "from-half", name="sst2")
    assert up.active(up.load(tiny.make("bert"), back)) == ["sst2"]


def test_a_base_rounded_twice_and_a_file_without_rounded_fingerprints_are_refused(saved, tmp_path):
    """float16 -> bfloat16 rounds twice, so a delta saved from a float16 base does not match the bfloat16
    copy of the same weights (check_base=False loads it); a delta.json written before the rounded
    fingerprints existed matches the exact base only."""
    target, _ = saved
    from_fp16 = up.save(up.load(tiny.make("bert").half(), target), tmp_path / "fp16", name="sst2")
    with pytest.raises(up.UnipeftError, match="different base model"):
        up.load(tiny.make("bert").to(torch.bfloat16), from_fp16)
    up.load(tiny.make("bert").to(torch.bfloat16), from_fp16, check_base=False)
    meta = json.loads((target / "delta.json").read_text())
    meta["base"] = {k: v for k, v in meta["base"].items() if k in ("model_type", "class", "fingerprint",
                                                                    "loose_fingerprint", "quantized")}
    (target / "delta.json").write_text(json.dumps(meta))
    assert up.active(up.load(tiny.make("bert"), target)) == ["sst2"]
    with pytest.raises(up.UnipeftError, match="different base model"):
        up.load(tiny.make("bert").to(torch.bfloat16), target)


def test_loading_never_unpickles(saved, monkeypatch):
    import pickle

    def boom(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    target, _ = saved
    up.load(tiny.make("bert"), target)


def test_save_is_atomic_and_replaces(saved, monkeypatch):
    target, _ = saved
    before = (target / "delta.safetensors").read_bytes()
    model = tiny.make("bert")
    up.attach(model, up.LoRA(r=2), name="sst2")
    import safetensors.torch

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        up.save(model, target)
    assert (target / "delta.safetensors").read_bytes() == before  # the old delta is intact
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []  # no temp left
    monkeypatch.undo()
    up.save(model, target)
    assert (target / "delta.safetensors").read_bytes() != before


def test_save_needs_a_name_when_ambiguous(tmp_path):
    model = tiny.make("bert")
    with pytest.raises(up.UnipeftError, match="no deltas attached: nothing to save"):
        up.save(model, tmp_path / "x")
    up.attach(model, up.LoRA(), name="a")
    up.attach(model, up.IA3(), name="b")
    with pytest.raises(up.UnipeftError, match=r"say which to save with name=, one of 'a' or 'b'"):
        up.save(model, tmp_path / "x")
