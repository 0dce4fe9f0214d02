"""LoRA (Hu et al. 2021; seed 000 and 001, "Reparametrization-based PEFT: LoRA").

    h = W0 x + (alpha / r) * B A x,   A in R^{r x k} random, B in R^{d x r} zero

so the delta is zero at initialisation and ΔW = (alpha / r) B A can be merged
into W0 for inference with no overhead.

Random-rank LoRA (seed 000's table: ranks drawn from 1-16 ... 32-64) is an option of
LoRA, not a method of its own: ``r=(low, high)`` draws each module's rank uniformly from
the range with ``seed``, and the drawn ranks are recorded as ``rank_pattern`` in the
delta's config (so ``delta.json`` holds them and a load rebuilds the same shapes).

``LoRADelta.factors()`` is the one place the (A, B, scale) of ΔW = s B A are read; the
LoRA-shaped family (DyLoRA's nested ranks, AdaLoRA's P Λ Q) subclasses the delta and
overrides only that, so the fused, plain, routed and merged paths serve them all.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import fused
from ..config import MethodConfig, check_choice, check_number, check_positive_int, method, normalize_targets
from ..errors import UnipeftError
from ..positions import LinearDelta, class_rows, linear_shape


@method
class LoRA(MethodConfig):
    """Low-rank update of chosen weight matrices.

    r: rank, or a range (low, high) to draw each module's rank from (random-rank LoRA,
    drawn with ``seed``; the drawn ranks become ``rank_pattern``); alpha: scale numerator
    (scale = alpha / r, each module with its own r); dropout: on the LoRA
    path's input; targets: which linear maps (default: every linear map of the
    blocks, "all-linear": 0.78 vs 0.57 mean accuracy for the paper's q and v over
    three tasks in benchmarks/screen_defaults.py); init: "kaiming" (uniform, as the notes'
    pseudocode) or "gaussian" (A ~ N(0, 1/r)); train_head: train (and save) a
    newly added task head; seed: draws the ranks of a range; rank_pattern: module path ->
    rank, overriding r (recorded for a range, so a saved delta reloads to the same shapes).
    """

    r: int | tuple = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple | None = None
    init: str = "kaiming"
    train_head: bool | list = True
    seed: int = 0
    rank_pattern: dict | None = None

    kind: ClassVar[str] = "lora"
    method_type: ClassVar[str] = "reparameterization"
    mergeable: ClassVar[bool] = True
    default_targets: ClassVar[tuple] = ("all-linear",)  # benchmarks/screen_defaults.py; QLoRA; He et al.

    def validate(self):
        self.r = check_rank_or_range("LoRA", self.r)
        check_positive_int("LoRA", "seed", self.seed, allow_zero=True)
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1
                    for k, v in self.rank_pattern.items()):
                raise UnipeftError(f"LoRA: rank_pattern must map module paths to ranks >= 1, got {self.rank_pattern!r}")
        check_number("LoRA", "alpha", self.alpha, lo=0, lo_open=True)
        check_number("LoRA", "dropout", self.dropout, lo=0, hi=1)
        check_choice("LoRA", "init", self.init, ("kaiming", "gaussian"))
        self.targets = normalize_targets("LoRA", self.targets)

    def install(self, view, name):
        deltas = {}
        paths = view.resolve_targets(self.targets or self.default_targets, "LoRA")
        ranks = module_ranks("LoRA", self.r, self.seed, self.rank_pattern, paths)
        if isinstance(self.r, tuple) and self.rank_pattern is None:
            # the engine's record of this delta keeps the drawn ranks: up.deltas shows them, up.save stores them
            view.delta.config = self.replace(rank_pattern=ranks)
        for path in paths:
            fan_in, fan_out = linear_shape(view.module(path))
            r = ranks[path]
            deltas[path] = LoRADelta(fan_in, fan_out, r, self.alpha / r, self.dropout, self.init)
            view.add_linear(path, deltas[path])
        # maps that read one input (q, k, v; gate, up) share one product x [A_q; A_k; A_v]^T when training
        for paths in view.map.shared_input_groups(list(deltas)):
            group = SharedInput([view.module(p) for p in paths], [deltas[p] for p in paths])
            for p in paths:
                deltas[p].__dict__["group"] = group  # a plain attribute: not a submodule, not in the state dict


def check_rank_or_range(owner: str, r):
    """A rank >= 1, or a (low, high) range of ranks with 1 <= low <= high (returned as a tuple)."""
    if isinstance(r, (list, tuple)):
        if len(r) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in r):
            raise UnipeftError(f"{owner}: r must be a rank >= 1 or a range (low, high) of two integer ranks, got {r!r}")
        low, high = r
        if low < 1:
            raise UnipeftError(f"{owner}: the rank range {tuple(r)!r} starts at {low}; ranks must be >= 1 "
                               f"(give r as a rank >= 1 or a range (low, high) with 1 <= low <= high)")
        if low > high:
            raise UnipeftError(f"{owner}: the rank range {tuple(r)!r} has low {low} > high {high}; give r as a rank "
                               f">= 1 or a range (low, high) with 1 <= low <= high")
        return (low, high)
    check_positive_int(owner, "r", r)
    return r


def module_ranks(owner: str, r, seed: int, pattern: dict | None, paths: list[str]) -> dict[str, int]:
    """Each target's rank: from ``pattern`` when given, drawn uniformly from the range ``r`` with
    ``seed`` (in target order, so the same model and seed give the same ranks), else ``r``."""
    if pattern is not None:
        missing = [p for p in paths if p not in pattern]
        extra = sorted(set(pattern) - set(paths))
        if missing or extra:
            what = f"has no rank for {missing[0]!r}" if missing else f"names {extra[0]!r}, which is not a target"
            raise UnipeftError(f"{owner}: rank_pattern {what}; it must name exactly the targeted modules "
                               f"({len(paths)} of them)")
        return {p: int(pattern[p]) for p in paths}
    if isinstance(r, tuple):
        g = torch.Generator().manual_seed(seed)
        drawn = torch.randint(r[0], r[1] + 1, (len(paths),), generator=g).tolist()
        return dict(zip(paths, drawn))
    return {p: r for p in paths}


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

    group = None  # the SharedInput this delta belongs to, if any

    def fusable(self, site) -> bool:
        """Whether the fused path computes this site: no dropout mask to keep, frozen base weights, a
        float base weight (on a quantized map the plain path runs: the quantized module's own product
        dequantises W in its forward and backward and keeps only the packed weight, where the fused
        node would keep a float copy of W for the backward)."""
        if self.drop is not None and self.training:
            return False
        if site._unipeft_quantized:
            return False
        weight, bias = site.weight, site.bias
        return not (weight.requires_grad or (bias is not None and bias.requires_grad))

    def with_base(self, site, x):
        """Training: W0 x + b + s B A x through ``LoRALinear`` (one autograd node; for a shared-input
        group, one node for all its maps)."""
        if not (fused.enabled() and torch.is_grad_enabled()) or not self.fusable(site):
            return None
        if not (x.requires_grad or self.lora_A.requires_grad or self.lora_B.requires_grad):
            return None
        if self.group is not None and not torch.compiler.is_compiling():
            y = self.group.output(self, x)
            if y is not None:
                return y
        a, b, s = self.factors()
        return LoRALinear.apply(x, (s,), site.unipeft_weight_out_in(), site.bias, a, b)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) with ΔW = s B A, as every path computes it (subclasses: DyLoRA, AdaLoRA)."""
        return self.lora_A, self.lora_B, self.scale

    def factor_sources(self) -> tuple[torch.Tensor, ...]:
        """The tensors ``factors()`` is computed from: a kept routing table is rebuilt when the
        version counter of any of them moves."""
        return self.lora_A, self.lora_B

    def output(self, x, y):
        h = self.drop(x) if self.drop is not None else x
        lora_A, lora_B, scale = self.factors()
        t = F.linear(h, lora_A)
        # y + scale * t B^T as one GEMM: the add and the scale ride on the product. Without autograd
        # (inference) it goes in place, so no second output-sized tensor is allocated; with autograd
        # an in-place update would add a CopySlices node whose backward costs more than it saves.
        if not (torch.is_grad_enabled() and (y.requires_grad or t.requires_grad)) and y.is_contiguous():
            # in-place ops are outside autocast: under bf16 autocast y and t are bf16 while B is fp32
            y.view(-1, y.shape[-1]).addmm_(t.reshape(-1, t.shape[-1]).to(y.dtype), lora_B.t().to(y.dtype),
                                           alpha=scale)
            return y
        out = torch.addmm(y.reshape(-1, y.shape[-1]), t.reshape(-1, t.shape[-1]), lora_B.t(), alpha=scale)
        return out.view(y.shape)

    @classmethod
    def routed_output(cls, site, items, x, y):
        """Several LoRA deltas, each on its own rows, in one gathered computation (per-example routing):

            y_i += s_d(i) * B_d(i) A_d(i) x_i     for every row i, d(i) its delta (zero for other rows)

        Every delta of this class at the site has its factors stacked (ranks padded with zeros to the largest,
        row 0 all zeros), gathered per row and applied as two batched products, so the cost does not
        grow with the number of deltas. (One wide product over every delta's factors, masked per
        row, was measured slower at D = 4 and 16 on the CPU.) Without autograd the stacked factors
        are kept on the site (one extra copy of its LoRA factors) until a delta or a parameter changes.
        When other rows of the batch are on other methods (or the base), only this class's rows are
        gathered and computed (``class_rows``): a batch mixing five methods does a fifth of the work."""
        if len(items) == 1 or any(d.drop is not None and d.training for _, d, _ in items):
            return super().routed_output(site, items, x, y)
        grad = torch.is_grad_enabled() and any(d.lora_A.requires_grad or d.lora_B.requires_grad for _, d, _ in items)
        # items hold exactly this class (a subclass, DyLoRA or AdaLoRA, is routed by its own call)
        (a, b), index = site.routed_table(cls.__name__, [(n, d) for n, d, _ in items], _stack_factors, grad,
                                          params=lambda d: d.factor_sources())
        slot = site.routed_slots(index, x.shape[0], x.device)
        dt, mine = y.dtype, class_rows(items, x.shape[0])
        if mine is not None:  # only this class's rows: gather and multiply for them alone
            slot, x = slot.index_select(0, mine), x.index_select(0, mine)
        n = x.shape[0]
        a, b = a.index_select(0, slot).to(dt), b.index_select(0, slot).to(dt)   # (n, R, in), (n, out, R)
        t = torch.bmm(x.to(dt).reshape(n, -1, x.shape[-1]), a.transpose(1, 2))  # (n, T, R)
        if mine is not None:
            change = torch.bmm(t, b.transpose(1, 2)).view(n, *y.shape[1:])
            if not grad:
                return y.index_add_(0, mine, change)
            return y.index_add(0, mine, change)
        if not grad and y.is_contiguous():
            y.view(n, -1, y.shape[-1]).baddbmm_(t, b.transpose(1, 2))
            return y
        return (y.reshape(n, -1, y.shape[-1]) + torch.bmm(t, b.transpose(1, 2))).view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        a, b, s = self.factors()
        return s * (b @ a)

    def merged(self, weight, bias):
        return weight + self.delta_weight().to(weight.dtype), bias


