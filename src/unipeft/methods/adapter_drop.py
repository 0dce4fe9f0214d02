"""AdapterDrop (Rücklé et al. 2021; seed 001 "AdapterDrop" and the summary table).

    ADT(X) = X + sigma(X W_{d_h x d_m}) W_{d_m x d_h}      in layers n+1..L only
    parameters: (L - n) x 2 x (2 d_h d_m)                   (Houlsby placement)

No adapter in the lowest n layers, for training and for inference: those layers run the frozen
base alone, so a forward pass costs less than with adapters everywhere, and (the paper's point)
when several tasks share one input the lowest n layers' activations can be computed once.

It is an option of every adapter style (``up.Adapter(style=..., drop=n)``), not a copy of the
adapter: ``up.AdapterDrop(n=..., **adapter options)`` is the same config with ``drop`` set.
"The lowest n layers" counts within each stack of blocks (an encoder-decoder drops the lowest n
of its encoder and of its decoder).

Robust AdapterDrop (``robust=True``, the paper's "robust" training): adapters sit in every
layer; every optimizer step draws n ~ Uniform{0, ..., L - 1} (``step_hooks``, as DyLoRA draws
its rank: a function of the step, no call in the training loop) and the adapters of the lowest
n layers skip that step. One trained delta then serves any n at inference: eval mode uses
``drop`` (saved with the delta), changed by ``up.set_drop(model, name, n)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import step_hooks
from ..errors import UnipeftError


def AdapterDrop(n: int = 5, robust: bool = False, **options):
    """``up.Adapter(drop=n, drop_robust=robust, **options)``: an adapter delta with no adapter in the
    lowest n layers of each stack (``robust``: adapters everywhere, a random n per training step).
    Every other option (style, bottleneck, ...) is the adapter's."""
    from .adapter import Adapter

    return Adapter(drop=n, drop_robust=robust, **options)


class DropPlan:
    """Where an adapter delta's adapters go when it drops layers, and (robust) the per-step draw."""

    def __init__(self, view, owner: str, n: int, robust: bool):
        self.view, self.owner, self.robust = view, owner, robust
        sizes = sorted({b.stack_size for b in view.map.blocks})
        if sizes and n >= sizes[0]:
            raise UnipeftError(f"{owner}: drop={n} would leave no adapter in a stack of {sizes[0]} layers; "
                               f"valid drop: 0 to {sizes[0] - 1}")
        self.schedule = DropSchedule(n, sizes[0] if sizes else 1) if robust else None
        self.n = n
        self.adapters: list[nn.Module] = []

    def position(self, path: str) -> int:
        return self.view.map.block_of(path).position

    def keep(self, pairs):
        """Robust: every (input, output) pair (the draw decides per step); otherwise those above layer n."""
        if self.robust:
            return pairs
        return [(src, out) for src, out in pairs if self.position(out) >= self.n]

    def watch(self, adapter, out_path: str) -> None:
        """A robust delta's adapter skips itself while its layer is below the current n."""
        if self.schedule is not None:
            adapter.__dict__["drop_at"] = (self.schedule, self.position(out_path))
            adapter.train(self.view.module(out_path).training)  # the mode decides n: take the model's
            self.adapters.append(adapter)

    def start(self) -> None:
        if self.schedule is not None:
            self.schedule.params = [p for a in self.adapters for p in a.parameters()]
            step_hooks.register(self.schedule, self.adapters)


class DropSchedule(step_hooks.StepController):
    """n for training (drawn per optimizer step, a function of the step only) and for inference."""

    def __init__(self, n: int, layers: int):
        self.n, self.layers = n, layers
        self.params: list[nn.Parameter] = []  # the delta's parameters only: no cycle with its modules
        self.drawn = self.draw(1)

    def draw(self, t: int) -> int:
        """n for optimizer step t (1, 2, ...): uniform in 0..L-1."""
        g = torch.Generator().manual_seed(7_919 * t + 17)
        return int(torch.randint(0, self.layers, (1,), generator=g))

    def dropped(self, position: int, training: bool) -> bool:
        return position < (self.drawn if training else self.n)

    def parameters(self):
        return self.params

    def after(self):
        self.drawn = self.draw(self.steps + 1)

    # n of the next step: a run resumed from a checkpoint trains the layers the uninterrupted one would
    # (without it the first resumed step would use the n drawn at attach, step 1's)
    def state(self):
        return {"drawn": torch.tensor(self.drawn)}

    def load_state(self, tensors):
        if "drawn" in tensors:
            self.drawn = int(tensors["drawn"])

    def lost_on_resume(self, steps):
        if self.drawn == self.draw(steps + 1):
            return None  # the n drawn at attach is the one the resumed step needs
        return (f"robust AdapterDrop's number of dropped layers for step {steps + 1} (the first resumed step "
                f"drops the {self.drawn} drawn for step 1)")


def dropped(adapter: nn.Module) -> bool:
    """Whether this adapter sits out the current forward (a robust delta below the current n)."""
    at = adapter.__dict__.get("drop_at")
    return at is not None and at[0].dropped(at[1], adapter.training)


def set_drop(model: nn.Module, name: str, n: int) -> nn.Module:
    """Run robust AdapterDrop delta ``name`` with no adapter in its lowest ``n`` layers from now on
    (outside training; saved with the delta)."""
    from ..engine import _require

    _, delta = _require(model, name)
    if not getattr(delta.config, "drop_robust", False):
        raise UnipeftError(f"up.set_drop: delta {name!r} ({delta.config.kind}) was not trained with robust "
                           f"AdapterDrop, so its adapters are fixed; train with up.AdapterDrop(n=..., robust=True) "
                           f"to choose n after training")
    schedules = {id(a.__dict__["drop_at"][0]): a.__dict__["drop_at"][0]
                 for a in delta.linear.values() if "drop_at" in a.__dict__}
    layers = min(s.layers for s in schedules.values())
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < layers:
        raise UnipeftError(f"up.set_drop: n must be an integer from 0 to {layers - 1}, got {n!r}")
    for s in schedules.values():
        s.n = n
    delta.config = delta.config.replace(drop=n)
    return model
