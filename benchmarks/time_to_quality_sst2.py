"""Time to quality on SST-2: LoRA with peft + transformers.Trainer (the standard recipe) vs unipeft, one run.

    python benchmarks/time_to_quality_sst2.py --data-dir ../shared/data/glue/SST-2

Both sides: the pretrained MiniLM, LoRA r=8 / alpha 16 (--rank r: alpha 2r) on query and value,
or with --targets ffn on the feed-forward block's two linear maps, or with --targets all on every
linear map of the blocks (the new classifier head trained too), AdamW at the same learning rate with linear warm-up (6%) and decay over the
same number of steps, batch size 32, dynamic padding, max 128 tokens, the full dev set (872)
evaluated every --eval-every steps. The clock starts when training starts (tokenisation is done
before, on both sides) and stops at the first evaluation with dev accuracy >= --target; evaluation
time counts, since it is part of getting there.

The standard recipe runs as transformers' Trainer does by default on a CPU (fp32, random batches).
unipeft runs with its defaults (bf16 autocast where the CPU has AVX512-BF16/AMX, length-grouped
batches). --arms picks the runs (ARMS below): "peft" (Trainer's defaults), "peft-careful" (the options
a careful Trainer user switches on: bf16=True and length-grouped batches, the same learning rate and
schedule), "unipeft" (its defaults), and the arms that take one thing away from unipeft's defaults to
show what each is worth: "unipeft-fp32", "unipeft-random" (random batches), "unipeft-unfused" (the
plain LoRA path, UNIPEFT_FUSED=0). --run-to-end keeps training after the target to --max-steps, so the
curves compare the accuracy of each arm at every evaluation (e.g. the cost of bf16 in accuracy):

    python benchmarks/time_to_quality_sst2.py --data-dir ../shared/data/glue/SST-2 --arms unipeft,unipeft-fp32 \
        --run-to-end --max-steps 1000

--split N times N training steps of every arm (the schedule over N steps, no evaluation), so the
speed-up splits into precision, batch order, the LoRA path and the rest:

    python benchmarks/time_to_quality_sst2.py --data-dir ../shared/data/glue/SST-2 --targets all --rank 4 \
        --max-steps 4210 --split 150 --arms peft,peft-careful,unipeft-fp32,unipeft-random,unipeft-unfused,unipeft
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


# the same maps on both sides: peft takes module-name suffixes or a regex over the full module name
# (a plain "output.dense" would also catch attention.output.dense), unipeft the architecture table's roles
PEFT_TARGETS = {"qv": ["query", "value"], "ffn": r".*\.layer\.\d+\.(intermediate|output)\.dense",
                "all": r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|(attention\.)?output\.dense"
                       r"|intermediate\.dense)"}
UNIPEFT_TARGETS = {"qv": ("q", "v"), "ffn": ("ffn_in", "ffn_out"), "all": ("q", "k", "v", "o", "ffn_in", "ffn_out")}


def load_sst2(data_dir):
    from unipeft.training.data import load_task

    return load_task("sst2", data_dir=data_dir)


def sampling_options(grouped: bool) -> dict:
    """Length-grouped batches in TrainingArguments, by whichever option this transformers has.

    transformers 5.24 has ``train_sampling_strategy="group_by_length"``; earlier 5.x releases a
    ``group_by_length`` flag. Read from the signature, not assumed.
    """
    import inspect

    from transformers import TrainingArguments

    params = inspect.signature(TrainingArguments).parameters
    if "train_sampling_strategy" in params:
        return {"train_sampling_strategy": "group_by_length" if grouped else "random"}
    if "group_by_length" in params:
        return {"group_by_length": grouped}
    raise SystemExit("this transformers' TrainingArguments has no length-grouping option")


# --arms name -> how reports name it
ARMS = {"peft": "peft + Trainer (fp32, random batches)",
        "peft-careful": "peft + Trainer (bf16, length-grouped)",
        "unipeft": "unipeft (defaults: bf16, grouped, fused)",
        "unipeft-fp32": "unipeft fp32 (grouped, fused)",
        "unipeft-random": "unipeft random batches (bf16, fused)",
        "unipeft-unfused": "unipeft plain LoRA path (bf16, grouped)"}


def run_peft(args, ds, path, limit=None, careful=False):
    import numpy as np
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    tok = AutoTokenizer.from_pretrained(path)

    class Rows(torch.utils.data.Dataset):
        def __init__(self, examples):
            enc = tok([e["text"] for e in examples], truncation=True, max_length=args.max_length)
            self.items = [{"input_ids": i, "attention_mask": m, "labels": e["target"]}
                          for i, m, e in zip(enc["input_ids"], enc["attention_mask"], examples)]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    train, dev = Rows(ds.splits["train"]), Rows(ds.splits["dev"])
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=PEFT_TARGETS[args.targets], task_type="SEQ_CLS"))
    reached = {}
    split = args.split

    class Stop(TrainerCallback):
        def on_evaluate(self, targs, state, control, metrics=None, **kw):
            acc = metrics.get("eval_accuracy", 0)
            reached.setdefault("curve", []).append((state.global_step, time.perf_counter() - reached["t0"], acc))
            if acc >= args.target and "seconds" not in reached:
                reached.update(seconds=time.perf_counter() - reached["t0"], step=state.global_step, accuracy=acc)
                control.should_training_stop = not args.run_to_end

        def on_step_end(self, targs, state, control, **kw):
            if limit is not None and "seconds" not in reached and time.perf_counter() - reached["t0"] > limit:
                reached.update(gave_up_seconds=time.perf_counter() - reached["t0"], gave_up_step=state.global_step)
                control.should_training_stop = True

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch_size,
                                  per_device_eval_batch_size=64, learning_rate=args.lr, max_steps=split or args.max_steps,
                                  # transformers 5 takes warm-up as steps (a float < 1 is a ratio)
                                  warmup_steps=int(0.06 * (split or args.max_steps)), lr_scheduler_type="linear",
                                  weight_decay=0.0,
                                  eval_strategy="no" if split else "steps", eval_steps=args.eval_every,
                                  save_strategy="no", logging_steps=50, report_to=[], use_cpu=True, seed=args.seed,
                                  dataloader_num_workers=0, disable_tqdm=True,
                                  bf16=careful, **sampling_options(careful))
        trainer = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=dev,
                          data_collator=DataCollatorWithPadding(tok),
                          compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) ==
                                                                        p.label_ids).mean())},
                          callbacks=[Stop()])
        reached["t0"] = time.perf_counter()
        trainer.train()
        if split:
            reached.update(split_seconds=time.perf_counter() - reached["t0"], split_steps=trainer.state.global_step)
    reached.pop("t0")
    return reached


def run_unipeft(args, ds, precision, limit=None, grouped=True, fused=True):
    import contextlib

    import unipeft as up
    from unipeft import fused as fused_path
    from unipeft.training import TrainConfig, Trainer
    from unipeft.training.run import load_model

    torch.manual_seed(args.seed)
    model, tok = load_model("minilm", ds.task)
    up.attach(model, up.LoRA(r=args.rank, alpha=2 * args.rank, targets=UNIPEFT_TARGETS[args.targets]), name="sst2")
    reached = {}

    split = args.split

    def stop(trainer, metrics):
        acc = metrics["accuracy"]
        reached.setdefault("curve", []).append((trainer.step, time.perf_counter() - reached["t0"], acc))
        if acc >= args.target and "seconds" not in reached:
            reached.update(seconds=time.perf_counter() - reached["t0"], step=trainer.step, accuracy=acc)
            return not args.run_to_end
        if limit is not None and "seconds" not in reached and time.perf_counter() - reached["t0"] > limit:
            reached.update(gave_up_seconds=time.perf_counter() - reached["t0"], gave_up_step=trainer.step)
            return True
        return False

    cfg = TrainConfig(lr=args.lr, max_steps=split or args.max_steps, batch_size=args.batch_size, warmup_ratio=0.06,
                      eval_every=0 if split else args.eval_every, max_length=args.max_length, precision=precision,
                      seed=args.seed, keep_best=False, progress=False, group_by_length=grouped)
    trainer = Trainer(model, tok, ds.task, ds.splits["train"], None if split else ds.splits["dev"], cfg,
                      on_evaluate=[stop])
    reached["t0"] = time.perf_counter()
    with contextlib.nullcontext() if fused else fused_path.disabled():
        trainer.fit()
    if split:
        reached.update(split_seconds=time.perf_counter() - reached["t0"], split_steps=trainer.step)
    reached.pop("t0")
    reached["precision"] = trainer.precision
    return reached


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="the SST-2 folder (train.tsv, dev.tsv) or the GLUE root")
    ap.add_argument("--target", type=float, default=0.88)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--targets", choices=sorted(PEFT_TARGETS), default="qv",
                    help="LoRA on query and value (qv), the feed-forward block (ffn) or every linear map (all)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha is twice the rank)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arms", default="peft,unipeft", help=f"comma list of {', '.join(ARMS)}")
    ap.add_argument("--run-to-end", action="store_true", help="train to --max-steps even after the target")
    ap.add_argument("--give-up-after", type=float, metavar="X",
                    help="stop an arm once it has run X times as long as the fastest earlier arm took to reach "
                         "the target (the speed-up is then > X); list the fast arm first in --arms")
    ap.add_argument("--split", type=int, metavar="N", default=0,
                    help="time N training steps per arm with no evaluation, instead of the time to the target")
    ap.add_argument("--out", default="benchmarks/results/time_to_quality_sst2.json")
    args = ap.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        ap.error(f"unknown arm {bad[0]!r}; valid: {', '.join(ARMS)}")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from unipeft import zoo

    ds = load_sst2(args.data_dir)
    path = str(zoo.minilm_path())
    runs = {"peft": lambda limit: run_peft(args, ds, path, limit),
            "peft-careful": lambda limit: run_peft(args, ds, path, limit, careful=True),
            "unipeft": lambda limit: run_unipeft(args, ds, "auto", limit),
            "unipeft-fp32": lambda limit: run_unipeft(args, ds, "fp32", limit),
            "unipeft-random": lambda limit: run_unipeft(args, ds, "auto", limit, grouped=False),
            "unipeft-unfused": lambda limit: run_unipeft(args, ds, "auto", limit, fused=False)}
    results = {}
    for a in arms:
        reached = [r["seconds"] for r in results.values() if "seconds" in r]
        limit = args.give_up_after * min(reached) if args.give_up_after and reached else None
        results[ARMS[a]] = {**runs[a](limit), "time_limit": limit}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "results": results}, indent=1))
    if args.split:
        print(f"time for {args.split} training steps (LoRA r={args.rank} on {args.targets}, MiniLM, SST-2, batch "
              f"{args.batch_size}, {args.threads} threads)")
        first = next(iter(results.values()))["split_seconds"]
        for name, r in results.items():
            print(f"  {name:44s} {r['split_seconds']:7.1f} s ({r['split_steps']} steps)  "
                  f"{first / r['split_seconds']:.2f}x vs {next(iter(results))}")
        return 0
    base = results.get(ARMS["peft"], {}).get("seconds")
    careful = results.get(ARMS["peft-careful"], {}).get("seconds")
    print(f"time until dev accuracy >= {args.target} (LoRA r={args.rank} on {args.targets}, MiniLM, SST-2, "
          f"{args.threads} threads)")
    for name, r in results.items():
        if "seconds" in r:
            speed = "".join(f"  {ref / r['seconds']:.2f}x vs {label}" for ref, label in
                            ((base, "peft + Trainer"), (careful, "careful peft + Trainer")) if ref)
            print(f"  {name:44s} {r['seconds']:7.1f} s at step {r['step']} (accuracy {r['accuracy']:.4f}){speed}")
        elif "gave_up_seconds" in r:
            print(f"  {name:44s} stopped at {r['gave_up_seconds']:.1f} s (step {r['gave_up_step']}, {args.give_up_after}x "
                  f"the fastest arm) below {args.target}: {r.get('curve', [])[-3:]}")
        else:
            print(f"  {name:44s} did not reach {args.target} in {args.max_steps} steps: {r.get('curve', [])[-3:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
