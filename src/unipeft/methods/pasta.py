"""PASTA, parameter-efficient tuning with special token adaptation (Yang et al. 2023; seed 004).

    at the input of layer l:   h_t <- h_t + v^l_{k(t)}      for each chosen (special) token t
                               the rest of the model frozen

Special tokens gather global information through "vertical" attention heads; a trainable
vector per layer and per special token steers what they carry, for about 0.015-0.022% of
the parameters (L x K x d: 24 x 2 x 1024 on BERT-large). The vectors sit at the position
"hidden states at chosen tokens" (``positions.HiddenSite``); they start at zero, so the model
starts exactly at the base.

Which tokens: ``tokens`` (token strings or ids); by default the tokenizer's own special tokens
(CLS, SEP, BOS, EOS, the ones it has), never hard-coded ids. Each row's positions come from its
own ids, so batches that mix single sentences and pairs are fine (the reference code takes the
special-token count of a batch's first example). ``occurrences``: the paper's vector belongs to
"the p-th special token"; with occurrences=2 the second [SEP] of a sentence pair gets its own
vector (later ones share the last), with 1 (the default) every occurrence of a token shares one.
The resolved ids are kept in the delta's config, so a saved delta loads without a tokenizer.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from ..config import MethodConfig, check_positive_int, method
from ..errors import UnipeftError
from ..positions import TokenSource

SPECIAL = ("cls_token", "sep_token", "bos_token", "eos_token")


@method
class PASTA(MethodConfig):
    """tokens: the chosen tokens (strings need ``tokenizer=`` in ``up.attach``; ids do not), default
    the tokenizer's CLS/SEP/BOS/EOS; occurrences: how many occurrences of each token get a vector
    of their own."""

    tokens: tuple | None = None
    occurrences: int = 1
    train_head: bool | list = True

    kind: ClassVar[str] = "pasta"
    method_type: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = False  # the vectors depend on where the tokens are, not on a weight

    def validate(self):
        if self.tokens is not None:
            toks = (self.tokens,) if isinstance(self.tokens, (str, int)) else tuple(self.tokens)
            if not toks or not all(isinstance(t, str) and t or isinstance(t, int) and not isinstance(t, bool)
                                   and t >= 0 for t in toks):
                raise UnipeftError(f"PASTA: tokens must be a non-empty list of token strings or ids, "
                                   f"got {self.tokens!r}")
            if len(set(toks)) != len(toks):
                raise UnipeftError(f"PASTA: tokens repeat in {list(toks)!r}")
            self.tokens = toks
        check_positive_int("PASTA", "occurrences", self.occurrences)

    def install(self, view, name):
        ids = self._ids(view)
        path, _, embed, _, _ = view.stacks_for_input()[0]
        from ..positions import blocks_under

        every = blocks_under(view.model, view.reg.map, path)   # the site's layers
        mine = blocks_under(view.model, view.map, path)        # those this delta acts on (layers=)
        if not mine:
            raise UnipeftError(f"PASTA: found no blocks in the input stack of {view.map.model_type!r}")
        layers = [next(i for i, b in enumerate(every) if b is m) for m in mine]
        vocab, dim = embed.weight.shape
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise UnipeftError(f"PASTA: token id {bad[0]} is outside the model's vocabulary of {vocab}")
        vectors = SpecialTokenVectors(ids, self.occurrences, layers, dim)
        view.set_module(vectors)
        view.add_hidden(path, vectors)
        view.delta.config = self.replace(tokens=tuple(ids))  # saved as ids: loads without a tokenizer

    def _ids(self, view) -> list[int]:
        tok = view.tokenizer
        if self.tokens is not None and all(isinstance(t, int) for t in self.tokens):
            return list(self.tokens)
        if tok is None:
            what = "token strings" if self.tokens is not None else "the default (the tokenizer's special tokens)"
            raise UnipeftError(f"PASTA: {what} need a tokenizer: up.attach(..., tokenizer=tok), or give token ids")
        if self.tokens is None:
            names = [getattr(tok, attr, None) for attr in SPECIAL]
            found = [t for t in dict.fromkeys(n for n in names if n)]
            if not found:
                raise UnipeftError("PASTA: the tokenizer has no CLS, SEP, BOS or EOS token; give tokens=[...]")
            return list(dict.fromkeys(tok.convert_tokens_to_ids(t) for t in found))
        out = []
        for t in self.tokens:
            if isinstance(t, int):
                out.append(t)
                continue
            i = tok.convert_tokens_to_ids(t)
            if i is None or (i == tok.unk_token_id and t != tok.unk_token):
                raise UnipeftError(f"PASTA: {t!r} is not a token of this tokenizer; its special tokens: "
                                   f"{sorted(set(tok.all_special_tokens))}")
            out.append(i)
        return list(dict.fromkeys(out))


class SpecialTokenVectors(nn.Module, TokenSource):
    """v^l_k for the L layers it acts on and K = tokens x occurrences chosen places: (L, K, d), zeros
    at the start."""

    def __init__(self, ids: list[int], occurrences: int, layers: list[int], dim: int):
        super().__init__()
        self.occurrences = occurrences
        self.rows = {layer: i for i, layer in enumerate(layers)}  # site layer -> row of the table
        self.register_buffer("token_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.table = nn.Parameter(torch.zeros(len(layers), len(ids) * occurrences, dim))

    def hits(self, ids):
        """(rows, columns, vector index) of every chosen token in ``ids`` (n, L): token k's j-th
        occurrence in its row takes vector k * occurrences + min(j, occurrences - 1)."""
        match = ids.unsqueeze(-1) == self.token_ids.to(ids.device)            # (n, L, K)
        occurrence = (match.cumsum(1) - 1).clamp(max=self.occurrences - 1)   # per row and token
        rows, cols, k = match.nonzero(as_tuple=True)
        return rows, cols, k * self.occurrences + occurrence[rows, cols, k]

    def vectors(self, layer):
        i = self.rows.get(layer)
        return None if i is None else self.table[i]
