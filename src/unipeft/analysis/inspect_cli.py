"""Command-line front ends for ``unipeft analyze attention`` and ``unipeft analyze probe``.

``add_attention_arguments(parser)`` / ``run_attention(args)`` and ``add_probe_arguments(parser)`` /
``run_probe(args)``; ``run_*`` return an exit code (0) and raise :class:`UnipeftError` on user
mistakes. ``--json`` prints exactly one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UnipeftError


def _add_model_argument(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default="minilm",
                        help="'minilm' (all-MiniLM-L6-v2 from unipeft.zoo) or a local transformers model folder")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    parser.add_argument("--max-length", type=int, default=128, help="truncate texts to this many tokens (default 128)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--plot", metavar="PNG", help="also write a figure to this PNG file (needs matplotlib)")


def load_model(spec: str):
    """``(encoder, tokenizer)`` for ``'minilm'`` or a local model folder."""
    if spec == "minilm":
        from .. import zoo

        model, tok = zoo.minilm()
        return getattr(model, "base_model", model), tok
    p = Path(spec)
    if not p.is_dir():
        raise UnipeftError(f"--model must be 'minilm' or an existing model folder, got {spec!r}")
    if not (p / "config.json").is_file():
        raise UnipeftError(f"{p}: no config.json, not a transformers model folder")
    from transformers import AutoModel, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(p)
        model = AutoModel.from_pretrained(p)
    except (OSError, ValueError) as e:
        raise UnipeftError(f"cannot load model from {p}: {str(e).splitlines()[0]}") from None
    return model, tok


def read_texts(path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UnipeftError(f"texts file not found: {p}")
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise UnipeftError(f"{p}: not a UTF-8 text file") from None
    texts = [ln for ln in lines if ln]
    if not texts:
        raise UnipeftError(f"{p}: no texts (one text per line expected)")
    return texts


def _check_plot(path):
    if path is None:
        return
    if not str(path).lower().endswith(".png"):
        raise UnipeftError(f"--plot must name a .png file, got {path!r}")
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UnipeftError("--plot needs matplotlib: pip install matplotlib")


# ------------------------------------------------------------------------------------ attention
def add_attention_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--texts", required=True, metavar="FILE", help="text file, one text per line")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N texts")
    parser.add_argument("--top", type=int, default=3, help="heads listed per statistic in the table (default 3)")
    _add_model_argument(parser)
    return parser


def run_attention(args) -> int:
    from .attention import attention_statistics, plot_attention_statistics

    texts = read_texts(args.texts)
    if args.limit is not None:
        if args.limit < 1:
            raise UnipeftError(f"--limit must be >= 1, got {args.limit}")
        texts = texts[:args.limit]
    _check_plot(args.plot)
    model, tok = load_model(args.model)
    res = attention_statistics(model, tok, texts, batch_size=args.batch_size, max_length=args.max_length)
    if args.plot:
        plot_attention_statistics(res, args.plot)
    return _emit(res, args, lambda: res.table(args.top))


def _emit(res, args, table) -> int:
    """Print one JSON object (--json) or the readable table, and say where the figure went."""
    if args.json:
        d = res.to_dict()
        d["model"] = args.model
        if args.plot:
            d["plot"] = str(args.plot)
        print(json.dumps(d))
    else:
        print(table())
        if args.plot:
            print(f"wrote {args.plot}")
    return 0


# ---------------------------------------------------------------------------------------- probe
def add_probe_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", required=True, metavar="FILE", help="CSV, TSV or JSONL file with text and label columns")
    parser.add_argument("--text-column", default="text", help="column with the text (default 'text')")
    parser.add_argument("--label-column", default="label", help="column with the label(s) (default 'label')")
    parser.add_argument("--level", choices=("sentence", "token"), default="sentence",
                        help="sentence: one label per text; token: whitespace words, space-separated labels")
    parser.add_argument("--epochs", type=int, default=300, help="full-batch probe training steps (default 300)")
    parser.add_argument("--lr", type=float, default=0.02, help="probe learning rate (default 0.02)")
    parser.add_argument("--test-fraction", type=float, default=0.25, help="held-out fraction (default 0.25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cumulative", action="store_true", help="skip cumulative scoring (expected layer)")
    _add_model_argument(parser)
    return parser


def run_probe(args) -> int:
    from .probing import load_probe_data, extract_features, probe_features, plot_probe

    if not 0.0 < args.test_fraction < 1.0:
        raise UnipeftError(f"--test-fraction must be between 0 and 1, got {args.test_fraction}")
    if args.epochs < 1:
        raise UnipeftError(f"--epochs must be >= 1, got {args.epochs}")
    data = load_probe_data(args.data, args.text_column, args.label_column, args.level)
    _check_plot(args.plot)
    model, tok = load_model(args.model)
    X, y, groups = extract_features(model, tok, data, args.batch_size, args.max_length)
    res = probe_features(X, y, data.label_names, groups, data.level, test_fraction=args.test_fraction,
                         epochs=args.epochs, lr=args.lr, seed=args.seed, cumulative=not args.no_cumulative)
    if args.plot:
        plot_probe(res, args.plot)
    return _emit(res, args, res.table)
