"""In-context learning speed: the shared prefix's KV cache and batched label scoring vs the naive loop.

    OMP_NUM_THREADS=1 python benchmarks/icl_speed.py --data-dir ../shared/data/glue/SST-2 --shots 4
    python benchmarks/icl_speed.py --tiny          # a smoke run on a tiny random GPT-2 (seconds)

Both arms score the same --examples SST-2 dev sentences under the same template, verbalizer
(positive: great | good, negative: terrible | bad) and k demonstrations (seeded, balanced) with
SmolLM2-135M: ``Scorer.scores`` (prefix encoded once, its cache copied per batch, every word of a
batch of examples in one forward pass) and ``Scorer.naive`` (one forward pass of the whole prompt per
example and word). Reported: seconds per arm, the speed-up (goal >= 3x at 4 shots), the largest
difference between their label log-probabilities, and whether their answers agree; JSON with --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from unipeft.prompting import Scorer, Template, Verbalizer, sample_demonstrations  # noqa: E402

TEMPLATE = "Review: {text}\nSentiment: {label}"
WORDS = {"negative": ["terrible", "bad"], "positive": ["great", "good"]}


def sst2(data_dir: str, split: str) -> list[dict]:
    with open(Path(data_dir) / f"{split}.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [{"text": r[0].strip(), "target": int(r[1])} for r in rows]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/glue/SST-2")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny random GPT-2 and synthetic sentences (smoke test)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    if args.tiny:
        import tiny

        model, tok = tiny.make("gpt2", "lm"), tiny.tokenizer("gpt2")
        rows = [{"text": t, "target": y} for t, y in tiny.sentiment_rows(args.examples + 20)]
        train, dev = rows[:20], rows[20:]
        template, words = Template("{text} . it was {label} ."), {"negative": ["bad", "very poor"],
                                                                  "positive": ["good", "very nice"]}
    else:
        from unipeft import zoo

        model, tok = zoo.smollm2()
        train, dev = sst2(args.data_dir, "train"), sst2(args.data_dir, "dev")[:args.examples]
        template, words = Template(TEMPLATE), WORDS
    model = model.to(args.device).eval()
    names = list(words)
    demos = [(d["text"], names[d["target"]]) for d in sample_demonstrations(train, args.shots, args.seed, True)]
    examples = [(e["text"], None) for e in dev]

    def scorer():
        return Scorer(model, tok, template, Verbalizer(words), demos, batch_size=args.batch_size)

    scorer().scores(examples[:2])  # warm-up; the timed cached arm below encodes its prefix itself

    def timed(fn):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(examples)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    cached, t_cached = timed(scorer().scores)
    naive, t_naive = timed(scorer().naive)
    prefix = scorer().prefix
    res = {"model": "tiny-gpt2" if args.tiny else "SmolLM2-135M", "device": args.device, "shots": args.shots,
           "examples": len(examples), "prefix_tokens": len(prefix), "words": sum(map(len, words.values())),
           "cached_s": t_cached, "naive_s": t_naive, "speedup": t_naive / t_cached,
           "max_abs_diff": float((cached - naive).abs().max()),
           "same_answers": bool((cached.argmax(-1) == naive.argmax(-1)).all())}
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
