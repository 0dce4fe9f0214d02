"""Evaluation: predictions, dev loss and generation for every task kind, then the task's metrics.

* classification / regression: one forward pass per batch (sorted by length, order restored);
* causal_lm / seq2seq: ``generate`` (greedy or beam search) on each distinct source, scored
  against all of its references (E2E has several per source), or the dev loss when a
  cheaper signal is enough (evaluation during training).

Works for every method, prompt and prefix tuning included: they act inside the model's
forward, so ``generate`` needs nothing special.

Under several processes (``accelerator`` given) each process takes every N-th example and the
predictions, generated texts and loss sums are gathered, so every process gets the same metrics.
Under FSDP every process evaluates every example instead: a sharded forward pass needs all
processes to run the same batches together.
"""
from __future__ import annotations

import contextlib
import math

import torch

from .. import progress
from . import distributed as dist
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


def shard_of(model, accelerator) -> tuple[int, int, torch.device] | None:
    """(rank, processes, device) when evaluation is split between processes; None when this process
    evaluates everything (one process, or FSDP, whose sharded forward needs every process in step)."""
    if accelerator is None or accelerator.num_processes == 1:
        return None
    if any(dist.is_sharded(p) for p in model.parameters()):
        return None
    return accelerator.process_index, accelerator.num_processes, accelerator.device


def _batches(lengths: list[int], batch_size: int, shard) -> list[list[int]]:
    """Length-sorted batches of this process's examples (all of them without ``shard``)."""
    mine = list(range(len(lengths))) if shard is None else list(range(shard[0], len(lengths), shard[1]))
    return [[mine[j] for j in b] for b in batch_order([lengths[i] for i in mine], batch_size, 0, 0, shuffle=False)]


def _gather_by_index(out: list, local: list, shard) -> list:
    """Fill ``out`` with every process's (index, value) pairs; values pass through JSON unchanged."""
    if shard is None:
        for i, v in local:
            out[i] = v
        return out
    for part in dist.all_gather_json(local, shard[2]):
        for i, v in part:
            out[i] = v
    return out


@contextlib.contextmanager
def eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _speaks(shard) -> bool:
    """Only the main process shows progress."""
    return shard is None or shard[0] == 0


@torch.no_grad()
def predict(model, task: Task, enc: Encoded, tokenizer, batch_size: int = 64, precision: str = "fp32", shard=None,
            label: str = "predicting"):
    """Label ids (classification) or numbers (regression) for every example, in order."""
    collate = Collator(pad_id(tokenizer))
    dev = _device(model)
    local: list = []
    with eval_mode(model), progress.phase(f"{label}: forward passes", len(enc), "examples", _speaks(shard)) as bar:
        for idx in _batches(enc.lengths(), batch_size, shard):
            bar.update(len(idx) * (1 if shard is None else shard[1]))
            batch = collate([enc.example(i) for i in idx])
            batch.pop("labels", None)
            with autocast(precision, dev):
                logits = model(**{k: v.to(dev) for k, v in batch.items()}).logits.float()
            vals = logits.argmax(-1).tolist() if task.kind == "classification" else logits.reshape(-1).tolist()
            local += [[i, v] for i, v in zip(idx, vals)]
    return _gather_by_index([None] * len(enc), local, shard)


