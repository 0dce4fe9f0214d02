"""Verbalizers: each label -> one or more words of the model's vocabulary (seed 000 "Definition of a Verbalizer").

``Verbalizer({"positive": ["great", "good"], "negative": "terrible"})``. A word may be several
tokens: its score is its whole log-probability, log p(w) = sum_j log p(w_j | context, w_<j), or
that divided by its number of tokens (``normalize=True``). A label with several words scores
log sum_w p(w) (the probability that the model says any of them).
"""
from __future__ import annotations

import torch

from ..errors import UnipeftError, choices


class Verbalizer:
    def __init__(self, words: dict, normalize: bool = False):
        if not isinstance(words, dict) or not words:
            raise UnipeftError("Verbalizer needs a dict label -> word(s), e.g. {'positive': ['great'], "
                               "'negative': ['terrible']}")
        table = {}
        for label, ws in words.items():
            ws = [ws] if isinstance(ws, str) else list(ws)
            if not ws or not all(isinstance(w, str) and w.strip() for w in ws):
                raise UnipeftError(f"verbalizer label {label!r}: give one or more non-empty words, got {ws!r}")
            table[str(label)] = [w.strip() for w in ws]
        if len(table) < 2:
            raise UnipeftError(f"a verbalizer needs at least 2 labels, got {choices(table)}")
        self.words, self.normalize = table, bool(normalize)
        self.labels = tuple(table)

    def __repr__(self):
        return f"Verbalizer({self.words!r}{', normalize=True' if self.normalize else ''})"

    @classmethod
    def parse(cls, spec: str, normalize: bool = False) -> "Verbalizer":
        """The command-line form ``positive=great|good,negative=terrible``."""
        words = {}
        for part in [p for p in spec.split(",") if p.strip()]:
            if "=" not in part:
                raise UnipeftError(f"verbalizer {spec!r}: write label=word|word,label=word (got {part!r})")
            label, ws = part.split("=", 1)
            words[label.strip()] = [w for w in ws.split("|") if w.strip()]
        return cls(words, normalize=normalize)

    def first_word(self, label: str) -> str:
        return self.words[label][0]

    def order(self, labels) -> "Verbalizer":
        """This verbalizer with its labels in the order ``labels`` (a task's label ids); missing labels are an error."""
        labels = [str(x) for x in labels]
        missing = [x for x in labels if x not in self.words]
        if missing:
            raise UnipeftError(f"verbalizer has no word for label(s) {missing}; it covers {choices(self.labels)}")
        extra = [x for x in self.labels if x not in labels]
        if extra:
            raise UnipeftError(f"verbalizer label(s) {extra} are not labels of the task ({choices(labels)})")
        return Verbalizer({x: self.words[x] for x in labels}, self.normalize)

    def token_ids(self, tokenizer, gap: str = " ") -> list[list[list[int]]]:
        """Token ids per label per word, each word tokenised with the whitespace that precedes it in the
        template (BPE vocabularies have distinct tokens for 'Ġgreat' and 'great'). Any number of tokens."""
        out = []
        for label, ws in self.words.items():
            ids = []
            for w in ws:
                t = tokenizer(gap + w, add_special_tokens=False)["input_ids"]
                if not t:
                    raise UnipeftError(f"verbalizer word {w!r} (label {label!r}) tokenises to nothing")
                unk = tokenizer.unk_token_id
                if unk is not None and unk in t and (tokenizer.unk_token or "") not in w:
                    raise UnipeftError(f"verbalizer word {w!r} (label {label!r}) is not in the tokenizer's "
                                       f"vocabulary (it tokenises to {tokenizer.unk_token!r})")
                ids.append(t)
            out.append(ids)
        return out

    def reduce(self, word_scores: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """(n, words) summed word log-probabilities -> (n, labels) label scores (see the module docstring)."""
        if self.normalize:
            word_scores = word_scores / torch.tensor(lengths, dtype=word_scores.dtype, device=word_scores.device)
        cols, i = [], 0
        for ws in self.words.values():
            cols.append(torch.logsumexp(word_scores[:, i:i + len(ws)], dim=1))
            i += len(ws)
        return torch.stack(cols, dim=1)
