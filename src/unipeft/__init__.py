"""unipeft: parameter-efficient fine-tuning where every method is a function at a position.

The public API::

    import unipeft as up
    model = up.attach(model, up.LoRA(r=8, alpha=16, targets=["query", "value"]), name="sst2")
    up.trainable_parameters(model); print(up.summary(model))
    up.save(model, "out/sst2", name="sst2"); up.load(base_model, "out/sst2")
    up.push(model, "user/sst2-lora", name="sst2"); up.load(base_model, "user/sst2-lora")  # Hugging Face Hub
    up.merge(model, "sst2"); up.unmerge(model, "sst2")
    up.attach(model, up.DyLoRA(r=8)); up.set_rank(model, "default", 4); up.load(base, dir, rank=4)  # nested ranks
    up.attach(model, up.Compose([up.LoRA(layers="0-1"), up.Adapter(layers="2-5")]))  # methods on layer groups
    up.activate(model, ["sst2"]); up.detach(model, "sst2")
    with up.route(model, ["sst2", "news", None]): model(**batch)        # row i on delta i (None: base)
    up.export_peft(model, "out/peft", name="sst2"); up.import_peft(base_model, "out/peft")  # peft's format
    up.train(model="minilm", task="bbc", method="lora", out="out/bbc")    # training recipe (unipeft.training)
    up.compare(methods=["full", "lora", "bitfit"])                        # train and measure several methods
    Trainer(..., callbacks=[up.integrations.SaveDeltaCallback()])         # transformers / TRL trainers
"""
__version__ = "0.1.0"

from .config import METHODS, MethodConfig  # noqa: E402
from .engine import active, attach, deltas, detach, summary, trainable_parameters, unmerge  # noqa: E402
from .merging import merge  # noqa: E402
from .engine import set_active as activate  # noqa: E402
from .errors import UnipeftError  # noqa: E402
from .methods import Adapter, BitFit, Freeze, FullFineTune, IA3, LoRA, PrefixTuning, PromptTuning  # noqa: E402
from .methods import AdaLoRA, DyLoRA  # noqa: E402
from .methods import AdapterBias, Compacter  # noqa: E402
from .methods.dylora import set_rank  # noqa: E402
from .methods.sparse_ft import SparseFT  # noqa: E402
from .methods.diff_pruning import DiffPruning  # noqa: E402
from .sparse import finalize  # noqa: E402
from .methods.intrinsic import Intrinsic  # noqa: E402
from .methods.new_tokens import NewTokens, extend_tokenizer  # noqa: E402
from .methods.adapter_drop import AdapterDrop, set_drop  # noqa: E402
from .methods.p_tuning import PTuning  # noqa: E402
from .methods.pasta import PASTA  # noqa: E402
from .methods.qlora import QLoRA  # noqa: E402
from .quantization import quantize  # noqa: E402
from .methods import MAM, Compose, UniPELT  # noqa: E402
from .methods import AdaMix, AdapterFusion  # noqa: E402
from .peft_format import export_peft, import_peft  # noqa: E402
from .routing import route  # noqa: E402
from .hub import push  # noqa: E402
from .storage import fingerprint, load, save  # noqa: E402

__all__ = [
    "attach", "detach", "activate", "active", "deltas", "merge", "unmerge", "route", "save", "load", "push", "summary",
    "trainable_parameters", "fingerprint", "UnipeftError", "MethodConfig", "METHODS",
    "LoRA", "Adapter", "PromptTuning", "PrefixTuning", "BitFit", "IA3", "Freeze", "FullFineTune",
    "DyLoRA", "AdaLoRA", "set_rank", "Compacter", "AdapterBias",
    "SparseFT", "DiffPruning", "finalize",
    "Intrinsic", "NewTokens", "extend_tokenizer",
    "AdapterDrop", "set_drop", "PTuning", "PASTA", "QLoRA", "quantize", "Compose", "MAM", "UniPELT", "AdapterFusion", "AdaMix",
    "export_peft", "import_peft", "train", "compare",
]

# The training side imports accelerate, sklearn, sacrebleu...: loaded on first use only.
_LAZY = {"train": ("unipeft.training.run", "train"), "compare": ("unipeft.comparison", "compare")}


def __getattr__(name):
    if name in ("integrations", "prompting"):  # subpackages: integrations imports the Trainer stack
        import importlib

        return importlib.import_module(f"unipeft.{name}")
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'unipeft' has no attribute {name!r}")
