"""Vocabulary logits where they are used, against every position's: a SmolLM2-135M LoRA training step.

    python benchmarks/output_logits.py --e2e ../shared/data/e2e     # E2E (causal LM) and a prompt-based step
    python benchmarks/output_logits.py                              # the prompt-based step only

Two steps (forward + backward, LoRA r=8 on q and v), each timed both ways in interleaved rounds
(medians after two warm-up rounds):

* ``e2e``: 8 E2E training examples (meaning representation -> reference, the MR's tokens and the
  padding take no loss) with the trainer's loss (``training.evaluation.causal_lm_loss``: logits
  before target tokens only) against the model's own loss over every position;
* ``prompt``: 8 SST-2-like sentences scored by a verbalizer head (``prompting.head``, the word's
  logits after the template only) against the same scores picked from every position's logits.

The output layer is 28M of SmolLM2's 135M parameters (49,152 words x 576), so on short sequences it
is a good part of each step. Prints the two medians and their ratio per step.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--e2e", help="folder with E2E's train.csv (the e2e step runs when given)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import unipeft as up
    from unipeft import model_parts, zoo
    from unipeft.prompting import scoring
    from unipeft.prompting.head import PromptHead
    from unipeft.training.batching import Collator, encode
    from unipeft.training.evaluation import causal_lm_loss
    from unipeft.training.tasks import Task

    model, tok = zoo.smollm2()
    up.attach(model, up.LoRA(r=8))
    picked_logits = model_parts.logits_at

    def every_position(model, rows, positions, *, out_layer=None, **inputs):
        return model(**inputs).logits[rows, positions]

    steps = {}
    if args.e2e:
        rows = list(csv.DictReader(open(Path(args.e2e) / "train.csv", encoding="utf-8")))[:8]
        src, tgt = list(rows[0])[:2]
        enc = encode(Task("e2e", "causal_lm"), [{"text": r[src], "target": r[tgt]} for r in rows], tok, 128)
        batch = Collator(tok.pad_token_id or 0)([enc.example(i) for i in range(len(rows))])
        steps["e2e"] = (lambda: causal_lm_loss(model, batch), lambda: model(**batch).loss)
    head = PromptHead.build("{text} It was {label}.", "positive=great|good,negative=terrible|bad")
    net = head.wrap(model, tok)
    texts = [f"the film is a {w} and often affecting journey with a strong cast" for w in
             ("charming", "dull", "bright", "tired", "warm", "cold", "brave", "flat")]
    p = tok([t + " It was" for t in texts], return_tensors="pt", padding=True)
    labels = torch.tensor([0, 1] * 4)

    def prompt_loss():
        return net(input_ids=p["input_ids"], attention_mask=p["attention_mask"], labels=labels).loss

    def prompt_loss_every_position():
        scoring.logits_at = every_position
        try:
            return prompt_loss()
        finally:
            scoring.logits_at = picked_logits

    steps["prompt"] = (prompt_loss, prompt_loss_every_position)
    for name, (picked, full) in steps.items():
        times = {"picked": [], "every": []}
        for i in range(args.rounds + 2):
            for key, loss_of in (("picked", picked), ("every", full)):
                t = time.perf_counter()
                loss_of().backward()
                model.zero_grad(set_to_none=True)
                if i >= 2:
                    times[key].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{name}: logits where used {med['picked']:.0f} ms, at every position {med['every']:.0f} ms, "
              f"ratio {med['picked'] / med['every']:.3f} ({args.threads} threads, {args.rounds} rounds)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
