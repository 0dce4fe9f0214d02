"""Per-example routing (up.route): the cost of a batch whose rows use different deltas, side by side.

Part A -- many LoRA deltas in one batch. A batch of B examples, row i on LoRA delta i (B distinct
deltas), against the same batch on one delta; peft's ``adapter_names`` measured the same way:

  unipeft-one     one LoRA delta active, plain forward
  unipeft-routed  ``with up.route(model, names): model(**batch)``, B distinct deltas (the block is
                  entered for every call, as a server would for every batch)
  peft-one        peft, one adapter active
  peft-routed     peft, ``model(**batch, adapter_names=names)`` over B adapters

Part B -- every method, D distinct deltas over the B rows (D = 4 and 16 by default), against what
a user has without routing: a loop over the distinct deltas, activating each and running its rows;
and against the same batch on one delta (what routing itself costs). On a CPU the loop's smaller
forwards can be cheaper per row than one big forward (cache effects): ``--base-chunks`` reports
the plain base model on B rows against the same rows in 4 and 16 forwards, for context.

Inference forwards (eval, no_grad), interleaved in rotating order (the methodology of
bench_lora_minilm.py); ratios of medians and paired ratios. Writes
``benchmarks/results/routing_<model>.json``.

    python benchmarks/routing.py                           # MiniLM, B = 64 x 64 tokens, parts A and B
    python benchmarks/routing.py --model smollm2 --parts A --seq-len 32
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import unipeft as up  # noqa: E402
from bench_lora_minilm import run_interleaved, stats  # noqa: E402  (shared timing methodology)

HERE = Path(__file__).resolve().parent
QV = {"minilm": ["query", "value"], "smollm2": ["q_proj", "v_proj"]}
METHODS = {
    "lora": lambda: up.LoRA(r=8, alpha=16),
    "ia3": lambda: up.IA3(),
    "prompt": lambda: up.PromptTuning(length=20, init="random"),
    "prefix": lambda: up.PrefixTuning(length=20, reparam_hidden=0),
    "adapter": lambda: up.Adapter(style="pfeiffer"),
    "bitfit": lambda: up.BitFit(),
}


def load(name):
    from unipeft import zoo

    model = zoo.minilm(num_labels=2)[0] if name == "minilm" else zoo.smollm2()[0]
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def randomise(model, names, seed=0):
    """Every delta's own parameters random (LoRA's B is zero at init: the work must be real)."""
    g = torch.Generator().manual_seed(seed)
    reg = up.engine.registry(model)
    with torch.no_grad():
        for n in names:
            for p in reg.deltas[n].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def batch(model_name, b, seq_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (b, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def forward(model, inputs, **kw):
    with torch.no_grad():
        model(**inputs, **kw)


def part_a(args, base):
    import peft

    inputs = batch(args.model, args.batch_size, args.seq_len)
    names = [f"t{i}" for i in range(args.batch_size)]
    ours = copy.deepcopy(base)
    for n in names:
        up.attach(ours, up.LoRA(r=args.r, alpha=2 * args.r, targets=QV[args.model], train_head=False), name=n)
    randomise(ours, names)
    ours.eval()
    up.activate(ours, [names[0]])

    cfg = dict(r=args.r, lora_alpha=2 * args.r, target_modules=QV[args.model], lora_dropout=0.0,
               init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg), adapter_name=names[0])
    for n in names[1:]:
        theirs.add_adapter(n, peft.LoraConfig(**cfg))
    theirs.set_adapter(names[0])
    theirs.eval()

    def routed():
        with up.route(ours, names):
            forward(ours, inputs)

    variants = {
        "unipeft-one": lambda: forward(ours, inputs),
        "unipeft-routed": routed,
        "peft-one": lambda: forward(theirs, inputs),
        "peft-routed": lambda: forward(theirs, inputs, adapter_names=names),
    }
    times, rounds, _ = run_interleaved(variants, args.rounds, args.steps, args.warmup, "A")
    res = {k: stats(times[k], rounds[k]) for k in variants}
    out = {"variants": {k: {kk: v for kk, v in r.items() if kk != "times_s"} for k, r in res.items()}}
    for lib in ("unipeft", "peft"):
        one, many = res[f"{lib}-one"], res[f"{lib}-routed"]
        out[f"{lib}_routed_over_one"] = many["median_s"] / one["median_s"]
        out[f"{lib}_routed_over_one_paired"] = statistics.median(
            a / b for a, b in zip(many["round_medians_s"], one["round_medians_s"]))
    return out


def part_b(args, base):
    inputs = batch(args.model, args.batch_size, args.seq_len, seed=1)
    out = {}
    for method in args.methods.split(","):
        for d in (int(x) for x in args.distinct.split(",")):
            model = copy.deepcopy(base)
            names = [f"{method}{j}" for j in range(d)]
            for n in names:
                up.attach(model, METHODS[method](), name=n)
            randomise(model, [n for n in names if method != "bitfit"])
            model.eval()
            row_names = [names[i % d] for i in range(args.batch_size)]
            groups = {n: torch.tensor([i for i, m in enumerate(row_names) if m == n]) for n in names}

            def routed(model=model, row_names=row_names):
                with up.route(model, row_names):
                    forward(model, inputs)

            def loop(model=model, groups=groups):
                for n, rows in groups.items():
                    up.activate(model, [n])
                    forward(model, {k: v[rows] for k, v in inputs.items()})

            def one(model=model, first=names[0]):
                up.activate(model, [first])
                forward(model, inputs)

            times, rounds, _ = run_interleaved({"routed": routed, "loop": loop, "one": one}, args.rounds, args.steps,
                                               args.warmup, f"B {method} D={d}")
            r, lp, o = (stats(times[k], rounds[k]) for k in ("routed", "loop", "one"))

            def paired(x, y):
                return statistics.median(a / b for a, b in zip(x["round_medians_s"], y["round_medians_s"]))

            out[f"{method}/D={d}"] = {
                "routed_s": r["median_s"], "loop_s": lp["median_s"], "one_s": o["median_s"],
                "routed_over_loop": r["median_s"] / lp["median_s"], "routed_over_loop_paired": paired(r, lp),
                "routed_over_one": r["median_s"] / o["median_s"], "routed_over_one_paired": paired(r, o)}
            del model
    return out


def base_chunks(args, base):
    """The plain base model on the B rows in 1, 4 and 16 forwards (median seconds)."""
    inputs = batch(args.model, args.batch_size, args.seq_len, seed=1)

    def chunked(k):
        size = args.batch_size // k
        return lambda: [forward(base, {n: v[i * size:(i + 1) * size] for n, v in inputs.items()}) for i in range(k)]

    variants = {str(k): chunked(k) for k in (1, 4, 16) if k <= args.batch_size}
    times, rounds, _ = run_interleaved(variants, args.rounds, args.steps, args.warmup, "base chunks")
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    ap.add_argument("--parts", default="A,B")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--distinct", default="4,16", help="part B: numbers of distinct deltas in the batch")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    base = load(args.model)
    result = {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": args.threads,
              "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    parts = args.parts.split(",")
    if "A" in parts:
        result["A"] = part_a(args, base)
        a = result["A"]
        print(f"\n### {args.model}: {args.batch_size} rows on {args.batch_size} distinct LoRA deltas vs one delta\n")
        print("| library | one delta (s) | routed (s) | routed / one | paired |")
        print("|---|---:|---:|---:|---:|")
        for lib in ("unipeft", "peft"):
            v = a["variants"]
            print(f"| {lib} | {v[f'{lib}-one']['median_s']:.3f} | {v[f'{lib}-routed']['median_s']:.3f} | "
                  f"{a[f'{lib}_routed_over_one']:.3f}x | {a[f'{lib}_routed_over_one_paired']:.3f}x |")
    if "B" in parts:
        result["base_chunks"] = base_chunks(args, base)
        print(f"\n{args.model} base model alone, {args.batch_size} rows: " + ", ".join(
            f"{k} forward(s) {v:.3f} s" for k, v in result["base_chunks"].items()))
        result["B"] = part_b(args, base)
        print(f"\n### {args.model}: routed batch vs a loop over the distinct deltas ({args.batch_size} rows)\n")
        print("| method | distinct deltas | routed (s) | loop (s) | one delta (s) | routed / loop (paired) "
              "| routed / one delta (paired) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for k, v in result["B"].items():
            m, d = k.split("/D=")
            print(f"| {m} | {d} | {v['routed_s']:.3f} | {v['loop_s']:.3f} | {v['one_s']:.3f} | "
                  f"{v['routed_over_loop']:.3f}x ({v['routed_over_loop_paired']:.3f}x) | "
                  f"{v['routed_over_one']:.3f}x ({v['routed_over_one_paired']:.3f}x) |")
    out = HERE / "results" / f"routing_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
