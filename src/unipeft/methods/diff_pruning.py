"""Diff pruning (Guo et al. 2021; seed 001 "DiffPruning").

The notes: "for each parameter, fine-tune a learnable delta which gets added to the original
parameter value; use an L0-norm penalty to encourage sparsity in the deltas." Guo et al.:

    theta_tau = theta + delta_tau,   delta_tau = z_tau (.) w_tau
    min  L(theta + delta_tau) + lambda * E[ ||delta_tau||_0 ]

with the binary gate z relaxed to the hard-concrete distribution (Louizos et al. 2018):

    u ~ U(0, 1),   s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = min(1, max(0, s (zeta - gamma) + gamma))
    E[ ||delta||_0 ] = sum sigmoid(log_alpha - beta log(-gamma / zeta))

and, at test time, z = min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma)). After
training, magnitude projection to an exact budget: keep the k = (1 - sparsity) N entries of
|delta| that are largest, drop the rest, and store the delta sparse.

Training form: a ``DiffDelta`` at each target linear map adds x (z (.) w)^T to its output.
The penalty enters any training loop without a line of the user's: a step controller adds
lambda * dE[||delta||_0]/dlog_alpha to the gradients before each optimizer step (step_hooks),
the gradient of the penalised loss, for as long as the expected density is above 1 - sparsity
(lambda drives the delta down to its target, then stops). With Adam the size of lambda matters
only against the task's own gradient on log_alpha, as for any term of a loss.

Final form: ``up.finalize(model, name)`` (``unipeft train`` calls it; ``up.save`` applies it
to the live model too, so the file and the model in memory never differ) projects, takes the
``DiffDelta`` modules off their maps and makes the delta a sparse delta over the same weights
(``unipeft.sparse``): indices + values, added to the weights, composable with other sparse
deltas, trainable further on its fixed entries. A saved delta loads in that form.
"""
from __future__ import annotations

import math
import weakref
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import positions as pos
from .. import sparse, step_hooks
from ..config import MethodConfig, check_number, method, normalize_targets
from ..errors import UnipeftError


