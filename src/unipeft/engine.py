"""The injection engine: attach, activate, unmerge and detach named deltas (merging: ``merging.py``).

A *delta* is everything one ``up.attach(model, method, name=...)`` adds:
  * ``LinearDelta`` modules at linear sites (LoRA, (IA)3, adapters, task heads),
  * ``KVSource`` objects at attention sites (prefix tuning),
  * prompt sources at input sites (prompt tuning),
  * model-level modules (a prompt table, a prefix MLP) under ``model.unipeft_modules``,
  * selected base parameters trained in place (BitFit, Freeze, full fine-tuning).

Methods never touch the model directly: their ``install(view, name)`` asks a
``ModelView`` for positions and hands it the modules to put there, so the
engine alone does the bookkeeping that makes detach, activate, merge, save and
load work the same for every method. The registry lives on the model object
itself (``model.__dict__['_unipeft']``) so several models never share state.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch.nn as nn

from . import positions as pos
from .architectures import ModelMap, base_named_modules, base_named_parameters, map_model
from .config import MethodConfig
from .errors import UnipeftError, choices
from .model_parts import MODULES_ATTR, add_head, head_modules, input_stacks  # noqa: F401  (up.engine.head_modules)



@dataclasses.dataclass
class Delta:
    """The bookkeeping for one named delta."""

    name: str
    config: MethodConfig
    linear: dict[str, pos.LinearDelta] = dataclasses.field(default_factory=dict)   # site path -> delta
    attention: dict[str, pos.KVSource] = dataclasses.field(default_factory=dict)   # attention path -> source
    inputs: dict[str, object] = dataclasses.field(default_factory=dict)            # stack path -> prompt source
    hidden: dict[str, object] = dataclasses.field(default_factory=dict)            # stack path -> chosen-token source
    loss: object | None = None                                                     # a term added to the training loss
    module: nn.Module | None = None                                                # model-level parameters
    selected: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)    # param path -> original value
    trained: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)     # values while switched off
    sparse: object | None = None  # unipeft.sparse.SparseState: indices + values per tensor, for sparse deltas
    head: list[str] = dataclasses.field(default_factory=list)                      # head site paths
    merged: bool = False

    def parameters(self) -> list[nn.Parameter]:
        ps = [p for d in self.linear.values() for p in d.parameters()]
        if self.module is not None:
            ps += list(self.module.parameters())
        return ps


class Registry:
    def __init__(self, model: nn.Module):
        self.deltas: dict[str, Delta] = {}
        self.active: list[str] = []
        self.input_sites: dict[str, pos.InputSite] = {}
        self.hidden_sites: dict[str, pos.HiddenSite] = {}
        self.loss_site: pos.LossSite | None = None
        self.route = None  # the unipeft.routing.Route of an open up.route block
        self.map: ModelMap = map_model(model)
        # requires_grad of every base parameter before the first attach, restored when the last delta goes
        self.original_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}


def registry(model: nn.Module, create: bool = False) -> Registry | None:
    reg = model.__dict__.get("_unipeft")
    if reg is None and create:
        reg = Registry(model)
        model.__dict__["_unipeft"] = reg
    return reg


def _require(model: nn.Module, name: str) -> tuple[Registry, Delta]:
    reg = registry(model)
    if reg is None or not reg.deltas:
        raise UnipeftError(f"no delta named {name!r}: this model has no deltas attached")
    if name not in reg.deltas:
        raise UnipeftError(f"no delta named {name!r}; attached deltas: {choices(list(reg.deltas))}")
    return reg, reg.deltas[name]


# ---------------------------------------------------------------------------
# The view a method sees while installing itself
# ---------------------------------------------------------------------------

class ModelView:
    """What a method may do to a model: find positions and put modules there."""

    whole_model = True  # maps in no block (embeddings, an LM head) are the method's to use; not under layers=

    def __init__(self, model: nn.Module, reg: Registry, delta: Delta, tokenizer=None):
        self.model, self.reg, self.delta, self.tokenizer = model, reg, delta, tokenizer
        self.map = reg.map
        self.config = getattr(model, "config", None)

    # --- positions -------------------------------------------------------
    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    def resolve_targets(self, targets, owner: str) -> list[str]:
        from .targets import resolve

        return resolve(self.model, self.map, targets, owner)

    def add_linear(self, path: str, delta: pos.LinearDelta) -> None:
        self.delta.linear[path] = delta

    def add_attention(self, path: str, source: pos.KVSource) -> None:
        self.delta.attention[path] = source

    def add_input(self, stack_path: str, source) -> None:
        self.delta.inputs[stack_path] = source

    def add_hidden(self, stack_path: str, source) -> None:
        """Vectors at the hidden states of chosen tokens, at every block of an input stack (PASTA)."""
        self.delta.hidden[stack_path] = source

    def add_loss_term(self, term) -> None:
        """A term added to the loss the model returns in training (``positions.LossSite``: AdaMix)."""
        self.delta.loss = term

    def set_module(self, module: nn.Module) -> None:
        self.delta.module = module

    def select(self, paths: Iterable[str]) -> None:
        """Train these base parameters in place; their pretrained values are kept for detach."""
        originals = original_base_tensors(self.model, heads=True)
        for p in paths:
            self.delta.selected[p] = originals[p].detach().clone()

    def select_sparse(self, paths: Iterable[str], state) -> None:
        """Train some entries of these base parameters in place (``unipeft.sparse``): the originals are
        kept as for ``select``, the delta's own values live in ``state``, and several sparse deltas
        on one tensor add up instead of excluding each other."""
        self.select(paths)
        self.delta.sparse = state

    def base_parameters(self) -> dict[str, nn.Parameter]:
        """Base parameters (no delta parameters, no task head)."""
        head = tuple(h + "." for h in head_modules(self.model))
        return {n: p for n, p in self.model.named_parameters()
                if "unipeft_" not in n and not n.startswith(head)}

    def stacks_for_input(self) -> list[tuple[str, nn.Module, nn.Module, bool, nn.Module | None]]:
        """The stacks that read input embeddings: (path, stack, embedding, strip_output, decoder)."""
        return input_stacks(self.model)


def original_base_tensors(model: nn.Module, heads: bool = False) -> dict[str, torch.Tensor]:
    """The base parameters as they were before any delta touched them: values
    trained in place by an active selective delta and weights with a merged
    delta are replaced by the originals the engine keeps. Task heads are left
    out unless ``heads``."""
    out = {n: p for n, p in model.named_parameters() if "unipeft_" not in n}
    reg = registry(model)
    if reg is not None:
        for n in reg.active:
            out.update(reg.deltas[n].selected)
        for path, m in model.named_modules():
            if isinstance(m, pos.LinearSite) and m._unipeft_merged:
                w, b = next(iter(m._unipeft_merged.values()))  # the state before the first merge
                out[f"{path}.weight"] = w
                if b is not None:
                    out[f"{path}.bias"] = b
    if heads:
        return out
    head = tuple(h + "." for h in head_modules(model))
    return {n: t for n, t in out.items() if not n.startswith(head)}


# ---------------------------------------------------------------------------
# attach / detach
# ---------------------------------------------------------------------------

def attach(model: nn.Module, method: MethodConfig, name: str = "default", *, activate: bool = True,
           tokenizer=None) -> nn.Module:
    """Attach a new delta to ``model`` (in place) and return the same model.

    The base model is frozen; the new delta's parameters (and its own copy of
    a newly added task head) are the only trainable ones. With ``activate``
    the new delta becomes the only active one.
    """
    if not isinstance(method, MethodConfig):
        from .config import METHODS

        raise UnipeftError(f"attach expects a method config such as up.LoRA(...), got {type(method).__name__}; "
                           f"valid methods: {choices(sorted(METHODS))}")
    if not isinstance(name, str) or not name or "." in name or ":" in name:
        raise UnipeftError(f"delta name must be a non-empty string without '.' or ':', got {name!r}")
    if not isinstance(model, nn.Module):
        raise UnipeftError(f"attach expects a torch.nn.Module, got {type(model).__name__}")
    reg = registry(model, create=True)
    if name in reg.deltas:
        raise UnipeftError(f"a delta named {name!r} is already attached; detach it first or pick another name "
                           f"(attached: {choices(list(reg.deltas))})")
    delta = Delta(name, method)
    view = ModelView(model, reg, delta, tokenizer)
    try:
        from . import layers

        layers.install(method, view, name)  # with layers=: the method sees only the chosen blocks
        add_head(model, view, delta)
        _place(model, reg, delta)
        _follow_mode(model, delta)
    except BaseException:
        _unplace(model, reg, delta)
        if not reg.deltas:
            model.__dict__.pop("_unipeft", None)
        raise
    reg.deltas[name] = delta
    # freeze everything that is not a delta (the base's own parameters only: a walk over every
    # attached delta would make attaching the N-th delta cost N)
    for _, p in base_named_parameters(model):
        p.requires_grad_(False)
    for p in delta.parameters():  # off until set_active switches it on
        p.requires_grad_(False)
    if activate:
        set_active(model, [name])
    else:
        delta.trained = {} if delta.sparse is not None else {p: t.clone() for p, t in delta.selected.items()}
        set_active(model, [n for n in reg.active])
        _refresh_sites(model, reg, [delta])  # its sites learn of it (switched off)
    return model


def _place(model: nn.Module, reg: Registry, delta: Delta) -> None:
    """Put the delta's modules at their positions (inactive)."""
    name = delta.name
    for path, d in delta.linear.items():
        site = pos.install_linear_site(model.get_submodule(path))
        ref = site.weight
        if not ref.is_floating_point():  # a quantized map (packed bytes): its inputs have the model's float dtype
            ref = next((p for p in model.parameters() if p.is_floating_point() and p.device == ref.device), ref)
        d.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        site.unipeft_deltas[name] = d
        site.unipeft_refresh(reg.active)
    if delta.module is not None:
        holder = getattr(model, MODULES_ATTR, None)
        if holder is None:
            holder = nn.ModuleDict()
            model.add_module(MODULES_ATTR, holder)
        ref = next(p for p in model.parameters() if p.is_floating_point())
        delta.module.to(device=ref.device, dtype=ref.dtype)  # deltas follow the base's dtype
        holder[name] = delta.module
    if delta.attention:
        pos.enable_attention_sites(model)
        for path, src in delta.attention.items():
            pos.attention_site(model.get_submodule(path), create=True).sources[name] = src
    for path, src in delta.inputs.items():
        site = reg.input_sites.get(path)
        if site is None:
            for spath, stack, embed, strip, dec in input_stacks(model):
                if spath == path:
                    site = pos.InputSite(stack, embed, strip, dec)
                    reg.input_sites[path] = site
        site.sources[name] = src
    for path, src in delta.hidden.items():
        if path not in reg.hidden_sites:
            stack, embed = next((s, e) for p, s, e, _, _ in input_stacks(model) if p == path)
            reg.hidden_sites[path] = pos.HiddenSite(stack, embed, pos.blocks_under(model, reg.map, path))
        reg.hidden_sites[path].sources[name] = src
    if delta.loss is not None:
        if reg.loss_site is None:
            reg.loss_site = pos.LossSite(model)
        reg.loss_site.sources[name] = delta.loss


