"""`unipeft search`: its arguments (the training ones, shared with `unipeft train`) and its run."""
from __future__ import annotations

import argparse
import json


def add_search(p: argparse.ArgumentParser) -> None:
    from ..training.cli import add_data_arguments, add_model_task_arguments, add_train_arguments

    add_model_task_arguments(p)
    g = p.add_argument_group("search (Chen et al. 2023, S4)")
    g.add_argument("--out", required=True, help="search directory: runs.jsonl (resumable), search.json, best.yaml")
    g.add_argument("--budget", type=float, default=0.005,
                   help="trainable parameters as a fraction of the base model (default 0.005: 0.5%%)")
    g.add_argument("--groups", type=int, default=4, help="layer groups G (default 4)")
    g.add_argument("--runs", type=int, default=40,
                   help="training runs in all, split over the four stages (default 40); each stage runs at least "
                        "one per option, so a small number runs a few more")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    add_data_arguments(p)
    add_train_arguments(p)


def run_search(args) -> int:
    from ..training.cli import TRAIN_FLAGS, collect, data_options, setup_runtime
    from .run import search

    setup_runtime(args.threads, args.quiet)
    settings = {k: v for k, v in collect(args, TRAIN_FLAGS).items() if k not in ("seed", "threads")}
    result = search(args.model, args.task, out=args.out, budget=args.budget, groups=args.groups, runs=args.runs,
                    seed=args.seed or 0, data=data_options(args), say=(lambda *a: None) if args.quiet else print,
                    **settings)
    if args.json:
        print(json.dumps(result))
    return 0
