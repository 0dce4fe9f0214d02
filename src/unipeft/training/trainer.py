"""The training loop: AdamW over the delta's parameters, on one CPU, one GPU or many under ``accelerate``.

``Trainer(model, tokenizer, task, train, dev, TrainConfig(...), out_dir).fit()`` trains whatever
delta is attached (only parameters with ``requires_grad``) and returns a summary. What it does,
in the order of one optimizer step:

1. take the next ``grad_accum`` batches of the epoch (length-grouped, a pure function of
   seed and epoch, so a resumed run sees the same data); under several processes each
   takes its share of every batch, and its loss is weighted by its share of the batch's loss
   terms, so the averaged gradient is the one a single process computes on the whole batch;
2. forward under bf16 autocast where the hardware has it (weights stay fp32: the master copy),
   plus ``aux_lm_weight`` x the language-modelling loss (GPT-1's auxiliary objective, seed 003:
   L3 = L2 + lambda * L1);
3. stop with a clear error on a non-finite loss, before the parameters change;
4. clip the gradient norm, step AdamW and the linear warm-up/decay schedule;
5. log (JSONL, progress bar, optional TensorBoard), evaluate every ``eval_every`` steps or
   each epoch, remember the best parameters, stop early after ``early_stopping`` evaluations
   without improvement, and write an atomic checkpoint every ``save_every`` steps.

Under several processes (``accelerate launch`` / ``torchrun``; DDP, or FSDP2 on GPUs) every
process runs this loop; the logged loss is the global batch's, evaluation is split between the
processes and its metrics are the same everywhere (so early stopping agrees), and only the main
process writes files. See ``distributed.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import fileio, progress, step_hooks
from ..compat import enable_activation_checkpointing, supports_activation_checkpointing
from ..errors import UnipeftError, choices
from . import checkpoint as ckpt
from . import distributed as dist
from .aux_lm import AuxLM
from .batching import IGNORE, Collator, Encoded, batch_order, encode
from .evaluation import autocast, cap_examples, causal_lm_loss, evaluate, pad_id
from .metrics import is_better
from .tasks import Task

PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("linear", "constant")
# settings a resumed run must share with the run that wrote the checkpoint (they fix the data order)
RESUME_MUST_MATCH = ("batch_size", "grad_accum", "seed", "group_by_length", "epochs", "max_steps")


class TrainingDiverged(UnipeftError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """How to train. Every field has a default; method-aware learning rates live in ``defaults.py``."""

    lr: float = 1e-3
    epochs: float = 1.0
    max_steps: int | None = None          # overrides epochs
    batch_size: int = 16
    grad_accum: int = 1
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    precision: str = "auto"               # auto: bf16 autocast where the hardware supports it
    gradient_checkpointing: bool = False
    seed: int = 0
    eval_every: int | None = None         # steps; None: at the end of each epoch; 0: never during training
    eval_batch_size: int = 64
    eval_generate: bool = False           # generation tasks: BLEU/ROUGE at evaluations (slow), else the dev loss
    save_every: int | None = None         # steps between checkpoints; None: no checkpoints
    keep_checkpoints: int = 2
    keep_best: bool = True                # end with the parameters of the best evaluation
    early_stopping: int | None = None     # evaluations without improvement before stopping
    aux_lm_weight: float = 0.0            # lambda of GPT-1's auxiliary LM objective (decoder-only models)
    group_by_length: bool = True
    max_length: int = 128
    max_new_tokens: int = 64
    num_beams: int = 1
    log_every: int = 10
    progress: bool | None = None          # None: a bar on a terminal, plain lines elsewhere; False: nothing
    eval_max_examples: int | None = None  # cap every evaluation (generation tasks: distinct sources)
    tensorboard: bool = False
    packing: bool = False                 # causal_lm/chat: short examples share a row, attention kept apart (chat.pack)

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise UnipeftError(f"TrainConfig: {msg}")
        need(isinstance(self.lr, (int, float)) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        need(self.epochs > 0, f"epochs must be > 0, got {self.epochs!r}")
        need(self.max_steps is None or self.max_steps > 0, f"max_steps must be > 0, got {self.max_steps!r}")
        for f in ("batch_size", "grad_accum", "eval_batch_size", "max_length", "max_new_tokens", "num_beams",
                  "log_every", "keep_checkpoints"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) >= 1, f"{f} must be an integer >= 1, "
                 f"got {getattr(self, f)!r}")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        need(self.schedule in SCHEDULES, f"schedule {self.schedule!r} is not one of {choices(SCHEDULES)}")
        need(self.precision in PRECISIONS, f"precision {self.precision!r} is not one of {choices(PRECISIONS)}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or None")
        need(self.eval_every is None or self.eval_every >= 0, "eval_every must be >= 0 or None")
        need(self.save_every is None or self.save_every >= 1, "save_every must be >= 1 or None")
        need(self.early_stopping is None or self.early_stopping >= 1, "early_stopping must be >= 1 or None")
        need(self.aux_lm_weight >= 0, f"aux_lm_weight must be >= 0, got {self.aux_lm_weight!r}")
        need(self.eval_max_examples is None or (isinstance(self.eval_max_examples, int) and self.eval_max_examples >= 1),
             f"eval_max_examples must be an integer >= 1 or None, got {self.eval_max_examples!r}")

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU runs bf16 matrix products natively (autocast is then faster)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UnipeftError("precision bf16: this GPU does not support bfloat16; use --precision fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def loss_units(task: Task, enc: Encoded, aux: bool = False) -> torch.Tensor:
    """How many terms each example adds to the model's mean loss (float64, one per example).

    Classification and regression average over examples (1 each); causal LM over its target
    tokens after the first position (the model shifts labels left); seq2seq over its target
    tokens. ``aux``: the terms of the auxiliary LM loss (every next-token position of a
    classification input, the prompt positions of a causal LM example).
    """
    lengths = (enc.offsets[1:] - enc.offsets[:-1]).to(torch.float64)
    if enc.label_offsets is None:
        return lengths - 1 if aux else torch.ones(len(enc), dtype=torch.float64)
    valid = (enc.labels != IGNORE).to(torch.float64)
    counts = enc.label_offsets[1:] - enc.label_offsets[:-1]
    units = torch.zeros(len(enc), dtype=torch.float64).index_add_(
        0, torch.repeat_interleave(torch.arange(len(enc)), counts), valid)
    if task.causal:
        has = counts > 0
        units[has] -= valid[enc.label_offsets[:-1][has]]
        if aux:
            return lengths - 1 - units
    return units


def linear_schedule(warmup: int, total: int, kind: str):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


_FUSED_ADAMW_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def make_adamw(groups: list[dict], lr: float, distributed: bool = False) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel where it applies: one pass over each parameter instead of
    a dozen elementwise ops per tensor (measured 7.6 vs 26 ms per step for the 420 tensors of
    LoRA r=16 on SmolLM2, one CPU thread). The default for-loop kernel stays for distributed runs
    (FSDP's sharded parameters) and for parameters the fused kernel does not take."""
    params = [p for g in groups for p in g["params"]]
    fused = not distributed and all(type(p) is torch.nn.Parameter and p.dtype in _FUSED_ADAMW_DTYPES
                                    and p.device.type in ("cpu", "cuda") and p.layout == torch.strided
                                    for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=True) if fused else torch.optim.AdamW(groups, lr=lr)


