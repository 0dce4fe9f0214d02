"""Resident memory of this process on Linux, for the benchmarks that measure peak training memory
(memory_validation.py, adapters_vs_adapterhub.py): the current RSS or its high-water mark, and a
reset of the mark so a peak is the training's own, not the loading's."""


def rss_kb(field: str = "VmRSS") -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since start or the last reset), in kB; 0 off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
