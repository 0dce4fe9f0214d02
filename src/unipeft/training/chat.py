"""The ``chat`` task kind: instruction fine-tuning on OpenAI-style conversations.

Data is JSONL, one conversation a line::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

Each conversation is rendered with the tokenizer's own chat template
(``tokenizer.apply_chat_template``), or with the Jinja template given as ``--template``
(a string or a file). The loss covers the assistant turns only, every one of them.

Where the assistant turns are. The template is rendered prefix by prefix, never searched for
role strings: for assistant turn k, ``render(m[:k], add_generation_prompt=True)`` ends where the
turn's text starts, and ``render(m[:k+1])`` ends where it (with the template's end-of-turn
marker) stops. Each of those texts must be a prefix of the next (templates that rewrite earlier
turns are refused with a clear error). The pieces between boundaries are tokenised one by one,
so a span's first and last tokens are exactly its own, and a generation prompt (the same pieces
up to the last ``add_generation_prompt``) is token for token what training saw.

An example inside unipeft is ``{"text": JSON of the messages before the last assistant turn,
"target": the last assistant turn's content}``: the conversation is ``text + target``, the
evaluation generates from ``text`` and scores against ``target`` (BLEU, ROUGE-L, and the loss),
and the tokenisation cache keys on both.

Packing (``pack``, ``--packing``): short examples are concatenated into rows of up to
``max_length`` tokens, with position ids restarting at 0 for each example and no attention
mask; transformers then builds a block-diagonal causal mask from the position ids
(``masking_utils.find_packed_sequence_indices``, which it does only when no KV cache is built:
packing turns ``use_cache`` off for training), so attention does not cross examples. A test checks
that every packed example's logits equal its own forward pass's (GPT-2, Llama), and before training
``check_packing`` runs one packed row against its examples alone and refuses a model whose mask
ignores the position ids. A pack's boundary adds no loss term across examples: the first token of
every example is template or prompt text, label -100. Methods that add positions (prompt, prefix
tuning) cannot pack: their virtual tokens would sit in one example only.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UnipeftError, choices

ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------------------
# conversations
# ---------------------------------------------------------------------------

def check_messages(messages, where: str) -> list[dict]:
    """The conversation as a list of {"role", "content"} dicts; a one-line error naming ``where`` otherwise."""
    if not isinstance(messages, list) or not messages:
        raise UnipeftError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UnipeftError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UnipeftError(f"{where}: message {i} has unknown role {m['role']!r}; valid roles: {choices(ROLES)}")
        if not isinstance(m["content"], str):
            raise UnipeftError(f"{where}: message {i} content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise UnipeftError(f"{where}: the conversation has no assistant turn (nothing to learn from)")
    if out[-1]["role"] != "assistant":
        raise UnipeftError(f"{where}: the conversation ends with a {out[-1]['role']} turn; "
                           "the last turn must be the assistant's")
    return out


def to_example(messages: list[dict]) -> dict:
    """unipeft's example form: the messages before the last assistant turn (as JSON) and its content."""
    return {"text": json.dumps(messages[:-1], ensure_ascii=False), "target": messages[-1]["content"]}


def messages_of(example: dict, with_target: bool = True) -> list[dict]:
    msgs = json.loads(example["text"])
    if with_target and "target" in example:
        msgs = msgs + [{"role": "assistant", "content": example["target"]}]
    return msgs


