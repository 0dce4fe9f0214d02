"""The switch between fused training paths and the plain reference path.

Fused paths (one autograd node for a LoRA-adapted linear map, ...) compute the
same function as the plain composition of PyTorch ops, with fewer kernels and
fewer temporaries. The plain path stays available for debugging and for tests
that compare the two: ``UNIPEFT_FUSED=0`` in the environment, or::

    with unipeft.fused.disabled():
        loss = model(**batch).loss

The fused LoRA node has two ways to compute the same thing (issue 23), chosen per call by
``lora_merged_is_cheaper`` from the call's shape:

  factored   y = x W^T + s (x A^T) B^T; grad_x = g W + s (g B) A: four skinny rank-r products
             (cheap when the call has few tokens compared with the layer's width: generation,
             short sequences);
  merged     y = x W_eff^T with W_eff = W + s B A; grad_x = g W_eff. In float32 W_eff is formed in the
             forward and formed again in the backward (never kept: no extra copy of W lives through
             the backward); under autocast, where a compute-dtype copy of W is kept for the backward
             anyway, W_eff is kept in its place and formed once. Two (autocast: one) rank-r products
             of the layer's size replace two of the tokens' size.

``UNIPEFT_LORA_PATH=factored|merged`` (or ``with lora_path("merged"):``) forces one, for tests
and benchmarks; the default ``auto`` uses the cost model.

Maps that share their input (q, k, v; gate, up) and whose weights are copied to a lower compute
dtype anyway (autocast) can get their copies side by side in one buffer and one base product
instead of n (``with stacked_base(True | False | "auto"):``; default False). In bf16 on a 2-core
Xeon (``benchmarks/lora_paths.py --stacked-base``, 2026-12-03, forward + backward of the group's
node) that paid in every run where a member is narrower than the input (grouped-query k and v:
0.88-0.94x the time in five runs on two shapes) and went either way elsewhere (three equal maps
0.87-1.41x, gate and up 0.99-1.09x); ``auto`` stacks only groups with a narrow member. In whole
SmolLM2 steps (``benchmarks/lora_compute_limit.py --precision bf16 --variants ...,unipeft-unstacked``)
two runs did not show the saving (stacked 1.01-1.02x of unstacked, per-round medians either way),
so it stays off until a whole step does.
"""
from __future__ import annotations

import contextlib
import os

import torch

_enabled = os.environ.get("UNIPEFT_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")
LORA_PATHS = ("auto", "factored", "merged")
_lora_path = os.environ.get("UNIPEFT_LORA_PATH", "auto").strip().lower()
if _lora_path not in LORA_PATHS:
    raise ValueError(f"UNIPEFT_LORA_PATH={_lora_path!r}: valid values are {', '.join(LORA_PATHS)}")
# The merged path pays two products of the layer's size (out x r x in) to save two of the tokens'
# size (tokens x r x (in + out)); auto takes it when the saving is at least this many times the cost.
# Measured per layer (benchmarks/lora_paths.py, 2-core Xeon, fp32, r=16, 2026-12-01): at a ratio of
# 1.2-3.6 (SmolLM2's maps at 1,024 tokens) merged ran 0.94-0.95x of factored on three shapes and
# 1.03-1.06x on two; from 4.9 up it ran 0.86-0.92x on five of six shapes (1.03x on the down
# projection). Hence 4: a clear saving or nothing.
MERGED_BREAK_EVEN = 4.0


_stack_base = False  # see the module docstring: no whole-step gain measured yet


@contextlib.contextmanager
def stacked_base(mode):
    """Whether a shared-input LoRA group under autocast runs its base products as one: True, False
    (the default) or "auto" (groups with a member narrower than the input; see the module docstring)."""
    global _stack_base
    if mode not in (True, False, "auto"):
        raise ValueError(f"stacked_base({mode!r}): valid values are True, False, 'auto'")
    before, _stack_base = _stack_base, mode
    try:
        yield
    finally:
        _stack_base = before


def stack_base(shapes: list[tuple[int, int]]) -> bool:
    """Whether to stack the base products of a group of maps of ``shapes`` [(out, in), ...]."""
    if _stack_base == "auto":
        return any(o < i for o, i in shapes)
    return bool(_stack_base)


def enabled() -> bool:
    return _enabled


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = bool(flag)


@contextlib.contextmanager
def disabled():
    """Run the plain reference path inside the block."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


@contextlib.contextmanager
def lora_path(mode: str):
    """Force the fused LoRA node's path inside the block: "factored", "merged" or "auto"."""
    global _lora_path
    if mode not in LORA_PATHS:
        raise ValueError(f"lora_path({mode!r}): valid values are {', '.join(LORA_PATHS)}")
    before, _lora_path = _lora_path, mode
    try:
        yield
    finally:
        _lora_path = before


def lora_merged_is_cheaper(tokens: int, shapes: list[tuple[int, int, int]], dtype=None) -> bool:
    """Whether the fused LoRA node should form W_eff = W + s B A for a call with ``tokens`` rows
    over maps of ``shapes`` [(out, in, r), ...] in compute dtype ``dtype`` (see the module docstring).

    Auto keeps the factored path for half precision. Measured under bf16 autocast on a CPU with AMX:
    when W_eff was formed twice, 0.61x to 1.71x of the factored path by shape; formed once and kept
    (as now), 0.70-1.00x per layer at 1,024 tokens and more (``benchmarks/lora_paths.py --bf16``), but
    1.04x and 1.08x per round of whole SmolLM2 steps (``benchmarks/lora_compute_limit.py --precision
    bf16 --variants ...,unipeft-merged``; forming writes and reads a float32 temporary the size of W
    beyond autocast's cast, with weights no longer in cache); and a bf16 W_eff rounds s B A to the bf16
    steps of W (a term under half a step mostly vanishes from the forward), which the factored path
    keeps. So no rule for half precision yet."""
    if _lora_path != "auto":
        return _lora_path == "merged"
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        return False
    saved = tokens * sum(r * (o + i) for o, i, r in shapes)      # x A^T B^T's second product and (g B) A
    paid = 2 * sum(o * i * r for o, i, r in shapes)             # W + s B A, in the forward and the backward
    return saved >= MERGED_BREAK_EVEN * paid
