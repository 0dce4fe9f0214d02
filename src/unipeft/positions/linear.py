"""Linear maps as positions: LoRA (the weight), adapters (a sublayer's output, or beside it via
an input tap), (IA)3 (activations), task heads (replacement). See the package docstring."""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UnipeftError
from ..quantization import dequantize, prepare_site
from .tables import SlotTable


# ---------------------------------------------------------------------------
# Linear maps
# ---------------------------------------------------------------------------

class LinearDelta(nn.Module):
    """One delta at a linear map. Subclasses override what they change.

    input(x)      -> x'        runs before the base map   (if rewrites_input)
    output(x, y)  -> y'        runs after it              (if rewrites_output)
    replace(x)    -> y         instead of the base map    (if replaces_base)
    merged(W, b)  -> (W', b')  the same change folded into the weights, W as (out, in)
    """

    rewrites_input = False
    rewrites_output = False
    replaces_base = False
    # an input "rewrite" that hands x on unchanged (it only reads it: a tap for a parallel adapter or a
    # gate): merging another delta at the map is then still exact (``merging._check_merge_order``)
    keeps_input = False

    def with_base(self, site, x):
        """``output(x, base(x))`` computed in one go (a fused path), or None to take the plain path.
        Only asked of the first output-rewriting delta of a site with no input rewrite or replacement."""
        return None

    def input(self, x):
        return x

    def output(self, x, y):
        return y

    def replace(self, x):
        raise NotImplementedError

    def merged(self, weight: torch.Tensor, bias: torch.Tensor | None):
        raise UnipeftError(f"{type(self).__name__} cannot be merged into the base weights")

    # --- routing (up.route): several deltas of one class at a site, each on its own rows ----------
    # ``items`` is [(name, delta, rows)], rows a LongTensor of batch indices, disjoint across items.
    # The defaults run each delta on its rows (index_select -> the delta -> index_copy): the work is
    # that of each delta on its own rows. A class overrides them with one gathered computation for
    # all its deltas at once (LoRA: per-row low-rank factors in one bmm; (IA)3: per-row scale
    # vectors), using ``site.routed_table`` and ``site.routed_slots``.

    @classmethod
    def routed_input(cls, site, items, x):
        for _, d, rows in items:
            x = x.index_copy(0, rows, d.input(x.index_select(0, rows)).to(x.dtype))
        return x

    @classmethod
    def routed_output(cls, site, items, x, y):
        for _, d, rows in items:
            y = y.index_copy(0, rows, d.output(x.index_select(0, rows), y.index_select(0, rows)).to(y.dtype))
        return y


def class_rows(items, n: int) -> torch.Tensor | None:
    """The rows (sorted) of a batch of n that the routed ``items`` [(name, delta, rows)] hold, or
    None when they hold every row: a gathered class then computes for its own rows only, not for
    rows that would read its table's row 0 (no change)."""
    count = sum(rows.numel() for _, _, rows in items)
    if count >= n:
        return None
    return torch.cat([rows for _, _, rows in items]).sort().values


