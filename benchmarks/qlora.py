"""QLoRA at 8, 4 and 2 bits against fp32 LoRA: weight error, storage, step time, peak memory, quality.

    OMP_NUM_THREADS=2 python benchmarks/qlora.py --model smollm2 --data-dir ../shared/data/glue/SST-2
    OMP_NUM_THREADS=1 python benchmarks/qlora.py --tiny          # smoke run on a tiny random Llama (< 1 min)

Widths: fp32 (plain LoRA), bf16 (the whole model in bf16, plain LoRA: the notes' "LoRA (16-bit)"),
8 (LLM.int8(), bitsandbytes), 4 (NF4 + double quantisation, bitsandbytes), 2 (unipeft's packed format:
4 codes a byte, fp16 scale + zero point per 64 inputs); the quantized arms keep the other parameters
(embeddings, norms, head) and the LoRA factors in fp32. Every arm puts LoRA (r=8, alpha 16) on every
linear map of the blocks, and quantizes exactly those maps (``up.QLoRA``).

Parts (--parts, default all):

* errors   every linear weight of the blocks quantized alone: relative error ||W - W_deq||_F / ||W||_F
           over all of them, mean |W - W_deq| per weight, and the bytes stored per weight (the
           quantized module's tensors: codes, scales, zero points, bitsandbytes' nested statistics).
* time     seconds per training step (forward + backward + AdamW) of the causal LM with LoRA, each width
           against fp32 (median of --steps steps after 2 warm-up steps; batch --batch, --seq tokens).
* memory   peak training memory, each width in a fresh process: the peak RSS (VmHWM) of 3 training
           steps minus the RSS of python + torch (the method of benchmarks/memory_validation.py), against
           two estimates: ``unipeft estimate --device cpu --method lora --bits B`` (``memory_cpu``, calibrated
           on this CPU; the blocks' linear maps at ``memory.QUANT_BYTES[B]``, the rest fp32) and the lecture
           notes' hardware rule (``analysis.memory.HW_METHODS``: weights bits/8 + adapters 0.08 B/parameter, x 1.2).
* quality  SST-2 dev accuracy (a 2-way head on the model, trained with the delta; --train-size
           sentences, one epoch, batch 32, linear warm-up and decay, fp32) at each width, and the same
           delta loaded onto the fp32 base (``up.save`` -> ``up.load``: what the delta is worth
           without the quantized base).

Writes --out (JSON) and prints markdown tables. The SmolLM2 weights come from a Q4_1 GGUF file
(``unipeft.zoo``): the "fp32" base is already on a 4-bit grid, which flatters every width's error a little.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
import unipeft as up  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sst2_common import accuracy, batches, read_tsv, train  # noqa: E402
from unipeft.architectures import map_model  # noqa: E402
from unipeft.targets import resolve  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # LLM.int8() logs its fp16 cast on every call
WIDTHS = (32, 16, 8, 4, 2)  # 32: the fp32 base, plain LoRA; 16: the whole model in bf16, plain LoRA
MB = 2**20


def label(bits: int) -> str:
    return {32: "fp32", 16: "bf16"}.get(bits, f"{bits}-bit")


# ----------------------------------------------------------------------------------- models ----
def causal_lm(name: str):
    if name == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny

        return tiny.make("llama", "lm")
    from unipeft import zoo

    return zoo.smollm2()[0] if name == "smollm2" else zoo.minilm(2)[0]


def classifier(name: str):
    """(model with a new 2-way head, tokenizer)."""
    if name == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny

        return tiny.make("llama", "cls").train(), tiny.tokenizer("llama")
    from unipeft import zoo

    if name == "minilm":
        return zoo.minilm(2)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = zoo.smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def attach(model, bits: int, r: int = 8):
    """LoRA r=8 on every linear map of the blocks: on the fp32 base (32), the base in bf16 (16; the
    LoRA factors follow it), or on the maps quantized at ``bits`` (up.QLoRA)."""
    if bits == 16:
        model = model.to(torch.bfloat16)
    method = up.LoRA(r=r, alpha=16) if bits in (32, 16) else up.QLoRA(bits=bits, r=r, alpha=16)
    return up.attach(model, method, name="t")


# ------------------------------------------------------------------------------------ parts ----
def weight_errors(name: str) -> dict:
    from unipeft.quantization import bnb, dequantize
    from unipeft.quantization.packed2bit import Packed2bitLinear
    from transformers.pytorch_utils import Conv1D

    model = causal_lm(name)
    paths = resolve(model, map_model(model), ("all-linear",), "benchmark")
    out = {}
    for bits in (16, 8, 4, 2):
        sq = ref = ab = n = stored = 0.0
        for p in paths:
            m = model.get_submodule(p)
            w = (m.weight.T if isinstance(m, Conv1D) else m.weight).detach().float()
            if bits == 16:  # bf16 rounding, for scale
                d, nbytes = w.bfloat16().float() - w, 2 * w.numel()
            else:
                q = (bnb.make_8bit(w, None, 0.0) if bits == 8 else bnb.make_4bit(w, None, torch.float32)
                     if bits == 4 else Packed2bitLinear.from_weight(w, None, 64))
                d = dequantize(q, torch.float32) - w
                nbytes = sum(t.numel() * t.element_size() for k, t in q.state_dict().items() if not k.endswith("bias"))
            sq += d.pow(2).sum().item()
            ref += w.pow(2).sum().item()
            ab += d.abs().sum().item()
            n += w.numel()
            stored += nbytes
        out[bits] = {"rel_error": math.sqrt(sq / ref), "mean_abs_error": ab / n, "bytes_per_weight": stored / n,
                     "weights": int(n), "maps": len(paths)}
    return out


def lm_batch(model, batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def train_step(model, opt, batch):
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_times(name: str, batch: int, seq: int, steps: int) -> dict:
    out = {}
    for bits in WIDTHS:
        torch.manual_seed(0)
        model = attach(causal_lm(name), bits).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        b = lm_batch(model, batch, seq)
        for _ in range(2):
            train_step(model, opt, b)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            train_step(model, opt, b)
            times.append(time.perf_counter() - t0)
        out[bits] = {"s_per_step": statistics.median(times)}
        del model, opt
    for bits in WIDTHS:
        out[bits]["vs_fp32"] = out[bits]["s_per_step"] / out[32]["s_per_step"]
    return out


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def memory_worker(name: str, bits: int, batch: int, seq: int) -> dict:
    """One width in this (fresh) process: peak RSS of 3 training steps minus python + torch (+ bitsandbytes,
    imported first in every arm so that its libraries count for none of them)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    base_kb = _rss_kb("VmRSS")
    model = causal_lm(name)
    n_float = sum(p.numel() for p in model.parameters())
    attach(model, bits).train()
    loaded_kb = _rss_kb("VmRSS")
    base_bytes = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if "unipeft_" not in k)
    trainable, _ = up.trainable_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    b = lm_batch(model, batch, seq)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM from here: the training steps, not the loading transient
    for _ in range(3):
        train_step(model, opt, b)
    peak_kb = _rss_kb("VmHWM")
    quantized = sum(m.in_features * m.out_features for m in model.modules()
                    if up.quantization.bits_of(m) is not None) if bits < 16 else 0
    return {"peak_mb": (peak_kb - base_kb) / 1024, "loaded_mb": (loaded_kb - base_kb) / 1024,
            "base_bytes_mb": base_bytes / MB, "n_params": n_float, "trainable": trainable,
            "quantized_weights": quantized, "config": model.config.to_dict()}


