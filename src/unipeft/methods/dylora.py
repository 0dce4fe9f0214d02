"""DyLoRA (Valipour et al. 2023): one LoRA delta trained for every rank b <= r at once.

LoRA's factors are read as nested ranks: W_dw = A in R^{r x k}, W_up = B in R^{d x r}, and the
rank-b delta uses their first b rows / columns. Training (the paper's Algorithm 1, "frozen" mode):

    every optimizer step:  b ~ Uniform{1, ..., r}                  (one b for the whole model)
    h = W0 x + (alpha / b) * B[:, :b] A[:b] x                       (eq. 7: the scale is alpha / b)
    with A[:b-1] and B[:, :b-1] detached                            (eq. 5-6: only row b of A and
                                                                     column b of B get gradient)

rows above b take no part in the step. After training any b <= r is a LoRA delta of rank b:
``up.set_rank(model, name, 4)`` or ``up.load(base, dir, rank=4)``; merging folds the current
rank's (alpha / b) B[:, :b] A[:b] into W0.

Not kohya's alpha / r * sqrt(r / b): the paper's eq. 7 divides by the truncated rank b.

How b is drawn (the choice, and why): a ``RankSampler`` per delta draws the b of step t from a
``torch.Generator`` seeded with (``seed``, t) -- the first at attach, the next after every
optimizer step (``step_hooks``: a process-wide ``torch.optim`` post-step hook). So b changes once
per *optimizer step*, not per forward: with gradient accumulation every micro-batch of a step
trains the same b, as one large batch would; no call in the training loop is needed; and the
draws are a function of the step, so every process of a distributed run draws the same b, and a
resumed run draws what the uninterrupted one would have (the b of its first step comes back with
the training checkpoint: ``RankSampler.state``). A forward in training mode (``model.train()``)
uses the drawn b; eval mode uses the inference rank (``rank``, default r).

"Frozen" here is the paper's: no gradient reaches the lower rows that step. An optimizer with
momentum (Adam) still moves them by their earlier momentum, as in the paper's implementation.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from .. import step_hooks
from ..config import MethodConfig, check_choice, check_number, check_positive_int, method, normalize_targets
from ..errors import UnipeftError, choices
from ..positions import linear_shape
from .lora import LoRADelta


@method
class DyLoRA(MethodConfig):
    """Nested-rank LoRA: one trained delta serves every rank <= r.

    r: the largest rank; alpha: scale numerator (scale = alpha / b at rank b, eq. 7);
    dropout, targets, init, train_head: as LoRA; seed: the generator of the per-step rank
    draws; rank: the rank used outside training (None: r), changed by ``up.set_rank`` and
    ``up.load(..., rank=)`` and saved with the delta.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple | None = None
    init: str = "kaiming"
    train_head: bool | list = True
    seed: int = 0
    rank: int | None = None

    kind: ClassVar[str] = "dylora"
    method_type: ClassVar[str] = "reparameterization"
    mergeable: ClassVar[bool] = True
    nested_ranks: ClassVar[bool] = True  # up.set_rank and up.load(rank=) apply
    default_targets: ClassVar[tuple] = ("all-linear",)  # as LoRA

    def validate(self):
        check_positive_int("DyLoRA", "r", self.r)
        check_number("DyLoRA", "alpha", self.alpha, lo=0, lo_open=True)
        check_number("DyLoRA", "dropout", self.dropout, lo=0, hi=1)
        check_choice("DyLoRA", "init", self.init, ("kaiming", "gaussian"))
        check_positive_int("DyLoRA", "seed", self.seed, allow_zero=True)
        if self.rank is not None:
            check_rank(self.rank, self.r)
        self.targets = normalize_targets("DyLoRA", self.targets)

    def install(self, view, name):
        sampler = RankSampler(self.r, self.seed)
        deltas = []
        for path in view.resolve_targets(self.targets or self.default_targets, "DyLoRA"):
            fan_in, fan_out = linear_shape(view.module(path))
            d = DyLoRADelta(fan_in, fan_out, self.r, self.alpha, self.dropout, self.init, sampler)
            d.set_rank(self.rank or self.r)
            # the rank depends on the mode: take the model's (a new module starts in training mode)
            d.train(view.module(path).training)
            view.add_linear(path, d)
            deltas.append(d)
        sampler.params = [d.lora_A for d in deltas] + [d.lora_B for d in deltas]
        step_hooks.register(sampler, deltas)


