"""From examples to padded tensors: tokenisation (cached between runs), length-grouped batches, collation.

* ``encode`` turns a task's examples into token ids once. The result is a few flat
  tensors (ids + offsets), so it caches as one safetensors file keyed by a hash of
  the examples, the tokenizer and the settings: a second run on the same data skips
  tokenisation. Nothing is pickled.
* ``batch_order`` yields the batches of an epoch as lists of example indices. With
  ``group_by_length`` the examples of a batch have similar lengths (shuffled in
  mega-batches of 50 batches, sorted inside each), so dynamic padding wastes little.
  The order is a pure function of (seed, epoch): a resumed run sees the same batches.
* ``Collator`` pads a batch to its longest example only (dynamic padding).

Inputs per task kind (see ``tasks.py``):
  classification / regression  tokenizer(text[, text_pair]) -> labels: one id / one float
  causal_lm                    prompt_template(source) + target + EOS; the loss covers the target only
                               (prompt positions get label -100); generation feeds the prompt alone
  seq2seq                      tokenizer(source) -> labels = tokenizer(target)
  chat                         the conversation in its chat template, labels on assistant turns (chat.py);
                               ``chat.pack`` packs rows with per-example position ids (``Encoded.positions``)
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import fileio
from ..errors import UnipeftError
from .tasks import Task

IGNORE = -100  # label of positions without loss (prompt tokens, padding)
CACHE_VERSION = 1


@dataclass
class Encoded:
    """Token ids of n examples, stored flat: example i is ``ids[offsets[i]:offsets[i+1]]``.

    ``labels`` is (n,) for classification/regression, or flat with ``label_offsets``
    for token-level labels (causal_lm, seq2seq). ``types`` holds token type ids
    when the tokenizer makes them (BERT sentence pairs).
    """

    ids: torch.Tensor
    offsets: torch.Tensor
    labels: torch.Tensor | None = None
    label_offsets: torch.Tensor | None = None
    types: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # packed rows (chat.pack): position ids restarting per example

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def lengths(self) -> list[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()

    def num_tokens(self, indices=None) -> int:
        lens = self.offsets[1:] - self.offsets[:-1]
        return int(lens.sum() if indices is None else lens[torch.as_tensor(indices)].sum())

    def example(self, i: int) -> dict:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        out = {"input_ids": self.ids[a:b]}
        if self.types is not None:
            out["token_type_ids"] = self.types[a:b]
        if self.positions is not None:
            out["position_ids"] = self.positions[a:b]
        if self.labels is not None:
            if self.label_offsets is None:
                out["labels"] = self.labels[i]
            else:
                c, d = int(self.label_offsets[i]), int(self.label_offsets[i + 1])
                out["labels"] = self.labels[c:d]
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}


def _flat(seqs: list[list[int]], dtype=torch.int32) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([0] + [len(s) for s in seqs], dtype=torch.int64)
    flat = torch.tensor([t for s in seqs for t in s], dtype=dtype)
    return flat, lens.cumsum(0)


# ---------------------------------------------------------------------------
# encoding
# ---------------------------------------------------------------------------

def _tokenize(tokenizer, texts, pairs=None, max_length=None, add_special_tokens=True, chunk=1024):
    """Token ids (and token types) for many texts, in chunks so memory stays flat."""
    ids, types = [], []
    for i in range(0, len(texts), chunk):
        kw = dict(truncation=max_length is not None, max_length=max_length, add_special_tokens=add_special_tokens)
        enc = tokenizer(texts[i:i + chunk], pairs[i:i + chunk] if pairs else None, **kw)
        ids += enc["input_ids"]
        if "token_type_ids" in enc:
            types += enc["token_type_ids"]
    return ids, (types or None)


def eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UnipeftError(f"tokenizer {type(tokenizer).__name__} has no end-of-sequence token; "
                           "generation tasks need one to mark where a target ends")
    return eos


def _encode_uncached(task: Task, examples: list[dict], tokenizer, max_length: int, prompts_only: bool) -> Encoded:
    if task.kind == "chat":
        from . import chat

        return chat.encode(task, examples, tokenizer, max_length, prompts_only)
    texts = [e["text"] for e in examples]
    if task.kind in ("classification", "regression"):
        pairs = [e["text_pair"] for e in examples] if task.pair else None
        ids, types = _tokenize(tokenizer, texts, pairs, max_length)
        flat, off = _flat(ids)
        labels = None
        if not prompts_only:
            dtype = torch.int64 if task.kind == "classification" else torch.float32
            labels = torch.tensor([e["target"] for e in examples], dtype=dtype)
        return Encoded(flat, off, labels, None, _flat(types, torch.int8)[0] if types else None)
    if task.kind == "seq2seq":
        ids, _ = _tokenize(tokenizer, texts, None, max_length)
        flat, off = _flat(ids)
        if prompts_only:
            return Encoded(flat, off)
        tgt, _ = _tokenize(tokenizer, [e["target"] for e in examples], None, max_length)
        lab, loff = _flat(tgt, torch.int64)
        return Encoded(flat, off, lab, loff)
    # causal_lm: [prompt][target][eos], loss on target + eos only
    prompts, _ = _tokenize(tokenizer, [task.prompt_template.format(source=t) for t in texts])
    if prompts_only:
        prompts = [p[-max_length:] for p in prompts]  # keep the end of a long prompt: it is next to the answer
        return Encoded(*_flat(prompts))
    targets, _ = _tokenize(tokenizer, [e["target"] for e in examples], add_special_tokens=False)
    eos = eos_id(tokenizer)
    seqs, labels = [], []
    for p, t in zip(prompts, targets):
        t = t + [eos]
        keep_p = max(1, min(len(p), max_length - len(t)))
        p = p[-keep_p:]
        s = (p + t)[:max_length]
        seqs.append(s)
        labels.append(([IGNORE] * len(p) + t)[:max_length])
    flat, off = _flat(seqs)
    lab, loff = _flat(labels, torch.int64)
    return Encoded(flat, off, lab, loff)


def _tokenizer_signature(tokenizer) -> str:
    probe = tokenizer("unipeft: the quick brown fox, 1234 jumps!", add_special_tokens=True)["input_ids"]
    return json.dumps([type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
                       tokenizer.eos_token_id, tokenizer.pad_token_id, probe]
                      + ([tokenizer.chat_template] if getattr(tokenizer, "chat_template", None) else []))


def cache_key(task: Task, examples: list[dict], tokenizer, max_length: int, prompts_only: bool) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, task.kind, task.pair, task.prompt_template, max_length, prompts_only]
                        + ([task.chat_template] if task.chat_template else [])).encode())
    h.update(_tokenizer_signature(tokenizer).encode())
    for e in examples:
        h.update(json.dumps([e.get("text"), e.get("text_pair"), e.get("target")]).encode())
    return h.hexdigest()[:40]


def default_cache_dir() -> Path:
    return Path(os.environ.get("UNIPEFT_CACHE", Path.home() / ".cache" / "unipeft")) / "tokenized"


def encode(task: Task, examples: list[dict], tokenizer, max_length: int = 128, *, prompts_only: bool = False,
           cache_dir: str | os.PathLike | None | bool = True, quiet: bool = False) -> Encoded:
    """Tokenise ``examples`` for ``task``; cached on disk unless ``cache_dir`` is None/False.

    ``prompts_only`` encodes the inputs a model generates from (no labels). Shows a progress
    phase (or a line for a cache hit) unless ``quiet``.
    """
    from .. import progress

    if max_length < 2:
        raise UnipeftError(f"max_length must be at least 2, got {max_length}")
    if cache_dir is True:
        cache_dir = default_cache_dir()
    path = None
    if cache_dir:
        path = Path(cache_dir) / f"{cache_key(task, examples, tokenizer, max_length, prompts_only)}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            try:
                enc = Encoded(**load_file(str(path)))
                if not quiet:
                    progress.note(f"tokenised {len(examples):,} examples (cache hit)")
                return enc
            except Exception:  # a damaged cache file is rebuilt, never trusted
                pass
    with progress.phase("tokenising", len(examples), "examples", enabled=not quiet and len(examples) >= 1000) as bar:
        enc = _encode_uncached(task, examples, tokenizer, max_length, prompts_only)
        bar.update(len(examples))
    if path is not None:
        from safetensors.torch import save_file

        fileio.atomic_write(path, lambda tmp: save_file(enc.tensors(), str(tmp)))
    return enc


# ---------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------

def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, *, shuffle: bool = True,
                group_by_length: bool = True, mega: int = 50) -> list[list[int]]:
    """The batches of one epoch as lists of example indices: a pure function of its arguments."""
    n = len(lengths)
    if not shuffle:
        order = list(range(n))
        if group_by_length:  # evaluation: sorted by length, order restored by the caller
            order.sort(key=lambda i: -lengths[i])
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return length_grouped(order, lengths, batch_size, g, mega)


def length_grouped(order: list[int], lengths, batch_size: int, g: torch.Generator, mega: int = 50) -> list[list[int]]:
    """``order`` cut into batches of similar length: each run of ``mega`` batches is sorted by length
    before it is cut (little padding), then the batches are shuffled (no long-to-short drift)."""
    size = batch_size * mega
    batches = []
    for i in range(0, len(order), size):
        chunk = sorted(order[i:i + size], key=lambda j: -lengths[j])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[p] for p in perm]


class Collator:
    """Pads a list of encoded examples to the longest one (dynamic padding)."""

    def __init__(self, pad_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        self.pad_id, self.side, self.multiple = pad_id, padding_side, pad_to_multiple_of

    def _pad(self, seqs: list[torch.Tensor], value: int, length: int) -> torch.Tensor:
        out = torch.full((len(seqs), length), value, dtype=torch.int64)
        for i, s in enumerate(seqs):
            if self.side == "right":
                out[i, :len(s)] = s
            else:
                out[i, length - len(s):] = s
        return out

    def _length(self, seqs) -> int:
        n = max(len(s) for s in seqs)
        if self.multiple:
            n = -(-n // self.multiple) * self.multiple
        return n

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        ids = [it["input_ids"] for it in items]
        n = self._length(ids)
        batch = {"input_ids": self._pad(ids, self.pad_id, n),
                 "attention_mask": self._pad([torch.ones(len(s), dtype=torch.int64) for s in ids], 0, n)}
        if "token_type_ids" in items[0]:
            batch["token_type_ids"] = self._pad([it["token_type_ids"] for it in items], 0, n)
        if "position_ids" in items[0]:
            # packed rows (chat.pack): no attention mask, so transformers masks by the position ids; the
            # padding of a shorter row counts from 0 again, a segment of its own that no real token sees
            pos = [it["position_ids"] for it in items]
            batch["position_ids"] = self._pad(pos, 0, n)
            for i, p in enumerate(pos):
                batch["position_ids"][i, len(p):] = torch.arange(n - len(p))
            del batch["attention_mask"]
        if "labels" in items[0]:
            labels = [it["labels"] for it in items]
            if labels[0].dim() == 0:
                batch["labels"] = torch.stack(labels)
            elif all(len(l) == len(s) for l, s in zip(labels, ids)):  # causal LM: one label per input token
                batch["labels"] = self._pad(labels, IGNORE, n)
            else:  # seq2seq: decoder targets have their own length, always right-padded
                out = torch.full((len(labels), self._length(labels)), IGNORE, dtype=torch.int64)
                for i, l in enumerate(labels):
                    out[i, :len(l)] = l
                batch["labels"] = out
        return batch
