"""Scoring verbalizer words with a language model: batched, with the shared prefix's KV cache reused.

A causal LM scores a word w after a context c as log p(w | c) = sum_j log p(w_j | c, w_<j): one row
``c + w[:-1]`` holds every factor. In-context learning puts the same prefix (task description and
demonstrations) before every example, so ``Scorer`` encodes it ONCE, keeps its KV cache (found by
type: the ``transformers.Cache`` in the model's output), and for each batch hands the model a copy
repeated to the batch; the rows then hold only the example's own tokens and the label words. All the
words of a batch of examples go through one forward pass. ``Scorer.naive`` is the reference: one
full forward pass per example and word, the prefix encoded every time.

A masked LM (BERT, RoBERTa) scores a word of m tokens at m ``[MASK]`` tokens put where the template's
``{label}`` stands: log p(w) = sum_j log p(w_j at mask j) (PET's multi-mask scoring). The input is
bidirectional, so there is no prefix to share; one row per example and word length.

Tokenisation is by segment (prefix, example, word), identical in the cached and the naive paths, so
they score the same token sequences.
"""
from __future__ import annotations

import copy
import re

import torch

from ..errors import UnipeftError
from ..model_parts import logits_at


def lm_kind(model) -> str:
    """'causal' or 'masked', from the model's class (transformers' auto mappings), never from names of attributes."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                         MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    cls = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise UnipeftError(f"{cls} is an encoder-decoder model: prompting scores words with a causal LM "
                           "(GPT-2, Llama, SmolLM2, ...) or a masked LM (BERT, RoBERTa, ...)")
    if cls in set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()):
        return "masked"
    if cls in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return "causal"
    raise UnipeftError(f"{cls} has no language-modelling head: load it with AutoModelForCausalLM or "
                       "AutoModelForMaskedLM to score verbalizer words")


def context_size(model) -> int | None:
    """The longest input the model's position embeddings allow (None when the config does not say)."""
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def lead_ids(tokenizer) -> list[int]:
    """The tokens a tokenizer puts before a text (Llama's BOS; nothing for GPT-2), found by comparing encodings."""
    with_ = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for k in range(len(with_) - len(without) + 1):
        if with_[k:k + len(without)] == without:
            return list(with_[:k])
    return []


def find_cache(output):
    """The ``transformers.Cache`` object in a model output (by type: the field's name differs between models)."""
    from transformers import Cache

    values = output.values() if hasattr(output, "values") else output
    for v in values:
        if isinstance(v, Cache):
            return v
    raise UnipeftError(f"the model returned no KV cache ({type(output).__name__}); it cannot reuse a shared prefix")


def cache_argument(model) -> str:
    """The forward() parameter that takes a KV cache, found by its annotation (``Cache``): transformers 5.24
    calls it ``cache``, earlier releases ``past_key_values``."""
    import inspect
    import typing

    from transformers import Cache

    def holds_cache(ann) -> bool:
        if isinstance(ann, str):
            return re.search(r"\bCache\b", ann) is not None
        if isinstance(ann, type):
            return issubclass(ann, Cache)
        return any(holds_cache(a) for a in typing.get_args(ann))

    for name, p in inspect.signature(model.forward).parameters.items():
        if p.annotation is not inspect.Parameter.empty and holds_cache(p.annotation):
            return name
    return "past_key_values"


def expand_cache(cache, n: int):
    """A copy of a batch-1 cache repeated to batch ``n`` (the forward pass appends to it; the original stays)."""
    c = copy.deepcopy(cache)
    if n > 1:
        c.batch_repeat_interleave(n)
    return c


def _device(model) -> torch.device:
    return next(model.parameters()).device


