"""P-tuning (seed 000 "Prefix Tuning": "P-Tuning is same as Prefix Tuning, but tested for NLU").

v1 (Liu et al. 2021, "GPT Understands, Too"): virtual tokens whose embeddings come out of a
prompt encoder run over p trainable input embeddings, placed at the input position of prompt
tuning (``positions.InputSite``: concat(P, E(x)), the mask grown by p):

    h_{1..p} = MLP([LSTM->(e_{1..i}) ; LSTM<-(e_{i..p})])     encoder="lstm" (bidirectional, then a 2-layer MLP)
    h_{1..p} = MLP(e_{1..p})                                  encoder="mlp"  (3 layers, ReLU)
    x = concat([h, E(x)], dim=seq)

The encoder couples the virtual tokens during training; afterwards it is dropped, as prefix
tuning's MLP is: the saved delta holds the p encoded embeddings alone (``encoder="none"``, which
is prompt tuning's table), so a loaded delta costs what a prompt costs.

v2 (Liu et al. 2022, "P-Tuning v2"): trainable prompts at every layer with no
reparameterisation, i.e. prefix tuning's keys and values (``prefix_tuning.py``) trained
directly: ``PrefixTuning(length, reparam_hidden=0)``, for classification (with the model's
head) and generation alike.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from ..config import MethodConfig, check_choice, check_positive_int, method
from ..errors import UnipeftError

ENCODERS = ("lstm", "mlp", "none")


@method
class PTuning(MethodConfig):
    """version: 1 (prompt encoder at the input) or 2 (prompts at every layer, prefix tuning without
    reparameterisation); length: p; encoder (v1): "lstm" (the default), "mlp", or "none" (the
    encoded table itself: how a saved v1 delta loads); hidden (v1): the encoder's width (default:
    the embedding size, as Liu et al.)."""

    version: int = 1
    length: int = 20
    encoder: str | None = None
    hidden: int | None = None
    train_head: bool | list = True

    kind: ClassVar[str] = "p_tuning"
    method_type: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = False

    def validate(self):
        check_choice("PTuning", "version", self.version, (1, 2))
        check_positive_int("PTuning", "length", self.length)
        if self.version == 2:
            if self.encoder not in (None, "none") or self.hidden is not None:
                raise UnipeftError("PTuning: version=2 trains the prompts of every layer directly (no prompt "
                                   "encoder); encoder= and hidden= apply to version=1 only")
            return
        if self.encoder is None:
            self.encoder = "lstm"
        check_choice("PTuning", "encoder", self.encoder, ENCODERS)
        if self.hidden is not None:
            check_positive_int("PTuning", "hidden", self.hidden)

    def saved_config(self) -> "PTuning":
        """v1 is stored as its encoded embeddings: no encoder."""
        return self.replace(encoder="none", hidden=None) if self.version == 1 else self

    def install(self, view, name):
        if self.version == 2:
            from .prefix_tuning import PrefixTuning

            PrefixTuning(length=self.length, reparam_hidden=0, train_head=self.train_head).install(view, name)
            return
        path, _, embed, _, _ = view.stacks_for_input()[0]
        weight = getattr(embed, "weight", None)
        if weight is None:
            raise UnipeftError("PTuning: the model's input embeddings have no weight matrix")
        d = weight.shape[1]
        prompt = PromptEncoder(self.length, d, self.encoder, self.hidden or d)
        with torch.no_grad():  # e_i start as embeddings of tokens sampled from the vocabulary (prompt tuning's "vocab")
            ids = torch.randint(0, min(5000, weight.shape[0]), (self.length,), device=weight.device)
            prompt.embedding.copy_(embed(ids).float())
        view.set_module(prompt)
        view.add_input(path, prompt)


class PromptEncoder(nn.Module):
    """p trainable embeddings and the encoder over them; called with a batch size it returns
    (batch, p, d), the virtual tokens' embeddings (the input site's prompt source)."""

    def __init__(self, length: int, dim: int, encoder: str, hidden: int):
        super().__init__()
        self.length, self.kind = length, encoder
        self.embedding = nn.Parameter(torch.zeros(length, dim))
        if encoder == "lstm":
            self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        elif encoder == "mlp":
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, dim))

    def encoded(self) -> torch.Tensor:
        """(p, d): the virtual tokens' embeddings."""
        if self.kind == "none":
            return self.embedding
        h = self.embedding
        if self.kind == "lstm":
            h = self.lstm(h.unsqueeze(0))[0].squeeze(0)
        return self.mlp(h)

    def forward(self, batch: int) -> torch.Tensor:
        return self.encoded().unsqueeze(0).expand(batch, -1, -1)

    def export_state(self) -> dict[str, torch.Tensor]:
        """The encoded table, stored as ``embedding`` of an encoder-less PromptEncoder."""
        with torch.no_grad():
            return {"embedding": self.encoded().contiguous()}
