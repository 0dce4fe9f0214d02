"""up.QLoRA (quantize + LoRA in one attach) and quantized bases in the rest of the library: what the
file holds (a LoRA delta), detach leaving the base quantized, a model loaded with transformers'
BitsAndBytesConfig, unipeft train / eval / compare, and the exchange with peft.
(The quantized bases themselves: tests/test_quantize.py.)
"""
import logging
import warnings

import pytest
import torch

import tiny
import unipeft as up
from unipeft.errors import UnipeftError
from unipeft.quantization import quantized_modules

bnb = pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # LLM.int8() logs its fp16 cast on every call

BITS = (2, 4, 8)


# ---------------------------------------------------------------------------
# up.QLoRA
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
def test_qlora_quantizes_and_attaches_lora_in_one_call(bits, tmp_path):
    model, x = tiny.make("llama"), tiny.batch("llama")
    up.attach(model, up.QLoRA(bits=bits, r=4, alpha=8), name="t")
    assert set(quantized_modules(model).values()) == {bits} and len(quantized_modules(model)) == 14
    assert up.deltas(model)["t"].kind == "qlora"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".unipeft_deltas.t.lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        tiny.logits(model, x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    up.save(model, tmp_path / "d", name="t")
    meta = up.storage.read_meta(tmp_path / "d")
    assert meta["method"]["kind"] == "lora" and "bits" not in meta["method"]["options"]
    loaded = up.load(tiny.make("llama"), tmp_path / "d")  # a plain LoRA on the float base: nothing quantized
    assert not quantized_modules(loaded) and up.deltas(loaded)["t"].kind == "lora"
    # a second QLoRA at the same width reuses the quantized maps; detach leaves the base quantized
    up.attach(model, up.QLoRA(bits=bits, r=2), name="u")
    up.detach(model, "t")
    up.detach(model, "u")
    assert len(quantized_modules(model)) == 14 and up.engine.registry(model) is None
    assert not any(p.requires_grad for p in model.parameters() if not p.is_floating_point())


def test_qlora_with_a_rank_range_saves_the_drawn_ranks(tmp_path):
    model = tiny.make("llama")
    up.attach(model, up.QLoRA(bits=2, r=(1, 6), seed=2), name="t")
    up.save(model, tmp_path / "d", name="t")
    options = up.storage.read_meta(tmp_path / "d")["method"]["options"]
    assert isinstance(options["rank_pattern"], dict) and len(options["rank_pattern"]) == 14
    up.load(up.quantize(tiny.make("llama"), bits=4), tmp_path / "d")


# ---------------------------------------------------------------------------
# a model quantized by transformers (BitsAndBytesConfig)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_a_model_loaded_with_bitsandbytes_config(bits, tmp_path):
    import transformers as tf

    # 64-wide maps: bitsandbytes repacks 4-bit weights for its CPU kernel in inference mode (on
    # AVX512-BF16 CPUs), which needs at least one 64-input block
    cfg = tf.LlamaConfig(vocab_size=tiny.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    qcfg = (tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32) if bits == 4
            else tf.BitsAndBytesConfig(load_in_8bit=True))
    model = tf.LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=qcfg, device_map="cpu").eval()
    x = tiny.batch("llama")
    assert set(quantized_modules(model).values()) == {bits}
    with torch.no_grad():
        model(**x)  # an inference call first (the 4-bit weight may be repacked for the CPU kernel)
    up.attach(model, up.QLoRA(bits=bits, r=4), name="t")  # the loaded maps are used as they are
    for p in up.engine.registry(model).deltas["t"].parameters():
        p.data.normal_(0, 0.1)
    model.train()
    tiny.logits(model, x).float().pow(2).mean().backward()
    assert all(p.grad is not None for p in up.engine.registry(model).deltas["t"].parameters())
    model.eval()
    with torch.no_grad():
        out = tiny.logits(model, x)
    with pytest.warns(UserWarning, match="dequantised"):
        up.merge(model, "t")
    with torch.no_grad():
        torch.testing.assert_close(tiny.logits(model, x), out, atol=2e-2 if bits == 8 else 1e-4, rtol=0)
    up.unmerge(model, "t")
    up.save(model, tmp_path / "d", name="t")
    up.load(tf.LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "d")  # onto the float base
    with pytest.raises(UnipeftError, match=f"already quantized \\({bits}-bit\\)"):
        up.attach(model, up.QLoRA(bits=2), name="u")


