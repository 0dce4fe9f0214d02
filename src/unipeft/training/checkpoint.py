"""Training checkpoints: everything a killed run needs to continue exactly, written atomically.

A checkpoint is a directory ``checkpoints/step-000120/`` holding

* ``state.safetensors`` -- the trainable parameters (by name), AdamW's moments, and the RNG
  states (torch CPU/CUDA generators as byte tensors);
* ``state.json``        -- step, epoch and batch position in the data, scheduler position,
  the optimizer's hyperparameters, Python's RNG state, the best metric so far, and the run's settings.

The directory is written under a temporary name and renamed into place, so a crash
(even SIGKILL) leaves either the previous checkpoint or the new one, never half of
one. Loading reads JSON and safetensors only: nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from ..errors import UnipeftError

PREFIX = "step-"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"


def trainable_named(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> tuple[dict, dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, state, gauss = random.getstate()
    return tensors, {"version": version, "state": list(state), "gauss": gauss}


def _set_rng_state(tensors: dict, py: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][:torch.cuda.device_count()])
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


def save_checkpoint(directory: Path, step: int, model, optimizer, info: dict, keep: int = 2) -> Path:
    """Write ``directory/step-<step>`` atomically; keep the newest ``keep`` checkpoints."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = trainable_named(model)
    tensors = {f"param.{n}": p.detach().to("cpu").contiguous() for n, p in params.items()}
    by_id = {id(p): n for n, p in params.items()}
    steps = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st or id(p) not in by_id:
                continue
            n = by_id[id(p)]
            for key, val in st.items():
                if torch.is_tensor(val) and val.dim() > 0:
                    tensors[f"optim.{key}.{n}"] = val.detach().to("cpu").contiguous()
                else:
                    steps[f"{key}.{n}"] = float(val)
    rng_t, rng_py = _rng_state()
    tensors.update(rng_t)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    meta = {"step": step, **info, "optimizer": {"param_groups": groups, "scalars": steps}, "python_rng": rng_py}

    final = directory / f"{PREFIX}{step:07d}"
    tmp = directory / f".tmp-{PREFIX}{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(tensors, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1, default=_json_default))
    for f in (tmp / STATE_TENSORS, tmp / STATE_JSON):  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _json_default(o):
    if isinstance(o, (tuple, set)):
        return list(o)
    if torch.is_tensor(o):
        return o.tolist()
    return str(o)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of a killed write are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and (p / STATE_JSON).is_file() and (p / STATE_TENSORS).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore parameters, optimizer state and RNG from ``path``; returns the saved info (step, position, ...)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / STATE_JSON).read_text())
        tensors = load_file(str(path / STATE_TENSORS))
    except Exception as e:  # noqa: BLE001 -- any damage is reported the same way
        raise UnipeftError(f"checkpoint {path} cannot be read: {e}") from None
    params = trainable_named(model)
    saved = {k[len("param."):] for k in tensors if k.startswith("param.")}
    if saved != set(params):
        missing, extra = sorted(set(params) - saved)[:3], sorted(saved - set(params))[:3]
        raise UnipeftError(f"checkpoint {path} does not match this model's trainable parameters "
                           f"(missing {missing}, unexpected {extra}): was it made with another method or model?")
    for n, p in params.items():
        t = tensors[f"param.{n}"]
        if t.shape != p.shape:
            raise UnipeftError(f"checkpoint {path}: parameter {n} has shape {tuple(t.shape)}, model has {tuple(p.shape)}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    opt = meta["optimizer"]
    for group, saved_group in zip(optimizer.param_groups, opt["param_groups"]):
        group.update(saved_group)
    by_id = {id(p): n for n, p in params.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            n = by_id.get(id(p))
            state = {}
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if f"optim.{key}.{n}" in tensors:
                    state[key] = tensors[f"optim.{key}.{n}"].to(p.device)
            if f"step.{n}" in opt["scalars"]:
                # AdamW keeps `step` as a float tensor on the parameter's device (capturable) or CPU
                state["step"] = torch.tensor(opt["scalars"][f"step.{n}"], dtype=torch.float32)
            if state:
                optimizer.state[p] = state
    _set_rng_state(tensors, meta["python_rng"])
    return meta
