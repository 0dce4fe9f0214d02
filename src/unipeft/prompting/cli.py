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
    p.add_argument("--max-text-tokens", type=int, help="truncate each text to this many tokens")
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

