"""GPU memory estimator, after the lecture notes (seed 000, slide "GPU Memory Estimated").

The notes split training memory into five parts (size(float) = bytes per value)::

    CUDA context      ~ 1 GB
    model weights     = size(float) * N_parameter
    gradients         = size(float) * N_trainable
    optimizer states  = 2 * size(float) * N_trainable          (AdamW: m and v)
    hidden states     ~ size(float) * L * (20 H seq + 3 seq^2) * batch   (L layers, H heads)

Worked example (Llama-2-7B, 16-bit, seq 4096, batch 1), in GB = 2^30 bytes:
weights 13.03, gradients 13.03, hidden 3.16, optimizer 26.06, total 56.28 (full fine-tuning);
training only 0.2M parameters: gradients 0.4 MB, optimizer 0.8 MB, total 17.19.

Which hidden-state expression gives the notes' 3.16?  (2 bytes, L = 32, H = heads = 32,
h = hidden = 4096, vocab = 32000, seq = 4096, batch 1; GiB)

    L (20 seq + 3 seq^2)             (first slide)         3.0049  -> 3.00
    L (20 H seq + 3 seq^2)           (second slide, H=32)  3.15625 -> 3.16   <-- the notes' number
    L (20 h seq + 3 H seq^2)         (h = 4096)            116.0
    3hs + 18Lhs + 3L H s^2 + V s     (detailed slide)      114.34   (no activation checkpointing)

So the 3.16 is exactly 2 * 32 * (20*32*4096 + 3*4096^2) / 2^30 = 3.15625 GiB, with H = the
number of attention heads (32), not the hidden size.  The detailed per-tensor formula (same
slides) counts every activation kept for backward and gives ~114 GiB; it is available as
``hidden="detailed"``.  The default ``hidden="notes"`` reproduces the notes.

Rounding: 7e9 * 2 bytes / 2^30 = 13.0385, which the notes write as 13.03 (truncated) and then
carry: gradients = 13.03, optimizer = 2 * 13.03 = 26.06, total = sum = 56.28 (and 17.19 for
0.2M trainable).  Adding the exact figures would give 56.31 and 17.20.  We follow the notes:
the weight figure is truncated to 0.01 GB and gradients/optimizer scale that figure by
N_trainable / N_parameter (an error below 0.01 GB per part); the exact figures are kept in
``MemoryEstimate.exact``.

Models may be given as a transformers config, a folder with config.json, a hub id
("owner/name", needs network), a preset name (see ``PRESETS``) or a plain size such as
"7B" / "135M" (the layer/head/hidden/vocab shape is then borrowed from the preset with the
nearest parameter count; only ``n_params`` comes from the size).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field

from ..errors import UnipeftError, choices

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "momentum": 1, "sgd": 0}
METHODS = ("full", "freeze", "lora", "peft", "prompt")
# QLoRA (``bits=``): bytes per weight of the blocks' linear maps as ``unipeft.quantization`` stores them:
# 8: int8 codes (bitsandbytes' fp32 scale per row, 4/in more, left out); 4: NF4 codes 0.5 + a uint8 absmax
# per block of 64 + an fp32 per 256 blocks (double quantisation); 2: packed codes 0.25 + an fp16 scale and
# zero point per 64 inputs. The other parameters (embeddings, norms, head) stay at size(float).
QUANT_BYTES = {8: 1.0, 4: 0.5 + 1 / 64 + 4 / (64 * 256), 2: 0.25 + 4 / 64}
BASE_FROZEN = ("lora", "peft", "prompt")  # the methods whose base can be quantized
HIDDEN_FORMULAS = ("notes", "detailed")

# Only the config numbers. n_params of Llama-2 are the nominal sizes the notes use
# (the exact count of Llama-2-7B is 6,738,415,616).
PRESETS = {
    "llama-2-7b": dict(layers=32, hidden=4096, heads=32, vocab=32000, intermediate=11008, n_params=7_000_000_000),
    "llama-2-13b": dict(layers=40, hidden=5120, heads=40, vocab=32000, intermediate=13824, n_params=13_000_000_000),
    "llama-2-70b": dict(layers=80, hidden=8192, heads=64, vocab=32000, intermediate=28672, n_params=70_000_000_000),
    "mistral-7b": dict(layers=32, hidden=4096, heads=32, vocab=32000, intermediate=14336, n_params=7_241_732_096),
    "smollm2-135m": dict(layers=30, hidden=576, heads=9, vocab=49152, intermediate=1536, n_params=134_515_008),
    "minilm-l6": dict(layers=6, hidden=384, heads=12, vocab=30522, intermediate=1536, n_params=22_713_216),
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMBT])\s*$", re.I)
_UNITS = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


@dataclass
class MemoryEstimate:
    model: str
    method: str
    dtype: str
    bytes_per_value: int
    batch_size: int
    seq_len: int
    optimizer: str
    hidden_formula: str
    n_params: int
    trainable_params: int
    layers: int
    hidden_size: int
    heads: int
    vocab: int
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    hidden_gb: float
    overhead_gb: float
    total_gb: float
    formulas: dict = field(default_factory=dict)
    exact: dict = field(default_factory=dict)
    bits: int | None = None  # QLoRA: the blocks' linear maps in this many bits

    def to_dict(self) -> dict:
        """All fields; the *_gb figures rounded to 0.01 GB as the notes print them."""
        d = asdict(self)
        for k in ("weights_gb", "gradients_gb", "optimizer_gb", "hidden_gb", "overhead_gb", "total_gb"):
            d[k] = round(d[k], 2)
        return d

    def table(self) -> str:
        rows = [("CUDA context", self.overhead_gb, self.formulas["overhead"]),
                ("model weights", self.weights_gb, self.formulas["weights"]),
                ("gradients", self.gradients_gb, self.formulas["gradients"]),
                ("hidden states", self.hidden_gb, self.formulas["hidden"]),
                ("optimizer states", self.optimizer_gb, self.formulas["optimizer"]),
                ("total", self.total_gb, "sum")]
        head = (f"{self.model}: method={self.method}{f' (base in {self.bits} bits)' if self.bits else ''} "
                f"dtype={self.dtype} seq_len={self.seq_len} "
                f"batch_size={self.batch_size} optimizer={self.optimizer}\n"
                f"N_parameter={self.n_params:,} N_trainable={self.trainable_params:,} "
                f"(1 GB = 2^30 bytes)")
        lines = [head, f"{'part':<18}{'memory':>12}  formula"]
        lines += [f"{name:<18}{_fmt(v):>12}  {f}" for name, v, f in rows]
        return "\n".join(lines)


def _fmt(gb: float) -> str:
    # Tiny parts in decimal MB, as the notes' "0.4 MB" (= 2e5 params * 2 bytes).
    return f"{gb * GiB / 1e6:.1f} MB" if 0 < gb < 0.01 else f"{gb:.2f} GB"


def _trunc2(x: float) -> float:
    return math.floor(x * 100 + 1e-9) / 100


def _from_config(cfg, name: str) -> dict:
    g = lambda *names, default=None: next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), default)  # noqa: E731
    layers, h = g("num_hidden_layers", "n_layer"), g("hidden_size", "n_embd", "d_model")
    heads, vocab = g("num_attention_heads", "n_head"), g("vocab_size")
    if None in (layers, h, heads, vocab):
        raise UnipeftError(f"config of {name!r} lacks layers/hidden_size/heads/vocab_size; "
                           f"use a preset ({choices(PRESETS)}) or a size like '7B'")
    inter = g("intermediate_size", "n_inner", default=4 * h) or 4 * h
    # Parameter count from the shape (biases and norms ignored): embeddings (+ untied head),
    # per layer q,o (h x h), k,v (h x kv_heads*head_dim), MLP 3 (gated: silu) or 2 matrices.
    head_dim = g("head_dim", default=h // heads) or h // heads
    kv = g("num_key_value_heads", default=heads)
    gated = str(g("hidden_act", "activation_function", default="")) in ("silu", "swish")
    experts = g("num_local_experts", default=1)
    attn = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    mlp = (3 if gated else 2) * h * inter * experts
    n = vocab * h * (1 if g("tie_word_embeddings", default=True) else 2) + layers * (attn + mlp)
    return dict(layers=layers, hidden=h, heads=heads, vocab=vocab, intermediate=inter, n_params=n,
                block_linear=layers * (attn + mlp))


def _load_config(source: str):
    try:
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(source)
    except Exception as e:  # offline, missing repo, bad json ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        offline = " (HF_HUB_OFFLINE is set: only cached models can be read)" if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else ""
        raise UnipeftError(f"cannot load the config of {source!r}{offline}: {first}") from None


def resolve_model(model) -> tuple[str, dict]:
    """Return (name, shape) where shape has layers, hidden, heads, vocab, intermediate, n_params."""
    if not isinstance(model, (str, os.PathLike)):
        name = getattr(model, "_name_or_path", "") or type(model).__name__
        return name, _from_config(model, name)
    s = os.fspath(model)
    if s.lower() in PRESETS:
        return s.lower(), dict(PRESETS[s.lower()])
    if os.path.isdir(s):
        if not os.path.isfile(os.path.join(s, "config.json")):
            raise UnipeftError(f"folder {s!r} has no config.json")
        return s, _from_config(_load_config(s), s)
    m = _SIZE.match(s)
    if m:
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
        nearest = min(PRESETS, key=lambda p: abs(math.log(PRESETS[p]["n_params"] / n)))
        return f"{s.strip().upper()} (shape of {nearest})", dict(PRESETS[nearest], n_params=n)
    if "/" in s:
        return s, _from_config(_load_config(s), s)
    raise UnipeftError(f"unknown model {s!r}: use a preset ({choices(PRESETS)}), a size like '7B', "
                       f"a folder with config.json or a hub id 'owner/name'")


def block_linear_params(shape: dict) -> int:
    """Weights of the blocks' linear maps (what ``up.quantize`` stores in fewer bits): counted from the
    config when there is one, else every parameter but one vocab x h embedding."""
    return shape.get("block_linear", shape["n_params"] - shape["vocab"] * shape["hidden"])


def weight_bytes(shape: dict, b: int, bits: int | None = None) -> float:
    """size(float) * N, or with ``bits`` the blocks' linear maps at ``QUANT_BYTES[bits]`` and the rest at b."""
    n = shape["n_params"]
    if bits is None:
        return b * n
    q = min(block_linear_params(shape), n)
    return b * (n - q) + QUANT_BYTES[bits] * q


