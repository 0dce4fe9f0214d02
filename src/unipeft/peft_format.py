"""Exchange deltas with Hugging Face ``peft``'s directory format.

``export_peft(model, dir)`` writes ``adapter_config.json`` + ``adapter_model.safetensors``,
the pair that ``peft.PeftModel.from_pretrained`` and serving engines read;
``import_peft(model, dir)`` attaches such a directory as a unipeft delta. Neither needs
``peft`` installed: both read and write the files themselves (JSON and safetensors
only, never a pickle).

What crosses, and why the rest does not:

* **LoRA** and **(IA)3** are weight-site methods, so the exchange is exact on every
  architecture: tensor ``base_model.model.<module path>.lora_A.weight`` is the same
  matrix in both libraries. Random-rank LoRA's ranks go to peft's ``rank_pattern``, and a
  peft LoRA with per-module ranks comes in as LoRA with that ``rank_pattern``.
* **AdaLoRA**: P, Q and λ are peft's ``lora_B``, ``lora_A`` and ``lora_E`` (an (r, 1)
  column there), the kept triplets only, with the rank pattern under peft's keys
  (``<module path>.lora_E``). peft scales by alpha / (init_r + 1e-5), unipeft by
  alpha / init_r: outputs agree to about 1e-6 relative, not bit for bit. (IA)3 on one slice of a fused projection (GPT-2's
  ``c_attn`` with k and v only) is written as the whole vector with ones on the
  other slices.
* **Prompt tuning**: peft and unipeft both prepend p vectors to the input
  embeddings, so causal LMs and encoder-decoder models agree (peft's causal-LM
  logits keep the p virtual positions in front; unipeft drops them). For encoder
  classifiers they differ: peft's pooler reads the first *virtual* token, unipeft's
  the user's first token, so that case is refused.
* **Prefix tuning**: peft hands the prefix to the model as a KV cache of p past
  tokens, so the real tokens sit at positions p..p+n-1; unipeft inserts the prefix
  in attention and leaves positions alone. With rotary positions (Llama, Mistral,
  Qwen, Gemma) only position differences matter, so rotating the prefix keys by p
  makes the two exactly equal: q_{i+p} . k = (R_i q) . (R_{-p} k). With absolute
  or relative positions (GPT-2, BERT, T5) the shift changes the model, and peft's
  encoder-decoder prefix lives in the decoder's self-attention only, so those are
  refused rather than exported approximately.

Anything a peft file holds that unipeft cannot represent (DoRA, per-module ranks,
trained biases, extra tensors) is refused with the reason, never dropped.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from .architectures import is_linear_like, map_model
from .engine import Delta, head_modules, registry
from .errors import UnipeftError, choices
from .methods import IA3, AdaLoRA, LoRA, PrefixTuning, PromptTuning
from .storage import _read_tensors, attach_with_tensors, delta_tensors, pick_delta, write_directory

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."          # peft's key prefix for tensors inside the wrapped model
EXPORTABLE = {"lora": "LORA", "ia3": "IA3", "prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING",
              "adalora": "ADALORA"}
IMPORTABLE = ("LORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADALORA")
ADALORA_OPTIONS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step", "beta1", "beta2", "orth_reg_weight")
# rotary variants whose frequencies do not depend on the sequence length (a fixed rotation by p is exact)
STATIC_ROPE = ("default", "linear", "llama3")


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------

def export_peft(model: nn.Module, directory, name: str | None = None) -> Path:
    """Write delta ``name`` in peft's format to ``directory`` (created or replaced atomically)."""
    from safetensors.torch import save_file

    delta = pick_delta(model, name, verb="export")
    saved = getattr(delta.config, "saved_config", None)
    kind = (saved() if saved is not None else delta.config).kind  # as up.save writes it (QLoRA: a LoRA delta)
    if kind not in EXPORTABLE:
        raise UnipeftError(f"delta {delta.name!r} is {kind}, which peft's format cannot hold; exportable methods: "
                           f"{choices(sorted(EXPORTABLE))} (save it with up.save instead)")
    ours = delta_tensors(model, delta)
    heads, tensors = _export_heads(model, delta, ours)
    method_config, method_tensors = _EXPORTERS[kind](model, delta, ours)
    tensors.update(method_tensors)
    cfg = getattr(model, "config", None)
    config = {
        "peft_type": EXPORTABLE[kind],
        "task_type": task_type(model),
        "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "modules_to_save": heads or None,
        **method_config,
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))

    return write_directory(directory, write)


