"""AdapterFusion (Pfeiffer et al. 2021; seed 001: "training task-specific adapters and then combining
them to leverage the cross-task knowledge").

Stage one trains one adapter per task (``up.Adapter``, sequential: Pfeiffer or Houlsby). Stage two,
this method, learns at every layer where the adapters sit an attention over their outputs,
with the adapters frozen:

    a_n = h + ADT_n(h)                      adapter n's output, h the sublayer's output
    q = h W_Q,  k_n = a_n W_K,  v_n = a_n W_V
    h <- sum_n softmax_n(q . k_n) v_n        (query from the sublayer output, keys/values from the adapters)

W_V starts at the identity (plus small noise) and W_Q, W_K small, so at the start the fusion
returns nearly the mean of the adapters' outputs. The fusion is a delta of its own, small (three
d x d maps per fused sublayer), at the same linear sites as the adapters: it reads each adapter
through the site (the adapters stay their own deltas, switched off, frozen), and its config
names them, so ``up.load`` of a fusion needs those adapters attached under the same names.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from ..config import MethodConfig, check_choice, method
from ..errors import UnipeftError, choices
from ..positions import LinearDelta, linear_shape


@method
class AdapterFusion(MethodConfig):
    """adapters: the names of two or more attached (sequential) adapter deltas to fuse; they must sit
    at the same sublayers."""

    adapters: tuple = ()
    train_head: bool | list = True

    kind: ClassVar[str] = "adapter_fusion"
    method_type: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = False

    def validate(self):
        names = (self.adapters,) if isinstance(self.adapters, str) else tuple(self.adapters or ())
        if len(names) < 2 or not all(isinstance(n, str) and n for n in names):
            raise UnipeftError(f"AdapterFusion: adapters must name two or more adapter deltas, got {self.adapters!r}")
        if len(set(names)) != len(names):
            raise UnipeftError(f"AdapterFusion: adapters repeat in {list(names)!r}")
        self.adapters = names

    def install(self, view, name):
        from .adapter import AdapterDelta

        reg = view.reg
        attached = list(reg.deltas)
        for n in self.adapters:
            if n not in reg.deltas:
                raise UnipeftError(f"AdapterFusion: no delta named {n!r} is attached; attach or load the adapters "
                                   f"first (attached: {choices(attached) if attached else 'none'})")
            kind = reg.deltas[n].config.kind
            check_choice("AdapterFusion", f"the method of delta {n!r}", kind, ("adapter",))
            style = reg.deltas[n].config.style
            if style not in ("houlsby", "pfeiffer"):
                raise UnipeftError(f"AdapterFusion: delta {n!r} is a {style} adapter; fusion reads sequential "
                                   f"adapters ('houlsby' or 'pfeiffer')")
        per_path = [{p for p, d in reg.deltas[n].linear.items() if isinstance(d, AdapterDelta)} for n in self.adapters]
        paths = [p for p in reg.deltas[self.adapters[0]].linear if all(p in s for s in per_path)
                 and view.map.block_of(p) is not None]  # (with layers=: the chosen blocks only)
        if not paths:
            raise UnipeftError(f"AdapterFusion: the adapters {choices(list(self.adapters))} share no sublayer")
        for path in paths:
            fusion = FusionDelta(list(self.adapters), linear_shape(view.module(path))[1])
            fusion.__dict__["site"] = view.module(path)  # already a linear site: the adapters are there
            view.add_linear(path, fusion)


class FusionDelta(LinearDelta):
    """Attention over the outputs of the named adapters at this site (read from the site itself)."""

    rewrites_output = True

    def __init__(self, adapters: list[str], d: int):
        super().__init__()
        self.adapters = list(adapters)
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d, bias=False)
        for m in (self.query, self.key):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        with torch.no_grad():  # identity plus small noise: the mean of the adapters' outputs at the start
            self.value.weight.copy_(torch.eye(d) + torch.randn(d, d) * 1e-6)
        self.__dict__["site"] = None  # the linear site holding the adapters (a reference, not a child)

    def _adapters(self):
        site = self.__dict__["site"]
        if site is None:
            raise RuntimeError("AdapterFusion: the fusion was not placed at a linear site")
        missing = [n for n in self.adapters if n not in site.unipeft_deltas]
        if missing:
            raise UnipeftError(f"AdapterFusion: adapter delta {missing[0]!r} was detached; the fusion reads it")
        return [site.unipeft_deltas[n] for n in self.adapters]

    def output(self, x, y):
        outs = torch.stack([a.output(x, y) for a in self._adapters()], dim=-2)   # (..., N, d): a_n
        q = self.query(y).unsqueeze(-2)                                           # (..., 1, d)
        scores = (q * self.key(outs)).sum(-1)                                      # (..., N)
        probs = torch.softmax(scores, dim=-1).unsqueeze(-1)
        return (probs * self.value(outs)).sum(-2)
