"""BitFit (Ben Zaken et al. 2021; seed 000 "Selective PEFT: BitFit").

Fine-tune only bias terms (and the task head). The notes' pseudocode:

    params = (p for n, p in model.named_parameters() if "bias" in n)
    optimizer = Optimizer(params)

The chosen biases are the base model's own parameters, trained in place; the
delta stores their trained values, and detach puts the originals back.
"""
from __future__ import annotations

from typing import ClassVar

from ..config import MethodConfig, method, normalize_targets
from ..errors import UnipeftError


@method
class BitFit(MethodConfig):
    """targets: None for every bias term of the base model, or targets (groups,
    roles, suffixes, regexes) whose linear maps' biases are trained."""

    targets: tuple | None = None
    train_head: bool | list = True

    kind: ClassVar[str] = "bitfit"
    method_type: ClassVar[str] = "selective"
    mergeable: ClassVar[bool] = True  # the trained biases are the weights: nothing left to fold

    def validate(self):
        self.targets = normalize_targets("BitFit", self.targets)

    def install(self, view, name):
        base = view.base_parameters()
        if self.targets is None:
            chosen = [n for n in base if n.rsplit(".", 1)[-1] == "bias"]
        else:
            mods = view.resolve_targets(self.targets, "BitFit")
            chosen = [f"{m}.bias" for m in mods if f"{m}.bias" in base]
        if not chosen:
            raise UnipeftError(
                f"BitFit: {view.map.model_type!r} has no bias terms"
                + ("" if self.targets is None else f" in targets {list(self.targets)}")
                + " (Llama-style models have none); choose a method such as LoRA or IA3"
            )
        view.select(chosen)
