"""What the attention heads look at (lecture notes seed 003; Clark et al. 2019, "What does BERT look at?").

For every layer and head, averaged over all real (non-padding) query tokens of a corpus:

* ``to_cls``   -- attention mass on [CLS] (``tokenizer.cls_token_id``; the first token if there is none)
* ``to_sep``   -- attention mass on [SEP] (``tokenizer.sep_token_id``, else ``eos_token_id``)
* ``to_punct`` -- attention mass on punctuation tokens (decoded text made only of punctuation)
* ``to_prev``  -- attention on the previous token (queries that have one)
* ``to_next``  -- attention on the next real token (queries that have one)
* ``entropy``  -- entropy (nats) of the head's attention distribution: 0 when all mass is on one
  token, ``log(n)`` when uniform over ``n`` tokens ("focused vs. broad attention").

Attention weights come from ``model(..., output_attentions=True)``; a model whose attention
implementation is not ``eager`` (transformers 5 returns no weights from sdpa/flash) is switched
to eager for the call and restored afterwards.
"""
from __future__ import annotations

import contextlib
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from ..errors import UnipeftError

STATISTICS = ("to_cls", "to_sep", "to_punct", "to_prev", "to_next", "entropy")
_TITLES = {
    "to_cls": "attention to [CLS]",
    "to_sep": "attention to [SEP]",
    "to_punct": "attention to punctuation",
    "to_prev": "attention to previous token",
    "to_next": "attention to next token",
    "entropy": "entropy (nats)",
}


