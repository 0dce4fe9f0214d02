"""Resolve a method's ``targets`` to the linear modules of a concrete model.

A target is one of:
  * a named group: "attention" (q, k, v, o), "ffn" / "mlp" (FFN in and out), "all-linear"
    (every linear map inside the transformer blocks);
  * a role from the architecture table: "q", "k", "v", "o", "ffn_in", "ffn_out"
    (and the aliases "query", "key", "value");
  * a regular expression, matched against the whole module path, when it
    contains any of ^ $ * + ? [ ] ( ) | \\ ;
  * otherwise a module-name suffix: "query" matches "bert.encoder.layer.0.attention.self.query".
Only linear maps (nn.Linear, GPT-2 Conv1D) inside the blocks are candidates,
so task heads and embeddings are never picked up by accident.
"""
from __future__ import annotations

import re

import torch.nn as nn

from .architectures import ALIASES, GROUPS, ROLES, ModelMap, iter_linear_modules
from .errors import UnipeftError, choices

_REGEX_CHARS = set("^$*+?[]()|\\")


def resolve(model: nn.Module, mmap: ModelMap, targets, owner: str) -> list[str]:
    """Module paths matched by ``targets`` (order: model order). Raises if nothing matches."""
    candidates = dict(iter_linear_modules(model, mmap.blocks))
    chosen: set[str] = set()
    for t in targets:
        hits = _match_one(t, candidates, mmap)
        if not hits:
            roles_here = sorted({r for rs in mmap.roles.values() for r in rs})
            example = sorted({p.split(".")[-1] for p in candidates})[:12]
            raise UnipeftError(
                f"{owner}: target {t!r} matches no linear module in {mmap.model_type!r}; "
                f"valid groups: {choices(sorted(GROUPS) + ['all-linear'])}, roles: {choices(roles_here)}, "
                f"or a module-name suffix such as {choices(example)}"
            )
        chosen.update(hits)
    return [p for p in candidates if p in chosen]


def _match_one(t: str, candidates: dict, mmap: ModelMap) -> list[str]:
    if t == "all-linear":
        return list(candidates)
    if t in GROUPS:
        return [p for p in candidates if mmap.roles.get(p, set()) & set(GROUPS[t])]
    role = ALIASES.get(t, t)
    if role in ROLES:
        hits = [p for p in candidates if role in mmap.roles.get(p, set())]
        if hits:
            return hits
    if _REGEX_CHARS & set(t):
        try:
            rx = re.compile(t)
        except re.error as e:
            raise UnipeftError(f"target {t!r} is not a valid regular expression: {e}") from None
        return [p for p in candidates if rx.fullmatch(p)]
    return [p for p in candidates if p == t or p.endswith("." + t)]
