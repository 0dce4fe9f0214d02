"""Several methods on one model as one delta (seed 000 "Hybrid PEFT"; He et al. 2022, Mao et al. 2022).

    up.Compose([up.PrefixTuning(length=30), up.Adapter(style="scaled_parallel", bottleneck=512)])
    up.Compose([up.LoRA(layers="0-1"), up.Adapter(layers="2-5")])      # parts on layer groups

Each part installs itself as it would alone, through a view of the same delta (``PartView``):
its modules land at their positions under the one delta name, so the composition activates,
routes, saves and loads as one directory. Where two parts meet:

* at one linear map (LoRA and an adapter's input tap on the same projection): a ``Stacked``
  delta applies them in order, input rewrites first, then output rewrites;
* model-level modules (a prefix table, a prompt encoder): kept side by side, one per part
  (``Parts``), each stored as it would be alone (prefix tuning's MLP dropped, ...);
* one attention, input or hidden-state site: refused (two prefixes of one delta at one
  attention have no meaning a user would ask for).

MAM and UniPELT (``mam.py``, ``unipelt.py``) are compositions of the existing methods built
this way, not copies of them.
"""
from __future__ import annotations

from typing import ClassVar

import torch.nn as nn

from ..config import MethodConfig, method
from .. import layers
from ..errors import UnipeftError, choices
from ..positions import LinearDelta


@method
class Compose(MethodConfig):
    """methods: the method configs to combine (``up.LoRA(...)``, ``up.Adapter(...)``, ...), applied in
    this order where they meet; train_head: as for any method (the parts' own are not used)."""

    methods: tuple = ()
    train_head: bool | list = True

    kind: ClassVar[str] = "compose"
    method_type: ClassVar[str] = "hybrid"
    mergeable: ClassVar[bool] = False

    def validate(self):
        from ..config import METHODS

        parts = (self.methods,) if isinstance(self.methods, (MethodConfig, dict)) else tuple(self.methods or ())
        if not parts:
            raise UnipeftError("Compose: methods is empty; give a list of method configs such as "
                               "[up.PrefixTuning(), up.Adapter(style='scaled_parallel')]")
        out = []
        for p in parts:
            if isinstance(p, dict) and "kind" in p:  # as stored in delta.json
                p = MethodConfig.from_dict(p["kind"], p.get("options", {}))
            if not isinstance(p, MethodConfig):
                raise UnipeftError(f"Compose: every part must be a method config such as up.LoRA(...), got "
                                   f"{type(p).__name__}; valid methods: {choices(sorted(METHODS))}")
            out.append(p)
        self.methods = tuple(out)

    def to_dict(self):
        return {"methods": [{"kind": p.kind, "options": p.to_dict()} for p in self.methods],
                "train_head": self.train_head, "layers": None if self.layers is None else list(self.layers)}

    def saved_config(self) -> "Compose":
        """Each part as it is stored alone (prefix tuning without its MLP, ...)."""
        return self.replace(methods=tuple(p.saved_config() if hasattr(p, "saved_config") else p
                                          for p in self.methods))

    def install(self, view, name):
        install_parts(self, list(self.methods), view, name)


def install_parts(owner: MethodConfig, parts: list[MethodConfig], view, name) -> list["PartView"]:
    """Install ``parts`` as one delta through ``view``; returns their views (what each placed)."""
    modules = Parts()
    views = []
    for i, part in enumerate(parts):
        pv = PartView(view, owner, i, part, modules)
        layers.install(part, pv, name)  # a part on its own layer group (unipeft.layers)
        views.append(pv)
    if len(modules):
        view.set_module(modules)
    return views


class _DeltaProxy:
    """The delta record as a part sees it: its own config, everything else the shared record's."""

    def __init__(self, part_view: "PartView"):
        self.__dict__["_pv"] = part_view

    def __getattr__(self, attr):
        return getattr(self._pv.view.delta, attr)

    def __setattr__(self, attr, value):
        if attr != "config":
            raise AttributeError(f"a part of a composition cannot set the delta's {attr!r}")
        self._pv.set_config(value)