def task_type(model: nn.Module) -> str | None:
    """peft's task type for a transformers model class (None: a bare backbone peft wraps as is)."""
    cls = type(model).__name__
    if cls.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if cls.endswith("ForConditionalGeneration") and getattr(getattr(model, "config", None), "is_encoder_decoder", 0):
        return "SEQ_2_SEQ_LM"
    if cls.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if cls.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    if getattr(model, "base_model", model) is model:
        return "FEATURE_EXTRACTION"
    return None


def _export_heads(model, delta: Delta, ours: dict) -> tuple[list[str], dict]:
    """The delta's own task head as peft's ``modules_to_save``: whole top-level modules."""
    heads = sorted({p.split(".")[0] for p in delta.head} |
                   {p.split(".")[0] for p in delta.selected if p.split(".")[0] in head_modules(model)})
    out = {}
    for key, value in ours.items():
        where, _, path = key.partition(":")
        top = path.split(".")[0]
        if where == "linear" and any(path.startswith(h + ".") for h in delta.head):
            out[PREFIX + path] = value            # "linear:classifier.weight" -> "...classifier.weight"
        elif where == "selected":
            if top not in heads:
                raise UnipeftError(f"delta {delta.name!r} trains base parameter {path!r} in place, which peft's "
                                   f"{EXPORTABLE[delta.config.kind]} format cannot hold")
            out[PREFIX + path] = value
    return heads, out


def _method_paths(delta: Delta) -> list[str]:
    return [p for p in delta.linear if p not in delta.head]


def _conv1d(model, paths) -> bool:
    # peft's fan_in_fan_out: the targets are GPT-2 style Conv1D maps (weight stored in x out)
    return any(getattr(model.get_submodule(p), "_unipeft_transposed", False) for p in paths)


