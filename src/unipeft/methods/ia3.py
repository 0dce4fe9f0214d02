"""(IA)3 (Liu et al. 2022; seed 001, "Infused Adapter by Inhibiting and Amplifying Inner Activations").

Learned vectors rescale the keys, the values and the FFN's intermediate
activations:  k <- l_k ⊙ k,  v <- l_v ⊙ v,  h_ff <- l_ff ⊙ γ(W_1 x).
The vectors start at ones, so the model is unchanged at initialisation, and
because each is a diagonal scaling of a linear map's output (or input) it
merges into that map's weights.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from ..config import MethodConfig, method, normalize_targets
from ..positions import LinearDelta, linear_shape


@method
class IA3(MethodConfig):
    """targets: maps whose output (or, for FFN output maps, input) is rescaled;
    default keys, values and the FFN output projection's input (the
    intermediate activation). feedforward: targets scaled at their input
    instead of their output (default: those playing the ffn_out role; an
    empty list: none)."""

    targets: tuple | None = None
    feedforward: tuple | None = None
    train_head: bool | list = True

    kind: ClassVar[str] = "ia3"
    method_type: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = True
    default_targets: ClassVar[tuple] = ("k", "v", "ffn_out")

    def validate(self):
        self.targets = normalize_targets("IA3", self.targets)
        if isinstance(self.feedforward, (list, tuple)) and len(self.feedforward) == 0:
            self.feedforward = ()  # explicitly none (every target scaled at its output)
        else:
            self.feedforward = normalize_targets("IA3", self.feedforward)

    def install(self, view, name):
        targets = self.targets or self.default_targets
        paths = view.resolve_targets(targets, "IA3")
        if self.feedforward is not None:
            ff = set(view.resolve_targets(self.feedforward, "IA3 feedforward")) if self.feedforward else set()
        else:
            ff = {p for p in paths if "ffn_out" in view.map.roles.get(p, ())}
        # a fused projection (GPT-2 c_attn = [q k v]) hit through roles: scale only those roles' slices
        role_targets = {t for t in targets if t in ("q", "k", "v", "query", "key", "value")}
        for path in paths:
            fan_in, fan_out = linear_shape(view.module(path))
            index = None
            fused = view.map.fused.get(path)
            if fused and path not in ff:
                wanted = {({"query": "q", "key": "k", "value": "v"}).get(t, t) for t in role_targets}
                chosen = [i for i, r in enumerate(fused) if r in wanted]
                if chosen and len(chosen) < len(fused):
                    width = fan_out // len(fused)
                    index = torch.cat([torch.arange(i * width, (i + 1) * width) for i in chosen])
            if path in ff:
                view.add_linear(path, IA3Delta(fan_in, "input"))
            else:
                view.add_linear(path, IA3Delta(fan_out, "output", index))


class IA3Delta(LinearDelta):
    def __init__(self, size: int, mode: str, index: torch.Tensor | None = None):
        super().__init__()
        self.mode, self.size = mode, size
        self.rewrites_input = mode == "input"
        self.rewrites_output = mode == "output"
        n = size if index is None else len(index)
        self.ia3_l = nn.Parameter(torch.ones(n))
        if index is not None:
            self.register_buffer("index", index, persistent=False)
        else:
            self.index = None

    def scale(self) -> torch.Tensor:
        if self.index is None:
            return self.ia3_l
        return torch.ones(self.size, dtype=self.ia3_l.dtype, device=self.ia3_l.device).index_put(
            (self.index,), self.ia3_l)

    def input(self, x):
        return x * self.scale()

    def output(self, x, y):
        return y * self.scale()

    @classmethod
    def _routed_scale(cls, site, items, like):
        """Per-row scale vectors (ones for rows on no delta here): one gather for all deltas."""
        from ..positions.linear import per_row

        grad = torch.is_grad_enabled() and any(d.ia3_l.requires_grad for _, d, _ in items)
        table, index = site.routed_table(
            f"ia3-{items[0][1].mode}", [(n, d) for n, d, _ in items],
            lambda ds: torch.stack([torch.ones_like(ds[0].scale())] + [d.scale() for d in ds]), grad,
            params=lambda d: (d.ia3_l,))
        slot = site.routed_slots(index, like.shape[0], like.device)
        return per_row(table.to(like.dtype), slot, like)

    @classmethod
    def routed_input(cls, site, items, x):
        return x * cls._routed_scale(site, items, x)

    @classmethod
    def routed_output(cls, site, items, x, y):
        return y * cls._routed_scale(site, items, y)

    def merged(self, weight, bias):
        s = self.scale().to(weight.dtype)
        if self.mode == "input":  # W (x ⊙ l) = (W diag(l)) x
            return weight * s[None, :], bias
        return weight * s[:, None], None if bias is None else bias * s
