"""Random projections P: R^d -> R^D for subspace training (intrinsic dimension; seeds 000-002).

Three kinds, each built from a seed alone (so a saved delta holds theta_d and the seed, never P):

* ``fastfood`` (Le et al. 2013, as Li et al. 2018 and Aghajanyan et al. 2020 use it):
  P(x) = H G Pi H B pad(x), cut to D, where H is the Walsh-Hadamard matrix (applied with the
  fast transform, O(L log L) for L = 2^ceil(log2 max(D, d))), B a random +-1 diagonal, Pi a
  random permutation and G a Gaussian diagonal. Since pad(x) lives in the first 2^ceil(log2 d)
  entries, the inner H B pad(x) is a transform of that size, repeated (see ``Projection``): one
  transform at L per call, not two. Memory O(D): two length-L vectors (Pi mod the block, G); the
  D x d matrix is never formed.
* ``dense``: a Gaussian D x d matrix (the definition, for small D x d only).
* ``sparse``: a very sparse random matrix (Li, Hastie and Church 2006, the sparse projection of
  Li et al. 2018): about sqrt(D) nonzero +-1 entries per column, kept as (row, column, value)
  triplets, O(d sqrt(D)) memory.

All three are scaled so that P has columns of (about) unit norm, ||P x|| ~ ||x||: the three are
interchangeable at one learning rate. The random factors are non-persistent buffers: they follow
the module to a device but never enter a state dict.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn

KINDS = ("fastfood", "dense", "sparse")


_RADIX = 4  # butterfly stages applied per pass, as one product with H_16


def _hadamard_matrix(k: int, like: torch.Tensor) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=like.dtype, device=like.device)
    for _ in range(k):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def fwht(x: torch.Tensor) -> torch.Tensor:
    """The unnormalised Walsh-Hadamard transform H x over the last dimension (a power of 2).

    H_L is the Kronecker product of log2(L) copies of H_2, one per bit of the index, and the
    factors commute; so the transform runs in ceil(log2(L) / 4) passes, each applying H_16 (four
    butterfly stages at once) to four bits of the index as one product: O(L log L) work, no
    Python loop over elements. Each pass transforms the *lowest* bits, (n/16, 16) -> H_16 (n/16, 16)^T,
    and writes its result as (16, n/16), which puts those bits on top: the index bits rotate by the
    bits transformed, so once every bit has been transformed the order is back where it began. The
    product reads its operand transposed in place, so a pass is one product and no copy (0.28-0.40x
    the time of transposing around each product at 2^20-2^24, ``benchmarks/fastfood_speed.py``).
    H is symmetric, so its gradient is H again (``_FWHT``), and nothing is kept for the backward pass.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-2 length, got {n}")
    bits = n.bit_length() - 1
    rows = x.numel() // n
    y = x.reshape(rows, n)
    done = 0
    # in x's own dtype even under autocast, which would round every pass to bf16 (and copy to get there)
    with torch.autocast(y.device.type, enabled=False):
        while done < bits:
            k = min(_RADIX, bits - done)
            h = _hadamard_matrix(k, y)
            # (rows, rest, these k bits) -> (rows, these k bits transformed, rest): the bits rotate by k
            y = torch.matmul(h, y.view(rows, n >> k, 1 << k).transpose(1, 2)).view(rows, n)
            done += k
    return y.reshape(x.shape)


class _FWHT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return fwht(x)

    @staticmethod
    def backward(ctx, grad):
        return fwht(grad)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``fwht`` with a gradient that stores nothing."""
    return _FWHT.apply(x)


def seed_for(seed: int, key: str) -> int:
    """A stable 63-bit seed for one tensor's projection: the delta's seed and the tensor's path
    (Python's ``hash`` of a string changes between processes, so it cannot be used)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


class Projection(nn.Module):
    """P: R^d -> R^D for one tensor, regenerated from ``seed`` on construction."""

    def __init__(self, kind: str, d: int, D: int, seed: int):
        super().__init__()
        self.kind, self.d, self.D = kind, d, D
        g = torch.Generator().manual_seed(seed)
        if kind == "fastfood":
            L = 1 << max(0, math.ceil(math.log2(max(D, d))))
            self.L, self.seed = L, seed
            B, Pi, G = self._factors(g)
            # theta has d entries, so H B pad(theta) is the transform of its first `block` entries repeated
            # L / block times (H_L = H_{L/block} (x) H_block, and pad(theta) lives in the first block): the
            # first transform runs at the block's size, and Pi picks from that repeat, i.e. from the small
            # transform at Pi mod block. Kept: B's first d signs, Pi mod block (int32: index_select's
            # smallest index type) and G; the factors of a 38M-entry table (GPT-2's) take 0.5 GB.
            self.block = 1 << max(0, math.ceil(math.log2(d)))
            self.register_buffer("B", B[:d].clone(), persistent=False)
            self.register_buffer("Pi_low", (Pi & (self.block - 1)).to(torch.int32), persistent=False)
            self.register_buffer("G", G, persistent=False)
            # ||H G Pi H B x|| = L ||G|| ||x|| / sqrt(L) on average; keeping D of the L outputs keeps D/L of it
            self.scale = 1.0 / (math.sqrt(L * G.pow(2).sum().item()) * math.sqrt(D / L))
        elif kind == "dense":
            P = torch.randn(D, d, generator=g)
            self.register_buffer("P", P / P.norm(dim=0, keepdim=True).clamp_min(1e-12), persistent=False)
        elif kind == "sparse":
            k = max(1, round(math.sqrt(D)))  # nonzeros per column: density 1/sqrt(D)
            rows = torch.randint(0, D, (d * k,), generator=g)
            signs = torch.randint(0, 2, (d * k,), generator=g).float() * 2 - 1
            self.register_buffer("rows", rows, persistent=False)
            self.register_buffer("cols", torch.arange(d).repeat_interleave(k), persistent=False)
            self.register_buffer("vals", signs / math.sqrt(k), persistent=False)
        else:
            raise ValueError(f"unknown projection {kind!r}")

    def _factors(self, g: torch.Generator):
        """The random diagonal B (+-1, int8), permutation Pi and Gaussian diagonal G, in the order the seed draws them."""
        B = (torch.randint(0, 2, (self.L,), generator=g) * 2 - 1).to(torch.int8)
        Pi = torch.randperm(self.L, generator=g)
        return B, Pi, torch.randn(self.L, generator=g)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, Pi, G) over all L entries, drawn again from the seed (the module keeps only what it needs)."""
        return self._factors(torch.Generator().manual_seed(self.seed))

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        """P theta (length D), computed in float32 whatever the delta's dtype, and under autocast too."""
        with torch.autocast(theta.device.type, enabled=False):
            return self._project(theta.float())

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "fastfood":
            # P x = scale H G Pi H B pad(x), cut to D; the first H at the block's size (see __init__)
            small = hadamard(nn.functional.pad(x * self.scale * self.B, (0, self.block - self.d)))
            return hadamard(small.index_select(0, self.Pi_low) * self.G)[: self.D]
        if self.kind == "dense":
            return self.P.float() @ x
        out = torch.zeros(self.D, dtype=x.dtype, device=x.device)
        return out.index_add(0, self.rows, x[self.cols] * self.vals.float())

    def extra_repr(self) -> str:
        return f"{self.kind}, d={self.d}, D={self.D}"

