"""Prompt-based fine-tuning: the verbalizer is the classification head (seed 000: "fine-tuning with task
descriptions -> prompt-based fine-tuning"; LM-BFF, PET).

Instead of a new linear head on a pooled state, the language model's own output layer scores each
label's words after the filled template, and the loss is the cross-entropy over those label scores,

    s(y | x) = log sum_{w in V(y)} p(w | T(x)),   L = -log softmax_y s(y | x)[y*]

``VerbalizerModel`` wraps a causal or masked LM (any delta attached to it: LoRA, prompt tuning,
BitFit, ...) and looks like a sequence classifier to the trainer: ``forward(input_ids, attention_mask,
labels)`` returns ``loss`` and ``logits`` = the label scores. ``PromptHead`` holds the template and
the verbalizer, turns a task's examples into the template's prompts (texts truncated so that the
label's place always fits in ``max_length``), and is what ``unipeft train --head verbalizer`` and
``unipeft pet`` use; it is saved in ``run.json`` so ``unipeft eval/predict`` rebuild it.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import SequenceClassifierOutput

from ..errors import UnipeftError
from .scoring import causal_word_logprobs, lm_kind, masked_word_logprobs
from .templates import Template
from .verbalizers import Verbalizer


class VerbalizerModel(nn.Module):
    """A language model whose label scores are its verbalizer words' log-probabilities (see the module docstring)."""

    def __init__(self, lm: nn.Module, tokenizer, template: Template, verbalizer: Verbalizer):
        super().__init__()
        self.lm, self.verbalizer = lm, verbalizer
        self.kind = lm_kind(lm)
        self.word_ids = verbalizer.token_ids(tokenizer, template.gap)
        self.words = [w for ws in self.word_ids for w in ws]
        self.lengths = [len(w) for w in self.words]
        self.mask_id = tokenizer.mask_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # a causal prompt must end with its own last token, not with an end-of-text a tokenizer appends
        self.trailing = set(tokenizer.all_special_ids)
        self.config = lm.config

    def label_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, labels) label log-probabilities; inputs are the template's prompts, right-padded."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
        if self.kind == "causal":
            for r in rows:
                while len(r) > 1 and r[-1] in self.trailing:
                    r.pop()
            contexts = [r for r in rows for _ in self.words]
            scores = causal_word_logprobs(self.lm, contexts, self.words * len(rows), pad_id=self.pad_id)
        else:
            scores = masked_word_logprobs(self.lm, [r for r in rows for _ in self.words], self.words * len(rows),
                                          self.mask_id, self.pad_id)
        return self.verbalizer.reduce(scores.view(len(rows), len(self.words)), self.lengths)

    def forward(self, input_ids, attention_mask=None, labels=None, **_):
        logits = self.label_scores(input_ids, attention_mask)
        loss = F.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


@dataclasses.dataclass
class PromptHead:
    """The template and verbalizer of prompt-based fine-tuning (``--head verbalizer``)."""

    template: Template
    verbalizer: Verbalizer
    _masked: bool = dataclasses.field(default=False, repr=False)  # set by setup(): the LM reads [MASK]s

    @classmethod
    def build(cls, template, verbalizer, normalize: bool = False) -> "PromptHead":
        from .icl import as_template

        if verbalizer is None:
            raise UnipeftError("--head verbalizer needs --verbalizer (label=word|word,label=word)")
        if isinstance(verbalizer, str):
            verbalizer = Verbalizer.parse(verbalizer, normalize=normalize)
        elif isinstance(verbalizer, dict):
            verbalizer = Verbalizer(verbalizer, normalize=normalize)
        if template is None:
            raise UnipeftError("--head verbalizer needs --template, e.g. '{text} It was {label}.'")
        return cls(as_template(template), verbalizer)

    def to_dict(self) -> dict:
        return {"template": self.template.pattern, "verbalizer": self.verbalizer.words,
                "normalize": self.verbalizer.normalize}

    @classmethod
    def from_dict(cls, d: dict) -> "PromptHead":
        return cls(Template(d["template"]), Verbalizer(d["verbalizer"], normalize=d.get("normalize", False)))

    def check(self, task) -> None:
        """Fail before anything loads: a classification task, the verbalizer covering its labels, pairs matching."""
        if task.kind != "classification":
            raise UnipeftError(f"--head verbalizer needs a classification task; {task.name!r} is {task.kind}")
        self.verbalizer = self.verbalizer.order([str(x) for x in task.labels])
        if self.template.pair != task.pair:
            want = "has" if task.pair else "has no"
            raise UnipeftError(f"task {task.name!r} {want} sentence pairs: the template must {'' if task.pair else 'not '}"
                               f"use {{text_pair}} (template {self.template.pattern!r})")

    def prompts(self, examples: list[dict], tokenizer, max_length: int) -> list[dict]:
        """Examples whose text is the filled template (one text: the pair goes into the template); each text is
        cut so that the whole prompt, with its longest word, fits in ``max_length`` tokens."""
        masked = tokenizer.mask_token if self._masked else None
        longest = max(len(w) for ws in self.verbalizer.token_ids(tokenizer, self.template.gap) for w in ws)
        frame = len(tokenizer(self._fill("", "" if self.template.pair else None, masked))["input_ids"])
        budget = max_length - frame - longest
        if budget < 4:
            raise UnipeftError(f"the template alone takes {frame} of max_length {max_length} tokens; raise max_length")
        per_text = budget // 2 if self.template.pair else budget
        out = []
        for e in examples:
            text = _cut(tokenizer, e["text"], per_text)
            pair = _cut(tokenizer, e.get("text_pair") or "", per_text) if self.template.pair else None
            if self.template.pair and not e.get("text_pair"):
                raise UnipeftError(f"template {self.template.pattern!r} has {{text_pair}}: give every input's "
                                   "second text")
            out.append({"text": self._fill(text, pair, masked), "target": e["target"]})
        return out

    def _fill(self, text, pair, mask):
        return self.template.cloze(text, pair, mask) if mask else self.template.prompt(text, pair)

    def load(self, model: str, lm=None):
        """(language model, tokenizer) for a model name (``lm``: an already loaded pair)."""
        from .icl import load_lm

        base, tokenizer = lm if lm is not None else load_lm(model)
        self._masked = lm_kind(base) == "masked"
        if self._masked and tokenizer.mask_token_id is None:
            raise UnipeftError(f"{model} is a masked LM but its tokenizer has no mask token to put the label at")
        return base, tokenizer

    def prompt_dataset(self, dataset, tokenizer, max_length: int):
        """The dataset with every split's examples as the template's prompts (and the task's pair flag off)."""
        from ..training.data import Dataset

        self.check(dataset.task)
        task = dataclasses.replace(dataset.task, pair=False)
        splits = {k: self.prompts(v, tokenizer, max_length) for k, v in dataset.splits.items()}
        return Dataset(task, splits, dataset.source)

    def setup(self, model: str, dataset, max_length: int, lm=None):
        """(language model, tokenizer, dataset of prompts); the task is checked before the model loads."""
        self.check(dataset.task)
        base, tokenizer = self.load(model, lm)
        return base, tokenizer, self.prompt_dataset(dataset, tokenizer, max_length)

    def wrap(self, lm, tokenizer) -> VerbalizerModel:
        model = VerbalizerModel(lm, tokenizer, self.template, self.verbalizer)
        model.prompt_head = self  # evaluate/predict turn raw examples into prompts with it
        return model


def _cut(tokenizer, text: str, n: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tokenizer.decode(ids[:n])
