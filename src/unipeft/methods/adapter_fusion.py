"""AdapterFusion (Pfeiffer et al. 2021; seed 001: "training task-specific adapters and then combining
them to leverage the cross-task knowledge").

Stage one trains one adapter per task (sequential: ``up.Adapter`` Pfeiffer or Houlsby, or
``up.Compacter``). Stage two, this method, learns at every layer where the adapters sit an
attention over their outputs, with the adapters frozen:

    a_n = h + ADT_n(h)                      adapter n's output, h the sublayer's output
    q = h W_Q,  k_n = a_n W_K,  v_n = a_n W_V
    h <- sum_n softmax_n(q . k_n) v_n        (query from the sublayer output, keys/values from the adapters)

W_V starts at the identity (plus small noise) and W_Q, W_K small, so at the start the fusion
returns nearly the mean of the adapters' outputs. The fusion is a delta of its own, small (three
d x d maps per fused sublayer), at the same linear sites as the adapters: it reads each adapter
through the site (the adapters stay their own deltas, switched off, frozen), and its config
names them, so ``up.load`` of a fusion needs those adapters attached under the same names.

An entry of ``adapters`` may also be a saved adapter's directory (what ``up.save`` or ``unipeft
train`` wrote): the fusion then loads it as its own delta, switched off, under its saved name,
and remembers where it came from (``sources``), so ``unipeft train --method adapter_fusion
--method-option adapters=runs/sst2/delta,runs/news/delta`` works from a bare base, and loading
the saved fusion onto a bare base loads the adapters too.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from ..config import MethodConfig, check_choice, method
from ..errors import UnipeftError, choices
from ..positions import LinearDelta, linear_shape


# the methods whose deltas a fusion reads: sequential adapters (Compacter's are, with PHM projections)
FUSABLE = ("adapter", "compacter")


@method
class AdapterFusion(MethodConfig):
    """adapters: two or more sequential adapter deltas (Houlsby, Pfeiffer, Compacter) to fuse, by the
    name they are attached under or by the directory they were saved to; they must sit at the same
    sublayers. sources: where adapters come from ({name: directory}): filled in at attach for those
    given as directories; a name given here loads from its directory under that name."""

    adapters: tuple = ()
    sources: dict | None = None
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
        if self.sources is not None and not (isinstance(self.sources, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.sources.items())):
            raise UnipeftError(f"AdapterFusion: sources must map adapter names to directories, got {self.sources!r}")

    def install(self, view, name):
        loaded: list[str] = []
        try:
            self._install(view, name, loaded)
        except BaseException:
            from ..engine import detach

            for n in loaded:  # the model as it was: the adapters this attach loaded go again
                detach(view.model, n)
            raise

    def _load_adapters(self, view, name: str, loaded: list) -> tuple[list[str], dict]:
        """The adapters' names, loading those given as directories (or known from ``sources``)."""
        from pathlib import Path

        from ..storage import load, read_meta

        reg, names, sources = view.reg, [], dict(self.sources or {})
        for entry in self.adapters:
            where = sources.get(entry) or (entry if entry not in reg.deltas and Path(entry).is_dir() else None)
            if entry in reg.deltas or where is None:
                names.append(entry)
                continue
            # a name with a recorded source loads under that name (several adapters saved under one name, as
            # runs on one task are: ``unipeft compare`` fuses its own adapter rows so); a directory, under its own
            n = entry if entry in sources else read_meta(where)["name"]
            if n == name:
                raise UnipeftError(f"AdapterFusion: the adapter in {where!r} is named {n!r}, the name this fusion is "
                                   f"being attached under; give the fusion another name")
            if n in reg.deltas and entry != n:
                raise UnipeftError(f"AdapterFusion: {where!r} holds a delta named {n!r}, and one of that name is "
                                   f"attached already")
            if n not in reg.deltas:
                load(view.model, where, name=n, activate=False, tokenizer=view.tokenizer)
                loaded.append(n)
            names.append(n)
            sources[n] = str(where)
        return names, sources

    def _install(self, view, name, loaded):
        from .adapter import AdapterDelta

        reg = view.reg
        names, sources = self._load_adapters(view, name, loaded)
        if len(set(names)) != len(names):
            raise UnipeftError(f"AdapterFusion: adapters repeat in {names!r}")
        if names != list(self.adapters) or sources != (self.sources or {}):
            view.delta.config = self.replace(adapters=tuple(names), sources=sources or None)
        attached = list(reg.deltas)
        for n in names:
            if n not in reg.deltas:
                raise UnipeftError(f"AdapterFusion: no delta named {n!r} is attached (nor a directory of that name); "
                                   f"attach or load the adapters first, or give their saved directories "
                                   f"(attached: {choices(attached) if attached else 'none'})")
            kind = reg.deltas[n].config.kind
            check_choice("AdapterFusion", f"the method of delta {n!r}", kind, FUSABLE)
            style = getattr(reg.deltas[n].config, "style", "pfeiffer")  # Compacter: sequential, PHM projections
            if style not in ("houlsby", "pfeiffer"):
                raise UnipeftError(f"AdapterFusion: delta {n!r} is a {style} adapter; fusion reads sequential "
                                   f"adapters ('houlsby' or 'pfeiffer')")
        per_path = [{p for p, d in reg.deltas[n].linear.items() if isinstance(d, AdapterDelta)} for n in names]
        paths = [p for p in reg.deltas[names[0]].linear if all(p in s for s in per_path)
                 and view.map.block_of(p) is not None]  # (with layers=: the chosen blocks only)
        if not paths:
            raise UnipeftError(f"AdapterFusion: the adapters {choices(names)} share no sublayer")
        for path in paths:
            fusion = FusionDelta(names, linear_shape(view.module(path))[1])
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
