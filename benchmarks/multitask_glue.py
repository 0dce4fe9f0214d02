"""Three GLUE tasks with MiniLM: separate deltas vs one shared delta vs per-task deltas trained together (routing).

    python benchmarks/multitask_glue.py --data-dir ../shared/data/glue                      # sst2,cola,mrpc
    python benchmarks/multitask_glue.py --data-dir ../shared/data/glue --tasks sst2,rte,mrpc --method ia3
    python benchmarks/multitask_glue.py --data-dir ../shared/data/glue --tiny               # a smoke run

Three arms with one budget (the same examples seen: one pass over each task's training subset):

* separate   -- `unipeft train` once per task (three base passes, three deltas);
* shared     -- `unipeft train --task a,b,c --deltas shared` (one delta and one wide head, each task its
                slice of the head);
* per-task   -- `unipeft train --task a,b,c --deltas per-task`: one delta per task, all trained in the
                same mixed batches through `up.route` (one pass over the base for all tasks; each
                row updates its own task's delta only).

The notes (seed 001): "training separately on each task is more expensive than training on all tasks
at once". Reported per arm: each task's dev metric (its main metric: accuracy, or Matthews correlation
for CoLA), the mean, training seconds and wall seconds. Writes <out>/summary.{md,json} and each run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from unipeft import fileio  # noqa: E402
from unipeft.training import multitask, run  # noqa: E402
from unipeft.training.cli import setup_runtime  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="GLUE root holding SST-2/, CoLA/, MRPC/, RTE/")
    ap.add_argument("--tasks", default="sst2,cola,mrpc")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--train-size", type=int, default=2000, help="training examples per task")
    ap.add_argument("--dev-size", type=int, default=500, help="dev examples per task")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, help="per arm (separate: per task)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--sampling", default="proportional", choices=("proportional", "temperature"))
    ap.add_argument("--arms", default="separate,shared,per_task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="smoke run: 24 examples per task, 2 steps")
    ap.add_argument("--out", default="benchmarks/results/multitask_glue")
    args = ap.parse_args(argv)
    if not Path(args.data_dir).is_dir():
        sys.exit(f"--data-dir {args.data_dir} is not a folder")
    if args.tiny:
        args.train_size, args.dev_size, args.max_steps, args.batch_size, args.max_length = 24, 16, 2, 8, 32
    setup_runtime(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    data = {"data_dir": args.data_dir, "train_size": args.train_size, "dev_size": args.dev_size}
    settings = dict(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                    max_length=args.max_length, seed=args.seed, eval_every=0, progress=False)
    out = Path(args.out)
    arms: dict[str, dict] = {}
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        t0 = time.perf_counter()
        if arm == "separate":
            dev, secs = {}, 0.0
            for t in tasks:
                res = run.train("minilm", t, args.method, out=out / "separate" / t, data=data, **settings)
                main = res["_dataset"].task.main_metric
                dev[t], secs = {"metric": main, "value": res["dev"][main]}, secs + res["train_seconds"]
        elif arm in ("shared", "per_task"):
            res = multitask.train("minilm", tasks, args.method, data=data, out=out / arm, deltas=arm,
                                  sampling=args.sampling, **settings)
            trainer = res["_trainer"]
            dev = {m.name: {"metric": m.task.main_metric, "value": res["dev"][m.name][m.task.main_metric]}
                   for m in trainer.members}
            secs = res["train_seconds"]
        else:
            sys.exit(f"unknown arm {arm!r}; valid: separate, shared, per_task")
        arms[arm] = {"dev": dev, "mean": sum(v["value"] for v in dev.values()) / len(dev), "train_seconds": secs,
                     "wall_seconds": time.perf_counter() - t0}
    head = "| Arm | " + " | ".join(f"{t} ({arms[next(iter(arms))]['dev'][t]['metric']})" for t in tasks) + \
        " | mean | train s | wall s |"
    lines = [f"# Multi-task GLUE with MiniLM ({args.method}): separate vs shared vs per-task deltas", "",
             f"{args.train_size} train / {args.dev_size} dev examples per task, batch {args.batch_size}, "
             f"max length {args.max_length}, {args.sampling} mixing, seed {args.seed}.", "", head,
             "|---|" + "---|" * (len(tasks) + 3)]
    for arm, r in arms.items():
        lines.append(f"| {arm} | " + " | ".join(f"{r['dev'][t]['value']:.3f}" for t in tasks)
                     + f" | {r['mean']:.3f} | {r['train_seconds']:.0f} | {r['wall_seconds']:.0f} |")
    fileio.write_text(out / "summary.md", "\n".join(lines) + "\n")
    fileio.write_json(out / "summary.json", {"tasks": tasks, "method": args.method, "args": vars(args),
                                             "arms": arms}, indent=2, default=str)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
