"""In-context learning: zero-, one- and few-shot prompting without training (seed 000, 001, 004: GPT-3's settings).

``classify`` answers the most likely label of each text under a template and a verbalizer, after an
optional task description and k demonstrations; the shared part is encoded once (``scoring.Scorer``).
``sample_demonstrations`` draws the k demonstrations from a training split with a seed, balanced over
the labels as an option. ``run`` is what ``unipeft icl`` runs: a model and a task (resolved as
``unipeft train`` resolves them), the metric on the dev split as one dict; generation tasks fill the
template with the source and generate.
"""
from __future__ import annotations

import random
import time

import torch

from ..errors import UnipeftError
from .scoring import Scorer, context_size, lm_kind
from .templates import Template
from .verbalizers import Verbalizer


def as_template(template, description: str | None = None) -> Template:
    if isinstance(template, Template):
        return template if description is None else Template(template.pattern, description, template.separator)
    if not isinstance(template, str):
        raise UnipeftError(f"template must be a string or up.prompting.Template, got {type(template).__name__}")
    return Template(template, description or "")


def as_verbalizer(verbalizer) -> Verbalizer:
    if isinstance(verbalizer, Verbalizer):
        return verbalizer
    if isinstance(verbalizer, str):
        return Verbalizer.parse(verbalizer)
    return Verbalizer(verbalizer)


def classify(model, tokenizer, texts, *, template, verbalizer, demonstrations=(), calibrate: bool = False,
             scores: bool = False, text_pairs=None, description: str | None = None, batch_size: int = 8,
             max_text_tokens: int | None = None):
    """One label (the verbalizer's key) per text; with ``scores=True`` also the (n, labels) tensor of label
    log-probabilities (calibrated ones with ``calibrate``), columns in the verbalizer's label order.

    ``demonstrations``: (text, label) or (text, text_pair, label) tuples. Works with any delta attached.
    """
    if isinstance(texts, str):
        texts = [texts]
    template, verbalizer = as_template(template, description), as_verbalizer(verbalizer)
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise UnipeftError(f"text_pairs has {len(text_pairs)} entries for {len(texts)} texts")
    scorer = Scorer(model, tokenizer, template, verbalizer, demonstrations, batch_size=batch_size,
                    max_text_tokens=max_text_tokens)
    was = model.training
    model.eval()
    try:
        s = scorer.scores(list(zip(texts, text_pairs or [None] * len(texts))), calibrate=calibrate)
    finally:
        model.train(was)
    labels = [verbalizer.labels[i] for i in s.argmax(-1).tolist()]
    return (labels, s) if scores else labels


def sample_demonstrations(examples: list[dict], k: int, seed: int = 0, balanced: bool = False) -> list[dict]:
    """k training examples drawn with ``seed``; ``balanced``: round-robin over the targets (labels)."""
    if not isinstance(k, int) or k < 0:
        raise UnipeftError(f"shots must be an integer >= 0, got {k!r}")
    if k > len(examples):
        raise UnipeftError(f"{k} shots asked for but the training set has only {len(examples)} examples")
    rng = random.Random(seed)
    if not balanced:
        return rng.sample(examples, k)
    groups: dict = {}
    for ex in examples:
        groups.setdefault(ex["target"], []).append(ex)
    pools = [rng.sample(g, len(g)) for _, g in sorted(groups.items())]
    rng.shuffle(pools)  # which label comes first is drawn too (recency bias, Zhao et al. 2021)
    picked, i = [], 0
    while len(picked) < k:
        picked += [p[i] for p in pools if i < len(p)][: k - len(picked)]
        i += 1
    rng.shuffle(picked)
    return picked


def load_lm(model: str, dtype=None):
    """(language model, tokenizer) for a model name as ``unipeft train`` takes it: a masked-LM head for
    encoders (BERT, RoBERTa), a causal-LM head for decoders."""
    import transformers as tf

    from .. import progress
    from ..training.defaults import model_family
    from ..training.run import _first_line, model_path

    path = model_path(model)
    try:
        config = tf.AutoConfig.from_pretrained(path)
        family = model_family(config)
        if family == "encoder-decoder":
            raise UnipeftError(f"{model} is an encoder-decoder model: prompting needs a causal or masked LM")
        cls = tf.AutoModelForMaskedLM if family == "encoder" else tf.AutoModelForCausalLM
        tokenizer = tf.AutoTokenizer.from_pretrained(path)
        with progress.phase(f"loading {model}"):
            lm = cls.from_pretrained(path, dtype=dtype or torch.float32)
    except (OSError, ValueError) as e:
        if isinstance(e, UnipeftError):
            raise
        raise UnipeftError(f"cannot load {model} as a language model: {_first_line(e)}") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.to(default_device()).eval(), tokenizer