def peak_memory(name: str, batch: int, seq: int) -> dict:
    from transformers import AutoConfig

    from unipeft.analysis.memory import HW_METHODS, MARGIN
    from unipeft.analysis.memory_cpu import estimate_cpu

    # the notes' rows "LoRA (16-bit)", "QLoRA (8-bit)", ...: bytes per parameter
    notes_rule = {32: None, **{int(m.split("(")[1].split("-")[0]): bpp for m, bpp, *_ in HW_METHODS
                               if m.startswith(("QLoRA", "LoRA"))}}
    out = {}
    for bits in WIDTHS:
        cmd = [sys.executable, __file__, "--worker-memory", str(bits), "--model", name, "--batch", str(batch),
               "--seq", str(seq)]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if res.returncode:
            raise RuntimeError(f"memory worker ({label(bits)}) failed:\n{res.stderr[-3000:]}")
        w = json.loads(res.stdout.strip().splitlines()[-1])
        cfg = AutoConfig.for_model(**w.pop("config"))
        # what `unipeft estimate --device cpu --method lora [--bits B] [--dtype bf16]` says
        est = estimate_cpu(cfg, method="lora", trainable_params=w["trainable"], n_params=w["n_params"],
                           batch_size=batch, seq_len=seq, task="causal-lm", dtype="bf16" if bits == 16 else "fp32",
                           bits=bits if bits < 16 else None)
        predicted = est["total_mb"]
        notes = (notes_rule[bits] * w["n_params"] * MARGIN / MB) if notes_rule[bits] else None
        out[bits] = {**w, "estimate_cpu_mb": predicted, "estimate_weights_mb": est["parts_mb"]["weights"],
                     "notes_rule_mb": notes, "error_vs_estimate": w["peak_mb"] / predicted - 1}
    return out


