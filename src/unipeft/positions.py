"""Insertion points: where a delta meets the base model. Each is implemented once.

He et al. (seed 002) show every PEFT method is a function inserted at a
position and composed sequentially, in parallel or scaled. unipeft has three
kinds of position and every method uses one or more of them:

* ``LinearSite`` -- a linear map of the base model (``nn.Linear`` or GPT-2's
  ``Conv1D``). It covers the weight (LoRA: h = W0 x + s B A x), the output of a
  sublayer (sequential adapters: h <- h + f(h)), beside a sublayer (parallel
  adapters read the sublayer's input through a *tap*), activations ((IA)3:
  h * l), and whole replacement (a task head owned by one delta).
* ``AttentionSite`` -- the keys and values inside an attention module
  (prefix tuning: concat(P_k, K), concat(P_v, V)). It works through the
  ``transformers`` attention interface, *not* the KV cache, so the cache can
  change shape or class between releases without breaking prefixes.
* ``InputSite`` -- the input embeddings of a stack (prompt tuning:
  concat(P, E(x)), with the attention mask extended to match).

A site holds any number of named deltas; the active ones are applied in the
order they were activated. Sites do not know which method put a delta there.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.nn as nn

from .errors import UnipeftError


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


class LinearSite:
    """Mixin swapped into a linear module's class (see ``install_linear_site``).

    Swapping the class instead of wrapping the module keeps every base
    parameter at its original name (``...query.weight``), so the base model's
    state dict, ``isinstance`` checks and tied weights are untouched; only a
    ``unipeft_deltas`` child is added.
    """

    unipeft_deltas: nn.ModuleDict

    def unipeft_refresh(self, active: list[str]) -> None:
        ds = [self.unipeft_deltas[n] for n in active if n in self.unipeft_deltas and n not in self._unipeft_merged]
        self._unipeft_pre = tuple(d for d in ds if d.rewrites_input)
        self._unipeft_post = tuple(d for d in ds if d.rewrites_output)
        repl = [d for d in ds if d.replaces_base]
        if len(repl) > 1:
            raise UnipeftError("two active deltas replace the same module; activate only one of them")
        self._unipeft_replace = repl[0] if repl else None

    def forward(self, x):
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
            y = self._unipeft_replace.replace(h) if self._unipeft_replace is not None else super().forward(h)
        for d in post:
            y = d.output(x, y)
        return y

    # --- weights as (out, in), whatever the storage layout -----------------
    def unipeft_weight_out_in(self) -> torch.Tensor:
        return self.weight.T if self._unipeft_transposed else self.weight

    def unipeft_merge(self, name: str) -> None:
        if name in self._unipeft_merged:
            return
        delta = self.unipeft_deltas[name]
        w, b = self.unipeft_weight_out_in(), self.bias
        with torch.no_grad():
            new_w, new_b = delta.merged(w.detach(), None if b is None else b.detach())
            # keep the exact originals so unmerge restores the base bit for bit
            self._unipeft_merged[name] = (self.weight.detach().clone(), None if b is None else b.detach().clone())
            self.weight.copy_(new_w.T if self._unipeft_transposed else new_w)
            if b is not None and new_b is not None:
                b.copy_(new_b)

    def unipeft_unmerge(self, name: str) -> None:
        if name not in self._unipeft_merged:
            return
        # deltas merged after this one were computed on top of it: unmerge them first
        later = list(self._unipeft_merged)[list(self._unipeft_merged).index(name):]
        for n in reversed(later):
            w, b = self._unipeft_merged.pop(n)
            with torch.no_grad():
                self.weight.copy_(w)
                if b is not None:
                    self.bias.copy_(b)
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
    module._unipeft_merged = {}
    module._unipeft_pre = ()
    module._unipeft_post = ()
    module._unipeft_replace = None
    return module


def uninstall_linear_site(module: nn.Module) -> None:
    """Give the module its original class back once it holds no delta."""
    if not isinstance(module, LinearSite) or len(module.unipeft_deltas):
        return
    base = [c for c in type(module).__mro__[1:] if c is not LinearSite and issubclass(c, nn.Module)][0]
    del module.unipeft_deltas
    for attr in ("_unipeft_transposed", "_unipeft_merged", "_unipeft_pre", "_unipeft_post", "_unipeft_replace"):
        module.__dict__.pop(attr, None)
    module.__class__ = base


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight  # Conv1D stores (in, out)
    return w.shape[0], w.shape[1]


# ---------------------------------------------------------------------------
# Attention keys and values
# ---------------------------------------------------------------------------

_ATTN_PREFIX = "unipeft_"


class KVSource:
    """Something that yields prefix keys/values for one attention module."""

    def prefix_kv(self, batch: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each (batch, kv_heads, p, head_dim)."""
        raise NotImplementedError


