"""Saving and loading deltas: a directory with ``delta.json`` + ``delta.safetensors``.

* Only the delta's tensors are written (a few MB), never the base model.
* ``delta.json`` records the method config, the library version and
  fingerprints of the base model; loading onto another base is refused unless
  ``check_base=False`` (the same base at bfloat16 or float16 precision, or quantized, is
  the same base: ``same_base``).
* Writes are atomic: files go to a temporary directory beside the target,
  which is then renamed into place, so a crash never leaves half a delta.
* Loads never execute code (JSON and safetensors only) and never leave a
  half-attached delta: on any error the model is exactly as before.
* ``load`` also takes a Hugging Face Hub repo id ("user/repo") where no local
  path of that name exists; ``hub.py`` fetches the two files (``up.push`` uploads).
* Under FSDP2 the parameters are sharded (``DTensor``): ``save`` gathers the full
  tensors, so every process must call it (the gathers are collective), and only the
  process of global rank 0 writes.

Tensor names in the file say where each tensor goes:
  ``linear:<module path>.<name>``   a delta at a linear site (LoRA A/B, adapter, head)
  ``model:<name>``                  a model-level delta module (soft prompt, prefix P)
  ``selected:<parameter path>``     a base parameter trained in place (BitFit, Freeze, full)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from . import __version__
from .config import MethodConfig
from .engine import Delta, _require, attach, detach, original_base_tensors, registry, set_active
from .errors import UnipeftError, choices

FORMAT = "unipeft-delta"
FORMAT_VERSION = 1
JSON_NAME = "delta.json"
TENSORS_NAME = "delta.safetensors"


# ---------------------------------------------------------------------------
# sharded (FSDP2) tensors
# ---------------------------------------------------------------------------

def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: FSDP2 keeps each parameter as a ``DTensor`` holding one shard per process.

    Gathering is collective: under FSDP every process must call this for the same tensors,
    in the same order. A plain tensor is returned as it is.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            return t.full_tensor()
    return t


def reshard(model: nn.Module) -> None:
    """Register FSDP2's sharded parameters again where a forward pass left unsharded ones.

    FSDP2 reshards after the backward pass; a forward pass alone (evaluation) leaves the full
    copies of the modules it does not reshard after forward (the root's) registered, and reading
    parameters then would give tensors that are not the ones the optimizer updates. No
    communication: every process can call it on its own.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _sharded(model: nn.Module) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    reshard(model)
    return any(isinstance(p, DTensor) for p in model.parameters())


# ---------------------------------------------------------------------------
# fingerprint of the base model
# ---------------------------------------------------------------------------

# A base loaded at another precision is the same base: a delta trained on the float32 weights serves on
# their bfloat16 or float16 copy (``from_pretrained(..., dtype=torch.bfloat16)``, ``model.half()``). Rounding
# both sides' samples to that precision makes their fingerprints equal, because casting rounds to nearest
# even whichever way the copy was made. (A float16 base and a bfloat16 one of the same weights do not match:
# rounding one to the other rounds twice.)
ROUNDINGS = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_SUFFIXES = [""] + [f"_{k}" for k in ROUNDINGS]  # fingerprint, fingerprint_bfloat16, ...


def _linear_shapes(model: nn.Module) -> dict[str, tuple]:
    """The (out, in) of every linear map's weight, by parameter name (what the loose fingerprint keeps)."""
    from .architectures import is_linear_like
    from .quantization import bits_of, logical_shape

    out = {}
    for path, m in model.named_modules():
        if is_linear_like(m):
            w = m.weight  # (out, in), or (in, out) for a Conv1D
            shape = logical_shape(m) if bits_of(m) else tuple(w.shape[::1 if isinstance(m, nn.Linear) else -1])
            out[f"{path}.weight" if path else "weight"] = shape
    return out


def base_identity(model: nn.Module) -> dict:
    """Everything ``up.save`` records to recognise the base again (``same_base``), in one pass over it:

      fingerprint                     names, shapes, dtypes and a sample of every tensor's values
      loose_fingerprint               linear weights by name and shape only (a base and its quantized copy)
      fingerprint_<dtype>, loose_...  the same with every floating sample rounded to bfloat16 / float16
      quantized                       the widths of quantized linear maps (None for a float model)

    Sampling (up to 1,024 evenly spaced values per tensor) keeps this cheap on large models while any
    realistic difference in weights changes it. Task heads are left out: a fresh head is random by design.
    """
    linear = _linear_shapes(model)
    hashes = {f"{kind}{sfx}": hashlib.sha256() for kind in ("fingerprint", "loose_fingerprint") for sfx in _SUFFIXES}
    for name, t in sorted(original_base_tensors(model).items()):
        flat = full_tensor(t.detach()).reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step][:1024].to(device="cpu", dtype=torch.float32)
        shape = tuple(t.shape)
        views = {"": (f"{name}:{shape}:{t.dtype}", sample)}
        for key, dt in ROUNDINGS.items():
            views[f"_{key}"] = ((f"{name}:{shape}:float", sample.to(dt).to(torch.float32)) if t.is_floating_point()
                                else views[""])
        for sfx, (header, values) in views.items():
            data = values.numpy().tobytes()
            for kind in ("fingerprint", "loose_fingerprint"):
                h = hashes[kind + sfx]
                if kind == "loose_fingerprint" and name in linear:
                    h.update(f"{name}:linear{tuple(linear[name])}".encode())
                else:
                    h.update(header.encode())
                    h.update(data)
    out = {k: h.hexdigest()[:32] for k, h in hashes.items()}
    out["quantized"] = quantized_bits(model)
    return out


