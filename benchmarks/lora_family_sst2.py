"""The LoRA family on SST-2 with MiniLM: LoRA, random-rank LoRA, DyLoRA at every rank from one run,
AdaLoRA, and peft's AdaLoRA on the same budget.

    OMP_NUM_THREADS=1 python benchmarks/lora_family_sst2.py --data-dir ../shared/data/glue/SST-2

Every arm: all-MiniLM-L6-v2 with a new 2-way head (trained), the delta on every linear map of the
blocks (q, k, v, o, FFN in and out), the same --train-size sentences of the training set in the
same random batches (batch 32, max 64 tokens, one epoch), AdamW (no weight decay) with a linear
warm-up (6%) and decay, fp32, and the full dev set (872 sentences) at the end. One plain PyTorch
loop trains every arm -- ``loss.backward(); opt.step(); opt.zero_grad()`` -- so unipeft's DyLoRA
and AdaLoRA run with nothing added to the loop, while peft's AdaLoRA gets the
``update_and_allocate(step)`` call it needs after each step (without it peft trains plain LoRA).

Arms (--arms): lora (r=8, alpha 16); rr-1-16, rr-8-24, rr-16-32, rr-32-64 (random-rank LoRA at the
lecture notes' four ranges, alpha 16, scale alpha / r_i; --seeds seeds each, mean reported);
dylora (r=8, alpha 16: dev accuracy at every rank 1..8 from the one trained delta); adalora and
peft-adalora (init_r=12, target_r=8, tinit 10% and tfinal 20% of the steps, deltaT 5, beta 0.85,
orth_reg_weight 0.5, alpha 8). --lr sets every arm's rate, --lr-<arm> one arm's (e.g. --lr-dylora 5e-3).

Reported per arm: dev accuracy, trainable parameters (AdaLoRA: at the start and in the saved delta,
which keeps only the triplets of the final budget), seconds per optimizer step, in a JSON file
(--out) and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import unipeft as up  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sst2_common import accuracy, batches, read_tsv, train  # noqa: E402
from unipeft import zoo  # noqa: E402

RANGES = {"rr-1-16": (1, 16), "rr-8-24": (8, 24), "rr-16-32": (16, 32), "rr-32-64": (32, 64)}
ARMS = ("lora", *RANGES, "dylora", "adalora", "peft-adalora")
PEFT_TARGETS = (r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|(attention\.)?output\.dense"
                r"|intermediate\.dense)")  # the same six maps per block as unipeft's all-linear


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adalora_schedule(steps: int) -> dict:
    return dict(init_r=12, target_r=8, tinit=max(1, steps // 10), tfinal=max(1, steps // 5), deltaT=5,
                total_step=steps, beta1=0.85, beta2=0.85, orth_reg_weight=0.5)


def run_arm(arm, seed, train_batches, dev, lr, tmp: Path) -> dict:
    torch.manual_seed(seed)
    model, _ = zoo.minilm(num_labels=2)
    steps = len(train_batches)
    if arm == "peft-adalora":
        import peft

        cfg = peft.AdaLoraConfig(task_type="SEQ_CLS", target_modules=PEFT_TARGETS, lora_alpha=8,
                                 **adalora_schedule(steps))
        model = peft.get_peft_model(model, cfg)
        start = trainable(model)
        sec = train(model, train_batches, lr, after_step=lambda s: model.base_model.update_and_allocate(s))
        model.save_pretrained(str(tmp / arm))
        from safetensors.torch import load_file

        saved = sum(t.numel() for t in load_file(str(tmp / arm / "adapter_model.safetensors")).values())
        return {"accuracy": accuracy(model, dev), "trainable": start, "saved_parameters": saved, "s_per_step": sec}
    if arm == "lora":
        method = up.LoRA(r=8, alpha=16)
    elif arm in RANGES:
        method = up.LoRA(r=RANGES[arm], alpha=16, seed=seed)
    elif arm == "dylora":
        method = up.DyLoRA(r=8, alpha=16, seed=seed)
    else:
        method = up.AdaLoRA(alpha=8, **adalora_schedule(steps))
    up.attach(model, method, name=arm)
    start = trainable(model)
    sec = train(model, train_batches, lr)
    saved = json.loads((up.save(model, tmp / arm, name=arm) / "delta.json").read_text())["parameters"]
    out = {"trainable": start, "saved_parameters": saved, "s_per_step": sec}
    if arm == "dylora":
        out["accuracy_by_rank"] = {}
        for rank in range(1, 9):
            up.set_rank(model, arm, rank)
            out["accuracy_by_rank"][rank] = accuracy(model, dev)
        out["accuracy"] = out["accuracy_by_rank"][8]
    else:
        out["accuracy"] = accuracy(model, dev)
    if arm == "adalora":
        pattern = up.deltas(model)[arm].saved_config().rank_pattern
        out["final_ranks"] = sorted(sum(v) for v in pattern.values())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="../shared/data/glue/SST-2")
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", type=int, default=1, help="seeds per random-rank range (mean reported)")
    ap.add_argument("--lr", type=float, default=2e-3)
    for arm in ARMS:
        ap.add_argument(f"--lr-{arm}", type=float, default=None)
    ap.add_argument("--out", default="benchmarks/results/lora_family_sst2.json")
    args = ap.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        ap.error(f"unknown arm {bad[0]!r}; arms: {', '.join(ARMS)}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _, tok = zoo.minilm(num_labels=2)
    data = Path(args.data_dir)
    train_batches = batches(tok, read_tsv(data / "train.tsv", args.train_size), 32, seed=0)
    dev = batches(tok, read_tsv(data / "dev.tsv"), 128)
    tmp = Path(args.out).with_suffix("")
    results = {"settings": {**vars(args), "steps": len(train_batches), "threads": torch.get_num_threads(),
                            "torch": torch.__version__}, "arms": {}}
    for arm in arms:
        lr = getattr(args, f"lr_{arm.replace('-', '_')}") or args.lr
        seeds = range(args.seeds) if arm in RANGES else [0]
        runs = []
        for seed in seeds:
            t0 = time.perf_counter()
            r = run_arm(arm, seed, train_batches, dev, lr, tmp)
            r["seconds"] = round(time.perf_counter() - t0, 1)
            runs.append(r)
            print(f"{arm} seed {seed}: acc {r['accuracy']:.4f}, trainable {r['trainable']:,}, saved "
                  f"{r['saved_parameters']:,}, {r['s_per_step']:.3f} s/step", flush=True)
        summary = {"lr": lr, "runs": runs, "accuracy": statistics.mean(r["accuracy"] for r in runs),
                   "trainable": statistics.mean(r["trainable"] for r in runs),
                   "s_per_step": statistics.mean(r["s_per_step"] for r in runs)}
        results["arms"][arm] = summary
        # written after every arm, so a long run stopped early keeps what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nSST-2 dev accuracy, MiniLM, {args.train_size} training sentences, one epoch "
          f"({len(train_batches)} steps of 32), fp32, {torch.get_num_threads()} thread(s)")
    print(f"{'arm':<14}{'lr':>8}{'accuracy':>10}{'trainable':>12}{'saved':>12}{'s/step':>9}")
    for arm, s in results["arms"].items():
        saved = statistics.mean(r["saved_parameters"] for r in s["runs"])
        print(f"{arm:<14}{s['lr']:>8.0e}{s['accuracy']:>10.4f}{s['trainable']:>12,.0f}{saved:>12,.0f}"
              f"{s['s_per_step']:>9.3f}")
        if "accuracy_by_rank" in s["runs"][0]:
            ranks = s["runs"][0]["accuracy_by_rank"]
            print("    DyLoRA by rank: " + ", ".join(f"{k}: {v:.4f}" for k, v in ranks.items()))
        if "final_ranks" in s["runs"][0]:
            print(f"    AdaLoRA final ranks per module: {s['runs'][0]['final_ranks']}")
    print(f"(results: {args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
