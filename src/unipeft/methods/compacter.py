"""Compacter and Compacter++ (Mahabadi et al. 2021a; seed 001 "Compacters" and the summary table).

An adapter (``adapter.py``: ADT(h) = f(h W_down) W_up, sequential, after the sublayer) whose two
projections are parameterised hypercomplex multiplication (PHM) layers:

    W = sum_{i=1..n} A_i (x) B_i        A_i: n x n, shared by every projection of the delta
                                        B_i = s_i t_i^T: (d_in/n) x (d_out/n), rank r (r = 1 by default)

    Compacter:    LayerNorm(X + F(X)) -> LayerNorm(X + ADT(F(X)))  after attention and after the FFN
    Compacter++:  the same after the FFN only

Parameters (L layers, hidden size d_h, bottleneck d_m, no bias terms): each PHM layer has
n r (d_in/n + d_out/n) = r (d_h + d_m), an adapter two of them, so

    Compacter    L x 2 x (2 r (d_h + d_m)) + n^3      (r = 1: the notes' L x 2 x (2(d_h + d_m)), plus the A_i)
    Compacter++  L x 1 x (2 r (d_h + d_m)) + n^3

The projections carry no bias so that the count is the table's exactly (a bottleneck adapter's
biases would add d_m + d_h per adapter). The A_i are one model-level module of the delta, saved
once; each PHM layer holds a reference to it, not a copy. The up-projection's t_i start at zero,
so W_up = 0 and the model starts exactly at the base, as the adapters do.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MethodConfig, check_choice, check_positive_int, method
from ..errors import UnipeftError, choices
from ..positions import linear_shape
from .adapter import ACTIVATIONS, AdapterDelta, sublayers


def _divisors(k: int) -> list[int]:
    return [i for i in range(1, k + 1) if k % i == 0]


@method
class Compacter(MethodConfig):
    """n: Kronecker products per projection (must divide the hidden size and the bottleneck);
    bottleneck: d_m; rank: r of each B_i; plus: Compacter++ (only after the FFN) instead of
    Compacter (after attention and after the FFN); activation: f (GELU, as in the notes)."""

    n: int = 4
    bottleneck: int = 64
    rank: int = 1
    plus: bool = False
    activation: str = "gelu"
    train_head: bool | list = True

    kind: ClassVar[str] = "compacter"
    method_type: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = False  # a nonlinearity sits between the projections, as for adapters

    def validate(self):
        check_positive_int("Compacter", "n", self.n)
        check_positive_int("Compacter", "bottleneck", self.bottleneck)
        check_positive_int("Compacter", "rank", self.rank)
        if not isinstance(self.plus, bool):
            raise UnipeftError(f"Compacter: plus must be True (Compacter++) or False, got {self.plus!r}")
        check_choice("Compacter", "activation", self.activation, tuple(ACTIVATIONS))
        if self.bottleneck % self.n:
            raise UnipeftError(f"Compacter: n={self.n} must divide bottleneck={self.bottleneck}; "
                               f"valid n: {choices(_divisors(self.bottleneck))}")

    def install(self, view, name):
        locations = ("ffn",) if self.plus else ("attention", "ffn")
        outs = [out for _, out in sublayers(view, "Compacter", locations, parallel=False)]
        sizes = sorted({linear_shape(view.module(out))[1] for out in outs})
        for d in sizes:
            if d % self.n:
                ok = [k for k in _divisors(self.bottleneck) if d % k == 0]
                raise UnipeftError(f"Compacter: n={self.n} must divide the hidden size {d} of "
                                   f"{view.map.model_type!r} and bottleneck={self.bottleneck}; valid n: {choices(ok)}")
        rule = PHMRule(self.n)
        view.set_module(rule)
        for out in outs:
            _, d = linear_shape(view.module(out))
            view.add_linear(out, CompacterDelta(rule, d, self.bottleneck, self.rank, self.activation))


class PHMRule(nn.Module):
    """The A_i (n x n each) of one delta, shared by all its PHM layers (the paper's "shared information")."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        # variance 1/n: the sum of n Kronecker terms then has the scale of one B_i
        self.phm_rule = nn.Parameter(torch.randn(n, n, n) / math.sqrt(n))


class PHMLinear(nn.Module):
    """x -> x W, W = sum_i A_i (x) s_i t_i^T (d_in x d_out); shaped like nn.Linear (``weight`` as (out, in))."""

    def __init__(self, rule: PHMRule, d_in: int, d_out: int, rank: int, zero: bool):
        super().__init__()
        n = rule.n
        self.__dict__["rule"] = rule  # a reference, not a child: A is saved once, at the model level
        self.in_features, self.out_features = d_in, d_out
        self.bias = None
        # each W entry sums n r products A s t: std 0.1 r^-1/4 on s and t gives W ~ 1e-2, the adapters' scale
        std = 0.1 / rank ** 0.25
        self.phm_s = nn.Parameter(torch.randn(n, d_in // n, rank) * std)
        self.phm_t = nn.Parameter(torch.zeros(n, d_out // n, rank) if zero else torch.randn(n, d_out // n, rank) * std)

    @property
    def weight(self) -> torch.Tensor:
        A = self.rule.phm_rule
        B = self.phm_s @ self.phm_t.transpose(1, 2)                  # B_i = s_i t_i^T: (n, d_in/n, d_out/n)
        W = torch.einsum("iab,ipq->apbq", A.to(B.dtype), B)         # sum_i A_i (x) B_i, blocks [a, b] = A_i[a, b] B_i
        return W.reshape(self.in_features, self.out_features).T

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class CompacterDelta(AdapterDelta):
    """A sequential adapter with PHM projections; routed like the adapters (stacked weights, one gather)."""

    def __init__(self, rule: PHMRule, d: int, m: int, rank: int, activation: str):
        super().__init__(PHMLinear(rule, d, m, rank, zero=False), PHMLinear(rule, m, d, rank, zero=True),
                         activation, scale=1.0, parallel=False)

    def table_params(self) -> tuple:
        return tuple(self.parameters()) + (self.down.rule.phm_rule,)  # the shared A_i build the weights too
