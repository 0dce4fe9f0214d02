"""The one base model a server holds: loading it from an embedded name, a transformers folder or
an object, at the precision it is served in, and the two facts the engine asks of it (the longest
input it takes, the id it pads with).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UnipeftError, choices

# the precisions a base can be served in (``unipeft serve --dtype``); deltas saved from the float32
# weights serve on every one of them (storage.same_base)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cast_base(model: nn.Module, dtype: str | None) -> nn.Module:
    """``model`` in serving precision ``dtype`` (None: as loaded), cast in place."""
    if dtype is None:
        return model
    if dtype not in DTYPES:
        raise UnipeftError(f"Engine: dtype {dtype!r} is not a serving precision; valid: {choices(list(DTYPES))}")
    return model.to(DTYPES[dtype])


def load_base(base, tokenizer=None):
    """(model, tokenizer, name) from a zoo name ("smollm2", "minilm"), a transformers folder,
    a model (with ``tokenizer``) or a (model, tokenizer) pair."""
    if isinstance(base, tuple):
        base, tokenizer = base
    if isinstance(base, nn.Module):
        if tokenizer is None:
            raise UnipeftError("Engine: a model object needs its tokenizer (tokenizer=...)")
        return base, tokenizer, getattr(base.config, "model_type", type(base).__name__)
    name = str(base)
    if name in ("smollm2", "minilm"):
        from .. import zoo

        model, tok = zoo.smollm2() if name == "smollm2" else zoo.minilm()
        return model, tok, name
    path = Path(name)
    if not (path / "config.json").is_file():
        raise UnipeftError(f"--model {name!r}: not a transformers model folder (no config.json there) and not one "
                           f"of the embedded models {choices(['smollm2', 'minilm'])}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cfg = AutoConfig.from_pretrained(path)
    cls_head = any(a.endswith("ForSequenceClassification") for a in (cfg.architectures or []))
    auto = AutoModelForSequenceClassification if cls_head else AutoModelForCausalLM
    return auto.from_pretrained(path), AutoTokenizer.from_pretrained(path), path.name


def max_positions(model, tok) -> int:
    """The longest input the model and its tokenizer both take (2048 when neither says)."""
    n = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    t = getattr(tok, "model_max_length", None)
    vals = [v for v in (n, t) if isinstance(v, int) and 0 < v < 10 ** 7]
    return min(vals) if vals else 2048


def pad_id(tok, model) -> int:
    """The id that pads a batch: the tokenizer's pad, the model's, end of sequence, or 0."""
    for v in (tok.pad_token_id, getattr(model.config, "pad_token_id", None), tok.eos_token_id):
        if isinstance(v, int):
            return v
    return 0