class AttentionSite:
    """Prefix keys/values for one attention module, held outside the module tree.

    Stored in the module's ``__dict__`` (not as a child) because the tensors
    belong to a model-level delta that produces all layers at once.
    """

    def __init__(self):
        self.sources: dict[str, KVSource] = {}
        self.active: tuple[KVSource, ...] = ()
        self.capture: list | None = None  # when a list, the attention call appends (key, value) to it

    def refresh(self, active: list[str]) -> None:
        self.active = tuple(self.sources[n] for n in active if n in self.sources)


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
              implementation: str) -> torch.Tensor | None:
    """Extend an attention mask by p always-visible columns on the left."""
    q_len = query.shape[2]
    if mask is None:
        if not getattr(module, "is_causal", False) or q_len == 1 or implementation.startswith("flash"):
            # no mask means "see every key", or flash attention's bottom-right causal alignment,
            # which already lets every query see a prefix placed on the left
            return None
        # the base implementation would call sdpa with is_causal (top-left aligned: key j <= query i);
        # with the prefix in front that needs an explicit mask
        i = torch.arange(q_len, device=query.device)[:, None]
        j = torch.arange(key_len, device=query.device)[None, :]
        mask = (j <= i)[None, None]
    if mask.dim() == 2:  # (batch, kv): flash-attention style padding mask
        return torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)
    pad_shape = (*mask.shape[:-1], p)
    pad = mask.new_ones(pad_shape) if mask.dtype == torch.bool else mask.new_zeros(pad_shape)
    return torch.cat([pad, mask], dim=-1)


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
    if not site.active:
        return fn(module, query, key, value, attention_mask, **kwargs)
    b = query.shape[0]
    pks, pvs = zip(*(s.prefix_kv(b, key.dtype, key.device) for s in site.active))
    p = sum(k.shape[2] for k in pks)
    key_len = key.shape[2]
    new_key = torch.cat([*pks, key], dim=2)
    new_value = torch.cat([*pvs, value], dim=2)
    attention_mask = _pad_mask(attention_mask, p, query, key_len, module, base_implementation)
    for name, extra in kwargs.items():
        # A 4-D tensor over (batch, heads, queries, keys) is an additive term the base computed for
        # the real keys (T5's relative position bias): the prefix gets none. Found by shape, not by
        # the keyword, which transformers may rename.
        if isinstance(extra, torch.Tensor) and extra.dim() == 4 and extra.shape[-1] == key_len \
                and extra.shape[-2] == query.shape[2] and extra.is_floating_point():
            kwargs[name] = torch.cat([extra.new_zeros(*extra.shape[:-1], p), extra], dim=-1)
    return fn(module, query, new_key, new_value, attention_mask, **kwargs)


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


# ---------------------------------------------------------------------------
# Input embeddings
# ---------------------------------------------------------------------------

def _tokens_in_cache(kwargs: dict, mask: torch.Tensor | None, q_len: int, p: int) -> int:
    """How many earlier positions (prompt included) a stack's KV cache holds: 0 on a fresh pass.

    The cache is found by its type, not by its keyword: transformers 5.24 renamed
    ``past_key_values`` to ``cache`` and the keyword may move again; the class it passes
    (a ``transformers`` ``Cache``) did not change. Should no ``Cache`` be visible, the shape
    still tells: a 2-D attention mask longer than the new tokens covers tokens already cached
    (the user's mask never includes the p prompt positions).
    """
    from transformers.cache_utils import Cache

    for value in kwargs.values():
        if isinstance(value, Cache):
            return int(value.get_seq_length())
    if mask is not None and mask.dim() == 2 and mask.shape[1] > q_len:
        return mask.shape[1] - q_len + p
    return 0


