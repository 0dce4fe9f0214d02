"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose ranks move to where they matter.

Each chosen weight matrix gets (eq. 3)

    W = W0 + s * P Λ Q,    P in R^{d x r}, Λ = diag(λ_1..λ_r), Q in R^{r x k},   s = alpha / init_r

with P, Q Gaussian and Λ zero at the start (so the delta starts at exactly zero). Training adds:

* the orthogonality regulariser (eq. 4), weight γ = ``orth_reg_weight``, averaged over the modules:
      R(P, Q) = ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2
* the importance of every entry w of P, λ, Q (eq. 8-9), smoothed over steps with its uncertainty:
      I(w) = |w * dL/dw|,  Ī ← β1 Ī + (1-β1) I,  Ū ← β2 Ū + (1-β2) |I - Ī|,  s(w) = Ī * Ū
  and of every triplet i of a module (eq. 10):
      S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)
* the cubic budget schedule (eq. 12) over the T = ``total_step`` optimizer steps, b(0) = sum of the
  initial ranks, b(T) = ``target_r`` x modules:
      t <= t_init:                 b(t) = b(0)                       (warm-up: no masking)
      t_init < t < T - t_final:    b(t) = b(T) + (b(0) - b(T)) (1 - (t - t_init) / (T - t_init - t_final))^3,
                                   masking every ΔT steps
      t >= T - t_final:            b(T); the pattern is fixed at t = T - t_final and re-applied every step
* masking (eq. 11): after the optimizer step, λ_i of every triplet outside the b(t) highest S_i of the
  whole delta is set to 0. A masked triplet can come back: λ_i still gets gradient until the next
  masking (as in the paper and peft).

**No call to remember.** peft's AdaLoRA trains as plain LoRA when ``update_and_allocate`` is not
called, needs ``total_step`` that its docs omit, and adds its regulariser only to a loss the model
returns. Here a ``RankAllocator`` runs at every optimizer step by itself (``step_hooks``): before
the step it adds γ ∇R to the gradients (so the regulariser works whatever loss the loop computes;
it is added after any gradient clipping) and updates the importance; after the step it masks. It
takes ``total_step`` from unipeft's trainer or ``transformers.Trainer`` (``step_hooks.plan``); a
plain loop that never says it is an error at the first step, before any parameter changes.

