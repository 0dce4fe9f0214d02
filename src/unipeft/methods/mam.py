"""MAM adapter, "mix-and-match" (He et al. 2022, "Towards a Unified View"; seed 000 "Hybrid PEFT: MAM").

    def transformer_block_mam(x):
        x = concat([x, soft_prompt], dim=seq)     # prefix tuning at the attention (l = 30)
        residual = x
        x = SelfAttention(x)
        x = LN(x + residual)
        x_a = FFN(x)  # parallel adapter          # scaled parallel adapter at the FFN (r = 512, s = 4)
        x_a = scale * x_a
        x = LN(x + x_adapter)
        return x

A composition (``compose.py``) of the two existing methods, as one delta: ``PrefixTuning(length,
reparam_hidden)`` and ``Adapter(style="scaled_parallel", bottleneck, scale, locations="ffn")``.
He et al. spend a small budget at the attention (the prefix) and a large one at the FFN (the
adapter), which their study found is where modifying representations pays most. As prefix
tuning alone, the prefix trains through its MLP and is stored without it.
"""
from __future__ import annotations

from typing import ClassVar

from ..config import MethodConfig, check_number, check_positive_int, method
from .compose import install_parts


@method
class MAM(MethodConfig):
    """prefix_length: l, the prefix at every attention; reparam_hidden: the prefix MLP's width (0:
    train P directly); bottleneck: r of the FFN's scaled parallel adapter; scale: s."""

    prefix_length: int = 30
    reparam_hidden: int = 512
    bottleneck: int = 512
    scale: float = 4.0
    train_head: bool | list = True

    kind: ClassVar[str] = "mam"
    method_type: ClassVar[str] = "hybrid"
    mergeable: ClassVar[bool] = False

    def validate(self):
        check_positive_int("MAM", "prefix_length", self.prefix_length)
        check_positive_int("MAM", "reparam_hidden", self.reparam_hidden, allow_zero=True)
        check_positive_int("MAM", "bottleneck", self.bottleneck)
        check_number("MAM", "scale", self.scale, lo=0, lo_open=True)

    def parts(self) -> list[MethodConfig]:
        from .adapter import Adapter
        from .prefix_tuning import PrefixTuning

        return [PrefixTuning(length=self.prefix_length, reparam_hidden=self.reparam_hidden),
                Adapter(style="scaled_parallel", bottleneck=self.bottleneck, scale=float(self.scale),
                        locations=("ffn",))]

    def saved_config(self) -> "MAM":
        """The prefix is stored as P itself (prefix tuning's rule), so without its MLP."""
        return self.replace(reparam_hidden=0)

    def install(self, view, name):
        install_parts(self, self.parts(), view, name)