def check_bits(method: str, bits) -> None:
    if bits is None:
        return
    if bits not in QUANT_BYTES or isinstance(bits, bool):
        raise UnipeftError(f"unknown bits {bits!r}: use {choices(sorted(QUANT_BYTES))} (QLoRA's quantized base)")
    if method not in BASE_FROZEN:
        raise UnipeftError(f"bits={bits}: {method} trains base weights, which cannot be stored quantized; "
                           f"bits applies to {choices(BASE_FROZEN)}")


def default_trainable(method: str, shape: dict) -> int:
    """N_trainable when not given: full = all; freeze = one layer's share; lora/peft = LoRA r=8
    on q and v (4 * L * h * r); prompt = 20 virtual tokens (20 * h)."""
    n, L, h = shape["n_params"], shape["layers"], shape["hidden"]
    return {"full": n, "freeze": n // L, "lora": 4 * L * h * 8, "peft": 4 * L * h * 8, "prompt": 20 * h}[method]


def estimate(config_or_size, method: str = "full", trainable_params: int | None = None, dtype: str = "bf16",
             batch_size: int = 1, seq_len: int = 4096, optimizer: str = "adamw", cuda_overhead_gb: float = 1.0,
             hidden: str = "notes", bits: int | None = None) -> MemoryEstimate:
    """Estimate training memory (GB = 2^30 bytes) with the notes' formulas; see the module docstring.
    ``bits``: QLoRA, the blocks' linear maps stored in 8, 4 or 2 bits (``QUANT_BYTES``)."""
    if method not in METHODS:
        raise UnipeftError(f"unknown method {method!r}: use {choices(METHODS)}")
    if dtype not in DTYPE_BYTES:
        raise UnipeftError(f"unknown dtype {dtype!r}: use {choices(DTYPE_BYTES)}")
    if optimizer not in OPTIMIZER_STATES:
        raise UnipeftError(f"unknown optimizer {optimizer!r}: use {choices(OPTIMIZER_STATES)}")
    if hidden not in HIDDEN_FORMULAS:
        raise UnipeftError(f"unknown hidden-state formula {hidden!r}: use {choices(HIDDEN_FORMULAS)}")
    if batch_size < 1 or seq_len < 1:
        raise UnipeftError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    check_bits(method, bits)
    name, sh = resolve_model(config_or_size)
    n, L, H, h, V = sh["n_params"], sh["layers"], sh["heads"], sh["hidden"], sh["vocab"]
    t = default_trainable(method, sh) if trainable_params is None else int(trainable_params)
    if not 0 <= t <= n:
        raise UnipeftError(f"trainable_params must be between 0 and N_parameter={n:,}, got {t:,}")
    b, k, s, bs = DTYPE_BYTES[dtype], OPTIMIZER_STATES[optimizer], seq_len, batch_size

    exact_weights = weight_bytes(sh, b, bits) / GiB
    weights = _trunc2(exact_weights)          # the notes' 13.03 for 7e9 * 2 bytes
    gradients = weights * t / n if bits is None else b * t / GiB  # = size(float) * N_trainable, on the notes' figure
    opt = k * gradients                       # = k * size(float) * N_trainable
    if hidden == "notes":
        hid = b * bs * L * (20 * H * s + 3 * s * s) / GiB
        hid_f = f"{b} * {bs} * L(20 H seq + 3 seq^2), L={L}, H=heads={H}, seq={s}"
    else:
        hid = b * bs * (3 * h * s + 18 * L * h * s + 3 * L * H * s * s + V * s) / GiB
        hid_f = f"{b} * {bs} * (3 h seq + 18 L h seq + 3 L H seq^2 + vocab seq), h={h}, L={L}, H={H}, vocab={V}, seq={s}"
    total = cuda_overhead_gb + weights + gradients + hid + opt
    formulas = {
        "overhead": f"CUDA context ~{cuda_overhead_gb} GB",
        "weights": (f"size(float) * N_parameter = {b} * {n:,}" if bits is None else
                    f"{QUANT_BYTES[bits]:.4f} * {min(block_linear_params(sh), n):,} (the blocks' linear maps at {bits} "
                    f"bits) + {b} * the other parameters") + f" (exact {exact_weights:.4f}, written to 0.01 GB)",
        "gradients": f"size(float) * N_trainable = {b} * {t:,}",
        "optimizer": f"{k} * size(float) * N_trainable ({optimizer}: {k} states)",
        "hidden": hid_f,
    }
    exact = {"weights_gb": exact_weights, "gradients_gb": b * t / GiB, "optimizer_gb": k * b * t / GiB,
             "hidden_gb": hid, "total_gb": cuda_overhead_gb + exact_weights + (1 + k) * b * t / GiB + hid}
    return MemoryEstimate(model=name, method=method, dtype=dtype, bytes_per_value=b, batch_size=bs, seq_len=s,
                          optimizer=optimizer, hidden_formula=hidden, n_params=n, trainable_params=t, layers=L,
                          hidden_size=h, heads=H, vocab=V, weights_gb=weights, gradients_gb=gradients,
                          optimizer_gb=opt, hidden_gb=hid, overhead_gb=cuda_overhead_gb, total_gb=total,
                          formulas=formulas, exact=exact, bits=bits)


# ---- the notes' hardware-requirement table, recomputed --------------------------------------
# Every cell: bytes_per_param * N * MARGIN / 2^30, with MARGIN = 1.2 (20% for activations,
# CUDA context and fragmentation).  LoRA/QLoRA adapters: ~1% of N trained at 8 bytes each
# (16-bit weight + gradient + Adam m, v) = 0.08 bytes per base parameter.
MARGIN = 1.2
HW_SIZES = (("7B", 7e9), ("13B", 13e9), ("30B", 30e9), ("70B", 70e9), ("110B", 110e9),
            ("8x7B", 47e9), ("8x22B", 141e9))
HW_METHODS = (
    ("Full (AMP)", 16.0, "fp32 weights 4 + fp32 grads 4 + Adam m,v 8 = 16 B/param",
     (120, 240, 600, 1200, 2000, 900, 2400)),
    ("Full (16-bit)", 8.0, "weights 2 + grads 2 + Adam m,v 2x2 = 8 B/param",
     (60, 120, 300, 600, 900, 400, 1200)),
    ("Freeze (16-bit)", 2.75, "weights 2 + 1/8 of params trained x (grad 2 + Adam 4) = 2.75 B/param",
     (20, 40, 80, 200, 360, 160, 400)),
    ("LoRA (16-bit)", 2.08, "weights 2 + adapters 0.08 = 2.08 B/param",
     (16, 32, 64, 160, 240, 120, 320)),
    ("QLoRA (8-bit)", 1.08, "weights 8/8 + adapters 0.08 = 1.08 B/param",
     (10, 20, 40, 80, 140, 60, 160)),
    ("QLoRA (4-bit)", 0.58, "weights 4/8 + adapters 0.08 = 0.58 B/param",
     (6, 12, 24, 48, 72, 30, 96)),
    ("QLoRA (2-bit)", 0.33, "weights 2/8 + adapters 0.08 = 0.33 B/param",
     (4, 8, 16, 24, 48, 18, 48)),
)


def hardware_table() -> list[dict]:
    """One row per (method, size): computed GB, the notes' GB and the rule used."""
    rows = []
    for method, bpp, rule, notes in HW_METHODS:
        for (size, n), nv in zip(HW_SIZES, notes):
            rows.append(dict(method=method, size=size, n_params=int(n), bytes_per_param=bpp,
                             computed_gb=round(bpp * n * MARGIN / GiB, 1), notes_gb=nv,
                             rule=f"{rule}; x N x {MARGIN} / 2^30"))
    return rows


def format_hardware_table(rows: list[dict] | None = None) -> str:
    rows = hardware_table() if rows is None else rows
    sizes = [s for s, _ in HW_SIZES]
    lines = ["Hardware requirement, GB: computed (notes)", f"{'method':<17}" + "".join(f"{s:>14}" for s in sizes)]
    rules = []
    for i, (method, *_r) in enumerate(HW_METHODS):
        cells = {r["size"]: r for r in rows if r["method"] == method}
        lines.append(f"{method:<17}" + "".join(
            f"{cells[s]['computed_gb']:>7.0f} ({cells[s]['notes_gb']:>4})" for s in sizes) + f"  [{i + 1}]")
        rules.append(f"[{i + 1}] {method}: {cells[sizes[0]]['rule']}")
    lines.append("Rules: each cell = bytes/param x N x 1.2 (20% margin for activations, context) / 2^30;"
                 " adapters ~1% of N x 8 bytes; 8x7B = 47B, 8x22B = 141B total params.")
    return "\n".join(lines + rules)