# ---------------------------------------------------------------------------
# unipeft train / eval
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4])
def test_unipeft_train_and_eval_with_qlora(bits, tmp_path, capsys):
    import json

    from unipeft.cli import main

    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(120)]
    model = tiny.save(tmp_path / "bert", "bert", "cls")
    train = tiny.write_csv(tmp_path / "train.csv", ["text", "label"], rows[:80])
    dev = tiny.write_csv(tmp_path / "dev.csv", ["text", "label"], rows[80:])
    out = tmp_path / "run"
    args = ["train", "--model", model, "--task", "sent", "--train", train, "--dev", dev, "--out", out,
            "--precision", "fp32", "--threads", "1", "--method", "qlora", "--method-option", f"qlora.bits={bits}",
            "--max-steps", "20", "--batch-size", "16", "--lr", "1e-2", "--json"]
    assert main([str(a) for a in args]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["method"] == "qlora" and res["method_config"]["bits"] == bits
    assert json.loads((out / "delta" / "delta.json").read_text())["method"]["kind"] == "lora"
    # eval quantizes the base as training did before the (LoRA) delta loads: the same numbers
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == res["dev"]
    from unipeft.training.run import load_run

    loaded = load_run(out)[0]
    assert set(quantized_modules(loaded).values()) == {bits}


def test_a_qlora_delta_exports_to_peft_as_lora_and_peft_loads_it_on_the_float_base(tmp_path):
    peft = pytest.importorskip("peft")
    model, x = tiny.make("llama"), tiny.batch("llama")
    up.attach(model, up.QLoRA(bits=4, r=4, alpha=8), name="t")
    for p in up.engine.registry(model).deltas["t"].parameters():
        p.data.normal_(0, 0.2)
    up.export_peft(model, tmp_path / "peft", name="t")
    ours = up.import_peft(tiny.make("llama"), tmp_path / "peft")  # back into unipeft, on the float base
    theirs = peft.PeftModel.from_pretrained(tiny.make("llama"), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(tiny.logits(theirs, x), tiny.logits(ours, x), atol=1e-5, rtol=1e-4)


def test_unipeft_compare_with_qlora(tmp_path, capsys):
    import json

    from unipeft.cli import main

    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(60)]
    model = tiny.save(tmp_path / "bert", "bert", "cls")
    train = tiny.write_csv(tmp_path / "train.csv", ["text", "label"], rows[:40])
    dev = tiny.write_csv(tmp_path / "dev.csv", ["text", "label"], rows[40:])
    out = tmp_path / "cmp"
    args = ["compare", "--model", model, "--task", "sent", "--train", train, "--dev", dev, "--out", out,
            "--precision", "fp32", "--threads", "1", "--methods", "lora,qlora", "--method-option", "qlora.bits=2",
            "--max-steps", "3", "--batch-size", "8", "--in-process"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the merged-latency arm merges QLoRA into dequantised maps (and says so)
        assert main([str(a) for a in args]) == 0
    assert "| QLoRA |" in capsys.readouterr().out
    qlora = json.loads((out / "report.json").read_text())["methods"][1]
    assert qlora["trainable_params"] > 0 and qlora["latency_ms"]["merged"] > 0


def test_qlora_with_layers_quantizes_the_chosen_blocks_only(tmp_path):
    from unipeft.training.defaults import resolve

    model = tiny.make("llama")
    up.attach(model, up.QLoRA(bits=2, r=2, layers="1"), name="t")
    assert sorted(quantized_modules(model)) == sorted(up.engine.registry(model).deltas["t"].linear)
    assert all(p.startswith("model.layers.1.") for p in quantized_modules(model))
    fresh = tiny.make("llama")
    resolve("qlora", up.deltas(model)["t"].to_dict())[0].prepare_base(fresh)  # what load_run does
    assert quantized_modules(fresh) == quantized_modules(model)
