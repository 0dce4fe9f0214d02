"""The FastFood projection's cost (``unipeft/fastfood.py``), the piece that makes intrinsic-dimension
training the slowest row of the main job, against the way it was computed before 2026-12-03.

    python benchmarks/fastfood_speed.py            # the transform, the permutation, a MiniLM training step
    python benchmarks/fastfood_speed.py --quick    # smaller sizes, one repetition (a smoke run)

1. The Walsh-Hadamard transform at L = 2^10 ... 2^24: ``fastfood.fwht`` (one product per pass of four
   bits, the bits rotating) against ``transposing_fwht`` below (the same passes, with the transposes
   around each product written out as copies, as the module did before); outputs compared.
2. The permutation x[Pi] at 2^24 entries, forward and backward: ``fastfood.permute`` (a scatter) against
   autograd's indexing (whose backward accumulates); gradients compared.
3. One training step of ``up.Intrinsic()`` (d = 1,000, FastFood) on MiniLM, 16 x 64 tokens, bf16
   autocast as the main job runs it: with the module's pieces, then with the old ones patched in (both
   of the above, and the projection's forward without its autocast guard: before, autocast ran the
   transform's products in bf16, rounding every pass and copying to get there), interleaved rounds,
   medians.
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


def indexing_permute(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return x[perm]


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


def permutation(bits, reps):
    n = 1 << bits
    perm = torch.randperm(n).to(torch.int32)  # as Projection keeps it
    x, g = torch.randn(n, requires_grad=True), torch.randn(n)

    def run(fn):
        x.grad = None
        fn(x, perm).backward(g)
        return x.grad

    same = torch.equal(run(fastfood.permute), run(indexing_permute))
    a = median_ms(lambda: run(fastfood.permute), reps)
    b = median_ms(lambda: run(indexing_permute), reps)
    print(f"x[Pi] forward + backward at 2^{bits}: permute {a:.0f} ms, autograd indexing {b:.0f} ms "
          f"({a / b:.2f}x), gradients equal: {same}", flush=True)


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

    def old_forward(self, theta):  # before: no guard against autocast, which ran the transform in bf16
        return self._project(theta.float())

    def old_pieces(on: bool):
        fastfood.fwht = transposing_fwht if on else new_fwht
        fastfood.permute = indexing_permute if on else new_permute
        fastfood.Projection.forward = old_forward if on else new_forward

    new_fwht, new_permute, new_forward = fastfood.fwht, fastfood.permute, fastfood.Projection.forward
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
        permutation(10, reps=1)
        return 0
    transform((10, 13, 16, 20, 24), reps=5)
    permutation(24, reps=3)
    training_step(args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
