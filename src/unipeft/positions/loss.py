"""The model's loss as a position: a delta adds a term to the training loss the model returns
(AdaMix's consistency term between two passes), or widens the LM head's logits past the base's
vocabulary (NewTokens), so that the site computes the loss itself. See the package docstring.

One ``LossSite`` per model: hooks on the model itself.

* Terms: in training mode with gradients on and a loss computed by the model (labels given, as
  unipeft's trainer and ``transformers.Trainer`` do), every active delta's term is added to
  ``output.loss``. A term is ``term(model, args, kwargs, output) -> tensor | None``; it may run the
  model again (the site does not add terms to the passes a term makes itself).
* ``WideLogits``: transformers' LM losses flatten the logits by ``config.vocab_size``, which
  fails (or mixes rows) once the logits have more columns. While a delta marked so is active,
  the site takes ``labels`` out of the call, lets the model run without them and computes the
  model's own loss function (``model.loss_function``: shifted for a causal LM, not for a masked
  one) over every column of the logits, in training and in evaluation alike. The output keeps
  its type, with the loss where transformers puts it.

Under ``up.route`` the site does nothing: the routed sites ignore the active deltas then, so the
logits keep the base's width, and the terms belong to training one delta at a time.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn as nn

from ..errors import UnipeftError


class WideLogits:
    """The mark of a delta whose output rows widen the LM head's logits past the base's vocabulary."""


class LossSite:
    def __init__(self, model: nn.Module):
        self.sources: dict[str, Callable | WideLogits] = {}
        self.active: tuple = ()  # the active terms
        self.wide = False        # an active delta widens the logits
        self.route = None
        self._inside = False  # a term's own passes get no terms
        self._taken: list[tuple[dict, torch.Tensor]] = []  # (the call's kwargs, its labels), innermost last
        self._named: set | None = None
        self._pre = model.register_forward_pre_hook(self._take_labels, with_kwargs=True)
        # always_call: a forward that raises still hands back the labels it was given
        self._handle = model.register_forward_hook(self._add, with_kwargs=True, always_call=True)

    def refresh(self, active: list[str]) -> None:
        sources = [self.sources[n] for n in active if n in self.sources]
        self.active = tuple(s for s in sources if not isinstance(s, WideLogits))
        self.wide = any(isinstance(s, WideLogits) for s in sources)

    def unipeft_route(self, route) -> None:
        self.route = route

    def remove(self) -> None:
        self._pre.remove()
        self._handle.remove()

    def _take_labels(self, model, args, kwargs):
        if not self.wide or self.route is not None or kwargs.get("labels") is None:
            return None
        # an encoder-decoder makes its decoder inputs from the labels and does not shift them (T5
        # flattens by the logits' own width already); a model without a loss function has no LM loss to redo
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False) \
                or not callable(getattr(model, "loss_function", None)):
            return None
        kwargs = dict(kwargs)
        self._taken.append((kwargs, kwargs.pop("labels")))
        return args, kwargs

    def _add(self, model, args, kwargs, output):
        labels = None
        if self._taken and self._taken[-1][0] is kwargs:  # this call's own (a term's pass takes none)
            labels = self._taken.pop()[1]
        if output is None:  # the forward raised
            return None
        if labels is not None:
            output = self._lm_loss(model, kwargs, output, labels)
        if (self._inside or not self.active or self.route is not None or not model.training
                or not torch.is_grad_enabled() or getattr(output, "loss", None) is None):
            return output if labels is not None else None
        self._inside = True
        try:
            terms = [t for t in (term(model, args, kwargs, output) for term in self.active) if t is not None]
        finally:
            self._inside = False
        if terms:
            output.loss = output.loss + sum(terms)
        return output

    def _lm_loss(self, model, kwargs, output, labels):
        logits = output[0] if isinstance(output, tuple) else getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise UnipeftError(f"{type(model).__name__} returns no logits ({type(output).__name__}) to compute its "
                               f"loss over the widened vocabulary from; compute the loss from its outputs yourself")
        if self._named is None:
            self._named = {n for n, p in inspect.signature(model.forward).parameters.items()
                           if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        # what the model itself hands its loss function: the keyword arguments its forward does not name
        # (a Trainer's num_items_in_batch under gradient accumulation)
        extra = {k: v for k, v in kwargs.items() if k not in self._named}
        loss = model.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **extra)
        if isinstance(output, tuple):
            return (loss,) + output
        return type(output)(**{**output, "loss": loss})  # a dataclass: the loss comes first, as transformers has it
