"""AdapterBias (Fu et al. 2022; seed 001 summary table): a token-dependent shift of a sublayer's output.

    LayerNorm(X + F(X)) -> LayerNorm(X + F(X) + ADT(X))
    ADT(X) = X W_{d_h x 1} W_{1 x d_h} = v ⊗ alpha(X),   alpha(X) = X W  (one weight per token)

The shift vector v is the same for every token; how much of it each token gets, alpha(x), is
a linear function of the token's input to the sublayer (the notes' ADT(X) reads X, beside F,
like a parallel adapter: the input is tapped at the sublayer's first map). One such shift sits
at each sublayer: the attention output and the FFN output, the positions adapters use.

Parameters: W (d_h) and v (d_h) per sublayer, L x 2 x (2 d_h) in all. (The notes' table writes
L x 2 x d_h: it counts v alone; the formula ADT(X) = X W_{d_h x 1} W_{1 x d_h} has both.)
v starts at zero, so the model starts exactly at the base.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from ..config import MethodConfig, check_choice, method
from ..errors import UnipeftError
from ..positions import LinearDelta, linear_shape
from ..positions.linear import per_row
from .adapter import InputTap, sublayers


@method
class AdapterBias(MethodConfig):
    """locations: the sublayers whose output is shifted, "attention" and/or "ffn" (default both)."""

    locations: tuple | None = None
    train_head: bool | list = True

    kind: ClassVar[str] = "adapter_bias"
    method_type: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = False  # the shift depends on the sublayer's input, not on the map's own input

    def validate(self):
        if self.locations is not None:
            locs = (self.locations,) if isinstance(self.locations, str) else tuple(self.locations)
            for loc in locs:
                check_choice("AdapterBias", "locations", loc, ("attention", "ffn"))
            if not locs:
                raise UnipeftError("AdapterBias: locations is empty; give 'attention' and/or 'ffn'")
            self.locations = locs

    def install(self, view, name):
        for src, out in sublayers(view, "AdapterBias", self.locations or ("attention", "ffn"), parallel=True):
            shift = ShiftDelta(linear_shape(view.module(src))[0], linear_shape(view.module(out))[1])
            view.add_linear(out, shift)
            view.add_linear(src, InputTap(shift))


class ShiftDelta(LinearDelta):
    """y <- y + alpha(x) v with alpha(x) = x W, x the sublayer's input (tapped)."""

    rewrites_output = True

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        # W as the adapters' down-projection (std 1e-2): alpha is a small, nonzero weight per token,
        # so v (zero: the base at init) gets a gradient from the first step
        self.bias_alpha = nn.Parameter(nn.init.trunc_normal_(torch.empty(d_in), std=1e-2, a=-2e-2, b=2e-2))
        self.bias_v = nn.Parameter(torch.zeros(d_out))
        self.tapped: torch.Tensor | None = None

    def _source(self):
        src, self.tapped = self.tapped, None  # do not keep the activation alive past its use
        if src is None:
            raise RuntimeError("AdapterBias: the sublayer input was not seen before its output")
        return src

    def output(self, x, y):
        src = self._source()
        alpha = src.to(y.dtype) @ self.bias_alpha.to(y.dtype)          # x W: one number per token
        return y + alpha.unsqueeze(-1) * self.bias_v.to(y.dtype)      # v ⊗ alpha(x)

    @classmethod
    def routed_output(cls, site, items, x, y):
        """Per-row W and v (zeros for rows on no shift here), gathered once for all the deltas."""
        srcs = [d._source() for _, d, _ in items]
        if any(s is not srcs[0] for s in srcs):  # tapped at different maps: each on its own rows
            for (_, d, rows), src in zip(items, srcs):
                d.tapped = src.index_select(0, rows)
                y = y.index_copy(0, rows, d.output(None, y.index_select(0, rows)))
            return y
        grad = torch.is_grad_enabled() and any(p.requires_grad for _, d, _ in items for p in d.parameters())
        (w, v), index = site.routed_table("adapter_bias", [(n, d) for n, d, _ in items], _stack_shifts, grad)
        slot = site.routed_slots(index, y.shape[0], y.device)
        src = srcs[0].to(y.dtype)
        alpha = (src * per_row(w.to(y.dtype), slot, src)).sum(-1, keepdim=True)
        return y + alpha * per_row(v.to(y.dtype), slot, y)


def _stack_shifts(deltas):
    """W (D+1, d_in) and v (D+1, d_out); row 0 zeros (rows on no shift)."""
    w = torch.stack([torch.zeros_like(deltas[0].bias_alpha)] + [d.bias_alpha for d in deltas])
    v = torch.stack([torch.zeros_like(deltas[0].bias_v)] + [d.bias_v for d in deltas])
    return w, v
