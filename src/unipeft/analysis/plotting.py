"""Figures for the analysis tools: one way to get pyplot and one way to write a PNG."""
from __future__ import annotations

from pathlib import Path

from ..errors import UnipeftError


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or a one-line error if missing."""
    try:
        import matplotlib
    except ImportError:
        raise UnipeftError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, png, dpi: int = 120) -> Path:
    """Write ``fig`` to ``png`` (creating its folder) and close it."""
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return out