def default_device() -> torch.device:
    """The GPU when there is one (prompting and PET run their own loops, not the trainer's accelerator)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _label_names(task) -> list[str]:
    return [str(x) for x in task.labels]


def evaluate_classification(model, tokenizer, task, examples, template: Template, verbalizer: Verbalizer,
                            demonstrations, *, calibrate=False, batch_size=8, max_text_tokens=None) -> dict:
    """The task's metrics of in-context classification on ``examples`` (dicts with text, target)."""
    from ..training.metrics import compute

    names = _label_names(task)
    verbalizer = verbalizer.order(names)
    demos = [(d["text"], d.get("text_pair"), names[d["target"]]) for d in demonstrations]
    labels = classify(model, tokenizer, [e["text"] for e in examples], template=template, verbalizer=verbalizer,
                      demonstrations=demos, calibrate=calibrate, batch_size=batch_size,
                      text_pairs=[e["text_pair"] for e in examples] if task.pair else None,
                      max_text_tokens=max_text_tokens)
    return compute(task, [names.index(x) for x in labels], [e["target"] for e in examples])


@torch.no_grad()
def generate(model, tokenizer, sources: list[str], template: Template, demonstrations=(), *,
             max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
    """Greedy continuations of the filled template (first line only: demonstrations follow on new lines)."""
    if lm_kind(model) != "causal":
        raise UnipeftError("generation tasks need a causal LM (GPT-2, Llama, SmolLM2, ...)")
    prefix = template.prefix([(d["text"], d.get("text_pair"), d["target"]) for d in demonstrations])
    prompts = [prefix + template.prompt(s) for s in sources]
    context = context_size(model)
    if context is not None:
        longest = max(len(tokenizer(p)["input_ids"]) for p in prompts) + max_new_tokens
        if longest > context:
            raise UnipeftError(f"prompt of {longest} tokens (with {max_new_tokens} new ones) is longer than the "
                               f"model's context ({context}): use fewer shots or fewer new tokens")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    dev = next(model.parameters()).device
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(dev)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [t.strip().split("\n")[0].strip() for t in texts]
    finally:
        tokenizer.padding_side = side
    return out


def run(model: str = "smollm2", task: str | None = "sst2", *, shots: int = 0, template: str | Template,
        verbalizer=None, description: str = "", seed: int = 0, balanced: bool = False, calibrate: bool = False,
        data: dict | None = None, split: str = "dev", limit: int | None = None, batch_size: int = 8,
        max_text_tokens: int | None = None, max_new_tokens: int = 64, lm=None) -> dict:
    """In-context learning on a task's ``split``: the metric (and timing) as one dict.

    ``lm``: an already loaded (model, tokenizer) pair (tests, benchmarks); else ``model`` is loaded.
    Every input is checked (template, verbalizer, shots, prompt length) before anything is scored.
    """
    from ..training import data as data_mod
    from ..training.metrics import compute, group_references

    dataset = data_mod.load_task(task, seed=seed, **(data or {}))
    t = dataset.task
    if split not in dataset.splits:
        raise UnipeftError(f"split {split!r} is not in this task's data; available: {list(dataset.splits)}")
    tmpl = as_template(template, description)
    if tmpl.pair and not t.pair:
        raise UnipeftError(f"template {tmpl.pattern!r} has {{text_pair}} but task {t.name!r} has single texts")
    if t.kind == "classification":
        if verbalizer is None:
            raise UnipeftError(f"task {t.name!r} is a classification task: give a verbalizer "
                               f"(labels {_label_names(t)})")
        verb = as_verbalizer(verbalizer).order(_label_names(t))
    elif t.generative:
        verb = None
    else:
        raise UnipeftError(f"in-context learning covers classification and generation tasks, not {t.kind!r}")
    demos = sample_demonstrations(dataset.splits["train"], shots, seed, balanced and t.kind == "classification")
    examples = dataset.splits[split][:limit] if limit else dataset.splits[split]
    model_obj, tokenizer = lm if lm is not None else load_lm(model)
    t0 = time.perf_counter()
    if verb is not None:
        metrics = evaluate_classification(model_obj, tokenizer, t, examples, tmpl, verb, demos, calibrate=calibrate,
                                          batch_size=batch_size, max_text_tokens=max_text_tokens)
    else:
        sources, refs = group_references(examples)
        preds = generate(model_obj, tokenizer, sources, tmpl, demos, max_new_tokens=max_new_tokens,
                         batch_size=batch_size)
        metrics = compute(t, preds, refs)
    return {"model": model, "task": t.name, "split": split, "shots": shots, "seed": seed, "balanced": balanced,
            "calibrate": calibrate, "examples": len(examples), "seconds": time.perf_counter() - t0, **metrics}