def causal_word_logprobs(model, contexts: list[list[int]], words: list[list[int]], cache=None,
                         prefix_len: int = 0, pad_id: int = 0) -> torch.Tensor:
    """log p(words[i] | prefix, contexts[i]) for every row i, in one forward pass (gradients flow when enabled).

    ``cache``: the prefix's KV cache at batch 1 (left unchanged), ``prefix_len`` its length in tokens.
    Words of one token need only the context, so rows that share a context and a one-token word are
    computed once.
    """
    dev = _device(model)
    keys = [tuple(c) + tuple(w[:-1]) for c, w in zip(contexts, words)]
    uniq = list(dict.fromkeys(keys))
    where = {k: i for i, k in enumerate(uniq)}
    width = max(len(k) for k in uniq)
    ids = torch.full((len(uniq), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(uniq), prefix_len + width, dtype=torch.long)
    mask[:, :prefix_len] = 1
    for i, k in enumerate(uniq):
        ids[i, :len(k)] = torch.tensor(k, dtype=torch.long)
        mask[i, prefix_len:prefix_len + len(k)] = 1
    kw = {}
    if cache is not None:
        kw = {cache_argument(model): expand_cache(cache, len(uniq)), "use_cache": True}
    rows, pos, tok = [], [], []
    for r, (c, w) in enumerate(zip(contexts, words)):
        for j, t in enumerate(w):
            rows.append(where[keys[r]])
            pos.append(len(c) - 1 + j)
            tok.append(t)
    picked = logits_at(model, torch.tensor(rows, device=dev), torch.tensor(pos, device=dev),
                       input_ids=ids.to(dev), attention_mask=mask.to(dev), **kw).float().log_softmax(-1)
    per_token = picked[torch.arange(len(tok), device=dev), torch.tensor(tok, device=dev)]
    owner = torch.repeat_interleave(torch.arange(len(words), device=dev), torch.tensor([len(w) for w in words],
                                                                                       device=dev))
    return torch.zeros(len(words), device=dev).index_add(0, owner, per_token)


def masked_word_logprobs(model, inputs: list[list[int]], words: list[list[int]], mask_id: int,
                         pad_id: int = 0) -> torch.Tensor:
    """log p(words[i]) at the mask of inputs[i] (one [MASK] each, expanded to len(words[i]) masks)."""
    dev = _device(model)
    keys = []
    for x, w in zip(inputs, words):
        if mask_id is None or mask_id not in x:
            raise UnipeftError("a masked-LM input holds no mask token where the label goes")
        at = x.index(mask_id)
        keys.append((tuple(x[:at]) + (mask_id,) * len(w) + tuple(x[at + 1:]), at))
    uniq = list(dict.fromkeys(keys))
    where = {k: i for i, k in enumerate(uniq)}
    width = max(len(k[0]) for k in uniq)
    ids = torch.full((len(uniq), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(uniq), width, dtype=torch.long)
    for i, (k, _) in enumerate(uniq):
        ids[i, :len(k)] = torch.tensor(k, dtype=torch.long)
        mask[i, :len(k)] = 1
    rows, pos, tok, owner = [], [], [], []
    for r, (key, w) in enumerate(zip(keys, words)):
        for j, t in enumerate(w):
            rows.append(where[key])
            pos.append(key[1] + j)
            tok.append(t)
            owner.append(r)
    picked = logits_at(model, torch.tensor(rows, device=dev), torch.tensor(pos, device=dev),
                       input_ids=ids.to(dev), attention_mask=mask.to(dev)).float().log_softmax(-1)
    per_token = picked[torch.arange(len(tok), device=dev), torch.tensor(tok, device=dev)]
    return torch.zeros(len(words), device=dev).index_add(0, torch.tensor(owner, device=dev), per_token)


class Scorer:
    """Label log-probabilities of examples under a template and a verbalizer, with optional demonstrations.

    ``demonstrations``: (text, label) or (text, text_pair, label) tuples, shown filled with the label's first
    word; ``max_text_tokens`` truncates each example's and demonstration's text(s) to that many tokens.
    """

    def __init__(self, model, tokenizer, template, verbalizer, demonstrations=(), *, batch_size: int = 8,
                 max_text_tokens: int | None = None):
        self.model, self.tokenizer, self.template, self.verbalizer = model, tokenizer, template, verbalizer
        self.kind = lm_kind(model)
        self.batch_size = max(1, int(batch_size))
        self.max_text_tokens = max_text_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.word_ids = verbalizer.token_ids(tokenizer, template.gap)
        self.words = [w for ws in self.word_ids for w in ws]
        self.lengths = [len(w) for w in self.words]
        self.context = context_size(model)
        demos = []
        for d in demonstrations:
            text, pair, label = (d[0], None, d[1]) if len(d) == 2 else tuple(d)
            if str(label) not in verbalizer.words:
                raise UnipeftError(f"demonstration label {label!r} is not in the verbalizer ({list(verbalizer.labels)})")
            demos.append((self._cut(text), self._cut(pair), verbalizer.first_word(str(label))))
        self.prefix_text = template.prefix(demos)
        if self.kind == "masked":
            if tokenizer.mask_token_id is None:
                raise UnipeftError(f"tokenizer {type(tokenizer).__name__} has no mask token: a masked LM needs one")
            self.prefix = []
        else:
            body = tokenizer(self.prefix_text, add_special_tokens=False)["input_ids"] if self.prefix_text else []
            self.prefix = lead_ids(tokenizer) + body
        self._cache = None

    def _cut(self, text):
        if text is None or not self.max_text_tokens:
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_text_tokens else self.tokenizer.decode(ids[:self.max_text_tokens])

    def encode(self, text: str, pair: str | None = None) -> list[int]:
        """The example's own tokens: the prompt after the prefix (causal), or the whole cloze input (masked)."""
        text, pair = self._cut(text), self._cut(pair)
        if self.kind == "masked":
            s = self.prefix_text + self.template.cloze(text, pair, self.tokenizer.mask_token)
            ids = self.tokenizer(s)["input_ids"]
            if ids.count(self.tokenizer.mask_token_id) != 1:
                raise UnipeftError(f"the cloze input must hold exactly one {self.tokenizer.mask_token} (the label's "
                                   "place); the example or the template contains another")
        else:
            ids = self.tokenizer(self.template.prompt(text, pair), add_special_tokens=False)["input_ids"]
            if not self.prefix and not ids:  # a word needs at least one token before it
                raise UnipeftError(f"example {text[:40]!r} tokenises to nothing and there is no prefix to continue")
        longest = len(self.prefix) + len(ids) + max(self.lengths) - (0 if self.kind == "causal" else 1)
        if self.context is not None and longest > self.context:
            raise UnipeftError(f"prompt of {longest} tokens is longer than the model's context ({self.context}): "
                               "use fewer shots, shorter texts (max_text_tokens / --max-text-tokens) or a shorter "
                               "template")
        return ids

    @torch.no_grad()
    def prefix_cache(self):
        """The shared prefix's KV cache at batch 1, computed once."""
        if self._cache is None and self.prefix:
            ids = torch.tensor([self.prefix], device=_device(self.model))
            self._cache = find_cache(self.model(input_ids=ids, use_cache=True))
        return self._cache

    def _rows(self, encoded: list[list[int]]):
        contexts = [e for e in encoded for _ in self.words]
        return contexts, self.words * len(encoded)

    @torch.no_grad()
    def word_scores(self, encoded: list[list[int]]) -> torch.Tensor:
        """(n, words) log-probabilities, a batch of examples (all their words) per forward pass."""
        out = []
        for i in range(0, len(encoded), self.batch_size):
            contexts, words = self._rows(encoded[i:i + self.batch_size])
            if self.kind == "masked":
                s = masked_word_logprobs(self.model, contexts, words, self.tokenizer.mask_token_id, self.pad_id)
            else:
                s = causal_word_logprobs(self.model, contexts, words, self.prefix_cache(), len(self.prefix),
                                         self.pad_id)
            out.append(s.view(-1, len(self.words)).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.words))

    def scores(self, examples, calibrate: bool = False) -> torch.Tensor:
        """(n, labels) label log-probabilities of examples given as (text, text_pair or None) pairs.

        ``calibrate``: contextual calibration (Zhao et al. 2021): p(y|x) / p(y|"N/A"), renormalised
        over the labels, returned as log-probabilities.
        """
        encoded = [self.encode(t, p) for t, p in examples]
        labels = self.verbalizer.reduce(self.word_scores(encoded), self.lengths)
        if not calibrate:
            return labels
        return (labels.log_softmax(-1) - self.content_free()).log_softmax(-1)

    def content_free(self) -> torch.Tensor:
        """log p(label | "N/A"), normalised over the labels (the content-free input of Zhao et al. 2021)."""
        pair = "N/A" if self.template.pair else None
        enc = [self.encode("N/A", pair)]
        return self.verbalizer.reduce(self.word_scores(enc), self.lengths).log_softmax(-1)[0]

    @torch.no_grad()
    def naive(self, examples) -> torch.Tensor:
        """The reference: one forward pass per example and word, the whole prompt every time (no cache)."""
        dev = _device(self.model)
        rows = []
        for t, p in examples:
            e = self.encode(t, p)
            scores = []
            for w in self.words:
                if self.kind == "masked":
                    s = masked_word_logprobs(self.model, [e], [w], self.tokenizer.mask_token_id, self.pad_id)[0]
                else:
                    ids = torch.tensor([self.prefix + e + w[:-1]], device=dev)
                    logp = self.model(input_ids=ids).logits[0].float().log_softmax(-1)
                    start = len(self.prefix) + len(e) - 1
                    s = sum(logp[start + j, t_] for j, t_ in enumerate(w))
                scores.append(float(s))
            rows.append(scores)
        return self.verbalizer.reduce(torch.tensor(rows), self.lengths)
