"""4-bit NF4 (with double quantisation) and 8-bit linear maps through bitsandbytes (>= 0.49 runs on
x86 CPUs as well as CUDA).

bitsandbytes' ``Linear4bit`` and ``Linear8bitLt`` are ``nn.Linear`` subclasses whose autograd
functions dequantise the frozen weight in the backward too (nothing extra is kept), so a linear
site wraps them like any linear map. This file builds them from a float weight, reads a float
weight back out of them (merge, analysis, the 2-bit comparison), and recognises them whether
``up.quantize`` made them or transformers' ``BitsAndBytesConfig`` did.
"""
from __future__ import annotations

import copy
import sys

import torch
import torch.nn as nn

from ..errors import UnipeftError
from .packed2bit import STORAGE

INSTALL = "pip install bitsandbytes (or pip install 'unipeft[quantize]')"


def require():
    """The bitsandbytes module, or a one-line error that says how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise UnipeftError(f"4- and 8-bit quantisation needs bitsandbytes, which is not installed: {INSTALL}") from None
    return bitsandbytes


def bits_of(module: nn.Module) -> int | None:
    """4 or 8 for a bitsandbytes quantized linear map, else None (bitsandbytes is never imported here:
    a model can hold its modules only once something else imported it)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return 4
    if isinstance(module, bnb.nn.Linear8bitLt) and not module.state.has_fp16_weights:
        return 8
    return None


def make_4bit(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> nn.Module:
    """NF4 with double quantisation (QLoRA's storage: Dettmers et al. 2023), blocks of 64, for W (out, in)."""
    bnb = require()
    out_f, in_f = weight.shape
    # bitsandbytes' CPU kernel reads a row of a 2-D weight as whole blocks: with rows that are not a
    # multiple of the block it dequantises other numbers than were quantized (measured: relative error
    # 0.40 instead of 0.09 for 32 inputs at block 64). Blocks of 32 serve such rows; checked below.
    blocksize = 64 if in_f % 64 == 0 else 32
    # stored as int8 bytes (STORAGE, see packed2bit.py): T5's FFN casts its input to wo's dtype unless
    # that is int8, which transformers' modelling code takes for quantized storage
    m = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype, quant_type="nf4",
                          compress_statistics=True, quant_storage=STORAGE, device="meta")
    m.weight = bnb.nn.Params4bit(weight.detach().contiguous(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, quant_storage=STORAGE,
                                 blocksize=blocksize).to(weight.device)  # quantised on .to()
    if not reads_rows_right(m):
        raise UnipeftError(f"bitsandbytes' 4-bit kernel on {weight.device.type} misreads rows of {in_f} inputs (not "
                           f"a multiple of 32); quantize this map at 8 or 2 bits, or leave it out of the targets")
    if bias is not None:
        m.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    # bitsandbytes would repack the weight in place for its bf16 CPU kernel on the first inference-mode
    # call on an AVX512-BF16 CPU: outputs then differ between training and inference (bf16 vs float32),
    # and the repacking fails on maps narrower than a block (64 inputs). Keep one format and one dtype.
    m.support_avx512bf16_for_cpu = False
    return m


def make_8bit(weight: torch.Tensor, bias: torch.Tensor | None, threshold: float) -> nn.Module:
    """LLM.int8() (Dettmers et al. 2022): int8 rows with one absmax scale each; ``threshold`` > 0 sends
    input columns with outliers above it through a float16 product (transformers' default is 6.0)."""
    bnb = require()
    out_f, in_f = weight.shape
    m = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=threshold,
                            device="meta")
    # Int8Params quantises when moved off the CPU copy it holds (bitsandbytes' own rule)
    m.weight = bnb.nn.Int8Params(weight.detach().to("cpu").contiguous(), requires_grad=False,
                                 has_fp16_weights=False).to(weight.device)
    if bias is not None:
        m.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return m


def reads_rows_right(module: nn.Module) -> bool:
    """Whether bitsandbytes dequantises this 4-bit map's weight (as its forward does) into the numbers
    that were quantized: the blocks cut over the flattened weight, read back as rows (see make_4bit)."""
    bnb = sys.modules["bitsandbytes"]
    w = module.weight
    flat = copy.copy(w.quant_state)
    flat.shape = torch.Size([module.out_features * module.in_features])
    return torch.equal(bnb.functional.dequantize_4bit(w.data, flat).view(module.out_features, module.in_features),
                       bnb.functional.dequantize_4bit(w.data, w.quant_state))


def keep_standard_format(module: nn.Module) -> None:
    """Undo (and stop) bitsandbytes' repacking of a 4-bit weight for its bf16 CPU kernel (see make_4bit).

    On an AVX512-BF16 CPU the first inference-mode call of a ``Linear4bit`` rewrites its weight in
    place into a layout whose later training-mode calls run an op with no autograd kernel (torch warns
    that the gradients may be silently wrong) and compute in bf16. A linear site trains through the
    map, so it keeps bitsandbytes' standard layout, as bitsandbytes' own ``.cuda()`` restores it."""
    if bits_of(module) != 4:
        return
    w = module.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        bnb = sys.modules["bitsandbytes"]
        w.data, w.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    module.support_avx512bf16_for_cpu = False
    if not reads_rows_right(module):  # a map someone else quantized (transformers' BitsAndBytesConfig)
        import warnings

        warnings.warn(f"bitsandbytes' 4-bit kernel on {w.device.type} misreads the rows of this {module.in_features}-"
                      f"input map (not a multiple of its block of {w.quant_state.blocksize}): the base computes with "
                      f"other weights than were quantized; up.quantize picks blocks it reads right", stacklevel=4)


def dequantize(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W (out, in) as floats from a bitsandbytes 4- or 8-bit linear map."""
    bnb = sys.modules["bitsandbytes"]
    w = module.weight
    if bits_of(module) == 4:
        data, state = w.data, w.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # repacked for the bf16 CPU kernel (a model that transformers loaded, after an inference call):
            # undo it on copies, as bitsandbytes' own state_dict does in place
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        out = bnb.functional.dequantize_4bit(data, state)
        return out.to(dtype or state.dtype)
    scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB  # moved to state by the 1st forward
    out = bnb.functional.int8_vectorwise_dequant(w.data, scb)
    return out.to(dtype or (module.bias.dtype if module.bias is not None else torch.float32))
