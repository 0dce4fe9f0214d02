"""Training checkpoints: everything a killed run needs to continue exactly, written atomically.

A checkpoint is a directory ``checkpoints/step-000120/`` holding

* ``state.safetensors`` -- the trainable parameters (by name), AdamW's moments, the training state of
  the deltas' step controllers (``step_hooks``: AdaLoRA's smoothed importance, DyLoRA's next rank;
  ``controller.<i>.<key>``), and the RNG states of every process (torch CPU/CUDA generators as byte
  tensors, ``rng.torch.<rank>``);
* ``state.json``        -- step, epoch and batch position in the data, scheduler position,
  the optimizer's hyperparameters, Python's RNG state of every process, the best metric so far,
  and the run's settings.

The directory is written under a temporary name and renamed into place, so a crash
(even SIGKILL) leaves either the previous checkpoint or the new one, never half of
one. Loading reads JSON and safetensors only: nothing is unpickled.

Under several processes every process calls ``save_checkpoint`` (the RNG states are gathered,
and under FSDP2 the sharded parameters and moments too) and the main process alone writes;
every process calls ``load_checkpoint`` and takes its own RNG state and, under FSDP2, its shard.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from .. import step_hooks
from ..errors import UnipeftError
from . import distributed as dist

PREFIX = "step-"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"


def trainable_named(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _rng_state(device) -> tuple[dict, dict]:
    """This process's generators: torch CPU, the CUDA device it drives (if any), Python's ``random``."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    version, py, gauss = random.getstate()
    return state, {"version": version, "state": list(py), "gauss": gauss}


def _set_rng_state(tensors: dict, python: list | dict, rank: int, device) -> bool:
    """Restore this process's generators; False when the checkpoint has none for ``rank``."""
    if "rng.torch" in tensors:  # written by one process before per-process states existed
        if rank != 0:
            return False
        torch.set_rng_state(tensors["rng.torch"])
        cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda][:torch.cuda.device_count()])
        py = python
    else:
        if f"rng.torch.{rank}" not in tensors or rank >= len(python):
            return False
        torch.set_rng_state(tensors[f"rng.torch.{rank}"])
        if f"rng.cuda.{rank}" in tensors and torch.cuda.is_available() and torch.device(device).type == "cuda":
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{rank}"], device)
        py = python[rank]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    return True


def _gather_rng(device) -> tuple[dict, list]:
    """The RNG states of all processes: byte tensors by rank, and Python's states as a list by rank."""
    mine, py = _rng_state(device)
    tensors = {}
    for key, value in mine.items():
        blobs = dist.all_gather_bytes(value.cpu().numpy().tobytes(), device)
        tensors.update({f"rng.{key}.{r}": torch.frombuffer(bytearray(b), dtype=torch.uint8)
                        for r, b in enumerate(blobs) if b})
    return tensors, dist.all_gather_json(py, device)


def collect_state(model, optimizer, device="cpu") -> tuple[dict, dict, list]:
    """(tensors, optimizer scalars, Python RNG states) of a checkpoint; every process must call it.

    Sharded (FSDP2) parameters and moments are gathered in name order, so the collectives
    line up across processes.
    """
    dist.reshard(model)  # the parameter objects the optimizer holds, even after an evaluation
    params = trainable_named(model)
    tensors = {f"param.{n}": dist.full(p.detach()).to("cpu").contiguous() for n, p in params.items()}
    names = _optimizer_names(params, optimizer)
    steps = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            n = names[id(p)]
            for key, val in st.items():
                if torch.is_tensor(val) and val.dim() > 0:
                    tensors[f"optim.{key}.{n}"] = dist.full(val.detach()).to("cpu").contiguous()
                else:
                    steps[f"{key}.{n}"] = float(dist.local(val) if torch.is_tensor(val) else val)
    tensors.update(step_hooks.state_tensors(model))  # AdaLoRA's importance, DyLoRA's next rank, ...
    rng, python = _gather_rng(device)
    tensors.update(rng)
    return tensors, steps, python


def _optimizer_names(params: dict, optimizer) -> dict[int, str]:
    """id of each optimizer parameter -> its name in the model; every one must be a trainable parameter
    (a parameter left out would silently lose its AdamW moments in a checkpoint)."""
    by_id = {id(p): n for n, p in params.items()}
    stray = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"] if id(p) not in by_id]
    if stray:
        raise UnipeftError(f"the optimizer holds {len(stray)} parameter(s) that are not the model's trainable "
                           f"parameters (shapes {stray[:3]}): checkpoints name every optimizer state by its parameter")
    return by_id


def save_checkpoint(directory: Path, step: int, model, optimizer, info: dict, keep: int = 2, *,
                    main: bool = True, device="cpu") -> Path:
    """Write ``directory/step-<step>`` atomically; keep the newest ``keep`` checkpoints.

    Every process calls this (``main`` says which one writes); the others return the same path.
    """
    from safetensors.torch import save_file

    tensors, steps, python = collect_state(model, optimizer, device)
    directory = Path(directory)
    final = directory / f"{PREFIX}{step:07d}"
    if not main:
        return final
    directory.mkdir(parents=True, exist_ok=True)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    meta = {"step": step, **info, "optimizer": {"param_groups": groups, "scalars": steps}, "python_rng": python}

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


def load_checkpoint(path: Path, model, optimizer, *, rank: int = 0, device="cpu") -> dict:
    """Restore parameters, optimizer state and RNG from ``path``; returns the saved info (step, position, ...).

    ``meta["rng_restored"]`` is False when the checkpoint holds no RNG state for ``rank`` (it was
    written by fewer processes).
    """
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / STATE_JSON).read_text())
        tensors = load_file(str(path / STATE_TENSORS))
    except Exception as e:  # noqa: BLE001 -- any damage is reported the same way
        raise UnipeftError(f"checkpoint {path} cannot be read: {e}") from None
    dist.reshard(model)
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
    by_id = _optimizer_names(params, optimizer)
    for n, p in params.items():
        dist.assign(p, tensors[f"param.{n}"])
    opt = meta["optimizer"]
    for group, saved_group in zip(optimizer.param_groups, opt["param_groups"]):
        group.update(saved_group)
    for group in optimizer.param_groups:
        for p in group["params"]:
            n = by_id[id(p)]
            state = {}
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if f"optim.{key}.{n}" in tensors:
                    state[key] = dist.like(tensors[f"optim.{key}.{n}"], p)
            if f"step.{n}" in opt["scalars"]:
                # AdamW keeps `step` as a float tensor on the parameter's device (capturable) or CPU
                state["step"] = torch.tensor(opt["scalars"][f"step.{n}"], dtype=torch.float32)
            if state:
                optimizer.state[p] = state
    step_hooks.load_state_tensors(model, tensors, f"checkpoint {path}")
    meta["rng_restored"] = _set_rng_state(tensors, meta["python_rng"], rank, device)
    return meta
