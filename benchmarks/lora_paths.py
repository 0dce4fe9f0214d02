"""The fused LoRA node's two paths, layer by layer: factored vs merged (W_eff = W + sBA), forward +
backward of one map at several token counts, and what the cost model in ``unipeft/fused.py`` picks.

    python benchmarks/lora_paths.py                  # fp32
    python benchmarks/lora_paths.py --bf16           # under bf16 autocast
    python benchmarks/lora_paths.py --grad-b         # the two orientations of B's gradient product
    python benchmarks/lora_paths.py --floor          # the LoRA products no exact path can skip, per step

Shapes are SmolLM2-135M's (576 wide, 1,536 FFN, 192 for its grouped k/v) and MiniLM's (384, 1,536);
r = 16; median of 10 timed calls after 2 warm-up calls, ``--threads`` threads (default 2). The ratio
calibrates ``fused.MERGED_BREAK_EVEN``. ``--grad-b`` times s g^T t (out x r, the textbook form) against
(t^T g)^T (r x out, then transposed), the choice made in ``LoRALinear.backward``. ``--floor`` adds up,
over SmolLM2-135M's 30 blocks at 8 x 128 tokens, the four products every exact LoRA step needs
whatever its path (t = x A^T, g B, and the two weight gradients (gB)^T x and t^T g; one down-
projection per shared-input group), next to the frozen base's own products (x W^T and g W): the
LoRA step cannot come closer to the compute limit than their ratio.
"""
import argparse
import statistics
import time

import torch

from unipeft import fused
from unipeft.methods.lora import LoRALinear

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (384, 384), (1536, 384)]


def median_ms(fn, reps=12, warmup=2):
    times = []
    for i in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times[warmup:]) * 1e3


def node(N, out, inn, r, mode, bf16):
    x = torch.randn(N, inn, requires_grad=True)
    w = torch.randn(out, inn) * 0.02
    a = torch.nn.Parameter(torch.randn(r, inn) * 0.02)
    b = torch.nn.Parameter(torch.randn(out, r) * 0.02)
    g = torch.randn(N, out)

    def call():
        with fused.lora_path(mode), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = LoRALinear.apply(x, (2.0,), w, None, a, b)
        y.backward(g.to(y.dtype))
        x.grad = a.grad = b.grad = None
    return median_ms(call)


def paths(bf16):
    print("N out in r  factored_ms  merged_ms  merged/factored  model_says_merged")
    for out, inn in SHAPES:
        for N in (256, 1024, 4096):
            f, m = node(N, out, inn, 16, "factored", bf16), node(N, out, inn, 16, "merged", bf16)
            print(N, out, inn, 16, f"{f:.2f} {m:.2f} {m / f:.2f}",
                  fused.lora_merged_is_cheaper(N, [(out, inn, 16)]), flush=True)


def grad_b():
    print("N out r  g^T t (ms)  (t^T g)^T (ms)  ratio")
    for out in sorted({o for o, _ in SHAPES}):
        for N in (256, 1024, 4096):
            g, t = torch.randn(N, out), torch.randn(N, 16)
            tall = median_ms(lambda: (g.t() @ t).mul_(2.0), reps=32)
            wide = median_ms(lambda: (t.t() @ g).mul_(2.0).t().contiguous(), reps=32)
            print(N, out, 16, f"{tall:.3f} {wide:.3f} {wide / tall:.2f}", flush=True)


def floor(tokens=1024, r=16, layers=30):
    # SmolLM2-135M's block: q, k, v share x (one A product); gate, up share the normed x; o; down
    groups = [[(576, 576), (192, 576), (192, 576)], [(576, 576)], [(1536, 576), (1536, 576)], [(576, 1536)]]
    lora = base = 0.0
    for group in groups:
        inn = group[0][1]
        x = torch.randn(tokens, inn)
        a = torch.randn(r * len(group), inn)
        lora += median_ms(lambda: x @ a.t(), reps=22)
        for out, _ in group:
            w, g, b, t = torch.randn(out, inn), torch.randn(tokens, out), torch.randn(out, r), torch.randn(tokens, r)
            gb = g @ b
            lora += median_ms(lambda: g @ b, reps=22) + median_ms(lambda: gb.t() @ x, reps=22) \
                + median_ms(lambda: t.t() @ g, reps=22)
            base += median_ms(lambda: x @ w.t(), reps=12) + median_ms(lambda: g @ w, reps=12)
    print(f"per step ({layers} blocks, {tokens} tokens, r={r}): frozen base products {base * layers:.0f} ms, "
          f"the four LoRA products {lora * layers:.0f} ms = {lora / base:.1%} of the base products")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bf16", action="store_true", help="under bf16 autocast")
    ap.add_argument("--grad-b", action="store_true", help="time the two orientations of B's gradient")
    ap.add_argument("--floor", action="store_true", help="the LoRA products every exact path needs, per step")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    floor() if args.floor else grad_b() if args.grad_b else paths(args.bf16)
