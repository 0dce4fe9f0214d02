"""Probing with scalar mixing (lecture notes seed 003; Tenney et al. 2019, "BERT rediscovers the
classical NLP pipeline").

A frozen encoder gives activations ``H^(0) .. H^(L)`` (``output_hidden_states=True``: the
embeddings and every layer). A probe learns a scalar mix

    s = softmax(w),   h = gamma * sum_l s_l h^(l)

and a linear classifier on ``h``; only ``w``, ``gamma`` and the classifier are trained (features
are computed once). Each layer is standardised on the training split first, so that a layer's
weight is not decided by the scale of its activations.

* centre of gravity   E_s[l] = sum_l l * s_l                       (which layers the mix uses)
* cumulative scoring  P^(l) mixes only layers 0..l;  Delta^(l) = score(P^(l)) - score(P^(l-1))
* expected layer      E_Delta[l] = sum_{l>=1} l * Delta^(l) / sum_{l>=1} Delta^(l)
  (where the score is gained; the notes sum over l = 1..L, P^(0) is the embedding baseline)

Tasks: sentence level (mean over the sentence's real tokens) or token level (whitespace words
with one label per word; a word is represented by its first sub-word token).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UnipeftError, choices

LEVELS = ("sentence", "token")


# --------------------------------------------------------------------------------------- data
@dataclass
class ProbeData:
    """``texts``: sentences (sentence level) or word lists (token level); ``labels`` parallel."""

    level: str
    texts: list
    labels: list  # sentence: [str]; token: [[str]]
    label_names: list = field(default_factory=list)


def _read_rows(path: Path) -> list[dict]:
    from ..training.data import read_records  # one CSV/TSV/JSONL reader for the whole library

    return read_records(path)


def load_probe_data(path, text_column: str = "text", label_column: str = "label",
                    level: str = "sentence") -> ProbeData:
    """Read a CSV/TSV/JSONL probing file. Token level: whitespace words and space-separated labels."""
    if level not in LEVELS:
        raise UnipeftError(f"unknown probing level {level!r}: choose {choices(LEVELS)}")
    path = Path(path)
    if not path.is_file():
        raise UnipeftError(f"data file not found: {path}")
    rows = _read_rows(path)
    if not rows:
        raise UnipeftError(f"{path}: no rows")
    cols = list(rows[0].keys())
    for c in (text_column, label_column):
        if c not in cols:
            raise UnipeftError(f"{path}: no column {c!r}; columns are {choices(cols)}")
    texts, labels = [], []
    for n, r in enumerate(rows, 1):
        t, y = r.get(text_column), r.get(label_column)
        if t is None or y is None or not str(t).strip() or str(y).strip() == "":
            continue
        if level == "sentence":
            texts.append(str(t).strip())
            labels.append(str(y).strip())
        else:
            words = str(t).split()
            tags = y if isinstance(y, list) else str(y).split()
            tags = [str(v) for v in tags]
            if len(words) != len(tags):
                raise UnipeftError(f"{path}: row {n} has {len(words)} words but {len(tags)} labels")
            texts.append(words)
            labels.append(tags)
    if not texts:
        raise UnipeftError(f"{path}: no rows with both a {text_column!r} and a {label_column!r} value")
    flat = labels if level == "sentence" else [v for ys in labels for v in ys]
    names = sorted(set(flat))
    if len(names) < 2:
        raise UnipeftError(f"{path}: column {label_column!r} has only one label ({names[0]!r}); a probe needs two or more")
    return ProbeData(level, texts, labels, names)


# ------------------------------------------------------------------------------------ features
def extract_features(model, tokenizer, data: ProbeData, batch_size: int = 16, max_length: int = 128):
    """``(features [N, L+1, D] float32, labels [N] int64, groups [N] int64)`` from a frozen model.

    Sentence level: one row per sentence (mean of real tokens). Token level: one row per word
    that survives truncation (its first sub-word); ``groups`` is the sentence index.
    """
    import torch

    index = {name: i for i, name in enumerate(data.label_names)}
    feats, ys, groups = [], [], []
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(data.texts), batch_size):
                chunk = data.texts[start:start + batch_size]
                if data.level == "sentence":
                    enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                else:
                    enc = tokenizer(chunk, is_split_into_words=True, padding=True, truncation=True,
                                    max_length=max_length, return_tensors="pt")
                kwargs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                out = model(**kwargs, output_hidden_states=True)
                hs = torch.stack([h.float() for h in out.hidden_states], dim=1)  # [B, L+1, T, D]
                mask = enc["attention_mask"].float()
                for b in range(hs.shape[0]):
                    gi = start + b
                    if data.level == "sentence":
                        m = mask[b][None, :, None]
                        feats.append((hs[b] * m).sum(1) / m.sum(1).clamp_min(1))
                        ys.append(index[data.labels[gi]])
                        groups.append(gi)
                    else:
                        try:
                            word_ids = enc.word_ids(b)
                        except Exception:
                            raise UnipeftError("token-level probing needs a fast tokenizer (word_ids)") from None
                        seen = set()
                        for pos, w in enumerate(word_ids):
                            if w is None or w in seen:
                                continue
                            seen.add(w)
                            feats.append(hs[b, :, pos])
                            ys.append(index[data.labels[gi][w]])
                            groups.append(gi)
    finally:
        if was_training:
            model.train()
    if not feats:
        raise UnipeftError("no probing examples survived tokenisation")
    return (torch.stack(feats).numpy().astype(np.float32), np.asarray(ys, dtype=np.int64),
            np.asarray(groups, dtype=np.int64))


# -------------------------------------------------------------------------------------- probe
@dataclass
class ProbeFit:
    accuracy: float
    train_accuracy: float
    weights: np.ndarray  # s_l over the layers used
    gamma: float


def split_indices(n: int, groups=None, test_fraction: float = 0.25, seed: int = 0):
    """Held-out split by group (whole sentences for token-level tasks)."""
    groups = np.arange(n) if groups is None else np.asarray(groups)
    uniq = np.unique(groups)
    if len(uniq) < 2:
        raise UnipeftError("need at least two examples (sentences) to make a held-out split")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(uniq)
    n_test = min(max(1, int(round(test_fraction * len(uniq)))), len(uniq) - 1)
    test_groups = set(perm[:n_test].tolist())
    is_test = np.array([g in test_groups for g in groups])
    return np.where(~is_test)[0], np.where(is_test)[0]


def train_probe(features, labels, train_idx, test_idx, num_layers: int | None = None, num_classes: int | None = None,
                epochs: int = 300, lr: float = 0.02, weight_decay: float = 1e-3, seed: int = 0) -> ProbeFit:
    """Fit a scalar-mix linear probe on ``features[:, :num_layers]`` (full-batch Adam)."""
    import torch

    X = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    if X.ndim != 3:
        raise UnipeftError(f"features must be [examples, layers, dim], got shape {tuple(X.shape)}")
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    k = X.shape[1] if num_layers is None else int(num_layers)
    if not 1 <= k <= X.shape[1]:
        raise UnipeftError(f"num_layers must be 1..{X.shape[1]}, got {k}")
    X = X[:, :k]
    tr, te = torch.as_tensor(train_idx, dtype=torch.long), torch.as_tensor(test_idx, dtype=torch.long)
    mu = X[tr].mean(0, keepdim=True)
    sd = X[tr].std(0, keepdim=True).clamp_min(1e-6)
    X = (X - mu) / sd  # per-layer, per-dimension standardisation
    C = int(num_classes or int(y.max()) + 1)
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(k, requires_grad=True)
    gamma = torch.ones((), requires_grad=True)
    lin = torch.nn.Linear(X.shape[2], C)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.01, generator=g)
        lin.bias.zero_()
    opt = torch.optim.Adam([{"params": [w, gamma], "weight_decay": 0.0},
                            {"params": lin.parameters(), "weight_decay": weight_decay}], lr=lr)

    def forward(idx):
        s = torch.softmax(w, 0)
        h = gamma * torch.einsum("l,nld->nd", s, X[idx])
        return lin(h)

    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(forward(tr), y[tr])
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc_te = float((forward(te).argmax(-1) == y[te]).float().mean()) if len(te) else float("nan")
        acc_tr = float((forward(tr).argmax(-1) == y[tr]).float().mean())
        s = torch.softmax(w, 0).numpy().astype(np.float64)
    return ProbeFit(acc_te, acc_tr, s, float(gamma.detach()))


def centre_of_gravity(weights) -> float:
    s = np.asarray(weights, dtype=np.float64)
    return float((np.arange(len(s)) * s).sum() / s.sum())


def expected_layer(scores) -> tuple[np.ndarray, float]:
    """``(delta, E)``: delta[l] = score[l] - score[l-1] (delta[0] = 0), E = sum l*delta / sum delta (l >= 1)."""
    sc = np.asarray(scores, dtype=np.float64)
    delta = np.zeros_like(sc)
    delta[1:] = sc[1:] - sc[:-1]
    total = delta[1:].sum()
    if len(sc) < 2 or abs(total) < 1e-12:
        return delta, float("nan")
    return delta, float((np.arange(len(sc)) * delta).sum() / total)


@dataclass
class ProbeResult:
    level: str
    label_names: list
    accuracy: float
    train_accuracy: float
    weights: np.ndarray
    gamma: float
    centre_of_gravity: float
    cumulative_scores: np.ndarray  # score(P^(l)), l = 0..L
    deltas: np.ndarray  # delta[0] = 0
    expected_layer: float
    n_train: int
    n_test: int
    majority_baseline: float

    def to_dict(self) -> dict:
        r = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)  # noqa: E731
        return {"level": self.level, "labels": list(self.label_names), "accuracy": r(self.accuracy),
                "train_accuracy": r(self.train_accuracy), "majority_baseline": r(self.majority_baseline),
                "mixing_weights": [r(v) for v in self.weights], "gamma": r(self.gamma),
                "centre_of_gravity": r(self.centre_of_gravity),
                "cumulative_scores": [r(v) for v in self.cumulative_scores],
                "deltas": [r(v) for v in self.deltas], "expected_layer": r(self.expected_layer),
                "n_train": self.n_train, "n_test": self.n_test}

    def table(self) -> str:
        lines = [f"{self.level}-level probe, {len(self.label_names)} labels, {self.n_train} train / {self.n_test} "
                 f"held-out: accuracy {self.accuracy:.3f} (majority {self.majority_baseline:.3f})",
                 f"{'layer':>5} {'s_l':>7} {'score(P^l)':>11} {'delta_l':>8}"]
        for l in range(len(self.weights)):
            lines.append(f"{l:>5} {self.weights[l]:>7.3f} {self.cumulative_scores[l]:>11.3f} {self.deltas[l]:>+8.3f}")
        lines.append(f"gamma {self.gamma:.3f}   centre of gravity {self.centre_of_gravity:.2f}   "
                     f"expected layer {self.expected_layer:.2f}")
        return "\n".join(lines)


def probe_features(features, labels, label_names=None, groups=None, level: str = "sentence",
                   test_fraction: float = 0.25, epochs: int = 300, lr: float = 0.02, seed: int = 0,
                   cumulative: bool = True) -> ProbeResult:
    """Full scalar-mix probe plus cumulative probes P^(0..L) on precomputed ``[N, L+1, D]`` features."""
    X = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    if X.ndim != 3 or X.shape[0] == 0:
        raise UnipeftError(f"features must be a non-empty [examples, layers, dim] array, got shape {X.shape}")
    if len(y) != len(X):
        raise UnipeftError(f"{len(X)} feature rows but {len(y)} labels")
    C = int(y.max()) + 1
    names = list(label_names) if label_names is not None else [str(i) for i in range(C)]
    tr, te = split_indices(len(X), groups, test_fraction, seed)
    kw = dict(num_classes=max(C, len(names)), epochs=epochs, lr=lr, seed=seed)
    full = train_probe(X, y, tr, te, **kw)
    Lp1 = X.shape[1]
    if cumulative:
        scores = np.array([train_probe(X, y, tr, te, num_layers=l + 1, **kw).accuracy for l in range(Lp1 - 1)]
                          + [full.accuracy])
    else:
        scores = np.full(Lp1, np.nan)
    delta, e = expected_layer(scores) if cumulative else (np.full(Lp1, np.nan), float("nan"))
    counts = np.bincount(y[tr], minlength=C)
    majority = float((y[te] == counts.argmax()).mean())
    return ProbeResult(level, names, full.accuracy, full.train_accuracy, full.weights, full.gamma,
                       centre_of_gravity(full.weights), scores, delta, e, len(tr), len(te), majority)


def probe(model, tokenizer, data, text_column: str = "text", label_column: str = "label", level: str = "sentence",
          batch_size: int = 16, max_length: int = 128, **kwargs) -> ProbeResult:
    """Probe a frozen ``model`` on ``data`` (a :class:`ProbeData` or a CSV/TSV/JSONL path)."""
    if not isinstance(data, ProbeData):
        data = load_probe_data(data, text_column, label_column, level)
    X, y, groups = extract_features(model, tokenizer, data, batch_size, max_length)
    return probe_features(X, y, data.label_names, groups, data.level, **kwargs)


def plot_probe(result: ProbeResult, png, title: str | None = None):
    """Bar chart of the mixing weights s_l and the cumulative-scoring deltas delta_l."""
    from .plotting import pyplot, save

    plt = pyplot()
    L = np.arange(len(result.weights))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].bar(L, result.weights, color="tab:blue")
    axes[0].axvline(result.centre_of_gravity, color="k", ls="--", lw=1,
                    label=f"centre of gravity {result.centre_of_gravity:.2f}")
    axes[0].set_title("scalar mixing weights $s_\\ell$", fontsize=10)
    axes[0].set_xlabel("layer (0 = embeddings)")
    axes[0].legend(fontsize=8)
    colors = ["tab:green" if d >= 0 else "tab:red" for d in result.deltas]
    axes[1].bar(L, result.deltas, color=colors)
    axes[1].axhline(0, color="k", lw=0.5)
    if not math.isnan(result.expected_layer):
        axes[1].axvline(result.expected_layer, color="k", ls="--", lw=1,
                        label=f"expected layer {result.expected_layer:.2f}")
        axes[1].legend(fontsize=8)
    axes[1].set_title("cumulative scoring $\\Delta_\\ell$ (held-out accuracy)", fontsize=10)
    axes[1].set_xlabel("layer")
    for ax in axes:
        ax.set_xticks(L)
    fig.suptitle(title or f"{result.level}-level probe: accuracy {result.accuracy:.3f}", fontsize=10)
    fig.tight_layout()
    return str(save(fig, png, dpi=110))
