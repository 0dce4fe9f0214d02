"""d90 of MiniLM on a GLUE task (Li et al. 2018; Aghajanyan et al. 2020; seeds 000, 002).

    python benchmarks/intrinsic_dim.py --data-dir ../shared/data/glue                      # SST-2, the full sweep
    python benchmarks/intrinsic_dim.py --data-dir ../shared/data/glue --task mrpc --said
    python benchmarks/intrinsic_dim.py --data-dir ../shared/data/glue --tiny               # a smoke run (< 1 min)

Runs ``unipeft analyze intrinsic-dim`` (``unipeft.analysis.intrinsic_dim.sweep``): full fine-tuning
once, then ``up.Intrinsic(d)`` (FastFood by default) at each d of the sweep, every run with the
same data, budget and seed; each run's dev metric against full fine-tuning's, d90 (the smallest d
reaching 90% of it), D (the parameters the subspace projects onto: every linear map of the blocks
and the token embedding) and MiniLM's parameter count. The notes' claim to compare with: d90 is a
tiny fraction of the parameter count (Aghajanyan et al.: about 200 parameters reach 90% of full
fine-tuning for RoBERTa on MRPC).

Writes <out>/intrinsic_dim.json, <out>/d90.png (metric against d, log x) and <out>/summary.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from unipeft.analysis import intrinsic_dim  # noqa: E402
from unipeft.training.cli import setup_runtime  # noqa: E402

DIMS = "10,30,100,300,1000,3000,10000,30000,100000"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="GLUE root holding SST-2/, MRPC/, ...")
    ap.add_argument("--task", default="sst2", choices=("sst2", "mrpc", "rte", "cola", "stsb"))
    ap.add_argument("--dims", default=DIMS)
    ap.add_argument("--projection", default="fastfood", choices=("fastfood", "dense", "sparse"))
    ap.add_argument("--said", action="store_true")
    ap.add_argument("--train-size", type=int, default=20000, help="training examples (SST-2 has 67k)")
    ap.add_argument("--dev-size", type=int, help="dev examples (default: all)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, help="subspace learning rate (default: unipeft's for intrinsic)")
    ap.add_argument("--full-lr", type=float, help="full fine-tuning learning rate (default: unipeft's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="smoke run: 2 dims, 32 examples, 2 steps")
    ap.add_argument("--out", default="benchmarks/results/intrinsic_dim")
    args = ap.parse_args(argv)
    if not Path(args.data_dir).is_dir():
        sys.exit(f"--data-dir {args.data_dir} is not a folder")
    if args.tiny:
        args.dims, args.train_size, args.dev_size, args.max_steps, args.batch_size = "10,100", 32, 16, 2, 16
        args.max_length = 32
    setup_runtime(args.threads)
    out = Path(args.out) / args.task
    data = {"data_dir": args.data_dir, "train_size": args.train_size}
    if args.dev_size:
        data["dev_size"] = args.dev_size
    t0 = time.perf_counter()
    report = intrinsic_dim.sweep(
        "minilm", args.task, [int(float(d)) for d in args.dims.split(",")], out=out, data=data,
        projection=args.projection, said=args.said, full_settings={"lr": args.full_lr},
        intrinsic_settings={"lr": args.lr}, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, progress=False)
    intrinsic_dim.plot(report, out / "d90.png")
    import unipeft as up
    from unipeft import zoo

    base_params = sum(p.numel() for p in zoo.minilm()[0].parameters())
    table = intrinsic_dim.format_report(report)
    lines = [f"# d90 of MiniLM on {report['task']}", "", "```", table, "```", "",
             f"MiniLM parameters: {base_params:,}; D (linear maps of the blocks and the token embedding): "
             f"{report.get('D', 0):,}; d90 / parameters: "
             + (f"{100 * report['d90'] / base_params:.3g}%" if report["d90"] else "not reached"),
             f"budget: {args.train_size} train examples, {args.epochs} epoch(s), batch {args.batch_size}, "
             f"max length {args.max_length}, {args.projection}{' SAID' if args.said else ''}, unipeft "
             f"{up.__version__}; {time.perf_counter() - t0:.0f} s in all", "", "![d90](d90.png)"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