def quality(name: str, train_rows, dev_rows, lr: float) -> dict:
    _, tok = classifier(name)
    train_batches = batches(tok, train_rows, 32, seed=0)
    dev = batches(tok, dev_rows, 64)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bits in WIDTHS:
            torch.manual_seed(0)  # the same head and LoRA initialisation at every width
            model = attach(classifier(name)[0], bits)
            sec = train(model, train_batches, lr)
            out[bits] = {"accuracy": accuracy(model, dev), "s_per_step": sec}
            if bits != 32:  # the same delta on the fp32 base
                up.save(model, Path(tmp) / label(bits), name="t")
                torch.manual_seed(0)
                # the bf16 arm's base is the fp32 one cast: its fingerprint differs by design
                fp = up.load(classifier(name)[0], Path(tmp) / label(bits), check_base=bits != 16)
                out[bits]["accuracy_on_fp32_base"] = accuracy(fp, dev)
            del model
    return {"accuracy": out, "steps": len(train_batches), "train_size": len(train_rows), "dev_size": len(dev_rows)}


# ------------------------------------------------------------------------------------- main ----
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "minilm", "tiny"))
    ap.add_argument("--tiny", action="store_true", help="smoke run: tiny random Llama, synthetic sentences")
    ap.add_argument("--parts", default="errors,time,memory,quality")
    ap.add_argument("--data-dir", default="../shared/data/glue/SST-2")
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--dev-size", type=int, default=None, help="default: the whole dev set (872)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per width")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qlora.json"))
    ap.add_argument("--worker-memory", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.worker_memory is not None:
        print(json.dumps(memory_worker(args.model, args.worker_memory, args.batch, args.seq)))
        return 0
    if args.tiny:
        args.model, args.batch, args.seq, args.steps = "tiny", 4, 16, 3
        args.out = str(Path(tempfile.gettempdir()) / "qlora_tiny.json")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    results = {"settings": {**vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__}}
    if "errors" in parts:
        results["errors"] = e = weight_errors(args.model)
        print(f"\nWeight error, {args.model}: every linear map of the blocks ({e[4]['maps']} maps, "
              f"{e[4]['weights']:,} weights)\n")
        print("| width | relative error | mean abs error | bytes per weight |\n|---|---|---|---|")
        for bits, r in e.items():
            print(f"| {label(bits)} | {r['rel_error']:.4f} | {r['mean_abs_error']:.2e} | {r['bytes_per_weight']:.4f} |")
    if "time" in parts:
        results["time"] = t = step_times(args.model, args.batch, args.seq, args.steps)
        print(f"\nTraining step (LoRA r=8 on all linear maps), {args.model}, batch {args.batch} x {args.seq} tokens, "
              f"{torch.get_num_threads()} thread(s)\n")
        print("| width | s/step | vs fp32 |\n|---|---|---|")
        for bits, r in t.items():
            print(f"| {label(bits)} | {r['s_per_step']:.4f} | {r['vs_fp32']:.2f}x |")
    if "memory" in parts:
        results["memory"] = m = peak_memory(args.model, args.batch, args.seq)
        print(f"\nPeak training memory (MB = 2^20 B), {args.model}, batch {args.batch} x {args.seq} tokens, "
              f"3 AdamW steps, fresh process each\n")
        print("| width | measured peak | unipeft estimate --device cpu | error | base tensors | "
              "notes' rule (x1.2, GPU) |\n|---|---|---|---|---|---|")
        for bits, r in m.items():
            notes = f"{r['notes_rule_mb']:.0f}" if r["notes_rule_mb"] else "-"
            print(f"| {label(bits)} | {r['peak_mb']:.0f} | {r['estimate_cpu_mb']:.0f} | "
                  f"{r['error_vs_estimate']:+.0%} | {r['base_bytes_mb']:.0f} | {notes} |")
    if "quality" in parts:
        if args.model == "tiny":
            sys.path.insert(0, str(ROOT / "tests"))
            import tiny

            rows = tiny.sentiment_rows(160)
            train_rows, dev_rows = rows[:128], rows[128:]
            args.lr = 1e-2
        else:
            data = Path(args.data_dir)
            train_rows = read_tsv(data / "train.tsv", args.train_size)
            dev_rows = read_tsv(data / "dev.tsv", args.dev_size)
        results["quality"] = q = quality(args.model, train_rows, dev_rows, args.lr)
        print(f"\nSST-2 dev accuracy, {args.model}, {q['train_size']} sentences, one epoch ({q['steps']} steps of 32), "
              f"lr {args.lr:g}; the delta trained at each width, and the same file loaded onto the fp32 base\n")
        print("| width | accuracy | on the fp32 base | s/step |\n|---|---|---|---|")
        for bits, r in q["accuracy"].items():
            fp = f"{r['accuracy_on_fp32_base']:.4f}" if "accuracy_on_fp32_base" in r else "-"
            print(f"| {label(bits)} | {r['accuracy']:.4f} | {fp} | {r['s_per_step']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