def fingerprint(model: nn.Module, loose: bool = False) -> str:
    """A hash of the base model's parameter names, shapes, dtypes and a sample of values (``base_identity``).

    ``loose``: the weights of linear maps count by name and (out, in) shape only, every other tensor
    (embeddings, norms, biases) by value. It is the same for a base and for that base
    quantized (``unipeft.quantization``), so a delta trained on either loads onto the other.
    """
    return base_identity(model)["loose_fingerprint" if loose else "fingerprint"]


def same_base(saved: dict, have: dict) -> bool:
    """Whether a delta whose file records base ``saved`` (delta.json's "base") belongs on the base
    ``have`` (``base_identity``): the same weights, or the same weights at another precision, or (where
    either is quantized) the same model apart from its linear weights' values. Files written before the
    rounded fingerprints existed match on the exact and loose ones only."""
    quantized = bool(saved.get("quantized") or have.get("quantized"))
    for sfx in _SUFFIXES:
        for kind in ("fingerprint", "loose_fingerprint") if quantized else ("fingerprint",):
            want = saved.get(kind + sfx)
            if want is not None and want == have.get(kind + sfx):
                return True
    return False


def quantized_bits(model: nn.Module) -> list[int] | None:
    """The widths of the model's quantized linear maps (sorted), None for a float model."""
    from .quantization import quantized_modules

    return sorted(set(quantized_modules(model).values())) or None


# ---------------------------------------------------------------------------
# tensors of a delta
# ---------------------------------------------------------------------------

def delta_tensors(model: nn.Module, delta: Delta) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path, d in delta.linear.items():
        # a delta may store less than it trains with (AdaLoRA: only the triplets its budget kept)
        export = getattr(d, "export_state", None)
        for k, v in (export() if export is not None else d.state_dict()).items():
            out[f"linear:{path}.{k}"] = v
    if delta.module is not None:
        export = getattr(delta.module, "export_state", None)
        state = export() if export is not None else delta.module.state_dict()
        for k, v in state.items():
            out[f"model:{k}"] = v
    reg = registry(model)
    params = {p: model.get_parameter(p) for p in delta.selected}  # not named_parameters(): O(attached deltas)
    for p in ({} if delta.sparse is not None else delta.selected):
        value = params[p] if delta.name in reg.active else delta.trained.get(p, params[p])
        out[f"selected:{p}"] = value
    if delta.sparse is not None:  # indices + values (unipeft.sparse), never the dense tensors
        from . import sparse

        out.update(sparse.export(model, reg, delta))
    return {k: full_tensor(v.detach()).to("cpu").contiguous() for k, v in out.items()}


