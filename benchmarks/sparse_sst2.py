"""Sparse deltas on SST-2 with MiniLM: sparse fine-tuning (LT-SFT, magnitude, movement, FISH) and
diff pruning, then two sparse deltas composed.

    OMP_NUM_THREADS=1 python benchmarks/sparse_sst2.py --data-dir ../shared/data/glue/SST-2
    python benchmarks/sparse_sst2.py --train-size 64 --dev-size 64 --arms lt-sft,diff-pruning,compose  # smoke

Every arm: all-MiniLM-L6-v2 with a new 2-way head (trained as the delta's own copy), the delta
over every linear map of the blocks (q, k, v, o, FFN in and out), the same --train-size
sentences in the same random batches (batch 32, max 64 tokens, one epoch), AdamW (no weight
decay) with a linear warm-up (6%) and decay, fp32, dev accuracy at the end. One plain PyTorch
loop trains every arm -- ``loss.backward(); opt.step(); opt.zero_grad()`` -- and nothing else:
the masks are chosen and DiffPruning's L0 penalty is added by unipeft's step hooks.

Arms (--arms): lt-sft (dense phase for half the steps -- --select-after changes the share --, then
the 1% that moved most, reset and retrained), magnitude (the 1% largest |theta_0|), movement
(-sum g W over the same dense phase),
fish (sum g^2 over the first 5% of the batches), diff-pruning (sparsity 0.995, finalized before
scoring), each at the defaults' rates (training/defaults.py: lt_sft's for LT-SFT, movement and
compose, sparse_ft's for FISH and magnitude; --lr-<arm> to change one), and
compose: a task delta (LT-SFT, no head of its own: the model's head stays the fixed random one)
on the first --train-size sentences and a second one on the next --train-size (other data),
each alone and both active (theta + delta_1 + delta_2), with how many entries they share.

Reported per arm: dev accuracy, trainable parameters at the start, changed base entries at the
end (plus the head's parameters), delta file bytes, seconds per optimizer step; JSON (--out) and
a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
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
from unipeft.training.defaults import DEFAULTS  # noqa: E402

ARMS = ("lt-sft", "magnitude", "movement", "fish", "diff-pruning", "compose")


def method_for(arm: str, steps: int, head: bool = True, select_after: float = 0.5):
    half, first = max(1, round(select_after * steps)), max(1, round(0.05 * steps))
    if arm == "diff-pruning":
        return up.DiffPruning(**DEFAULTS["diff_pruning"].config, train_head=head)
    after = {"lt-sft": half, "movement": half, "fish": first}.get(arm)
    cfg = {**DEFAULTS["sparse_ft"].config, "select": arm, "select_after": after}
    return up.SparseFT(**cfg, train_head=head)


def changed_entries(model, name, pretrained) -> int:
    """Base entries that differ from the pretrained weights now, plus the delta's own head."""
    delta = up.engine.registry(model).deltas[name]
    n = sum(int((model.get_parameter(p) != pretrained[p]).sum()) for p in delta.sparse.values)
    return n + sum(d.weight.numel() + (0 if d.bias is None else d.bias.numel())
                   for path, d in delta.linear.items() if path in delta.head)


def run_arm(arm, train_batches, dev, lr, tmp: Path, select_after: float = 0.5) -> dict:
    torch.manual_seed(0)
    model, _ = zoo.minilm(num_labels=2)
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    up.attach(model, method_for(arm, len(train_batches), select_after=select_after), name=arm)
    start = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sec = train(model, train_batches, lr)
    up.finalize(model, arm)  # DiffPruning's exact budget; a mask not yet chosen is chosen now
    d = up.save(model, tmp / arm, name=arm)
    return {"accuracy": accuracy(model, dev), "trainable": start, "changed": changed_entries(model, arm, pretrained),
            "k": up.engine.registry(model).deltas[arm].sparse.count(),
            "file_bytes": (d / "delta.safetensors").stat().st_size, "s_per_step": sec}