class PartView:
    """The engine's ``ModelView`` for one part of a composition (see the module docstring)."""

    def __init__(self, view, owner: MethodConfig, index: int, part: MethodConfig, modules: "Parts"):
        self.view, self.owner, self.index, self.part, self.modules = view, owner, index, part, modules
        self.linear: dict[str, LinearDelta] = {}   # what this part placed, by path
        self.attention: dict[str, object] = {}
        self.delta = _DeltaProxy(self)

    def __getattr__(self, attr):  # positions, map, model, config, tokenizer, select, ...
        return getattr(self.view, attr)

    def set_config(self, config: MethodConfig) -> None:
        """A part that records what it resolved at install (PASTA's token ids) updates its own entry."""
        methods = list(self.view.delta.config.methods)
        methods[self.index] = config
        self.view.delta.config = self.view.delta.config.replace(methods=tuple(methods))

    def add_linear(self, path: str, delta: LinearDelta) -> None:
        self.linear[path] = delta
        stack_linear(self.view, path, delta)

    def _one(self, where: str, placed: dict, path: str) -> None:
        if path in placed:
            kinds = choices([p.kind for p in self.owner_parts()])
            raise UnipeftError(f"{type(self.owner).__name__}: two parts ({kinds}) "
                               f"put a delta at the {where} of {path!r}; one part per {where}")

    def owner_parts(self):
        return getattr(self.owner, "methods", None) or [self.part]

    def add_attention(self, path: str, source) -> None:
        self._one("attention", self.view.delta.attention, path)
        self.attention[path] = source
        self.view.add_attention(path, source)

    def add_input(self, stack_path: str, source) -> None:
        self._one("input embeddings", self.view.delta.inputs, stack_path)
        self.view.add_input(stack_path, source)

    def add_hidden(self, stack_path: str, source) -> None:
        self._one("hidden states", self.view.delta.hidden, stack_path)
        self.view.add_hidden(stack_path, source)

    def set_module(self, module: nn.Module) -> None:
        self.modules[str(self.index)] = module


def stack_linear(view, path: str, delta: LinearDelta) -> None:
    """Place ``delta`` at linear map ``path`` of the delta ``view`` installs, after what is there already."""
    placed = view.delta.linear.get(path)
    if placed is None:
        view.add_linear(path, delta)
    elif isinstance(placed, Stacked):
        placed.append(delta)
    else:
        view.add_linear(path, Stacked([placed, delta]))


class Parts(nn.ModuleDict):
    """The model-level modules of a composition, one per part that has one, keyed by its index."""

    def export_state(self):
        out = {}
        for key, m in self.items():
            export = getattr(m, "export_state", None)
            for k, v in (export() if export is not None else m.state_dict()).items():
                out[f"{key}.{k}"] = v
        return out


class Stacked(LinearDelta):
    """Several deltas of one composition at one linear map, applied in order."""

    def __init__(self, deltas: list[LinearDelta]):
        super().__init__()
        self.parts = nn.ModuleList()
        for d in deltas:
            self.append(d)

    def append(self, delta: LinearDelta) -> None:
        if delta.replaces_base:
            raise UnipeftError(f"a composition cannot stack {type(delta).__name__}, which replaces its linear map")
        self.parts.append(delta)
        self.rewrites_input = any(d.rewrites_input for d in self.parts)
        self.rewrites_output = any(d.rewrites_output for d in self.parts)
        self.keeps_input = all(d.keeps_input for d in self.parts if d.rewrites_input)

    def input(self, x):
        for d in self.parts:
            if d.rewrites_input:
                x = d.input(x)
        return x

    def output(self, x, y):
        for d in self.parts:
            if d.rewrites_output:
                y = d.output(x, y)
        return y

    def export_state(self):
        out = {}
        for i, d in enumerate(self.parts):
            export = getattr(d, "export_state", None)
            for k, v in (export() if export is not None else d.state_dict()).items():
                out[f"parts.{i}.{k}"] = v
        return out
