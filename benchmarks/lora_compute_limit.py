"""How close a PEFT training step comes to the compute limit, unipeft vs peft, side by side in one run.

The *limit* is the same forward and backward pass with every weight frozen: only
activation gradients flow (the input embeddings' output requires grad). A delta's
step cannot be much cheaper: it needs those activation gradients plus its own
small products. Variants (each on its own copy of the model, all in one process):

  limit            every weight frozen, activation gradients only
  peft-lora        peft LoraConfig(r, lora_alpha=2r, target_modules=<all linear>, lora_dropout=0)
  unipeft-lora     up.LoRA(r, alpha=2r, targets="all-linear"): the fused LoRALinear path
  unipeft-plain    the same delta with the fused path switched off (unipeft.fused.disabled())
  unipeft-factored / unipeft-merged   the fused node forced onto one of its two paths
                   (unipeft-lora chooses per call by the cost model, see unipeft/fused.py)
  unipeft-unstacked  unipeft-lora with a shared-input group's base products run one by one under
                   autocast (fused.stacked_base(False), the default); unipeft-lora then runs with
                   stacked_base("auto"): grouped-query q, k, v as one stacked product (unipeft/fused.py)
  peft-ia3 / unipeft-ia3           (IA)3 with each library's defaults (k, v, FFN output)
  unipeft-adapter  a Pfeiffer bottleneck adapter (bottleneck 64) after every FFN

A step is forward + backward + AdamW step + zero_grad (the limit has no optimizer). AdamW runs
PyTorch's fused kernel, what both libraries' users get (unipeft's trainer; transformers.Trainer's
default ``adamw_torch_fused``); ``--optimizer loop`` runs the per-tensor kernel of ``AdamW()``.
Timing: warm-up, then rounds in rotating order, ``--steps`` timed steps per variant per
round; the table gives the median step time, the ratio of medians to the limit, the
paired ratio (median over rounds of the per-round ratio, which cancels slow drifts) and the ratio
of the fastest steps (each variant's least disturbed step: steadier where a hypervisor steals time).
``--memory`` also runs every variant in a fresh process and reports the peak RSS of three
training steps over the RSS of the loaded model with the delta attached (Linux: VmHWM reset
through /proc/self/clear_refs; on a GPU, the CUDA peak over the allocated memory).

    python benchmarks/lora_compute_limit.py                       # SmolLM2-135M, r=16, batch 8 x 128
    python benchmarks/lora_compute_limit.py --model minilm --targets q,v --r 8 --batch-size 32 --seq-len 64
    python benchmarks/lora_compute_limit.py --precision bf16      # autocast (AVX512-BF16 CPUs, GPUs)
    python benchmarks/lora_compute_limit.py --device cuda --precision bf16

Writes ``benchmarks/results/lora_compute_limit_<model>_<precision>.json`` and prints a markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_lora_minilm import run_interleaved, stats  # noqa: E402  (shared timing methodology)

HERE = Path(__file__).resolve().parent
VARIANTS = ("limit", "peft-lora", "unipeft-lora", "unipeft-plain", "peft-ia3", "unipeft-ia3", "unipeft-adapter",
            "unipeft-factored", "unipeft-merged", "unipeft-unstacked")
DEFAULT_VARIANTS = VARIANTS[:7]
PEFT_TARGETS = {"all-linear": "all-linear", "q,v": {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "minilm"), default="smollm2")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--targets", choices=tuple(PEFT_TARGETS), default="all-linear")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizer", choices=("fused", "loop"), default="fused", help="AdamW's kernel")
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS per variant (fresh processes)")
    ap.add_argument("--memory-only", action="store_true", help="measure peak RSS only (no timing)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round x 1 step, 1 warm-up step")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant {bad[0]!r}; valid: {', '.join(VARIANTS)}")
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 1, 1
    return args


# ---------------------------------------------------------------------------
# model, batch, variants
# ---------------------------------------------------------------------------

def load_base(name: str):
    from unipeft import zoo

    if name == "smollm2":
        return zoo.smollm2()[0]
    return zoo.minilm(num_labels=2)[0]


def make_batch(model, batch_size, seq_len, seed, device):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = ids.clone() if model.config.model_type == "llama" else torch.randint(0, 2, (batch_size,),
                                                                                           generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def build(name: str, base, args):
    """(model, uses_optimizer, context factory) for one variant."""
    import unipeft as up

    fam = base.config.model_type
    model = copy.deepcopy(base)
    ctx = contextlib.nullcontext
    if name == "limit":
        for p in model.parameters():
            p.requires_grad_(False)
        # frozen weights and integer ids make the embeddings' output a leaf: let gradients flow from there
        model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_())
        return model, False, ctx
    if name.startswith("peft-"):
        import peft

        task = "CAUSAL_LM" if fam == "llama" else "SEQ_CLS"
        if name == "peft-lora":
            t = PEFT_TARGETS[args.targets]
            t = t if isinstance(t, str) else t[fam]
            cfg = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules=t, task_type=task)
        else:
            cfg = peft.IA3Config(task_type=task)
        return peft.get_peft_model(model, cfg), True, ctx
    if name in ("unipeft-lora", "unipeft-plain", "unipeft-factored", "unipeft-merged", "unipeft-unstacked"):
        from unipeft import fused

        targets = "all-linear" if args.targets == "all-linear" else ("q", "v")
        up.attach(model, up.LoRA(r=args.r, alpha=2 * args.r, targets=targets))
        if name == "unipeft-plain":
            ctx = fused.disabled
        elif name == "unipeft-unstacked":
            ctx = lambda: fused.stacked_base(False)  # noqa: E731
        elif name in ("unipeft-factored", "unipeft-merged"):
            ctx = lambda: fused.lora_path(name.split("-")[1])  # noqa: E731
        elif "unipeft-unstacked" in args.variants:  # unipeft-lora: the pair compares the two
            ctx = lambda: fused.stacked_base("auto")  # noqa: E731
        return model, True, ctx
    if name == "unipeft-ia3":
        return up.attach(model, up.IA3()), True, ctx
    return up.attach(model, up.Adapter(style="pfeiffer", bottleneck=64)), True, ctx


def step_fn(model, uses_optimizer, ctx, batch, precision, device, optimizer="fused"):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=optimizer == "fused") if uses_optimizer else None
    kind = torch.device(device).type
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)

    def step():
        amp = torch.autocast(kind, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with ctx(), amp:
            loss = model(**batch).loss
        with ctx():
            loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()

    return step, sum(p.numel() for p in params)


# ---------------------------------------------------------------------------
# memory: one fresh process per variant
# ---------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = load_base(args.model).to(args.device)
    batch = make_batch(base, args.batch_size, args.seq_len, args.seed, args.device)
    model, opt, ctx = build(args.memory_worker, base, args)
    del base
    step, _ = step_fn(model, opt, ctx, batch, args.precision, args.device, args.optimizer)
    # the peak of three training steps (the first allocates AdamW's state) over the loaded model
    if args.device == "cpu":
        rss0 = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        for _ in range(3):
            step()
        peak = _status_kb("VmHWM")
        print(json.dumps({"variant": args.memory_worker, "peak_growth_mb": (peak - rss0) / 1024,
                          "rss_before_mb": rss0 / 1024, "peak_rss_mb": peak / 1024}))
    else:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(3):
            step()
        print(json.dumps({"variant": args.memory_worker,
                          "peak_growth_mb": (torch.cuda.max_memory_allocated() - before) / 2 ** 20}))


def measure_memory(args) -> dict:
    out = {}
    for v in args.variants:
        cmd = [sys.executable, __file__, "--_memory-worker", v] + _forward_args(args)
        res = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        if res.returncode != 0 or not lines:
            raise SystemExit(f"memory worker for {v} failed:\n{res.stderr[-2000:]}")
        out[v] = json.loads(lines[-1])
        print(f"  [memory] {v}: +{out[v]['peak_growth_mb']:.0f} MB", file=sys.stderr, flush=True)
    return out


def _x(ratio) -> str:
    return "-" if ratio is None else f"{ratio:.3f}x"


def _forward_args(args) -> list[str]:
    return ["--model", args.model, "--r", str(args.r), "--targets", args.targets, "--batch-size",
            str(args.batch_size), "--seq-len", str(args.seq_len), "--precision", args.precision, "--device",
            args.device, "--threads", str(args.threads), "--seed", str(args.seed), "--optimizer", args.optimizer]


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return 0
    if args.memory_only:
        memory = measure_memory(args)
        print("| variant | peak memory of 3 steps over the loaded model |\n|---|---:|")
        for v, m in memory.items():
            print(f"| {v} | {m['peak_growth_mb']:.0f} MB |")
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import peft
    import transformers

    import unipeft

    t0 = time.perf_counter()
    base = load_base(args.model).to(args.device)
    batch = make_batch(base, args.batch_size, args.seq_len, args.seed, args.device)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.0f}s; {args.batch_size}x{args.seq_len}, "
          f"{args.precision}, {args.threads} threads, {args.rounds} rounds x {args.steps} steps",
          file=sys.stderr, flush=True)
    variants, trainable = {}, {}
    for v in args.variants:
        model, opt, ctx = build(v, base, args)
        variants[v], trainable[v] = step_fn(model, opt, ctx, batch, args.precision, args.device, args.optimizer)
    times, per_round, contention = run_interleaved(variants, args.rounds, args.steps, args.warmup, "train")
    st = {v: stats(times[v], per_round[v]) for v in variants}
    memory = measure_memory(args) if args.memory else {}

    ref = "limit" if "limit" in st else None
    # "fastest": the ratio of each variant's least disturbed step; on a machine whose neighbours steal
    # time (a shared VM) it moves less between runs than the medians, which the steal inflates unevenly
    rows = ["| variant | trainable | median step | vs limit (medians) | vs limit (paired) | vs limit (fastest) "
            "| vs peft-lora (paired) | peak memory growth |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = {}
    for v in variants:
        med = st[v]["median_s"]
        # None where the run has no limit or no peft-lora to compare with ("-" in the table, null in the JSON)
        r_lim = med / st[ref]["median_s"] if ref else None
        p_lim = statistics.median(a / b for a, b in zip(per_round[v], per_round[ref])) if ref else None
        p_peft = (statistics.median(a / b for a, b in zip(per_round[v], per_round["peft-lora"]))
                  if "peft-lora" in per_round else None)
        f_lim = st[v]["min_s"] / st[ref]["min_s"] if ref else None
        ratios[v] = {"vs_limit_medians": r_lim, "vs_limit_paired": p_lim, "vs_limit_fastest": f_lim,
                     "vs_peft_lora_paired": p_peft}
        mem = f"{memory[v]['peak_growth_mb']:.0f} MB" if v in memory else ""
        rows.append(f"| {v} | {trainable[v]:,} | {med * 1e3:.0f} ms | {_x(r_lim)} | {_x(p_lim)} | {_x(f_lim)} "
                    f"| {_x(p_peft)} | {mem} |")
    table = "\n".join(rows)
    print(table)
    other = contention.get("other_processes_cpu_cores", 0.0)
    steal = contention.get("steal_cpu_cores", 0.0)
    print(f"\nother processes used {other:.2f} CPU cores on average while timing, the hypervisor stole {steal:.2f}"
          + (" -- the machine was busy, ratios are noisy" if other > 0.2 or steal > 0.1 else ""))
    out = args.out or HERE / "results" / f"lora_compute_limit_{args.model}_{args.precision}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "memory_worker")},
        "env": {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__, "unipeft": unipeft.__version__,
                "device": args.device, "cpu_count": os.cpu_count()},
        "stats": st, "ratios": ratios, "memory": memory, "contention": contention, "table": table,
    }, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