def run_compose(first, second, dev, lr, tmp: Path) -> dict:
    torch.manual_seed(0)
    model, _ = zoo.minilm(num_labels=2)
    up.attach(model, method_for("lt-sft", len(first), head=False), name="task")
    train(model, first, lr)
    up.attach(model, method_for("lt-sft", len(second), head=False), name="other")  # now the only active one
    train(model, second, lr)
    reg = up.engine.registry(model)
    task, other = reg.deltas["task"].sparse, reg.deltas["other"].sparse
    shared = sum(int(torch.isin(task.indices[p], other.indices[p]).sum()) for p in task.values)
    out = {"k_each": task.count(), "shared_entries": shared}
    for label, names in (("task", ["task"]), ("other", ["other"]), ("both", ["task", "other"])):
        up.activate(model, names)
        out[f"accuracy_{label}"] = accuracy(model, dev)
    out["file_bytes"] = {n: (up.save(model, tmp / f"compose-{n}", name=n) / "delta.safetensors").stat().st_size
                         for n in ("task", "other")}
    up.detach(model, "task")
    out["accuracy_other_after_detaching_task"] = accuracy(model, dev)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="../shared/data/glue/SST-2")
    ap.add_argument("--train-size", type=int, default=20000)
    ap.add_argument("--dev-size", type=int, default=None, help="dev sentences scored (default: all 872)")
    ap.add_argument("--arms", default=",".join(ARMS))
    for arm in ARMS:
        ap.add_argument(f"--lr-{arm}", type=float, default=None)
    ap.add_argument("--select-after", type=float, default=0.5,
                    help="lt-sft and movement: the share of the run before the mask is fixed")
    ap.add_argument("--out", default="benchmarks/results/sparse_sst2.json")
    args = ap.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        ap.error(f"unknown arm {bad[0]!r}; arms: {', '.join(ARMS)}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _, tok = zoo.minilm(num_labels=2)
    data = Path(args.data_dir)
    train_batches = batches(tok, read_tsv(data / "train.tsv", args.train_size), 32, seed=0)
    dev = batches(tok, read_tsv(data / "dev.tsv", args.dev_size), 128)
    tmp = Path(args.out).with_suffix("")
    results = {"settings": {**vars(args), "steps": len(train_batches), "threads": torch.get_num_threads(),
                            "torch": torch.__version__}, "arms": {}}
    for arm in arms:
        # the defaults' rates: a dense phase first (LT-SFT, movement, the composed LT-SFT deltas) trains at
        # full fine-tuning's rate (lt_sft), a mask fixed before training (FISH, magnitude) at sparse_ft's
        row = {"diff-pruning": "diff_pruning", "fish": "sparse_ft", "magnitude": "sparse_ft"}.get(arm, "lt_sft")
        default = DEFAULTS[row].train["lr"]
        lr = getattr(args, f"lr_{arm.replace('-', '_')}") or default
        t0 = time.perf_counter()
        if arm == "compose":
            second = batches(tok, read_tsv(data / "train.tsv", args.train_size, start=args.train_size), 32, seed=1)
            r = run_compose(train_batches, second, dev, lr, tmp)
            print(f"compose: task {r['accuracy_task']:.4f}, other {r['accuracy_other']:.4f}, both "
                  f"{r['accuracy_both']:.4f}; k {r['k_each']:,} each, {r['shared_entries']:,} shared", flush=True)
        else:
            r = run_arm(arm, train_batches, dev, lr, tmp, args.select_after)
            print(f"{arm}: acc {r['accuracy']:.4f}, trainable {r['trainable']:,}, changed {r['changed']:,}, "
                  f"file {r['file_bytes']:,} B, {r['s_per_step']:.3f} s/step", flush=True)
        r["lr"], r["seconds"] = lr, round(time.perf_counter() - t0, 1)
        results["arms"][arm] = r
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nSST-2 dev accuracy, MiniLM, {args.train_size} training sentences, one epoch "
          f"({len(train_batches)} steps of 32), fp32, {torch.get_num_threads()} thread(s)")
    print(f"{'arm':<14}{'lr':>8}{'accuracy':>10}{'trainable':>13}{'changed':>11}{'file bytes':>12}{'s/step':>9}")
    for arm, s in results["arms"].items():
        if arm == "compose":
            continue
        print(f"{arm:<14}{s['lr']:>8.0e}{s['accuracy']:>10.4f}{s['trainable']:>13,}{s['changed']:>11,}"
              f"{s['file_bytes']:>12,}{s['s_per_step']:>9.3f}")
    if "compose" in results["arms"]:
        c = results["arms"]["compose"]
        print(f"composed (LT-SFT, {c['k_each']:,} entries each, {c['shared_entries']:,} shared): task alone "
              f"{c['accuracy_task']:.4f}, other alone {c['accuracy_other']:.4f}, both {c['accuracy_both']:.4f}; "
              f"other after detaching task {c['accuracy_other_after_detaching_task']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
