"""Per-example routing: row i of a batch runs with the delta named at i.

    with up.route(model, ["sst2", "news", None, "sst2"]):
        logits = model(**batch).logits          # or model.generate(...)

Each task is a delta, not a model (seed 000: "each task is a prompt, not a model"; (IA)3 "must
allow for mixed-task batches"), so one base serves a batch that mixes tasks and methods: row 0 on
a LoRA delta, row 1 on a prompt-tuned one, row 2 on (IA)3, row 3 (``None``) on the bare base.
Outside the block the model is exactly as before (its active deltas); it is restored also when
the forward raises.

How it works. ``route`` hands every site that holds a routed delta a ``Route`` (one name per
row). Each position applies each of its deltas to the rows routed to it:

* linear sites (LoRA, adapters, (IA)3, task heads): the base map runs once on the whole batch;
  the deltas of one class at a site are handed over together (``LinearDelta.routed_output``),
  so LoRA gathers per-row factors into one batched product and (IA)3 gathers per-row scale
  vectors; any other class runs on its own rows (index_select, the delta, index_copy);
* attention sites (prefix tuning): per-row prefixes, padded to the longest with hidden columns;
* input sites (prompt tuning): per-row prompts laid out as [P_i, x_i, padding], so every row's
  positions are its own;
* bias terms trained in place (BitFit): a per-row bias difference added after the module.

The work is that of each delta on its own rows; nothing loops over rows in Python. A batch that
``generate`` expands (beam search, several sequences per prompt) repeats each row k times in a
row (``repeat_interleave``, as transformers does), and the route follows.

A new position supports routing by giving its site a ``unipeft_route(route)`` method (None
resets it) that keeps the routed names it holds, and by applying delta ``name`` to
``route.rows(name, batch_size, device)`` in its forward; then list the site in ``_sites``
below. Methods whose parameters are the base model's own weights trained in place (layer
freezing, full fine-tuning) cannot route without a copy of those weights per row, and say so.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from . import positions as pos
from .errors import UnipeftError, choices


class Route:
    """The assignment of a batch's rows to deltas: ``names[i]`` (or None for the base) for row i."""

    def __init__(self, names: Sequence[str | None]):
        self.names = tuple(names)
        self.batch = len(self.names)
        self.order = list(dict.fromkeys(n for n in self.names if n is not None))  # distinct deltas
        self._rows: dict[tuple, torch.Tensor] = {}
        self._slots: dict[tuple, torch.Tensor] = {}

    def rows(self, name: str, n: int, device, where=None) -> torch.Tensor:
        """The indices of the rows routed to ``name`` in a batch of n = k * batch rows (each
        example repeated k times in a row, as ``generate`` expands for beams)."""
        key = (name, n, device)
        rows = self._rows.get(key)
        if rows is None:
            k = self._repeats(n, where)
            mine = [i for i, m in enumerate(self.names) if m == name]
            base = torch.tensor(mine, dtype=torch.long)
            rows = (base[:, None] * k + torch.arange(k)[None, :]).reshape(-1).to(device)
            self._rows[key] = rows
        return rows

    def _repeats(self, n: int, where=None) -> int:
        """k for a batch of n = k * batch rows; a clear error for any other size."""
        if n % self.batch:
            at = f" (at {type(where).__name__})" if where is not None else ""
            # (a multiple is fine: generate repeats each example for beams and sequences)
            raise UnipeftError(f"up.route was given {self.batch} names but the model ran a batch of {n} "
                               f"rows{at}: give one name per example of the batch")
        return n // self.batch

    def slots(self, index: dict[str, int], n: int, device) -> torch.Tensor:
        """(n,) per row: ``index[name]`` for the row's delta, 0 where its delta is not in ``index``
        (or the row is on the base): the row of a stacked table each row reads."""
        key = (tuple(index.items()), n, device)
        slot = self._slots.get(key)
        if slot is None:
            per_example = torch.tensor([index.get(m, 0) if m is not None else 0 for m in self.names], dtype=torch.long)
            slot = per_example.repeat_interleave(self._repeats(n)).to(device)
            self._slots[key] = slot
        return slot


def _sites(model: nn.Module, reg, route: Route) -> list:
    """The sites that hold a routed or an active delta (linear, attention, input). All of them
    route, also those holding no routed delta: under a route, a site ignores its active deltas.
    (Sites of the other deltas apply nothing now and need no route: a server with hundreds of
    deltas attached pays for the batch's, not for all of them.)"""
    deltas = [reg.deltas[n] for n in dict.fromkeys([*route.order, *reg.active])]
    sites = [model.get_submodule(p) for p in sorted({p for d in deltas for p in d.linear})]
    for p in sorted({p for d in deltas for p in d.attention}):
        sites.append(pos.attention_site(model.get_submodule(p)))
    return sites + list(reg.input_sites.values()) + list(reg.hidden_sites.values()) + \
        ([reg.loss_site] if reg.loss_site is not None else [])


# ---------------------------------------------------------------------------
# Bias terms trained in place (BitFit): per-row bias differences
# ---------------------------------------------------------------------------

def _bias_module(model: nn.Module, param: str) -> nn.Module | None:
    """The module whose output adds bias ``param`` on its last dimension (linear maps, GPT-2's
    Conv1D, layer norms), or None when ``param`` is not such a bias."""
    path, _, leaf = param.rpartition(".")
    if leaf != "bias":
        return None
    module = model.get_submodule(path)
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, (nn.Linear, nn.LayerNorm, Conv1D)):
        return module
    return None


