"""``unipeft analyze intrinsic-dim``: the d90 sweep of ``unipeft.analysis.intrinsic_dim`` from the command line.

    unipeft analyze intrinsic-dim --model minilm --task sst2 --data-dir ../shared/data/glue \\
        --dims 10,100,1000,10000 --train-size 2000 --max-steps 300 --out out/d90 --plot out/d90/d90.png
    unipeft analyze intrinsic-dim --report out/d90 --plot d90.png      # table / figure of a finished sweep
"""
from __future__ import annotations

import json

from ..errors import UnipeftError


def _dims(text: str) -> list[int]:
    try:
        dims = [int(float(t)) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UnipeftError(f"--dims must be comma-separated integers such as 10,100,1000, got {text!r}") from None
    if not dims or min(dims) < 1:
        raise UnipeftError(f"--dims must be comma-separated integers >= 1, got {text!r}")
    return dims


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="minilm", help="base model: 'minilm', 'smollm2' or a local folder")
    parser.add_argument("--task", default="sst2", help="task name (sst2, mrpc, bbc, ...) as for `unipeft train`")
    parser.add_argument("--data-dir", help="the task's data folder (GLUE root for GLUE tasks)")
    parser.add_argument("--train", help="your own training file (.csv, .tsv, .jsonl), as for `unipeft train`")
    parser.add_argument("--dev", help="your own dev file (the metric is read on it)")
    parser.add_argument("--train-size", type=int, help="train on the first N examples (shuffled)")
    parser.add_argument("--dev-size", type=int, help="score on N dev examples")
    parser.add_argument("--dims", default="10,100,1000,10000", help="the sweep of d (comma-separated)")
    parser.add_argument("--projection", default="fastfood", choices=("fastfood", "dense", "sparse"))
    parser.add_argument("--said", action="store_true", help="structure-aware: one learned scale per weight matrix")
    parser.add_argument("--fraction", type=float, default=0.9, help="the level d is read at (0.9: d90)")
    parser.add_argument("--out", default="out/intrinsic-dim", help="folder for the runs and intrinsic_dim.json")
    parser.add_argument("--max-steps", type=int, help="optimizer steps per run (default: one epoch)")
    parser.add_argument("--epochs", type=float, help="epochs per run")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, help="learning rate of the subspace runs (default: the method's)")
    parser.add_argument("--full-lr", type=float, help="learning rate of full fine-tuning (default: the method's)")
    parser.add_argument("--report", metavar="DIR", help="print (and --plot) a finished sweep instead of training")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--plot", metavar="PNG", help="write the metric-against-d figure (log scale)")


def run(args) -> int:
    from . import intrinsic_dim

    dims = _dims(args.dims)
    if args.report:
        report = intrinsic_dim.read_report(args.report)
    else:
        data = {k: v for k, v in (("data_dir", args.data_dir), ("train", args.train), ("dev", args.dev),
                                  ("train_size", args.train_size), ("dev_size", args.dev_size)) if v is not None}
        say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
        report = intrinsic_dim.sweep(
            args.model, args.task, dims, out=args.out, data=data, projection=args.projection, said=args.said,
            fraction=args.fraction, full_settings={"lr": args.full_lr}, intrinsic_settings={"lr": args.lr}, say=say,
            max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
            seed=args.seed, progress=False)
    if args.plot:
        intrinsic_dim.plot(report, args.plot)
    if args.json:
        print(json.dumps({**report, "plot": args.plot}, default=str))
    else:
        print(intrinsic_dim.format_report(report))
        if args.plot:
            print(f"wrote {args.plot}")
    return 0
