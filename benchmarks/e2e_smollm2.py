"""E2E table-to-text with SmolLM2-135M: LoRA and prefix tuning, BLEU / ROUGE-L / NIST / chrF on the test file.

    python benchmarks/e2e_smollm2.py --data-dir ../shared/data/e2e
    python benchmarks/e2e_smollm2.py --data-dir ../shared/data/e2e --methods lora --epochs 0.25 --test-size 100

The E2E files here: train.csv is the official E2E development set (4,672 rows; 5% of its distinct
meaning representations are held out as dev), test.csv the official test set (4,693 rows, 630
distinct MRs with several references each). The model reads "<mr>\\n" and learns to write the
reference; generation is greedy (or --num-beams) up to 64 new tokens, scored against all references
of each MR. Each method runs through `unipeft.training.run.train` with its default learning rate.
Writes <out>/<method>/ (the run) and <out>/summary.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from unipeft.training import run  # noqa: E402
from unipeft.training.cli import setup_runtime  # noqa: E402
from unipeft.training.data import load_task  # noqa: E402
from unipeft.training.evaluation import evaluate  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="folder with train.csv and test.csv")
    ap.add_argument("--methods", default="lora,prefix")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--num-beams", type=int, default=1)
    ap.add_argument("--test-size", type=int, help="score only the first N distinct test MRs (quick runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/e2e")
    args = ap.parse_args(argv)
    setup_runtime(args.threads)
    out = Path(args.out)
    rows = []
    test = load_task("e2e", data_dir=args.data_dir).splits["test"]
    if args.test_size:  # keep every reference of the first N sources
        keep = list(dict.fromkeys(e["text"] for e in test))[:args.test_size]
        test = [e for e in test if e["text"] in set(keep)]
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        res = run.train("smollm2", "e2e", method, out=out / method, data={"data_dir": args.data_dir},
                        evaluate_test=False, epochs=args.epochs, batch_size=args.batch_size,
                        max_length=args.max_length, eval_every=0, progress=True)
        t_train = time.perf_counter() - t0
        t1 = time.perf_counter()
        metrics = evaluate(res["_model"], res["_dataset"].task, test, res["_tokenizer"], max_length=args.max_length,
                           batch_size=64, precision=res["precision"], num_beams=args.num_beams, max_new_tokens=64)
        row = {"method": method, "trainable_params": res["trainable_params"], "steps": res["steps"],
               "train_seconds": res["train_seconds"], "wall_seconds": t_train, "test_seconds":
               time.perf_counter() - t1, "test_sources": len({e["text"] for e in test}), "lr": res["lr"],
               "dev_loss": res.get("dev", {}).get("loss"), **metrics}
        rows.append(row)
        print(json.dumps(row))
    lines = ["| method | trainable | steps | train time | BLEU | ROUGE-L | NIST | chrF | test loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['steps']} | {r['train_seconds']:.0f} s | "
                     f"{r.get('bleu', float('nan')):.1f} | {r.get('rouge_l', float('nan')):.1f} | "
                     f"{r.get('nist', float('nan')):.2f} | {r.get('chrf', float('nan')):.1f} | {r['loss']:.3f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