@method
class DiffPruning(MethodConfig):
    """sparsity: the share of the target weights' entries left unchanged at the end, in (0, 1)
    (0.995: 0.5% change, Guo et al.'s budget); l0_weight: lambda; beta, gamma, zeta: the
    hard-concrete temperature and stretch (Louizos et al. 2018's defaults); init_log_alpha:
    where the gates start (3: open, so w trains from the first step); targets: linear maps
    whose weights get a diff (None: every linear map of the blocks); finalized: set by
    ``up.finalize``: the delta is its projected sparse form."""

    sparsity: float = 0.995
    l0_weight: float = 1.25e-7
    beta: float = 2 / 3
    gamma: float = -0.1
    zeta: float = 1.1
    init_log_alpha: float = 3.0
    targets: tuple | None = None
    train_head: bool | list = True
    finalized: bool = False

    kind: ClassVar[str] = "diff_pruning"
    method_type: ClassVar[str] = "selective"
    mergeable: ClassVar[bool] = True
    routable: ClassVar[bool] = False  # its final form changes base weights in place (up.route says so)

    def validate(self):
        if not isinstance(self.sparsity, (int, float)) or isinstance(self.sparsity, bool) \
                or not 0 < self.sparsity < 1:
            raise UnipeftError(f"DiffPruning: sparsity must be in (0, 1) (the share of entries left unchanged), "
                               f"got {self.sparsity!r}")
        check_number("DiffPruning", "l0_weight", self.l0_weight, 0)
        check_number("DiffPruning", "beta", self.beta, 0, lo_open=True)
        check_number("DiffPruning", "init_log_alpha", self.init_log_alpha)
        if not (isinstance(self.gamma, (int, float)) and isinstance(self.zeta, (int, float))
                and self.gamma < 0 and self.zeta > 1):
            raise UnipeftError(f"DiffPruning: the stretch needs gamma < 0 and zeta > 1, got gamma={self.gamma!r}, "
                               f"zeta={self.zeta!r}")
        if not isinstance(self.finalized, bool):
            raise UnipeftError(f"DiffPruning: finalized must be True or False, got {self.finalized!r}")
        self.targets = normalize_targets("DiffPruning", self.targets)

    def install(self, view, name):
        maps = view.resolve_targets(self.targets or ("all-linear",), "DiffPruning")
        if self.finalized:  # a saved delta: its entries come from the file (sparse.restore)
            params = [f"{m}.weight" for m in maps]
            sparse.attach_state(view, params, {p: torch.zeros(0, dtype=torch.long) for p in params},
                                sparse.SparseController(view.model, name))
            return
        deltas = {}
        for m in maps:
            in_f, out_f = pos.linear_shape(view.module(m))
            deltas[m] = DiffDelta(out_f, in_f, self)
            view.add_linear(m, deltas[m])
        step_hooks.register(L0Penalty(self, list(deltas.values())), deltas.values())

    @torch.no_grad()
    def finalize(self, model: nn.Module, reg, delta) -> None:
        """Magnitude projection to exactly k = (1 - sparsity) N entries, in the live model."""
        if self.finalized:
            return
        from .. import engine, merging

        merged = delta.merged
        if merged:
            engine.unmerge(model, delta.name)
        gated, diffs, chosen = self._projection(model, delta)
        originals = engine.original_base_tensors(model)
        for path in gated:  # the training form leaves the maps
            site = model.get_submodule(path)
            del site.unipeft_deltas[delta.name]
            del delta.linear[path]
            site.unipeft_refresh(reg.active)
            pos.uninstall_linear_site(site)
        params = {p: model.get_parameter(p) for p in diffs}
        for p in params:
            delta.selected[p] = originals[p].detach().clone()
        state = sparse.SparseState(params, chosen)
        for p, idx in chosen.items():
            state.set(p, idx, diffs[p][idx], like=params[p])
        state.controller = sparse.SparseController(model, delta.name)
        step_hooks.register(state.controller, [])
        delta.sparse = state
        delta.config = self.replace(finalized=True)
        on = delta.name in reg.active
        for param in params.values():
            param.requires_grad_(on)
        sparse.compose(model, reg)
        if merged:
            merging.merge(model, delta.name)

    def _projection(self, model: nn.Module, delta):
        """The gated maps, each one's dense diff (flat, in its weight's own layout) and the top-k entries
        of all of them together (k = (1 - sparsity) N): the final form, not yet taken."""
        gated = {path: d for path, d in delta.linear.items() if isinstance(d, DiffDelta)}
        diffs = {}
        for path, d in gated.items():
            site = model.get_submodule(path)
            dense = d.diff(deterministic=True)
            diffs[f"{path}.weight"] = (dense.T if site._unipeft_transposed else dense).reshape(-1)
        chosen = sparse.top_k({p: t.abs() for p, t in diffs.items()},
                              sparse.budget(1 - self.sparsity, sum(t.numel() for t in diffs.values())))
        return gated, diffs, chosen

    @torch.no_grad()
    def final_tensors(self, model: nn.Module, reg, delta) -> dict[str, torch.Tensor]:
        """The tensors ``up.save`` writes for the final form, without taking it: the live delta goes on
        training in its gated form (``up.save(..., keep_training=True)``, checkpoints in the middle of a
        run). The same bytes as ``finalize`` followed by a save."""
        if self.finalized:
            raise UnipeftError("DiffPruning.final_tensors: the delta already has its final form")
        from ..storage import delta_tensors

        gated, diffs, chosen = self._projection(model, delta)
        # the rest of the delta (a trained head) as it is; the gated maps' training form gives way to the sparse one
        training_form = {f"linear:{path}.{n}" for path, d in gated.items() for n, _ in d.state_dict().items()}
        out = {k: v for k, v in delta_tensors(model, delta).items() if k not in training_form}
        for p, flat in diffs.items():
            idx = chosen[p]
            out.update(sparse.file_tensors(p, idx, flat[idx].to(model.get_parameter(p).dtype), flat.numel()))
        return out


class DiffDelta(pos.LinearDelta):
    """y + x (z (.) w)^T: a per-entry diff w behind a hard-concrete gate z (eq. above)."""

    rewrites_output = True

    def __init__(self, out_features: int, in_features: int, config: DiffPruning):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(out_features, in_features))
        self.log_alpha = nn.Parameter(torch.full((out_features, in_features), float(config.init_log_alpha)))
        self.beta, self.gamma, self.zeta = config.beta, config.gamma, config.zeta

    def gate(self, deterministic: bool = False) -> torch.Tensor:
        if self.training and not deterministic:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)

    def diff(self, deterministic: bool = False) -> torch.Tensor:
        return self.gate(deterministic) * self.w

    def open_probability(self) -> torch.Tensor:
        """P(z != 0) per entry: the expected L0 norm's summand."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def output(self, x, y):
        return y + F.linear(x, self.diff().to(x.dtype))

    def merged(self, weight, bias):
        return weight + self.diff(deterministic=True).detach().to(weight.dtype), bias


class L0Penalty(step_hooks.StepController):
    """Adds lambda * d E[||delta||_0] / d log_alpha to the gradients before each optimizer step,
    while the expected density is above the target."""

    def __init__(self, config: DiffPruning, deltas: list[DiffDelta]):
        self.weight, self.target = config.l0_weight, 1 - config.sparsity
        self.modules = [weakref.ref(d) for d in deltas]  # weak: the modules hold this controller
        self.params = [d.log_alpha for d in deltas]

    def parameters(self):
        return self.params

    @torch.no_grad()
    def before(self) -> None:
        deltas = [m for m in (r() for r in self.modules) if m is not None]
        probs = [d.open_probability() for d in deltas]
        density = sum(p.sum() for p in probs) / sum(p.numel() for p in probs)
        if density <= self.target:
            return
        for d, p in zip(deltas, probs):
            step_hooks.add_grad(d.log_alpha, self.weight * p * (1 - p))  # d sigmoid / d log_alpha
