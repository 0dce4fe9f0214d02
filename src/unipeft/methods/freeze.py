"""Layer freezing (seed 001 "Layer Freezing").

Earlier layers capture general linguistic features, later layers the task:
train only the last blocks of each stack (and the task head), in place. By default
the last third of each stack (``train_share=1/3``: the last 2 of MiniLM's 6 blocks,
the last 10 of SmolLM2's 30), so one setting means the same on shallow and deep
models; ``train_last=k`` gives the count instead, and ``train_last=0`` trains the
head alone (linear probing).
"""
from __future__ import annotations

from typing import ClassVar

from ..config import MethodConfig, check_number, check_positive_int, method
from ..errors import UnipeftError


@method
class Freeze(MethodConfig):
    """train_share: the share of each stack's last blocks to train (rounded, at least one; the default
    third was screened on MiniLM, where it is 2 of 6 blocks, and on SmolLM2, where 10 of 30 beat the
    former fixed 2 on every decoder task: benchmarks/screen_defaults.py); train_last: how many of the
    last blocks instead, when given."""

    train_last: int | None = None
    train_head: bool | list = True
    train_share: float = 1 / 3

    kind: ClassVar[str] = "freeze"
    method_type: ClassVar[str] = "selective"
    mergeable: ClassVar[bool] = True
    routable: ClassVar[bool] = False  # trains the base's own weights in place: a copy per row to route

    def validate(self):
        if self.train_last is not None:
            check_positive_int("Freeze", "train_last", self.train_last, allow_zero=True)
        check_number("Freeze", "train_share", self.train_share, lo=0, hi=1, lo_open=True)

    def trained_blocks(self, stack_size: int) -> int:
        """How many of a stack's last blocks train."""
        if self.train_last is not None:
            return self.train_last
        return max(1, min(stack_size, round(self.train_share * stack_size)))

    def install(self, view, name):
        smallest = min(b.stack_size for b in view.map.blocks)
        if self.train_last is not None and self.train_last > smallest:
            raise UnipeftError(f"Freeze: train_last={self.train_last} but the model has only {smallest} blocks "
                               f"per stack; choose 0..{smallest}, or train_share=0..1 for a share of each stack")
        last = [b for b in view.map.blocks if b.position >= b.stack_size - self.trained_blocks(b.stack_size)]
        prefixes = tuple(b.path + "." for b in last)
        view.select(n for n in view.base_parameters() if n.startswith(prefixes))
