"""The switch between fused training paths and the plain reference path.

Fused paths (one autograd node for a LoRA-adapted linear map, ...) compute the
same function as the plain composition of PyTorch ops, with fewer kernels and
fewer temporaries. The plain path stays available for debugging and for tests
that compare the two: ``UNIPEFT_FUSED=0`` in the environment, or::

    with unipeft.fused.disabled():
        loss = model(**batch).loss
"""
from __future__ import annotations

import contextlib
import os

_enabled = os.environ.get("UNIPEFT_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


def enabled() -> bool:
    return _enabled


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = bool(flag)


@contextlib.contextmanager
def disabled():
    """Run the plain reference path inside the block."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before
