"""The model's training loss as a position: a delta adds a term to the loss the model returns
(AdaMix's consistency term between two passes). See the package docstring.

One ``LossSite`` per model: a forward hook on the model itself that, in training mode with
gradients on and a loss computed by the model (labels given, as unipeft's trainer and
``transformers.Trainer`` do), adds every active delta's term to ``output.loss``. A term is
``term(model, args, kwargs, output) -> tensor | None``; it may run the model again (the site
does not add terms to the passes a term makes itself). Under ``up.route`` no term is added:
the terms belong to training one delta at a time.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


class LossSite:
    def __init__(self, model: nn.Module):
        self.sources: dict[str, Callable] = {}
        self.active: tuple = ()
        self.route = None
        self._inside = False  # a term's own passes get no terms
        self._handle = model.register_forward_hook(self._add, with_kwargs=True)

    def refresh(self, active: list[str]) -> None:
        self.active = tuple(self.sources[n] for n in active if n in self.sources)

    def unipeft_route(self, route) -> None:
        self.route = route

    def remove(self) -> None:
        self._handle.remove()

    def _add(self, model, args, kwargs, output):
        if (self._inside or not self.active or self.route is not None or not model.training
                or not torch.is_grad_enabled() or getattr(output, "loss", None) is None):
            return None
        self._inside = True
        try:
            terms = [t for t in (term(model, args, kwargs, output) for term in self.active) if t is not None]
        finally:
            self._inside = False
        if terms:
            output.loss = output.loss + sum(terms)
        return output
