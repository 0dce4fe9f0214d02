"""Shared set-up for the serving tests (no tests here): tiny bases saved as folders, example
deltas of mixed methods moved away from their initial values, and a live uvicorn server on a
free loopback port that stops by itself."""
from __future__ import annotations

import torch

import tiny
import unipeft as up
from unipeft.serving.cli import Background as Live, free_port  # noqa: F401  (the loopback server the tests drive)

# methods that route per example, with small settings for the tiny models
METHODS = {
    "lora": lambda: up.LoRA(r=2, alpha=4),
    "ia3": lambda: up.IA3(),
    "prompt": lambda: up.PromptTuning(length=2, init="random"),
    "prefix": lambda: up.PrefixTuning(length=2, reparam_hidden=0),
    "pfeiffer": lambda: up.Adapter(style="pfeiffer", bottleneck=4),
    "bitfit": lambda: up.BitFit(),
}
PROMPTS = ["the movie was", "name = Alpha food = italian", "it is very", "good"]
TEXTS = ["the film was good", "a boring plot", ["the acting", "was awful"], "very nice story"]


def base(tmp_path_factory, family: str) -> str:
    """A tiny model folder (gpt2: causal LM; bert: 2-label classifier), dropout off."""
    d = tmp_path_factory.mktemp(f"base-{family}")
    return tiny.save(d / "model", family, head="lm" if family == "gpt2" else "cls", num_labels=2, dropout=False)


def load_model(path: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = any(a.endswith("ForSequenceClassification") for a in AutoConfig.from_pretrained(path).architectures)
    return (AutoModelForSequenceClassification if cls else AutoModelForCausalLM).from_pretrained(path).eval()


def write_deltas(base_path: str, directory, names_methods: dict[str, str], seed: int = 0, scale: float = 0.5):
    """Save one delta per (name, method) for the base at ``base_path``, each moved by a seeded step."""
    model = load_model(base_path)
    for i, (name, method) in enumerate(names_methods.items()):
        torch.manual_seed(seed + i)
        up.attach(model, METHODS[method](), name=name)
        reg = up.engine.registry(model)
        delta = reg.deltas[name]
        g = torch.Generator().manual_seed(seed + 1000 + i)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for p in delta.parameters() + [params[n] for n in delta.selected]:
                p.add_(torch.randn(p.shape, generator=g) * scale)
        up.save(model, f"{directory}/{name}", name=name)
        up.detach(model, name)
    return directory

