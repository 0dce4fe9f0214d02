"""Analysis tools: estimates and reports about fine-tuning runs (no training needed).

``memory`` -- the GPU memory estimator of the lecture notes (seed 000, "GPU Memory Estimated")
and the notes' hardware-requirement table, computed from stated rules.
"""
from .memory import MemoryEstimate, PRESETS, estimate, hardware_table, format_hardware_table

__all__ = ["MemoryEstimate", "PRESETS", "estimate", "hardware_table", "format_hardware_table"]