def _follow_mode(model: nn.Module, delta: Delta) -> None:
    """New modules are built in training mode. A delta attached to a model in eval mode (what
    ``from_pretrained`` returns; ``up.load`` attaches too) must not run its dropout, random gates or
    rank draws there: each of its modules takes the mode of the module it sits in."""
    for path in delta.linear:
        site = model.get_submodule(path)
        site.unipeft_deltas.train(site.training)
    if delta.module is not None:
        getattr(model, MODULES_ATTR).train(model.training)


def _unplace(model: nn.Module, reg: Registry, delta: Delta) -> None:
    name = delta.name
    for path in delta.linear:
        try:
            site = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(site, pos.LinearSite) and name in site.unipeft_deltas:
            site.unipeft_unmerge(name)
            del site.unipeft_deltas[name]
            site.unipeft_refresh([n for n in reg.active if n != name])
            pos.uninstall_linear_site(site)
    holder = getattr(model, MODULES_ATTR, None)
    if holder is not None and name in holder:
        del holder[name]
        if not len(holder):
            delattr(model, MODULES_ATTR)
    any_attention = False
    for path in delta.attention:
        site = pos.attention_site(model.get_submodule(path))
        if site is not None:
            site.sources.pop(name, None)
            site.refresh([n for n in reg.active if n != name])
            if not site.sources:
                model.get_submodule(path).__dict__.pop("_unipeft_kv", None)
    for _, m in base_named_modules(model):
        if m.__dict__.get("_unipeft_kv") is not None:
            any_attention = True
            break
    if delta.attention and not any_attention:
        pos.disable_attention_sites(model)
    for path in delta.inputs:
        site = reg.input_sites.get(path)
        if site is not None:
            site.sources.pop(name, None)
            site.refresh([n for n in reg.active if n != name])
            if not site.sources:
                site.remove()
                del reg.input_sites[path]
    for path in delta.hidden:
        site = reg.hidden_sites.get(path)
        if site is not None:
            site.sources.pop(name, None)
            site.refresh([n for n in reg.active if n != name])
            if not site.sources:
                site.remove()
                del reg.hidden_sites[path]
    if delta.loss is not None and reg.loss_site is not None:
        reg.loss_site.sources.pop(name, None)
        reg.loss_site.refresh([n for n in reg.active if n != name])
        if not reg.loss_site.sources:
            reg.loss_site.remove()
            reg.loss_site = None


