"""What the SST-2 benchmarks with a plain training loop share: the GLUE TSV reader, seeded padded
batches with labels, the training loop, and dev accuracy (``lora_family_sst2.py``, ``sparse_sst2.py``,
``qlora.py``, ``adapters_vs_adapterhub.py``)."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import torch


def read_tsv(path: Path, limit: int | None = None, start: int = 0) -> list[tuple[str, int]]:
    """(sentence, label) rows of a GLUE SST-2 TSV file, ``limit`` of them from row ``start``."""
    with open(path, newline="") as f:
        rows = [(r["sentence"], int(r["label"])) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return rows[start:start + limit] if limit else rows[start:]


def batches(tok, rows, size, seed=None, max_length=64) -> list[dict]:
    """Padded batches with labels, in file order or shuffled with ``seed``."""
    order = list(range(len(rows)))
    if seed is not None:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for i in range(0, len(order), size):
        chunk = [rows[j] for j in order[i:i + size]]
        enc = tok([s for s, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc["labels"] = torch.tensor([y for _, y in chunk])
        out.append(dict(enc))
    return out


@torch.no_grad()
def accuracy(model, dev) -> float:
    model.eval()
    right = total = 0
    for b in dev:
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
        right += int((logits.argmax(-1) == b["labels"]).sum())
        total += len(b["labels"])
    return right / total


def train(model, train_batches, lr, after_step=None, step_times: list | None = None) -> float:
    """The plain loop (AdamW, 6% linear warm-up then linear decay); returns seconds per optimizer
    step. ``after_step(step)`` runs after each optimizer step (peft's AdaLoRA needs its call there);
    ``step_times``, a list, gets each step's seconds (forward, backward, optimizer, zero_grad)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = len(train_batches)
    warm = max(1, int(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    model.train()
    t0 = time.perf_counter()
    for step, b in enumerate(train_batches):
        t = time.perf_counter()
        model(**b).loss.backward()
        opt.step()
        if after_step is not None:
            after_step(step)
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step_times is not None:
            step_times.append(time.perf_counter() - t)
    return (time.perf_counter() - t0) / steps
