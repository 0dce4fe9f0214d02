"""BitFit (Ben Zaken et al. 2021; seed 000 "Selective PEFT: BitFit").

Fine-tune only bias terms (and the task head). The notes' pseudocode:

    params = (p for n, p in model.named_parameters() if "bias" in n)
    optimizer = Optimizer(params)

The chosen biases are the base model's own parameters, trained in place; the
delta stores their trained values, and detach puts the originals back.

Models without bias terms (Llama, T5, most current LLMs): the notes define BitFit as
f(X) -> f(X) + B for every function f, so a chosen linear map with no bias gets a new
one, zero at first (the model starts exactly at the base), trained and saved as the
delta. Merging it gives the map a bias parameter it did not have (``up.merge`` says so);
unmerging removes it again.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from ..config import MethodConfig, method, normalize_targets
from ..errors import UnipeftError
from ..positions import LinearDelta, linear_shape


@method
class BitFit(MethodConfig):
    """targets: None for every bias term of the base model, or targets (groups,
    roles, suffixes, regexes) whose linear maps' biases are trained."""

    targets: tuple | None = None
    train_head: bool | list = True

    kind: ClassVar[str] = "bitfit"
    method_type: ClassVar[str] = "selective"
    mergeable: ClassVar[bool] = True  # the trained biases are the weights: nothing left to fold

    def validate(self):
        self.targets = normalize_targets("BitFit", self.targets)

    def install(self, view, name):
        """Every existing bias (or those of the targets' maps) in place; where no target map has
        a bias (a bias-free model), a new zero bias on every linear map of the blocks."""
        base = view.base_parameters()
        if self.targets is None:
            chosen = [n for n in base if n.rsplit(".", 1)[-1] == "bias"]
            added = [] if chosen else view.resolve_targets(normalize_targets("BitFit", "all-linear"), "BitFit")
        else:
            mods = view.resolve_targets(self.targets, "BitFit")
            chosen = [f"{m}.bias" for m in mods if f"{m}.bias" in base]
            added = [m for m in mods if f"{m}.bias" not in base]
        if not chosen and not added:
            raise UnipeftError(f"BitFit: {view.map.model_type!r} has no bias terms and no linear maps to add them to"
                               + ("" if self.targets is None else f" in targets {list(self.targets)}"))
        if chosen:
            view.select(chosen)
        for path in added:
            view.add_linear(path, BiasDelta(linear_shape(view.module(path))[1]))


class BiasDelta(LinearDelta):
    """f(x) + b for a linear map with no bias of its own; b starts at zero."""

    rewrites_output = True

    def __init__(self, size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(size))

    def output(self, x, y):
        return y + self.bias.to(y.dtype)

    def merged(self, weight, bias):
        return weight, self.bias.detach().to(weight.dtype) + (0 if bias is None else bias)

    @classmethod
    def routed_output(cls, site, items, x, y):
        """Per-row biases (zeros for rows on no delta here), one gather for all deltas."""
        from ..positions.linear import per_row

        grad = torch.is_grad_enabled() and any(d.bias.requires_grad for _, d, _ in items)
        table, index = site.routed_table("bias", [(n, d) for n, d, _ in items],
                                         lambda ds: torch.stack([torch.zeros_like(ds[0].bias)] + [d.bias for d in ds]),
                                         grad, params=lambda d: (d.bias,))
        slot = site.routed_slots(index, y.shape[0], y.device)
        return y + per_row(table.to(y.dtype), slot, y)