def _export_lora(model, delta: Delta, ours):
    c: LoRA = delta.config
    paths = _method_paths(delta)
    tensors = {}
    for p in paths:
        tensors[f"{PREFIX}{p}.lora_A.weight"] = ours[f"linear:{p}.lora_A"]
        tensors[f"{PREFIX}{p}.lora_B.weight"] = ours[f"linear:{p}.lora_B"]
    # random-rank LoRA: the commonest rank as r, the others in peft's rank_pattern (scale alpha / r_i in both)
    ranks = [c.rank_pattern[p] for p in paths] if c.rank_pattern else [c.r]
    r = max(sorted(set(ranks)), key=ranks.count)
    pattern = {p: c.rank_pattern[p] for p in paths if c.rank_pattern[p] != r} if c.rank_pattern else {}
    config = {"r": r, "lora_alpha": c.alpha, "lora_dropout": c.dropout, "target_modules": paths,
              "fan_in_fan_out": _conv1d(model, paths), "bias": "none", "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "rank_pattern": pattern, "alpha_pattern": {}}
    return config, tensors


def _export_adalora(model, delta: Delta, ours):
    from .positions import linear_shape

    c: AdaLoRA = delta.config.saved_config()  # with the current rank pattern, as up.save writes it
    paths = list(c.rank_pattern) if c.rank_pattern else _method_paths(delta)
    tensors = {}
    for p in paths:
        if f"linear:{p}.lora_A" in ours:
            a, b, e = (ours[f"linear:{p}.{k}"] for k in ("lora_A", "lora_B", "lora_E"))
        else:  # every triplet pruned: peft keeps zero-sized tensors
            fan_in, fan_out = linear_shape(model.get_submodule(p))
            a, b, e = torch.zeros(0, fan_in), torch.zeros(fan_out, 0), torch.zeros(0)
        tensors.update({f"{PREFIX}{p}.lora_A": a, f"{PREFIX}{p}.lora_B": b, f"{PREFIX}{p}.lora_E": e.reshape(-1, 1)})
    config = {**{k: getattr(c, k) for k in ADALORA_OPTIONS}, "r": c.target_r, "lora_alpha": c.alpha,
              "lora_dropout": c.dropout, "target_modules": paths, "fan_in_fan_out": _conv1d(model, paths),
              "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "rank_pattern": {f"{p}.lora_E": v for p, v in c.rank_pattern.items()} if c.rank_pattern else None,
              "alpha_pattern": {}}
    return config, tensors


def _export_ia3(model, delta: Delta, ours):
    paths = _method_paths(delta)
    tensors, ff = {}, []
    for p in paths:
        d = delta.linear[p]
        with torch.no_grad():
            scale = d.scale().detach()  # the full vector, ones where a fused slice is not scaled
        if d.mode == "input":
            ff.append(p)
            tensors[f"{PREFIX}{p}.ia3_l"] = scale.reshape(1, -1)
        else:
            tensors[f"{PREFIX}{p}.ia3_l"] = scale.reshape(-1, 1)
    config = {"target_modules": paths, "feedforward_modules": ff, "fan_in_fan_out": _conv1d(model, paths),
              "init_ia3_weights": True}
    return config, tensors


def _prompt_layout_check(model, what: str) -> None:
    kind = task_type(model)
    if kind not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        raise UnipeftError(
            f"{what} prompt tuning on {type(model).__name__}: peft and unipeft read different positions of a "
            f"prompted {kind or 'model'} (peft's pooler reads the first virtual token, unipeft's the first real "
            f"one), so the exchange would change the model; prompt tuning crosses for causal LMs and "
            f"encoder-decoder models")


def _stack_sizes(model) -> tuple[int, int]:
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers", None) or getattr(cfg, "n_layer", 0)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "num_heads", None) or getattr(cfg, "n_head", 0)
    return int(layers or 0), int(heads or 0)


def _export_prompt(model, delta: Delta, ours):
    _prompt_layout_check(model, "exporting")
    prompt = ours["model:weight"]
    layers, heads = _stack_sizes(model)
    # one prompt, for the encoder (peft's seq2seq prompt tuning never reads a second, decoder set)
    config = {"num_virtual_tokens": prompt.shape[0], "token_dim": prompt.shape[1], "num_transformer_submodules": 1,
              "num_attention_heads": heads, "num_layers": layers, "prompt_tuning_init": "RANDOM",
              "tokenizer_name_or_path": None}
    return config, {"prompt_embeddings": prompt}


def _export_prefix(model, delta: Delta, ours):
    _rotary_check(model, "exporting")
    P = ours["model:prefix"]                                    # (p, layers * 2 * kv_heads * head_dim)
    prefix = delta.module
    p, layers, kv, hd = prefix.length, prefix.layers, prefix.kv_heads, prefix.head_dim
    kvp = P.reshape(p, layers, 2, kv, hd).clone()
    kvp[:, :, 0] = _rotate(model, kvp[:, :, 0], p)              # peft: real tokens at p.., so keys at R_p k
    config = {"num_virtual_tokens": p, "token_dim": kv * hd, "num_attention_heads": kv, "num_layers": layers,
              "num_transformer_submodules": 1, "prefix_projection": False,
              "encoder_hidden_size": int(getattr(model.config, "hidden_size", kv * hd))}
    return config, {"prompt_embeddings": kvp.reshape(p, -1)}


_EXPORTERS = {"lora": _export_lora, "adalora": _export_adalora, "ia3": _export_ia3, "prompt_tuning": _export_prompt,
              "prefix_tuning": _export_prefix}


# ---------------------------------------------------------------------------
# rotary positions
# ---------------------------------------------------------------------------

def _rotary_check(model, what: str) -> None:
    reg = registry(model)
    positions = (reg.map if reg is not None else map_model(model)).positions
    cfg = getattr(model, "config", None)
    if positions != "rotary" or getattr(cfg, "is_encoder_decoder", False) or task_type(model) != "CAUSAL_LM":
        raise UnipeftError(
            f"{what} prefix tuning on {type(model).__name__} ({positions} positions): peft runs a prefix as a "
            f"cache of past tokens, which moves the real tokens' positions (and, for encoder-decoder models, "
            f"puts the prefix in the decoder only), so the exchange would change the model; prefix tuning "
            f"crosses exactly for causal LMs with rotary positions (Llama, Mistral, Qwen, Gemma)")
    rope = _rotary_module(model)
    kind = getattr(rope, "rope_type", "default")
    if kind not in STATIC_ROPE:
        raise UnipeftError(f"{what} prefix tuning: rotary type {kind!r} depends on the sequence length, so no fixed "
                           f"rotation makes peft's shifted positions equal; supported rotary types: "
                           f"{choices(STATIC_ROPE)}")


def _rotary_module(model) -> nn.Module:
    for _, m in model.named_modules():
        if isinstance(getattr(m, "inv_freq", None), torch.Tensor):
            return m
    raise UnipeftError(f"{type(model).__name__}: found no rotary embedding module (a module with inv_freq)")


def _rotate(model, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Rotate keys (..., head_dim) by ``shift`` positions with the model's RoPE (Llama's
    half-split convention: x R_s = x cos(s f) + rotate_half(x) sin(s f))."""
    inv_freq = _rotary_module(model).inv_freq.double().cpu()
    if 2 * inv_freq.numel() != keys.shape[-1]:
        raise UnipeftError(f"partial rotary embeddings ({2 * inv_freq.numel()} of {keys.shape[-1]} dimensions) "
                           f"are not supported by the prefix exchange")
    angle = shift * inv_freq
    cos, sin = torch.cat([angle.cos(), angle.cos()]), torch.cat([angle.sin(), angle.sin()])
    x = keys.double()
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated_half * sin).to(keys.dtype)


# ---------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------

def import_peft(model: nn.Module, directory, name: str = "default", *, activate: bool = True) -> nn.Module:
    """Attach a peft adapter directory to ``model`` as unipeft delta ``name``; returns the model.

    All or nothing: on any error the model is exactly as it was.
    """
    d = Path(directory)
    config, tensors = read_peft_dir(d)
    kind = config["peft_type"]
    remaining = dict(tensors)
    heads, head_tensors = _import_heads(model, config, remaining)
    method, ours = _IMPORTERS[kind](model, config, remaining, d)
    if remaining:
        raise UnipeftError(f"{d}: {len(remaining)} tensors have no place in a unipeft {method.kind} delta, e.g. "
                           f"{sorted(remaining)[:3]}")
    method = method.replace(train_head=heads or False)
    ours.update(head_tensors)
    return attach_with_tensors(model, method, name, ours, activate=activate)


def read_peft_dir(d: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not d.is_dir():
        raise UnipeftError(f"no peft adapter directory at {str(d)!r}")
    cpath, wpath = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cpath.is_file():
        raise UnipeftError(f"{str(d)!r} is not a peft adapter: {CONFIG_NAME} is missing")
    if not wpath.is_file():
        if (d / "adapter_model.bin").is_file():
            raise UnipeftError(f"{d} holds adapter_model.bin, a pickle, which unipeft never loads; re-save it with "
                               f"peft's save_pretrained(..., safe_serialization=True)")
        raise UnipeftError(f"{str(d)!r} is not a peft adapter: {WEIGHTS_NAME} is missing")
    try:
        config = json.loads(cpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnipeftError(f"{cpath} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise UnipeftError(f"{cpath} is not a peft adapter config (not a JSON object)")
    if config.get("peft_type") not in IMPORTABLE:
        raise UnipeftError(f"{d}: peft_type {config.get('peft_type')!r} has no unipeft counterpart here; "
                           f"importable types: {choices(IMPORTABLE)}")
    tensors = _read_tensors(wpath)  # one reader for safetensors files, with its clear errors
    return config, tensors


def _import_heads(model, config: dict, remaining: dict) -> tuple[list[str], dict]:
    """peft's ``modules_to_save`` copies of the task head -> the delta's own head."""
    heads, out = [], {}
    for h in config.get("modules_to_save") or []:
        keys = [k for k in remaining if k.startswith(f"{PREFIX}{h}.")]
        if not keys:
            continue  # peft lists "classifier" and "score" for every classifier; only one exists
        if h not in head_modules(model):
            raise UnipeftError(f"modules_to_save names {h!r}, which is not the task head of "
                               f"{type(model).__name__} (its head: {choices(head_modules(model))})")
        heads.append(h)
        linear = {}
        for k in keys:
            path = k[len(PREFIX):]
            module_path = path.rpartition(".")[0]
            if is_linear_like(model.get_submodule(module_path)):
                linear[f"linear:{path}"] = remaining.pop(k)
            else:
                out[f"selected:{path}"] = remaining.pop(k)
        out.update(linear)
    return heads, out


def _sites(remaining: dict, suffix: str) -> list[str]:
    """Module paths that carry a tensor ``<PREFIX><path><suffix>``, in file order."""
    return [k[len(PREFIX):-len(suffix)] for k in remaining if k.startswith(PREFIX) and k.endswith(suffix)]


def _refuse(d: Path, config: dict, checks: dict) -> None:
    for key, (ok, why) in checks.items():
        if key in config and not ok(config[key]):
            raise UnipeftError(f"{d}: {key}={config[key]!r} {why}, which unipeft's counterpart cannot represent")


def _import_lora(model, config, remaining, d):
    _refuse(d, config, {
        "use_dora": (lambda v: not v, "(DoRA) adds a magnitude vector"),
        "bias": (lambda v: v in (None, "none"), "trains biases"),
        "lora_bias": (lambda v: not v, "adds a bias to B"),
        "target_parameters": (lambda v: not v, "targets raw parameters"),
        "trainable_token_indices": (lambda v: not v, "trains token embeddings"),
        "layer_replication": (lambda v: not v, "replicates layers"),
        "use_qalora": (lambda v: not v, "uses QA-LoRA pooling"),
        "alora_invocation_tokens": (lambda v: not v, "activates on invocation tokens (aLoRA)"),
        "alpha_pattern": (lambda v: not v, "sets a scale per module"),
    })
    paths = _sites(remaining, ".lora_A.weight")
    if not paths:
        raise UnipeftError(f"{d}: a LORA adapter without lora_A tensors")
    ranks = {p: remaining[f"{PREFIX}{p}.lora_A.weight"].shape[0] for p in paths}
    # one rank: plain LoRA; per-module ranks (peft's rank_pattern): LoRA with the same rank_pattern, which
    # scales each module by alpha / r_i as peft does
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = dict(ranks) if len(set(ranks.values())) > 1 else None
    alpha = float(config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        if pattern:
            raise UnipeftError(f"{d}: use_rslora with ranks that differ between modules scales each by alpha / "
                               f"sqrt(r_i), which unipeft's counterpart cannot represent")
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r); unipeft by alpha / r
    ours = {}
    for p in paths:
        ours[f"linear:{p}.lora_A"] = remaining.pop(f"{PREFIX}{p}.lora_A.weight")
        b = remaining.pop(f"{PREFIX}{p}.lora_B.weight", None)
        if b is None:
            raise UnipeftError(f"{d}: {p} has lora_A but no lora_B")
        ours[f"linear:{p}.lora_B"] = b
    method = LoRA(r=r, alpha=alpha, dropout=float(config.get("lora_dropout") or 0.0), targets=tuple(paths),
                  rank_pattern=pattern)
    return method, ours


def _import_adalora(model, config, remaining, d):
    _refuse(d, config, {
        "use_dora": (lambda v: not v, "(DoRA) adds a magnitude vector"),
        "bias": (lambda v: v in (None, "none"), "trains biases"),
        "use_rslora": (lambda v: not v, "scales by alpha / sqrt(r)"),
        "alpha_pattern": (lambda v: not v, "sets a scale per module"),
    })
    paths = _sites(remaining, ".lora_A")
    if not paths:
        raise UnipeftError(f"{d}: an ADALORA adapter without lora_A tensors")
    # peft's keys are "<module path>.lora_E" (with the adapter's name after it when taken from a live model)
    pattern = {k.split(".lora_E")[0]: list(v) for k, v in (config.get("rank_pattern") or {}).items()}
    ours = {}
    for p in paths:
        got = {k: remaining.pop(f"{PREFIX}{p}.{k}", None) for k in ("lora_A", "lora_B", "lora_E")}
        if any(v is None for v in got.values()):
            raise UnipeftError(f"{d}: {p} lacks one of lora_A, lora_B, lora_E")
        if got["lora_A"].shape[0]:  # a module whose triplets were all pruned has zero-sized tensors
            ours.update({f"linear:{p}.{k}": v.reshape(-1) if k == "lora_E" else v for k, v in got.items()})
    options = {k: config[k] for k in ADALORA_OPTIONS if config.get(k) is not None}
    method = AdaLoRA(**options, alpha=float(config.get("lora_alpha", 8)),
                     dropout=float(config.get("lora_dropout") or 0.0), targets=tuple(paths),
                     rank_pattern=pattern or None)
    return method, ours


def _import_ia3(model, config, remaining, d):
    paths = _sites(remaining, ".ia3_l")
    if not paths:
        raise UnipeftError(f"{d}: an IA3 adapter without ia3_l tensors")
    ours, ff = {}, []
    for p in paths:
        v = remaining.pop(f"{PREFIX}{p}.ia3_l")
        if v.dim() == 2 and v.shape[0] == 1 and v.shape[1] != 1:
            ff.append(p)  # (1, in): scales the input (feedforward_modules)
        ours[f"linear:{p}.ia3_l"] = v.reshape(-1)
    return IA3(targets=tuple(paths), feedforward=tuple(ff)), ours


def _import_prompt(model, config, remaining, d):
    _prompt_layout_check(model, "importing")
    emb = remaining.pop("prompt_embeddings", None)
    if emb is None:
        raise UnipeftError(f"{d}: a {config['peft_type']} adapter without prompt_embeddings")
    p = int(config.get("num_virtual_tokens") or emb.shape[0])
    # P-tuning saves its encoder's output, so both are a fixed prompt once trained; peft stores a second,
    # decoder set for seq2seq models that its prompt tuning never reads
    return PromptTuning(length=p, init="random"), {"model:weight": emb[:p]}


def _import_prefix(model, config, remaining, d):
    _rotary_check(model, "importing")
    emb = remaining.pop("prompt_embeddings", None)
    if emb is None:
        raise UnipeftError(f"{d}: a PREFIX_TUNING adapter without prompt_embeddings")
    if (config.get("num_transformer_submodules") or 1) != 1:
        raise UnipeftError(f"{d}: a prefix for {config['num_transformer_submodules']} stacks; a causal LM has one")
    p, layers = int(config["num_virtual_tokens"]), int(config["num_layers"])
    heads, dim = int(config["num_attention_heads"]), int(config["token_dim"])
    if emb.shape != (p, layers * 2 * dim) or dim % heads:
        raise UnipeftError(f"{d}: prompt_embeddings has shape {tuple(emb.shape)}, expected ({p}, {layers * 2 * dim})")
    kvp = emb.reshape(p, layers, 2, heads, dim // heads).clone()
    kvp[:, :, 0] = _rotate(model, kvp[:, :, 0], -p)
    return PrefixTuning(length=p, reparam_hidden=0), {"model:prefix": kvp.reshape(p, -1)}


_IMPORTERS = {"LORA": _import_lora, "ADALORA": _import_adalora, "IA3": _import_ia3, "PROMPT_TUNING": _import_prompt, "P_TUNING": _import_prompt,
              "PREFIX_TUNING": _import_prefix}

