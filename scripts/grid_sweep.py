"""Promises of an ordinary PyTorch module, checked for every method on every family of the contract
grid (``tests/test_grid.py``), too slow together for the 15-minute suite. Run it after a change to
the engine or a new transformers release:

    python scripts/grid_sweep.py                 # the whole grid (~4 min on 2 cores)
    python scripts/grid_sweep.py --families llama,bart --methods lora,prefix

For each (family, method): the logits with ``return_dict=False`` and with ``output_hidden_states`` /
``output_attentions`` are the plain call's, one row alone gives that row of the batch, a training step
with labels runs with ``return_dict=False``; with the delta moved off its init, a padded row alone
(pads cut) gives its rows of the batch and, in a decoder, a later token leaves earlier positions alone;
greedy generation (decoders and encoder-decoders, a left-padded batch) gives the same tokens cached
and recomputed, and each row the tokens it gets alone; a copy through ``torch.save(model)`` computes
the same; ``resize_token_embeddings`` after attach leaves a model that runs a new token and trains;
a forward under ``torch.inference_mode`` before training leaves training possible and inference_mode
agrees with no_grad after it; a ``state_dict`` round trip
into a fresh model with the same delta gives the same logits; ``model.to(bfloat16)`` after attach
(and back) trains and stays close; activation checkpointing, reentrant or not, gives the gradients
of the same step without it; on the decoders, a ``transformers.Trainer`` run (with ``SaveDeltaCallback``)
resumed from its step-3 checkpoint ends where the uninterrupted 6-step run ends; a delta saved from the
float32 base loads (and merges) onto its bfloat16 and float16 copies and computes what it did. (In-place changes of
outputs and ``copy.deepcopy`` are in the suite.)
Prints each failure; exits 1 if there is any.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402

import tiny  # noqa: E402
import unipeft as up  # noqa: E402
from test_grid import GRID, METHODS, run, train_steps  # noqa: E402
from unipeft.compat import enable_activation_checkpointing  # noqa: E402


def fresh(family, method):
    return up.attach(tiny.make(family), METHODS[method](), name="t")


def labels_for(family, x):
    if family in ("gpt2", "llama"):
        return {"labels": x["input_ids"]}
    if family in ("t5", "bart"):
        return {"labels": x["decoder_input_ids"]}
    return {"labels": torch.tensor([0, 1])}


def check_call_flags(family, method, x):
    m = fresh(family, method).eval()
    with torch.no_grad():
        ref = m(**x).logits
        assert torch.equal(m(**x, return_dict=False)[0], ref), "return_dict=False changes the logits"
        assert torch.equal(m(**x, output_hidden_states=True, output_attentions=True).logits, ref), \
            "output_hidden_states / output_attentions change the logits"
        one = m(**{k: v[:1] for k, v in x.items()}).logits
        assert torch.allclose(one, ref[:1], atol=1e-5), "a row alone differs from that row in the batch"
    m.train()
    m(**x, **labels_for(family, x), return_dict=False)[0].backward()


def scrambled(family, method):
    """A fresh delta moved away from its init, so that what it changes shows in the outputs."""
    m = fresh(family, method).eval()
    tiny.scramble(m, "t", seed=3)
    return m


def check_padding_and_causality(family, method, x):
    m = scrambled(family, method)
    trimmed = {k: v[1:, :5] if k != "decoder_input_ids" else v[1:] for k, v in x.items()}  # row 1 without its 2 pads
    full, alone = run(m, x), run(m, trimmed)
    if family in ("gpt2", "llama"):
        full = full[:, :5]
    assert torch.allclose(full[1], alone[0], atol=1e-4), "a padded row differs from the same row alone"
    if family in ("gpt2", "llama"):
        later = {k: v.clone() for k, v in x.items()}
        later["input_ids"][0, 5] = 7
        assert torch.allclose(run(m, later)[0, :5], full[0], atol=1e-6), "a later token changes earlier positions"


def check_generation(family, method, x):
    if family not in ("gpt2", "llama", "t5", "bart"):
        return
    m = scrambled(family, method)
    ids, mask = x["input_ids"].clone(), x["attention_mask"].clone()
    if family in ("gpt2", "llama"):  # the padded row padded on the left, as for generation
        ids[1] = torch.cat([ids[1, -2:], ids[1, :-2]])
        mask[1] = torch.cat([mask[1, -2:], mask[1, :-2]])
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = m.generate(ids, attention_mask=mask, use_cache=True, **kw)
        recomputed = m.generate(ids, attention_mask=mask, use_cache=False, **kw)
        assert torch.equal(cached, recomputed), "cached greedy generation differs from recomputing the sequence"
        for i in range(2):
            keep = mask[i].bool()
            one = m.generate(ids[i:i + 1, keep], attention_mask=mask[i:i + 1, keep], **kw)[0]
            got = cached[i, -len(one):] if family in ("gpt2", "llama") else cached[i, :len(one)]
            assert torch.equal(got, one), f"row {i} generates other tokens in the batch than alone"


def check_pickle(family, method, x):
    import io

    m = scrambled(family, method)
    buf = io.BytesIO()
    torch.save(m, buf)  # the whole model, pickled
    buf.seek(0)
    assert torch.equal(run(torch.load(buf, weights_only=False), x), run(m, x)), "a pickled copy computes otherwise"


def check_resize_embeddings(family, method, x):
    m = scrambled(family, method)
    n = m.get_input_embeddings().weight.shape[0]
    m.resize_token_embeddings(n + 8)
    x = {k: v.clone() for k, v in x.items()}
    x["input_ids"][0, 1] = n + 3
    assert torch.isfinite(run(m, x)).all(), "not finite after resize_token_embeddings"
    train_steps(m, x, steps=1)


def check_inference_mode(family, method, x):
    m = fresh(family, method).eval()
    with torch.inference_mode():
        tiny.logits(m, x)
    train_steps(m, x, steps=2)
    with torch.inference_mode():
        a = tiny.logits(m, x)
    assert torch.equal(a, run(m, x)), "inference_mode and no_grad disagree after training"


def check_state_dict(family, method, x):
    m = fresh(family, method)
    train_steps(m, x, steps=2)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(123)
    f = fresh(family, method)
    f.load_state_dict(state)
    assert torch.allclose(run(f, x), run(m, x), atol=1e-6), "a state_dict round trip changes the logits"


def check_dtype_after_attach(family, method, x):
    m = fresh(family, method)
    train_steps(m, x, steps=1)
    ref = run(m, x)
    m.to(torch.bfloat16)
    low = run(m, x)
    assert torch.allclose(low.float(), ref, atol=0.1, rtol=0.1), "bf16 after attach is far from fp32"
    train_steps(m, x, steps=1)
    m.to(torch.float32)
    train_steps(m, x, steps=1)
    assert torch.isfinite(run(m, x)).all(), "not finite after bf16 and back"


def check_checkpointing(family, method, x):
    for reentrant in (False, True):
        torch.manual_seed(0)
        m = fresh(family, method).train()
        params = [p for p in m.parameters() if p.requires_grad]

        def grads():
            torch.manual_seed(1)  # the same dropout draws
            tiny.logits(m, x).float().pow(2).mean().backward()
            got = [None if p.grad is None else p.grad.clone() for p in params]
            m.zero_grad(set_to_none=True)
            return got

        plain = grads()
        enable_activation_checkpointing(m, use_reentrant=reentrant)
        m.train()
        for p, a, b in zip(params, plain, grads()):
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-5, rtol=1e-4)), \
                f"checkpointing (reentrant={reentrant}) changes the gradients"


def check_trainer_resume(family, method, x):
    import tempfile

    from transformers import Trainer, TrainingArguments

    from test_ecosystem import lm_rows
    from unipeft.integrations import SaveDeltaCallback

    with tempfile.TemporaryDirectory() as out:
        def train(seed, resume=None):
            torch.manual_seed(seed)
            m = fresh(family, method)
            args = TrainingArguments(output_dir=out, max_steps=6, save_steps=3, per_device_train_batch_size=4,
                                     learning_rate=3e-2, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                                     disable_tqdm=True, seed=0, logging_strategy="no")
            Trainer(model=m, args=args, train_dataset=lm_rows(), callbacks=[SaveDeltaCallback()]).train(
                resume_from_checkpoint=resume)
            return m

        want = run(train(0).eval(), x)
        got = run(train(1, resume=os.path.join(out, "checkpoint-3")).eval(), x)
        assert torch.allclose(got, want, atol=1e-5), \
            f"a Trainer run resumed at step 3 ends {(got - want).abs().max():.2e} from the uninterrupted one"


check_trainer_resume.families = ("gpt2", "llama")  # causal LM rows (tests/test_ecosystem.lm_rows)


def check_load_at_half_precision(family, method, x):
    import tempfile

    from test_grid import MERGEABLE

    m = fresh(family, method)
    train_steps(m, x, steps=2)
    with tempfile.TemporaryDirectory() as d:
        up.save(m, d, name="t")
        want = run(m, x).float()  # after the save: DiffPruning takes its final form there
        tol = 0.05 * want.abs().max().item() + 0.05
        for dtype in (torch.bfloat16, torch.float16):
            half = up.load(tiny.make(family).to(dtype), d)
            err = (run(half, x).float() - want).abs().max().item()
            assert err <= tol, f"loaded onto the {dtype} base: {err:.3g} from float32 (tolerance {tol:.3g})"
            if method in MERGEABLE:
                up.merge(half, "t")
                err = (run(half, x).float() - want).abs().max().item()
                assert err <= tol, f"merged into the {dtype} base: {err:.3g} from float32 (tolerance {tol:.3g})"

CHECKS = [check_call_flags, check_padding_and_causality, check_generation, check_pickle, check_resize_embeddings,
          check_inference_mode, check_state_dict, check_dtype_after_attach, check_checkpointing, check_trainer_resume,
          check_load_at_half_precision]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default="", help="comma list (default: every family of the grid)")
    ap.add_argument("--methods", default="", help="comma list of the grid's method rows (default: all)")
    args = ap.parse_args(argv)
    fams = {f for f in args.families.split(",") if f} or {f for f, _ in GRID}
    methods = {m for m in args.methods.split(",") if m} or set(METHODS)
    unknown = sorted((fams - set(tiny.FAMILIES)) | (methods - set(METHODS)))
    if unknown:
        ap.error(f"unknown {', '.join(unknown)}: families are {', '.join(tiny.FAMILIES)}; methods {', '.join(METHODS)}")
    failures = cases = 0
    for family, method in GRID:
        if family not in fams or method not in methods:
            continue
        x = tiny.batch(family)
        for check in CHECKS:
            if family not in getattr(check, "families", (family,)):
                continue
            cases += 1
            try:
                check(family, method, x)
            except Exception as e:  # report every case, then fail
                failures += 1
                where = traceback.extract_tb(e.__traceback__)[-1]
                print(f"FAIL {family} {method} {check.__name__}: {type(e).__name__}: {str(e).splitlines()[0][:200]} "
                      f"({Path(where.filename).name}:{where.lineno})", flush=True)
    print(f"{cases} checks, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