def _stack_factors(deltas) -> tuple[torch.Tensor, torch.Tensor]:
    """[0; A_1; ...] (D+1, R, in) and [0; s_1 B_1; ...] (D+1, out, R), ranks zero-padded to R."""
    factors = [d.factors() for d in deltas]
    rank = max(fa.shape[0] for fa, _, _ in factors)
    first_a, first_b, _ = factors[0]
    a = [first_a.new_zeros(rank, first_a.shape[1])]
    b = [first_b.new_zeros(first_b.shape[0], rank)]
    for fa, fb, s in factors:
        r = fa.shape[0]
        a.append(fa if r == rank else F.pad(fa, (0, 0, 0, rank - r)))
        b.append((fb if r == rank else F.pad(fb, (0, rank - r))) * s)
    return torch.stack(a), torch.stack(b)


def _as(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``t`` in dtype ``dt``; the same tensor when it already is (a no-op ``.to`` still costs a dispatch,
    and the node makes ~16 such calls per map and step)."""
    return t if t.dtype == dt else t.to(dt)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _effective_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dt) -> torch.Tensor:
    """W + s B A in the compute dtype ``dt``, summed in float32 or wider and rounded once (a bf16 sum
    would round the small LoRA term away against W's larger entries)."""
    wide = torch.promote_types(w.dtype, torch.float32)
    # autocast would run the addmm in its own dtype (bf16) inside the node's forward: rounding twice
    with torch.autocast(w.device.type, enabled=False):
        return torch.addmm(w.to(wide), b.to(wide), a.to(wide), alpha=scale).to(dt)


class SharedInput:
    """LoRA maps that read the same input tensor (q, k, v of one attention; gate and up of one FFN).

    The first of them to be called with an input x computes every member's output in one
    ``LoRALinear`` node (one x [A_1; ...; A_n]^T product, one input gradient buffer) and keeps the
    others' outputs until their own calls, which find them by x's identity. A call with another
    input, or after any parameter changed, computes anew, so a model that feeds the maps
    different tensors is still right, only not faster.
    """

    def __init__(self, sites, deltas):
        self.sites, self.deltas = sites, deltas
        self.pending: dict[int, torch.Tensor] = {}
        self.key = None

    def _state(self, x):
        # what the kept outputs depend on: the input (object and in-place version), the parameters'
        # versions (an optimizer step bumps them), grad mode and autocast
        versions = tuple(t._version for d in self.deltas for t in (d.lora_A, d.lora_B))
        return (id(x), x._version, versions, torch.is_autocast_enabled(x.device.type))

    def output(self, member, x):
        i = self.deltas.index(member)
        if self.key is not None and self.key[0] is x and self.key[1] == self._state(x) and i in self.pending:
            y = self.pending.pop(i)
            if not self.pending:
                self.key = None  # all handed out: hold no reference to x beyond the step
            return y
        self.pending, self.key = {}, None
        ready = all(site._unipeft_post and site._unipeft_post[0] is d and not site._unipeft_pre
                    and site._unipeft_replace is None and d.fusable(site)
                    for site, d in zip(self.sites, self.deltas))
        if not ready:
            return None
        params = [site.unipeft_weight_out_in() for site in self.sites] + [site.bias for site in self.sites]
        params += [d.lora_A for d in self.deltas] + [d.lora_B for d in self.deltas]
        outs = LoRALinear.apply(x, tuple(d.scale for d in self.deltas), *params)
        self.pending = {j: y for j, y in enumerate(outs) if j != i}
        self.key = (x, self._state(x))
        return outs[i]


class LoRALinear(torch.autograd.Function):
    """y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T for maps i = 1..n that read the same x, with every
    W_i and b_i frozen, in one autograd node (n = 1 for a single map).

    Plain autograd runs each map as four nodes with two output-sized temporaries (the base
    product, x A^T, the scaled B product, the sum) and, in the backward, adds 2n separate
    input gradients. Here the LoRA terms are accumulated into the base outputs in place, the
    n down-projections are one product x [A_1; ...; A_n]^T, and the input gradient
    sum_i g_i W_i + [s_1 g_1 B_1, ...] [A_1; ...] is written into one buffer (addmm_). Saved:
    x (in the compute dtype, as autocast would keep it), t = x [A]^T (rank sum_i r_i, small),
    and references to the weights. Under autocast the products run in the autocast dtype and
    the parameters' gradients come back in theirs.

    With many tokens per call the node takes the *merged* path instead (``fused.lora_merged_is_cheaper``):
    y_i = x W_eff,i^T + b_i with W_eff,i = W_i + s_i B_i A_i, formed in float32 and rounded once to the
    compute dtype. In float32 it is formed again in the backward for grad_x = sum_i g_i W_eff,i (so no
    copy of a weight outlives the forward); under autocast, where a compute-dtype copy of W is kept for
    the backward anyway, W_eff is kept in its place. The gradients of A and B are the same products in
    both paths.
    """

    @staticmethod
    def forward(ctx, x, scales, *params):
        n = len(scales)
        weights, biases, As, Bs = params[:n], params[n:2 * n], params[2 * n:3 * n], params[3 * n:]
        dt = _compute_dtype(x)
        x2 = _as(x, dt).reshape(-1, x.shape[-1])
        A = As[0] if n == 1 else torch.cat(As)                          # (sum r, k)
        t = x2 @ _as(A, dt).t()                                         # (N, sum r)
        merged = fused.lora_merged_is_cheaper(x2.shape[0], [(w.shape[0], w.shape[1], B.shape[1])
                                                             for w, B in zip(weights, Bs)], dt)
        copied = all(w.dtype != dt for w in weights)  # autocast: every weight is copied to the compute dtype
        keep_formed = merged and copied
        outs, lo, kept = [], 0, []
        stacked = None
        if n > 1 and not merged and copied and fused.stack_base([w.shape for w in weights]):
            # The weights are copied to the compute dtype anyway (autocast); copied side by side into
            # one buffer, the n base products run as one x [W_1; ...; W_n]^T, which the half-precision
            # kernels run faster than n products when some are narrow (grouped-query k and v; see
            # fused.stack_base for where it pays and where it does not).
            sizes = [w.shape[0] for w in weights]
            stacked = torch.empty(sum(sizes), weights[0].shape[1], dtype=dt, device=x.device)
            for part, w in zip(stacked.split(sizes), weights):
                part.copy_(w)
            has_bias = any(b is not None for b in biases)
            bias = None if not has_bias else torch.cat([
                b.to(dt) if b is not None else x2.new_zeros(w.shape[0], dtype=dt) for w, b in zip(weights, biases)])
            # each member's weight copy (kept for the backward) and its columns of the one product
            stacked = list(zip(stacked.split(sizes), F.linear(x2, stacked, bias).split(sizes, dim=1)))
        for k, (w, b, a, B, s) in enumerate(zip(weights, biases, As, Bs, scales)):
            r = B.shape[1]
            bias = None if b is None else _as(b, dt)
            # each output is a tensor of its own, written through a 2-D view: a view of the node's own
            # product would be an output that autograd forbids to change in place (a model's
            # relu_(up_proj(x)) would fail where the plain path and peft run)
            y = x2.new_empty(*x.shape[:-1], w.shape[0])
            y2 = y.view(-1, w.shape[0])
            if stacked is not None:
                wc, base = stacked[k]
                kept.append(wc)
                torch.addmm(base, t[:, lo:lo + r], _as(B, dt).t(), alpha=s, out=y2)
            else:
                if merged:
                    wc = _effective_weight(w, a, B, s, dt)
                    # fp32: keep a reference and form W_eff again in the backward (no extra weight copy
                    # lives through the backward). Under autocast a compute-dtype copy of W is kept
                    # anyway (autocast keeps one, and so does the factored path): keeping W_eff in its
                    # place costs no memory more and saves forming it twice.
                    kept.append(wc if keep_formed else w)
                else:
                    wc = _as(w, dt)  # under autocast a bf16 copy, kept for the backward as autocast would keep it
                    kept.append(wc)
                if bias is None:
                    torch.mm(x2, wc.t(), out=y2)
                else:
                    torch.addmm(bias, x2, wc.t(), out=y2)
                if not merged:
                    y2.addmm_(t[:, lo:lo + r], _as(B, dt).t(), alpha=s)
            outs.append(y)
            lo += r
        ctx.save_for_backward(x2, t, A, *kept, *Bs)
        ctx.merged = merged
        ctx.kept_formed = keep_formed
        ctx.scales, ctx.x_dtype, ctx.x_shape, ctx.ranks = scales, x.dtype, x.shape, [B.shape[1] for B in Bs]
        ctx.A_dtypes = [a.dtype for a in As]
        ctx.set_materialize_grads(False)  # a member whose output was never used sends no gradient
        return outs[0] if n == 1 else tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, t, A, *rest = ctx.saved_tensors
        n = len(ctx.scales)
        weights, Bs = rest[:n], rest[n:]
        live = [i for i, g in enumerate(grads) if g is not None]
        none = (None,) * (4 * n)
        if not live:
            return (None, None) + none
        dt = grads[live[0]].dtype
        gs = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads]
        # s_i (g_i B_i) for every member (zeros for an unused one), side by side: (N, sum r)
        if n == 1:
            gt = torch.mm(gs[0], _as(Bs[0], dt)).mul_(ctx.scales[0])
        else:
            gt = torch.cat([torch.zeros(x2.shape[0], r, dtype=dt, device=x2.device) if g is None
                            else (g @ _as(B, dt)).mul_(s) for g, B, s, r in zip(gs, Bs, ctx.scales, ctx.ranks)], dim=1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.merged:  # sum_i g_i W_eff,i, kept or formed again (one at a time: one extra weight alive)
                parts = A.split(ctx.ranks)
                for k, i in enumerate(live):
                    w_eff = weights[i] if ctx.kept_formed else \
                        _effective_weight(weights[i], parts[i], Bs[i], ctx.scales[i], dt)
                    grad_x = gs[i] @ w_eff if k == 0 else grad_x.addmm_(gs[i], w_eff)
            else:
                grad_x = gs[live[0]] @ weights[live[0]]
                for i in live[1:]:
                    grad_x.addmm_(gs[i], weights[i])
                grad_x.addmm_(gt, _as(A, dt))
            grad_x = _as(grad_x.view(ctx.x_shape), ctx.x_dtype)
        grad_As, grad_Bs = [None] * n, [None] * n
        if any(ctx.needs_input_grad[2 + 2 * n:2 + 3 * n]):
            gA = gt.t() @ _as(x2, dt)                                    # (sum r, k)
            grad_As = [_as(gA, ctx.A_dtypes[0])] if n == 1 else [
                _as(part, d) for part, d in zip(gA.split(ctx.ranks), ctx.A_dtypes)]
        lo = 0
        for i, (B, r) in enumerate(zip(Bs, ctx.ranks)):
            if gs[i] is not None and ctx.needs_input_grad[2 + 3 * n + i]:
                # (t_i^T g_i)^T, not g_i^T t_i: the same product, but BLAS runs the wide r x out result up to
                # 2.4x faster than the tall out x r one (benchmarks/lora_paths.py --grad-b)
                t_i = t if n == 1 else t[:, lo:lo + r]
                grad_Bs[i] = _as((_as(t_i, dt).t() @ gs[i]).mul_(ctx.scales[i]).t(), B.dtype).contiguous()
            lo += r
        return (grad_x, None) + (None,) * (2 * n) + tuple(grad_As) + tuple(grad_Bs)
