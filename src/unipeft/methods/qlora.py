"""QLoRA (Dettmers et al. 2023; seeds 000 and 001): LoRA trained on a base whose frozen linear maps
are stored quantized (4-bit NF4 with double quantisation, 8-bit, or the project's packed 2-bit),
gradients flowing through the dequantised weights:

    h = dequant(W_q) x + (alpha / r) * B A x

``up.QLoRA(bits=4, **lora_options)`` is ``up.quantize(model, bits, targets)`` followed by
``up.LoRA(**lora_options)``, in one attach. Quantization belongs to the base, not to the delta:

* the delta is a LoRA delta; ``up.save`` writes it as one (kind "lora"), so it loads onto the
  float base or onto a quantized one alike (the base check compares quantized and float bases by
  everything but their linear weights' values, ``storage.fingerprint(loose=True)``);
* ``up.detach`` removes the LoRA factors only: **the base stays quantized** (the float weights
  are gone, which is what saves the memory); start from the float model to get them back;
* ``up.merge`` gives dequantised merged maps (W_deq + sBA in floats, with a warning); unmerge
  returns to the quantized ones.

Targets already quantized at ``bits`` (a model loaded with transformers' ``BitsAndBytesConfig``)
are used as they are; at another width they are refused.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import check_number, method
from ..errors import UnipeftError
from ..quantization import check_bits, restore, swap
from .lora import LoRA


@method
class QLoRA(LoRA):
    """LoRA on a quantized base. bits: 4 (NF4 + double quantisation, bitsandbytes), 8 (LLM.int8(),
    bitsandbytes) or 2 (packed, pure torch); group_size: inputs per scale and zero point at 2 bits;
    int8_threshold: LLM.int8()'s outlier threshold at 8 bits (0: none). Every LoRA option applies
    (r, alpha, dropout, targets, init, ...); the targets are both what is quantized and where LoRA goes.

    The quantization belongs to the base: ``up.detach`` removes the LoRA factors and leaves the base
    quantized (its float weights are gone); ``up.save`` writes a plain LoRA delta, which loads onto the
    float base or a quantized one; ``up.merge`` gives dequantised float maps (with a warning).
    """

    bits: int = 4
    group_size: int = 64
    int8_threshold: float = 0.0

    kind: ClassVar[str] = "qlora"

    def validate(self):
        super().validate()
        check_bits("QLoRA", self.bits)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 4 \
                or self.group_size % 4:
            raise UnipeftError(f"QLoRA: group_size must be a multiple of 4 (>= 4), got {self.group_size!r}")
        check_number("QLoRA", "int8_threshold", self.int8_threshold, lo=0)

    def prepare_base(self, model, mmap=None):
        """Quantize ``model`` as this config's attach does (targets already at ``bits`` are kept, ``layers=``
        respected), so a saved QLoRA delta (a LoRA file) evaluates on the base it trained on
        (``training.load_run``)."""
        if mmap is None:
            from ..architectures import map_model
            from ..layers import chosen_blocks, filtered_map

            mmap = map_model(model)
            if self.layers is not None:
                mmap = filtered_map(mmap, chosen_blocks("QLoRA", self.layers, mmap))
        return swap(model, self.bits, self.targets or self.default_targets, owner="QLoRA",
                    group_size=self.group_size, int8_threshold=self.int8_threshold, reuse=True, mmap=mmap)

    def install(self, view, name):
        swapped = self.prepare_base(view.model, view.map)  # a layers= view's map holds the chosen blocks only
        try:
            super().install(view, name)
        except BaseException:
            restore(view.model, swapped)  # the model as it was: float maps back
            raise

    def saved_config(self) -> LoRA:
        """A plain LoRA config: the file holds a LoRA delta, whatever the base's width."""
        return LoRA(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoRA)})
