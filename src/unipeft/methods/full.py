"""Full fine-tuning: the baseline every PEFT method is measured against.

It goes through the same engine as the other methods (the same trainer, the
same save format, the same head handling), so comparisons are fair: every base
parameter is selected and trained in place.
"""
from __future__ import annotations

from typing import ClassVar

from ..config import MethodConfig, method


@method
class FullFineTune(MethodConfig):
    """Train every base parameter. A copy of the pretrained weights is kept so
    ``up.detach`` can restore the base (one extra copy of the weights in memory)."""

    train_head: bool | list = True

    kind: ClassVar[str] = "full"
    method_type: ClassVar[str] = "selective"
    mergeable: ClassVar[bool] = True
    routable: ClassVar[bool] = False  # trains the base's own weights in place: a copy per row to route

    def install(self, view, name):
        view.select(view.base_parameters())
