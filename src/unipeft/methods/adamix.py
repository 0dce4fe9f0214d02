"""AdaMix, a mixture of adaptations (Wang et al. 2022; seed 004 "Mixture of Adapters").

    per adapter, M copies of each projection:  A = {W_down^j}, B = {W_up^k},  j, k in 0..M-1
    training, each pass:   h <- h + f(h W_down^j) W_up^k        j, k drawn at random, per projection
    every batch runs twice (two draws), and the loss adds the consistency term
                           L <- L + 1/2 (KL(z^A || z^B) + KL(z^B || z^A))
    inference:             W_down = 1/M sum_j W_down^j,  W_up = 1/M sum_k W_up^k

so the trained delta is one adapter (``adapter.py``'s ``AdapterDelta`` with mixed projections):
in eval mode the copies are averaged (the model in memory and the saved delta give the same
outputs), and the saved delta *is* a plain adapter (``Adapter`` with the same placement), which
costs at inference what one adapter costs.

The second pass and its term come from the loss position (``positions.LossSite``): in training
mode, when the model computes its own loss (labels given), the model runs again on the same
inputs (new draws) and the symmetric KL between the two passes' logits is added to the first
pass's loss, so no change to the training loop is needed. (The KL averages over every position
of the logits, padding included.)
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MethodConfig, check_choice, check_number, check_positive_int, method
from ..errors import UnipeftError
from ..positions import linear_shape
from .adapter import ACTIVATIONS, AdapterDelta, sublayers


@method
class AdaMix(MethodConfig):
    """experts: M copies of each projection; bottleneck, activation, locations ("attention" and/or
    "ffn"; default both, Houlsby's placement): the adapter's; consistency: the weight of the KL term
    (1: the paper's)."""

    experts: int = 4
    bottleneck: int = 64
    activation: str = "relu"
    locations: tuple | None = None
    consistency: float = 1.0
    train_head: bool | list = True

    kind: ClassVar[str] = "adamix"
    method_type: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = False

    def validate(self):
        check_positive_int("AdaMix", "experts", self.experts)
        check_positive_int("AdaMix", "bottleneck", self.bottleneck)
        check_choice("AdaMix", "activation", self.activation, tuple(ACTIVATIONS))
        check_number("AdaMix", "consistency", self.consistency, lo=0)
        if self.locations is not None:
            locs = (self.locations,) if isinstance(self.locations, str) else tuple(self.locations)
            if not locs:
                raise UnipeftError("AdaMix: locations is empty; give 'attention' and/or 'ffn'")
            for loc in locs:
                check_choice("AdaMix", "locations", loc, ("attention", "ffn"))
            self.locations = locs

    def saved_config(self):
        """What is stored: the averaged adapter, a plain sequential adapter at the same places."""
        from .adapter import Adapter

        return Adapter(style="houlsby", bottleneck=self.bottleneck, activation=self.activation,
                       locations=self.locations or ("attention", "ffn"), train_head=self.train_head)

    def install(self, view, name):
        for _, out in sublayers(view, "AdaMix", self.locations or ("attention", "ffn"), parallel=False):
            _, d = linear_shape(view.module(out))
            down, up = MixedLinear(self.experts, d, self.bottleneck), MixedLinear(self.experts, self.bottleneck, d)
            for j in range(self.experts):  # each copy as adapter.py initialises one; up copies zero: the base at start
                nn.init.trunc_normal_(down.weights[j], std=1e-2, a=-2e-2, b=2e-2)
            mixed = MixDelta(down, up, self.activation, 1.0, False)
            mixed.train(view.module(out).training)
            view.add_linear(out, mixed)
        if self.consistency:
            view.add_loss_term(Consistency(self.consistency))


class MixedLinear(nn.Module):
    """M copies of a linear map, shaped like nn.Linear (``weight``, ``bias``, ``out_features``): in
    training each call uses one copy drawn at random, in eval mode their average."""

    def __init__(self, experts: int, d_in: int, d_out: int):
        super().__init__()
        self.out_features = d_out
        self.weights = nn.Parameter(torch.zeros(experts, d_out, d_in))
        self.biases = nn.Parameter(torch.zeros(experts, d_out))

    def averaged(self):
        """(weight, bias), the copies' average; kept between inference calls until a copy changes, so
        inference costs what one adapter's projection costs."""
        if (torch.is_grad_enabled() and self.weights.requires_grad) or torch.compiler.is_compiling():
            return self.weight, self.bias  # (a compiled graph cannot keep the cache: data_ptr breaks it)
        key = (self.weights._version, self.biases._version, self.weights.data_ptr(), self.weights.dtype)
        kept = self.__dict__.get("_kept")
        if kept is None or kept[0] != key:
            with torch.no_grad():
                kept = (key, self.weight, self.bias)
            self.__dict__["_kept"] = kept
        return kept[1], kept[2]

    @property
    def weight(self):
        return self.weights.mean(0)

    @property
    def bias(self):
        return self.biases.mean(0)

    def forward(self, x):
        if not self.training:
            return F.linear(x, *self.averaged())
        # the draw stays a tensor: a Python int would stop torch.compile's graph here and specialise
        # (recompile) on every value drawn
        j = torch.randint(self.weights.shape[0], (1,)).to(self.weights.device)
        return F.linear(x, self.weights.index_select(0, j)[0], self.biases.index_select(0, j)[0])


class MixDelta(AdapterDelta):
    """A sequential adapter whose projections are mixtures; stored as the averaged adapter."""

    def export_state(self):
        with torch.no_grad():
            return {"down.weight": self.down.weight, "down.bias": self.down.bias,
                    "up.weight": self.up.weight, "up.bias": self.up.bias}


class Consistency:
    """The loss term: run the model again (new draws), add w/2 (KL(z_A || z_B) + KL(z_B || z_A))."""

    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, model, args, kwargs, output):
        first = getattr(output, "logits", None)
        if first is None:
            return None
        second = model(*args, **kwargs).logits
        a, b = F.log_softmax(first.float(), dim=-1), F.log_softmax(second.float(), dim=-1)
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        kl_ab = F.kl_div(b, a, log_target=True, reduction="batchmean")  # KL(z_A || z_B)
        kl_ba = F.kl_div(a, b, log_target=True, reduction="batchmean")
        return (self.weight * 0.5 * (kl_ab + kl_ba)).to(output.loss.dtype)
