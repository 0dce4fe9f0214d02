"""Several tasks in one run: mixed batches, one shared delta or one delta per task trained together.

    from unipeft.training import multitask
    multitask.train(model="minilm", tasks=["sst2", "cola", "rte"], data={"data_dir": "glue"},
                    method="lora", deltas="per_task", sampling="temperature", temperature=2, out="out/glue3")

or ``unipeft train --task sst2,cola,rte --data-dir glue --deltas per-task`` (a YAML ``task:`` list of
``{task:, train:, dev:, ...}`` mappings gives each task its own files).

Mixing (seed 001: multi-task fine-tuning; T5's mixing rates). Every batch draws its examples from all
tasks. ``proportional``: the union of the training sets shuffled, each example once per epoch
(rate n_t / sum n). ``temperature``: each slot of a batch picks task t with rate n_t^(1/T) / sum_s
n_s^(1/T) (T=1 is proportional, large T near equal), then the task's next example from its own
shuffled cycle. An epoch is sum n_t / batch_size batches either way; the order is a pure function of
(seed, epoch), so ``--resume`` sees the same batches. The drawn examples are cut into batches of
similar length (``group_by_length``, on by default, as for one task): rows of any task share a
batch, but a short sentence is not padded to a long pair of another task.

Deltas. ``shared``: one delta for every task. ``per_task``: one delta per task, all attached and
trained in the same batches through ``up.route`` (row i runs with its task's delta), so one forward
pass over the base serves every task and each row's loss reaches its own task's delta only.

Heads. Classification tasks may have different label sets: the base gets one head with sum_t K_t
outputs and task t reads its own slice [offset_t, offset_t + K_t) (cross-entropy over the slice,
argmax inside it); a regression task (STS-B) has a slice of one output and a squared-error loss. Each delta owns its copy of the head (``engine.HeadDelta``, a linear delta
that routes like LoRA), so in ``per_task`` mode task t's head rows are trained by task t's rows
only. Generation tasks (causal_lm and chat, or seq2seq) need no head.

Saving. Each task's delta is saved on its own as an ordinary run directory ``out/<task>/`` (run.json,
delta/, results.json): its head is cut to its own K_t rows, so ``unipeft eval out/<task>`` and
``unipeft predict`` load it onto a base with K_t labels like any single-task run. ``load`` puts all
of them back on one base (heads placed at their slices) for routed serving: ``classify`` answers a
batch mixing tasks in one forward pass. ``out/multitask.json`` records the layout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from .. import fileio
from ..errors import UnipeftError, choices
from . import distributed as dist
from .batching import IGNORE, Encoded, encode, length_grouped
from .evaluation import causal_lm_loss
from .tasks import Task
from .trainer import Trainer

SAMPLING = ("proportional", "temperature")
MODES = ("per_task", "shared")
LAYOUT = "multitask.json"


@dataclasses.dataclass
class Member:
    """One task of the run: its delta name, where its data comes from, its Task and its head slice."""

    name: str
    task_arg: str | None
    data: dict
    task: Task
    splits: dict
    source: str
    offset: int = 0

    @property
    def outputs(self) -> int:
        return self.task.num_labels if self.task.kind in SEQUENCE_KINDS else 0


SEQUENCE_KINDS = ("classification", "regression")  # one sequence-classification head, each task its slice


def _group(task: Task) -> str:
    """Tasks that can share one base model: the same kind of head."""
    return "causal" if task.causal else "sequence" if task.kind in SEQUENCE_KINDS else task.kind


def parse_tasks(tasks, data: dict | None = None) -> list[dict]:
    """``"a,b,c"``, ``["a", "b"]`` or ``[{"task": "a", "train": ...}, ...]`` -> [{"task", "name", "data"}]."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not isinstance(tasks, (list, tuple)) or len(tasks) < 2:
        raise UnipeftError(f"multi-task training needs at least two tasks (a,b or a YAML list), got {tasks!r}")
    out = []
    for i, t in enumerate(tasks):
        spec = {"task": t} if isinstance(t, str) else dict(t) if isinstance(t, dict) else None
        if spec is None or not spec.get("task") and not spec.get("train"):
            raise UnipeftError(f"task {i}: give a task name or a mapping with task:/train: (got {t!r})")
        name = str(spec.pop("name", None) or spec.get("task") or f"task{i}")
        name = name.replace(".", "_").replace(":", "_").replace("/", "_")
        task = spec.pop("task", None)
        out.append({"task": task, "name": name, "data": {**(data or {}), **spec}})
    names = [s["name"] for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UnipeftError(f"task names repeat: {dup}; give each a distinct name: in the YAML list")
    return out


def load_members(specs: list[dict], seed: int = 0) -> list[Member]:
    from . import data as data_mod

    members, offset = [], 0
    for s in specs:
        ds = data_mod.load_task(s["task"], seed=seed, **s["data"])
        task = dataclasses.replace(ds.task, name=s["name"]) if ds.task.name != s["name"] else ds.task
        m = Member(s["name"], s["task"], s["data"], task, ds.splits, ds.source, offset)
        offset += m.outputs
        members.append(m)
    groups = sorted({_group(m.task) for m in members})
    if len(groups) > 1:
        kinds = ", ".join(f"{m.name}: {m.task.kind}" for m in members)
        raise UnipeftError(f"multi-task training mixes tasks of one model head: classification and regression, "
                           f"or causal_lm/chat, or seq2seq; got {kinds}")
    return members


def base_task(members: list[Member]) -> Task:
    """The Task the base model is loaded for: classification with every task's labels side by side."""
    first = members[0].task
    if first.kind not in SEQUENCE_KINDS:
        return first
    labels = tuple(f"{m.name}:{label}" for m in members for label in (m.task.labels or ("score",)))
    return Task("multitask", "classification", labels=labels)


def mixing_rates(sizes: list[int], sampling: str, temperature: float) -> list[float]:
    """Each task's share of the batch slots: n_t / sum n, or n_t^(1/T) normalised (T5, Raffel et al. 2020)."""
    if sampling not in SAMPLING:
        raise UnipeftError(f"unknown sampling {sampling!r}; valid: {choices(SAMPLING)}")
    if sampling == "temperature" and not temperature > 0:
        raise UnipeftError(f"temperature must be > 0, got {temperature!r}")
    power = 1.0 if sampling == "proportional" else 1.0 / temperature
    w = [n ** power for n in sizes]
    return [x / sum(w) for x in w]


def mixed_batches(sizes: list[int], batch_size: int, seed: int, epoch: int, sampling: str = "proportional",
                  temperature: float = 2.0, lengths=None) -> list[list[int]]:
    """The batches of one epoch as indices into the concatenated tasks (task t's examples follow task t-1's).

    With ``lengths`` (the trainer's ``group_by_length``, on by default) the drawn examples are cut into
    batches of similar length, as single-task batches are: mixed in order, a batch would otherwise pad
    every task's short texts to the longest task's (MRPC's pairs beside SST-2's sentences cost 2.2x)."""
    total = sum(sizes)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    cut = (lambda order: [order[i:i + batch_size] for i in range(0, total, batch_size)]) if lengths is None \
        else (lambda order: length_grouped(order, lengths, batch_size, g))
    if sampling == "proportional":
        return cut(torch.randperm(total, generator=g).tolist())
    rates = torch.tensor(mixing_rates(sizes, sampling, temperature), dtype=torch.float64)
    slots = torch.multinomial(rates, total, replacement=True, generator=g).tolist()
    starts = [sum(sizes[:t]) for t in range(len(sizes))]
    cycles = [torch.randperm(n, generator=g).tolist() for n in sizes]
    used = [0] * len(sizes)
    order = []
    for t in slots:  # the task's next example; a new shuffle of it once all were seen
        if used[t] == sizes[t]:
            cycles[t], used[t] = torch.randperm(sizes[t], generator=g).tolist(), 0
        order.append(starts[t] + cycles[t][used[t]])
        used[t] += 1
    return cut(order)


def concat(encs: list[Encoded]) -> Encoded:
    """One Encoded holding several, in order."""
    def cat_offsets(offs):
        out, shift = [offs[0][:1]], 0
        for o in offs:
            out.append(o[1:] + shift)
            shift += int(o[-1])
        return torch.cat(out)

    types = [e.types for e in encs]
    if any(t is None for t in types) and not all(t is None for t in types):
        raise UnipeftError("multi-task: the tasks' encodings differ in token type ids")
    return Encoded(torch.cat([e.ids for e in encs]), cat_offsets([e.offsets for e in encs]),
                   torch.cat([e.labels for e in encs]) if encs[0].labels is not None else None,
                   cat_offsets([e.label_offsets for e in encs]) if encs[0].label_offsets is not None else None,
                   torch.cat(types) if types[0] is not None else None)


def train_together(model, names: list[str]) -> None:
    """Make deltas ``names`` trainable together: one delta is simply active; several (one per task) are
    all switched off, their parameters trainable, and each batch routes its rows (``up.route``). They
    cannot all be active at once: every one owns a copy of the task head, and heads replace each other."""
    import unipeft as up
    from ..engine import registry

    if len(names) == 1:
        up.activate(model, names)
        return
    up.activate(model, [])
    for n in names:
        for p in registry(model).deltas[n].parameters():
            p.requires_grad_(True)


class SliceHead(torch.nn.Module):
    """The model with its logits cut to one task's slice, for the usual evaluation and prediction."""

    def __init__(self, model, offset: int, outputs: int):
        super().__init__()
        self.model, self.offset, self.outputs = model, offset, outputs

    def forward(self, **kw):
        out = self.model(**kw)
        out.logits = out.logits[..., self.offset:self.offset + self.outputs]
        return out


class MultiTaskTrainer(Trainer):
    """The trainer on mixed batches: per-task encodings, the mixing rule, routed rows, per-task slices."""

    def __init__(self, model, tokenizer, members: list[Member], config, out_dir=None, *, per_task: bool = True,
                 sampling: str = "proportional", temperature: float = 2.0, cache: bool = True, accelerator=None):
        from .evaluation import cap_examples

        self.members, self.per_task = members, per_task
        self.sampling, self.temperature = sampling, temperature
        mixing_rates([1], sampling, temperature)  # validates
        if config.aux_lm_weight > 0 or config.packing:
            raise UnipeftError("multi-task training does not combine with aux_lm_weight or packing")
        self.sizes = [len(m.splits["train"]) for m in members]
        self.row_task = torch.repeat_interleave(torch.arange(len(members)), torch.tensor(self.sizes))
        train = [e for m in members for e in m.splits["train"]]
        super().__init__(model, tokenizer, base_task(members), train, None, config, out_dir, cache=cache,
                         accelerator=accelerator)
        self.devs = {m.name: cap_examples(m.task, m.splits.get("dev") or [], config.eval_max_examples)
                     for m in members}
        self.dev_examples = [e for d in self.devs.values() for e in d]  # the loop evaluates when there are some
        self.task = dataclasses.replace(self.task, main_metric="loss") if self.task.kind != "classification" \
            else self.task
        self.best_key = self.task.main_metric

    # -- data ---------------------------------------------------------------------------

    def encode_train(self, train, cache) -> Encoded:
        encs = []
        regression = any(m.task.kind == "regression" for m in self.members)
        for m in self.members:
            enc = encode(m.task, m.splits["train"], self.tokenizer, self.config.max_length, cache_dir=cache)
            if m.task.kind == "classification":  # label ids of the base head: the task's slice
                enc = dataclasses.replace(enc, labels=enc.labels + m.offset)
            if regression and m.task.kind in SEQUENCE_KINDS:  # one label tensor: class ids are exact in float32
                enc = dataclasses.replace(enc, labels=enc.labels.to(torch.float32))
            encs.append(enc)
        return concat(encs)

    def mixing(self) -> dict:
        """What fixes the mixed batches beside the trainer's settings: a resumed run must share it."""
        return {"tasks": [m.name for m in self.members], "sizes": self.sizes, "sampling": self.sampling,
                "temperature": self.temperature if self.sampling == "temperature" else None,
                "per_task": self.per_task}

    def _info(self) -> dict:
        return {**super()._info(), "mixing": self.mixing()}

    def resume(self):
        """The trainer's resume, after checking (before anything is loaded) that the checkpoint mixed the same
        tasks, of the same sizes, by the same rule, with the same deltas."""
        from . import checkpoint as ckpt

        path = self._latest_checkpoint()
        if path is not None:
            saved = json.loads((path / ckpt.STATE_JSON).read_text()).get("mixing")
            diff = [f"{k}: checkpoint {saved[k]!r}, now {v!r}" for k, v in self.mixing().items()
                    if saved is not None and saved.get(k) != v]
            if diff:
                raise UnipeftError(f"cannot resume from {path}: the task mix differs ({'; '.join(diff)})")
        return super().resume()

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return mixed_batches(self.sizes, self.config.batch_size, self.config.seed, epoch, self.sampling,
                             self.temperature, self.lengths if self.config.group_by_length else None)

    # -- forward --------------------------------------------------------------------------

    def route_names(self, idx: list[int]) -> list[str]:
        return [self.members[int(self.row_task[i])].name for i in idx]

    def _silent_rows(self, idx: list[int]) -> list[int]:
        """Under FSDP2 with a delta per task: one row (the first) of every task with no row in ``idx``.

        FSDP2 reduce-scatters the gradients of the parameters that have one, and every process must
        send the same set; a process whose shard holds no row of task t would leave t's delta without
        a gradient while another process has one (a collective mismatch: gloo aborts, NCCL can hang).
        Such a row runs through its task's delta but adds nothing to the loss (``_forward``), so the
        delta's gradient in that process is an exact zero, and the reduced gradient is what the rows
        that do hold t make it. (DDP instead is told that parameters may go unused: see ``train``.)"""
        if not (self.fsdp and self.per_task):
            return []
        present = {int(self.row_task[i]) for i in idx}
        starts = [sum(self.sizes[:t]) for t in range(len(self.members))]
        return [starts[t] for t in range(len(self.members)) if t not in present]

    def _forward(self, idx: list[int]):
        from ..routing import route
        from .evaluation import autocast

        dev = self.accelerator.device
        silent = self._silent_rows(idx)
        examples = [self.train_enc.example(i) for i in idx + silent]
        if self.task.kind != "classification":  # the silent rows' targets ignored: no loss terms
            for ex in examples[len(idx):]:
                ex["labels"] = torch.full_like(ex["labels"], IGNORE)
        rows = idx + silent
        batch = {k: v.to(dev) for k, v in self.collate(examples).items()}
        routed = route(self.raw_model, self.route_names(rows)) if self.per_task else contextlib.nullcontext()
        with routed, autocast(self.precision, dev):
            if self.task.kind != "classification":
                if self.out_layer is not None:  # causal tasks: logits before the target tokens only
                    return causal_lm_loss(self.model, batch, self.out_layer), None
                return self.model(**batch).loss, None
            labels = batch.pop("labels")
            logits = self.model(**batch).logits.float()
            members = [self.members[int(self.row_task[i])] for i in rows]
            weight = torch.tensor([1.0] * len(idx) + [0.0] * len(silent), device=dev)  # silent rows: no loss
            lo = torch.tensor([m.offset for m in members], device=dev)
            reg = torch.tensor([m.task.kind == "regression" for m in members], device=dev)
            loss = logits.new_zeros(())
            if (~reg).any():  # cross-entropy over each row's own slice: the other tasks' outputs masked out
                hi = lo + torch.tensor([m.outputs for m in members], device=dev)
                cols = torch.arange(logits.shape[-1], device=dev)
                outside = (cols[None] < lo[:, None]) | (cols[None] >= hi[:, None])
                ce = torch.nn.functional.cross_entropy(logits.masked_fill(outside, float("-inf"))[~reg],
                                                       labels[~reg].long(), reduction="none")
                loss = loss + (ce * weight[~reg]).sum()
            if reg.any():  # squared error on the row's one output
                pred = logits[reg].gather(1, lo[reg][:, None])[:, 0]
                se = torch.nn.functional.mse_loss(pred, labels[reg].float(), reduction="none")
                loss = loss + (se * weight[reg]).sum()
            return loss / len(idx), None

    # -- evaluation -----------------------------------------------------------------------

    @contextlib.contextmanager
    def only(self, member: Member):
        """The model as task ``member`` alone sees it: its delta active, its head slice."""
        from ..engine import active, registry, set_active

        before = active(self.raw_model)
        params = [p for n in ([m.name for m in self.members] if self.per_task else before)
                  for p in registry(self.raw_model).deltas[n].parameters()]
        flags = [p.requires_grad for p in params]
        if self.per_task:
            set_active(self.raw_model, [member.name])
        try:
            yield SliceHead(self.raw_model, member.offset, member.outputs) if member.outputs else self.raw_model
        finally:
            set_active(self.raw_model, before)
            for p, f in zip(params, flags):  # switching deltas on and off sets requires_grad: back to training
                p.requires_grad_(f)

    def evaluate(self, generation: bool | None = None, label: str | None = None) -> dict[str, float]:
        """Each task's dev metrics as ``<task>/<metric>``, and their mean main metric (or loss) for model selection."""
        from .evaluation import evaluate

        cfg = self.config
        out: dict[str, float] = {}
        for m in self.members:
            if not self.devs[m.name]:
                continue
            with self.only(m) as model:
                res = evaluate(model, m.task, self.devs[m.name], self.tokenizer, max_length=cfg.max_length,
                               batch_size=cfg.eval_batch_size, precision=self.precision,
                               generation=cfg.eval_generate if generation is None else generation,
                               max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams,
                               label=label or f"evaluating {m.name} (step {self.step})")
            out.update({f"{m.name}/{k}": v for k, v in res.items()})
        # model selection (keep_best, early stopping) on the mean of the tasks' main metrics (accuracy, MCC, ...),
        # kept under the base task's main metric's name; generation tasks: the mean dev loss
        mains = [f"{m.name}/{m.task.main_metric if m.outputs else 'loss'}" for m in self.members]
        scores = [out[k] for k in mains if k in out]
        if scores:
            out[self.task.main_metric] = sum(scores) / len(scores)
        dist.reshard(self.raw_model)  # FSDP2: the sharded parameters back in place (as Trainer.evaluate does)
        return out


# ---------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------

def train(model: str = "minilm", tasks=("sst2", "cola"), method: str = "lora", *, data: dict | None = None,
          out: str | os.PathLike | None = None, method_options: dict | None = None, deltas: str = "per_task",
          sampling: str = "proportional", temperature: float = 2.0, evaluate_test: bool | None = False,
          accelerator=None, chat_template: str | None = None, resume: bool = False, **settings) -> dict:
    """Train ``method`` on several tasks at once; returns the results (per task) and writes the run under ``out``.

    ``resume``: continue from the newest checkpoint under ``out`` (the same tasks, mix and settings).

    ``chat_template``: a Jinja chat template (or its file) for the chat tasks among them (default: the tokenizer's).
    """
    import unipeft as up
    from .defaults import resolve
    from .run import _task_dict, family_of, load_model, train_config
    from .trainer import set_seed

    deltas = deltas.replace("-", "_")
    if deltas not in MODES:
        raise UnipeftError(f"unknown deltas mode {deltas!r}; valid: {choices(MODES)}")
    mixing_rates([1], sampling, temperature)
    specs = parse_tasks(tasks, data)
    members = load_members(specs, seed=settings.get("seed") or 0)
    method_cfg, defaults = resolve(method, method_options)
    cfg = train_config(defaults.train_for(family_of(model)), settings)
    set_seed(cfg.seed)
    base, tokenizer = load_model(model, base_task(members))
    if any(m.task.kind == "chat" for m in members):
        from . import chat

        for m in members:
            if m.task.kind == "chat":
                m.task = dataclasses.replace(m.task, chat_template=chat.read_template(chat_template) or m.task.chat_template)
                chat.check_template(tokenizer, m.task, model)
    elif chat_template is not None:
        raise UnipeftError("a chat template applies to chat tasks (--kind chat), and none of these tasks is one")
    names = [m.name for m in members] if deltas == "per_task" else ["shared"]
    for n in names:
        torch.manual_seed(cfg.seed)  # every task's delta starts from the same initialisation
        up.attach(base, method_cfg, name=n, tokenizer=tokenizer)
    train_together(base, names)
    trainable, total = up.trainable_parameters(base)
    out_dir = Path(out) if out is not None else None
    if accelerator is None and deltas == "per_task":
        # a process's shard of a mixed batch may hold no row of some task: that task's delta then takes no part
        # in its backward, and DDP must be told so (else it waits for those gradients)
        from accelerate.utils import DistributedDataParallelKwargs

        accelerator = dist.make_accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    acc = accelerator or dist.make_accelerator()
    trainer = MultiTaskTrainer(base, tokenizer, members, cfg, out_dir, per_task=deltas == "per_task",
                               sampling=sampling, temperature=temperature, accelerator=acc)
    t0 = time.perf_counter()
    summary = trainer.fit(resume=resume)
    for n in names:
        up.finalize(base, n)
    results: dict[str, Any] = {
        "model": model, "tasks": [m.name for m in members], "method": method, "deltas": deltas,
        "sampling": sampling, "temperature": temperature if sampling == "temperature" else None,
        "method_config": method_cfg.to_dict(), "train_config": cfg.to_dict(), "lr": cfg.lr,
        "trainable_params": trainable, "total_params": total, **summary,
        "mixing_rates": dict(zip([m.name for m in members], mixing_rates(trainer.sizes, sampling, temperature))),
        "train_sizes": dict(zip([m.name for m in members], trainer.sizes)),
    }
    metrics = trainer.evaluate(generation=trainer.task.generative, label="scoring dev")
    results["dev"] = {m.name: {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(m.name + "/")}
                      for m in members}
    if evaluate_test:
        results["test"] = {}
        for m in members:
            if m.splits.get("test"):
                from .evaluation import evaluate

                with trainer.only(m) as net:
                    results["test"][m.name] = evaluate(net, m.task, m.splits["test"], tokenizer,
                                                       max_length=cfg.max_length, batch_size=cfg.eval_batch_size,
                                                       precision=trainer.precision, generation=True,
                                                       max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams)
    results["wall_seconds"] = time.perf_counter() - t0
    if out_dir is not None and (trainer.main or trainer.fsdp):  # under FSDP every process gathers, rank 0 writes
        for m in members:
            save_member(base, m, "shared" if deltas == "shared" else m.name, model, tokenizer, out_dir / m.name,
                        {"model": model, "task": _task_dict(m.task), "task_name": m.task_arg, "data": m.data,
                         "method": method, "method_config": method_cfg.to_dict(), "delta_name": m.name,
                         "train": cfg.to_dict(), "source": m.source, "multitask": str(out_dir)},
                        {"task": m.name, "dev": results["dev"][m.name], "trainable_params": trainable},
                        write=trainer.main)
    if out_dir is not None and trainer.main:
        layout = {"model": model, "method": method, "deltas": deltas, "head_outputs": sum(m.outputs for m in members),
                  "tasks": [{"name": m.name, "task_name": m.task_arg, "data": m.data, "task": _task_dict(m.task),
                             "offset": m.offset, "outputs": m.outputs, "delta": m.name if deltas == "per_task"
                             else "shared"} for m in members]}
        fileio.write_json(out_dir / LAYOUT, layout, indent=2, default=str)
        fileio.write_json(out_dir / "results.json", results, indent=2, default=str)
    acc.wait_for_everyone()
    results["_model"], results["_tokenizer"], results["_trainer"], results["_main"] = base, tokenizer, trainer, trainer.main
    return results


def save_member(model, member: Member, delta: str, model_name: str, tokenizer, run_dir: Path, run_info: dict,
                results: dict, write: bool = True) -> None:
    """Task ``member``'s delta as an ordinary run directory (``run.load_run`` reads it): a classification
    task's head cut to its own K_t rows, on a base loaded with K_t labels; a generation task's delta as is.
    Under FSDP2 every process calls it (the full tensors are gathered collectively); ``write``: this one
    writes the files (the main process)."""
    import unipeft as up
    from ..engine import registry
    from ..storage import attach_with_tensors, delta_tensors
    from .run import load_model

    d = registry(model).deltas[delta]
    if member.outputs:
        heads = tuple(f"linear:{p}." for p in d.head)
        rows = slice(member.offset, member.offset + member.outputs)
        tensors = {k: (v[rows] if k.startswith(heads) else v) for k, v in delta_tensors(model, d).items()}
        if not write:
            return  # the gathers above needed this process
        run_dir.mkdir(parents=True, exist_ok=True)
        own, _ = load_model(model_name, member.task)
        attach_with_tensors(own, d.config, member.name, tensors, tokenizer=tokenizer)
        up.save(own, run_dir / "delta", name=member.name)
    else:
        up.save(model, run_dir / "delta", name=delta)  # under FSDP2 every process gathers, rank 0 writes
        if not write:
            return
        run_info = {**run_info, "delta_name": delta}
    fileio.write_json(run_dir / "run.json", run_info, indent=2, default=str)
    fileio.write_json(run_dir / "results.json", results, indent=2, default=str)


# ---------------------------------------------------------------------------
# routed serving of a multi-task run
# ---------------------------------------------------------------------------

def load(run_dir):
    """(model, tokenizer, layout): every task's saved delta on one base, heads back at their slices."""
    import unipeft as up
    from ..storage import TENSORS_NAME, _read_tensors, attach_with_tensors, read_meta
    from ..config import MethodConfig
    from ..engine import head_modules
    from .run import load_model

    run_dir = Path(run_dir)
    path = run_dir / LAYOUT
    if not path.is_file():
        raise UnipeftError(f"{run_dir} is not a multi-task run (no {LAYOUT})")
    layout = json.loads(path.read_text())
    members = [Member(t["name"], t["task_name"], t["data"], Task(**t["task"]), {}, "", t["offset"])
               for t in layout["tasks"]]
    model, tokenizer = load_model(layout["model"], base_task(members))
    heads = tuple(f"linear:{h}." for h in head_modules(model))
    for m in members:
        d = run_dir / m.name / "delta"
        meta = read_meta(d)
        tensors = _read_tensors(d / TENSORS_NAME)
        config = MethodConfig.from_dict(meta["method"]["kind"], meta["method"]["options"])
        if m.outputs:  # the task's head rows back at its slice of the wide head (the other rows unused)
            width = layout["head_outputs"]
            for k in [k for k in tensors if k.startswith(heads)]:
                full = torch.zeros((width, *tensors[k].shape[1:]), dtype=tensors[k].dtype)
                full[m.offset:m.offset + m.outputs] = tensors[k]
                tensors[k] = full
        attach_with_tensors(model, config, m.name, tensors, activate=False, tokenizer=tokenizer)
    up.activate(model, [])
    model.eval()
    return model, tokenizer, {**layout, "members": members}


@torch.no_grad()
def classify(model, tokenizer, layout: dict, texts: list[str], tasks: list[str], pairs=None,
             max_length: int = 128) -> list:
    """Label names (numbers for regression tasks) for a batch that mixes tasks: row i with task ``tasks[i]``'s
    delta and head slice, in one pass."""
    import unipeft as up
    from .batching import Collator
    from .evaluation import pad_id

    by = {m.name: m for m in layout["members"]}
    bad = [t for t in tasks if t not in by]
    if bad:
        raise UnipeftError(f"unknown task {bad[0]!r}; tasks of this run: {choices(by)}")
    if len(tasks) != len(texts):
        raise UnipeftError(f"{len(texts)} texts but {len(tasks)} task names")
    items = []
    for i, (t, x) in enumerate(zip(tasks, texts)):
        task = by[t].task
        ex = {"text": x, "target": 0, **({"text_pair": pairs[i]} if task.pair else {})}
        items.append(encode(task, [ex], tokenizer, max_length, prompts_only=True, cache_dir=None, quiet=True).example(0))
    batch = Collator(pad_id(tokenizer))(items)
    dev = next(model.parameters()).device
    with up.route(model, list(tasks)):
        logits = model(**{k: v.to(dev) for k, v in batch.items()}).logits.float()
    out = []
    for row, t in zip(logits, tasks):
        m = by[t]
        if m.task.kind == "regression":
            out.append(float(row[m.offset]))
        else:
            out.append(m.task.labels[int(row[m.offset:m.offset + m.outputs].argmax())])
    return out
