"""Trainable new tokens: a domain vocabulary learned with BPE (seed 003 "Tokenization and Byte-Pair Encoding").

The notes' BPE learns a vocabulary from a corpus by merging the most frequent pair again and again
("the vocabulary is automatically determined"). Domain text (chemistry, law, code) is full of words
a general tokenizer cuts into many pieces. This method

1. trains a BPE tokenizer on the domain corpus (the ``tokenizers`` library), its vocabulary in merge
   order (the most frequent merges first);
2. keeps the learned tokens that are whole words of the corpus and that the base tokenizer lacks
   (it cuts them into two pieces or more), at most ``count`` of them;
3. adds them to the tokenizer (as whole-word added tokens: ids V, V+1, ...), and to the model as new
   embedding rows, initialised to the mean of the rows of the pieces the base tokenizer cut the word
   into, and trains only those rows -- and the LM head's rows for them: the same rows where it is
   tied, n rows of its own (initialised likewise from the head's rows) where it is not.

Positions: the input embedding (and every embedding module sharing its weight, e.g. T5's and BART's
encoder and decoder) is a linear map of one-hot vectors, so it is a ``LinearSite``: the delta maps
new ids to a valid id before the base lookup and puts its own rows in their place after it. The
output embedding gets the new tokens' logits: a tied one (GPT-2's LM head, BERT's MLM decoder) from
the same rows, an untied one (Llama) from n output rows of the delta's own, initialised to
the mean of the output rows of the same pieces. They fill the unused columns of a padded vocabulary
or are appended past it. The base embedding matrices are never resized or copied: the delta stores
the n new rows (input, output where untied, output biases) and the added tokens (in ``delta.json``,
with the id of the first one), a few KB per token.

The loss: transformers' LM losses flatten the logits by ``config.vocab_size``; when the new ids go
past it, the delta marks the model's loss position (``positions.loss.WideLogits``), which computes
the model's own loss function over the widened logits, so ``model(ids, labels=ids)``, ``unipeft
train`` and any loop reading the model's loss work unchanged (causal and masked LMs; an
encoder-decoder keeps its own loss: T5's flattens by the logits' width, BART's ``final_logits_bias``
needs a vocabulary padded past the new ids).

The tokenizer: ``up.attach(model, up.NewTokens(corpus=...), tokenizer=tok)`` extends ``tok`` in
place (the training recipe passes its tokenizer, so ``unipeft train`` encodes with the new tokens);
``up.load(base, dir, tokenizer=tok)`` does the same from the saved tokens, and
``up.extend_tokenizer(tok, model_or_dir)`` extends any tokenizer later. After ``up.detach`` the
tokenizer keeps its added tokens: use a fresh one with the bare base.

Not routable per example (``up.route``): the vocabulary is shared by every row of a batch; activate it
alongside the routed deltas instead. A quantized untied LM head has no float rows to start from: the
new tokens are read there, not predicted.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MethodConfig, check_positive_int, method
from ..errors import UnipeftError
from ..positions import LinearDelta
from ..positions.loss import WideLogits


@method
class NewTokens(MethodConfig):
    """corpus: domain text, a path to a text file (one document per line) or a list of strings;
    count: the most new tokens to add; min_frequency: a BPE merge needs this many occurrences.
    tokens and first_id: the added tokens and the id of the first (filled on attach; a saved delta
    holds them instead of the corpus)."""

    corpus: str | list | None = None
    count: int = 1000
    min_frequency: int = 2
    tokens: tuple | None = None
    first_id: int | None = None
    train_head: bool | list = False  # a vocabulary, not a task: combine it with a task delta

    kind: ClassVar[str] = "new_tokens"
    method_type: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = False  # new rows cannot fold into a matrix of fixed size
    routable: ClassVar[bool] = False
    route_refusal: ClassVar[str] = ("adds tokens to the vocabulary, which every row of a batch shares; activate it "
                                    "with up.activate alongside the routed deltas instead")
    layers_refusal: ClassVar[str] = ("it acts on the token embedding (and the LM head), which belong to no block; "
                                     "the new rows serve every layer")

    def validate(self):
        check_positive_int("NewTokens", "count", self.count)
        check_positive_int("NewTokens", "min_frequency", self.min_frequency)
        if self.tokens is not None:
            if isinstance(self.tokens, str) or not all(isinstance(t, str) and t for t in self.tokens) \
                    or not self.tokens or len(set(self.tokens)) != len(self.tokens):
                raise UnipeftError(f"NewTokens: tokens must be a list of distinct non-empty strings, got "
                                   f"{self.tokens!r}")
            self.tokens = tuple(self.tokens)
            check_positive_int("NewTokens", "first_id", self.first_id, allow_zero=True)
            return
        if self.first_id is not None:
            raise UnipeftError("NewTokens: first_id comes with tokens (a saved delta); give corpus= instead")
        if self.corpus is not None:  # None: not given yet (a recipe's default); attach asks for it
            _read_corpus(self.corpus)  # an empty or missing corpus fails here, before any model is touched

    def install(self, view, name):
        tok = view.tokenizer
        config = self
        if self.tokens is None:
            if self.corpus is None:
                raise UnipeftError("NewTokens: give corpus= (a text file, one document per line, or a list of "
                                   "texts) to learn the new tokens from")
            if tok is None:
                raise UnipeftError("NewTokens: learning new tokens needs the tokenizer they extend: "
                                   "up.attach(model, up.NewTokens(...), tokenizer=tokenizer)")
            tokens = learn_tokens(_read_corpus(self.corpus), tok, self.count, self.min_frequency)
            if not tokens:
                raise UnipeftError(f"NewTokens: the corpus has no word (seen >= {self.min_frequency} times) that "
                                   f"the tokenizer lacks; nothing to add")
            config = self.replace(corpus=None, tokens=tuple(tokens), first_id=len(tok))
        embeds, out, tied = _embeddings(view.model)
        size = embeds[0][1].num_embeddings
        if config.first_id > size:
            raise UnipeftError(f"NewTokens: the first new token would have id {config.first_id}, past the "
                               f"{size} rows of the model's embeddings: tokenizer and model do not match")
        have = tok.get_vocab() if tok is not None else {}
        known = all(have.get(t) == config.first_id + i for i, t in enumerate(config.tokens))
        # rows start at the mean of the base's pieces; a tokenizer already holding the tokens (a load with the
        # tokenizer of the training) has no pieces for them, and the saved rows replace these anyway
        pieces = _pieces(tok, config.tokens) if tok is not None and not known else None
        rows = NewRows(embeds[0][1], pieces, len(config.tokens), out, tied)
        view.set_module(rows)
        for path, _ in embeds:
            view.add_linear(path, InputRows(rows, config.first_id))
        if out is not None:
            view.add_linear(out[0], OutputRows(rows, config.first_id))
            if config.first_id + len(config.tokens) > out[1].weight.shape[0]:  # past a padded vocabulary
                view.add_loss_term(WideLogits())
        view.delta.config = config  # what up.save writes: the tokens, not the corpus
        if tok is not None:
            add_to_tokenizer(tok, config.tokens, config.first_id)  # last: a failed attach leaves it as it was


# ---------------------------------------------------------------------------
# The vocabulary
# ---------------------------------------------------------------------------

def _read_corpus(corpus) -> list[str]:
    if isinstance(corpus, (str, Path)):
        path = Path(corpus)
        if not path.is_file():
            raise UnipeftError(f"NewTokens: corpus {str(corpus)!r} is not a file; give a text file or a list of texts")
        texts = path.read_text(encoding="utf-8", errors="replace").splitlines()
    elif isinstance(corpus, (list, tuple)) and all(isinstance(t, str) for t in corpus):
        texts = list(corpus)
    else:
        raise UnipeftError(f"NewTokens: corpus must be a text file path or a list of strings, got "
                           f"{type(corpus).__name__}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UnipeftError(f"NewTokens: the corpus is empty ({str(corpus)[:60]!r}): it needs domain text to learn "
                           f"tokens from")
    return texts


def learn_tokens(texts: list[str], tokenizer, count: int, min_frequency: int = 2) -> list[str]:
    """Up to ``count`` whole words of ``texts`` that BPE learns and ``tokenizer`` lacks, in merge order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    norm = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    if norm is not None and norm.normalize_str("ABC") == "abc":  # an uncased tokenizer sees lowercase words
        texts = [t.lower() for t in texts]
    split = pre_tokenizers.Whitespace()
    words = {w for t in texts for w, _ in split.pre_tokenize_str(t)}
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = split
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000 + 8 * count, min_frequency=min_frequency,
                                                       show_progress=False))
    known = set(tokenizer.get_vocab())

    def lacks(word: str) -> bool:  # cut into pieces, or unknown altogether
        pieces = tokenizer.tokenize(word)
        return len(pieces) > 1 or (tokenizer.unk_token is not None and pieces == [tokenizer.unk_token])

    out = []
    for token, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]):  # ids follow the merges
        if len(token) > 1 and token in words and token not in known and lacks(token):
            out.append(token)
            if len(out) == count:
                break
    return out