def prompt_text(line: str) -> str:
    """A ``predict`` input as an example's text: a JSON list of messages (or {"messages": [...]}) is taken as is,
    anything else is one user message."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and "messages" in obj:
        obj = obj["messages"]
    if isinstance(obj, list):
        check_messages(obj + [{"role": "assistant", "content": ""}], "input")
        return json.dumps(obj, ensure_ascii=False)
    return json.dumps([{"role": "user", "content": line}], ensure_ascii=False)


def read_file(path) -> list[dict]:
    """Examples from a JSONL file of {"messages": [...]} lines; every problem a one-line error with its line."""
    from .data import _read_table

    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise UnipeftError(f"{path}: chat data must be JSONL with a 'messages' list per line")
    _, rows = _read_table(path)
    if not rows:
        raise UnipeftError(f"{path}: empty file (no conversations)")
    out = []
    for n, row in rows:
        if "messages" not in row:
            raise UnipeftError(f"{path}:{n}: no 'messages' key (chat lines look like "
                               "{\"messages\": [{\"role\": \"user\", \"content\": ...}, ...]})")
        out.append(to_example(check_messages(row["messages"], f"{path}:{n}")))
    return out


def load_files(name: str, files: dict, seed: int):
    """A chat Dataset from train=/dev=/test= JSONL files (dev held out from train when missing)."""
    from .data import FILES_DEV_FRACTION, Dataset, _grouped_split
    from .tasks import Task

    if not files.get("train"):
        raise UnipeftError("no train split given: pass train= (--train) a JSONL file of conversations")
    splits = {s: read_file(p) for s, p in files.items() if p}
    note = ""
    if "dev" not in splits:
        splits["train"], splits["dev"] = _grouped_split(splits["train"], FILES_DEV_FRACTION, seed)
        if not splits["dev"] or not splits["train"]:
            raise UnipeftError(f"{files['train']}: too few conversations to hold out a dev split; pass dev= (--dev)")
        note = f", dev = {FILES_DEV_FRACTION:.0%} of train"
    splits = {s: splits[s] for s in ("train", "dev", "test") if s in splits}
    desc = ", ".join(f"{s}={p}" for s, p in files.items() if p)
    return Dataset(Task(name, "chat"), splits, f"chat files {desc}{note}")


def from_pairs(dataset):
    """A generation dataset (source -> target, e.g. E2E) as single-turn chats: the source is the user's turn."""
    import dataclasses

    def conv(e):
        return {**e, "text": json.dumps([{"role": "user", "content": e["text"]}], ensure_ascii=False)}

    task = dataclasses.replace(dataset.task, kind="chat")
    return type(dataset)(task, {s: [conv(e) for e in v] for s, v in dataset.splits.items()},
                         dataset.source + ", as chats")


# ---------------------------------------------------------------------------
# the template
# ---------------------------------------------------------------------------

def read_template(template: str | None) -> str | None:
    """``--template``: a Jinja chat template, or the path of a file holding one."""
    if template is None:
        return None
    if "{" not in template and Path(template).is_file():
        return Path(template).read_text(encoding="utf-8")
    if "{%" not in template and "{{" not in template:
        raise UnipeftError(f"--template {template[:60]!r} is neither a Jinja chat template nor a file")
    return template


def check_template(tokenizer, task, model: str = "the model") -> None:
    """A one-line error before training when neither the task nor the tokenizer has a chat template."""
    if task.chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise UnipeftError(f"{model} has no chat template (its tokenizer's chat_template is empty): pass --template "
                           "a Jinja chat template (or a file holding one), or use a chat model such as smollm2")


def render(tokenizer, messages: list[dict], template: str | None, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 -- Jinja errors, missing templates: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnipeftError(f"chat template failed: {first}") from None


def end_of_turn_ids(tokenizer, template: str | None) -> list[int]:
    """The special token that closes an assistant turn in the chat template, when there is one (Llama 3's
    ``<|eot_id|>``, Gemma's ``<end_of_turn>``, SmolLM2's ``<|im_end|>``): generation stops there too, not only
    at the tokenizer's end-of-text, which such templates never produce inside a reply."""
    marker = "unipeft-reply-end"
    text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], template)
    tail = text[text.rfind(marker) + len(marker):].lstrip() if marker in text else ""
    ids = _ids(tokenizer, tail) if tail else []
    special = set(tokenizer.all_special_ids) | {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None)
                                                               or {}).items() if getattr(t, "special", False)}
    return ids[:1] if ids and ids[0] in special else []


def segments(tokenizer, messages: list[dict], template: str | None, generation_prompt: bool = False):
    """[(text piece, is assistant)] that concatenate to the rendered conversation; assistant pieces are
    the assistant turns (with the template's end-of-turn text). With ``generation_prompt`` the last
    piece is the prompt the assistant's reply follows."""
    pieces, done = [], ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:k], template, True)
        through = render(tokenizer, messages[:k + 1], template)
        for prefix, text, what in ((done, before, "the conversation before it"), (before, through, "its turn")):
            if not text.startswith(prefix):
                raise UnipeftError(f"the chat template renders assistant turn {k} so that {what} does not extend "
                                   "the text before (it rewrites earlier turns); such templates cannot mask the "
                                   "loss turn by turn: pass --template with one that renders turns in order")
        pieces += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    end = render(tokenizer, messages, template, generation_prompt)
    if not end.startswith(done):
        raise UnipeftError("the chat template's rendering of the whole conversation does not extend its "
                           "rendering turn by turn; pass --template with one that renders turns in order")
    pieces.append((end[len(done):], False))
    return [(t, a) for t, a in pieces if t]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokens_and_labels(tokenizer, messages: list[dict], template: str | None) -> tuple[list[int], list[int]]:
    """(ids, labels): labels are the ids on assistant turns and -100 elsewhere."""
    from .batching import IGNORE

    ids, labels = [], []
    for text, assistant in segments(tokenizer, messages, template):
        t = _ids(tokenizer, text)
        ids += t
        labels += t if assistant else [IGNORE] * len(t)
    return ids, labels