def detach(model: nn.Module, name: str) -> nn.Module:
    """Remove a delta completely; with no delta left the model is the untouched base again."""
    reg, delta = _require(model, name)
    if delta.merged:
        unmerge(model, name)
    if name in reg.active:
        set_active(model, [n for n in reg.active if n != name])
    _unplace(model, reg, delta)
    del reg.deltas[name]
    if not reg.deltas:
        params = dict(model.named_parameters())
        for n, flag in reg.original_requires_grad.items():
            if n in params:
                params[n].requires_grad_(flag)
        model.__dict__.pop("_unipeft", None)
    return model


# ---------------------------------------------------------------------------
# activate
# ---------------------------------------------------------------------------

def set_active(model: nn.Module, names: list[str]) -> None:
    """Switch on exactly ``names`` (in that order); everything else is off."""
    reg = registry(model)
    if reg is None:
        raise UnipeftError("this model has no deltas attached; use up.attach first")
    if isinstance(names, str):
        names = [names]
    names = list(names)
    for n in names:
        if n not in reg.deltas:
            raise UnipeftError(f"no delta named {n!r}; attached deltas: {choices(list(reg.deltas))}")
    if len(set(names)) != len(names):
        raise UnipeftError(f"delta names repeat in {names!r}")
    for n, d in reg.deltas.items():
        if d.merged and n not in names:
            raise UnipeftError(f"delta {n!r} is merged into the base weights; unmerge it before switching it off")
    seen: dict[str, str] = {}
    for n in names:
        for p in reg.deltas[n].selected:
            if p in seen and (reg.deltas[seen[p]].sparse is None or reg.deltas[n].sparse is None):
                raise UnipeftError(f"deltas {seen[p]!r} and {n!r} both train parameter {p!r} in place; "
                                   f"they cannot be active together")
            seen[p] = n
    # Only the deltas that were or will be active change state (every other one is off and stays
    # off: attach switches a new delta off), so the cost follows the active ones, not all attached.
    changed = [reg.deltas[n] for n in dict.fromkeys([*reg.active, *names])]
    param = model.get_parameter
    with torch.no_grad():
        from . import sparse  # sparse deltas keep their own values; their tensors are recomposed below
        sparse.sync(model, reg)
        # selective deltas: put the originals back for those going off, then the trained values of those going on
        for n in reg.active:
            if n not in names:
                d = reg.deltas[n]
                for p, orig in ({} if d.sparse is not None else d.selected).items():
                    d.trained[p] = param(p).detach().clone()
                    param(p).copy_(orig)
                    param(p).requires_grad_(False)
        for n in names:
            if n not in reg.active:
                d = reg.deltas[n]
                for p in ({} if d.sparse is not None else d.selected):
                    if p in d.trained:
                        param(p).copy_(d.trained[p])
                d.trained = {}
    reg.active = names
    for d in sorted(changed, key=lambda d: d.name in names):  # off first: sparse deltas share tensors
        on = d.name in names
        for p in d.parameters():
            p.requires_grad_(on and not d.merged)
        for p in d.selected:
            param(p).requires_grad_(on and not d.merged)
    _refresh_sites(model, reg, changed)
    if any(d.sparse is not None for d in reg.deltas.values()):
        sparse.compose(model, reg)  # original + the active sparse deltas' values, gradients masked