def add_to_tokenizer(tokenizer, tokens, first_id: int) -> None:
    """Add ``tokens`` as whole-word tokens with ids first_id, first_id + 1, ... (a no-op if they are there)."""
    from tokenizers import AddedToken

    have = tokenizer.get_vocab()
    if all(have.get(t) == first_id + i for i, t in enumerate(tokens)):
        return
    if len(tokenizer) != first_id:
        raise UnipeftError(f"NewTokens: the tokens start at id {first_id}, but this tokenizer has {len(tokenizer)} "
                           f"tokens: extend a fresh copy of the base model's tokenizer")
    tokenizer.add_tokens([AddedToken(t, single_word=True, normalized=True) for t in tokens])
    got = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    if got != list(range(first_id, first_id + len(tokens))):
        raise UnipeftError("NewTokens: the tokenizer gave the new tokens other ids than the delta's")


def extend_tokenizer(tokenizer, source, name: str | None = None):
    """Give ``tokenizer`` the tokens of a NewTokens delta: ``source`` is a model holding one (``name``
    if several) or a saved delta's directory. Returns the tokenizer (extended in place)."""
    from ..engine import registry
    from ..storage import read_meta

    if isinstance(source, nn.Module):
        reg = registry(source)
        found = {n: d.config for n, d in (reg.deltas.items() if reg else ()) if isinstance(d.config, NewTokens)}
        if name is not None:
            found = {n: c for n, c in found.items() if n == name}
        if len(found) != 1:
            raise UnipeftError(f"extend_tokenizer: the model has {len(found)} NewTokens deltas"
                               f"{'' if name is None else f' named {name!r}'}; name exactly one")
        config = next(iter(found.values()))
    else:
        meta = read_meta(source)
        if meta["method"].get("kind") != NewTokens.kind:
            raise UnipeftError(f"extend_tokenizer: {str(source)!r} is a {meta['method'].get('kind')} delta, not "
                               f"new_tokens")
        config = NewTokens(**meta["method"]["options"])
    add_to_tokenizer(tokenizer, config.tokens, config.first_id)
    return tokenizer