def _load_tensors(model: nn.Module, delta: Delta, tensors: dict[str, torch.Tensor]) -> None:
    expected = {}
    for path, d in delta.linear.items():
        for k, v in d.state_dict().items():
            expected[f"linear:{path}.{k}"] = v
    if delta.module is not None:
        for k, v in delta.module.state_dict().items():
            expected[f"model:{k}"] = v
    params = {p: model.get_parameter(p) for p in delta.selected}
    on = delta.name in registry(model).active
    for p in ({} if delta.sparse is not None else delta.selected):
        # an active selective delta lives in the base parameters; a switched-off one in its stored values
        expected[f"selected:{p}"] = params[p] if on else delta.trained.setdefault(p, delta.selected[p].clone())
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected) - ({k for k in tensors if k.startswith("sparse:")}
                                                   if delta.sparse is not None else set()))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise UnipeftError(f"delta file does not match its method config: {what} "
                           f"({len(missing)} missing, {len(extra)} unexpected tensors)")
    for k, target in expected.items():
        src = tensors[k]
        if tuple(src.shape) != tuple(target.shape):
            raise UnipeftError(f"tensor {k!r} has shape {tuple(src.shape)} in the file but "
                               f"{tuple(target.shape)} in the model")
    if delta.sparse is not None:  # checks its own tensors (indices inside the base's tensors) before any change
        from . import sparse

        sparse.restore(model, registry(model), delta, tensors)
    with torch.no_grad():
        for k, target in expected.items():
            target.copy_(tensors[k].to(device=target.device, dtype=target.dtype))


# ---------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------

def pick_delta(model: nn.Module, name: str | None, verb: str = "save") -> Delta:
    """The delta called ``name``; with ``None``, the only one attached (an error if there are several)."""
    reg = registry(model)
    if reg is None or not reg.deltas:
        raise UnipeftError(f"this model has no deltas attached: nothing to {verb}")
    if name is None:
        if len(reg.deltas) != 1:
            raise UnipeftError(f"the model has several deltas; say which to {verb} with name=, one of "
                               f"{choices(list(reg.deltas))}")
        name = next(iter(reg.deltas))
    return _require(model, name)[1]


def save(model: nn.Module, directory, name: str | None = None, *, keep_training: bool = False) -> Path:
    """Write delta ``name`` to ``directory`` (created or replaced atomically).

    A delta with a final form (DiffPruning: projected to its exact budget) takes it, in the live model
    too, so the file and the model in memory are the same. ``keep_training=True`` writes the final
    form without taking it: the delta goes on training in its current form (a checkpoint in the
    middle of a run; ``integrations.SaveDeltaCallback`` does so).

    Under FSDP2 (sharded parameters) every process must call ``save``: the full tensors are
    gathered collectively, then only global rank 0 writes; the others return the same path.
    """
    from safetensors.torch import save_file

    delta = pick_delta(model, name)
    name = delta.name
    config = delta.config
    tensors = None
    if getattr(config, "finalize", None) is not None and not getattr(config, "finalized", False):
        if keep_training:
            tensors = config.final_tensors(model, registry(model), delta)
            config = config.replace(finalized=True)
        else:  # file == memory
            config.finalize(model, registry(model), delta)
            config = delta.config
    sharded = _sharded(model)
    saved = config.saved_config() if hasattr(config, "saved_config") else config
    tensors = delta_tensors(model, delta) if tensors is None else tensors
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library": "unipeft",
        "library_version": __version__,
        "name": name,
        "method": {"kind": saved.kind, "type": saved.method_type, "options": saved.to_dict()},
        "base": {
            "model_type": getattr(getattr(model, "config", None), "model_type", None),
            "class": type(model).__name__,
            **base_identity(model),  # fingerprints, loose and rounded ones, quantized widths: same_base()
        },
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                    for k, v in tensors.items()},
        "parameters": int(sum(v.numel() for v in tensors.values())),
    }
    if sharded and torch.distributed.get_rank() != 0:
        return Path(directory)  # the gathers above needed this process; the files are rank 0's to write

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": FORMAT})
        with open(tmp / JSON_NAME, "w") as f:
            json.dump(meta, f, indent=2)

    return write_directory(directory, write)


