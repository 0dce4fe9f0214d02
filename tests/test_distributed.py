"""Several processes: `unipeft train` launched as 2 CPU processes (gloo) trains what one process trains.

The runs are real launches (``accelerate launch``, ``torchrun``) of the CLI on a tiny GPT-2 (no
dropout) and a causal-LM task whose targets differ in length, with a batch of 7 (shards of 4 and
3 examples and different target-token counts) and a last batch of 1 example (one process gets
none). They check that

* two DDP processes end with the delta one process trains on the same global batches;
* only the main process writes: one JSON on stdout, each log record once, valid files, no
  temporary leftovers; checkpoints hold both processes' RNG states;
* a two-process run killed with SIGKILL after a checkpoint resumes to the same parameters,
  bit for bit, as the uninterrupted two-process run;
* under FSDP2 (sharded parameters) the saved delta and checkpoints hold the full tensors;
* multi-task runs with a delta per task train, under DDP and under FSDP2, what one process trains.

Each launch starts fresh Python processes (imports dominate its time), so the file launches
six times only (plus one single-process FSDP2 subprocess).
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from safetensors.torch import load_file

import tiny
from unipeft.cli import main
from unipeft.errors import UnipeftError

HERE = Path(__file__).parent
# the launches need torch.distributed with gloo, the CPU backend (torch builds without it exist)
needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="this torch build has no gloo backend for CPU process groups")
STEPS = 12  # 43 examples in batches of 7: 7 batches an epoch, 4 steps of 2 batches (the last of one), 3 epochs

# Two processes do not compute bit for bit what one does: DDP's all-reduce adds the two
# processes' gradients (and each process pads its shard to its own longest example), where one
# process adds over the whole batch in another order. That moves float32 results by ~1e-7 per
# step (measured: at most 1.3e-7 here, parameters of size ~0.2), and AdamW's normalised steps
# keep it there. A wrong weighting of the shards moves them by 5e-2 (measured with each shard's
# mean weighted equally, as plain DDP does), so these tolerances still catch it.
TOL = {"rtol": 1e-5, "atol": 1e-6}

# the README's FSDP configuration ("Several GPUs and machines"), for 2 processes
FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: 'no'
num_machines: 1
num_processes: 2
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_cpu_ram_efficient_loading: true
  fsdp_state_dict_type: FULL_STATE_DICT
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    rng = random.Random(0)
    # targets of 5 to 11 words: the shards of a batch hold different numbers of target tokens
    rows = [(s, t + " very nice" * rng.randint(0, 3)) for s, t in tiny.table_rows(55)]
    return {
        "root": root,
        "model": tiny.save(root / "gpt2", "gpt2", "lm", dropout=False),
        "train": tiny.write_csv(root / "train.csv", ["source", "target"], rows[:43]),
        "dev": tiny.write_csv(root / "dev.csv", ["source", "target"], rows[43:]),
    }


def train_args(s, out):
    return ["train", "--model", s["model"], "--task", "gen", "--kind", "causal_lm", "--train", s["train"],
            "--dev", s["dev"], "--text-column", "source", "--target-column", "target", "--out", out,
            "--precision", "fp32", "--threads", "1", "--method", "lora", "--lr", "1e-2", "--batch-size", "7",
            "--grad-accum", "2", "--epochs", "3", "--eval-every", "4", "--save-every", "2",
            "--max-new-tokens", "8", "--seed", "0", "--json"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def accelerate_launch(*args, config=None):
    # --multi_gpu is accelerate's multi-process launcher (torchrun underneath); on a machine without a
    # GPU the trainer's Accelerator takes the CPU with gloo (`--cpu` would start a single process)
    how = ["--config_file", str(config)] if config else [
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no"]
    return [sys.executable, "-m", "accelerate.commands.launch", *how, "--main_process_port", str(free_port()),
            *map(str, args)]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), *map(str, args)]


def run(cmd, timeout=240):
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd[:6]} failed:\n{p.stderr[-3000:]}"
    return p


def delta(out):
    return load_file(str(Path(out) / "delta" / "delta.safetensors"))


def last_checkpoint(out):
    return load_file(str(Path(out) / "checkpoints" / f"step-{STEPS:07d}" / "state.safetensors"))


def trained_state(out):
    """The last checkpoint's parameters and AdamW moments (the RNG states differ by design)."""
    return {k: v for k, v in last_checkpoint(out).items() if not k.startswith("rng.")}