def _refresh_sites(model: nn.Module, reg: Registry, changed: list[Delta] | None = None) -> None:
    """Tell the sites of ``changed`` (default: every delta) which deltas are active now; a site
    that holds none of them keeps its active set."""
    changed = list(reg.deltas.values()) if changed is None else changed
    for p in {p for d in changed for p in d.linear}:
        model.get_submodule(p).unipeft_refresh(reg.active)
    for p in {p for d in changed for p in d.attention}:
        pos.attention_site(model.get_submodule(p)).refresh(reg.active)
    for site in reg.input_sites.values():
        site.refresh(reg.active)
    for site in reg.hidden_sites.values():
        site.refresh(reg.active)
    if reg.loss_site is not None:
        reg.loss_site.refresh(reg.active)


def active(model: nn.Module) -> list[str]:
    reg = registry(model)
    return list(reg.active) if reg else []


def deltas(model: nn.Module) -> dict[str, MethodConfig]:
    reg = registry(model)
    return {n: d.config for n, d in reg.deltas.items()} if reg else {}


# ---------------------------------------------------------------------------
# unmerge (merge and its checks: merging.py)
# ---------------------------------------------------------------------------

def unmerge(model: nn.Module, name: str) -> nn.Module:
    """Undo ``merge``: the base weights are restored bit for bit."""
    reg, delta = _require(model, name)
    if not delta.merged:
        return model
    for path in delta.linear:
        model.get_submodule(path).unipeft_unmerge(name)
    delta.merged = False
    params = dict(model.named_parameters())
    for p in delta.parameters():
        p.requires_grad_(True)
    for p in delta.selected:
        params[p].requires_grad_(True)
    _refresh_sites(model, reg)
    return model


# ---------------------------------------------------------------------------
# counting
# ---------------------------------------------------------------------------

def base_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "unipeft_" not in n)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) over all parameters of the model, deltas included."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def delta_parameter_count(model: nn.Module, delta: Delta) -> int:
    params = dict(model.named_parameters())
    n = sum(p.numel() for p in delta.parameters())
    n += delta.sparse.count() if delta.sparse is not None else sum(params[p].numel() for p in delta.selected)
    return n


def summary(model: nn.Module) -> str:
    """A table of the attached deltas: name, method, type, parameters, % of the base."""
    reg = registry(model)
    base = base_parameter_count(model)
    rows = [("delta", "method", "type", "params", "% of base", "state")]
    if reg:
        for n, d in reg.deltas.items():
            cnt = delta_parameter_count(model, d)
            state = "merged" if d.merged else ("active" if n in reg.active else "off")
            rows.append((n, d.config.kind, d.config.method_type, f"{cnt:,}", f"{100 * cnt / base:.4f}", state))
    trainable, total = trainable_parameters(model)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"base parameters: {base:,}; trainable now: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")
    return "\n".join(lines)
