"""Attention keys and values as a position: prefix tuning, through transformers' attention
interface (never the KV cache). See the package docstring."""
from __future__ import annotations

import math
import sys
from typing import Callable

import torch
import torch.nn as nn

from ..errors import UnipeftError


# ---------------------------------------------------------------------------
# Attention keys and values
# ---------------------------------------------------------------------------

_ATTN_PREFIX = "unipeft_"


class KVSource:
    """Something that yields prefix keys/values for one attention module."""

    def prefix_kv(self, batch: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each (batch, kv_heads, p, head_dim)."""
        raise NotImplementedError

    def query_gate(self) -> torch.Tensor | None:
        """None, or gates (batch, queries) for the current call: query i then sees this prefix's keys
        and values scaled by gate[:, i] (UniPELT's per-token prefix gate; see ``_gated_attention``)."""
        return None


class AttentionSite:
    """Prefix keys/values for one attention module, held outside the module tree.

    Stored in the module's ``__dict__`` (not as a child) because the tensors
    belong to a model-level delta that produces all layers at once.
    """

    def __init__(self):
        self.sources: dict[str, KVSource] = {}
        self.active: tuple[KVSource, ...] = ()
        self.capture: list | None = None  # when a list, the attention call appends (key, value) to it
        self.route = None
        self.routed: tuple = ()

    def refresh(self, active: list[str]) -> None:
        self.active = tuple(self.sources[n] for n in active if n in self.sources)

    def unipeft_route(self, route) -> None:
        """Route rows to prefixes (``unipeft.routing.Route``), or None to go back to the active ones."""
        self.route = route
        self.routed = () if route is None else tuple((n, self.sources[n]) for n in route.order if n in self.sources)


def attention_site(module: nn.Module, create=False) -> AttentionSite | None:
    site = module.__dict__.get("_unipeft_kv")
    if site is None and create:
        site = AttentionSite()
        module.__dict__["_unipeft_kv"] = site
    return site


def _base_attention(module: nn.Module, base: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise UnipeftError(f"{type(module).__name__} has no eager_attention_forward; use attn_implementation='sdpa'")
        return fn
    return ALL_ATTENTION_FUNCTIONS[base]


def _pad_mask(mask: torch.Tensor | None, p: int, query: torch.Tensor, key_len: int, module,
              implementation: str, visible: torch.Tensor | None = None) -> torch.Tensor | None:
    """Extend an attention mask by p columns on the left: always visible, or, when routing gives
    rows prefixes of different lengths, visible where ``visible`` (batch, p) is True."""
    q_len, n = query.shape[2], query.shape[0]
    if mask is None:
        if visible is None and (not getattr(module, "is_causal", False) or q_len == 1
                                or implementation.startswith("flash")):
            # no mask means "see every key", or flash attention's bottom-right causal alignment,
            # which already lets every query see a prefix placed on the left
            return None
        if implementation.startswith("flash"):
            mask = torch.ones(n, key_len, dtype=torch.long, device=query.device)
        else:
            # the base implementation would call sdpa with is_causal (top-left aligned: key j <= query
            # i) or with no mask; with the prefix in front that needs an explicit mask
            i = torch.arange(q_len, device=query.device)[:, None]
            j = torch.arange(key_len, device=query.device)[None, :]
            causal = getattr(module, "is_causal", False) and q_len > 1
            mask = ((j <= i) if causal else (j >= 0)).expand(q_len, key_len)[None, None]
    if mask.dim() == 2:  # (batch, kv): flash-attention style padding mask
        pad = mask.new_ones(mask.shape[0], p) if visible is None else visible.to(mask.dtype)
        return torch.cat([pad, mask], dim=1)
    if visible is None:
        pad_shape = (*mask.shape[:-1], p)
        pad = mask.new_ones(pad_shape) if mask.dtype == torch.bool else mask.new_zeros(pad_shape)
        return torch.cat([pad, mask], dim=-1)
    mask = mask.expand(n, *mask.shape[1:])
    see = visible[:, None, None, :].expand(n, mask.shape[1], mask.shape[2], p)
    if mask.dtype == torch.bool:
        pad = see
    else:
        pad = torch.full(see.shape, torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device)
        pad = pad.masked_fill(see, 0)
    return torch.cat([pad, mask], dim=-1)


def _routed_prefix(site, n: int, key: torch.Tensor, q_len: int):
    """(keys, values, visible, gate) of the prefixes routed to each row, padded to the longest with
    hidden columns (gate: (n, q_len), ones for rows whose prefix has none; None when no prefix has
    one); None when no row of this batch has a prefix here."""
    route = site.route
    items = [(src, route.rows(name, n, key.device, where=site)) for name, src in site.routed]
    items = [(src, rows) for src, rows in items if rows.numel()]
    if not items:
        return None
    kvs = [(src.prefix_kv(len(rows), key.dtype, key.device), rows) for src, rows in items]
    p = max(k.shape[2] for (k, _), _ in kvs)
    heads, dim = kvs[0][0][0].shape[1], kvs[0][0][0].shape[3]
    pk = key.new_zeros(n, heads, p, dim)
    pv = key.new_zeros(n, heads, p, dim)
    visible = torch.zeros(n, p, dtype=torch.bool, device=key.device)
    gate = None
    for ((k, v), rows), (src, _) in zip(kvs, items):
        pad = (0, 0, 0, p - k.shape[2])
        pk = pk.index_copy(0, rows, torch.nn.functional.pad(k, pad))
        pv = pv.index_copy(0, rows, torch.nn.functional.pad(v, pad))
        visible[rows, :k.shape[2]] = True
        g = src.query_gate()
        if g is not None:  # each row has one prefix: one gate per row and query, 1 where ungated
            gate = torch.ones(n, q_len, dtype=key.dtype, device=key.device) if gate is None else gate
            gate = gate.index_copy(0, rows, _check_gate(g, len(rows), q_len).to(key.dtype))
    return pk, pv, visible, gate


def _check_gate(gate: torch.Tensor, batch: int, q_len: int) -> torch.Tensor:
    if tuple(gate.shape) != (batch, q_len):
        raise UnipeftError(f"a gated prefix has gates of shape {tuple(gate.shape)} for an attention call with "
                           f"{batch} rows of {q_len} queries (its gate did not see this call's input)")
    return gate


def _gated_attention(fn, module, query, key, value, attention_mask, kwargs, pks, pvs, gates):
    """The base attention with each gated prefix's keys and values scaled by its gate per query,
    exactly (query i sees g_i P_K, g_i P_V, as if every query had a prefix of its own).

    Per-query keys do not fit one attention call, so the head dimension is widened: one slot for the
    real keys and ungated prefixes, one more per gated prefix. The query is [q | g_1 q | ...], a key
    lives in its own slot with zeros elsewhere, so q.k is unchanged for the real keys and g_i (q.P_K)
    for prefix i; the softmax still runs over all keys together. The values are slotted the same way
    and the output is slot 0 + sum_i g_i slot_i. The base implementation (eager, sdpa, ...) runs
    unchanged: masks, dropout, soft-capping and returned weights keep their shapes."""
    d, dv, q_len, heads = query.shape[-1], value.shape[-1], query.shape[2], query.shape[1]
    slot_of, qs = {}, [query]
    for i, g in enumerate(gates):
        if g is not None:
            slot_of[i] = len(qs)
            qs.append(query * _check_gate(g, query.shape[0], q_len).to(query.dtype)[:, None, :, None])
    n = len(qs)

    def slotted(t, slot, width):  # t in slot ``slot`` of n, zeros in the others
        return torch.nn.functional.pad(t, (slot * width, (n - 1 - slot) * width))

    new_query = torch.cat(qs, dim=-1)
    if kwargs.get("scaling") is None:
        # the base's default scale, 1/sqrt(head dim), would read the widened width n*d
        new_query = new_query * math.sqrt(n)
    new_key = torch.cat([slotted(k, slot_of.get(i, 0), d) for i, k in enumerate(pks)] + [slotted(key, 0, d)], dim=2)
    new_value = torch.cat([slotted(v, slot_of.get(i, 0), dv) for i, v in enumerate(pvs)]
                          + [slotted(value, 0, dv)], dim=2)
    out, *rest = fn(module, new_query, new_key, new_value, attention_mask, **kwargs)
    # transformers' attention functions return (batch, queries, heads, dim); (batch, heads, queries,
    # dim) is recognised too, by shape
    if out.dim() == 4 and out.shape[1] == q_len and out.shape[2] == heads:
        view = (slice(None), slice(None), None, None)
    elif out.dim() == 4 and out.shape[1] == heads and out.shape[2] == q_len:
        view = (slice(None), None, slice(None), None)
    else:
        raise UnipeftError(f"attention output of shape {tuple(out.shape)}: expected (batch, {q_len} queries, "
                           f"{heads} heads, {n * dv}) for a gated prefix")
    parts = out.split(dv, dim=-1)
    result = parts[0]
    for i, slot in slot_of.items():
        result = result + gates[i].to(out.dtype)[view] * parts[slot]
    return (result, *rest)


def attention_with_prefix(module, query, key, value, attention_mask, *, base_implementation: str, **kwargs):
    """Registered in transformers' AttentionInterface as ``unipeft_<impl>`` (bound to ``<impl>``).

    head = Attn(x W_q, concat(P_k, C W_k), concat(P_v, C W_v))   (seed 002)

    The keys and values arriving here are the real tokens' (after RoPE and
    after the cache); the prefix is added at every call and never enters the
    cache, which is what keeps generation correct across cache redesigns.
    Only the interface's positional arguments (query, key, value, mask) and
    shapes are read; keyword arguments pass through untouched except per-key
    additive terms, recognised by their shape.
    """
    fn = _base_attention(module, base_implementation)
    site = module.__dict__.get("_unipeft_kv")
    if site is None:
        return fn(module, query, key, value, attention_mask, **kwargs)
    if site.capture is not None:
        site.capture.append((key.detach(), value.detach()))
    visible = None
    if site.route is not None:  # per-example routing: each row its own prefix (or none)
        routed = _routed_prefix(site, query.shape[0], key, query.shape[2])
        if routed is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        pks, pvs, visible, gates = (routed[0],), (routed[1],), routed[2], (routed[3],)
    elif not site.active:
        return fn(module, query, key, value, attention_mask, **kwargs)
    else:
        b = query.shape[0]
        pks, pvs = zip(*(s.prefix_kv(b, key.dtype, key.device) for s in site.active))
        gates = tuple(s.query_gate() for s in site.active)
    p = sum(k.shape[2] for k in pks)
    key_len = key.shape[2]
    attention_mask = _pad_mask(attention_mask, p, query, key_len, module, base_implementation, visible)
    for name, extra in kwargs.items():
        # A 4-D tensor over (batch, heads, queries, keys) is an additive term the base computed for
        # the real keys (T5's relative position bias): the prefix gets none. Found by shape, not by
        # the keyword, which transformers may rename.
        if isinstance(extra, torch.Tensor) and extra.dim() == 4 and extra.shape[-1] == key_len \
                and extra.shape[-2] == query.shape[2] and extra.is_floating_point():
            kwargs[name] = torch.cat([extra.new_zeros(*extra.shape[:-1], p), extra], dim=-1)
    if any(g is not None for g in gates):
        return _gated_attention(fn, module, query, key, value, attention_mask, kwargs, pks, pvs, gates)
    return fn(module, query, torch.cat([*pks, key], dim=2), torch.cat([*pvs, value], dim=2), attention_mask, **kwargs)


def _bound_attention(base_implementation: str) -> Callable:
    def unipeft_attention(module, query, key, value, attention_mask, **kwargs):
        return attention_with_prefix(module, query, key, value, attention_mask,
                                     base_implementation=base_implementation, **kwargs)
    return unipeft_attention


def current_attention(model: nn.Module) -> str:
    """The attention implementation a model runs. ``config._attn_implementation`` is the one place
    transformers 5 records it (read by its own modelling code; there is no public getter)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"


def enable_attention_sites(model: nn.Module) -> None:
    """Route the model's attention through ``attention_with_prefix`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    impl = current_attention(model)
    if impl.startswith(_ATTN_PREFIX):
        return
    name = _ATTN_PREFIX + impl
    # the base implementation is bound here, so no call needs to read the model's config
    AttentionInterface.register(name, _bound_attention(impl))
    mask_fns = ALL_MASK_ATTENTION_FUNCTIONS
    AttentionMaskInterface.register(name, mask_fns[impl] if impl in mask_fns.valid_keys() else mask_fns["eager"])
    model.set_attn_implementation(name)
    if current_attention(model) != name:
        raise UnipeftError(
            f"{type(model).__name__} does not use transformers' attention interface, so prefixes cannot be "
            f"inserted into its attention"
        )


def disable_attention_sites(model: nn.Module) -> None:
    impl = current_attention(model)
    if impl.startswith(_ATTN_PREFIX):
        model.set_attn_implementation(impl[len(_ATTN_PREFIX):])