def records(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def assert_close_dicts(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].numel() > 0, k
        torch.testing.assert_close(b[k], a[k], **TOL, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def single(setup):
    out = setup["root"] / "one"
    assert main([str(a) for a in train_args(setup, out)]) == 0
    return out


@pytest.fixture(scope="module")
def ddp(setup):
    out = setup["root"] / "two"
    proc = run(accelerate_launch("-m", "unipeft", *train_args(setup, out)))
    return out, proc.stdout


@needs_gloo
def test_two_processes_train_the_delta_one_process_trains(setup, single, ddp):
    out, stdout = ddp
    printed = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1, "only the main process reports"
    res = json.loads(printed[0])
    assert res["steps"] == STEPS and res == json.loads((out / "results.json").read_text())
    one = json.loads((single / "results.json").read_text())

    assert_close_dicts(delta(single), delta(out))
    assert_close_dicts(trained_state(single), trained_state(out))
    # evaluation is split between the processes and gathered: the same texts, the same scores
    assert res["dev"]["bleu"] == one["dev"]["bleu"] and res["dev"]["rouge_l"] == one["dev"]["rouge_l"]
    assert res["dev"]["loss"] == pytest.approx(one["dev"]["loss"], rel=1e-6)
    # one record per step/evaluation (a second writer would repeat them), the global batch's loss
    a, b = records(single), records(out)
    assert [sorted(r) for r in a] == [sorted(r) for r in b] and [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        if "loss" in ra:
            assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
        if "eval" in ra:
            assert rb["eval"]["loss"] == pytest.approx(ra["eval"]["loss"], rel=1e-6)
    assert (out / "run.json").read_text() == (single / "run.json").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{STEPS - 2:07d}", f"step-{STEPS:07d}"]
    assert not [p for p in out.rglob(".*")], "temporary files left behind"
    # each process's RNG state is saved: distinct streams (dropout masks differ between shards)
    state = last_checkpoint(out)
    assert not torch.equal(state["rng.torch.0"], state["rng.torch.1"])
    meta = json.loads((out / "checkpoints" / f"step-{STEPS:07d}" / "state.json").read_text())
    assert len(meta["python_rng"]) == 2


def multitask_args(s) -> list:
    return ["train", "--model", s["model"], "--task", "fwd,back", "--kind", "causal_lm", "--train",
            s["train"], "--dev", s["dev"], "--text-column", "source", "--target-column", "target",
            "--precision", "fp32", "--threads", "1", "--method", "lora", "--lr", "1e-2", "--batch-size", "8",
            "--max-steps", "3", "--eval-every", "0", "--max-new-tokens", "4", "--seed", "0", "--json", "--quiet"]


@pytest.fixture(scope="module")
def multitask_single(setup):
    one = setup["root"] / "mt-one"
    assert main([str(a) for a in multitask_args(setup) + ["--out", one]]) == 0
    return one


@needs_gloo
def test_two_processes_train_per_task_deltas_as_one_process_does(setup, multitask_single):
    """Multi-task training under DDP: mixed batches split between the processes, each row routed to its
    task's delta; every task's saved delta as the single process trains it."""
    one, two = multitask_single, setup["root"] / "mt-two"
    proc = run(accelerate_launch("-m", "unipeft", *multitask_args(setup), "--out", two))
    assert len([line for line in proc.stdout.splitlines() if line.startswith("{")]) == 1, "only the main process reports"
    for task in ("fwd", "back"):
        assert_close_dicts(delta(one / task), delta(two / task))
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert b["dev"]["fwd"]["loss"] == pytest.approx(a["dev"]["fwd"]["loss"], rel=1e-5)


@needs_gloo
def test_a_killed_two_process_run_resumes_to_the_same_parameters(setup, ddp):
    out = setup["root"] / "killed"
    cmd = torchrun("-m", "unipeft", *train_args(setup, out))
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = False
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*")):
            # torchrun starts each worker in its own session: kill the workers (a crash of the machine),
            # then the launcher
            for child in psutil.Process(proc.pid).children(recursive=True):
                os.kill(child.pid, signal.SIGKILL)
            proc.kill()
            killed = True
            break
        time.sleep(0.01)
    proc.wait()
    assert killed, "the run ended before it could be killed"
    assert not (out / "results.json").exists() and not (out / "delta").exists()
    steps = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")]
    assert steps and max(steps) < STEPS

    run(torchrun("-m", "unipeft", *train_args(setup, out), "--resume"))
    res = json.loads((out / "results.json").read_text())
    assert res["resumed_from"] and res["steps"] == STEPS
    a, b = delta(ddp[0]), delta(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run ended with other parameters"


@needs_gloo
def test_fsdp2_saves_full_gathered_tensors(setup, single):
    out, report = setup["root"] / "fsdp", setup["root"] / "fsdp-report"
    # the settings of train_args, as run.train takes them
    kw = {"model": setup["model"], "task": "gen", "method": "lora", "out": str(out),
          "data": {"train": setup["train"], "dev": setup["dev"], "kind": "causal_lm", "text_column": "source",
                   "target_column": "target"},
          "lr": 1e-2, "batch_size": 7, "grad_accum": 2, "epochs": 3.0, "eval_every": 4, "save_every": 2,
          "max_new_tokens": 8, "seed": 0, "precision": "fp32"}
    spec = setup["root"] / "fsdp.json"
    spec.write_text(json.dumps({"report": str(report), "train": kw}))
    config = setup["root"] / "fsdp.yaml"
    config.write_text(FSDP_CONFIG)
    run(accelerate_launch(HERE / "fsdp_cpu.py", spec, config=config))

    reports = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["distributed_type"] == "FSDP" and rep["fsdp_version"] == 2
        # every trainable tensor was sharded: each process held half of it
        assert len(rep["sharded"]) == len(delta(single)) and rep["local_numel"] * 2 == rep["full_numel"]
        assert rep["reload_params_equal"] and rep["reload_moments_equal"]
    # the files hold whole tensors, of the shapes one process saves, with its values
    assert_close_dicts(delta(single), delta(out))
    assert_close_dicts(trained_state(single), trained_state(out))
    assert json.loads((out / "results.json").read_text())["steps"] == STEPS


@needs_gloo
def test_fsdp2_trains_per_task_deltas_as_one_process_does(setup, multitask_single):
    """Multi-task training with a delta per task under FSDP2: a process whose shard of a mixed batch holds
    no row of a task still sends that task's (zero) gradient, so the reduce-scatters match (without it
    gloo aborts on a collective mismatch); every task's saved delta as one process trains it."""
    out, report = setup["root"] / "mt-fsdp", setup["root"] / "mt-fsdp-report"
    kw = {"model": setup["model"], "tasks": "fwd,back", "method": "lora", "out": str(out),
          "data": {"train": setup["train"], "dev": setup["dev"], "kind": "causal_lm", "text_column": "source",
                   "target_column": "target"},
          "lr": 1e-2, "batch_size": 8, "max_steps": 3, "eval_every": 0, "save_every": 1, "max_new_tokens": 4,
          "seed": 0, "precision": "fp32"}
    spec = setup["root"] / "mt-fsdp.json"
    spec.write_text(json.dumps({"report": str(report), "multitask": True, "train": kw}))
    config = setup["root"] / "mt-fsdp.yaml"
    config.write_text(FSDP_CONFIG)
    run(accelerate_launch(HERE / "fsdp_cpu.py", spec, config=config))
    for rank in (0, 1):
        rep = json.loads((report / f"rank{rank}.json").read_text())
        assert rep["distributed_type"] == "FSDP" and rep["local_numel"] * 2 == rep["full_numel"]
        assert {n.split(".unipeft_deltas.")[1].split(".")[0] for n in rep["sharded"]} == {"fwd", "back"}
        assert rep["reload_params_equal"] and rep["reload_moments_equal"]
    for task in ("fwd", "back"):
        assert_close_dicts(delta(multitask_single / task), delta(out / task))
    a, b = (json.loads((d / "results.json").read_text()) for d in (multitask_single, out))
    assert b["dev"]["back"]["loss"] == pytest.approx(a["dev"]["back"]["loss"], rel=1e-5)
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


# one process of FSDP2 in a subprocess (no launcher): what a forward pass without backward leaves behind
FSDP_AFTER_EVAL = """\
import os, sys, torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from unipeft.training import checkpoint

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
fully_shard(model[0])
fully_shard(model)  # the root group keeps its parameters unsharded after a forward pass
opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-2)
model(torch.randn(3, 4)).sum().backward()
opt.step()
with torch.no_grad():
    model(torch.randn(3, 4))  # an evaluation
tensors, _, _ = checkpoint.collect_state(model, opt)
names = [n for n, _ in model.named_parameters()]
assert all(isinstance(p, DTensor) for p in model.parameters()), "the sharded parameters are not back in place"
assert all(f"optim.exp_avg.{n}" in tensors and f"optim.exp_avg_sq.{n}" in tensors for n in names), sorted(tensors)
print("ok", len(names))
"""


@needs_gloo
def test_a_checkpoint_after_an_evaluation_keeps_every_fsdp2_moment():
    """FSDP2 reshards the root's parameters only after a backward pass: after an evaluation the
    module holds unsharded copies, not the parameters AdamW steps. A checkpoint taken then must
    still find every parameter's moments."""
    p = subprocess.run([sys.executable, "-c", FSDP_AFTER_EVAL, str(free_port())], env=env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["ok", "6"]


# ---------------------------------------------------------------------------
# in-process checks (no launch)
# ---------------------------------------------------------------------------

def test_shard_weights_reproduce_the_whole_batch_mean_loss():
    """The trainer weights each process's mean loss by its share of the loss terms; summed, that is
    the mean one process computes on the whole batch, for every way a task averages its loss."""
    from unipeft.training import Task
    from unipeft.training.batching import Collator, encode
    from unipeft.training.aux_lm import AuxLM
    from unipeft.training.trainer import loss_units

    rng = random.Random(1)
    gen = [{"text": s, "target": t + " very nice" * rng.randint(0, 3)} for s, t in tiny.table_rows(7)]
    cls = [{"text": t, "target": y} for t, y in tiny.sentiment_rows(7)]
    cases = [("gpt2", "lm", Task("g", "causal_lm"), gen, 0.0), ("gpt2", "lm", Task("g", "causal_lm"), gen, 1.0),
             ("t5", "seq2seq", Task("s", "seq2seq"), gen, 0.0),
             ("gpt2", "cls", Task("c", "classification", labels=("neg", "pos")), cls, 1.0)]
    for family, head, task, examples, aux_weight in cases:
        model = tiny.make(family, head)
        if head == "cls":
            model.config.pad_token_id = 0
        tok = tiny.tokenizer(family)
        enc = encode(task, examples, tok, 64, cache_dir=None)
        collate = Collator(0)
        aux = AuxLM(model, task, aux_weight) if aux_weight else None
        units, aux_units = loss_units(task, enc), loss_units(task, enc, aux=True)

        def loss(idx):
            batch = collate([enc.example(i) for i in idx])
            out = model(**batch)
            return out.loss, (aux.loss(batch, out) if aux else None)

        idx = list(range(len(examples)))
        whole, whole_aux = loss(idx)
        shards = [idx[0::2], idx[1::2]]
        weighted = sum(loss(s)[0] * float(units[s].sum() / units[idx].sum()) for s in shards)
        torch.testing.assert_close(weighted, whole, rtol=1e-5, atol=1e-6)
        if aux:
            weighted = sum(loss(s)[1] * float(aux_units[s].sum() / aux_units[idx].sum()) for s in shards)
            torch.testing.assert_close(weighted, whole_aux, rtol=1e-5, atol=1e-6)
            aux.close()


def test_launches_the_trainer_cannot_serve_are_refused_in_one_line(monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from unipeft.training.distributed import check_accelerator

    acc = Accelerator()  # this process alone (and the state other tests' trainers share)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UnipeftError, match="the launcher started 2 processes but accelerate set up 1"):
        check_accelerator(acc)
    monkeypatch.delenv("WORLD_SIZE")
    # accelerate keeps FSDP off on CPU: the launch asked for sharding and would silently not get it
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UnipeftError, match="FSDP was asked for, but accelerate set up NO instead"):
        check_accelerator(acc)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_accelerator(acc)  # a plain single process is fine
    # set-ups this machine cannot create (no DeepSpeed, no GPUs): what the check does with their accelerator state
    fake = SimpleNamespace(num_processes=1, distributed_type=DistributedType.DEEPSPEED, state=None)
    with pytest.raises(UnipeftError, match="DeepSpeed is not supported by the unipeft trainer"):
        check_accelerator(fake)
    fake = SimpleNamespace(num_processes=1, distributed_type=DistributedType.FSDP,
                           state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(UnipeftError, match="FSDP version 1 is not supported.*fsdp_version 2"):
        check_accelerator(fake)
