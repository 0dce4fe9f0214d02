"""The fused LoRA node's two paths, layer by layer: factored vs merged (W_eff = W + sBA), forward +
backward of one map at several token counts, and what the cost model in ``unipeft/fused.py`` picks.

    python benchmarks/lora_paths.py            # fp32
    python benchmarks/lora_paths.py bf16       # under bf16 autocast

Shapes are SmolLM2-135M's (576 wide, 1,536 FFN, 192 for its grouped k/v) and MiniLM's (384, 1,536);
r = 16; median of 10 timed calls after 2 warm-up calls, 2 threads. The ratio calibrates
``fused.MERGED_BREAK_EVEN``.
"""
import time, torch, statistics, sys
from unipeft import fused
from unipeft.methods.lora import LoRALinear
torch.set_num_threads(2)
dtype = torch.bfloat16 if len(sys.argv) > 1 and sys.argv[1] == "bf16" else None
def run(N, out, inn, r, mode, reps=12):
    x = torch.randn(N, inn, requires_grad=True)
    w = torch.randn(out, inn) * 0.02
    a = torch.nn.Parameter(torch.randn(r, inn) * 0.02); b = torch.nn.Parameter(torch.randn(out, r) * 0.02)
    g = torch.randn(N, out)
    ts = []
    for i in range(reps):
        t = time.perf_counter()
        with fused.lora_path(mode), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            y = LoRALinear.apply(x, (2.0,), w, None, a, b)
        y.backward(g.to(y.dtype))
        ts.append(time.perf_counter() - t)
        x.grad = a.grad = b.grad = None
    return statistics.median(ts[2:])
print("N out in r  factored  merged  merged/factored  model_says_merged")
for (out, inn) in [(576, 576), (192, 576), (1536, 576), (576, 1536), (384, 384), (1536, 384)]:
    for N in (256, 1024, 4096):
        f = run(N, out, inn, 16, "factored"); m = run(N, out, inn, 16, "merged")
        print(N, out, inn, 16, f"{f*1e3:.2f} {m*1e3:.2f} {m/f:.2f}", fused.lora_merged_is_cheaper(N, [(out, inn, 16)]), flush=True)