@dataclass
class AttentionStatistics:
    """Per-head statistics, each an array of shape ``[layers, heads]``."""

    to_cls: np.ndarray
    to_sep: np.ndarray
    to_punct: np.ndarray
    to_prev: np.ndarray
    to_next: np.ndarray
    entropy: np.ndarray
    n_texts: int = 0
    n_tokens: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.to_cls.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.to_cls.shape[1])

    def get(self, name: str) -> np.ndarray:
        if name not in STATISTICS:
            from ..errors import choices

            raise UnipeftError(f"unknown attention statistic {name!r}: choose {choices(STATISTICS)}")
        return getattr(self, name)

    def top_heads(self, name: str, k: int = 3, largest: bool = True):
        """``[(layer, head, value), ...]`` -- layers and heads counted from 0."""
        a = self.get(name)
        flat = a.reshape(-1)
        order = np.argsort(-flat if largest else flat, kind="stable")[:k]
        return [(int(i // a.shape[1]), int(i % a.shape[1]), float(flat[i])) for i in order]

    def to_dict(self) -> dict:
        d = {name: np.round(getattr(self, name), 6).tolist() for name in STATISTICS}
        d.update(num_layers=self.num_layers, num_heads=self.num_heads, n_texts=self.n_texts,
                 n_tokens=self.n_tokens)
        d["layer_means"] = {name: np.round(getattr(self, name).mean(axis=1), 6).tolist() for name in STATISTICS}
        d["top_heads"] = {name: [{"layer": l, "head": h, "value": round(v, 6)}
                                 for l, h, v in self.top_heads(name, 3, largest=name != "entropy")]
                          for name in STATISTICS}
        d["most_focused_heads"] = [{"layer": l, "head": h, "entropy": round(v, 6)}
                                   for l, h, v in self.top_heads("entropy", 3, largest=False)]
        d.update(self.extra)
        return d

    def table(self, k: int = 3) -> str:
        """Top ``k`` heads per statistic (layer-head counted from 0; entropy: broadest and most focused)."""
        lines = [f"attention statistics: {self.num_layers} layers x {self.num_heads} heads, "
                 f"{self.n_texts} texts, {self.n_tokens} query tokens (heads are layer-head, from 0)",
                 f"{'statistic':<30} {'mean':>6}  top heads"]
        rows = [(n, _TITLES[n], True) for n in STATISTICS]
        rows.append(("entropy", "entropy, most focused", False))
        for name, title, largest in rows:
            a = self.get(name)
            tops = "  ".join(f"{l}-{h}:{v:.3f}" for l, h, v in self.top_heads(name, k, largest))
            lines.append(f"{title:<30} {a.mean():>6.3f}  {tops}")
        lines.append("")
        lines.append("per-layer mean   " + "  ".join(f"{n:>8}" for n in STATISTICS))
        for l in range(self.num_layers):
            lines.append(f"layer {l:<10} " + "  ".join(f"{getattr(self, n)[l].mean():>8.3f}" for n in STATISTICS))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
def is_punctuation(text: str) -> bool:
    """True when ``text`` (a decoded token, sub-word markers removed) is only punctuation."""
    t = text.strip()
    for marker in ("##", "\u0120", "\u2581"):  # WordPiece, byte-level BPE, SentencePiece
        t = t.replace(marker, "")
    t = t.strip()
    return bool(t) and all(unicodedata.category(c).startswith("P") for c in t)


def _special_ids(tokenizer):
    cls_id = getattr(tokenizer, "cls_token_id", None)
    sep_id = getattr(tokenizer, "sep_token_id", None)
    if sep_id is None:
        sep_id = getattr(tokenizer, "eos_token_id", None)
    return cls_id, sep_id


class _PunctCache:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, bool] = {}
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        out = np.zeros(ids.shape, dtype=bool)
        for u in np.unique(ids):
            u = int(u)
            if u not in self.cache:
                if u in self.special:
                    self.cache[u] = False
                else:
                    try:
                        text = self.tok.decode([u])
                    except Exception:  # pragma: no cover - odd tokenizers
                        text = str(self.tok.convert_ids_to_tokens(u))
                    self.cache[u] = is_punctuation(text)
            if self.cache[u]:
                out |= ids == u
        return out


class _Accumulator:
    """Sums of per-query statistics; ``result()`` divides by the query counts."""

    def __init__(self):
        self.sums = None

    def add(self, attentions, input_ids, attention_mask, cls_id, sep_id, punct_mask):
        """``attentions``: sequence of ``[B, H, T, T]`` (one per layer); masks ``[B, T]``."""
        import torch

        att = torch.stack([a.detach().float() for a in attentions], dim=1)  # [B, L, H, T, T]
        B, L, H, T, _ = att.shape
        real = attention_mask.bool()  # [B, T]
        keys = real.float()
        att = att * keys[:, None, None, None, :]  # ignore any mass on padding keys
        q = real.float()[:, None, None, :]  # [B, 1, 1, T] query weights
        if self.sums is None:
            self.sums = {n: torch.zeros(L, H, dtype=torch.float64) for n in STATISTICS}
            self.counts = {"all": 0.0, "prev": 0.0, "next": 0.0}

        def mass_on(key_mask):  # [B, T] bool -> per query mass [B, L, H, T]
            return (att * key_mask.float()[:, None, None, None, :]).sum(-1)

        def add(name, per_query, qmask):
            self.sums[name] += (per_query * qmask).sum(dim=(0, 3)).double()

        if cls_id is not None:
            cls_mask = input_ids == cls_id
        else:
            cls_mask = torch.zeros_like(real)
            cls_mask[:, 0] = True
        add("to_cls", mass_on(cls_mask & real), q)
        if sep_id is not None:
            add("to_sep", mass_on((input_ids == sep_id) & real), q)
        add("to_punct", mass_on(punct_mask & real), q)
        p = att.clamp_min(1e-12)
        ent = -(att * p.log()).sum(-1)
        add("entropy", ent, q)
        if T > 1:
            prev = torch.diagonal(att, offset=-1, dim1=-2, dim2=-1)  # [B, L, H, T-1]: query i+1 -> key i
            prev_q = (real[:, 1:] & real[:, :-1]).float()[:, None, None, :]
            add("to_prev", prev, prev_q)
            nxt = torch.diagonal(att, offset=1, dim1=-2, dim2=-1)  # query i -> key i+1
            next_q = (real[:, :-1] & real[:, 1:]).float()[:, None, None, :]
            add("to_next", nxt, next_q)
            self.counts["prev"] += float(prev_q.sum())
            self.counts["next"] += float(next_q.sum())
        self.counts["all"] += float(real.sum())

    def result(self, n_texts: int) -> AttentionStatistics:
        if self.sums is None:
            raise UnipeftError("no texts to analyse: the corpus is empty")
        out = {}
        for n in STATISTICS:
            c = self.counts["prev" if n == "to_prev" else "next" if n == "to_next" else "all"]
            out[n] = (self.sums[n] / max(c, 1.0)).numpy()
        return AttentionStatistics(**out, n_texts=n_texts, n_tokens=int(self.counts["all"]))


@contextlib.contextmanager
def eager_attention(model):
    """Temporarily switch ``model`` to the eager attention implementation (so it returns weights)."""
    cfg = getattr(model, "config", None)
    old = getattr(cfg, "_attn_implementation", None)
    switch = old is not None and old != "eager" and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if switch:
            model.set_attn_implementation(old)


def attention_statistics(model, tokenizer, texts, batch_size: int = 8, max_length: int = 128) -> AttentionStatistics:
    """Per-layer, per-head attention statistics of ``model`` over ``texts`` (see module doc)."""
    import torch

    texts = [t for t in (str(x).strip() for x in texts) if t]
    if not texts:
        raise UnipeftError("no texts to analyse: the corpus is empty")
    if batch_size < 1 or max_length < 2:
        raise UnipeftError(f"batch_size must be >= 1 and max_length >= 2 (got {batch_size}, {max_length})")
    cls_id, sep_id = _special_ids(tokenizer)
    punct = _PunctCache(tokenizer)
    acc = _Accumulator()
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with eager_attention(model), torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                                max_length=max_length, return_tensors="pt")
                ids, mask = enc["input_ids"], enc["attention_mask"]
                kwargs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                out = model(**kwargs, output_attentions=True)
                atts = getattr(out, "attentions", None)
                if atts is None and isinstance(out, (tuple, list)):
                    atts = out[-1]
                if not atts:
                    raise UnipeftError(f"{type(model).__name__} returned no attention weights "
                                       "(does it support output_attentions=True?)")
                pm = torch.from_numpy(punct(ids.numpy()))
                acc.add(atts, ids, mask, cls_id, sep_id, pm)
    finally:
        if was_training:
            model.train()
    res = acc.result(len(texts))
    if sep_id is None:
        res.extra["note"] = "tokenizer has neither a sep nor an eos token: to_sep is 0"
    return res


def plot_attention_statistics(result: AttentionStatistics, png, title: str | None = None):
    """Heatmaps (layers x heads), one panel per statistic, saved to ``png``."""
    from .plotting import pyplot, save

    plt = pyplot()
    L, H = result.num_layers, result.num_heads
    fig, axes = plt.subplots(2, 3, figsize=(3.2 * 3 + 1, 2 * max(2.2, 0.35 * L + 1.2)))
    for ax, name in zip(axes.ravel(), STATISTICS):
        a = result.get(name)
        vmax = max(float(a.max()), 1e-9) if name == "entropy" else 1.0
        im = ax.imshow(a, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, origin="upper")
        ax.set_title(_TITLES[name], fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(H))
        ax.set_yticks(range(L))
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title or f"What the heads look at ({result.n_texts} texts, {result.n_tokens} tokens)", fontsize=10)
    fig.tight_layout()
    return str(save(fig, png, dpi=110))
