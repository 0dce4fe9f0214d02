"""Evaluation: predictions, dev loss and generation for every task kind, then the task's metrics.

* classification / regression: one forward pass per batch (sorted by length, order restored);
* causal_lm / seq2seq: ``generate`` (greedy or beam search) on each distinct source, scored
  against all of its references (E2E has several per source), or the dev loss when a
  cheaper signal is enough (evaluation during training).

Works for every method, prompt and prefix tuning included: they act inside the model's
forward, so ``generate`` needs nothing special.
"""
from __future__ import annotations

import contextlib
import math

import torch

from .batching import IGNORE, Collator, Encoded, batch_order, encode
from .metrics import compute, group_references
from .tasks import Task


def autocast(precision: str, device: torch.device | str):
    """bf16 autocast when ``precision == "bf16"`` (weights stay fp32: they are the master copy)."""
    dev = torch.device(device).type
    if precision == "bf16":
        return torch.autocast(dev, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def predict(model, task: Task, enc: Encoded, tokenizer, batch_size: int = 64, precision: str = "fp32"):
    """Label ids (classification) or numbers (regression) for every example, in order."""
    collate = Collator(pad_id(tokenizer))
    dev = _device(model)
    out: list = [None] * len(enc)
    with eval_mode(model):
        for idx in batch_order(enc.lengths(), batch_size, 0, 0, shuffle=False):
            batch = collate([enc.example(i) for i in idx])
            batch.pop("labels", None)
            with autocast(precision, dev):
                logits = model(**{k: v.to(dev) for k, v in batch.items()}).logits.float()
            vals = logits.argmax(-1).tolist() if task.kind == "classification" else logits.reshape(-1).tolist()
            for i, v in zip(idx, vals):
                out[i] = v
    return out


@torch.no_grad()
def mean_loss(model, enc: Encoded, tokenizer, batch_size: int = 32, precision: str = "fp32") -> float:
    """The loss over a split, weighted by examples (or by target tokens for generation tasks)."""
    collate = Collator(pad_id(tokenizer))
    dev = _device(model)
    total, weight = 0.0, 0
    with eval_mode(model):
        for idx in batch_order(enc.lengths(), batch_size, 0, 0, shuffle=False):
            batch = {k: v.to(dev) for k, v in collate([enc.example(i) for i in idx]).items()}
            with autocast(precision, dev):
                loss = model(**batch).loss.float().item()
            labels = batch["labels"]
            # the model's loss is a mean over target tokens (generation) or examples: weight it back
            w = int((labels != IGNORE).sum()) if labels.dim() == 2 else len(idx)
            total += loss * w
            weight += w
    return total / max(weight, 1)


@torch.no_grad()
def generate(model, task: Task, sources: list[str], tokenizer, *, max_length: int = 128, max_new_tokens: int = 64,
             num_beams: int = 1, batch_size: int = 16, precision: str = "fp32") -> list[str]:
    """Generated text for each source (greedy when num_beams == 1)."""
    enc = encode(task, [{"text": s} for s in sources], tokenizer, max_length, prompts_only=True, cache_dir=None)
    causal = task.kind == "causal_lm"
    collate = Collator(pad_id(tokenizer), padding_side="left" if causal else "right")
    dev = _device(model)
    out: list = [None] * len(sources)
    with eval_mode(model):
        for idx in batch_order(enc.lengths(), batch_size, 0, 0, shuffle=False):
            batch = {k: v.to(dev) for k, v in collate([enc.example(i) for i in idx]).items()}
            with autocast(precision, dev):
                ids = model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                     pad_token_id=pad_id(tokenizer), eos_token_id=tokenizer.eos_token_id)
            if causal:
                ids = ids[:, batch["input_ids"].shape[1]:]
            for i, text in zip(idx, tokenizer.batch_decode(ids, skip_special_tokens=True)):
                out[i] = text.strip()
    return out


def evaluate(model, task: Task, examples: list[dict], tokenizer, *, max_length: int = 128, batch_size: int = 64,
             precision: str = "fp32", generation: bool = True, max_new_tokens: int = 64, num_beams: int = 1,
             encoded: Encoded | None = None, limit_sources: int | None = None) -> dict[str, float]:
    """The task's metrics on ``examples``. Generation tasks: BLEU/ROUGE-L when ``generation``, else the loss."""
    if task.generative:
        out = {}
        enc = encoded if encoded is not None else encode(task, examples, tokenizer, max_length)
        out["loss"] = mean_loss(model, enc, tokenizer, max(1, batch_size // 2), precision)
        if generation:
            sources, refs = group_references(examples)
            if limit_sources:
                sources, refs = sources[:limit_sources], refs[:limit_sources]
            preds = generate(model, task, sources, tokenizer, max_length=max_length, max_new_tokens=max_new_tokens,
                             num_beams=num_beams, batch_size=max(1, batch_size // 4), precision=precision)
            out.update(compute(task, preds, refs))
        return out
    enc = encoded if encoded is not None else encode(task, examples, tokenizer, max_length)
    preds = predict(model, task, enc, tokenizer, batch_size, precision)
    metrics = compute(task, preds, [e["target"] for e in examples])
    return {k: (0.0 if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
