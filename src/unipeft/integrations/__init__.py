"""Bridges between unipeft and other training libraries.

``hf_trainer.SaveDeltaCallback`` makes ``transformers.Trainer`` (and TRL's
trainers, which subclass it) write unipeft deltas into their checkpoints.
Loaded on first use, so ``import unipeft`` does not import the Trainer stack.
"""

_LAZY = {"SaveDeltaCallback": "hf_trainer"}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
