"""The S4 design-space search on SST-2 with MiniLM, and what it found against single methods at the
same parameter budget (Chen et al. 2023; the notes, seed 000 "Hybrid PEFT: S4").

    python benchmarks/s4_sst2.py --data-dir ../shared/data/glue/SST-2                 # search + comparison
    python benchmarks/s4_sst2.py --data-dir ../shared/data/glue/SST-2 --final-train-size 20000
    python benchmarks/s4_sst2.py --data-dir ../shared/data/glue/SST-2 --train-size 64 --runs 4 --seeds 0 --max-steps 2  # smoke

1. ``unipeft search`` (``unipeft.search.search``) at ``--budget`` (0.5% of MiniLM's parameters) with
   ``--runs`` short runs: ``--train-size`` sentences, one epoch, batch 32, 64 tokens, fp32, one rate
   (``--lr``) for every design. Runs are logged in ``<out>/search/runs.jsonl``: a second start reuses
   them, so this step costs nothing once done.
2. Each of these designs trained again with every seed of ``--seeds``, under the same settings (seed 0
   is the search's own run, so it repeats its score exactly; the others say how much of the winner's
   lead was the luck of being picked as the best of many noisy runs):

   * the search's winner;
   * the design the notes report for T5 at 0.1% (spindle grouping, uniform allocation, every group
     tuned; G1 A+L, G2 A+P, G3 A+P+B, G4 P+B+L), sized to this budget;
   * each single strategy over all blocks at the same budget (LoRA on W_q, W_v; a Pfeiffer adapter;
     prefix tuning trained directly), and BitFit (its size is the model's biases: 0.12% here).

   ``--final-train-size`` trains the winner and the single methods once more on that many sentences
   (the longer job the docs' 20,000-sentence tables use), seed 0.

Prints a markdown table (accuracy per seed and their mean, trainable parameters) and writes
``<out>/s4_sst2.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAPER = "spindle/uniform/AL,AP,APB,PBL"  # Chen et al. 2023's S4 design (the notes' seed 000)
SINGLES = {"LoRA (W_q, W_v)": "L", "Pfeiffer adapter": "A", "prefix tuning": "P", "BitFit": "B"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="SST-2 folder (train.tsv, dev.tsv) or the GLUE root")
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--budget", type=float, default=0.005)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--max-steps", type=int, help="cap every run (smoke runs)")
    ap.add_argument("--final-train-size", type=int, help="also train the winner and the singles on this many sentences")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/s4_sst2")
    args = ap.parse_args(argv)

    from unipeft import fileio
    from unipeft.search import search
    from unipeft.search.space import Design, Sizer
    from unipeft.training.cli import setup_runtime
    from unipeft.training.run import load_model, train
    from unipeft.training.data import load_task

    setup_runtime(args.threads, quiet=True)
    out = Path(args.out)
    data = {"data_dir": args.data_dir, "train_size": args.train_size}
    settings = dict(epochs=1.0, batch_size=32, max_length=64, precision="fp32", lr=args.lr,
                    progress=False)
    if args.max_steps:
        settings["max_steps"] = args.max_steps
    t0 = time.perf_counter()
    found = search("minilm", "sst2", out=out / "search", budget=args.budget, groups=args.groups, runs=args.runs,
                   seed=0, data=data, say=print, **settings)
    search_s = time.perf_counter() - t0

    dataset = load_task("sst2", seed=0, **data)
    base, _ = load_model("minilm", dataset.task)
    n_base = sum(p.numel() for p in base.parameters())
    budget = int(args.budget * n_base)
    grouped, whole = Sizer(base, budget, args.groups), Sizer(base, budget, 1)
    arms = {f"S4 winner ({found['best']})": grouped.compose(Design.from_key(found["best"])),
            f"the notes' S4 design ({PAPER})": grouped.compose(Design.from_key(PAPER))}
    for label, s in SINGLES.items():
        arms[label] = whole.compose(Design("uniform", "uniform", (True,), (s,)))

    def run(cfg, seed: int, train_size: int) -> dict:
        res = train("minilm", "sst2", "compose", method_options={"methods": cfg.to_dict()["methods"]},
                    data={**data, "train_size": train_size}, seed=seed, evaluate_test=False,
                    **settings)
        return {"accuracy": res["dev"]["accuracy"], "trainable": res["trainable_params"],
                "seconds": res["train_seconds"]}

    seeds = [int(s) for s in args.seeds.split(",")]
    rows = {}
    for label, (cfg, params) in arms.items():
        rows[label] = {"params": params, "runs": {s: run(cfg, s, args.train_size) for s in seeds}}
        accs = [r["accuracy"] for r in rows[label]["runs"].values()]
        print(f"{label}: {params:,} parameters, accuracy {' / '.join(f'{a:.4f}' for a in accs)}", flush=True)
    if args.final_train_size:
        for label in [next(iter(arms))] + list(SINGLES):
            rows[label]["final"] = run(arms[label][0], 0, args.final_train_size)
            print(f"{label}, {args.final_train_size} sentences: {rows[label]['final']['accuracy']:.4f}", flush=True)

    lines = ["| design | parameters (no head) | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |"
             + (f" {args.final_train_size:,} sentences |" if args.final_train_size else ""),
             "|---|---:|" + "---:|" * (len(seeds) + 1) + ("---:|" if args.final_train_size else "")]
    for label, row in rows.items():
        accs = [row["runs"][s]["accuracy"] for s in seeds]
        final = row.get("final")
        lines.append(f"| {label} | {row['params']:,} ({100 * row['params'] / n_base:.2f}%) | "
                     + " | ".join(f"{a:.3f}" for a in accs) + f" | {statistics.fmean(accs):.3f} |"
                     + ((f" {final['accuracy']:.3f} |" if final else " |") if args.final_train_size else ""))
    print("\n".join(lines))
    print(f"\nsearch: {found['runs']} runs, {search_s:.0f} s (0 when every run came from runs.jsonl)")
    fileio.write_json(out / "s4_sst2.json", {"search": found, "budget": budget, "settings": settings, "threads": args.threads,
                                             "train_size": args.train_size, "seeds": seeds, "rows": rows,
                                             "table": lines}, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
