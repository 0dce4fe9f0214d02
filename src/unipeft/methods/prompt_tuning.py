"""Prompt tuning (Lester et al. 2021; seed 000 "Additive PEFT: Prompt Tuning", seed 001).

    soft_prompt = Parameter(num_tokens x embedding_dim)
    x = concatenate([soft_prompt, E(x)], dim=seq_len)

p trainable embeddings are prepended to the input embeddings (of the encoder,
for encoder-decoder models); the attention mask grows by p. Initialisation
(Lester et al., "Parameter Initialization in Soft Prompt Tuning"): uniform
random, embeddings of tokens sampled from the vocabulary, the embeddings of a
text, or of the class-label words (then sampled vocabulary for the rest).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from ..config import MethodConfig, check_choice, check_positive_int, method
from ..errors import UnipeftError

INITS = ("random", "vocab", "text", "labels")


@method
class PromptTuning(MethodConfig):
    """length: p; init: "random" | "vocab" | "text" | "labels"; init_text: the
    text for init="text"; label_words: the class words for init="labels"
    (both need ``tokenizer=`` in ``up.attach``); vocab_sample: sample from the
    first N token ids (Lester et al. use the 5,000 most common)."""

    length: int = 20
    init: str = "vocab"
    init_text: str | None = None
    label_words: tuple | None = None
    vocab_sample: int = 5000
    train_head: bool | list = True

    kind: ClassVar[str] = "prompt_tuning"
    method_type: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = False

    def validate(self):
        check_positive_int("PromptTuning", "length", self.length)
        check_choice("PromptTuning", "init", self.init, INITS)
        check_positive_int("PromptTuning", "vocab_sample", self.vocab_sample)
        if self.init == "text" and not self.init_text:
            raise UnipeftError("PromptTuning: init='text' needs init_text='...'")
        if self.init == "labels" and not self.label_words:
            raise UnipeftError("PromptTuning: init='labels' needs label_words=[...]")
        if isinstance(self.label_words, str):
            self.label_words = (self.label_words,)
        if self.label_words is not None:
            self.label_words = tuple(self.label_words)

    def install(self, view, name):
        stacks = view.stacks_for_input()
        path, stack, embed, _, _ = stacks[0]
        weight = embed.weight if hasattr(embed, "weight") else None
        if weight is None:
            raise UnipeftError("PromptTuning: the model's input embeddings have no weight matrix")
        prompt = SoftPrompt(self.length, weight.shape[1])
        with torch.no_grad():
            prompt.weight.copy_(self._initial(view, embed, weight))
        view.set_module(prompt)
        view.add_input(path, prompt)

    def _initial(self, view, embed, weight) -> torch.Tensor:
        p = self.length
        if self.init == "random":
            return torch.empty(p, weight.shape[1]).uniform_(-0.5, 0.5)
        vocab = torch.randint(0, min(self.vocab_sample, weight.shape[0]), (p,))
        if self.init == "vocab":
            ids = vocab
        else:
            tok = view.tokenizer
            if tok is None:
                raise UnipeftError(f"PromptTuning: init={self.init!r} needs a tokenizer: up.attach(..., tokenizer=tok)")
            if self.init == "text":
                ids = torch.tensor(tok(self.init_text, add_special_tokens=False)["input_ids"])
                ids = ids.repeat(p // max(len(ids), 1) + 1)[:p]
            else:
                words = [tok(" " + w if view.config and not view.config.is_encoder_decoder else w,
                             add_special_tokens=False)["input_ids"] for w in self.label_words]
                ids = torch.tensor([t for w in words for t in w][:p], dtype=torch.long)
                ids = torch.cat([ids, vocab[len(ids):]])
            if len(ids) == 0:
                raise UnipeftError(f"PromptTuning: init={self.init!r} produced no tokens")
        with torch.no_grad():
            return embed(ids.to(weight.device)).float()


class SoftPrompt(nn.Module):
    """The p x d prompt; called with a batch size it returns (batch, p, d)."""

    def __init__(self, length: int, dim: int):
        super().__init__()
        self.length = length
        self.weight = nn.Parameter(torch.zeros(length, dim))

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch, -1, -1)
