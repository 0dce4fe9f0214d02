"""Quantized bases: ``up.quantize(model, bits=4|8|2)`` stores the frozen linear maps of the blocks in
fewer bits, and every method that uses linear sites (LoRA, (IA)3, adapters, BitFit, ...) trains on
top of them (QLoRA, Dettmers et al. 2023; seeds 000 and 001).

A quantized base is a property of the base weight, not a method: ``quantize`` swaps each target
linear map for a quantized module (bitsandbytes' ``Linear4bit`` (NF4, double quantisation) or
``Linear8bitLt`` (LLM.int8()), or the project's ``Packed2bitLinear``), and a linear site wraps it as it
wraps ``nn.Linear``: the site's forward calls the module's own forward, whose autograd function
dequantises the frozen weight in the forward and again in the backward, so gradients reach the
input and every delta while nothing beyond the packed weight is kept. Models that transformers
loaded with ``BitsAndBytesConfig`` hold the same bitsandbytes modules and work the same way.

What the rest of the library asks of a quantized map, answered here in one place:
  ``bits_of(module)``      2, 4, 8 or None (not quantized);
  ``dequantize(module)``   its weight as floats, (out, in) (merge folds deltas into this);
  ``logical_shape(module)`` the (out, in) of the float weight it stands for (the base fingerprint).

``up.QLoRA`` (``methods/qlora.py``) is quantize + LoRA in one attach.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UnipeftError, choices
from . import bnb
from .packed2bit import Packed2bitLinear

BITS = (2, 4, 8)

__all__ = ["quantize", "bits_of", "dequantize", "logical_shape", "quantized_modules", "Packed2bitLinear", "BITS"]


def bits_of(module: nn.Module) -> int | None:
    """2, 4 or 8 for a quantized linear map (ours or bitsandbytes'), None for anything else."""
    if isinstance(module, Packed2bitLinear):
        return 2
    return bnb.bits_of(module)


def prepare_site(module: nn.Module) -> int | None:
    """Called when a linear site is installed on ``module``: its bits (None: not quantized), with a
    bitsandbytes 4-bit weight kept in the layout that trains correctly (``bnb.keep_standard_format``)."""
    bits = bits_of(module)
    if bits == 4:
        bnb.keep_standard_format(module)
    return bits


def dequantize(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The float weight (out, in) a quantized linear map computes with."""
    if isinstance(module, Packed2bitLinear):
        return module.dequantize(dtype)
    return bnb.dequantize(module, dtype)


def logical_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of the float weight a quantized linear map stands for (bitsandbytes stores a 4-bit
    weight flattened, (out * in / 2, 1))."""
    return module.out_features, module.in_features


def quantized_modules(model: nn.Module) -> dict[str, int]:
    """{module path: bits} of every quantized linear map in ``model``."""
    return {p: b for p, m in model.named_modules() if (b := bits_of(m)) is not None}


def check_bits(owner: str, bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise UnipeftError(f"{owner}: bits must be {choices(list(BITS))}, got {bits!r}")
    if bits in (4, 8):
        bnb.require()
    return bits


def quantize(model: nn.Module, bits: int = 4, targets=None, *, group_size: int = 64,
             int8_threshold: float = 0.0) -> nn.Module:
    """Store the target linear maps of ``model`` in ``bits`` bits, in place; returns the model.

    bits: 4 (NF4 with double quantisation, bitsandbytes), 8 (LLM.int8(), bitsandbytes) or 2 (packed
    2-bit codes with a float16 scale and zero point per ``group_size`` inputs, pure torch).
    targets: as for methods ("all-linear", "attention", roles, suffixes, regexes); default every
    linear map of the blocks, never the task head or the embeddings. int8_threshold: LLM.int8()'s
    outlier threshold (0: none, 6.0: transformers' default).

    Quantize before attaching deltas (``up.QLoRA`` does both in one attach). Quantizing a map twice,
    or a map that holds a delta, is refused; on any error the model is unchanged.
    """
    swap(model, bits, targets, owner="up.quantize", group_size=group_size, int8_threshold=int8_threshold)
    return model


def swap(model: nn.Module, bits: int, targets, *, owner: str, group_size: int = 64, int8_threshold: float = 0.0,
         reuse: bool = False, mmap=None) -> "Swapped":
    """Quantize the targets of ``model`` and return {path: the float module it replaced} (``restore``
    puts them back). With ``reuse``, targets already quantized at ``bits`` are left as they are
    (QLoRA on a model loaded in 4 bits); otherwise a quantized target is an error. ``mmap``: the
    model map the targets are resolved in (a method's ``layers=`` view; default: the whole model)."""
    from ..architectures import map_model
    from ..config import normalize_targets
    from ..engine import registry
    from ..positions import LinearSite
    from ..targets import resolve

    if not isinstance(model, nn.Module):
        raise UnipeftError(f"{owner} expects a torch.nn.Module, got {type(model).__name__}")
    check_bits(owner, bits)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 4 or group_size % 4:
        raise UnipeftError(f"{owner}: group_size must be a multiple of 4 (>= 4), got {group_size!r}")
    if isinstance(int8_threshold, bool) or not isinstance(int8_threshold, (int, float)) or int8_threshold < 0:
        raise UnipeftError(f"{owner}: int8_threshold must be a number >= 0, got {int8_threshold!r}")
    reg = registry(model)
    mmap = mmap or (reg.map if reg is not None else map_model(model))
    paths = resolve(model, mmap, normalize_targets(owner, targets) or ("all-linear",), owner)
    todo = []
    for p in paths:
        m = model.get_submodule(p)
        have = bits_of(m)
        if have is not None:
            if reuse and have == bits:
                continue
            raise UnipeftError(f"{owner}: {p!r} is already quantized ({have}-bit); a model is quantized once "
                               f"(start from the float model to quantize it at another width)")
        if isinstance(m, LinearSite):
            raise UnipeftError(f"{owner}: {p!r} holds deltas ({choices(list(m.unipeft_deltas))}); quantize the base "
                               f"before attaching deltas, or use up.QLoRA to do both in one attach")
        todo.append((p, m))
    from transformers.pytorch_utils import Conv1D

    swapped = Swapped()
    try:
        for p, m in todo:
            w = m.weight.T if isinstance(m, Conv1D) else m.weight  # Conv1D stores (in, out)
            if not w.is_floating_point():
                raise UnipeftError(f"{owner}: {p!r} has a {w.dtype} weight; only float weights can be quantized")
            if bits == 4:
                q = bnb.make_4bit(w, m.bias, compute_dtype=w.dtype)
            elif bits == 8:
                q = bnb.make_8bit(w, m.bias, threshold=float(int8_threshold))
            else:
                q = Packed2bitLinear.from_weight(w, m.bias, group_size)
            q.train(m.training)
            _set(model, p, q)
            swapped[p] = m
    except BaseException:
        restore(model, swapped)
        raise
    if reg is not None:  # the packed weights are frozen for good: detach must not switch them back on
        for p in swapped:
            swapped.flags[p] = reg.original_requires_grad.get(f"{p}.weight")
            reg.original_requires_grad[f"{p}.weight"] = False
    return swapped


class Swapped(dict):
    """{path: the float module} that ``swap`` replaced, with the registry flags it changed (``flags``)."""

    def __init__(self):
        super().__init__()
        self.flags: dict[str, bool | None] = {}


def restore(model: nn.Module, swapped: Swapped) -> None:
    """Put back the float modules ``swap`` replaced (an attach that failed after quantizing)."""
    from ..engine import registry

    reg = registry(model)
    for p, m in swapped.items():
        _set(model, p, m)
        if reg is not None and p in swapped.flags:
            if swapped.flags[p] is None:
                reg.original_requires_grad.pop(f"{p}.weight", None)
            else:
                reg.original_requires_grad[f"{p}.weight"] = swapped.flags[p]


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
