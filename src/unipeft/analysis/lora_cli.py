"""``unipeft analyze lora``: the LoRA analyses of ``unipeft.analysis.lora`` from the command line.

    --similarity DIR1 DIR2        phi(i, j) between two saved LoRA deltas (e.g. r=8 and r=64), per module
    --amplification --base B --delta DIR
                                  ||U^T W V^T||_F table (B: "minilm" or a local model folder)
    --spectrum DIR                singular values of each ΔW
    --json                        print one JSON object instead of text
    --plot out.png                heatmap (--similarity) or spectrum plot (--spectrum)
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UnipeftError


def add_arguments(parser) -> None:
    parser.add_argument("--similarity", nargs=2, metavar=("DIR1", "DIR2"),
                        help="subspace similarity phi(i, j) of two saved LoRA deltas")
    parser.add_argument("--amplification", action="store_true",
                        help="amplification table of --delta DIR against its base --base")
    parser.add_argument("--spectrum", metavar="DIR", help="singular values of each ΔW of a saved LoRA delta")
    parser.add_argument("--base", help="base model for --amplification: 'minilm' or a local model folder")
    parser.add_argument("--delta", metavar="DIR", help="saved LoRA delta for --amplification")
    parser.add_argument("--matrix", choices=("A", "B"), default="A", help="which LoRA factor --similarity compares")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline (--amplification)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--plot", metavar="PNG", help="write a figure (--similarity or --spectrum)")


def _load_base(base: str, delta_dir: str):
    from ..storage import read_meta

    if base == "minilm":
        from .. import zoo

        return zoo.minilm()[0]
    if not Path(base).is_dir():
        raise UnipeftError(f"--base must be 'minilm' or a local model folder; {base!r} is neither")
    import transformers

    cls_name = read_meta(delta_dir)["base"].get("class") or "AutoModel"
    cls = getattr(transformers, cls_name, None) or transformers.AutoModel
    try:
        return cls.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise UnipeftError(f"cannot load base model from {base!r}: {str(e).splitlines()[0]}") from None


def run(args) -> int:
    from . import lora

    modes = [m for m in ("similarity", "amplification", "spectrum") if getattr(args, m)]
    if len(modes) != 1:
        raise UnipeftError("choose exactly one of --similarity, --amplification or --spectrum")
    mode = modes[0]
    if args.plot and mode == "amplification":
        raise UnipeftError("--plot works with --similarity or --spectrum, not --amplification")

    if mode == "similarity":
        d1, d2 = args.similarity
        grids = lora.compare_deltas(d1, d2, matrix=args.matrix)
        if args.plot:
            lora.plot_similarity(grids, args.plot)
        if args.json:
            print(json.dumps({"mode": mode, "matrix": args.matrix, "deltas": [d1, d2],
                              "phi": {p: g.tolist() for p, g in grids.items()}, "plot": args.plot}))
        else:
            n = min(8, *(min(g.shape) for g in grids.values()))
            print(f"phi(i, i), i = 1..{n}, matrix {args.matrix}: {d1} vs {d2}")
            width = max(len(p) for p in grids)
            for p, g in grids.items():
                print(f"{p:<{width}}  " + " ".join(f"{float(g[i, i]):.3f}" for i in range(n)))
            if args.plot:
                print(f"wrote {args.plot}")
        return 0

    if mode == "spectrum":
        result = lora.spectrum(args.spectrum)
        if args.plot:
            lora.plot_spectrum(result, args.plot)
        if args.json:
            print(json.dumps({"mode": mode, "delta": args.spectrum,
                              "singular_values": {p: s.tolist() for p, s in result.items()}, "plot": args.plot}))
        else:
            width = max(len(p) for p in result)
            for p, s in result.items():
                print(f"{p:<{width}}  " + " ".join(f"{float(v):.4g}" for v in s[:8]))
            if args.plot:
                print(f"wrote {args.plot}")
        return 0

    if not args.base or not args.delta:
        raise UnipeftError("--amplification needs --base ('minilm' or a model folder) and --delta DIR")
    model = _load_base(args.base, args.delta)
    rows = lora.amplification(model, args.delta, seed=args.seed)
    if args.json:
        print(json.dumps({"mode": mode, "base": args.base, "delta": args.delta, "seed": args.seed, "rows": rows}))
    else:
        print(lora.format_table(rows))
    return 0
