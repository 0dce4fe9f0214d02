"""Validate the training-memory estimator against measured peak memory on this CPU machine.

For each configuration (model x method x batch x seq) a FRESH subprocess:

1. imports torch / transformers / unipeft and records its RSS (the "baseline": python + torch);
2. loads the model in fp32, attaches the method (``up.FullFineTune()``, ``up.LoRA``, ``up.PromptTuning(20)``);
3. resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5, so the transient peak of
   ``from_pretrained`` -- safetensors mmap + state-dict copy -- does not count), then runs 3 training
   steps: forward with labels (loss), backward, ``torch.optim.AdamW`` step over the trainable
   parameters, ``zero_grad(set_to_none=True)``;
4. reports the peak RSS of the training steps (VmHWM) minus the baseline, the whole-process
   peak (``ru_maxrss``, includes the loading transient) minus the baseline, and the measurable
   breakdown: parameter bytes, extra bytes held by unipeft after attach, gradient bytes,
   AdamW state bytes.

The measurement is compared with ``unipeft.analysis.memory.estimate`` (fp32, CUDA overhead 0,
both hidden-state formulas, N_trainable as measured) and with the CPU-corrected
``unipeft.analysis.memory_cpu.estimate_cpu``.

Run (repository root, venv active)::

    python benchmarks/memory_validation.py            # full grid, ~10-15 min on 2 cores
    python benchmarks/memory_validation.py --quick    # 1 batch/seq per model, ~2 min
    python benchmarks/memory_validation.py --models minilm

Prints markdown tables and writes ``benchmarks/results/memory_validation.json``.
MB = 2^20 bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss import reset_peak, rss_kb  # noqa: E402

MB = 2**20
GiB = 2**30
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "memory_validation.json"

GRID = {
    "minilm": dict(methods=("full", "lora", "prompt"), batches=(8, 32), seqs=(64, 128)),
    "smollm2": dict(methods=("full", "lora", "prompt"), batches=(4, 8), seqs=(64, 128)),
}
QUICK = {
    "minilm": dict(methods=("full", "lora", "prompt"), batches=(32,), seqs=(128,)),
    "smollm2": dict(methods=("full", "lora", "prompt"), batches=(4,), seqs=(64,)),
}


# --------------------------------------------------------------------------------- worker ----
def _method_config(up, model_name: str, method: str):
    if method == "full":
        return up.FullFineTune()
    if method == "lora":
        if model_name == "minilm":
            return up.LoRA(r=8, targets=["query", "value"])
        return up.LoRA(r=16, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    if method == "prompt":
        return up.PromptTuning(length=20)
    raise ValueError(method)


def worker(model_name: str, method: str, batch: int, seq: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import transformers  # noqa: F401  (part of the baseline)

    import unipeft as up
    from unipeft import zoo

    import gc

    gc.collect()
    base_kb = rss_kb()
    torch.manual_seed(0)
    if model_name == "minilm":
        model, _tok = zoo.minilm(num_labels=2)
    else:
        model, _tok = zoo.smollm2()
    model.float()
    config = model.config
    n_total_before = sum(p.numel() for p in model.parameters())
    gc.collect()
    loaded_kb = rss_kb()
    up.attach(model, _method_config(up, model_name, method), name="x")
    model.train()
    gc.collect()
    attached_kb = rss_kb()
    trainable, total = up.trainable_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    opt = torch.optim.AdamW(params, lr=1e-5)

    vocab = config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (batch,), generator=g) if model_name == "minilm" else ids.clone()

    reset_ok = reset_peak()
    post_reset_kb = rss_kb()
    grad_bytes = state_bytes = 0
    losses, times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        del out
        times.append(time.perf_counter() - t0)
    state_bytes = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                      if torch.is_tensor(v) and v.dim() > 0)
    train_peak_kb = rss_kb("VmHWM")
    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(
        model=model_name, method=method, batch=batch, seq=seq, steps=steps, threads=threads,
        n_params=total, n_params_before_attach=n_total_before, trainable=trainable,
        baseline_mb=base_kb / 1024, loaded_mb=(loaded_kb - base_kb) / 1024,
        attach_extra_mb=(attached_kb - loaded_kb) / 1024, post_reset_mb=(post_reset_kb - base_kb) / 1024,
        measured_mb=(train_peak_kb - base_kb) / 1024 if reset_ok else (maxrss_kb - base_kb) / 1024,
        maxrss_mb=(maxrss_kb - base_kb) / 1024, peak_reset=reset_ok,
        param_mb=param_bytes / MB, buffer_mb=buffer_bytes / MB, grad_mb=grad_bytes / MB,
        optimizer_mb=state_bytes / MB, losses=losses, step_s=times,
        attn_implementation=getattr(config, "_attn_implementation", None),
        config=config.to_dict(),
    )


# ------------------------------------------------------------------------------ estimates ----
def add_estimates(r: dict) -> dict:
    from transformers import AutoConfig

    from unipeft.analysis.memory import estimate
    from unipeft.analysis.memory_cpu import estimate_cpu

    cfg_dict = dict(r["config"])
    cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **{k: v for k, v in cfg_dict.items()
                                                              if k not in ("transformers_version",)})
    kw = dict(method=r["method"], trainable_params=min(r["trainable"], _n(cfg)), dtype="fp32",
              batch_size=r["batch"], seq_len=r["seq"], cuda_overhead_gb=0.0)
    for hid in ("notes", "detailed"):
        e = estimate(cfg, hidden=hid, **kw)
        r[f"est_{hid}_mb"] = e.exact["total_gb"] * GiB / MB
        r[f"est_{hid}_hidden_mb"] = e.hidden_gb * GiB / MB
    c = estimate_cpu(cfg, method=r["method"], trainable_params=r["trainable"], n_params=r["n_params"],
                     batch_size=r["batch"], seq_len=r["seq"], task=("seq-cls" if r["model"] == "minilm" else "causal-lm"),
                     prompt_length=20 if r["method"] == "prompt" else 0)
    r["est_cpu_mb"] = c["total_mb"]
    r["est_cpu_parts_mb"] = c["parts_mb"]
    for k in ("notes", "detailed", "cpu"):
        r[f"ratio_{k}"] = r[f"est_{k}_mb"] / r["measured_mb"]
    return r


def _n(cfg) -> int:
    from unipeft.analysis.memory import resolve_model

    return resolve_model(cfg)[1]["n_params"]


# ---------------------------------------------------------------------------------- table ----
def table(rows: list[dict]) -> str:
    out = ["| model | method | batch | seq | trainable | measured MB | notes MB | ratio | detailed MB | ratio "
           "| cpu-corrected MB | ratio |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['method']} | {r['batch']} | {r['seq']} | {r['trainable']:,} "
                   f"| {r['measured_mb']:.0f} | {r['est_notes_mb']:.0f} | {r['ratio_notes']:.2f} "
                   f"| {r['est_detailed_mb']:.0f} | {r['ratio_detailed']:.2f} "
                   f"| {r['est_cpu_mb']:.0f} | {r['ratio_cpu']:.2f} |")
    return "\n".join(out)


def breakdown(rows: list[dict]) -> str:
    out = ["| model | method | batch | seq | params MB | attach extra MB | grads MB | AdamW MB "
           "| measured - (params+extra+grads+adam) MB | notes hidden MB | detailed hidden MB | cpu activ. MB "
           "| whole-process peak MB | s/step |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        static = r["param_mb"] + max(r["attach_extra_mb"], 0) + r["grad_mb"] + r["optimizer_mb"]
        act = r["est_cpu_parts_mb"].get("activations", 0) + r["est_cpu_parts_mb"].get("logits", 0)
        out.append(f"| {r['model']} | {r['method']} | {r['batch']} | {r['seq']} | {r['param_mb']:.0f} "
                   f"| {r['attach_extra_mb']:.0f} | {r['grad_mb']:.1f} | {r['optimizer_mb']:.1f} "
                   f"| {r['measured_mb'] - static:.0f} | {r['est_notes_hidden_mb']:.0f} "
                   f"| {r['est_detailed_hidden_mb']:.0f} | {act:.0f} | {r['maxrss_mb']:.0f} "
                   f"| {sum(r['step_s']) / len(r['step_s']):.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one batch/seq per model")
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=sorted(GRID))
    ap.add_argument("--methods", nargs="+", default=None, choices=["full", "lora", "prompt"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--from-json", default=None, help="re-tabulate a previous JSON (re-runs the estimators only)")
    ap.add_argument("--_worker", nargs=4, metavar=("MODEL", "METHOD", "BATCH", "SEQ"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a._worker:
        m, meth, b, s = a._worker
        print("RESULT " + json.dumps(worker(m, meth, int(b), int(s), a.steps, a.threads)))
        return 0

    if a.from_json:
        rows = [add_estimates(r) for r in json.loads(Path(a.from_json).read_text())["rows"]]
    else:
        grid = QUICK if a.quick else GRID
        rows = []
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
        for m in a.models:
            g = grid[m]
            for meth in a.methods or g["methods"]:
                for b in g["batches"]:
                    for s in g["seqs"]:
                        t0 = time.time()
                        p = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--threads",
                                            str(a.threads), "--_worker", m, meth, str(b), str(s)],
                                           capture_output=True, text=True, env=env, cwd=ROOT)
                        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
                        if p.returncode or line is None:
                            print(f"FAILED {m} {meth} b={b} s={s}:\n{p.stderr[-2000:]}", file=sys.stderr)
                            continue
                        r = add_estimates(json.loads(line[7:]))
                        rows.append(r)
                        print(f"{m:8s} {meth:6s} b={b:<3d} s={s:<4d} measured {r['measured_mb']:7.0f} MB  "
                              f"notes x{r['ratio_notes']:.2f}  detailed x{r['ratio_detailed']:.2f}  "
                              f"cpu x{r['ratio_cpu']:.2f}  ({time.time() - t0:.0f} s)", flush=True)
                        _save(a.out, a, rows)  # after every run, so a cut-short run keeps its rows
    print()
    print(table(rows))
    print()
    print(breakdown(rows))
    ok = [abs(r["ratio_cpu"] - 1) <= 0.2 for r in rows]
    print(f"\ncpu-corrected estimate within +-20% of measured: {sum(ok)}/{len(ok)}")
    if not a.from_json:
        _save(a.out, a, rows)
        print(f"wrote {a.out}")
    return 0


def _save(out, a, rows) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(dict(
        machine=dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count()),
        threads=a.threads, steps=a.steps, rows=rows), indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