class _BiasRoute:
    """A forward hook adding row i's bias difference (trained - original) after one module."""

    def __init__(self, route: Route, module: nn.Module, diffs: list[tuple[str, torch.Tensor]]):
        self.route, self.module = route, module
        self.table = torch.stack([torch.zeros_like(diffs[0][1])] + [d for _, d in diffs])  # row 0: no change
        self.index = {name: i + 1 for i, (name, _) in enumerate(diffs)}
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        if torch.is_grad_enabled() and module.training:
            raise UnipeftError("BitFit deltas route for inference only: their biases are trained in place, so a "
                               "routed training step cannot reach them; train BitFit alone (up.activate) or call "
                               "model.eval() / torch.no_grad() for routed inference")
        slot = self.route.slots(self.index, output.shape[0], output.device)
        diff = pos.linear.per_row(self.table.to(output.device, output.dtype), slot, output)
        if torch.is_grad_enabled() and output.requires_grad:
            return output + diff
        return output.add_(diff)  # a module's fresh output, not yet seen by anyone: no copy needed


def _check_routable(model: nn.Module, reg, order: list[str]) -> None:
    """A clear error for routed deltas that train base weights other than bias terms in place
    (layer freezing, full fine-tuning)."""
    for name in order:
        delta = reg.deltas[name]
        # a composition routes only if each of its parts does (up.Compose, MAM, UniPELT: config.methods)
        unroutable = [c for c in (delta.config, *getattr(delta.config, "methods", ())) if not type(c).routable]
        if unroutable:  # freezing, full fine-tuning, sparse deltas, new tokens
            c = unroutable[0]
            why = getattr(type(c), "route_refusal", None) or (  # NewTokens says why it cannot
                "changes the base model's own weights in place; routing it per example would need a copy "
                "of those weights for every row")
            what = delta.config.kind if c is delta.config else f"{delta.config.kind}, whose part {c.kind}"
            raise UnipeftError(f"up.route: delta {name!r} ({what}) {why}. {_routable_methods()}")
        for param in delta.selected:
            if _bias_module(model, param) is None:
                raise UnipeftError(
                    f"up.route: delta {name!r} ({delta.config.kind}) trains the base model's own weights in place "
                    f"({param!r}); routing it per example would need a copy of those weights for every row. "
                    f"{_routable_methods()}")


def _routable_methods() -> str:
    from .config import METHODS

    return f"Methods that route: {choices(sorted(k for k, c in METHODS.items() if c.routable))}"


def _bias_routes(model: nn.Module, reg, route: Route) -> list[_BiasRoute]:
    """Hooks for the routed deltas that train bias terms in place. Called with every delta off,
    so each delta's trained values are in ``delta.trained`` and the model holds the originals."""
    per_module: dict[str, list] = {}
    for name in route.order:
        delta = reg.deltas[name]
        for param, original in delta.selected.items():
            trained = delta.trained.get(param, original)
            per_module.setdefault(param.rpartition(".")[0], []).append((name, (trained - original).detach()))
    return [_BiasRoute(route, model.get_submodule(path), diffs) for path, diffs in per_module.items()]


# ---------------------------------------------------------------------------
# The context manager
# ---------------------------------------------------------------------------

def _check(model: nn.Module, names) -> tuple:
    from .engine import registry

    reg = registry(model)
    if reg is None or not reg.deltas:
        raise UnipeftError("up.route: this model has no deltas attached; use up.attach or up.load first")
    if isinstance(names, str) or not isinstance(names, Sequence) or not len(names):
        raise UnipeftError(f"up.route expects one delta name (or None for the base) per example of the batch, "
                           f"as a non-empty list; got {names!r}")
    for n in names:
        if n is not None and n not in reg.deltas:
            raise UnipeftError(f"up.route: no delta named {n!r}; attached deltas: {choices(list(reg.deltas))} "
                               f"(or None for the base model)")
    merged = [n for n, d in reg.deltas.items() if d.merged]
    if merged:
        raise UnipeftError(f"up.route: delta {merged[0]!r} is merged into the base weights, so every row would get "
                           f"it; up.unmerge(model, {merged[0]!r}) before routing")
    if getattr(reg, "route", None) is not None:
        raise UnipeftError("up.route: this model is already inside an up.route block; blocks do not nest")
    return reg


@contextlib.contextmanager
def route(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, row i of every batch the model runs uses delta ``names[i]`` (None: the base).

    The routed deltas' own parameters keep their gradients, so a routed batch can also train
    several deltas at once (BitFit excepted: its biases are trained in place). Merged deltas
    cannot route (unmerge them first). See the module docstring for how each position routes.
    """
    from .engine import set_active

    reg = _check(model, names)
    the_route = Route(names)
    _check_routable(model, reg, the_route.order)  # refuse before touching anything
    saved = list(reg.active)
    # deltas trained in place (BitFit) put their originals back; routed rows get their own below
    in_place = any(reg.deltas[n].selected for n in saved)
    routed_params = [p for n in the_route.order for p in reg.deltas[n].parameters()]
    grads = [p.requires_grad for p in routed_params]
    sites, hooks = [], []
    try:
        if in_place:
            set_active(model, [n for n in saved if not reg.deltas[n].selected])
        reg.route = the_route
        for p, g in zip(routed_params, grads):  # a routed batch may train the routed deltas
            if not g:
                p.requires_grad_(True)
        hooks = _bias_routes(model, reg, the_route)
        sites = _sites(model, reg, the_route)
        for site in sites:
            site.unipeft_route(the_route)
        yield model
    finally:
        for site in sites:
            site.unipeft_route(None)
        for h in hooks:
            h.handle.remove()
        for p, g in zip(routed_params, grads):
            if not g:
                p.requires_grad_(False)
        reg.route = None
        if in_place:
            set_active(model, saved)