def check_rank(rank, r: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r:
        raise UnipeftError(f"DyLoRA: rank must be an integer from 1 to r={r} (the ranks this delta was trained "
                           f"for), got {rank!r}")


class RankSampler(step_hooks.StepController):
    """b ~ Uniform{1..r} for the whole delta, drawn again after every optimizer step."""

    def __init__(self, r: int, seed: int):
        self.r, self.seed = r, seed
        self.params: list[nn.Parameter] = []  # the delta's factors (parameters only: no cycle with its modules)
        self.b = self.draw(1)

    def draw(self, t: int) -> int:
        """b for optimizer step t (1, 2, ...): uniform in 1..r, a function of (seed, t) only."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + t)
        return int(torch.randint(1, self.r + 1, (1,), generator=g))

    def parameters(self):
        return self.params

    def after(self):
        self.b = self.draw(self.steps + 1)

    def state(self):  # the rank of the next step: a resumed run trains the b the uninterrupted one would
        return {"b": torch.tensor(self.b)}

    def load_state(self, tensors):
        self.b = int(tensors["b"])

    def lost_on_resume(self, steps):
        if self.b == self.draw(steps + 1):
            return None  # the rank drawn at attach is the one the resumed step needs
        return f"DyLoRA's rank for step {steps + 1} (the first resumed step trains rank {self.b}, drawn for step 1)"


class DyLoRADelta(LoRADelta):
    """LoRA factors read at a rank: the drawn b in training mode, ``self.rank`` otherwise."""

    def __init__(self, fan_in, fan_out, r, alpha, dropout, init, sampler: RankSampler):
        super().__init__(fan_in, fan_out, r, alpha / r, dropout, init)
        self.alpha = alpha
        self.__dict__["sampler"] = sampler  # shared by the delta's modules; not a submodule
        self.rank = r
        # its version counter moves with the rank, so kept routing tables are rebuilt (factor_sources)
        self.__dict__["rank_version"] = torch.zeros(())

    def set_rank(self, rank: int) -> None:
        self.rank = rank
        self.scale = self.alpha / rank
        self.rank_version.add_(1)

    def factors(self):
        if not self.training:
            b = self.rank
            return self.lora_A[:b], self.lora_B[:, :b], self.alpha / b
        b = self.sampler.b
        a, up = self.lora_A, self.lora_B
        if b > 1:  # eq. 5-6: rows below b frozen this step, row b trained, rows above unused
            a = torch.cat([a[:b - 1].detach(), a[b - 1:b]])
            up = torch.cat([up[:, :b - 1].detach(), up[:, b - 1:b]], dim=1)
        else:
            a, up = a[:1], up[:, :1]
        return a, up, self.alpha / b  # eq. 7

    def factor_sources(self):
        return self.lora_A, self.lora_B, self.rank_version

    def delta_weight(self):
        """The inference rank's (alpha / b) B[:, :b] A[:b], whatever the mode (merging in train mode too)."""
        b = self.rank
        return (self.alpha / b) * (self.lora_B[:, :b] @ self.lora_A[:b])


def set_rank(model: nn.Module, name: str, rank: int) -> nn.Module:
    """Use rank ``rank`` of DyLoRA delta ``name`` from now on (outside training; saved with the delta)."""
    from ..engine import _require

    _, delta = _require(model, name)
    if not getattr(type(delta.config), "nested_ranks", False):
        from ..config import METHODS

        ok = sorted(k for k, c in METHODS.items() if getattr(c, "nested_ranks", False))
        raise UnipeftError(f"up.set_rank: delta {name!r} is {delta.config.kind}, whose rank is fixed; methods with "
                           f"a rank to choose after training: {choices(ok)}")
    check_rank(rank, delta.config.r)
    if delta.merged:
        raise UnipeftError(f"up.set_rank: delta {name!r} is merged at rank {delta.config.rank or delta.config.r}; "
                           f"up.unmerge(model, {name!r}) first")
    for d in delta.linear.values():
        if isinstance(d, DyLoRADelta):
            d.set_rank(rank)
    delta.config = delta.config.replace(rank=rank)
    return model