# ---------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------

class Trainer:
    def __init__(self, model, tokenizer, task: Task, train: list[dict], dev: list[dict] | None = None,
                 config: TrainConfig | None = None, out_dir: str | os.PathLike | None = None, *,
                 cache: bool = True, accelerator=None, on_evaluate=()):
        self.config = cfg = config or TrainConfig()
        self.task, self.tokenizer = task, tokenizer
        self.train_examples = train
        self.dev_examples = cap_examples(task, dev or [], cfg.eval_max_examples)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        # callables (trainer, metrics) -> bool, run after each evaluation; True stops training
        self.on_evaluate = list(on_evaluate)
        if accelerator is not None:
            dist.check_accelerator(accelerator)
        self.accelerator = acc = accelerator or dist.make_accelerator()
        self.rank, self.world = acc.process_index, acc.num_processes
        self.fsdp = dist.is_fsdp(acc)
        if self.fsdp and cfg.aux_lm_weight > 0:
            raise UnipeftError("aux_lm_weight does not work under FSDP (it reads the sharded input embeddings "
                               "outside the model's forward); train without it or use DDP")
        if cfg.batch_size < self.world:
            raise UnipeftError(f"batch_size {cfg.batch_size} is smaller than the {self.world} processes")
        self.precision = resolve_precision(cfg.precision, acc.device)
        if not train:
            raise UnipeftError("no training examples")
        self.train_enc: Encoded = self.encode_train(train, cache)
        self.dev_enc: Encoded | None = (encode(task, self.dev_examples, tokenizer, cfg.max_length, cache_dir=cache)
                                        if self.dev_examples else None)
        self.collate = Collator(pad_id(tokenizer))
        self.lengths = self.train_enc.lengths()
        # each process's share of a batch's loss terms (see _micro_loss); one process needs no weights
        self.units = loss_units(task, self.train_enc) if self.world > 1 else None
        self.aux_units = loss_units(task, self.train_enc, aux=True) if self.world > 1 and cfg.aux_lm_weight > 0 \
            else None
        self.batches_per_epoch = -(-len(self.train_enc) // cfg.batch_size)
        self.steps_per_epoch = -(-self.batches_per_epoch // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))

        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not params:
            raise UnipeftError("the model has no trainable parameters: attach a delta first (up.attach)")
        if cfg.packing:
            from .chat import check_packing

            check_packing(model, self.train_enc)
        if cfg.gradient_checkpointing:
            if not supports_activation_checkpointing(model):
                raise UnipeftError(f"{type(model).__name__} does not support gradient checkpointing")
            enable_activation_checkpointing(model)
            model.config.use_cache = False
        # weight decay on matrices only: biases and norm scales keep theirs (the usual AdamW recipe)
        decays = {n: p.dim() >= 2 and "norm" not in n.lower() for n, p in params}
        groups = [{"params": [p for n, p in params if decays[n]], "weight_decay": cfg.weight_decay},
                  {"params": [p for n, p in params if not decays[n]], "weight_decay": 0.0}]
        optimizer = make_adamw([g for g in groups if g["params"]], cfg.lr, distributed=self.world > 1)
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, self.total_steps,
                                                                                      cfg.schedule))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.raw_model = acc.unwrap_model(self.model)
        # methods that follow a schedule over the whole training (AdaLoRA's rank budget) learn its length
        step_hooks.plan(self.raw_model, self.total_steps)
        self.aux = AuxLM(self.raw_model, task, cfg.aux_lm_weight) if cfg.aux_lm_weight > 0 else None
        # a causal LM's loss from the logits before its target tokens only (causal_lm_loss); the auxiliary
        # LM loss reads every position's logits, so it keeps the model's own loss
        out_layer = self.raw_model.get_output_embeddings() if task.causal and self.aux is None else None
        self.out_layer = out_layer if isinstance(out_layer, torch.nn.Module) else None

        # run state (what a checkpoint restores)
        self.step, self.epoch, self.batch_pos = 0, 0, 0
        self.best_metric, self.best_step, self.stale_evals = None, None, 0
        self.best_key = task.main_metric      # "loss" when evaluations only give the loss
        self.history: list[dict] = []
        self._tb = None                       # TensorBoard writer while fit() runs
        self._best_params: dict[str, torch.Tensor] | None = None
        self.train_seconds, self.examples_seen, self.tokens_seen = 0.0, 0, 0

    # -- data (multitask.MultiTaskTrainer overrides these two) ---------------------------

    def encode_train(self, train: list[dict], cache) -> Encoded:
        """The training examples as token ids; with ``packing``, short examples share rows."""
        cfg = self.config
        enc = encode(self.task, train, self.tokenizer, cfg.max_length, cache_dir=cache)
        if cfg.packing:
            from . import chat

            if not self.task.causal:
                raise UnipeftError(f"packing applies to causal_lm and chat tasks, not {self.task.kind!r}")
            enc = chat.pack(enc, cfg.max_length)
        return enc

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` as lists of example indices (a pure function of seed and epoch)."""
        return batch_order(self.lengths, self.config.batch_size, self.config.seed, epoch,
                           group_by_length=self.config.group_by_length)

    # -- bookkeeping -----------------------------------------------------------------

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.main and self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    self._tb.add_scalar(f"train/{k}", v, record["step"])
            for k, v in record.get("eval", {}).items():
                self._tb.add_scalar(f"eval/{k}", v, record["step"])

    def _checkpoint_dir(self) -> Path:
        if self.out_dir is None:
            raise UnipeftError("checkpoints need an output directory (out_dir / --out)")
        return self.out_dir / "checkpoints"

    def _info(self) -> dict:
        return {"epoch": self.epoch, "batch_pos": self.batch_pos, "best_metric": self.best_metric,
                "best_step": self.best_step, "stale_evals": self.stale_evals, "train_seconds": self.train_seconds,
                "examples_seen": self.examples_seen, "tokens_seen": self.tokens_seen,
                "total_steps": self.total_steps, "settings": self.config.to_dict()}

    def save_checkpoint(self) -> Path:
        """Every process calls this (it gathers RNG states, and FSDP shards); the main process writes."""
        acc = self.accelerator
        acc.wait_for_everyone()
        path = ckpt.save_checkpoint(self._checkpoint_dir(), self.step, self.raw_model, self.optimizer,
                                    self._info(), keep=self.config.keep_checkpoints, main=self.main,
                                    device=acc.device)
        acc.wait_for_everyone()  # no process reads or resumes before the main one has written
        return path

    def _latest_checkpoint(self) -> Path | None:
        """The main process's newest checkpoint, which every process must be able to read."""
        path = ckpt.latest_checkpoint(self._checkpoint_dir())
        if self.world == 1:
            return path
        dev = self.accelerator.device
        chosen = dist.all_gather_json(str(path) if path is not None and self.main else None, dev)[0]
        if chosen is None:
            return None
        path = Path(chosen)
        seen = dist.all_gather_json((path / ckpt.STATE_JSON).is_file() and (path / ckpt.STATE_TENSORS).is_file(), dev)
        if not all(seen):
            missing = [r for r, ok in enumerate(seen) if not ok]
            raise UnipeftError(f"checkpoint {path} (written by the main process) cannot be read by process(es) "
                               f"{missing}: with several machines, --out must be on storage that all of them share")
        return path

    def resume(self) -> Path | None:
        """Continue from the newest complete checkpoint in ``out_dir/checkpoints`` (None when there is none)."""
        path = self._latest_checkpoint()
        if path is None:
            return None
        meta = ckpt.load_checkpoint(path, self.raw_model, self.optimizer, rank=self.rank,
                                    device=self.accelerator.device)
        if not meta["rng_restored"]:
            # the checkpoint was written by fewer processes: this one gets a fresh stream, fixed by
            # (seed, rank, step) so that resuming the same way twice still gives the same run
            set_seed(self.config.seed + self.rank + 1_000_003 * meta["step"])
        saved = meta.get("settings", {})
        diff = [f"{k}: checkpoint {saved.get(k)!r}, now {getattr(self.config, k)!r}" for k in RESUME_MUST_MATCH
                if k in saved and saved[k] != getattr(self.config, k)]
        if diff:
            raise UnipeftError(f"cannot resume from {path}: settings differ ({'; '.join(diff)})")
        self.step, self.epoch, self.batch_pos = meta["step"], meta["epoch"], meta["batch_pos"]
        self.best_metric, self.best_step, self.stale_evals = meta["best_metric"], meta["best_step"], meta["stale_evals"]
        self.train_seconds = meta["train_seconds"]
        self.examples_seen, self.tokens_seen = meta["examples_seen"], meta["tokens_seen"]
        self.scheduler.last_epoch = self.step
        factor = self.scheduler.lr_lambdas[0](self.step)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if self.config.keep_best and self.best_step is not None:
            best = self._checkpoint_dir().parent / "best-params.safetensors"
            if best.is_file():
                from safetensors.torch import load_file
                params = dict(self.raw_model.named_parameters())
                self._best_params = {n: dist.local_like(t, params[n]).to("cpu") for n, t in
                                     load_file(str(best)).items() if n in params}
        return path

    # -- evaluation ------------------------------------------------------------------

    def evaluate(self, generation: bool | None = None, label: str | None = None) -> dict[str, float]:
        """The dev metrics; under several processes every process must call it, and all get the same numbers."""
        cfg = self.config
        if not self.dev_examples:
            return {}
        metrics = evaluate(self.raw_model, self.task, self.dev_examples, self.tokenizer, max_length=cfg.max_length,
                           batch_size=cfg.eval_batch_size, precision=self.precision,
                           generation=cfg.eval_generate if generation is None else generation,
                           max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams, encoded=self.dev_enc,
                           accelerator=self.accelerator, label=label or f"evaluating dev (step {self.step})")
        dist.reshard(self.raw_model)  # FSDP2: the sharded parameters back in place (snapshots, checkpoints)
        if self.world > 1:
            # the main process's numbers everywhere: best-parameter and early-stopping decisions must agree,
            # or the processes would leave the loop at different steps and wait on each other for ever
            metrics = dist.all_gather_json(metrics, self.accelerator.device)[0]
        return metrics

    def _after_eval(self, metrics: dict) -> bool:
        """Record an evaluation; True when early stopping says stop."""
        self._log({"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "eval": metrics})
        key = self.task.main_metric if self.task.main_metric in metrics else "loss"
        value = metrics.get(key)
        if value is None:
            return False
        if is_better(self.task, key, value, self.best_metric):
            self.best_metric, self.best_step, self.stale_evals = value, self.step, 0
            if self.config.keep_best:
                trainable = [(n, p) for n, p in self.raw_model.named_parameters() if p.requires_grad]
                # this process's shard only (all of it without FSDP): restored in place at the end
                self._best_params = {n: dist.local(p).detach().to("cpu", copy=True) for n, p in trainable}
                if self.out_dir is not None and self.config.save_every:  # for --resume
                    from safetensors.torch import save_file
                    best = {n: dist.full(p.detach()).to("cpu").contiguous() for n, p in trainable}  # all processes
                    if self.main:
                        fileio.atomic_write(self.out_dir / "best-params.safetensors",
                                            lambda tmp: save_file(best, str(tmp)))
        else:
            self.stale_evals += 1
        self.best_key = key
        stop = any([bool(cb(self, metrics)) for cb in self.on_evaluate])
        if self.world > 1:  # a callback that stops one process stops them all
            stop = any(dist.all_gather_json(stop, self.accelerator.device))
        return stop or (self.config.early_stopping is not None and self.stale_evals >= self.config.early_stopping)

    # -- training --------------------------------------------------------------------

    def _forward(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the model's mean loss, the auxiliary LM loss or None) on the examples ``idx``."""
        batch = {k: v.to(self.accelerator.device) for k, v in
                 self.collate([self.train_enc.example(i) for i in idx]).items()}
        with autocast(self.precision, self.accelerator.device):
            if self.out_layer is not None:
                return causal_lm_loss(self.model, batch, self.out_layer), None
            out = self.model(**batch)
            aux = self.aux.loss(batch, out) if self.aux is not None else None
        return out.loss, aux

    def _micro_loss(self, idx: list[int]) -> tuple[torch.Tensor, float]:
        """(the loss this process backpropagates, the whole batch's loss) for the batch ``idx``."""
        if self.world == 1:
            loss, aux = self._forward(idx)
            if aux is not None:
                loss = loss + self.config.aux_lm_weight * aux
            return loss, loss.item()
        mine = idx[self.rank::self.world]
        # The model averages over its own shard and DDP/FSDP average the gradients over the processes;
        # weighting each shard's mean by (its loss terms / the batch's) x processes makes that average
        # the gradient of the whole batch's mean, as one process computes it, even when shards differ
        # in size or in target tokens. A process without examples (a last batch smaller than the number
        # of processes) still runs one, with weight 0: the gradient all-reduce needs every process.
        loss, aux = self._forward(mine or idx[:1])
        share = float(self.units[mine].sum()) / float(self.units[idx].sum()) if mine else 0.0
        loss = loss * (share * self.world)
        if aux is not None:
            aux_share = float(self.aux_units[mine].sum()) / max(float(self.aux_units[idx].sum()), 1.0) if mine else 0.0
            loss = loss + self.config.aux_lm_weight * aux * (aux_share * self.world)
        # the global loss, summed over the processes: the same value (finite or not) in every process
        total = dist.all_reduce_sum([loss.item() / self.world], self.accelerator.device)[0]
        return loss, total

    def _diverged(self, value: float) -> None:
        last = None
        if self.out_dir is not None:
            # the parameters are still those of the last finished step: keep them as the last good checkpoint
            # (every process sees the same global loss, so all of them are here to take part)
            last = self.save_checkpoint()
        self._log({"step": self.step, "diverged": str(value)})
        where = f"; the last good state is checkpoint {last}" if last else ""
        raise TrainingDiverged(f"the loss became {value} at step {self.step + 1} (lr "
                               f"{self.optimizer.param_groups[0]['lr']:.2e}); training stopped before the "
                               f"parameters changed{where}; try a lower learning rate (--lr)")

    def fit(self, resume: bool = False) -> dict:
        """Train to the end of the budget (or early stopping); returns a summary of the run."""
        cfg, acc = self.config, self.accelerator
        # each process its own dropout stream (as accelerate's set_seed(device_specific=True)): with one
        # seed every shard of a batch would draw the same masks
        set_seed(cfg.seed + self.rank)
        resumed_from = self.resume() if resume else None
        if cfg.tensorboard and self.main:
            if self.out_dir is None:
                raise UnipeftError("tensorboard logging needs an output directory (--out)")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UnipeftError("tensorboard logging needs the tensorboard package: pip install tensorboard") from None
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        # a bar on a terminal, plain lines elsewhere; progress=True forces the bar, False shows nothing
        bar = progress.phase("training", self.total_steps, "steps", enabled=self.main and cfg.progress is not False,
                             terminal=True if cfg.progress else None, initial=self.step)
        self.model.train()
        stop_reason = "completed"
        run_loss, run_n, t_log, ex_log = 0.0, 0, time.perf_counter(), 0
        try:
            while self.step < self.total_steps and stop_reason == "completed":
                batches = self.epoch_batches(self.epoch)
                while self.batch_pos < len(batches) and self.step < self.total_steps:
                    t0 = time.perf_counter()
                    group = batches[self.batch_pos:self.batch_pos + cfg.grad_accum]
                    step_loss = 0.0
                    for j, idx in enumerate(group):
                        sync = contextlib.nullcontext() if j == len(group) - 1 else acc.no_sync(self.model)
                        with sync:
                            loss, value = self._micro_loss(idx)
                            if not math.isfinite(value):
                                self._diverged(value)
                            acc.backward(loss / len(group))
                        step_loss += value / len(group)
                        self.examples_seen += len(idx)
                        self.tokens_seen += self.train_enc.num_tokens(idx)
                        ex_log += len(idx)
                    if cfg.max_grad_norm:
                        acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    self.batch_pos += len(group)
                    self.train_seconds += time.perf_counter() - t0
                    run_loss, run_n = run_loss + step_loss, run_n + 1
                    lr = self.optimizer.param_groups[0]["lr"]
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        now = time.perf_counter()
                        rec = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                               "loss": run_loss / run_n, "lr": lr, "examples_per_s": ex_log / max(now - t_log, 1e-9)}
                        self._log(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", ex_s=f"{rec['examples_per_s']:.1f}")
                        run_loss, run_n, t_log, ex_log = 0.0, 0, now, 0
                    end_of_epoch = self.batch_pos >= len(batches)
                    due = (cfg.eval_every and self.step % cfg.eval_every == 0) or (
                        cfg.eval_every is None and end_of_epoch) or (
                        cfg.eval_every != 0 and self.step == self.total_steps and self.dev_examples)
                    if due and self.dev_examples:
                        t_eval = time.perf_counter()
                        if self._after_eval(self.evaluate()):
                            stop_reason = "stopped_early"
                        self.model.train()
                        t_log += time.perf_counter() - t_eval  # throughput counts training time only
                    if end_of_epoch:
                        self.epoch, self.batch_pos = self.epoch + 1, 0
                    if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == self.total_steps):
                        t_save = time.perf_counter()
                        self.save_checkpoint()
                        t_log += time.perf_counter() - t_save
                    if stop_reason != "completed" or end_of_epoch:
                        break  # a new epoch needs its own batch order (outer loop)
        finally:
            bar.close(stop_reason.replace("_", " "))
            if self._tb is not None:
                self._tb.close()
                self._tb = None
            if self.aux is not None:
                self.aux.close()
        if cfg.keep_best and self._best_params is not None and self.best_step != self.step:
            dist.reshard(self.raw_model)
            with torch.no_grad():
                for n, p in self.raw_model.named_parameters():
                    if n in self._best_params:
                        dist.local(p).copy_(self._best_params[n])
        self.model.eval()
        return {"steps": self.step, "epochs": round(self.step / self.steps_per_epoch, 4),
                "stopped": stop_reason, "resumed_from": str(resumed_from) if resumed_from else None,
                "train_seconds": self.train_seconds,
                "examples_per_s": self.examples_seen / max(self.train_seconds, 1e-9),
                "tokens_per_s": self.tokens_seen / max(self.train_seconds, 1e-9),
                "best_metric": self.best_metric, "best_step": self.best_step,
                "metric": self.best_key, "precision": self.precision}
