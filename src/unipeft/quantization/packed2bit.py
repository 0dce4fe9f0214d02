"""A packed 2-bit linear map in pure torch (CPU and GPU): the project's own quantized base for 2 bits.

No maintained library stores 2-bit weights compactly on the CPU (torchao's int2 keeps a byte per
weight; quanto is unmaintained; transformers 5 refuses HQQ), so the format is small and ours:

* each row of W (out, in) is cut into groups of ``group_size`` inputs (the last group padded with
  zeros); a group g keeps a scale s_g and a zero point z_g, and each weight a code q in {0, 1, 2, 3}:

      W[o, i] ~= (q[o, i] - z_g) * s_g

  s_g and z_g are chosen per group by a small search over clipping ranges [lo, hi] = c * [min, max],
  c in (0.5, 1], keeping the pair with the least squared error (round-to-nearest on the plain
  min-max grid wastes two of the four levels on outliers);
* four codes are packed into a byte (bits 0-1 hold the first weight), so W costs in/4 bytes per row,
  plus two float16 numbers per group: 0.25 + 4 / group_size bytes per weight (0.3125 at 64).

``Packed2bitLinear`` is an ``nn.Linear`` (so targets, positions and linear sites treat it as one)
whose ``weight`` is the packed byte tensor (frozen), with ``scale`` and ``zero`` as buffers.
``Dequantized2bitMatmul`` dequantises W in the forward and again in the backward: nothing is kept
for the backward beyond references to the packed tensors it already holds.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LEVELS = 4  # 2 bits
# The packed bytes are held as int8: the dtype transformers' modelling code takes for quantized
# storage (T5's FFN casts its input to ``wo.weight.dtype`` unless that is int8; uint8 would turn the
# activations into bytes). Only the bits matter: they are read back through a uint8 view.
STORAGE = torch.int8
_CLIPS = torch.linspace(1.0, 0.5, 11).tolist()  # the clipping ranges searched per group


def quantize_2bit(w: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed bytes (out, padded_in / 4), scale (out, groups) fp16, zero (out, groups) fp16) for W (out, in)."""
    out_f, in_f = w.shape
    groups = math.ceil(in_f / group_size)
    wf = w.detach().float()
    if groups * group_size != in_f:
        wf = F.pad(wf, (0, groups * group_size - in_f))
    g = wf.view(out_f, groups, group_size)
    lo0, hi0 = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    best_err = best_scale = best_zero = None
    for c in _CLIPS:
        lo, hi = lo0 * c, hi0 * c
        scale = ((hi - lo) / (LEVELS - 1)).clamp_min(1e-8)
        zero = -lo / scale
        # the stored numbers are float16: search with what dequantisation will read
        scale, zero = scale.half().float(), zero.half().float()
        q = (g / scale + zero).round_().clamp_(0, LEVELS - 1)
        err = ((q - zero) * scale - g).pow_(2).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    q = (g / best_scale + best_zero).round_().clamp_(0, LEVELS - 1).to(torch.uint8).view(out_f, -1, 4)
    packed = q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)
    return packed.contiguous().view(STORAGE), best_scale.squeeze(-1).half(), best_zero.squeeze(-1).half()


def dequantize_2bit(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W (out, in) in ``dtype`` from the packed codes and the per-group scale and zero point."""
    out_f, groups = scale.shape
    # one gather from a 256 x 4 table (byte -> its four codes) writes the codes straight in ``dtype``;
    # the zero point and the scale are then applied in place: one float temporary the size of W
    q = F.embedding(packed.view(torch.uint8).int(), _codes(dtype, packed.device))  # (out, padded_in / 4, 4)
    w = q.view(out_f, groups, -1).sub_(zero.to(dtype).unsqueeze(-1)).mul_(scale.to(dtype).unsqueeze(-1))
    return w.view(out_f, -1)[:, :in_features]


_CODE_TABLES: dict = {}


def _codes(dtype: torch.dtype, device) -> torch.Tensor:
    """(256, 4): the four 2-bit codes of every byte, first code in the lowest bits."""
    key = (dtype, str(device))
    table = _CODE_TABLES.get(key)
    if table is None:
        b = torch.arange(256)
        table = _CODE_TABLES[key] = torch.stack([(b >> s) & 3 for s in (0, 2, 4, 6)], 1).to(device=device,
                                                                                             dtype=dtype)
    return table


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class Dequantized2bitMatmul(torch.autograd.Function):
    """y = x W^T + b with W dequantised from the packed codes in the forward and again in the backward
    (grad_x = g W). W is frozen: only x and b get gradients, and only the packed tensors (references)
    are kept for the backward, never a float copy of W."""

    @staticmethod
    def forward(ctx, x, packed, scale, zero, bias, in_features):
        dt = _compute_dtype(x)
        w = dequantize_2bit(packed, scale, zero, in_features, dt)
        # the output is a tensor of its own (F.linear with a bias returns a view of a 2-D product, and
        # autograd forbids changing a custom function's view output in place: relu_(q_proj(x)) would fail)
        y = x.new_empty(*x.shape[:-1], w.shape[0], dtype=dt)
        x2, y2 = x.to(dt).reshape(-1, x.shape[-1]), y.view(-1, w.shape[0])
        if bias is None:
            torch.mm(x2, w.t(), out=y2)
        else:
            torch.addmm(bias.to(dt), x2, w.t(), out=y2)
        ctx.save_for_backward(packed, scale, zero)
        ctx.in_features, ctx.x_dtype = in_features, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        packed, scale, zero = ctx.saved_tensors
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            w = dequantize_2bit(packed, scale, zero, ctx.in_features, g.dtype)
            grad_x = (g @ w).to(ctx.x_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
            grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, None, grad_b, None


class Packed2bitLinear(nn.Linear):
    """A frozen linear map stored as packed 2-bit codes (see the module docstring).

    ``weight``: the packed bytes (out, padded_in / 4), never trained; ``scale``, ``zero``: float16 buffers
    (out, groups); ``bias``: the original bias as a float parameter (BitFit may train it)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 64,
                 device=None, dtype=None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no float weight is ever allocated
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = math.ceil(in_features / group_size)
        self.weight = nn.Parameter(torch.zeros(out_features, groups * group_size // 4, dtype=STORAGE,
                                               device=device), requires_grad=False)
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_weight(cls, weight_out_in: torch.Tensor, bias: torch.Tensor | None, group_size: int = 64):
        """The packed map of W (out, in) and b (taken over as they are: the bias stays a float parameter)."""
        out_f, in_f = weight_out_in.shape
        m = cls(in_f, out_f, bias=False, group_size=group_size, device=weight_out_in.device)
        packed, scale, zero = quantize_2bit(weight_out_in, group_size)
        m.weight.data, m.scale, m.zero = packed, scale, zero
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return m

    def reset_parameters(self) -> None:  # nn.Linear's would fill a float weight: there is none
        pass

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (out, in) as floats (``dtype``: the bias's, float32 without one)."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return dequantize_2bit(self.weight, self.scale, self.zero, self.in_features, dtype)

    def forward(self, x):
        return Dequantized2bitMatmul.apply(x, self.weight, self.scale, self.zero, self.bias, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits=2, group_size={self.group_size}")