def prompt_ids(tokenizer, messages: list[dict], template: str | None) -> list[int]:
    """The ids a reply is generated from: the conversation and the template's generation prompt."""
    return [i for text, _ in segments(tokenizer, messages, template, True) for i in _ids(tokenizer, text)]


def encode(task, examples: list[dict], tokenizer, max_length: int, prompts_only: bool):
    """``batching.encode`` for chat tasks: token ids and assistant-only labels (or the generation prompts)."""
    from .batching import Encoded, IGNORE, _flat

    template = task.chat_template
    if prompts_only:  # the end of a long prompt is kept: it is next to the reply
        return Encoded(*_flat([prompt_ids(tokenizer, messages_of(e, False), template)[-max_length:]
                               for e in examples]))
    seqs, labs = [], []
    for e in examples:
        ids, labels = tokens_and_labels(tokenizer, messages_of(e), template)
        seqs.append(ids[:max_length])
        labs.append(labels[:max_length])
    if all(all(x == IGNORE for x in lab[1:]) for lab in labs):
        raise UnipeftError(f"chat task {task.name!r}: every assistant turn lies beyond max_length={max_length} "
                           "tokens; raise --max-length")
    flat, off = _flat(seqs)
    lab, loff = _flat(labs, torch.int64)
    return Encoded(flat, off, lab, loff)


# ---------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------

def pack(enc, max_length: int):
    """Examples concatenated greedily (in order) into rows of at most ``max_length`` tokens, each row's
    position ids restarting at 0 at every example (see the module docstring). Token-level labels only."""
    from .batching import Encoded, _flat

    if enc.label_offsets is None:
        raise UnipeftError("packing applies to causal_lm and chat tasks (token-level labels)")
    rows, cur = [], []
    for i, n in enumerate(enc.lengths()):
        if cur and sum(enc.lengths()[j] for j in cur) + n > max_length:
            rows.append(cur)
            cur = []
        cur.append(i)
    if cur:
        rows.append(cur)
    ids, labels, positions = [], [], []
    for row in rows:
        exs = [enc.example(i) for i in row]
        ids.append(torch.cat([e["input_ids"] for e in exs]).tolist())
        labels.append(torch.cat([e["labels"] for e in exs]).tolist())
        positions.append([p for e in exs for p in range(len(e["input_ids"]))])
    flat, off = _flat(ids)
    lab, loff = _flat(labels, torch.int64)
    return Encoded(flat, off, lab, loff, positions=_flat(positions)[0])


def check_packing(model, packed=None) -> None:
    """Refuse what packing cannot do, before training: methods that add virtual tokens or keys (they would
    belong to one packed example only), and models whose attention crosses packed examples (one packed
    row is run against its examples alone; models that build their mask without the position ids fail).
    Sets ``use_cache`` off: transformers reads packed position ids only when no cache is being built."""
    from ..engine import registry

    reg = registry(model)
    for name, delta in (reg.deltas.items() if reg is not None else ()):
        if delta.attention or delta.inputs:
            raise UnipeftError(f"packing: delta {name!r} ({delta.config.kind}) adds virtual tokens or keys, which "
                               "would belong to one packed example only; train it without --packing")
    model.config.use_cache = False
    if packed is None:
        return
    row = next((r for r in range(len(packed)) if int((packed.example(r)["position_ids"] == 0).sum()) > 1), None)
    if row is None:
        return
    ex = packed.example(row)
    ids, pos = ex["input_ids"][None], ex["position_ids"]
    starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            together = model(input_ids=ids.to(dev), position_ids=pos[None].to(dev)).logits[0].float()
            a, b = starts[1], starts[2]  # the second example: the first one's tokens must not reach it
            alone = model(input_ids=ids[:, a:b].to(dev)).logits[0].float()
    finally:
        model.train(was)
    if not torch.allclose(together[a:b], alone, atol=1e-4, rtol=1e-3):
        raise UnipeftError(f"packing: {type(model).__name__} lets attention cross packed examples (its mask does not "
                           "follow the position ids); train it without --packing")


def with_template(dataset, template: str | None):
    """The dataset with ``--template`` as its task's chat template (chat tasks only)."""
    import dataclasses

    if dataset.task.kind != "chat":
        if template is not None:
            raise UnipeftError(f"a chat template applies to chat tasks (--kind chat), not {dataset.task.kind!r}")
        return dataset
    template = read_template(template)
    if template is None:
        return dataset
    return type(dataset)(dataclasses.replace(dataset.task, chat_template=template), dataset.splits, dataset.source)
