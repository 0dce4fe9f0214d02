"""``unipeft icl`` and ``unipeft pet``: argument sets and what each runs (registered in ``unipeft.cli``)."""
from __future__ import annotations

import argparse
import json

from ..errors import UnipeftError
from .templates import unescape


def _add_prompt_arguments(p: argparse.ArgumentParser, many: bool = False) -> None:
    from ..training.cli import add_data_arguments, add_model_task_arguments

    add_model_task_arguments(p)
    what = "templates, separated by ' || ' (one pattern-verbalizer pair each)" if many else "the template"
    p.add_argument("--template", required=True,
                   help=f"{what}: with {{text}} (and {{text_pair}}) and one {{label}}; \\n for a new line, e.g. "
                        "'Review: {text}\\nSentiment: {label}'")
    p.add_argument("--verbalizer", help="label=word|word,label=word (classification tasks), e.g. "
                                        "'positive=great|good,negative=terrible'" +
                                        ("; several separated by ' || ' (one per template, or one for all)"
                                         if many else ""))
    p.add_argument("--normalize", action="store_true", help="length-normalise multi-token words' log-probabilities")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--threads", type=int)
    add_data_arguments(p)


def add_icl(p: argparse.ArgumentParser) -> None:
    _add_prompt_arguments(p)
    p.add_argument("--shots", type=int, default=0, help="demonstrations k (0: zero-shot)")
    p.add_argument("--description", default="", help="task description shown before the demonstrations")
    p.add_argument("--balanced", action="store_true", help="demonstrations balanced over the labels")
    p.add_argument("--calibrate", action="store_true", help="contextual calibration (Zhao et al. 2021)")
    p.add_argument("--split", default="dev", choices=("dev", "test", "train"))
    p.add_argument("--limit", type=int, help="score the first N examples of the split")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation tasks")
    p.add_argument("--max-text-tokens", type=int, help="truncate each text to this many tokens")


def _verbalizer(spec, normalize):
    from .verbalizers import Verbalizer

    return None if spec is None else Verbalizer.parse(spec, normalize=normalize)


def run_icl(args) -> int:
    from ..training.cli import data_options, setup_runtime
    from . import icl

    setup_runtime(args.threads, args.quiet or args.json)
    out = icl.run(args.model, args.task, shots=args.shots, template=unescape(args.template),
                  verbalizer=_verbalizer(args.verbalizer, args.normalize), description=unescape(args.description),
                  seed=args.seed, balanced=args.balanced, calibrate=args.calibrate, data=data_options(args),
                  split=args.split, limit=args.limit, batch_size=args.batch_size,
                  max_text_tokens=args.max_text_tokens, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(out))
    else:
        skip = {"model", "task", "split", "shots", "seed", "balanced", "calibrate", "examples", "seconds"}
        print(f"{out['task']} {out['split']}: {out['shots']}-shot on {out['examples']} examples in "
              f"{out['seconds']:.1f} s: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items() if k not in skip))
    return 0



def add_pet(p: argparse.ArgumentParser) -> None:
    from .pet import PETConfig

    d = PETConfig()
    _add_prompt_arguments(p, many=True)
    p.add_argument("--out", required=True, help="run directory: every pattern's delta and scores, the soft labels, "
                                                "the final classifier; a rerun resumes from it")
    p.add_argument("--method", default=d.method, help="PEFT method of every model (default lora)")
    p.add_argument("--method-option", action="append", metavar="OPTION=VALUE", help="a method option (repeatable)")
    p.add_argument("--labelled", type=int, default=10, help="labelled examples |T|, from train (seeded, balanced)")
    p.add_argument("--unlabelled", type=int, default=1000, help="unlabelled texts |D| (from the rest of train)")
    p.add_argument("--dev-limit", type=int, help="evaluate on the first N dev examples")
    p.add_argument("--lm-weight", "--alpha", dest="lm_weight", type=float, default=d.lm_weight,
                   help="alpha: the weight of the auxiliary LM loss, L = (1-alpha) L_CE + alpha L_LM (default 1e-4)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="soft labels softmax(s/T) (default 2)")
    p.add_argument("--weights", choices=("accuracy", "uniform"), default=d.weights,
                   help="ensemble weights: accuracy on T before training (the paper's), or uniform")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per pattern model")
    p.add_argument("--final-steps", type=int, default=d.final_steps, help="optimizer steps of the final classifier")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lm-batch-size", type=int, default=d.lm_batch_size)
    p.add_argument("--lr", type=float, help="learning rate (default: the method's)")
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--ipet", "--generations", dest="generations", type=int, default=0,
                   help="iPET generations after the first (0: PET)")
    p.add_argument("--factor", type=float, default=d.factor, help="iPET d: training sets grow d times a generation")
    p.add_argument("--sample-fraction", type=float, default=d.sample_fraction,
                   help="iPET lambda: share of the other models labelling a model's new set")


def run_pet(args) -> int:
    from ..training.cli import data_options, setup_runtime
    from ..training.defaults import parse_method_options
    from . import pet

    setup_runtime(args.threads, args.quiet or args.json)
    templates = [unescape(t.strip()) for t in args.template.split("||")]
    if args.verbalizer is None:
        raise UnipeftError("pet: give --verbalizer (label=word|word,label=word)")
    verbalizers = [v.strip() for v in args.verbalizer.split("||")]
    if len(verbalizers) not in (1, len(templates)):
        raise UnipeftError(f"{len(verbalizers)} verbalizers for {len(templates)} templates: give one, or one per "
                           "template")
    verbalizers = verbalizers * len(templates) if len(verbalizers) == 1 else verbalizers
    patterns = [(t, _verbalizer(v, args.normalize)) for t, v in zip(templates, verbalizers)]
    options = parse_method_options(args.method_option, [args.method])[args.method]
    cfg = pet.PETConfig(method=args.method, method_options=options or {}, lm_weight=args.lm_weight,
                        temperature=args.temperature, weights=args.weights, steps=args.steps,
                        final_steps=args.final_steps, batch_size=args.batch_size, lm_batch_size=args.lm_batch_size,
                        lr=args.lr, max_length=args.max_length, generations=args.generations, factor=args.factor,
                        sample_fraction=args.sample_fraction, seed=args.seed)
    res = pet.run(args.model, args.task, patterns, cfg, out=args.out, data=data_options(args),
                  train_size=args.labelled, unlabelled_size=args.unlabelled, dev_limit=args.dev_limit)
    if args.json:
        print(json.dumps(res))
    else:
        name = "iPET" if args.generations else "PET"
        print(f"{name} on {res['task']} (|T| = {res['train_size']}, |D| = {res['unlabelled_size']}) in "
              f"{res['seconds']:.1f} s; trained {len(res['trained'])} units, reused {len(res['reused'])}")
        print("final classifier dev: " + ", ".join(f"{k} {v:.4f}" for k, v in res["dev"].items()))
        print("ensemble dev: " + ", ".join(f"{k} {v:.4f}" for k, v in res["ensemble_dev"].items()))
    return 0
