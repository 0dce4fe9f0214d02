"""Prefix tuning (Li & Liang 2021; seed 000 "Prefix Tuning", seed 002).

    head_i = Attn(x W_q, concat(P_k, C W_k), concat(P_v, C W_v))

p trainable key/value vectors are prepended inside the attention of every
layer (encoder self-attention, decoder self- and cross-attention for
encoder-decoder models). Training goes through a reparameterisation
P = MLP(P') that stabilises optimisation; after training only P is kept: the
saved delta holds P alone. ``init="text"`` starts P from the keys and values
the frozen model computes for real words (Li & Liang, "Parameter
Initialization"); then P = P_words + MLP(P') with the MLP's last layer zero.

The prefix is inserted through the attention interface (``positions.
AttentionSite``), never through the KV cache, so ``generate``, grouped-query
attention and any cache class work unchanged.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MethodConfig, check_choice, check_positive_int, method
from ..errors import UnipeftError
from ..positions import KVSource, attention_site, enable_attention_sites, linear_shape


@method
class PrefixTuning(MethodConfig):
    """length: p; reparam_hidden: hidden width of the MLP reparameterisation
    (0: train P directly, which is also how a saved prefix is loaded);
    init: "random" or "text" (needs init_text and ``tokenizer=`` in attach)."""

    length: int = 10
    reparam_hidden: int = 512
    init: str = "random"
    init_text: str | None = None
    train_head: bool | list = True

    kind: ClassVar[str] = "prefix_tuning"
    method_type: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = False

    def validate(self):
        check_positive_int("PrefixTuning", "length", self.length)
        check_positive_int("PrefixTuning", "reparam_hidden", self.reparam_hidden, allow_zero=True)
        check_choice("PrefixTuning", "init", self.init, ("random", "text"))
        if self.init == "text" and not self.init_text:
            raise UnipeftError("PrefixTuning: init='text' needs init_text='...'")

    def saved_config(self) -> "PrefixTuning":
        """What is stored: P itself, so no reparameterisation and no init."""
        return self.replace(reparam_hidden=0, init="random", init_text=None)

    def install(self, view, name):
        attn = view.map.attention
        if not attn:
            raise UnipeftError(f"PrefixTuning: found no attention modules in {view.map.model_type!r}; "
                               f"prefix tuning needs a model with attention")
        shapes = [_kv_shape(view, path) for path, _, _ in attn]
        if len(set(shapes)) != 1:
            raise UnipeftError(f"PrefixTuning: attention modules differ in key/value shape {sorted(set(shapes))}")
        kv_heads, head_dim = shapes[0]
        d_model = _hidden_size(view)
        init = None
        if self.init == "text":
            init = _word_activations(view, [p for p, _, _ in attn], self.init_text, self.length)
        prefix = Prefix(self.length, len(attn), kv_heads, head_dim, d_model, self.reparam_hidden, init)
        view.set_module(prefix)
        for i, (path, _, _) in enumerate(attn):
            view.add_attention(path, LayerPrefix(prefix, i))


class Prefix(nn.Module):
    """All layers' prefixes: P of shape (p, layers, 2, kv_heads, head_dim)."""

    def __init__(self, length, layers, kv_heads, head_dim, d_model, hidden, init: torch.Tensor | None):
        super().__init__()
        self.length, self.layers, self.kv_heads, self.head_dim = length, layers, kv_heads, head_dim
        width = layers * 2 * kv_heads * head_dim
        self.width_per_layer = 2 * kv_heads * head_dim
        if hidden:
            self.p_prime = nn.Parameter(torch.randn(length, d_model) * 0.02)
            self.mlp_in = nn.Linear(d_model, hidden)
            self.mlp_out = nn.Linear(hidden, width)
            self.prefix = None
            if init is not None:
                nn.init.zeros_(self.mlp_out.weight)
                nn.init.zeros_(self.mlp_out.bias)
                self.register_buffer("start", init.reshape(length, width), persistent=False)
            else:
                self.start = None
        else:
            self.prefix = nn.Parameter(init.reshape(length, width).clone() if init is not None
                                       else torch.randn(length, width) * 0.02)

    def layer(self, i: int) -> torch.Tensor:
        """(2, kv_heads, p, head_dim) for attention module i."""
        lo, hi = i * self.width_per_layer, (i + 1) * self.width_per_layer
        if self.prefix is not None:
            flat = self.prefix[:, lo:hi]
        else:
            # only this layer's rows of the output projection: cheap, and nothing cached between calls
            hidden = torch.tanh(self.mlp_in(self.p_prime))
            flat = F.linear(hidden, self.mlp_out.weight[lo:hi], self.mlp_out.bias[lo:hi])
            if self.start is not None:
                flat = flat + self.start[:, lo:hi]
        return flat.view(self.length, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)

    def export_state(self) -> dict[str, torch.Tensor]:
        """P = MLP(P') for every layer; the MLP is dropped."""
        with torch.no_grad():
            parts = [self.layer(i).permute(2, 0, 1, 3).reshape(self.length, -1) for i in range(self.layers)]
            return {"prefix": torch.cat(parts, dim=1).contiguous()}


