"""The embedded default of ``unipeft serve`` with no arguments: SmolLM2 and MiniLM, example deltas.

So that a newcomer sees the server work in one command, the first start writes a few example
deltas of several methods into the deltas directory (``~/.cache/unipeft/serve/deltas`` unless
``--deltas`` says otherwise): for SmolLM2-135M-Instruct (completions and chat) a LoRA, an (IA)3
and a prompt-tuning delta; for MiniLM (classification, two labels) a LoRA, a Pfeiffer adapter
and a BitFit delta.

They are **untrained**: each starts from its method's initial values and is moved by a small,
seeded random step (an untouched delta would be refused as "changes nothing"), so they are
deterministic and show routing, caching and the API, not skill. Replace them with deltas you
trained (``unipeft train``, ``up.save``), or upload yours with ``POST /v1/deltas``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import storage
from ..engine import detach, registry
from ..errors import UnipeftError

DEFAULT_DIR = Path(os.environ.get("UNIPEFT_CACHE", Path.home() / ".cache" / "unipeft")) / "serve" / "deltas"


def _examples(base: str):
    from .. import methods as m

    if base == "smollm2":
        return {"demo-lora": m.LoRA(r=4, alpha=8), "demo-ia3": m.IA3(),
                "demo-prompt": m.PromptTuning(length=4, init="random")}
    return {"demo-sentiment-lora": m.LoRA(r=4, alpha=8), "demo-sentiment-pfeiffer": m.Adapter(style="pfeiffer",
                                                                                              bottleneck=16),
            "demo-sentiment-bitfit": m.BitFit()}


def nudge(model, name: str, seed: int, scale: float) -> None:
    """Move delta ``name`` away from its initial values by a seeded random step of size ``scale``
    (its own parameters, and the base parameters it trains in place)."""
    delta = registry(model).deltas[name]
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in delta.parameters() + [params[n] for n in delta.selected]:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def write_examples(model, base: str, directory: Path, tokenizer=None) -> list[str]:
    """Write the example deltas for ``base`` that ``directory`` does not hold yet."""
    from ..engine import attach

    written = []
    for i, (name, config) in enumerate(_examples(base).items()):
        if (directory / name / storage.JSON_NAME).is_file():
            continue
        torch.manual_seed(1000 + i)   # the method's own random initialisation, reproducible
        attach(model, config, name=name, tokenizer=tokenizer)
        try:
            nudge(model, name, seed=2000 + i, scale=0.02 if base == "smollm2" else 0.05)
            storage.save(model, directory / name, name=name)
        finally:
            detach(model, name)
        written.append(name)
    return written


def engines(deltas_dir: Path, **engine_kw) -> list:
    """The two embedded bases as engines, with the example deltas written on first use."""
    from .engine import Engine
    from .. import zoo

    out = []
    deltas_dir.mkdir(parents=True, exist_ok=True)
    for base in ("smollm2", "minilm"):
        torch.manual_seed(0)   # MiniLM's classification head is new: the same random head at every start
        try:
            model, tok = zoo.smollm2() if base == "smollm2" else zoo.minilm(num_labels=2)
        except UnipeftError as e:
            raise UnipeftError(f"the embedded default serves SmolLM2 and MiniLM from PyPI packages: {e} "
                               f"(or serve your own base: unipeft serve --model DIR --deltas DIR)") from None
        if base == "minilm":
            # the head is new (random) in the base; the example deltas each train their own copy
            model.config.id2label, model.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0,
                                                                                         "positive": 1}
        write_examples(model, base, deltas_dir, tokenizer=tok)
        out.append(Engine((model, tok), None, name=base, **engine_kw))
    return out
