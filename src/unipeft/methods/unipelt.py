"""UniPELT (Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning").

Adapter, prefix tuning and LoRA in every layer, each behind its own learned gate, so the model
learns which submodule to lean on for the task at hand:

    adapter (after the FFN):  h_F <- h_F + G_A * ADT(h_F)          G_A = sigmoid(h_F W_GA)
    prefix  (every attention): P_K, P_V <- G_P * P_K, G_P * P_V     G_P = sigmoid(x W_GP)
    LoRA    (W_q and W_v):     h <- W_0 x + G_L * s B A x           G_L = sigmoid(x W_GL)

x is the sublayer's input (read at the query map). Each gate is a linear map of its submodule's
input to one number per token, then a sigmoid (Mao et al.'s "sigmoid of a linear map of the
sublayer input"). The prefix's gate is per token too: token t's query sees G_P,t P_K and G_P,t P_V,
as if each token had a prefix of its own (the attention position does this exactly in one call,
``positions.attention._gated_attention``). So a token's output never depends on later tokens or on
padding, and cached generation gives what recomputing the whole sequence gives. (Before
2026-12-03 the prefix gate was the mean of the per-token gates over the sequence, one value per
row: that read future tokens in a decoder and padding everywhere.) Every gated map has its own gate
(Mao et al. share G_L between W_q and W_v; the difference is one d-vector per map).

A composition (``compose.py``) of the existing ``Adapter(style="pfeiffer")``, ``PrefixTuning``
and ``LoRA(targets=("q", "v"))``, with gates put around what they placed (``Gated``,
``GatedPrefix``): no copy of the three methods. ``components`` picks a subset (Mao et al.'s
UniPELT (AP) is ``("adapter", "prefix")``).

Gate values are not collected during the forward pass (the reference code appends every gate
to a Python list with ``.cpu()``, which leaks memory and syncs the device at each call):
``gate_values(model, name)`` reads the last values on demand, and only while recording is on
(``record_gates(model, name)``), as device tensors until asked.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from ..config import MethodConfig, check_choice, check_number, check_positive_int, method
from ..errors import UnipeftError
from ..positions import KVSource, LinearDelta, linear_shape
from .compose import PartView, Stacked, install_parts, stack_linear

COMPONENTS = ("adapter", "prefix", "lora")


@method
class UniPELT(MethodConfig):
    """components: which of "adapter", "prefix", "lora" to use (default all three); bottleneck: the
    adapter's (Mao et al.: 48); prefix_length (10) and reparam_hidden (the prefix MLP, 512); r and
    alpha: LoRA on W_q and W_v (8, 16)."""

    components: tuple = COMPONENTS
    bottleneck: int = 48
    prefix_length: int = 10
    reparam_hidden: int = 512
    r: int = 8
    alpha: float = 16.0
    train_head: bool | list = True

    kind: ClassVar[str] = "unipelt"
    method_type: ClassVar[str] = "hybrid"
    mergeable: ClassVar[bool] = False

    def validate(self):
        comps = (self.components,) if isinstance(self.components, str) else tuple(self.components or ())
        if not comps:
            raise UnipeftError("UniPELT: components is empty; give some of 'adapter', 'prefix', 'lora'")
        for c in comps:
            check_choice("UniPELT", "components", c, COMPONENTS)
        self.components = tuple(c for c in COMPONENTS if c in comps)
        check_positive_int("UniPELT", "bottleneck", self.bottleneck)
        check_positive_int("UniPELT", "prefix_length", self.prefix_length)
        check_positive_int("UniPELT", "reparam_hidden", self.reparam_hidden, allow_zero=True)
        check_positive_int("UniPELT", "r", self.r)
        check_number("UniPELT", "alpha", self.alpha, lo=0, lo_open=True)

    def parts(self) -> list[MethodConfig]:
        from .adapter import Adapter
        from .lora import LoRA
        from .prefix_tuning import PrefixTuning

        make = {"adapter": lambda: Adapter(style="pfeiffer", bottleneck=self.bottleneck),
                "prefix": lambda: PrefixTuning(length=self.prefix_length, reparam_hidden=self.reparam_hidden),
                "lora": lambda: LoRA(r=self.r, alpha=self.alpha, targets=("q", "v"))}
        return [make[c]() for c in self.components]

    def saved_config(self) -> "UniPELT":
        return self.replace(reparam_hidden=0)  # the prefix is stored as P itself

    def install(self, view, name):
        views = install_parts(self, self.parts(), view, name)
        for comp, pv in zip(self.components, views):
            if comp == "prefix":
                _gate_prefixes(view, pv)
                continue
            for path, d in pv.linear.items():  # the adapter after the FFN reads h_F; LoRA reads x
                _replace(view, path, d, Gated(d, linear_shape(view.module(path))[1 if comp == "adapter" else 0],
                                              on="output" if comp == "adapter" else "input"))


def _replace(view, path: str, old: LinearDelta, new: LinearDelta) -> None:
    placed = view.delta.linear[path]
    if placed is old:
        view.add_linear(path, new)
    else:  # stacked with another part's delta at the same map
        placed.parts[[i for i, d in enumerate(placed.parts) if d is old][0]] = new


def _gate_prefixes(view, pv: PartView) -> None:
    """Each attention's prefix behind a gate fed by that attention's input, read at its query map."""
    for attn, src in pv.attention.items():
        q = [p for p, roles in view.map.roles.items() if p.startswith(attn + ".") and "q" in roles]
        if not q:
            raise UnipeftError(f"UniPELT: no query map under {attn!r} to read the prefix gate's input from")
        tap = GateTap(linear_shape(view.module(q[0]))[0])
        stack_linear(view, q[0], tap)  # after LoRA, if it is at q too
        view.add_attention(attn, GatedPrefix(src, tap))


class Gated(LinearDelta):
    """y <- y + g * (inner(x, y) - y): a delta's change scaled by g = sigmoid(u W + b) per token, u the
    map's input x (``on="input"``) or its output y (``on="output"``)."""

    rewrites_output = True

    def __init__(self, inner: LinearDelta, width: int, on: str):
        super().__init__()
        self.inner, self.on = inner, on
        self.gate = nn.Linear(width, 1)
        self.__dict__["recorded"] = None  # the last gate values, when recording (a device tensor)
        self.__dict__["recording"] = False

    def output(self, x, y):
        g = torch.sigmoid(self.gate(x if self.on == "input" else y).to(y.dtype))
        if self.recording:
            self.__dict__["recorded"] = g.detach()
        return y + g * (self.inner.output(x, y.clone()) - y)  # clone: LoRA adds in place without autograd