def per_row(table: torch.Tensor, slot: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[slot] (n, size) shaped to broadcast over ``like`` (n, ..., size)."""
    rows = table.index_select(0, slot)
    return rows.view(rows.shape[0], *([1] * (like.dim() - 2)), rows.shape[-1])


class LinearSite:
    """Mixin swapped into a linear module's class (see ``install_linear_site``).

    Swapping the class instead of wrapping the module keeps every base
    parameter at its original name (``...query.weight``), so the base model's
    state dict, ``isinstance`` checks and tied weights are untouched; only a
    ``unipeft_deltas`` child is added.
    """

    unipeft_deltas: nn.ModuleDict

    def _unipeft_base(self, x):
        """The base map: the module's own forward, or, on a quantized map with merged deltas, the
        dequantised merged weight (see ``unipeft_merge``)."""
        dense = self._buffers.get("unipeft_dense")
        if dense is not None:
            return F.linear(x, dense.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return super().forward(x)

    def unipeft_refresh(self, active: list[str]) -> None:
        ds = [self.unipeft_deltas[n] for n in active if n in self.unipeft_deltas and n not in self._unipeft_merged]
        self._unipeft_pre = tuple(d for d in ds if d.rewrites_input)
        self._unipeft_post = tuple(d for d in ds if d.rewrites_output)
        repl = [d for d in ds if d.replaces_base]
        if len(repl) > 1:
            raise UnipeftError("two active deltas replace the same module; activate only one of them")
        self._unipeft_replace = repl[0] if repl else None

    def forward(self, x):
        if self._unipeft_route is not None:
            return self._routed_forward(x)
        h = x
        for d in self._unipeft_pre:
            h = d.input(h)
        post = self._unipeft_post
        y = None
        if post and not self._unipeft_pre and self._unipeft_replace is None:
            y = post[0].with_base(self, x)
            if y is not None:
                post = post[1:]
        if y is None:
            y = self._unipeft_replace.replace(h) if self._unipeft_replace is not None else self._unipeft_base(h)
        for d in post:
            y = d.output(x, y)
        return y

    # --- routing --------------------------------------------------------------
    def unipeft_route(self, route) -> None:
        """Route rows to deltas (``unipeft.routing.Route``), or None to go back to the active deltas."""
        self._unipeft_route = route
        self._unipeft_routed = () if route is None else tuple(
            (n, self.unipeft_deltas[n]) for n in route.order if n in self.unipeft_deltas)

    def _routed_forward(self, x):
        """Each delta on the rows routed to it; rows of other deltas or of the base see the base map.
        Deltas of one class are handed over together, so a class can gather instead of looping."""
        route = self._unipeft_route
        groups: dict[tuple, list] = {}
        for name, d in self._unipeft_routed:
            rows = route.rows(name, x.shape[0], x.device, where=self)
            if rows.numel():
                if d.rewrites_input:  # a delta may rewrite both (a composition's Stacked deltas)
                    groups.setdefault(("input", type(d)), []).append((name, d, rows))
                if d.replaces_base or d.rewrites_output or not d.rewrites_input:
                    kind = "replace" if d.replaces_base else "output"
                    groups.setdefault((kind, type(d)), []).append((name, d, rows))
        h = x
        for (kind, cls), items in groups.items():
            if kind == "input":
                h = cls.routed_input(self, items, h)
        y = self._unipeft_base(h)
        for (kind, cls), items in groups.items():
            if kind == "replace":
                for _, d, rows in items:
                    y = y.index_copy(0, rows, d.replace(h.index_select(0, rows)).to(y.dtype))
        for (kind, cls), items in groups.items():
            if kind == "output":
                y = cls.routed_output(self, items, x, y)
        return y

    def routed_slots(self, index: dict[str, int], n: int, device) -> torch.Tensor:
        """(n,) per row: ``index[name of the row's delta]``, 0 for rows whose delta is not in ``index``."""
        return self._unipeft_route.slots(index, n, device)

    def routed_table(self, tag: str, named: list, build, grad: bool, params=None):
        """Tables a class stacks from the routed deltas ``named`` [(name, delta)] at this site (e.g.
        every LoRA factor), with row 0 the identity, and {name: row}; ``build(deltas)`` stacks
        them. With autograd they are built for the call, so gradients reach each delta; without,
        they are kept in a ``SlotTable`` on the site (see ``tables.py``) that rewrites only new or
        changed deltas. ``params(delta)`` names the tensors a row is built from (default: all of
        the delta's parameters)."""
        if grad:
            return build([d for _, d in named]), {n: i + 1 for i, (n, _) in enumerate(named)}
        params = params or (lambda d: tuple(d.parameters()))
        kept = self.__dict__.setdefault("_unipeft_route_tables", {})
        table = kept.get(tag)
        if table is None:
            table = kept[tag] = SlotTable()
        return table.lookup(named, build, params, lambda n, d: self.unipeft_deltas[n] is d
                            if n in self.unipeft_deltas else False, block=self._unipeft_route)

    # --- weights as (out, in), whatever the storage layout -----------------
    def unipeft_weight_out_in(self) -> torch.Tensor:
        """The weight the map computes with, (out, in); for a quantized map a dequantised float copy
        (made on each call: nothing keeps it)."""
        if self._unipeft_quantized:
            dense = self._buffers.get("unipeft_dense")
            return dense if dense is not None else dequantize(self)
        return self.weight.T if self._unipeft_transposed else self.weight

    def unipeft_merge(self, name: str) -> None:
        if name in self._unipeft_merged:
            return
        delta = self.unipeft_deltas[name]
        if self._unipeft_quantized:
            return self._merge_quantized(name, delta)
        w, b = self.unipeft_weight_out_in(), getattr(self, "bias", None)  # an embedding (a site too) has none
        with torch.no_grad():
            new_w, new_b = delta.merged(w.detach(), None if b is None else b.detach())
            # keep the exact originals so unmerge restores the base bit for bit
            self._unipeft_merged[name] = (self.weight.detach().clone(), None if b is None else b.detach().clone())
            self.weight.copy_(new_w.T if self._unipeft_transposed else new_w)
            if b is not None and new_b is not None:
                b.copy_(new_b)
            elif new_b is not None:  # the delta needs a bias this map never had (BitFit on a bias-free model)
                self.bias = nn.Parameter(new_b.detach().clone(), requires_grad=False)

    def _merge_quantized(self, name: str, delta) -> None:
        """Merging into a quantized map: W + ΔW cannot go back into the packed weight without a second
        rounding, so the map computes from then on with a dequantised float weight W_deq + ΔW (the
        memory of an unquantized layer; ``_unipeft_base``) and says so; the packed weight stays as it is,
        so unmerge (and detach) go back to it exactly."""
        import warnings

        w, b = self.unipeft_weight_out_in(), self.bias
        with torch.no_grad():
            new_w, new_b = delta.merged(w.detach(), None if b is None else b.detach())
        # the originals: the packed weight itself (a reference, it is never written) before the first merge
        before = self.weight if self.unipeft_dense is None else self.unipeft_dense
        self._unipeft_merged[name] = (before, None if b is None else b.detach().clone())
        self.unipeft_dense = new_w.detach()
        with torch.no_grad():
            if b is not None and new_b is not None:
                b.copy_(new_b)
            elif new_b is not None:
                self.bias = nn.Parameter(new_b.detach().clone(), requires_grad=False)
        warnings.warn(f"up.merge: delta {name!r} merged into {self._unipeft_quantized}-bit quantized linear maps: "
                      f"each now computes with a dequantised float weight (W_deq + delta, the memory of an "
                      f"unquantized layer); the quantized weights are kept, and up.unmerge goes back to them",
                      stacklevel=3)

    def unipeft_unmerge(self, name: str) -> None:
        if name not in self._unipeft_merged:
            return
        # deltas merged after this one were computed on top of it: unmerge them first
        later = list(self._unipeft_merged)[list(self._unipeft_merged).index(name):]
        for n in reversed(later):
            w, b = self._unipeft_merged.pop(n)
            with torch.no_grad():
                if self._unipeft_quantized:
                    self.unipeft_dense = None if w is self.weight else w
                else:
                    self.weight.copy_(w)
                if b is not None:
                    self.bias.copy_(b)
                elif getattr(self, "bias", None) is not None:  # a bias the merge added: the map goes back to none
                    self.bias = None
        for n in later[1:]:
            self.unipeft_merge(n)


_SITE_CLASSES: dict[type, type] = {}


def _site_class(base: type) -> type:
    cls = _SITE_CLASSES.get(base)
    if cls is None:
        name = f"Unipeft{base.__name__}"
        cls = type(name, (LinearSite, base), {"__module__": __name__})
        cls.__qualname__ = name
        setattr(sys.modules[__name__], name, cls)  # importable, hence picklable / deep-copyable
        _SITE_CLASSES[base] = cls
    return cls


def install_linear_site(module: nn.Module) -> nn.Module:
    """Turn a linear module into a site (idempotent)."""
    if isinstance(module, LinearSite):
        return module
    from transformers.pytorch_utils import Conv1D

    transposed = isinstance(module, Conv1D)
    module.__class__ = _site_class(type(module))
    module.unipeft_deltas = nn.ModuleDict()
    module._unipeft_transposed = transposed
    module._unipeft_quantized = prepare_site(module)  # 2, 4, 8 or None
    if module._unipeft_quantized:  # its dequantised merged weight (unipeft_merge): a buffer, so .to() moves it
        module.register_buffer("unipeft_dense", None, persistent=False)
    module._unipeft_merged = {}
    module._unipeft_pre = ()
    module._unipeft_post = ()
    module._unipeft_replace = None
    module._unipeft_route = None
    module._unipeft_routed = ()
    return module


def uninstall_linear_site(module: nn.Module) -> None:
    """Give the module its original class back once it holds no delta."""
    if not isinstance(module, LinearSite) or len(module.unipeft_deltas):
        return
    base = [c for c in type(module).__mro__[1:] if c is not LinearSite and issubclass(c, nn.Module)][0]
    del module.unipeft_deltas
    module._buffers.pop("unipeft_dense", None)
    for attr in ("_unipeft_transposed", "_unipeft_quantized", "_unipeft_merged", "_unipeft_pre",
                 "_unipeft_post", "_unipeft_replace",
                 "_unipeft_route", "_unipeft_routed", "_unipeft_route_tables"):
        module.__dict__.pop(attr, None)
    module.__class__ = base


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight  # Conv1D stores (in, out)
    return w.shape[0], w.shape[1]


