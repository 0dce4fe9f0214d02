"""GLUE with the pretrained MiniLM: every method through `unipeft compare`, one report per task.

    python benchmarks/glue_minilm.py --data-dir ../shared/data/glue                 # the whole grid
    python benchmarks/glue_minilm.py --data-dir ../shared/data/glue --tasks sst2 --methods full,lora
    python benchmarks/glue_minilm.py --data-dir ../shared/data/glue --tasks sst2 --methods lora \
        --method-option lora.targets=ffn_in,ffn_out --method-setting lora.lr=5e-4

Defaults (per task): SST-2 runs full, LoRA, BitFit, adapter, (IA)3, prefix and prompt tuning;
RTE, MRPC, CoLA and STS-B run full, LoRA and BitFit. Every method gets the same budget
(epochs, batch size, max length) and its own default learning rate (unipeft/training/defaults.py);
the dev metric is that of the best evaluation (evaluated each epoch, or every --eval-every steps).

Writes <out>/<task>/report.{md,json} (+ plots) and <out>/summary.md, a table of the main metric
per task and method with the trainable-parameter share and training time. The GLUE files are
never shipped with unipeft: point --data-dir at a folder in the GLUE layout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from unipeft.comparison import compare  # noqa: E402
from unipeft.training.cli import setup_runtime  # noqa: E402
from unipeft.training.defaults import parse_method_options  # noqa: E402

TASK_METHODS = {
    "sst2": "full,lora,bitfit,adapter,ia3,prefix,prompt",
    "rte": "full,lora,bitfit",
    "mrpc": "full,lora,bitfit",
    "cola": "full,lora,bitfit",
    "stsb": "full,lora,bitfit",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="GLUE root holding SST-2/, RTE/, MRPC/, CoLA/, STS-B/")
    ap.add_argument("--tasks", default=",".join(TASK_METHODS))
    ap.add_argument("--methods", help="override the per-task method list")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--eval-every", type=int, help="steps between evaluations (default: each epoch)")
    ap.add_argument("--train-size", type=int, help="subsample the training set (quick runs)")
    ap.add_argument("--method-option", action="append", metavar="[METHOD.]OPTION=VALUE",
                    help="a method option, e.g. lora.r=16 or lora.targets=ffn_in,ffn_out (repeatable)")
    ap.add_argument("--method-setting", action="append", metavar="METHOD.SETTING=VALUE",
                    help="a training setting for one method, e.g. lora.lr=5e-4 (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--in-process", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/glue")
    args = ap.parse_args(argv)
    if not Path(args.data_dir).is_dir():
        sys.exit(f"--data-dir {args.data_dir} is not a folder")
    setup_runtime(args.threads)
    out = Path(args.out)
    rows = []
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        methods = (args.methods or TASK_METHODS[task]).split(",")
        options = parse_method_options(args.method_option, methods)
        per_method = parse_method_options(args.method_setting, methods, what="method setting")
        data = {"data_dir": args.data_dir}
        if args.train_size:
            data["train_size"] = args.train_size
        t0 = time.perf_counter()
        report = compare("minilm", task, methods, out=out / task, data=data, threads=args.threads,
                         method_options=options, method_settings=per_method,
                         in_process=args.in_process, epochs=args.epochs, batch_size=args.batch_size,
                         max_length=args.max_length, eval_every=args.eval_every)
        print(f"{task}: {time.perf_counter() - t0:.0f} s")
        for m in report["methods"]:
            rows.append((task, report["main_metric"], m))
    lines = ["| task | method | trainable | main metric | other metrics | train time | lr |", "|---|---|---|---|---|---|---|"]
    for task, main_metric, m in rows:
        if m.get("error"):
            lines.append(f"| {task} | {m['method']} | | failed: {m['error']} | | | |")
            continue
        others = ", ".join(f"{k} {v:.3f}" for k, v in m["metrics"].items() if k != main_metric)
        lines.append(f"| {task} | {m['label']} | {m['trainable_pct']:.2f}% | {main_metric} "
                     f"{m['metrics'].get(main_metric, float('nan')):.4f} | {others} | {m['train_seconds']:.0f} s | "
                     f"{m['lr']:g} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps([{"task": t, **m} for t, _, m in rows], indent=1, default=str))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
