"""Several processes (``accelerate launch``, ``torchrun``): starting them right, and moving data between them.

The trainer runs the same loop in every process; this module holds what that needs beyond
``accelerate``:

* ``make_accelerator`` -- an ``Accelerator`` that also works when CPU-only processes are
  started by ``torchrun`` or ``accelerate launch --multi_gpu`` (accelerate would otherwise
  run each of them alone), and ``check_accelerator``, which refuses set-ups the trainer
  cannot do right (DeepSpeed, FSDP version 1, FSDP asked for where accelerate silently
  falls back to DDP);
* ``all_gather_json`` -- every process's JSON-able value, gathered through byte tensors
  (``torch.distributed.all_gather_object`` would unpickle; nothing here ever does);
* ``all_reduce_sum`` -- sums of a few floats (the loss of a global batch);
* helpers for FSDP2, whose parameters are sharded ``DTensor``s: ``full`` gathers one
  (collective: every process must call it, in the same order), ``assign`` writes a full
  tensor into a sharded parameter, ``local``/``local_like`` give the shard of this process, and
  ``reshard`` puts the sharded parameters back in place after a forward pass without backward.

With one process every function is a cheap no-op: no collective is ever issued.
"""
from __future__ import annotations

import json
import os

import torch

from ..errors import UnipeftError
from ..storage import full_tensor as full  # noqa: F401 -- re-exported: the one DTensor gather
from ..storage import reshard  # noqa: F401 -- re-exported

_LAUNCHED_WORLD = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def launched_world_size() -> int:
    """The number of processes the launcher started (1 when not launched by one)."""
    for key in _LAUNCHED_WORLD:
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def _has_accelerator_hardware() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None:
        return acc.is_available()
    return torch.cuda.is_available()


def make_accelerator(**kwargs):
    """The trainer's ``Accelerator``: CPU processes started by a launcher train together (gloo)."""
    from accelerate import Accelerator

    # accelerate starts a CPU process group only when told the run is on CPU (``--cpu`` or
    # ACCELERATE_USE_CPU); ``torchrun`` / ``accelerate launch --multi_gpu`` on a machine without a
    # GPU would otherwise give N independent single-process runs writing the same files.
    cpu = launched_world_size() > 1 and not _has_accelerator_hardware()
    acc = Accelerator(cpu=cpu or kwargs.pop("cpu", False), **kwargs)
    check_accelerator(acc)
    return acc


def check_accelerator(acc) -> None:
    """Refuse the distributed set-ups the trainer cannot do right, with one line saying why."""
    from accelerate.utils import DistributedType

    kind = acc.distributed_type
    world = launched_world_size()
    if world > 1 and acc.num_processes != world:
        raise UnipeftError(f"the launcher started {world} processes but accelerate set up {acc.num_processes}: "
                           f"launch with `accelerate launch --num_processes {world} ...` (or torchrun) and do not "
                           "create another Accelerator first")
    if kind == DistributedType.DEEPSPEED:
        raise UnipeftError("DeepSpeed is not supported by the unipeft trainer: its checkpoints and saved deltas do "
                           "not gather ZeRO-partitioned states; use DDP (accelerate launch --multi_gpu) or FSDP2 "
                           "(--use_fsdp --fsdp_version 2)")
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    if kind == DistributedType.FSDP:
        version = getattr(acc.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise UnipeftError(f"FSDP version {version} is not supported by the unipeft trainer: use FSDP2 "
                               "(accelerate launch --use_fsdp --fsdp_version 2, or fsdp_version: 2 in the config)")
    elif fsdp_asked:
        raise UnipeftError(f"FSDP was asked for, but accelerate set up {kind.value} instead (accelerate enables FSDP "
                           "on GPUs only; on CPU it would train unsharded): drop --use_fsdp, or run on GPUs")


def is_fsdp(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


# ---------------------------------------------------------------------------
# collectives
# ---------------------------------------------------------------------------

def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_gather_bytes(data: bytes, device) -> list[bytes]:
    """Every process's ``data``, in rank order (lengths first, then the bytes padded to the longest)."""
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return [data]
    dist = torch.distributed
    world = dist.get_world_size()
    n = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = max(int(s) for s in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    if data:
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    parts = [torch.zeros_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    return [p[:int(s)].cpu().numpy().tobytes() for p, s in zip(parts, sizes)]


def all_gather_json(value, device) -> list:
    """Every process's JSON-able ``value``, in rank order. Floats round-trip exactly through JSON."""
    return [json.loads(b) for b in all_gather_bytes(json.dumps(value).encode(), device)]


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Element-wise sums over the processes, in float64 (the same result in every process)."""
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------
# FSDP2 (DTensor) parameters
# ---------------------------------------------------------------------------

def is_sharded(t) -> bool:
    if not _initialized():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor; the tensor itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def local_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The shard of the full tensor ``value`` that this process holds of ``like`` (no communication:
    every process has ``value``, e.g. read from the same checkpoint file)."""
    if not is_sharded(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    dev = like.to_local().device
    return distribute_tensor(value.to(device=dev, dtype=like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None).to_local()


def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)`` for a full ``value``, whether ``param`` is sharded or not."""
    with torch.no_grad():
        local(param).copy_(local_like(value, param))


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (full) laid out as ``param`` is: a DTensor with its placements under FSDP2 (optimizer states)."""
    if not is_sharded(param):
        return value.to(param.device)
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_like(value, param), param.device_mesh, param.placements,
                              shape=param.shape, stride=param.stride())
