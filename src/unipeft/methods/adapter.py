"""Bottleneck adapters (seed 000 "Additive PEFT: Adapters"; seed 001 summary table; He et al. 2022).

    ADT(h) = f(h W_down) W_up                        (bottleneck m << d)
    sequential (Houlsby, Pfeiffer):  h <- h + ADT(h)          after the sublayer, before residual + LN
    parallel  (He et al.):           h <- F(x) + ADT(x)       x = the sublayer's input
    scaled parallel:                 h <- F(x) + s * ADT(x)

Houlsby puts one after the attention output and one after the FFN; Pfeiffer
only after the FFN; the parallel forms default to the FFN (He et al.'s best
placement) and accept ``locations=("attention", "ffn")``.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MethodConfig, check_choice, check_number, check_positive_int, method
from ..errors import UnipeftError, choices
from ..positions import LinearDelta, class_rows, linear_shape
from .adapter_drop import DropPlan, dropped

STYLES = ("houlsby", "pfeiffer", "parallel", "scaled_parallel")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}
DEFAULT_LOCATIONS = {"houlsby": ("attention", "ffn"), "pfeiffer": ("ffn",), "parallel": ("ffn",),
                     "scaled_parallel": ("ffn",)}


@method
class Adapter(MethodConfig):
    """style: where and how the adapter composes; bottleneck: m; activation: f;
    scale: s (scaled_parallel only; default 4, He et al.); locations:
    "attention" and/or "ffn"; init: "zero" (the default: up-projection zero, so
    the model starts exactly at the base, as the notes ask and as He et al.'s
    "lora" initialisation does) or "near_identity" (Houlsby's weights ~ N(0, 1e-2):
    on small models with a wide bottleneck it moves the logits by 1e-2 at init);
    drop: AdapterDrop, no adapter in the lowest n layers of each stack; drop_robust: adapters
    in every layer, a random n per training step, ``drop`` at inference (``adapter_drop.py``)."""

    style: str = "houlsby"
    bottleneck: int = 64
    activation: str = "relu"
    scale: float | None = None
    locations: tuple | None = None
    init: str | None = None
    train_head: bool | list = True
    drop: int = 0
    drop_robust: bool = False

    kind: ClassVar[str] = "adapter"
    method_type: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = False

    def validate(self):
        check_choice("Adapter", "style", self.style, STYLES)
        check_positive_int("Adapter", "bottleneck", self.bottleneck)
        check_choice("Adapter", "activation", self.activation, tuple(ACTIVATIONS))
        if self.init is None:
            self.init = "zero"
        check_choice("Adapter", "init", self.init, ("near_identity", "zero"))
        if self.scale is not None:
            if self.style != "scaled_parallel":
                raise UnipeftError(f"Adapter: scale applies only to style 'scaled_parallel', not {self.style!r}")
            check_number("Adapter", "scale", self.scale, lo=0, lo_open=True)
        if self.locations is not None:
            locs = (self.locations,) if isinstance(self.locations, str) else tuple(self.locations)
            for loc in locs:
                check_choice("Adapter", "locations", loc, ("attention", "ffn"))
            if not locs:
                raise UnipeftError("Adapter: locations is empty; give 'attention' and/or 'ffn'")
            self.locations = locs
        check_positive_int("Adapter", "drop", self.drop, allow_zero=True)
        if not isinstance(self.drop_robust, bool):
            raise UnipeftError(f"Adapter: drop_robust must be True or False, got {self.drop_robust!r}")

    def install(self, view, name):
        locations = self.locations or DEFAULT_LOCATIONS[self.style]
        parallel = self.style in ("parallel", "scaled_parallel")
        scale = (self.scale if self.scale is not None else 4.0) if self.style == "scaled_parallel" else 1.0
        plan = DropPlan(view, "Adapter", self.drop, self.drop_robust)
        for src, out in plan.keep(sublayers(view, "Adapter", locations, parallel)):
            _, d = linear_shape(view.module(out))
            adapter = AdapterDelta.linear(d, self.bottleneck, self.activation, scale, parallel, self.init)
            view.add_linear(out, adapter)
            plan.watch(adapter, out)
            if parallel:
                view.add_linear(src, InputTap(adapter))
        plan.start()


def sublayers(view, owner: str, locations, parallel: bool) -> list[tuple[str | None, str]]:
    """The positions of the notes' ADT in every block: (input map, output map) per chosen sublayer.

    "attention": the output projection (o), with the query map as the sublayer's input;
    "ffn": the FFN's output map (ffn_out), with its first input map (ffn_in). The input map
    is given only where ``parallel`` (the adapter reads the sublayer's input through an
    ``InputTap``); a sequential adapter reads the output itself (None)."""
    pairs = []
    for block in view.map.blocks:
        inside = [p for p in view.map.roles if view.map.block_of(p) is block]
        if "attention" in locations:
            outs = [p for p in inside if "o" in view.map.roles[p]]
            ins = [p for p in inside if "q" in view.map.roles[p]]
            pairs += list(zip(ins, outs))
        if "ffn" in locations:
            outs = [p for p in inside if "ffn_out" in view.map.roles[p]]
            ins = [p for p in inside if "ffn_in" in view.map.roles[p]][:1]
            pairs += list(zip(ins, outs)) if parallel else [(None, o) for o in outs]
    if not pairs:
        raise UnipeftError(f"{owner}: found no {choices(locations)} sublayer in {view.map.model_type!r}")
    return pairs


class AdapterDelta(LinearDelta):
    rewrites_output = True

    def __init__(self, down: nn.Module, up: nn.Module, activation: str, scale: float, parallel: bool):
        """``down``/``up``: maps shaped like nn.Linear (``weight`` (out, in), ``bias`` or None,
        ``out_features``): plain linear layers here, PHM layers for Compacter."""
        super().__init__()
        self.down, self.up = down, up
        self.act = ACTIVATIONS[activation]()
        self.scale, self.parallel = scale, parallel
        self.tapped: torch.Tensor | None = None

    @classmethod
    def linear(cls, d: int, m: int, activation: str, scale: float, parallel: bool, init: str) -> "AdapterDelta":
        down, up = nn.Linear(d, m), nn.Linear(m, d)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.bias)
        nn.init.trunc_normal_(down.weight, std=1e-2, a=-2e-2, b=2e-2)
        if init == "zero":
            nn.init.zeros_(up.weight)
        else:
            nn.init.trunc_normal_(up.weight, std=1e-2, a=-2e-2, b=2e-2)
        return cls(down, up, activation, scale, parallel)

    def table_params(self) -> tuple:
        """The tensors the stacked routing tables are built from (their versions key the cache)."""
        return tuple(self.parameters())

    def output(self, x, y):
        if dropped(self):  # robust AdapterDrop: this layer sits out the current n
            self.tapped = None
            return y
        if self.parallel:
            src, self.tapped = self.tapped, None  # do not keep the activation alive past its use
            if src is None:
                raise RuntimeError("parallel adapter: the sublayer input was not seen before its output")
        else:
            src = y
        a = self.up(self.act(self.down(src)))
        return y + a * self.scale if self.scale != 1.0 else y + a


    @classmethod
    def routed_output(cls, site, items, x, y):
        """Several adapters, each on its own rows (per-example routing), in one gathered computation:

            y_i += s_d(i) * up_d(i)(act(down_d(i)(src_i)))    src = y (sequential) or the tapped input

        Every adapter's weights at the site are stacked (bottlenecks zero-padded to the largest: a
        padded unit's up-projection column is zero, so it adds nothing whatever the activation),
        gathered per row and applied as batched products. Rows on no adapter here add zero."""
        for _, d, _ in items:
            if dropped(d):
                d.tapped = None
        items = [item for item in items if not dropped(item[1])]  # robust AdapterDrop: sitting out
        if not items:
            return y
        first = items[0][1]
        srcs = [d.tapped if d.parallel else y for _, d, _ in items]
        for _, d, _ in items:
            d.tapped = None  # do not keep the activation alive past its use
        if any(s is None for s in srcs):
            raise RuntimeError("parallel adapter: the sublayer input was not seen before its output")
        same = all(type(d.act) is type(first.act) and d.parallel == first.parallel for _, d, _ in items)
        if len(items) == 1 or not same:  # each on its own rows
            for (_, d, rows), src in zip(items, srcs):
                a = d.up(d.act(d.down(src.index_select(0, rows))))
                y = y.index_copy(0, rows, y.index_select(0, rows) + (a * d.scale if d.scale != 1.0 else a))
            return y
        grad = torch.is_grad_enabled() and any(p.requires_grad for _, d, _ in items for p in d.parameters())
        # items hold this class only (a subclass is routed on its own), with one activation and tap,
        # and none sitting out this call (their rows read row 0: nothing added)
        tables, index = site.routed_table(f"{type(first).__name__}-{type(first.act).__name__}-{first.parallel}",
                                          [(n, d) for n, d, _ in items], _stack_adapters, grad,
                                          params=lambda d: d.table_params())
        slot = site.routed_slots(index, x.shape[0], x.device)
        src, mine = srcs[0], class_rows(items, y.shape[0])
        if mine is not None:  # only this class's rows (others would add row 0's zeros)
            slot, src = slot.index_select(0, mine), src.index_select(0, mine)
        dw, db, uw, ub = (t.index_select(0, slot).to(y.dtype) for t in tables)
        n = slot.shape[0]
        src = src.to(y.dtype).reshape(n, -1, src.shape[-1])
        hidden = first.act(torch.baddbmm(db[:, None, :], src, dw.transpose(1, 2)))
        out = torch.baddbmm(ub[:, None, :], hidden, uw.transpose(1, 2))
        if mine is not None:
            return y.index_add(0, mine, out.view(n, *y.shape[1:]))
        return y + out.view(y.shape)


def _stack_adapters(deltas):
    """Down (D+1, m, d), down bias (D+1, m), scaled up (D+1, d, m), scaled up bias (D+1, d); row 0 zeros."""
    m = max(d.down.out_features for d in deltas)
    dw, db, uw, ub = [], [], [], []
    for d in deltas:
        pad = m - d.down.out_features
        down_w, up_w = d.down.weight, d.up.weight  # a PHM layer builds its weight: once per stacking
        dw.append(F.pad(down_w, (0, 0, 0, pad)))
        db.append(F.pad(_bias(d.down, down_w), (0, pad)))
        uw.append(F.pad(up_w, (0, pad)) * d.scale)
        ub.append(_bias(d.up, up_w) * d.scale)
    return tuple(torch.stack([torch.zeros_like(t[0])] + t) for t in (dw, db, uw, ub))


def _bias(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The layer's bias, or zeros for a projection without one (Compacter's PHM layers)."""
    return layer.bias if layer.bias is not None else weight.new_zeros(weight.shape[0])


class InputTap(LinearDelta):
    """Hands the sublayer's input to a parallel adapter (or any delta with a ``tapped`` slot:
    AdapterBias) at the sublayer's output."""

    rewrites_input = True
    keeps_input = True

    def __init__(self, adapter: AdapterDelta):
        super().__init__()
        self.__dict__["adapter"] = adapter  # a reference, not a child: its parameters live at the output site

    def input(self, x):
        self.adapter.tapped = x
        return x

    @classmethod
    def routed_input(cls, site, items, x):
        """Routed: every tapped adapter gets the whole batch (it reads its own rows)."""
        for _, tap, _ in items:
            tap.adapter.tapped = x
        return x
