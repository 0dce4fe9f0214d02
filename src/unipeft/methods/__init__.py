"""One file per method: its config (validated), its modules, the positions it uses.

Importing this package registers every method under its ``kind`` so saved
deltas can be rebuilt by name.
"""
from .adalora import AdaLoRA
from .adapter import Adapter
from .adapter_bias import AdapterBias
from .adapter_drop import AdapterDrop
from .bitfit import BitFit
from .compacter import Compacter
from .dylora import DyLoRA
from .freeze import Freeze
from .full import FullFineTune
from .ia3 import IA3
from .intrinsic import Intrinsic
from .lora import LoRA
from .new_tokens import NewTokens
from .p_tuning import PTuning
from .pasta import PASTA
from .adapter_fusion import AdapterFusion
from .adamix import AdaMix
from .compose import Compose
from .mam import MAM
from .unipelt import UniPELT
from .prefix_tuning import PrefixTuning
from .prompt_tuning import PromptTuning
from .sparse_ft import SparseFT
from .diff_pruning import DiffPruning
from .qlora import QLoRA

__all__ = ["AdaMix", "QLoRA", "AdapterFusion", "Compose", "MAM", "UniPELT", "NewTokens", "PASTA", "DiffPruning", "PTuning", "SparseFT", "AdapterDrop", "Intrinsic", "AdaLoRA", "Adapter", "AdapterBias", "BitFit", "Compacter", "DyLoRA", "Freeze", "FullFineTune", "IA3", "LoRA", "PrefixTuning", "PromptTuning"]
