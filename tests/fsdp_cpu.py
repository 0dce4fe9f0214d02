"""Test helper for tests/test_distributed.py: ``run.train`` under accelerate's FSDP2 on CPU processes (gloo).

accelerate 1.15 turns FSDP on for GPU process groups only: on CPU it keeps its MULTI_CPU (DDP)
mode whatever the launch asks (and the unipeft trainer refuses such a launch). FSDP2 itself
(``fully_shard``) runs on CPU with gloo, so this script starts the CPU process group, switches
accelerate's state to FSDP with the plugin the launch configured (``FSDP_*`` variables), and trains
through the normal path: accelerate's own FSDP2 preparation shards the model, and the trainer must
gather the full tensors to save them.

Run: ``accelerate launch --config_file FSDP.yaml tests/fsdp_cpu.py SPEC.json``, where the
spec holds ``report`` (a folder for one JSON report per process, outside the run directory) and
``train`` (keyword arguments of ``run.train``). Each report says what was sharded in that process and
whether reloading the last checkpoint into the sharded model gives back the saved values.
"""
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    acc = Accelerator(cpu=True)
    if acc.distributed_type != DistributedType.MULTI_CPU:
        raise SystemExit(f"expected a CPU process group, got {acc.distributed_type}")
    # both shared states: a later Accelerator() (the trainer's) copies PartialState's into its own
    PartialState().distributed_type = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* settings

    from unipeft.training import checkpoint, multitask, run

    torch.set_num_threads(1)
    res = (multitask.train if spec.get("multitask") else run.train)(accelerator=acc, **spec["train"])
    trainer, model = res["_trainer"], res["_model"]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    report = {
        "rank": acc.process_index,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "fsdp_version": trainer.accelerator.state.fsdp_plugin.fsdp_version,
        "sharded": sorted(n for n, p in trainable.items() if isinstance(p, DTensor)),
        "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in trainable.values()),
        "full_numel": sum(p.numel() for p in trainable.values()),
    }
    # reload the last checkpoint into the sharded model (after spoiling it): each process must get
    # its shard of the saved full tensors back, for parameters and AdamW's moments alike
    last = checkpoint.latest_checkpoint(Path(spec["train"]["out"]) / "checkpoints")
    with torch.no_grad():
        for p in trainable.values():
            (p.to_local() if isinstance(p, DTensor) else p).add_(1.0)
    checkpoint.load_checkpoint(last, model, trainer.optimizer, rank=acc.process_index, device=acc.device)
    from safetensors.torch import load_file

    saved = load_file(str(last / checkpoint.STATE_TENSORS))
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in trainable.items()}
    moments = {n: trainer.optimizer.state[p]["exp_avg"] for n, p in trainable.items()}
    full_moments = {n: (m.full_tensor() if isinstance(m, DTensor) else m) for n, m in moments.items()}
    report["reload_params_equal"] = all(torch.equal(full[n], saved[f"param.{n}"]) for n in full)
    report["reload_moments_equal"] = all(torch.equal(full_moments[n], saved[f"optim.exp_avg.{n}"]) for n in full)
    out = Path(spec["report"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(report))
    # every rank done with the collectives above before any closes its group: closed early, or left to
    # interpreter exit, gloo's threads aborted the other rank (SIGABRT, "terminate called without an
    # active exception"; twice in runs under load)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    # The reports are written: leave without interpreter finalization. There gloo's worker threads can
    # still hold work objects whose tensors need the GIL of an interpreter being torn down, which aborts
    # a rank ("terminate called without an active exception", SIGABRT) after the run succeeded: seen
    # three times in full runs, each time with both ranks' reports complete (pytorch/pytorch#179291
    # describes the teardown).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