def causal_lm_loss(model, batch: dict, out_layer=None) -> torch.Tensor:
    """A causal LM's mean next-token loss over the batch's target tokens, as the model's own loss computes
    it (the logits at position p predict the label at p + 1; IGNORE labels do not count), with the
    vocabulary logits computed at the predicting positions only (``model_parts.logits_at``): a
    prompt's and the padding's positions cost no vocabulary product, no log-softmax, no memory."""
    from ..model_parts import logits_at

    labels = batch["labels"]
    rows, pos = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    if not len(rows):  # no target token at all: the model's own (undefined) loss, as before
        return model(**batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = logits_at(model, rows, pos, out_layer=out_layer, **inputs)
    return torch.nn.functional.cross_entropy(logits.float(), labels[rows, pos + 1])


@torch.no_grad()
def mean_loss(model, enc: Encoded, tokenizer, batch_size: int = 32, precision: str = "fp32", shard=None,
              label: str = "evaluating", causal: bool = False) -> float:
    """The loss over a split, weighted by examples (or by target tokens for generation tasks). ``causal``:
    a causal LM's loss from the logits before its target tokens only (``causal_lm_loss``)."""
    collate = Collator(pad_id(tokenizer))
    dev = _device(model)
    total, weight = 0.0, 0
    with eval_mode(model), progress.phase(f"{label}: loss", len(enc), "examples", _speaks(shard)) as bar:
        for idx in _batches(enc.lengths(), batch_size, shard):
            bar.update(len(idx) * (1 if shard is None else shard[1]))
            batch = {k: v.to(dev) for k, v in collate([enc.example(i) for i in idx]).items()}
            with autocast(precision, dev):
                loss = (causal_lm_loss(model, batch) if causal else model(**batch).loss).float().item()
            labels = batch["labels"]
            # the loss is a mean over target tokens (generation) or examples: weight it back (a causal LM
            # predicts from position 1 on: a label at position 0 has no logits before it)
            w = int(((labels[:, 1:] if causal else labels) != IGNORE).sum()) if labels.dim() == 2 else len(idx)
            total += loss * w
            weight += w
    if shard is not None:  # summed in rank order, so every process gets the same number
        parts = dist.all_gather_json([total, weight], shard[2])
        total, weight = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return total / max(weight, 1)


@torch.no_grad()
def generate(model, task: Task, sources: list[str], tokenizer, *, max_length: int = 128, max_new_tokens: int = 64,
             num_beams: int = 1, batch_size: int = 16, precision: str = "fp32", shard=None,
             label: str = "generating") -> list[str]:
    """Generated text for each source (greedy when num_beams == 1), in length-sorted batches with the
    KV cache (``generate``'s default), so a batch pads little and every step reuses the cache."""
    enc = encode(task, [{"text": s} for s in sources], tokenizer, max_length, prompts_only=True, cache_dir=None,
                 quiet=True)
    causal = task.causal
    collate = Collator(pad_id(tokenizer), padding_side="left" if causal else "right")
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if task.kind == "chat":  # a reply ends at the template's end of turn
        from .chat import end_of_turn_ids

        stop += [i for i in end_of_turn_ids(tokenizer, task.chat_template) if i not in stop]
    dev = _device(model)
    local: list = []
    with eval_mode(model), progress.phase(f"{label}: generation", len(sources), "sources", _speaks(shard)) as bar:
        for idx in _batches(enc.lengths(), batch_size, shard):
            bar.update(len(idx) * (1 if shard is None else shard[1]))
            batch = {k: v.to(dev) for k, v in collate([enc.example(i) for i in idx]).items()}
            with autocast(precision, dev):
                ids = model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                     pad_token_id=pad_id(tokenizer), eos_token_id=stop or None)
            if causal:
                ids = ids[:, batch["input_ids"].shape[1]:]
            local += [[i, text.strip()] for i, text in zip(idx, tokenizer.batch_decode(ids, skip_special_tokens=True))]
    return _gather_by_index([None] * len(sources), local, shard)


def cap_examples(task: Task, examples: list[dict], max_examples: int | None) -> list[dict]:
    """The first ``max_examples`` examples (generation tasks: the first that many distinct sources,
    each with all of its references); all of them when None."""
    if not max_examples or max_examples >= len(examples):
        return examples
    if not task.generative:
        return examples[:max_examples]
    kept: set = set()
    for e in examples:
        if len(kept) == max_examples and e["text"] not in kept:
            continue
        kept.add(e["text"])
    return [e for e in examples if e["text"] in kept]


def evaluate(model, task: Task, examples: list[dict], tokenizer, *, max_length: int = 128, batch_size: int = 64,
             precision: str = "fp32", generation: bool = True, max_new_tokens: int = 64, num_beams: int = 1,
             encoded: Encoded | None = None, max_examples: int | None = None, accelerator=None,
             label: str = "evaluating") -> dict[str, float]:
    """The task's metrics on ``examples``. Generation tasks: BLEU/ROUGE-L when ``generation``, else the loss.
    ``max_examples`` caps the examples (distinct sources for generation); ``label`` names the phase
    in progress lines ("scoring test").

    With an ``accelerator`` of several processes, every process must call this (see the module's docstring).
    """
    shard = shard_of(model, accelerator)
    if max_examples and max_examples < len(examples):
        examples, encoded = cap_examples(task, examples, max_examples), None
    speaks = _speaks(shard)
    if task.generative:
        out = {}
        sources, refs = group_references(examples)
        what = (f"{len(sources):,} sources, {sum(map(len, refs)):,} references, generation up to "
                f"{max_new_tokens} tokens" + (f", {num_beams} beams" if num_beams > 1 else "")) if generation \
            else f"{len(examples):,} examples, loss only"
        progress.note(f"{label}: {what}", speaks)
        enc = encoded if encoded is not None else encode(task, examples, tokenizer, max_length, quiet=True)
        out["loss"] = mean_loss(model, enc, tokenizer, max(1, batch_size // 2), precision, shard, label,
                                causal=task.causal)
        if generation:
            preds = generate(model, task, sources, tokenizer, max_length=max_length, max_new_tokens=max_new_tokens,
                             num_beams=num_beams, batch_size=max(1, batch_size // 4), precision=precision,
                             shard=shard, label=label)
            with progress.phase(f"{label}: scoring {', '.join(task.metrics)}", enabled=speaks):
                out.update(compute(task, preds, refs))
        return out
    enc = encoded if encoded is not None else encode(task, examples, tokenizer, max_length, quiet=True)
    preds = predict(model, task, enc, tokenizer, batch_size, precision, shard, label)
    metrics = compute(task, preds, [e["target"] for e in examples])
    return {k: (0.0 if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
