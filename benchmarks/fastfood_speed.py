"""The FastFood projection's cost (``unipeft/fastfood.py``), the piece that makes intrinsic-dimension
training the slowest row of the main job, against the way it was computed before 2026-12-03.

    python benchmarks/fastfood_speed.py            # the transform, the projection, a MiniLM training step
    python benchmarks/fastfood_speed.py --quick    # smaller sizes, one repetition (a smoke run)

1. The Walsh-Hadamard transform at L = 2^10 ... 2^24: ``fastfood.fwht`` (one product per pass of four
   bits, the bits rotating) against ``transposing_fwht`` below (the same passes, with the transposes
   around each product written out as copies, as the module did before); outputs compared.
2. One projection P theta, forward and backward, at the size of MiniLM's token embedding (d = 1,000,
   D = 11.7 M, L = 2^24): ``Projection`` (the first transform at the block's size, picked at Pi mod
   block) against ``former_projection`` below (both transforms at L, autograd's indexing by Pi, whose
   backward accumulates); outputs and gradients compared.
3. One training step of ``up.Intrinsic()`` (d = 1,000, FastFood) on MiniLM, 16 x 64 tokens, bf16
   autocast as the main job runs it: with the module's projection, then with ``former_projection``
   patched in (and, as before, no guard against autocast, which ran the transforms' products in bf16),
   interleaved rounds, medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from unipeft import fastfood  # noqa: E402


def transposing_fwht(x: torch.Tensor) -> torch.Tensor:
    """The transform as it was: each pass moves its four bits last with a copy, multiplies, moves them back."""
    n = x.shape[-1]
    bits = n.bit_length() - 1
    y = x.reshape(-1, n)
    low = 0
    while low < bits:
        k = min(4, bits - low)
        h = fastfood._hadamard_matrix(k, y)
        shape = (y.shape[0], n >> (low + k), 1 << low, 1 << k)
        y = y.view(y.shape[0], n >> (low + k), 1 << k, 1 << low).transpose(2, 3).reshape(-1, 1 << k)
        y = (y @ h).view(shape).transpose(2, 3).reshape(-1, n)
        low += k
    return y.reshape(x.shape)


class _TransposingFWHT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return transposing_fwht(x)

    @staticmethod
    def backward(ctx, grad):
        return transposing_fwht(grad)


def former_projection(p: fastfood.Projection, theta: torch.Tensor) -> torch.Tensor:
    """P theta as computed before: H B pad(theta) at the full length L, x[Pi] by autograd's indexing."""
    if not hasattr(p, "_full"):
        p._full = p.factors()
    B, Pi, G = p._full
    x = _TransposingFWHT.apply(torch.nn.functional.pad(theta.float(), (0, p.L - p.d)) * B)
    x = _TransposingFWHT.apply(x[Pi] * G)
    return x[: p.D] * p.scale


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def transform(sizes, reps):
    print("L  fwht (ms)  transposing (ms)  ratio  max |difference|")
    for bits in sizes:
        x = torch.randn(1 << bits)
        new, old = fastfood.fwht(x), transposing_fwht(x)
        a, b = median_ms(lambda: fastfood.fwht(x), reps), median_ms(lambda: transposing_fwht(x), reps)
        print(f"2^{bits} {a:.2f} {b:.2f} {a / b:.2f} {(new - old).abs().max().item():.1e}", flush=True)


def projection(d, D, reps):
    torch.manual_seed(0)
    p = fastfood.Projection("fastfood", d, D, seed=1)
    theta, g = torch.randn(d, requires_grad=True), torch.randn(D)

    def run(fn):
        theta.grad = None
        y = fn(theta)
        y.backward(g)
        return y.detach(), theta.grad

    (y1, g1), (y2, g2) = run(p), run(lambda t: former_projection(p, t))
    err = max(((y1 - y2).abs().max() / y2.abs().max()).item(), ((g1 - g2).abs().max() / g2.abs().max()).item())
    a = median_ms(lambda: run(p), reps)
    b = median_ms(lambda: run(lambda t: former_projection(p, t)), reps)
    print(f"P theta forward + backward, d={d}, D={D}, L={p.L}: {a:.0f} ms, former {b:.0f} ms ({a / b:.2f}x), "
          f"largest relative difference {err:.1e}", flush=True)


def training_step(rounds):
    import unipeft as up
    from unipeft.zoo import minilm

    torch.manual_seed(0)
    model = minilm(num_labels=5)[0]
    up.attach(model, up.Intrinsic())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(1000, 20000, (16, 64))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 5, (16,))}

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def old_forward(self, theta):  # before: no guard against autocast, which ran the transforms in bf16
        return former_projection(self, theta) if self.kind == "fastfood" else self._project(theta.float())

    def old_pieces(on: bool):
        fastfood.Projection.forward = old_forward if on else new_forward

    new_forward = fastfood.Projection.forward
    times = {"now": [], "before": []}
    for i in range(rounds + 1):
        for name in times:
            old_pieces(name == "before")
            t = time.perf_counter()
            step()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    old_pieces(False)
    now, before = statistics.median(times["now"]), statistics.median(times["before"])
    print(f"MiniLM + Intrinsic(d=1000), 16 x 64, bf16 autocast, medians of {rounds} interleaved rounds: "
          f"{now * 1e3:.0f} ms per step, before {before * 1e3:.0f} ms ({now / before:.2f}x)", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the training step")
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, one repetition, no step")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        transform((6, 10), reps=1)
        projection(100, 3000, reps=1)
        return 0
    transform((10, 13, 16, 20, 24), reps=5)
    projection(1000, 30522 * 384, reps=3)
    training_step(args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