class InputSite:
    """Prepends vectors to the input embeddings of one stack (a decoder-only
    model, an encoder-only model, or the encoder of an encoder-decoder model).

    The stack's forward gets ``inputs_embeds = concat(P, E(x))`` and an
    attention mask (and token types) extended by p. For a stack whose output
    is the model's output (``strip_output``), the p prompt positions are removed
    from the hidden states, so heads, labels and generated tokens line up with
    the user's tokens. In generation, later steps only extend the mask: the
    prompt already sits in the cache.
    """

    def __init__(self, stack: nn.Module, embed: nn.Module, strip_output: bool, decoder: nn.Module | None = None):
        self.stack, self.embed, self.strip_output, self.decoder = stack, embed, strip_output, decoder
        self.sources: dict[str, Callable[[int], torch.Tensor]] = {}
        self.active: tuple = ()
        self._p_last = 0
        self._handles = [
            stack.register_forward_pre_hook(self._pre, with_kwargs=True),
            stack.register_forward_hook(self._post, with_kwargs=True),
        ]
        if decoder is not None:
            self._handles.append(decoder.register_forward_pre_hook(self._decoder_pre, with_kwargs=True))

    def refresh(self, active: list[str]) -> None:
        self.active = tuple(self.sources[n] for n in active if n in self.sources)

    def remove(self):
        for h in self._handles:
            h.remove()

    def _prompt(self, batch: int) -> torch.Tensor | None:
        if not self.active:
            return None
        parts = [src(batch) for src in self.active]
        return torch.cat(parts, dim=1)

    def _pre(self, module, args, kwargs):
        if not self.active:
            self._p_last = 0
            return None
        if args:  # name positional arguments so the ones we extend are found wherever they were passed
            names = self._arg_names(module)
            kwargs = {**dict(zip(names, args)), **kwargs}
            args = ()
        ids = kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        ref = embeds if embeds is not None else ids
        batch, q_len = ref.shape[0], ref.shape[1]
        p = sum(s.length for s in self.active)
        past_len = _tokens_in_cache(kwargs, mask, q_len, p)
        if past_len == 0:  # a fresh pass: prepend the prompt
            if embeds is None:
                embeds = self.embed(ids)
            prompt = self._prompt(batch).to(embeds.dtype)
            kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
            kwargs["input_ids"] = None
            tt = kwargs.get("token_type_ids")
            if tt is not None:
                kwargs["token_type_ids"] = torch.cat([tt.new_zeros(batch, p), tt], dim=1)
            pos = kwargs.get("position_ids")
            if pos is not None:
                start = torch.arange(p, device=pos.device).expand(pos.shape[0], p)
                kwargs["position_ids"] = torch.cat([start, pos + p], dim=1)
            self._p_last = p
        else:  # generation step: the prompt is in the cache already
            pos = kwargs.get("position_ids")
            if pos is not None and pos.max() < past_len:  # positions computed without the prompt
                kwargs["position_ids"] = pos + p
            self._p_last = 0
        if mask is not None and mask.dim() == 2 and mask.shape[1] < past_len + q_len + (p if past_len == 0 else 0):
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, p), mask], dim=1)
        return args, kwargs

    @staticmethod
    def _arg_names(module) -> list[str]:
        import inspect

        params = inspect.signature(module.forward).parameters.values()
        return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def _post(self, module, args, kwargs, output):
        p = self._p_last
        if not p or not self.strip_output:
            return output
        if hasattr(output, "last_hidden_state") and output.last_hidden_state is not None:
            output.last_hidden_state = output.last_hidden_state[:, p:]
            if getattr(output, "hidden_states", None) is not None:
                output.hidden_states = tuple(h[:, p:] for h in output.hidden_states)
            pooler = getattr(module, "pooler", None)
            if getattr(output, "pooler_output", None) is not None and callable(pooler):
                # BERT-style poolers read position 0: let them read the user's first token, as
                # heads that take last_hidden_state[:, 0] (RoBERTa, ELECTRA) now do
                output.pooler_output = pooler(output.last_hidden_state)
            return output
        if isinstance(output, tuple):
            return (output[0][:, p:],) + output[1:]
        return output

    def _decoder_pre(self, module, args, kwargs):
        enc = kwargs.get("encoder_hidden_states")
        mask = kwargs.get("encoder_attention_mask")
        if enc is None or mask is None or mask.dim() != 2:
            return None
        extra = enc.shape[1] - mask.shape[1]
        if extra > 0:
            kwargs["encoder_attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], extra), mask], dim=1)
            return args, kwargs
        return None