**What is saved.** The triplets that are kept or whose λ is nonzero, per module, and the pattern
as ``rank_pattern`` (module path -> init_r booleans, peft's layout) in ``delta.json``: at the end of
training that is the final allocation, and at any time the saved delta computes exactly what the
live one does. A delta built with a ``rank_pattern`` (a loaded one) has those ranks for good: it
trains with the regulariser but allocates no more.
"""
from __future__ import annotations

import copy
import weakref
from typing import ClassVar

import torch
import torch.nn as nn

from .. import step_hooks
from ..config import MethodConfig, check_number, check_positive_int, method, normalize_targets
from ..errors import UnipeftError
from ..positions import linear_shape
from .lora import LoRADelta

INIT_STD = 0.02  # P and Q ~ N(0, 0.02^2), as peft (the paper: "random Gaussian")


@method
class AdaLoRA(MethodConfig):
    """SVD-form LoRA with an importance-driven rank budget (peft's option names).

    init_r: every module's starting rank; target_r: the average rank at the end (the budget is
    target_r x modules, shared by the whole delta); tinit / tfinal: optimizer steps of warm-up
    before and of fixed ranks after the budget shrinks (an integer), or that fraction of
    total_step (a float in [0, 1), e.g. 0.1); deltaT: steps between maskings;
    total_step: the training's optimizer steps (None: taken from the trainer); beta1 / beta2:
    smoothing of the importance and of its uncertainty; orth_reg_weight: γ of the orthogonality
    regulariser; alpha: scale numerator (s = alpha / init_r); dropout, targets, train_head: as
    LoRA; rank_pattern: module path -> init_r booleans (kept triplets), recorded when saving.
    """

    init_r: int = 12
    target_r: int = 8
    tinit: int | float = 0
    tfinal: int | float = 0
    deltaT: int = 1
    total_step: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple | None = None
    train_head: bool | list = True
    rank_pattern: dict | None = None

    kind: ClassVar[str] = "adalora"
    method_type: ClassVar[str] = "reparameterization"
    mergeable: ClassVar[bool] = True
    default_targets: ClassVar[tuple] = ("all-linear",)  # as LoRA

    def validate(self):
        check_positive_int("AdaLoRA", "init_r", self.init_r)
        check_positive_int("AdaLoRA", "target_r", self.target_r)
        if self.target_r > self.init_r:
            raise UnipeftError(f"AdaLoRA: target_r {self.target_r} > init_r {self.init_r}; the budget only shrinks, "
                               f"so give target_r <= init_r")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, int) and v >= 0 or isinstance(v, float) and 0 <= v < 1):
                raise UnipeftError(f"AdaLoRA: {name} must be a number of steps (an integer >= 0) or a fraction of "
                                   f"total_step (a float in [0, 1)), got {v!r}")
        check_positive_int("AdaLoRA", "deltaT", self.deltaT)
        if self.total_step is not None:
            check_positive_int("AdaLoRA", "total_step", self.total_step)
            check_schedule(self, self.total_step)
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            check_number("AdaLoRA", name, v, lo=0, lo_open=True)
            if v >= 1:
                raise UnipeftError(f"AdaLoRA: {name} must be in (0, 1), got {v!r}")
        check_number("AdaLoRA", "orth_reg_weight", self.orth_reg_weight, lo=0)
        check_number("AdaLoRA", "alpha", self.alpha, lo=0, lo_open=True)
        check_number("AdaLoRA", "dropout", self.dropout, lo=0, hi=1)
        self.targets = normalize_targets("AdaLoRA", self.targets)
        if self.rank_pattern is not None and not (isinstance(self.rank_pattern, dict) and all(
                isinstance(k, str) and isinstance(v, list) and len(v) == self.init_r
                and all(isinstance(b, bool) for b in v) for k, v in self.rank_pattern.items())):
            raise UnipeftError(f"AdaLoRA: rank_pattern must map module paths to lists of init_r={self.init_r} "
                               f"booleans (the kept triplets)")

    def install(self, view, name):
        paths = view.resolve_targets(self.targets or self.default_targets, "AdaLoRA")
        if self.rank_pattern is not None:
            missing = [p for p in paths if p not in self.rank_pattern]
            if missing or set(self.rank_pattern) - set(paths):
                raise UnipeftError(f"AdaLoRA: rank_pattern must name exactly the targeted modules; "
                                   f"{'it has no entry for ' + repr(missing[0]) if missing else 'it names others'}")
        deltas = {}
        for path in paths:
            r = self.init_r if self.rank_pattern is None else sum(self.rank_pattern[path])
            if r == 0:
                continue  # every triplet of this module was pruned: nothing to add here
            fan_in, fan_out = linear_shape(view.module(path))
            deltas[path] = AdaLoRADelta(fan_in, fan_out, r, self.alpha / self.init_r, self.dropout)
            view.add_linear(path, deltas[path])
        allocator = RankAllocator(self, deltas, fixed=self.rank_pattern is not None)
        step_hooks.register(allocator, deltas.values())
        # the engine's copy of the config reads the allocation when saved (saved_config)
        live = self.replace()
        live.__dict__["_allocator"] = _AllocatorLink(allocator)
        view.delta.config = live

    def saved_config(self) -> "AdaLoRA":
        """The config with this delta's current ``rank_pattern`` (what ``export_state`` keeps)."""
        ref = self.__dict__.get("_allocator")
        allocator = ref() if ref is not None else None
        if allocator is None or allocator.fixed:
            return self
        return self.replace(rank_pattern=allocator.pattern())


def phase_steps(config: AdaLoRA, total: int) -> tuple[int, int]:
    """(t_init, t_final) in steps: an integer as it is, a fraction of ``total`` rounded."""
    return tuple(v if isinstance(v, int) else round(v * total) for v in (config.tinit, config.tfinal))


def check_schedule(config: AdaLoRA, total: int) -> None:
    tinit, tfinal = phase_steps(config, total)
    if tinit + tfinal >= total:
        raise UnipeftError(f"AdaLoRA: the schedule (tinit={tinit} + tfinal={tfinal} steps) is as long as "
                           f"the training ({total} steps); tinit + tfinal must be < total_step, leaving steps for "
                           f"the budget to shrink")


class AdaLoRADelta(LoRADelta):
    """ΔW = s P diag(λ) Q: LoRA's B = P (``lora_B``), A = diag(λ) Q (``lora_A`` is Q, ``lora_E`` is λ)."""

    def __init__(self, fan_in, fan_out, r, scale, dropout):
        super().__init__(fan_in, fan_out, r, scale, dropout, "gaussian")
        nn.init.normal_(self.lora_A, std=INIT_STD)
        nn.init.normal_(self.lora_B, std=INIT_STD)
        self.lora_E = nn.Parameter(torch.zeros(r))
        self.__dict__["kept"] = None  # bool (r,) from the last masking; None: all kept

    def factors(self):
        return self.lora_E.unsqueeze(1) * self.lora_A, self.lora_B, self.scale

    def factor_sources(self):
        return self.lora_A, self.lora_B, self.lora_E

    def pattern(self) -> torch.Tensor:
        """The triplets that count (bool, (r,)): all before the first masking; after it, those it kept
        and those whose λ has grown back since (nonzero)."""
        if self.kept is None:
            return torch.ones_like(self.lora_E, dtype=torch.bool)
        return (self.lora_E.detach() != 0) | self.kept.to(self.lora_E.device)

    def export_state(self) -> dict[str, torch.Tensor]:
        """The state with only ``pattern()``'s triplets (what ``up.save`` writes)."""
        keep = self.pattern()
        if bool(keep.all()):
            return self.state_dict()
        idx = keep.nonzero().squeeze(1)
        if not idx.numel():
            return {}
        return {"lora_A": self.lora_A[idx], "lora_B": self.lora_B[:, idx], "lora_E": self.lora_E[idx]}


class _AllocatorLink:
    """The engine's config of an AdaLoRA delta -> its RankAllocator: weak (the delta's modules hold the
    allocator), and followed by copy.deepcopy to the copied model's allocator."""

    def __init__(self, allocator: "RankAllocator | None"):
        self._ref = weakref.ref(allocator) if allocator is not None else step_hooks.dead_reference()

    def __call__(self) -> "RankAllocator | None":
        return self._ref()

    def __deepcopy__(self, memo):
        target = self._ref()
        return self if target is None else _AllocatorLink(copy.deepcopy(target, memo))

    def __reduce__(self):  # pickled (torch.save(model)) as a link to the pickled allocator
        return _AllocatorLink, (self._ref(),)


class RankAllocator(step_hooks.StepController):
    """The budget of one AdaLoRA delta: regulariser gradient, importance, schedule, masking."""

    def __init__(self, config: AdaLoRA, deltas: dict[str, AdaLoRADelta], fixed: bool):
        self.config, self.fixed = config, fixed
        self.paths = list(deltas)
        self.modules = [weakref.ref(d) for d in deltas.values()]  # weak: the modules hold this allocator
        self.params = [p for d in deltas.values() for p in (d.lora_A, d.lora_B, d.lora_E)]
        self.total = None
        self.tinit = self.tfinal = 0                    # in steps, once total is known
        if config.total_step is not None:
            self.set_total(config.total_step)
        self.initial_budget = sum(d.lora_E.shape[0] for d in deltas.values())
        self.target_budget = config.target_r * len(deltas)
        self.smoothed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(param) -> (Ī, Ū)
        self.final_fixed = False                        # the final pattern is set (t >= T - t_final)

    def deltas(self) -> list[AdaLoRADelta]:
        return [m for m in (r() for r in self.modules) if m is not None]

    def parameters(self):
        return self.params

    def set_total_steps(self, total: int) -> None:
        if self.config.total_step is None and not self.fixed:
            self.set_total(total)

    def set_total(self, total: int) -> None:
        check_schedule(self.config, total)
        self.total = total
        self.tinit, self.tfinal = phase_steps(self.config, total)

    def state(self) -> dict[str, torch.Tensor]:
        """The smoothed importance and uncertainty (Ī, Ū) per parameter, each module's kept triplets and
        whether the final budget is set: a resumed run masks what the uninterrupted one would."""
        out = {"final_fixed": torch.tensor(int(self.final_fixed))}
        for k, p in enumerate(self.params):
            if id(p) in self.smoothed:
                out[f"avg.{k}"], out[f"unc.{k}"] = self.smoothed[id(p)]
        for j, d in enumerate(r() for r in self.modules):
            if d is not None and d.kept is not None:
                out[f"kept.{j}"] = d.kept.to(torch.uint8)
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.final_fixed = bool(tensors.get("final_fixed", torch.tensor(0)))
        self.smoothed = {}
        for k, p in enumerate(self.params):
            if f"avg.{k}" in tensors:
                self.smoothed[id(p)] = (tensors[f"avg.{k}"].to(p.device, p.dtype).clone(),
                                        tensors[f"unc.{k}"].to(p.device, p.dtype).clone())
        for j, d in enumerate(r() for r in self.modules):
            if d is not None:
                kept = tensors.get(f"kept.{j}")
                d.__dict__["kept"] = None if kept is None else kept.to(d.lora_E.device, torch.bool)

    def lost_on_resume(self, steps):
        if self.fixed:
            return None
        return "AdaLoRA's smoothed importance scores and the triplets each module keeps (its budget allocation)"

    def pattern(self) -> dict[str, list[bool]]:
        full = [True] * self.config.init_r
        return {p: (d.pattern().tolist() if d is not None else full) for p, d in
                zip(self.paths, (r() for r in self.modules))}

    # -- before the optimizer step: the gradients are complete ------------------------------

    def before(self):
        if not self.fixed and self.total is None:
            raise UnipeftError("AdaLoRA: total_step is unknown, so the rank budget has no schedule; pass "
                               "up.AdaLoRA(total_step=<optimizer steps>), or train with unipeft's trainer or "
                               "transformers.Trainer with up.integrations.SaveDeltaCallback(), which tell it")
        deltas = self.deltas()
        if self.config.orth_reg_weight > 0 and deltas:
            self.add_orthogonality_gradient(deltas)
        t = self.steps + 1
        if not self.fixed and t <= self.total - self.tfinal:
            self.update_importance(deltas)

    @torch.no_grad()
    def add_orthogonality_gradient(self, deltas) -> None:
        """γ / K * ∇ sum_k R(P_k, Q_k) (eq. 4): d||P^T P - I||^2/dP = 4 P (P^T P - I), and for Q likewise."""
        w = 4.0 * self.config.orth_reg_weight / len(deltas)
        for d in deltas:
            p, q = d.lora_B, d.lora_A
            eye = torch.eye(p.shape[1], device=p.device, dtype=p.dtype)
            step_hooks.add_grad(p, w * (p @ (p.t() @ p - eye)))
            step_hooks.add_grad(q, w * ((q @ q.t() - eye) @ q))

    @torch.no_grad()
    def update_importance(self, deltas) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for d in deltas:
            for p in (d.lora_A, d.lora_B, d.lora_E):
                if p.grad is None:
                    continue
                sens = (p * p.grad).abs()                                   # eq. 8: |w dL/dw|
                avg, unc = self.smoothed.get(id(p), (torch.zeros_like(p), torch.zeros_like(p)))
                avg = avg.mul_(b1).add_(sens, alpha=1 - b1)                 # eq. 9: Ī
                unc = unc.mul_(b2).add_((sens - avg).abs(), alpha=1 - b2)   # eq. 9: Ū
                self.smoothed[id(p)] = (avg, unc)

    # -- after the optimizer step: the budget ------------------------------------------------

    def after(self):
        if self.fixed:
            return
        t = self.steps
        end = self.total - self.tfinal
        deltas = self.deltas()
        if t <= self.tinit or not deltas:
            return
        if t < end:
            if (t - self.tinit) % self.config.deltaT == 0:
                self.mask_to(deltas, self.budget(t))
        elif not self.final_fixed:
            self.mask_to(deltas, self.target_budget)
            self.final_fixed = True
        else:
            self.reapply(deltas)

    def budget(self, t: int) -> int:
        """Eq. 12 in the middle phase."""
        left = 1 - (t - self.tinit) / (self.total - self.tfinal - self.tinit)
        return int(self.target_budget + (self.initial_budget - self.target_budget) * left ** 3)

    def score(self, p: torch.Tensor) -> torch.Tensor:
        avg, unc = self.smoothed.get(id(p), (None, None))
        return torch.zeros_like(p) if avg is None else avg * unc

    @torch.no_grad()
    def mask_to(self, deltas, budget: int) -> None:
        """Keep the ``budget`` triplets of highest S_i (eq. 10) over the whole delta; zero λ of the rest."""
        scores = [self.score(d.lora_E) + self.score(d.lora_B).mean(0) + self.score(d.lora_A).mean(1) for d in deltas]
        flat = torch.cat([s.float() for s in scores])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, min(budget, flat.numel())).indices] = True
        lo = 0
        for d, s in zip(deltas, scores):
            d.__dict__["kept"] = keep[lo:lo + s.numel()].to(d.lora_E.device)
            lo += s.numel()
            d.lora_E.masked_fill_(~d.kept, 0.0)

    @torch.no_grad()
    def reapply(self, deltas) -> None:
        for d in deltas:
            if d.kept is not None:
                d.lora_E.masked_fill_(~d.kept, 0.0)
