"""Calls whose name differs across the supported ``transformers`` range, chosen in one place.

The project is tested on the oldest supported release and on the newest (``pyproject.toml``
states the range; ``.ci/run`` runs both). Where transformers renamed a public method inside that
range, the new name is taken when the model has it and the old one otherwise, so neither end
warns or breaks. Keyword arguments that transformers passes *to* our hooks are never read by
name here or elsewhere when their type or shape identifies them (see ``positions/``).
"""
from __future__ import annotations

import torch.nn as nn


def enable_activation_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Turn on gradient (activation) checkpointing: ``activation_checkpointing_enable`` from
    transformers 5.2x, ``gradient_checkpointing_enable`` before (deprecated after)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def is_activation_checkpointing(model: nn.Module) -> bool:
    """Whether checkpointing is on, under either name."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def supports_activation_checkpointing(model: nn.Module) -> bool:
    """Whether the model's class declares checkpointing support, under either name (transformers 5.2x
    renamed gradient checkpointing to activation checkpointing and keeps the old names until v6)."""
    for name in ("supports_activation_checkpointing", "supports_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(type(model), name))
    return False
