"""Merging: fold a delta into the base weights (``up.merge``), for now or for good (``unload=True``).

``unmerge`` (which restores the originals bit for bit) lives in ``engine``, since ``detach`` needs it;
this module adds the checks that make a merge exact or refuse it with nothing changed: the delta
must sit next to the base map in each site's chain (``_check_merge_order``), and an unload must leave
something a plain transformers model can hold (``_check_unloadable``, ``_added_biases``).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .engine import Delta, Registry, _refresh_sites, _require, detach, registry, unmerge
from .errors import UnipeftError, choices


def merge(model: nn.Module, name: str, unload: bool = False) -> nn.Module:
    """Fold a delta into the base weights: zero inference overhead, same outputs; ``unmerge`` undoes it.

    ``unload=True`` folds it in for good (peft's ``merge_and_unload``): the delta is removed as
    ``detach`` removes it, but its change stays in the base weights, so with no delta left the model
    is a plain transformers model again (its own classes and state dict keys: ``save_pretrained``
    writes a checkpoint that transformers loads alone). Refused, with nothing changed, where the
    result could not be such a model or could not be undone consistently: quantized linear maps, a
    bias the base has no place for (BitFit on a bias-free model), another delta merged at the time."""
    reg, delta = _require(model, name)
    if not type(delta.config).mergeable:
        from .config import METHODS

        ok = sorted(k for k, c in METHODS.items() if c.mergeable)
        raise UnipeftError(f"delta {name!r} ({delta.config.kind}) cannot be merged: it adds computation that is not "
                           f"a change of weights; mergeable methods: {choices(ok)}")
    if unload:
        _check_unloadable(model, reg, delta)
    was_merged = delta.merged
    if not delta.merged:
        if name not in reg.active:
            raise UnipeftError(f"delta {name!r} is not active; activate it before merging (active: {reg.active})")
        _check_merge_order(model, delta)
        for path in delta.linear:
            model.get_submodule(path).unipeft_merge(name)
        delta.merged = True
        for p in delta.parameters():
            p.requires_grad_(False)
        params = dict(model.named_parameters())
        for p in delta.selected:
            params[p].requires_grad_(False)
        _refresh_sites(model, reg)
        added = _added_biases(model, delta)
        if added and not unload:
            warnings.warn(f"up.merge: delta {name!r} added a bias to {len(added)} linear map(s) that had none, so "
                          f"the model's state dict now holds {len(added)} more tensor(s); up.unmerge removes them",
                          stacklevel=2)
    if unload:
        added = _added_biases(model, delta)
        if added:
            if not was_merged:
                unmerge(model, name)  # as it was: nothing changed
            raise UnipeftError(f"up.merge(unload=True): delta {name!r} adds biases to linear maps that have none "
                               f"(e.g. {added[0]!r}); the model's architecture has no place for them, so a plain model "
                               f"could not hold the result. Merge without unload (up.merge keeps the delta), or use "
                               f"a method that changes weights only")
        _unload(model, reg, delta)
    return model


def _added_biases(model: nn.Module, delta: Delta) -> list[str]:
    """The maps where merging ``delta`` put a bias the base did not have (BitFit on a bias-free model):
    the map has one now, and the originals kept for unmerge have none (embeddings have no bias)."""
    return [p for p in delta.linear if getattr(model.get_submodule(p), "bias", None) is not None
            and model.get_submodule(p)._unipeft_merged.get(delta.name, (None, None))[1] is None]


def _check_merge_order(model: nn.Module, delta: Delta) -> None:
    """A delta folds into W exactly only where it is next to the base map in its site's chain
    (``LinearSite.forward``: input-rewriting deltas, then W, then output deltas in activation order,
    each reading the map's original input x). Merged elsewhere it would change the outputs: an output
    delta after another (IA3 scaling y after LoRA added to it), or one that reads x while an input
    delta rewrites what W sees (LoRA beside (IA)3's FFN scaling, which scales W's input only)."""
    for path in delta.linear:
        site = model.get_submodule(path)
        d = site.unipeft_deltas[delta.name]
        pre = tuple(p for p in site._unipeft_pre if not p.keeps_input or p is d)
        post = site._unipeft_post
        between = []
        if d.rewrites_input:
            between += list(pre[pre.index(d) + 1:])             # input deltas closer to W
        if d.rewrites_output or d.replaces_base or not d.rewrites_input:
            between += [p for p in pre if p is not d]           # what W sees is not what d reads
            between += list(post[:post.index(d)] if d in post else ())   # output deltas before it
        if site._unipeft_replace is not None and site._unipeft_replace is not d:
            between.append(site._unipeft_replace)
        if between:
            names = [n for n, other in site.unipeft_deltas.items() if any(other is b for b in between)]
            raise UnipeftError(f"merging delta {delta.name!r} into {path!r} would change the outputs: delta(s) "
                               f"{choices(names)} are active there and compose with it (an input delta changes "
                               f"what the weight sees, an output delta before it changes what it adds to). Merge "
                               f"them first, or switch them off")


def _check_unloadable(model: nn.Module, reg: Registry, delta: Delta) -> None:
    others = [n for n, d in reg.deltas.items() if d.merged and d is not delta]
    if others:
        raise UnipeftError(f"up.merge(unload=True): delta(s) {choices(others)} are merged too; unmerging them later "
                           f"would restore weights from before {delta.name!r}. Unmerge them first (or unload them)")
    quantized = [p for p in delta.linear if getattr(model.get_submodule(p), "_unipeft_quantized", 0)]
    if quantized:
        bits = model.get_submodule(quantized[0])._unipeft_quantized
        raise UnipeftError(f"up.merge(unload=True): the linear maps of delta {delta.name!r} are {bits}-bit quantized "
                           f"(e.g. {quantized[0]!r}); the merged weights cannot go back into them without a second "
                           f"rounding. Merge without unload (the maps then compute with dequantised weights), or "
                           f"load the base unquantized and attach the delta there")


def _unload(model: nn.Module, reg: Registry, delta: Delta) -> None:
    """Remove a merged delta, keeping what it changed in the base tensors."""
    for path in delta.linear:  # forget the originals: detach's unmerge then leaves the merged weights
        model.get_submodule(path)._unipeft_merged.pop(delta.name, None)
    # tensors trained in place (selective and sparse deltas): detach puts their originals back, so
    # their merged values are kept and written again afterwards
    touched = dict.fromkeys([*delta.selected, *(delta.sparse.values if delta.sparse is not None else ())])
    params = dict(model.named_parameters())
    merged_values = {p: params[p].detach().clone() for p in touched}
    detach(model, delta.name)
    params = dict(model.named_parameters())
    rest = registry(model)
    with torch.no_grad():
        for p, value in merged_values.items():
            change = value - params[p]   # what this delta added (other deltas' values stay theirs)
            params[p].copy_(value)       # exactly the merged value (original + change may round otherwise)
            for d in (rest.deltas.values() if rest is not None else ()):
                if p in d.selected:      # the others' "original" is the new base
                    d.selected[p] = d.selected[p] + change.to(d.selected[p].device)
