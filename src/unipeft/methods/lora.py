"""LoRA (Hu et al. 2021; seed 000 and 001, "Reparametrization-based PEFT: LoRA").

    h = W0 x + (alpha / r) * B A x,   A in R^{r x k} random, B in R^{d x r} zero

so the delta is zero at initialisation and ΔW = (alpha / r) B A can be merged
into W0 for inference with no overhead.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import fused
from ..config import MethodConfig, check_choice, check_number, check_positive_int, method, normalize_targets
from ..positions import LinearDelta, linear_shape


@method
class LoRA(MethodConfig):
    """Low-rank update of chosen weight matrices.

    r: rank; alpha: scale numerator (scale = alpha / r); dropout: on the LoRA
    path's input; targets: which linear maps (default: the query and value
    projections, as in the paper); init: "kaiming" (uniform, as the notes'
    pseudocode) or "gaussian" (A ~ N(0, 1/r)); train_head: train (and save) a
    newly added task head.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple | None = None
    init: str = "kaiming"
    train_head: bool | list = True

    kind: ClassVar[str] = "lora"
    method_type: ClassVar[str] = "reparameterization"
    mergeable: ClassVar[bool] = True
    default_targets: ClassVar[tuple] = ("q", "v")

    def validate(self):
        check_positive_int("LoRA", "r", self.r)
        check_number("LoRA", "alpha", self.alpha, lo=0, lo_open=True)
        check_number("LoRA", "dropout", self.dropout, lo=0, hi=1)
        check_choice("LoRA", "init", self.init, ("kaiming", "gaussian"))
        self.targets = normalize_targets("LoRA", self.targets)

    def install(self, view, name):
        for path in view.resolve_targets(self.targets or self.default_targets, "LoRA"):
            fan_in, fan_out = linear_shape(view.module(path))
            view.add_linear(path, LoRADelta(fan_in, fan_out, self.r, self.alpha / self.r, self.dropout, self.init))


class LoRADelta(LinearDelta):
    rewrites_output = True

    def __init__(self, fan_in: int, fan_out: int, r: int, scale: float, dropout: float, init: str):
        super().__init__()
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(r, fan_in))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, r))
        self.drop = nn.Dropout(dropout) if dropout > 0 else None  # no copy of x when there is no dropout
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1 / r)

    def with_base(self, site, x):
        """Training step: W0 x + b + s B A x as one autograd node (``LoRALinear``)."""
        if not (fused.enabled() and torch.is_grad_enabled()) or (self.drop is not None and self.training):
            return None
        weight, bias = site.weight, site.bias
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return None  # the base map trains too: let autograd handle its gradients
        if not (x.requires_grad or self.lora_A.requires_grad or self.lora_B.requires_grad):
            return None
        return LoRALinear.apply(x, site.unipeft_weight_out_in(), bias, self.lora_A, self.lora_B, self.scale)

    def output(self, x, y):
        h = self.drop(x) if self.drop is not None else x
        t = F.linear(h, self.lora_A)
        # y + scale * t B^T as one GEMM: the add and the scale ride on the product. Without autograd
        # (inference) it goes in place, so no second output-sized tensor is allocated; with autograd
        # an in-place update would add a CopySlices node whose backward costs more than it saves.
        if not (torch.is_grad_enabled() and (y.requires_grad or t.requires_grad)) and y.is_contiguous():
            # in-place ops are outside autocast: under bf16 autocast y and t are bf16 while B is fp32
            y.view(-1, y.shape[-1]).addmm_(t.reshape(-1, t.shape[-1]).to(y.dtype), self.lora_B.t().to(y.dtype),
                                           alpha=self.scale)
            return y
        out = torch.addmm(y.reshape(-1, y.shape[-1]), t.reshape(-1, t.shape[-1]), self.lora_B.t(), alpha=self.scale)
        return out.view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)

    def merged(self, weight, bias):
        return weight + self.delta_weight().to(weight.dtype), bias


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class LoRALinear(torch.autograd.Function):
    """y = x W0^T + b + s (x A^T) B^T with W0 and b frozen, in one autograd node.

    Plain autograd runs this as four nodes and two output-sized temporaries per
    site: the base product, x A^T, the scaled B product and the sum, then in the
    backward a separate g W0 and (g B) A added together. Here the LoRA term is
    accumulated into the base output in place, and the input gradient is
    g W0 + s (g B) A written into one buffer (addmm_). It saves x (in the compute
    dtype, as autocast would), t = x A^T (rank r, small) and references to the
    weights; the backward needs nothing else. Under autocast the products run in
    the autocast dtype, the parameters' gradients come back in theirs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale):
        dt = _compute_dtype(x)
        xc = x.to(dt)
        y = F.linear(xc, weight.to(dt), None if bias is None else bias.to(dt))
        x2 = xc.reshape(-1, xc.shape[-1])
        t = x2 @ lora_A.to(dt).t()                                     # (N, r)
        y.view(-1, y.shape[-1]).addmm_(t, lora_B.to(dt).t(), alpha=scale)
        ctx.save_for_backward(x2, t, weight, lora_A, lora_B)
        ctx.scale, ctx.x_dtype, ctx.x_shape = scale, x.dtype, x.shape
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x2, t, weight, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scale
        g = grad_y.reshape(-1, grad_y.shape[-1])
        dt = g.dtype
        gt = (g @ lora_B.to(dt)).mul_(s)                                # s (g B): (N, r)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight.to(dt)
            grad_x.addmm_(gt, lora_A.to(dt))                            # + s (g B) A, in place
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_A = (gt.t() @ x2.to(dt)).to(lora_A.dtype)
        if ctx.needs_input_grad[4]:
            grad_B = (g.t() @ t.to(dt)).mul_(s).to(lora_B.dtype)
        return grad_x, None, None, grad_A, grad_B, None
