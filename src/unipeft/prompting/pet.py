"""PET and iPET: pattern-exploiting training (Schick & Schütze 2021; seed 004 "iPet").

PET, with a small labelled set T and unlabelled texts D:

1. for each pattern-verbalizer pair p, train a delta (any PEFT method; LoRA by default) on T with
   the verbalizer's label scores (``head.VerbalizerModel``) and the auxiliary language-modelling loss on
   D's filled patterns, L = (1 - alpha) L_CE + alpha L_LM with alpha = 1e-4 (paper, eq. 3: alpha weights
   the LM loss; ``pet_loss``);
2. the ensemble soft-labels D: s(l|x) = sum_p w_p s_p(l|x) / sum_p w_p, with w_p the pattern's accuracy on
   T before training (or 1: ``weights="uniform"``), q(l|x) = softmax(s(l|x) / T), T = 2;
3. a final classifier (a new sequence-classification head with the same method) is distilled on q
   with the soft cross-entropy -sum_l q(l|x) log p(l|x).

iPET (``generations`` g > 0): generation j trains each pattern's delta again from the base, on T plus
(d^j - 1)|T| texts of D labelled by the previous generation's models other than its own (a random
subset of lambda (n - 1) of them), the most confident per label, balanced; the last generation's
ensemble makes the soft labels.

Resumable and without stale results: every unit (the ensemble weights, a pattern's delta in a generation,
the soft labels, the final classifier) is written to its own folder with the fingerprint of everything it depends on
(base model, data, settings, the units before it) and a ``done.json`` written LAST. A rerun reuses a
unit only when its ``done.json`` and its scores carry the expected fingerprint (so iPET run after PET in
the same folder starts from PET's generation 0); the soft labels, the final classifier and the results of
a run whose last generation is G live under ``gen{G}/`` (``soft_labels/``, ``final/``, ``results.json``), so
PET's stay beside iPET's in one folder, and ``results.json``/``pet.json`` at the top are the latest run's.
The ensemble reads exactly the units the current settings name, never whatever files lie in the folder (the
reference code merged stale logits files of a restarted run, pet issue 14). Multi-token verbalizer words are
scored whole with any tokenizer (pet issue 92's BPE assertion does not exist here).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import fileio, progress
from ..errors import UnipeftError
from .head import PromptHead
from ..model_parts import logits_at
from .scoring import lm_kind

DONE = "done.json"
SCORES = "scores.safetensors"


def pet_loss(task_loss: torch.Tensor, lm_loss: torch.Tensor | None, lm_weight: float) -> torch.Tensor:
    """L = (1 - alpha) L_CE + alpha L_LM (Schick & Schütze 2021, eq. 3): ``lm_weight`` = alpha weights the LM loss."""
    if lm_loss is None or lm_weight == 0:
        return task_loss
    return (1 - lm_weight) * task_loss + lm_weight * lm_loss


@dataclasses.dataclass
class PETConfig:
    """Settings of a PET / iPET run (defaults: the paper's where it gives them, small budgets otherwise)."""

    method: str = "lora"
    method_options: dict = dataclasses.field(default_factory=dict)
    lm_weight: float = 1e-4          # alpha of eq. 3: the weight of the auxiliary LM loss
    temperature: float = 2.0         # soft labels: softmax(s / T)
    weights: str = "accuracy"        # ensemble weights: "accuracy" on T before training, or "uniform"
    steps: int = 100                 # optimizer steps per pattern model
    final_steps: int = 100           # optimizer steps of the distilled classifier
    batch_size: int = 4              # labelled examples per step
    lm_batch_size: int = 4           # unlabelled examples per step for the LM loss
    lr: float | None = None          # None: the method's default learning rate
    max_length: int = 128
    generations: int = 0             # iPET generations after the first (0: PET)
    factor: float = 5.0              # iPET d: each generation's training set grows d times
    sample_fraction: float = 0.25    # iPET lambda: share of the other models that label a model's new set
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.lm_weight <= 0.5:
            raise UnipeftError(f"lm_weight (alpha) is the weight of the auxiliary LM loss, in [0, 0.5]; got "
                               f"{self.lm_weight} (the paper's alpha = 1e-4; the reference code's --alpha 0.9999 "
                               "weights the task loss instead, pet issue 30)")
        if self.temperature <= 0:
            raise UnipeftError(f"temperature must be > 0, got {self.temperature}")
        if self.weights not in ("accuracy", "uniform"):
            raise UnipeftError(f"weights {self.weights!r} is not one of 'accuracy' or 'uniform'")
        for f in ("steps", "final_steps", "batch_size", "lm_batch_size", "max_length"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise UnipeftError(f"{f} must be an integer >= 1, got {getattr(self, f)!r}")
        if not isinstance(self.generations, int) or self.generations < 0:
            raise UnipeftError(f"generations must be an integer >= 0, got {self.generations!r}")
        if self.factor <= 1 or not 0 < self.sample_fraction <= 1:
            raise UnipeftError("iPET needs factor d > 1 and sample_fraction lambda in (0, 1]")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _read_done(folder: Path, fp: str) -> dict | None:
    """The unit's record when it completed with fingerprint ``fp`` (anything else is stale or half-written)."""
    try:
        rec = json.loads((folder / DONE).read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("fingerprint") == fp else None


def _save_scores(folder: Path, fp: str, tensors: dict) -> None:
    from safetensors.torch import save_file

    fileio.atomic_write(folder / SCORES, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()},
                                                               str(tmp), metadata={"fingerprint": fp}))


def _load_scores(folder: Path, fp: str) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(str(folder / SCORES), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fp:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, RuntimeError):
        return None


# ---------------------------------------------------------------------------
# one training loop for the pattern models and the final classifier
# ---------------------------------------------------------------------------

def _lm_loss(lm, tokenizer, texts: list[str], max_length: int, gen: torch.Generator) -> torch.Tensor:
    """The auxiliary LM loss on unlabelled texts: next-token (causal LMs) or 15% masked tokens (masked LMs)."""
    dev = next(lm.parameters()).device
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    # the vocabulary logits only where a token is predicted (model_parts.logits_at): the real next tokens of a
    # causal LM (not the padding), the 15% masked positions of a masked LM
    if lm_kind(lm) == "causal":
        rows, pos = (mask[:, 1:] == 1).nonzero(as_tuple=True)
        target, inputs = ids[rows, pos + 1], ids
    else:
        special = torch.tensor([[t in tokenizer.all_special_ids for t in row] for row in ids.tolist()])
        pick = (torch.rand(ids.shape, generator=gen) < 0.15) & (mask == 1) & ~special
        rows, pos = pick.nonzero(as_tuple=True)
        target, inputs = ids[rows, pos], ids.masked_fill(pick, tokenizer.mask_token_id)
    if not len(rows):
        return torch.zeros((), device=dev)
    logits = logits_at(lm, rows.to(dev), pos.to(dev), input_ids=inputs.to(dev), attention_mask=mask.to(dev))
    return F.cross_entropy(logits.float(), target.to(dev))


def _encode(tokenizer, items, max_length: int):
    """Padded tensors of texts, or of (text, text_pair) tuples (the distilled classifier on pair tasks)."""
    if items and isinstance(items[0], tuple):
        a, b = zip(*items)
        return tokenizer(list(a), list(b), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return tokenizer(list(items), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def _fit(model, tokenizer, texts: list[str], targets: torch.Tensor, cfg: PETConfig, steps: int, lr: float,
         seed: int, lm=None, unlabelled: list[str] | None = None, label: str = "training") -> None:
    """AdamW with linear warm-up (6%) and decay; soft cross-entropy on ``targets`` (n, labels) probabilities,
    plus alpha x the LM loss of ``lm`` on ``unlabelled`` texts (pattern models)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    warm = max(1, int(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    dev = next(model.parameters()).device
    order: list[int] = []
    model.train()
    with progress.phase(label, steps, "steps") as bar:
        for _ in range(steps):
            if len(order) < cfg.batch_size:
                order += torch.randperm(len(texts), generator=gen).tolist()
            idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
            enc = _encode(tokenizer, [texts[i] for i in idx], cfg.max_length)
            logits = model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev)).logits
            task = -(targets[idx].to(dev) * logits.float().log_softmax(-1)).sum(-1).mean()
            aux = None
            if lm is not None and unlabelled and cfg.lm_weight > 0:
                aux = _lm_loss(lm, tokenizer, rng.sample(unlabelled, min(cfg.lm_batch_size, len(unlabelled))),
                               cfg.max_length, gen)
            loss = pet_loss(task, aux, cfg.lm_weight)
            if not math.isfinite(loss.item()):
                raise UnipeftError(f"{label}: the loss became {loss.item()}; try a lower learning rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update(1)
    model.eval()


@torch.no_grad()
def _scores(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 16) -> torch.Tensor:
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = _encode(tokenizer, texts[i:i + batch_size], max_length)
        out.append(model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev))
                   .logits.float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _one_hot(labels: list[int], n: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(labels, dtype=torch.long), n).float()


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------

def _examples_hash(examples: list[dict]) -> str:
    return _hash([[e["text"], e.get("text_pair"), e.get("target")] for e in examples])


def _ipet_examples(prev: list[torch.Tensor], weights: list[float], i: int, generation: int, labelled: list[dict],
                   unlabelled: list[dict], cfg: PETConfig, num_labels: int) -> list[dict]:
    """Model i's new training set in an iPET generation: T plus (d^g - 1)|T| texts of D labelled by a random
    subset of lambda (n - 1) of the other models of the previous generation (most confident, balanced)."""
    others = [j for j in range(len(prev)) if j != i]
    rng = random.Random(_hash([cfg.seed, generation, i]))
    chosen = rng.sample(others, max(1, round(cfg.sample_fraction * len(others))))
    w = torch.tensor([weights[j] for j in chosen])
    s = sum(wj * prev[j].log_softmax(-1) for wj, j in zip(w, chosen)) / w.sum()
    probs = s.softmax(-1)
    want = min(len(unlabelled), round((cfg.factor ** generation - 1) * len(labelled)))
    conf, label = probs.max(-1)
    picked: list[int] = []
    for y in range(num_labels):
        idx = [k for k in torch.argsort(-conf).tolist() if label[k] == y]
        picked += idx[:want // num_labels]
    return labelled + [dict(unlabelled[k], target=int(label[k])) for k in sorted(picked)]


def _prompt_texts(head: PromptHead, examples: list[dict], tokenizer, max_length: int) -> list[str]:
    return [e["text"] for e in head.prompts([dict(e, target=e.get("target", 0)) for e in examples], tokenizer,
                                             max_length)]


def _inputs(task, examples: list[dict]):
    return [(e["text"], e["text_pair"]) if task.pair else e["text"] for e in examples]


def run(model: str, task: str | None, patterns, config: PETConfig | None = None, *, out, data: dict | None = None,
        train_size: int = 10, unlabelled_size: int = 1000, dev_limit: int | None = None) -> dict:
    """PET (``config.generations == 0``) or iPET on ``task``: returns (and writes to ``out/gen{G}/results.json``
    and ``out/results.json``) the dev metrics of the distilled classifier, of the ensemble and of each pattern,
    the wall time of this call (``seconds``) and of each unit when it was trained (``unit_seconds``; a reused
    unit's time comes from its ``done.json``), and which units were trained and which reused. ``patterns``:
    (template, verbalizer) pairs or ``PromptHead``s. A rerun with the same ``out`` resumes (see the module
    docstring)."""
    import unipeft as up

    from ..training import data as data_mod
    from ..training.defaults import resolve
    from ..training.metrics import compute
    from ..training.run import family_of, load_model
    from .icl import default_device, load_lm, sample_demonstrations

    t0 = time.perf_counter()
    cfg = config or PETConfig()
    heads = [p if isinstance(p, PromptHead) else PromptHead.build(*p) for p in patterns]
    if not heads:
        raise UnipeftError("PET needs at least one pattern-verbalizer pair")
    if cfg.generations and len(heads) < 2:
        raise UnipeftError("iPET needs at least 2 pattern-verbalizer pairs (each model is labelled by the others)")
    dataset = data_mod.load_task(task, seed=cfg.seed, **(data or {}))
    t = dataset.task
    for h in heads:
        h.check(t)
    train = dataset.splits["train"]
    labelled = sample_demonstrations(train, train_size, cfg.seed, balanced=True)
    chosen = {id(e) for e in labelled}
    rest = [e for e in train if id(e) not in chosen]
    if not rest:
        raise UnipeftError(f"no unlabelled texts left: the training split has {len(train)} examples and "
                           f"train_size is {train_size}")
    unlabelled = [{k: v for k, v in e.items() if k != "target"}
                  for e in random.Random(cfg.seed + 1).sample(rest, min(unlabelled_size, len(rest)))]
    dev = dataset.splits["dev"][:dev_limit] if dev_limit else dataset.splits["dev"]
    method_cfg, defaults = resolve(cfg.method, cfg.method_options)
    lr = cfg.lr or defaults.train_for(family_of(model))["lr"]
    out = Path(out)
    base, tokenizer = load_lm(model)
    common = {"model": model, "base": up.fingerprint(base), "labelled": _examples_hash(labelled),
              "unlabelled": _examples_hash(unlabelled), "dev": _examples_hash(dev), "method": cfg.method,
              "method_config": method_cfg.to_dict(), "lr": lr, "config": dataclasses.asdict(cfg)}
    del common["config"]["final_steps"]  # only the final classifier depends on it
    # nor does a generation's unit depend on how many generations follow it: PET and then iPET with the same
    # out reuse PET's generation-0 deltas (the soft labels and the final classifier name their own units)
    del common["config"]["generations"]
    last_gen = out / f"gen{cfg.generations}"  # the soft labels, the final classifier and the results of this run
    fileio.write_json(out / "pet.json", {"model": model, "task": t.name, "patterns": [h.to_dict() for h in heads],
                                         "train_size": len(labelled), "unlabelled_size": len(unlabelled),
                                         "config": dataclasses.asdict(cfg)}, indent=2)
    refs = [e["target"] for e in dev]

    trained, reused, prev, fps = [], [], None, []
    unit_seconds = {}  # each unit's own wall time, recorded when it was trained (None: a unit saved before that)
    weights = [1.0] * len(heads)
    if cfg.weights == "accuracy":  # a unit of its own: |T| x patterns scorings, minutes at |T| = 1000 on a CPU
        # what the scores depend on, nothing more: a run with other training settings reuses them
        fp = _hash({"unit": "weights", "model": model, "base": common["base"], "labelled": common["labelled"],
                    "heads": [h.to_dict() for h in heads], "max_length": cfg.max_length})
        done = _read_done(out / "weights", fp)
        if done is None:
            done = _accuracy_weights(heads, model, base, tokenizer, labelled, cfg.max_length, fp)
            fileio.write_json(out / "weights" / DONE, done)
            trained.append("weights")
        else:
            reused.append("weights")
        weights = done["weights"]
        unit_seconds["weights"] = done.get("seconds")
    del base

    for g in range(cfg.generations + 1):
        current, gen_fps = [], []
        for i, head in enumerate(heads):
            examples = labelled if g == 0 else _ipet_examples(prev, weights, i, g, labelled, unlabelled, cfg,
                                                              t.num_labels)
            fp = _hash({**common, "unit": "pattern", "generation": g, "pattern": i, "head": head.to_dict(),
                        "train": _examples_hash(examples), "after": fps})
            folder = out / f"gen{g}" / f"p{i}"
            done = _read_done(folder, fp)
            got = _load_scores(folder, fp) if done else None
            if got is None:
                t_unit = time.perf_counter()
                got = _train_pattern(model, head, method_cfg, examples, unlabelled, dev, cfg, lr,
                                     seed=cfg.seed + 1000 * g + i, label=f"PET generation {g}, pattern {i}")
                up.save(got.pop("_model"), folder / "delta", name="pet")
                _save_scores(folder, fp, got)
                done = {"fingerprint": fp, "train_examples": len(examples),
                        "dev": compute(t, got["dev"].argmax(-1).tolist(), refs),
                        "seconds": time.perf_counter() - t_unit}
                fileio.write_json(folder / DONE, done)
                trained.append(f"gen{g}/p{i}")
            else:
                reused.append(f"gen{g}/p{i}")
            unit_seconds[f"gen{g}/p{i}"] = done.get("seconds")
            current.append(got)
            gen_fps.append(fp)
        prev, fps = [c["unlabelled"] for c in current], gen_fps
        last = current

    # soft labels from the last generation's ensemble
    w = torch.tensor(weights)
    def ensemble(key):  # noqa: E306 -- s(l|x) = sum_p w_p s_p(l|x) / sum_p w_p
        return sum(wp * c[key].log_softmax(-1) for wp, c in zip(w, last)) / w.sum()
    soft_fp = _hash({"units": fps, "weights": weights, "temperature": cfg.temperature})
    soft = (ensemble("unlabelled") / cfg.temperature).softmax(-1)
    _save_scores(last_gen / "soft_labels", soft_fp, {"probs": soft})
    fileio.write_json(last_gen / "soft_labels" / DONE, {"fingerprint": soft_fp, "weights": weights,
                                                   "temperature": cfg.temperature})

    # the distilled classifier: a new sequence-classification head + the method, on the soft labels
    final_fp = _hash({**common, "unit": "final", "soft": soft_fp, "final_steps": cfg.final_steps})
    final_unit = f"{last_gen.name}/final"
    rec = _read_done(last_gen / "final", final_fp)
    if rec is None:
        t_unit = time.perf_counter()
        torch.manual_seed(cfg.seed)
        clf, ctok = load_model(model, t)
        clf.to(default_device())
        up.attach(clf, method_cfg, name="pet", tokenizer=ctok)
        _fit(clf, ctok, _inputs(t, unlabelled), soft, cfg, cfg.final_steps, lr, cfg.seed, label="PET final classifier")
        preds = _scores(clf, ctok, _inputs(t, dev), cfg.max_length).argmax(-1).tolist()
        up.save(clf, last_gen / "final" / "delta", name="pet")
        rec = {"fingerprint": final_fp, "dev": compute(t, preds, refs), "seconds": time.perf_counter() - t_unit}
        fileio.write_json(last_gen / "final" / DONE, rec)
        trained.append(final_unit)
    else:
        reused.append(final_unit)
    unit_seconds[final_unit] = rec.get("seconds")
    results = {"model": model, "task": t.name, "method": cfg.method, "patterns": len(heads),
               "generations": cfg.generations, "train_size": len(labelled), "unlabelled_size": len(unlabelled),
               "dev": rec["dev"], "ensemble_dev": compute(t, ensemble("dev").argmax(-1).tolist(), refs),
               "pattern_dev": [compute(t, c["dev"].argmax(-1).tolist(), refs) for c in last],
               "weights": weights, "trained": trained, "reused": reused, "seconds": time.perf_counter() - t0,
               "unit_seconds": unit_seconds}
    fileio.write_json(last_gen / "results.json", results, indent=2)
    fileio.write_json(out / "results.json", results, indent=2)
    return results


def _accuracy_weights(heads, model, base, tokenizer, labelled, max_length: int, fingerprint: str) -> dict:
    """Each pattern's accuracy on T before training (zero-shot), the ensemble weights of the paper, as the
    weights unit's done record (with its wall time)."""
    t_unit = time.perf_counter()
    refs = torch.tensor([e["target"] for e in labelled])
    weights = []
    for h in heads:
        h.load(model, lm=(base, tokenizer))
        scores = _scores(h.wrap(base, tokenizer), tokenizer, _prompt_texts(h, labelled, tokenizer, max_length),
                         max_length)
        weights.append(max(1e-3, float((scores.argmax(-1) == refs).float().mean())))
    return {"fingerprint": fingerprint, "weights": weights, "seconds": time.perf_counter() - t_unit}


def _train_pattern(model: str, head: PromptHead, method_cfg, examples, unlabelled, dev, cfg: PETConfig, lr: float,
                   seed: int, label: str) -> dict:
    """Train one pattern's delta from the base; its label scores on D and on dev (and the model, for saving)."""
    import unipeft as up

    base, tokenizer = head.load(model)
    torch.manual_seed(seed)
    up.attach(base, method_cfg, name="pet", tokenizer=tokenizer)
    net = head.wrap(base, tokenizer)
    texts = _prompt_texts(head, examples, tokenizer, cfg.max_length)
    targets = _one_hot([e["target"] for e in examples], len(head.verbalizer.labels))
    _fit(net, tokenizer, texts, targets, cfg, cfg.steps, lr, seed, lm=base,
         unlabelled=_prompt_texts(head, unlabelled, tokenizer, cfg.max_length), label=label)
    return {"unlabelled": _scores(net, tokenizer, _prompt_texts(head, unlabelled, tokenizer, cfg.max_length),
                                  cfg.max_length),
            "dev": _scores(net, tokenizer, _prompt_texts(head, dev, tokenizer, cfg.max_length), cfg.max_length),
            "_model": base}