def _pieces(tokenizer, tokens) -> list[list[int]]:
    """The base tokenizer's ids for each new word (what its row starts from)."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] or [0] for t in tokens]


# ---------------------------------------------------------------------------
# The model side
# ---------------------------------------------------------------------------

def _embeddings(model: nn.Module):
    """([(path, module)] of every embedding sharing the input embedding's weight, (path, module) of the
    output embedding that gets the new tokens' logits (None when absent or quantized), and whether that
    one is tied to the input embedding."""
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise UnipeftError(f"NewTokens: {type(model).__name__}'s input embedding is a {type(emb).__name__}, "
                           f"not an nn.Embedding")
    embeds = [(p, m) for p, m in model.named_modules(remove_duplicate=False)
              if isinstance(m, nn.Embedding) and m.weight is emb.weight]
    seen, unique = set(), []
    for p, m in embeds:  # a module reachable under several names is one site
        if id(m) not in seen:
            seen.add(id(m))
            unique.append((p, m))
    out_mod = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(out_mod, "weight", None)
    tied = weight is not None and weight is emb.weight
    out = None
    # an untied head's rows start from its float rows of the pieces: packed (quantized) rows have none
    if tied or (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point()):
        out = next((p, m) for p, m in model.named_modules() if m is out_mod)
    return unique, out, tied


class NewRows(nn.Module):
    """The n new embedding rows, the output rows of an untied LM head (``out_rows``) and the output
    biases of an LM head with biases."""

    def __init__(self, embedding: nn.Embedding, pieces: list[list[int]] | None, n: int, out, tied: bool):
        super().__init__()
        with torch.no_grad():
            if pieces is None:  # loading: the saved rows replace these
                init = torch.zeros(n, embedding.embedding_dim)
            else:  # the mean of the pieces' rows, as the base embeds them (scaled embeddings included)
                init = torch.stack([embedding(torch.tensor(p, device=embedding.weight.device)).float().mean(0)
                                    for p in pieces]).cpu()
        self.rows = nn.Parameter(init)
        self.out_rows = None
        if out is not None and not tied:
            w = out[1].weight.detach()
            self.out_rows = nn.Parameter(torch.zeros(n, w.shape[1]) if pieces is None else
                                         torch.stack([w[p].float().mean(0) for p in pieces]).cpu())
        bias = getattr(out[1], "bias", None) if out is not None else None
        if bias is not None:
            b = torch.zeros(n) if pieces is None else torch.stack([bias.detach()[p].float().mean() for p in pieces])
            self.bias = nn.Parameter(b.cpu())
        else:
            self.bias = None


class InputRows(LinearDelta):
    """E(x) for the base ids, the delta's rows for ids >= first_id (mapped to id 0 for the base lookup)."""

    rewrites_input = True
    rewrites_output = True

    def __init__(self, rows: NewRows, first_id: int):
        super().__init__()
        self.__dict__["table"] = rows  # not a submodule: saved once, as the delta's model-level module
        self.first_id = first_id

    def input(self, ids):
        return ids.masked_fill(ids >= self.first_id, 0)

    def output(self, ids, y):
        n = self.table.rows.shape[0]
        new = (ids >= self.first_id) & (ids < self.first_id + n)  # another NewTokens delta's ids lie past these
        if not bool(new.any()):
            return y
        index = (ids - self.first_id).clamp(0, n - 1)
        return torch.where(new.unsqueeze(-1), self.table.rows[index].to(y.dtype), y)


class OutputRows(LinearDelta):
    """Logits of the output embedding for ids first_id ... first_id + n - 1 (overwriting unused
    columns where the vocabulary is padded, appended past it): the input rows where it is tied."""

    rewrites_output = True

    def __init__(self, rows: NewRows, first_id: int):
        super().__init__()
        self.__dict__["table"] = rows
        self.first_id = first_id

    def output(self, x, y):
        t = self.table
        w = t.rows if t.out_rows is None else t.out_rows
        new = F.linear(x, w.to(x.dtype), None if t.bias is None else t.bias.to(x.dtype)).to(y.dtype)
        return torch.cat([y[..., :self.first_id], new, y[..., self.first_id + new.shape[-1]:]], dim=-1)
