"""Intrinsic-dimension training (Li et al. 2018; Aghajanyan et al. 2020; seeds 000, 001, 002).

Train the whole model through a random d-dimensional subspace of its parameters (seed 002):

    theta^D = theta^D_0 + P(theta^d)                      P: R^d -> R^D, random, fixed
    SAID:     theta^D_i = theta^D_0,i + lambda_i P(theta^{d-m})_i     one lambda per weight matrix

Only theta_d (and the m scales lambda) train. theta^D is, by default, every weight tensor of the
model but its normalisation layers and position tables: the weights and biases of every linear map
of the blocks (``targets`` narrows them) and the token embedding table (``embeddings``). With
``layers=``, the linear maps of the chosen blocks only: the embedding is in no block, so it is left out.
Each tensor i gets its slice of P(theta_d) from its own projection P_i (``unipeft.fastfood``:
FastFood, dense Gaussian or sparse random), as in Aghajanyan et al.'s code, so P is
block-structured, [P_1; P_2; ...], and each site computes only its own slice. Each P_i is
regenerated from (seed, the tensor's path): a saved delta is theta_d, lambda and the seed, a few
KB for any model. Left out: LayerNorms, which sit at no position of the engine (a few thousand
parameters of a model's millions), and position / token-type / relative-position tables, which
are looked up once for the whole batch (a batch of 1), so they could not be routed per example.
Task heads train whole, as with every method (``train_head``).

Positions: linear maps are ``LinearSite``s (y + x dW^T + db); so is the token embedding, a linear
map of one-hot vectors (E(x) + dE[x]); a plain ``nn.Embedding`` only, as subclasses (BART's scaled
table) compute something else in their forward. A tensor reached by several modules (T5's shared
embedding, an LM head tied to the input embedding) gets the same change at each of them.

theta_d starts at zero (the model starts exactly at the base) and lambda at one. The delta composes
with others at the same maps and merges by adding the change to each tensor once. For inference,
merge: unmerged, every forward recomputes each P_i(theta_d).
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
    weights and biases are projected onto (None: every linear map of the blocks); embeddings: the
    token embedding table too (and a tied LM head; not with layers=, which keeps to the chosen blocks);
    seed: the projection's seed."""

    d: int = 1000
    projection: str = "fastfood"
    said: bool = False
    targets: tuple | None = None
    seed: int = 0
    embeddings: bool = True
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
        if not isinstance(self.embeddings, bool):
            raise UnipeftError(f"Intrinsic: embeddings must be True or False, got {self.embeddings!r}")
        self.targets = normalize_targets("Intrinsic", self.targets)

    def install(self, view, name):
        # with layers= (unipeft.layers) theta^D is the chosen blocks' maps: the embedding is in no block
        groups = _tensors(view, self.targets, self.embeddings and view.whole_model)
        D, m = sum(size for _, _, _, size in groups), (len(groups) if self.said else 0)
        if self.d > D:
            raise UnipeftError(f"Intrinsic: d={self.d} is larger than the D={D:,} parameters it projects onto "
                               f"({len(groups)} weight tensors); choose d <= {D}")
        if self.said and self.d <= m:
            raise UnipeftError(f"Intrinsic: with said=True, d={self.d} must exceed the m={m} per-matrix scales "
                               f"(d - m entries are projected); choose d > {m}")
        if self.projection == "dense" and (self.d - m) * D > DENSE_LIMIT:
            raise UnipeftError(f"Intrinsic: a dense projection would hold d x D = {(self.d - m) * D:,} floats "
                               f"(limit {DENSE_LIMIT:,}); use projection='fastfood' or 'sparse'")
        space = Subspace(self.d - m, m)
        view.set_module(space)
        for i, (members, shape, bias, size) in enumerate(groups):
            proj = Projection(self.projection, self.d - m, size, seed_for(self.seed, members[-1][0]))
            for path, kind, owner in members:
                cls = EmbeddingSubspaceDelta if kind == "embedding" else SubspaceDelta
                view.add_linear(path, cls(space, proj, *shape, bias and owner, i if self.said else None,
                                          follower=not owner))


