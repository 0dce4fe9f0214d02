"""Instruction tuning SmolLM2-135M-Instruct with LoRA on a small chat set built from E2E (--kind chat).

    python benchmarks/chat_smollm2.py --data-dir ../shared/data/e2e                 # 2000 chats, 1 epoch
    python benchmarks/chat_smollm2.py --data-dir ../shared/data/e2e --tiny          # a smoke run

The chat set: each E2E row becomes a conversation, a user turn "Describe this restaurant in one
sentence: <meaning representation>" and the assistant's turn, the human reference. Training goes
through `unipeft.training.run.train` with ``kind="chat"``: SmolLM2's own chat template, the loss on
the assistant turn only. Held out: conversations whose meaning representation is not in training
(E2E's test file). Reported: the loss on the held-out conversations with the delta off (the
instruct model as shipped) and on, BLEU/ROUGE-L of the generated replies, and before/after replies
for a few held-out prompts. Writes <out>/chats/{train,dev}.jsonl, <out>/run/ and <out>/summary.{md,json}.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import unipeft as up  # noqa: E402
from unipeft import fileio  # noqa: E402
from unipeft.training import run  # noqa: E402
from unipeft.training.cli import setup_runtime  # noqa: E402
from unipeft.training.evaluation import evaluate, generate  # noqa: E402

PROMPT = "Describe this restaurant in one sentence: {mr}"


def chats(path: Path, n: int, seed: int, one_per_mr: bool) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(r["mr"].strip(), r["ref"].strip()) for r in csv.DictReader(f)]
    if one_per_mr:  # held out: one conversation per meaning representation
        rows = list({mr: (mr, ref) for mr, ref in rows}.values())
    random.Random(seed).shuffle(rows)
    return [{"messages": [{"role": "user", "content": PROMPT.format(mr=mr)}, {"role": "assistant", "content": ref}]}
            for mr, ref in rows[:n]]


def write_jsonl(path: Path, convs: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs), encoding="utf-8")
    return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="folder with E2E's train.csv and test.csv")
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--dev-size", type=int, default=100, help="held-out conversations (distinct MRs)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--packing", action="store_true", help="pack short conversations into rows of --max-length")
    ap.add_argument("--examples", type=int, default=3, help="before/after replies shown")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="smoke run: 24 chats, 6 held out, 2 steps, 12 new tokens")
    ap.add_argument("--out", default="benchmarks/results/chat_smollm2")
    args = ap.parse_args(argv)
    d = Path(args.data_dir)
    if not (d / "train.csv").is_file() or not (d / "test.csv").is_file():
        sys.exit(f"--data-dir {d} must hold E2E's train.csv and test.csv")
    if args.tiny:
        args.train_size, args.dev_size, args.max_steps, args.batch_size = 24, 6, 2, 4
        args.max_new_tokens, args.max_length, args.examples = 12, 96, 2
    setup_runtime(args.threads)
    out = Path(args.out)
    train = write_jsonl(out / "chats" / "train.jsonl", chats(d / "train.csv", args.train_size, 0, False))
    dev = write_jsonl(out / "chats" / "dev.jsonl", chats(d / "test.csv", args.dev_size, 0, True))
    t0 = time.perf_counter()
    res = run.train("smollm2", "e2e-chat", "lora", out=out / "run", data={"train": train, "dev": dev, "kind": "chat"},
                    epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                    max_length=args.max_length, max_new_tokens=args.max_new_tokens, packing=args.packing,
                    eval_every=0, progress=False)
    wall = time.perf_counter() - t0
    model, tok, ds = res["_model"], res["_tokenizer"], res["_dataset"]
    name = up.active(model)[0]
    dev_examples = ds.splits["dev"]
    kw = dict(max_length=args.max_length, batch_size=16, precision=res["precision"], max_new_tokens=args.max_new_tokens)
    up.activate(model, [])
    before = evaluate(model, ds.task, dev_examples, tok, generation=True, label="held-out, delta off", **kw)
    shown = dev_examples[:args.examples]
    replies_before = generate(model, ds.task, [e["text"] for e in shown], tok, max_length=args.max_length,
                              max_new_tokens=args.max_new_tokens, precision=res["precision"])
    up.activate(model, [name])
    after = res["dev"]
    replies_after = generate(model, ds.task, [e["text"] for e in shown], tok, max_length=args.max_length,
                             max_new_tokens=args.max_new_tokens, precision=res["precision"])
    summary = {"model": "SmolLM2-135M-Instruct", "method": "lora", "train_conversations": len(ds.splits["train"]),
               "held_out": len(dev_examples), "steps": res["steps"], "train_seconds": res["train_seconds"],
               "wall_seconds": wall, "precision": res["precision"], "packing": args.packing,
               "trainable_params": res["trainable_params"], "before": before, "after": after,
               "examples": [{"prompt": json.loads(e["text"])[-1]["content"], "reference": e["target"],
                             "before": b, "after": a} for e, b, a in zip(shown, replies_before, replies_after)]}
    lines = ["# Instruction tuning SmolLM2-135M-Instruct with LoRA (chat data from E2E)", "",
             f"{summary['train_conversations']} training conversations, {summary['held_out']} held out (test MRs), "
             f"{res['steps']} steps in {res['train_seconds']:.0f} s ({res['precision']}"
             f"{', packed' if args.packing else ''}); loss on the assistant turns only.", "",
             "| | held-out loss | BLEU | ROUGE-L |", "|---|---|---|---|"]
    for label, m in (("before (delta off)", before), ("after (LoRA)", after)):
        lines.append(f"| {label} | {m.get('loss', float('nan')):.3f} | {m.get('bleu', float('nan')):.2f} | "
                     f"{m.get('rouge_l', float('nan')):.2f} |")
    lines += ["", "## Examples", ""]
    for ex in summary["examples"]:
        lines += [f"**Prompt:** {ex['prompt']}", "", f"- reference: {ex['reference']}", f"- before: {ex['before']}",
                  f"- after: {ex['after']}", ""]
    fileio.write_text(out / "summary.md", "\n".join(lines) + "\n")
    fileio.write_json(out / "summary.json", summary, indent=2, default=str)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
