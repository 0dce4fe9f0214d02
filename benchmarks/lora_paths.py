"""The fused LoRA node's two paths, layer by layer: factored vs merged (W_eff = W + sBA), forward +
backward of one map at several token counts, and what the cost model in ``unipeft/fused.py`` picks.

    python benchmarks/lora_paths.py                  # fp32
    python benchmarks/lora_paths.py --bf16           # under bf16 autocast
    python benchmarks/lora_paths.py --grad-b         # the two orientations of B's gradient product
    python benchmarks/lora_paths.py --floor          # the LoRA products no exact path can skip, per step
    python benchmarks/lora_paths.py --overhead       # the per-call cost of a LoRA map, unipeft vs peft
    python benchmarks/lora_paths.py --stacked        # W and A in one buffer: one product instead of two?
    python benchmarks/lora_paths.py --stacked-base   # a shared-input group's base products as one, or n

Shapes are SmolLM2-135M's (576 wide, 1,536 FFN, 192 for its grouped k/v) and MiniLM's (384, 1,536);
r = 16; median of 10 timed calls after 2 warm-up calls (the two paths called in turn), ``--threads`` threads (default 2). The ratio
calibrates ``fused.MERGED_BREAK_EVEN``. ``--grad-b`` times s g^T t (out x r, the textbook form) against
(t^T g)^T (r x out, then transposed), the choice made in ``LoRALinear.backward``. ``--floor`` adds up,
over SmolLM2-135M's 30 blocks at 8 x 128 tokens, the four products every exact LoRA step needs
whatever its path (t = x A^T, g B, and the two weight gradients (gB)^T x and t^T g; one down-
projection per shared-input group), next to the frozen base's own products (x W^T and g W): the
LoRA step cannot come closer to the compute limit than their ratio. ``--overhead`` trains a Llama
as deep as SmolLM2-135M (30 blocks, LoRA r=4 on its 210 linear maps) but 64 wide, on 8 tokens, so
that the products cost next to nothing and a step's time over the frozen model's is what each
LoRA map's call costs (Python, dispatch, small kernels): unipeft's fused node against peft's layers,
interleaved rounds, medians; this is the part of a step that does not shrink on faster hardware. ``--stacked`` tests the idea of
keeping A under W in one (out + r, in) buffer, so that x [W; A]^T gives the base output and t = x A^T
in one product and [g, s gB] [W; A] the whole input gradient in one (the buffer made once, not timed):
each against the two products it would replace, at 1,024 tokens, with and without the copies the layout
forces (y is a strided view of the (N, out + r) result and must be made contiguous for the layers after;
g arrives on its own and must be copied next to s gB). ``--stacked-base`` times one shared-input group's
node (forward + backward, 1,024 tokens, bf16 autocast) with its members' weight copies stacked into one
base product (``fused.stacked_base(True)``) against n products (``False``), interleaved rounds, on
grouped-query shapes (narrow k, v), equal-width q, k, v and an FFN's gate, up; the last column says
which the default ``auto`` stacks (fp32 copies no weight, so the node never stacks there).
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
    """One forward + backward of a LoRA map through the fused node on path ``mode``, as a closure."""
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
    return call


def interleaved_ms(fns, rounds=10, warmup=2):
    """Median time of each closure over ``rounds`` rounds that call them in turn (a slow spell of a shared
    machine then hits every closure alike, not one)."""
    times = [[] for _ in fns]
    for k in range(rounds + warmup):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            if k >= warmup:
                times[i].append(time.perf_counter() - t)
    return [statistics.median(ts) * 1e3 for ts in times]


def paths(bf16):
    dt = torch.bfloat16 if bf16 else torch.float32
    print("N out in r  factored_ms  merged_ms  merged/factored  model_says_merged")
    for out, inn in SHAPES:
        for N in (256, 1024, 4096):
            f, m = interleaved_ms([node(N, out, inn, 16, "factored", bf16), node(N, out, inn, 16, "merged", bf16)])
            print(N, out, inn, 16, f"{f:.2f} {m:.2f} {m / f:.2f}",
                  fused.lora_merged_is_cheaper(N, [(out, inn, 16)], dt), flush=True)


def grad_b():
    print("N out r  g^T t (ms)  (t^T g)^T (ms)  ratio")
    for out in sorted({o for o, _ in SHAPES}):
        for N in (256, 1024, 4096):
            g, t = torch.randn(N, out), torch.randn(N, 16)
            tall = median_ms(lambda: (g.t() @ t).mul_(2.0), reps=32)
            wide = median_ms(lambda: (t.t() @ g).mul_(2.0).t().contiguous(), reps=32)
            print(N, out, 16, f"{tall:.3f} {wide:.3f} {wide / tall:.2f}", flush=True)


def floor_arithmetic(tokens=1024, seq=128, r=16, layers=30, vocab=49152, hidden=576):
    """The same floor in multiply-adds, not time: what a LoRA step must compute beyond the frozen step,
    whatever the hardware, if every product ran equally fast."""
    maps = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in)
    linear = sum(o * i for o, i in maps)                  # per token and block
    attention = 2 * seq * hidden                          # q k^T and p v, per token and block
    # the frozen step: forward + the activation gradients (g W per map, the attention's four products,
    # the output layer's g E); no weight gradients
    frozen = tokens * (layers * (2 * linear + 3 * attention) + 2 * vocab * hidden)
    four = tokens * layers * sum(2 * r * (o + i) for o, i in maps)        # t, gB, (gB)^T x, t^T g
    factored = tokens * layers * sum(3 * r * (o + i) for o, i in maps)    # + t B^T and (gB) A
    merged = four + layers * sum(2 * o * i * r for o, i in maps)          # + W + sBA, forward and backward
    kept = four + layers * sum(o * i * r for o, i in maps)                # autocast: W_eff formed once, kept
    print(f"multiply-adds per step ({layers} blocks, {tokens} tokens of {seq}, r={r}, vocabulary {vocab}): "
          f"frozen step {frozen / 1e9:.1f} G; the four LoRA products every exact path needs "
          f"{four / 1e9:.2f} G = {four / frozen:.1%}; the factored path {factored / frozen:.1%}; the merged "
          f"path {merged / frozen:.1%} in fp32, {kept / frozen:.1%} under autocast (W_eff kept in place of "
          f"autocast's copy of W) (AdamW on the factors and Python per call come on top)")


def floor(tokens=1024, r=16, layers=30):
    floor_arithmetic(tokens=tokens, r=r, layers=layers)
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


def stacked(tokens=1024, r=16):
    print("out in | forward: x W^T + x A^T, x [W;A]^T, + copy (ms) | backward: g W + (gB) A, [g, gB] [W;A], + cat (ms)")
    for out, inn in SHAPES[:4]:
        x, g = torch.randn(tokens, inn), torch.randn(tokens, out)
        w, a, gb = torch.randn(out, inn), torch.randn(r, inn), torch.randn(tokens, r)
        wa, ggb = torch.cat([w, a]), torch.cat([g, gb], dim=1)
        two_fwd = median_ms(lambda: x @ w.t(), reps=22) + median_ms(lambda: x @ a.t(), reps=22)
        one_fwd = median_ms(lambda: x @ wa.t(), reps=22)
        one_fwd_copy = median_ms(lambda: (x @ wa.t())[:, :out].contiguous(), reps=22)
        two_bwd = median_ms(lambda: torch.addmm(g @ w, gb, a), reps=22)
        one_bwd = median_ms(lambda: ggb @ wa, reps=22)
        one_bwd_cat = median_ms(lambda: torch.cat([g, gb], dim=1) @ wa, reps=22)
        print(out, inn, f"| {two_fwd:.2f} {one_fwd:.2f} {one_fwd_copy:.2f} ({one_fwd_copy / two_fwd:.2f}x) "
              f"| {two_bwd:.2f} {one_bwd:.2f} {one_bwd_cat:.2f} ({one_bwd_cat / two_bwd:.2f}x)", flush=True)


def stacked_base(tokens=1024, r=16, rounds=21):
    groups = {"SmolLM2 q,k,v": [(576, 576), (192, 576), (192, 576)],
              "Llama-3-1B-like q,k,v": [(2048, 2048), (512, 2048), (512, 2048)],
              "MiniLM q,k,v": [(384, 384)] * 3, "equal 576 q,k,v": [(576, 576)] * 3,
              "SmolLM2 gate,up": [(1536, 576), (1536, 576)]}
    print(f"group | n base products (ms) | one stacked product (ms) | ratio | auto stacks   (bf16 autocast, "
          f"forward + backward, {tokens} tokens, medians of {rounds} interleaved rounds)")
    for name, shapes in groups.items():
        inn = shapes[0][1]
        x = torch.randn(tokens, inn, requires_grad=True)
        ws = [torch.randn(o, inn) * 0.02 for o, _ in shapes]
        As = [torch.nn.Parameter(torch.randn(r, inn) * 0.02) for _ in shapes]
        Bs = [torch.nn.Parameter(torch.randn(o, r) * 0.02) for o, _ in shapes]
        gs = [torch.randn(tokens, o).bfloat16() for o, _ in shapes]

        def call(stack):
            with fused.lora_path("factored"), fused.stacked_base(stack), torch.autocast("cpu", dtype=torch.bfloat16):
                ys = LoRALinear.apply(x, (2.0,) * len(shapes), *ws, *[None] * len(shapes), *As, *Bs)
            torch.autograd.backward(ys, gs)
            x.grad = None
            for p in As + Bs:
                p.grad = None
        times = {True: [], False: []}
        for _ in range(rounds):
            for stack in (False, True):
                call(stack)
                t = time.perf_counter()
                for _ in range(3):
                    call(stack)
                times[stack].append((time.perf_counter() - t) / 3 * 1e3)
        n_ms, one_ms = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name} | {n_ms:.2f} | {one_ms:.2f} | {one_ms / n_ms:.2f}x | {fused.stack_base(shapes)}", flush=True)


def overhead(rounds=40):
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import unipeft as up

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 128, (1, 8))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    frozen = copy.deepcopy(base).requires_grad_(False)
    frozen.get_input_embeddings().weight.requires_grad_(True)  # the same backward through every block
    uni = copy.deepcopy(base)
    up.attach(uni, up.LoRA(r=4, targets=targets))
    models = {"frozen": frozen, "unipeft": uni,
              "peft": get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=targets))}
    params = {k: [p for p in m.parameters() if p.requires_grad] for k, m in models.items()}

    def step(k):
        models[k](input_ids=ids, labels=ids).loss.backward()
        for p in params[k]:
            p.grad = None

    times = {k: [] for k in models}
    for i in range(rounds + 5):
        for k in models:
            t = time.perf_counter()
            step(k)
            if i >= 5:
                times[k].append(time.perf_counter() - t)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    extra = {k: ms[k] - ms["frozen"] for k in ("unipeft", "peft")}
    print(f"forward + backward, 30 blocks x 64 wide, 8 tokens, medians of {rounds} interleaved rounds: frozen "
          f"{ms['frozen']:.1f} ms, unipeft {ms['unipeft']:.1f} ms, peft {ms['peft']:.1f} ms; the 210 LoRA maps add "
          f"{extra['unipeft']:.1f} ms (unipeft) and {extra['peft']:.1f} ms (peft): "
          f"{extra['unipeft'] / extra['peft']:.2f}x, {1e3 * extra['unipeft'] / 210:.0f} vs "
          f"{1e3 * extra['peft'] / 210:.0f} us per map")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bf16", action="store_true", help="under bf16 autocast")
    ap.add_argument("--grad-b", action="store_true", help="time the two orientations of B's gradient")
    ap.add_argument("--floor", action="store_true", help="the LoRA products every exact path needs, per step")
    ap.add_argument("--overhead", action="store_true", help="the per-call cost of a LoRA map, unipeft vs peft")
    ap.add_argument("--stacked", action="store_true", help="W and A in one buffer against two products")
    ap.add_argument("--stacked-base", action="store_true", help="a shared-input group's base products: one or n")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.overhead:
        overhead()
    elif args.stacked:
        stacked()
    elif args.stacked_base:
        stacked_base()
    else:
        floor() if args.floor else grad_b() if args.grad_b else paths(args.bf16)
