"""Scores for a task's predictions: classification, regression and generation metrics.

One entry point, :func:`compute`, which computes exactly the metrics named in
``task.metrics`` (``"loss"`` is the trainer's business and is skipped here).

Scales -- stated once so that tables and plots agree:

* ``accuracy``, ``f1``, ``matthews``, ``pearson``, ``spearman``: fractions, in ``[0, 1]``
  (``matthews``, ``pearson`` and ``spearman`` can be negative, down to ``-1``).
* ``bleu``: sacreBLEU's corpus BLEU on its usual ``0-100`` scale, with every reference
  of a source used as a reference.
* ``chrf``: sacreBLEU's corpus chrF, ``0-100``.
* ``nist``: NLTK's corpus NIST (n=5) on 13a-tokenized text, its usual scale (about ``0-10``).
* ``rouge_l``: for each source, the best ROUGE-L F-measure over its references
  (``RougeScorer(["rougeL"], use_stemmer=True)``), averaged over the sources, times 100
  (``0-100``, like BLEU).

An undefined correlation (a constant prediction or a constant reference, or fewer than
two examples) is reported as ``0.0``, without a warning on the console.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

from ..errors import UnipeftError, choices
from .tasks import GENERATION_KINDS

CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")
GENERATION_METRICS = ("bleu", "rouge_l", "chrf", "nist")
SKIPPED = ("loss",)

_KIND_METRICS = {
    "classification": CLASSIFICATION_METRICS,
    "regression": REGRESSION_METRICS,
    **{kind: GENERATION_METRICS for kind in GENERATION_KINDS},
}


def compute(task, predictions, references) -> dict[str, float]:
    """Score ``predictions`` against ``references`` with the metrics in ``task.metrics``.

    * classification: both are sequences of int label ids;
    * regression: both are sequences of floats;
    * generation (``causal_lm``/``seq2seq``): ``predictions`` is one string per distinct
      source, ``references`` one list of reference strings per source (the lists may have
      different lengths; a bare string is taken as a single reference). See
      :func:`group_references` to build them from examples.

    Returns ``{metric: float}`` in the order of ``task.metrics``, without ``"loss"``.
    Raises :class:`UnipeftError` for empty or mismatched inputs or for a metric that
    does not apply to the task's kind.
    """
    wanted = [m for m in task.metrics if m not in SKIPPED]
    valid = _KIND_METRICS.get(task.kind, ())
    for m in wanted:
        if m not in valid:
            raise UnipeftError(f"task {task.name!r}: metric {m!r} does not apply to a {task.kind} task; "
                               f"valid metrics: {choices(valid)}")
    predictions, references = list(predictions), list(references)
    if not predictions or not references:
        raise UnipeftError(f"task {task.name!r}: nothing to score: {len(predictions)} predictions, "
                           f"{len(references)} references")
    if len(predictions) != len(references):
        raise UnipeftError(f"task {task.name!r}: {len(predictions)} predictions but {len(references)} references")
    if not wanted:
        return {}
    if task.kind == "classification":
        return _classification(task, wanted, predictions, references)
    if task.kind == "regression":
        return _regression(task, wanted, predictions, references)
    return _generation(task, wanted, predictions, references)


def group_references(examples: Iterable[Mapping]) -> tuple[list[str], list[list[str]]]:
    """Distinct sources (first-seen order) and the list of targets of each.

    ``examples`` are dicts with ``"text"`` and ``"target"`` strings; datasets like E2E
    repeat a source once per reference, and multi-reference metrics want them together.
    """
    refs: dict[str, list[str]] = {}
    for i, ex in enumerate(examples):
        try:
            text, target = ex["text"], ex["target"]
        except (KeyError, TypeError):
            raise UnipeftError(f"example {i}: expected a dict with 'text' and 'target'") from None
        if not isinstance(text, str) or not isinstance(target, str):
            raise UnipeftError(f"example {i}: 'text' and 'target' must be strings for a generation task")
        refs.setdefault(text, []).append(target)
    return list(refs), list(refs.values())


def is_better(task, metric: str, new: float, old: float | None) -> bool:
    """True when ``new`` beats ``old`` on ``metric`` (any value beats ``None`` or NaN; NaN beats nothing)."""
    higher = task.higher_is_better(metric)
    if new is None or _isnan(new):
        return False
    if old is None or _isnan(old):
        return True
    return new > old if higher else new < old


# --------------------------------------------------------------------------- kinds

def _classification(task, wanted, predictions, references) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds = _ints(task, predictions, "prediction")
    refs = _ints(task, references, "reference")
    n_labels = len(task.labels) if getattr(task, "labels", None) else None
    binary = n_labels == 2 if n_labels is not None else set(preds) | set(refs) <= {0, 1}
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-label confusion matrices and 0/0 F1 are handled below
        for m in wanted:
            if m == "accuracy":
                out[m] = float(accuracy_score(refs, preds))
            elif m == "f1":
                if binary:  # F1 of the positive class (label 1), as GLUE reports it
                    out[m] = float(f1_score(refs, preds, labels=[1], average="macro", zero_division=0))
                else:
                    out[m] = float(f1_score(refs, preds, average="macro", zero_division=0))
            elif m == "matthews":
                out[m] = _finite(matthews_corrcoef(refs, preds))
    return out


def _regression(task, wanted, predictions, references) -> dict[str, float]:
    import numpy as np
    from scipy import stats

    preds = _floats(task, predictions, "prediction")
    refs = _floats(task, references, "reference")
    out = {}
    for m in wanted:
        if len(preds) < 2:
            out[m] = 0.0
            continue
        fn = stats.pearsonr if m == "pearson" else stats.spearmanr
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")  # ConstantInputWarning: the nan becomes 0.0
            out[m] = _finite(fn(preds, refs)[0])
    return out


def _generation(task, wanted, predictions, references) -> dict[str, float]:
    preds = []
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise UnipeftError(f"task {task.name!r}: prediction {i} is a {type(p).__name__}, expected a string")
        preds.append(p)
    refs: list[list[str]] = []
    for i, r in enumerate(references):
        r = [r] if isinstance(r, str) else list(r) if isinstance(r, Sequence) else None
        if not r or not all(isinstance(x, str) for x in r):
            raise UnipeftError(f"task {task.name!r}: references of source {i} must be a non-empty list of strings")
        refs.append(r)
    out = {}
    for m in wanted:
        if m == "bleu":
            import sacrebleu
            out[m] = float(sacrebleu.corpus_bleu(preds, _ref_streams(refs)).score)
        elif m == "chrf":
            import sacrebleu
            out[m] = float(sacrebleu.corpus_chrf(preds, _ref_streams(refs)).score)
        elif m == "rouge_l":
            out[m] = _rouge_l(preds, refs)
        elif m == "nist":
            out[m] = _nist(preds, refs)
    return out


# --------------------------------------------------------------------------- helpers

def _ref_streams(refs: list[list[str]]) -> list[list[str | None]]:
    """sacreBLEU wants one stream per reference slot; ragged lists are padded with None."""
    width = max(len(r) for r in refs)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


def _rouge_l(preds, refs) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    best = [max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in rs) for pred, rs in zip(preds, refs)]
    return 100.0 * sum(best) / len(best)


def _nist(preds, refs, n: int = 5) -> float:
    from nltk.translate.nist_score import corpus_nist
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok = Tokenizer13a()
    hyps = [tok(p).split() for p in preds]
    refs_tok = [[tok(r).split() for r in rs] for rs in refs]
    # NLTK divides by zero for n-gram orders no hypothesis reaches; those orders add 0
    # to NIST, and lower orders do not depend on n, so cap n at the longest hypothesis.
    n_eff = min(n, max(len(h) for h in hyps))
    if n_eff == 0 or not any(r for rs in refs_tok for r in rs):
        return 0.0
    return _finite(corpus_nist(refs_tok, hyps, n=n_eff))


def _ints(task, values, what) -> list[int]:
    out = []
    n = len(task.labels) if getattr(task, "labels", None) else None
    for i, v in enumerate(values):
        try:
            iv = int(v)
        except (TypeError, ValueError):
            raise UnipeftError(f"task {task.name!r}: {what} {i} is {v!r}, expected a label id") from None
        if iv != v or (n is not None and not 0 <= iv < n):
            raise UnipeftError(f"task {task.name!r}: {what} {i} is {v!r}, expected a label id in 0..{(n or 1) - 1}")
        out.append(iv)
    return out


def _floats(task, values, what) -> list[float]:
    out = []
    for i, v in enumerate(values):
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise UnipeftError(f"task {task.name!r}: {what} {i} is {v!r}, expected a number") from None
    return out


def _isnan(x) -> bool:
    try:
        return math.isnan(x)
    except TypeError:
        return False


def _finite(x) -> float:
    x = float(x)
    return 0.0 if math.isnan(x) or math.isinf(x) else x

