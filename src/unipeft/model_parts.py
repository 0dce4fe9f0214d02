"""Parts of a model the engine finds by its structure, not by names: the task head (and the copy
of it each delta trains), the input stacks where prompt methods enter, and the output layer, whose
vocabulary logits ``logits_at`` computes at chosen positions only.

Kept apart from the engine's bookkeeping (``engine.py``) because both are questions about the
model's shape: which children are a freshly initialised head rather than the backbone or the
pretrained output embeddings, and which module embeds the tokens a prompt is put in front of.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import positions as pos
from .errors import UnipeftError, choices

MODULES_ATTR = "unipeft_modules"  # the engine's own children (model-level delta modules): never a head


# ---------------------------------------------------------------------------
# Task heads
# ---------------------------------------------------------------------------

def head_modules(model: nn.Module) -> list[str]:
    """Names of the model's task head: children of the top model that are neither
    the backbone nor contain the (pretrained) output embeddings.

    BertForSequenceClassification -> ["classifier"]; GPT2LMHeadModel -> [];
    BertForMaskedLM -> [] (its MLM head is pretrained and holds the decoder).
    """
    base = getattr(model, "base_model", model)
    if base is model:
        return []
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = []
    for name, child in model.named_children():
        if child is base or name == MODULES_ATTR:
            continue
        if out_emb is not None and any(m is out_emb for m in child.modules()):
            continue
        if any(True for _ in child.parameters()):
            heads.append(name)
    return heads


class HeadDelta(pos.LinearDelta):
    """A task head owned by one delta: its own copy of the head's weights.

    Each delta trains and saves its own head, so two task deltas on one base
    each keep their classifier. Merging copies it into the base head.
    """

    replaces_base = True

    def __init__(self, module: nn.Module):
        super().__init__()
        w = module.unipeft_weight_out_in() if isinstance(module, pos.LinearSite) else (
            module.weight.T if not isinstance(module, nn.Linear) else module.weight)
        self.weight = nn.Parameter(w.detach().clone())
        self.bias = nn.Parameter(module.bias.detach().clone()) if module.bias is not None else None

    def replace(self, x):
        return nn.functional.linear(x, self.weight, self.bias)

    def merged(self, weight, bias):
        return self.weight.detach().clone(), None if self.bias is None else self.bias.detach().clone()


def add_head(model: nn.Module, view, delta) -> None:
    """Give ``delta`` its own copy of the task head (``train_head``: True, False or module names),
    placed through the engine's ``view``; a LayerNorm inside the head trains in place."""
    from .architectures import is_linear_like

    setting = getattr(delta.config, "train_head", True)
    if setting is False:
        return
    heads = head_modules(model)
    if isinstance(setting, (list, tuple)):
        heads = list(setting)
    for h in heads:
        try:
            mod = model.get_submodule(h)
        except AttributeError:
            raise UnipeftError(f"train_head: no module {h!r}; the model's head is {choices(head_modules(model))}") from None
        for sub, m in mod.named_modules():
            if "unipeft_deltas" in sub.split("."):
                continue  # another delta's copy of this head
            if is_linear_like(m):
                path = f"{h}.{sub}" if sub else h
                view.add_linear(path, HeadDelta(m))
                delta.head.append(path)
            elif any(True for _ in m.parameters(recurse=False)):
                # a LayerNorm or similar inside the head: train it in place as a selected parameter
                for pn, _ in m.named_parameters(recurse=False):
                    full = f"{h}.{sub}.{pn}" if sub else f"{h}.{pn}"
                    delta.selected[full] = model.get_parameter(full).detach().clone()


# ---------------------------------------------------------------------------
# Input stacks (for prompt methods)
# ---------------------------------------------------------------------------

def input_stacks(model: nn.Module):
    base = getattr(model, "base_model", model)
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        enc = model.get_encoder() if hasattr(model, "get_encoder") else None
        dec = model.get_decoder() if hasattr(model, "get_decoder") else None
        if enc is None:
            raise UnipeftError(f"{type(model).__name__}: cannot find the encoder for prompt tuning")
        path = _path_of(model, enc)
        embed = enc.get_input_embeddings() if hasattr(enc, "get_input_embeddings") else model.get_input_embeddings()
        return [(path, enc, embed, False, dec)]
    path = _path_of(model, base)
    return [(path, base, model.get_input_embeddings(), True, None)]


def _path_of(model: nn.Module, target: nn.Module) -> str:
    for n, m in model.named_modules():
        if m is target:
            return n
    raise UnipeftError(f"module {type(target).__name__} is not part of the model")


# ---------------------------------------------------------------------------
# The output layer
# ---------------------------------------------------------------------------

def logits_at(model, rows: torch.Tensor, positions: torch.Tensor, *, out_layer=None, **inputs) -> torch.Tensor:
    """The model's logits at the positions (rows[i], positions[i]) only, (N, vocab), gradients flowing.

    A verbalizer word's score needs the logits at a few positions of each row, a causal LM's loss those
    before its target tokens only (not the prompt's, not the padding's); the output layer
    (``get_output_embeddings()``, transformers' own accessor) is handed just those hidden states, so the
    vocabulary product, its backward and its (batch x length x vocab) memory are paid for N positions:
    about a fifth of SmolLM2-135M's forward pass (49,152 words). When the layer is not
    called once on (batch, length, hidden) states (a model built otherwise), every position's logits are
    computed and picked: the same numbers, at the full price. ``out_layer``: that layer, when ``model`` is a
    wrapper (DDP) that does not give it."""
    if out_layer is None and hasattr(model, "get_output_embeddings"):
        out_layer = model.get_output_embeddings()
    seen = []

    def pick(module, args):
        hidden = args[0]
        if seen or not torch.is_tensor(hidden) or hidden.dim() != 3:
            seen.append(None)  # a second call or another input: not the case this handles
            return None
        seen.append(hidden.shape)
        return (hidden[rows, positions].unsqueeze(0), *args[1:])

    handle = out_layer.register_forward_pre_hook(pick) if isinstance(out_layer, nn.Module) else None
    try:
        logits = model(**inputs).logits
    finally:
        if handle is not None:
            handle.remove()
    if len(seen) == 1 and seen[0] is not None and logits.shape[:2] == (1, rows.numel()):
        return logits[0]
    if not seen:  # the layer never ran on its own: these are every position's logits
        return logits[rows, positions]
    return model(**inputs).logits[rows, positions]
