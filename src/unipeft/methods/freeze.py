"""Layer freezing (seed 001 "Layer Freezing").

Earlier layers capture general linguistic features, later layers the task:
train only the last k transformer blocks of each stack (and the task head),
in place; ``train_last=0`` trains the head alone (linear probing).
"""
from __future__ import annotations

from typing import ClassVar

from ..config import MethodConfig, check_positive_int, method
from ..errors import UnipeftError


@method
class Freeze(MethodConfig):
    """train_last: how many of the last blocks (of each stack) to train."""

    train_last: int = 2
    train_head: bool | list = True

    kind: ClassVar[str] = "freeze"
    method_type: ClassVar[str] = "selective"
    mergeable: ClassVar[bool] = True
    routable: ClassVar[bool] = False  # trains the base's own weights in place: a copy per row to route

    def validate(self):
        check_positive_int("Freeze", "train_last", self.train_last, allow_zero=True)

    def install(self, view, name):
        smallest = min(b.stack_size for b in view.map.blocks)
        if self.train_last > smallest:
            raise UnipeftError(f"Freeze: train_last={self.train_last} but the model has only {smallest} blocks "
                               f"per stack; choose 0..{smallest}")
        last = [b for b in view.map.blocks if b.position >= b.stack_size - self.train_last]
        prefixes = tuple(b.path + "." for b in last)
        view.select(n for n in view.base_parameters() if n.startswith(prefixes))