class LayerPrefix(KVSource):
    def __init__(self, prefix: Prefix, index: int):
        self.prefix, self.index = prefix, index

    def prefix_kv(self, batch, dtype, device):
        kv = self.prefix.layer(self.index).to(dtype)
        k, v = kv[0], kv[1]
        return k.unsqueeze(0).expand(batch, -1, -1, -1), v.unsqueeze(0).expand(batch, -1, -1, -1)


def _hidden_size(view) -> int:
    cfg = view.config
    for attr in ("hidden_size", "d_model", "n_embd"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise UnipeftError("PrefixTuning: cannot find the model's hidden size in its config")


def _kv_shape(view, attn_path: str) -> tuple[int, int]:
    """(kv_heads, head_dim) of one attention module."""
    module = view.module(attn_path)
    head_dim = None
    for attr in ("head_dim", "attention_head_size", "key_value_proj_dim"):
        if isinstance(getattr(module, attr, None), int):
            head_dim = getattr(module, attr)
            break
    k_paths = [p for p, rs in view.map.roles.items() if p.startswith(attn_path + ".") and ("k" in rs)]
    if not k_paths:
        raise UnipeftError(f"PrefixTuning: no key projection found under {attn_path!r}")
    _, out = linear_shape(view.module(k_paths[0]))
    fused = view.map.fused.get(k_paths[0])
    kv_dim = out // len(fused) if fused else out
    if head_dim is None:
        heads = getattr(view.config, "num_key_value_heads", None) or getattr(view.config, "num_attention_heads")
        head_dim = kv_dim // heads
    return kv_dim // head_dim, head_dim


def _word_activations(view, attn_paths, text, length) -> torch.Tensor:
    """Keys and values the frozen model computes for ``text``, first p tokens, every layer."""
    tok = view.tokenizer
    if tok is None:
        raise UnipeftError("PrefixTuning: init='text' needs a tokenizer: up.attach(..., tokenizer=tok)")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UnipeftError("PrefixTuning: init_text produced no tokens")
    ids = (ids * (length // len(ids) + 1))[:length]
    model = view.model
    enable_attention_sites(model)
    sites = [attention_site(view.module(p), create=True) for p in attn_paths]
    for s in sites:
        s.capture = []
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if getattr(view.config, "is_encoder_decoder", False):
                model(input_ids=x, decoder_input_ids=x)
            else:
                model(input_ids=x)
    finally:
        model.train(was_training)
    rows = []
    for s in sites:
        if not s.capture:
            raise UnipeftError("PrefixTuning: init='text' could not observe every attention module")
        k, v = s.capture[0]
        s.capture = None
        # (1, kv_heads, p, head_dim) each -> (p, 2 * kv_heads * head_dim)
        rows.append(torch.stack([k[0], v[0]]).permute(2, 0, 1, 3).reshape(length, -1).float().cpu())
    for p, s in zip(attn_paths, sites):
        if not s.sources:
            view.module(p).__dict__.pop("_unipeft_kv", None)
    return torch.cat(rows, dim=1)