def _tensors(view, targets, embeddings: bool):
    """The weight tensors theta^D is made of, one group per tensor: ([(path, kind, owner)], (rows, cols),
    projected bias, size). A tensor reached by several modules (T5's shared embedding, a tied LM head)
    is one group; its owner (last) merges the change into it, the others (first, so that they merge
    and unmerge before the owner) only add it while unmerged."""
    model = view.model
    found: dict[int, list] = {}
    for path in view.resolve_targets(targets or ("all-linear",), "Intrinsic"):
        mod = view.module(path)
        fan_in, fan_out = linear_shape(mod)
        found.setdefault(id(mod.weight), []).append((path, "linear", (fan_out, fan_in), mod.bias is not None))
    emb = model.get_input_embeddings() if embeddings and hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        for path, mod in model.named_modules():
            # the token embedding (every module holding its table: T5's encoder and decoder), plain nn.Embedding
            # only: subclasses (BART's scaled table) compute something else in their forward
            if type(mod) is nn.Embedding and mod.weight is emb.weight and "unipeft_" not in path:
                found.setdefault(id(mod.weight), []).append((path, "embedding", tuple(mod.weight.shape), False))
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out is not None and id(getattr(out, "weight", None)) in found:  # a tied LM head sees the same change
            path = next(p for p, m in model.named_modules() if m is out)
            found[id(out.weight)].append((path, "linear", tuple(out.weight.shape), False))
    groups = []
    for entries in found.values():
        owner = next((e for e in entries if e[1] == "embedding"), entries[0])
        members = [(p, k, False) for p, k, _, _ in entries if p != owner[0]] + [(owner[0], owner[1], True)]
        (rows, cols), bias = owner[2], owner[3]
        groups.append((members, (rows, cols), bias, rows * cols + (rows if bias else 0)))
    return groups


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

    def __init__(self, space: Subspace, proj: Projection, fan_out: int, fan_in: int, bias: bool, index: int | None,
                 follower: bool = False):
        super().__init__()
        self.__dict__["space"] = space  # not a submodule: theta_d belongs to the whole delta
        self.proj, self.shape, self.has_bias, self.index = proj, (fan_out, fan_in), bias, index
        self.follower = follower  # shares its weight tensor with the group's owner, which merges the change

    def change(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        space = self.space
        grad = torch.is_grad_enabled() and (space.theta.requires_grad or (
            space.scales is not None and space.scales.requires_grad))
        if torch.compiler.is_compiling():  # a compiled graph cannot keep the cache (data_ptr breaks it)
            grad = True
        # without autograd (evaluation, generation) one P_i(theta_d) serves every call until theta_d moves
        key = (space.theta._version, space.theta.data_ptr(),
               None if space.scales is None else (space.scales._version, space.scales.data_ptr()))
        kept = self.__dict__.get("_kept")
        if not grad and kept is not None and kept[0] == key:
            return kept[1]
        flat = self.proj(space.theta)
        if self.index is not None:  # SAID
            flat = flat * space.scales[self.index].float()
        o, n = self.shape
        out = flat[: o * n].view(o, n), (flat[o * n:] if self.has_bias else None)
        self.__dict__["_kept"] = None if grad else (key, out)
        return out

    def output(self, x, y):
        dw, db = self.change()
        change = F.linear(x, dw.to(x.dtype), None if db is None else db.to(x.dtype))
        if change.shape[-1] != y.shape[-1]:  # a tied LM head widened by another delta (NewTokens' logits)
            return torch.cat([y[..., :change.shape[-1]] + change, y[..., change.shape[-1]:]], dim=-1)
        return y + change

    def merged(self, weight, bias):
        if self.follower:  # the owner (merged after this site) adds the change to the shared tensor
            return weight, bias
        dw, db = self.change()
        return (weight + dw.to(weight.dtype),
                bias if bias is None else bias + db.to(bias.dtype))


class EmbeddingSubspaceDelta(SubspaceDelta):
    """An embedding table's slice: E(x) + dE[x] (an embedding is a linear map of one-hot vectors)."""

    def output(self, ids, y):
        dw = self.change()[0]
        inside = ids < dw.shape[0]  # ids past the table are another delta's new tokens (NewTokens): no change
        return y + F.embedding(ids.masked_fill(~inside, 0), dw.to(y.dtype)) * inside.unsqueeze(-1).to(y.dtype)