def write_directory(directory, write) -> Path:
    """Create or replace ``directory`` atomically: ``write(tmp)`` fills a temporary directory
    beside it, every file is flushed to disk, then the directory is renamed into place."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _replace_dir(tmp: Path, target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise UnipeftError(f"{target} exists and is not a directory")
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def read_meta(directory) -> dict:
    d = Path(directory)
    if not d.is_dir():
        raise UnipeftError(f"no delta directory at {str(d)!r}")
    jpath, tpath = d / JSON_NAME, d / TENSORS_NAME
    for p in (jpath, tpath):
        if not p.is_file():
            raise UnipeftError(f"{str(d)!r} is not a unipeft delta: {p.name} is missing")
    try:
        meta = json.loads(jpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnipeftError(f"{jpath} is corrupted (not valid JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UnipeftError(f"{jpath} is not a unipeft delta description (format {meta.get('format')!r})"
                           if isinstance(meta, dict) else f"{jpath} is not a unipeft delta description")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise UnipeftError(f"{jpath} uses format version {meta['format_version']}; this unipeft reads up to "
                           f"{FORMAT_VERSION}: upgrade unipeft")
    for key in ("method", "base", "name"):
        if key not in meta:
            raise UnipeftError(f"{jpath} is corrupted: field {key!r} is missing")
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UnipeftError(f"{path} is truncated or corrupted ({e}); save the delta again") from None


def _locate(directory, revision: str | None, token: str | None) -> Path:
    """A local delta directory, or a Hub repo id ("user/repo") fetched into the local Hub cache."""
    from .hub import download, looks_like_repo_id

    # an existing local path always wins, so a folder that happens to be named like "user/repo" stays local
    if not Path(directory).exists() and looks_like_repo_id(directory):
        return download(directory, revision=revision, token=token)
    if revision is not None:
        raise UnipeftError(f"revision= applies to Hugging Face Hub repos ('user/repo') only; {str(directory)!r} "
                           f"is a local path")
    return Path(directory)


def load(model: nn.Module, directory, name: str | None = None, *, check_base: bool = True,
         activate: bool = True, tokenizer=None, revision: str | None = None, token: str | None = None,
         rank: int | None = None) -> nn.Module:
    """Attach a saved delta to ``model`` and return the model.

    ``directory`` is a folder written by ``up.save``, or a Hugging Face Hub repo
    id ``"user/repo"`` (a string that is not an existing local path) holding one,
    as ``up.push`` writes it; ``revision`` (branch, tag or commit) and ``token``
    apply to the Hub. The delta's base fingerprint must match ``model`` unless
    ``check_base=False``. ``rank``: the rank to use, for a delta trained for several (DyLoRA).
    On any error the model is left exactly as it was.
    """
    d = _locate(directory, revision, token)
    meta = read_meta(d)
    tensors = _read_tensors(d / TENSORS_NAME)
    if set(tensors) != set(meta.get("tensors", tensors)):
        raise UnipeftError(f"{d}: delta.json and delta.safetensors disagree about which tensors the delta holds")
    m = meta["method"]
    if not isinstance(m, dict) or "kind" not in m or not isinstance(m.get("options"), dict):
        raise UnipeftError(f"{d / JSON_NAME} is corrupted: bad 'method' field")
    config = MethodConfig.from_dict(m["kind"], m["options"])
    if rank is not None:
        if not getattr(type(config), "nested_ranks", False):
            from .config import METHODS

            ok = sorted(k for k, c in METHODS.items() if getattr(c, "nested_ranks", False))
            raise UnipeftError(f"up.load: rank= applies to deltas trained for several ranks ({choices(ok)}); "
                               f"{str(d)!r} is {config.kind}, whose rank is fixed")
        config = config.replace(rank=rank)
    if check_base:
        have = base_identity(model)
        if not same_base(meta["base"], have):
            raise UnipeftError(
                f"{str(d)!r} was trained on a different base model ({meta['base'].get('model_type')} "
                f"{meta['base'].get('class')}, fingerprint {meta['base'].get('fingerprint')}) than this one "
                f"({getattr(getattr(model, 'config', None), 'model_type', None)} {type(model).__name__}, "
                f"fingerprint {have['fingerprint']}), also at bfloat16 and float16 precision; pass "
                f"check_base=False to load it anyway"
            )
    return attach_with_tensors(model, config, name or meta["name"], tensors, activate=activate, tokenizer=tokenizer)


def attach_with_tensors(model: nn.Module, config: MethodConfig, name: str, tensors: dict[str, torch.Tensor], *,
                        activate: bool = True, tokenizer=None) -> nn.Module:
    """Attach ``config`` as delta ``name`` and fill it from ``tensors`` (named as in ``delta_tensors``).

    All or nothing: if the tensors do not fit, the delta is detached again and the
    previously active deltas are restored, so the model is exactly as before.
    """
    reg = registry(model)
    before = list(reg.active) if reg else []
    attach(model, config, name, activate=activate, tokenizer=tokenizer)
    try:
        _load_tensors(model, registry(model).deltas[name], tensors)
    except BaseException:
        detach(model, name)
        if registry(model) is not None:
            set_active(model, before)
        raise
    return model