class GateTap(LinearDelta):
    """Reads a sublayer's input at its query map and holds the prefix gate per token: G_P,t = sigmoid(x_t W + b)."""

    rewrites_input = True
    keeps_input = True

    def __init__(self, width: int):
        super().__init__()
        self.gate = nn.Linear(width, 1)
        self.__dict__["value"] = None
        self.__dict__["recording"] = False
        self.__dict__["recorded"] = None

    def __getstate__(self):
        # ``value`` lives from the query map's call to the attention's (a tensor in the autograd graph,
        # which copy.deepcopy cannot copy): a copy of the model starts without one
        state = super().__getstate__()
        state["value"] = None
        return state

    def input(self, x):
        g = torch.sigmoid(self.gate(x.to(self.gate.weight.dtype))).squeeze(-1)  # (batch, tokens)
        self.__dict__["value"] = g
        if self.recording:
            self.__dict__["recorded"] = g.detach()
        return x


class GatedPrefix(KVSource):
    """A prefix whose keys and values each query sees scaled by that token's gate (set by the tap at
    the attention's query map; the attention position applies it, see ``KVSource.query_gate``)."""

    def __init__(self, inner: KVSource, tap: GateTap):
        self.inner, self.tap = inner, tap

    def prefix_kv(self, batch, dtype, device):
        return self.inner.prefix_kv(batch, dtype, device)

    def query_gate(self):
        if self.tap.value is None:
            raise UnipeftError("UniPELT: the prefix gate did not see this attention's input (its query map "
                               "did not run before the attention)")
        return self.tap.value


def _gates(model, name):
    from ..engine import _require

    _, delta = _require(model, name)
    if delta.config.kind != "unipelt":
        raise UnipeftError(f"delta {name!r} is {delta.config.kind}, not UniPELT: it has no gates")
    out = {}
    for path, d in delta.linear.items():
        for i, g in enumerate(d.parts if isinstance(d, Stacked) else [d]):
            if isinstance(g, (Gated, GateTap)):
                kind = "prefix" if isinstance(g, GateTap) else ("adapter" if g.on == "output" else "lora")
                out[f"{path}:{kind}"] = g
    return out


def record_gates(model: nn.Module, name: str, on: bool = True) -> None:
    """Keep the last gate values of UniPELT delta ``name`` (device tensors, no copy to the host)."""
    for g in _gates(model, name).values():
        g.__dict__["recording"] = on
        if not on:
            g.__dict__["recorded"] = None


def gate_values(model: nn.Module, name: str) -> dict[str, float]:
    """The mean of each gate over the last batch it saw while recording: {"<map path>:<component>": value}."""
    return {k: float(g.recorded.float().mean()) for k, g in _gates(model, name).items() if g.recorded is not None}
