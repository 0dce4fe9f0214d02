"""The benefits the notes claim for PEFT, measured for the first eight methods: forgetting, low data, changed parameters.

    python benchmarks/benefits.py --glue ../shared/data/glue --e2e ../shared/data/e2e          # everything
    python benchmarks/benefits.py --glue ../shared/data/glue --parts forgetting-sst2,low-data-sst2
    python benchmarks/benefits.py --glue ../shared/data/glue --e2e ../shared/data/e2e --tiny   # a smoke run

Parts (each one `unipeft compare` run, reports under <out>/<part>/):

* ``forgetting-sst2`` -- MiniLM on SST-2, ``--forgetting``: the changed-parameters column, and the
  masked-LM loss on general text before/after where the checkpoint has an MLM head (all-MiniLM-L6-v2,
  a sentence encoder, has none: a BBC News topic probe on its pooled features instead);
* ``forgetting-e2e``  -- SmolLM2-135M on E2E (causal LM), ``--forgetting``: perplexity of the general text
  shipped with unipeft with each method's delta off and on;
* ``low-data-sst2``   -- MiniLM on SST-2 at ``--sizes`` training examples over ``--seeds`` (the notes:
  PEFT wins at small |T|; prefix tuning beats full fine-tuning in low-data regimes);
* ``low-data-e2e``    -- the same for SmolLM2 on E2E (dev loss and BLEU; slow on CPU).

The methods: unipeft compare's default eight (full, lora, adapter, prefix, prompt, bitfit, ia3, freeze),
each with its default learning rate. Writes <out>/summary.md pointing at every part's tables.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from unipeft import fileio  # noqa: E402
from unipeft.analysis import low_data  # noqa: E402
from unipeft.compare_report import markdown_table  # noqa: E402
from unipeft.comparison import compare  # noqa: E402
from unipeft.training.cli import setup_runtime  # noqa: E402
from unipeft.training.defaults import COMPARE_DEFAULT  # noqa: E402

PARTS = ("forgetting-sst2", "forgetting-e2e", "low-data-sst2", "low-data-e2e")
FIRST_EIGHT = COMPARE_DEFAULT[:8]  # the "first eight methods"; the main job now runs 27


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--glue", help="GLUE root holding SST-2/")
    ap.add_argument("--e2e", help="folder with E2E's train.csv and test.csv")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--methods", default=",".join(FIRST_EIGHT), help=f"default: {','.join(FIRST_EIGHT)}")
    ap.add_argument("--train-size", type=int, default=5000, help="forgetting parts: training examples")
    ap.add_argument("--dev-size", type=int, default=500)
    ap.add_argument("--sizes", default="10,50,100,1000", help="low-data parts: training-set sizes")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--low-data-steps", type=int, default=100,
                    help="low-data parts: optimizer steps at every size (epochs mean nothing at n=10)")
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true",
                    help="low-data parts: keep the (size, seed) runs an earlier run with the same settings finished")
    ap.add_argument("--tiny", action="store_true", help="smoke run: lora and bitfit, 16 examples, 2 steps")
    ap.add_argument("--out", default="benchmarks/results/benefits")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        sys.exit(f"unknown part(s) {bad}; valid: {', '.join(PARTS)}")
    for p in parts:
        if p.endswith("sst2") and not args.glue or p.endswith("e2e") and not args.e2e:
            sys.exit(f"part {p} needs --{'glue' if p.endswith('sst2') else 'e2e'}")
    if args.tiny:
        args.methods, args.train_size, args.dev_size, args.max_steps = "lora,bitfit", 16, 8, 2
        args.sizes, args.seeds, args.low_data_steps, args.batch_size = "8,16", "0", 2, 8
    setup_runtime(args.threads)
    methods = args.methods.split(",")
    out = Path(args.out)
    lines = ["# The benefits the notes claim for PEFT, measured", ""]
    for part in parts:
        t0 = time.perf_counter()
        sst2 = part.endswith("sst2")
        model, task = ("minilm", "sst2") if sst2 else ("smollm2", "e2e")
        data = {"data_dir": args.glue if sst2 else args.e2e, "dev_size": args.dev_size}
        common = dict(out=out / part, threads=args.threads, in_process=False, quiet=False,
                      batch_size=args.batch_size, max_length=64 if sst2 else 96, progress=False)
        if not sst2:
            common["max_new_tokens"] = 48
        if part.startswith("forgetting"):
            rep = compare(model, task, methods, data={**data, "train_size": args.train_size}, forgetting=True,
                          epochs=args.epochs, max_steps=args.max_steps, **common)
            lines += [f"## {part}: {task} with {model}", "", markdown_table(rep), ""]
        else:
            summary = compare(model, task, methods, data=data, train_sizes=args.sizes, seeds=args.seeds.split(","),
                              max_steps=args.low_data_steps, resume=args.resume, **common)
            lines += [low_data.markdown(summary).replace("# ", "## ", 1), ""]
        lines.append(f"_{part}: {time.perf_counter() - t0:.0f} s; reports under {out / part}_")
        lines.append("")
    fileio.write_text(out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
