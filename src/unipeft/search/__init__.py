"""The S4 design-space search (Chen et al. 2023): layer groups, parameter allocation, tunable groups and
a strategy per group, searched greedily at a parameter budget; ``unipeft search``. See ``run.py``."""
from .run import search
from .space import Design, Sizer, group_layers

__all__ = ["search", "Design", "Sizer", "group_layers"]
