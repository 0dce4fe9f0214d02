"""Intrinsic-dimension training (Li et al. 2018; Aghajanyan et al. 2020; seeds 000, 001, 002).

Train the whole model through a random d-dimensional subspace of its parameters (seed 002):

    theta^D = theta^D_0 + P(theta^d)                      P: R^d -> R^D, random, fixed
    SAID:     theta^D_i = theta^D_0,i + lambda_i P(theta^{d-m})_i     one lambda per weight matrix

Only theta_d (and the m scales lambda) train. The chosen parameters are the weights and biases of
the chosen linear maps (every linear map of the blocks by default); each map i gets its slice of
P(theta_d) from its own projection P_i (``unipeft.fastfood``: FastFood, dense Gaussian or sparse
random), as in Aghajanyan et al.'s code, so P is block-structured, [P_1; P_2; ...], and each site
computes only its own slice. Each P_i is regenerated from (seed, the map's path): a saved delta is
theta_d, lambda and the seed, a few KB for any model.

theta_d starts at zero (the model starts exactly at the base) and lambda at one. The change of a
map is y + x dW^T + db, so the delta composes with others at the same map and merges by adding
(dW, db) to the weights. For inference, merge: unmerged, every forward recomputes each P_i(theta_d).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MethodConfig, check_choice, check_positive_int, method, normalize_targets
from ..errors import UnipeftError
from ..fastfood import KINDS, Projection, seed_for
from ..positions import LinearDelta, linear_shape

DENSE_LIMIT = 1 << 27  # floats a dense projection may hold (512 MB in float32); beyond it FastFood or sparse


@method
class Intrinsic(MethodConfig):
    """d: the subspace's dimension (with said, d - m project and m are the per-matrix scales);
    projection: 'fastfood' (O(D) memory), 'dense' (D x d, small models) or 'sparse';
    said: structure-aware (one learned lambda per weight matrix); targets: the linear maps whose
    weights and biases are projected onto (None: every linear map of the blocks); seed: the
    projection's seed."""

    d: int = 1000
    projection: str = "fastfood"
    said: bool = False
    targets: tuple | None = None
    seed: int = 0
    train_head: bool | list = True

    kind: ClassVar[str] = "intrinsic"
    method_type: ClassVar[str] = "reparameterization"
    mergeable: ClassVar[bool] = True  # theta_0 + P(theta_d) is a change of weights

    def validate(self):
        check_positive_int("Intrinsic", "d", self.d)
        check_choice("Intrinsic", "projection", self.projection, KINDS)
        if not isinstance(self.said, bool):
            raise UnipeftError(f"Intrinsic: said must be True or False, got {self.said!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UnipeftError(f"Intrinsic: seed must be an integer, got {self.seed!r}")
        self.targets = normalize_targets("Intrinsic", self.targets)

    def install(self, view, name):
        paths = view.resolve_targets(self.targets or ("all-linear",), "Intrinsic")
        shapes = []
        for path in paths:
            fan_in, fan_out = linear_shape(view.module(path))
            shapes.append((fan_out, fan_in, view.module(path).bias is not None))
        sizes = [o * i + (o if b else 0) for o, i, b in shapes]
        D, m = sum(sizes), (len(paths) if self.said else 0)
        if self.d > D:
            raise UnipeftError(f"Intrinsic: d={self.d} is larger than the D={D:,} parameters it projects onto "
                               f"({len(paths)} linear maps); choose d <= {D}")
        if self.said and self.d <= m:
            raise UnipeftError(f"Intrinsic: with said=True, d={self.d} must exceed the m={m} per-matrix scales "
                               f"(d - m entries are projected); choose d > {m}")
        if self.projection == "dense" and (self.d - m) * D > DENSE_LIMIT:
            raise UnipeftError(f"Intrinsic: a dense projection would hold d x D = {(self.d - m) * D:,} floats "
                               f"(limit {DENSE_LIMIT:,}); use projection='fastfood' or 'sparse'")
        space = Subspace(self.d - m, m)
        view.set_module(space)
        for i, (path, (o, n, b)) in enumerate(zip(paths, shapes)):
            proj = Projection(self.projection, self.d - m, o * n + (o if b else 0), seed_for(self.seed, path))
            view.add_linear(path, SubspaceDelta(space, proj, o, n, b, i if self.said else None))


class Subspace(nn.Module):
    """theta_d (zeros: the model starts at the base) and, for SAID, lambda (ones)."""

    def __init__(self, d: int, m: int):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(d))
        self.scales = nn.Parameter(torch.ones(m)) if m else None


class SubspaceDelta(LinearDelta):
    """A linear map's slice of theta_0 + lambda_i P(theta_d): y + x dW^T + db.

    Holds a reference to the delta's ``Subspace`` (not a copy: it is saved once, as a
    model-level module) and its own projection, whose factors are never saved."""

    rewrites_output = True

    def __init__(self, space: Subspace, proj: Projection, fan_out: int, fan_in: int, bias: bool, index: int | None):
        super().__init__()
        self.__dict__["space"] = space  # not a submodule: theta_d belongs to the whole delta
        self.proj, self.shape, self.has_bias, self.index = proj, (fan_out, fan_in), bias, index

    def change(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        flat = self.proj(self.space.theta)
        if self.index is not None:  # SAID
            flat = flat * self.space.scales[self.index].float()
        o, n = self.shape
        return flat[: o * n].view(o, n), (flat[o * n:] if self.has_bias else None)

    def output(self, x, y):
        dw, db = self.change()
        return y + F.linear(x, dw.to(x.dtype), None if db is None else db.to(x.dtype))

    def merged(self, weight, bias):
        dw, db = self.change()
        return (weight + dw.to(weight.dtype),
                bias if bias is None else bias + db.to(bias.dtype))
