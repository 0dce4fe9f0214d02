"""Progress for every phase that can take more than a few seconds, in one style across the project.

On a terminal a phase is a tqdm bar with its rate and ETA; elsewhere (logs, CI, pipes) it is a
plain line when it starts, a line about every 30 seconds while it runs, and a line when it ends
with its time and rate. Everything goes to stderr, so ``--json`` output on stdout stays clean;
``set_quiet(True)`` (``--quiet``) silences it. Under several processes only the main one speaks
(callers pass ``enabled``).

    with progress.phase("scoring test", total=630, unit="sources") as p:
        for batch in batches:
            ...
            p.update(len(batch))
    progress.note("tokenised 4,672 examples (cache hit)")
"""
from __future__ import annotations

import sys
import time

_QUIET = False
PLAIN_EVERY_S = 30.0


def set_quiet(quiet: bool = True) -> None:
    """Silence (True) or restore (False) every progress line and bar."""
    global _QUIET
    _QUIET = bool(quiet)


def quiet() -> bool:
    return _QUIET


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def note(message: str, enabled: bool = True) -> None:
    """One plain line on stderr (unless quiet)."""
    if enabled and not _QUIET:
        print(f"[unipeft] {message}", file=sys.stderr, flush=True)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Phase:
    """A phase of known (or unknown) size: a bar on a terminal, plain lines elsewhere."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", enabled: bool = True,
                 terminal: bool | None = None, initial: int = 0):
        self.desc, self.total, self.unit = desc, total, unit
        self.enabled = enabled and not _QUIET
        self.terminal = _terminal() if terminal is None else terminal
        self.initial, self.done, self.start = initial, initial, time.perf_counter()
        self._last_line = self.start
        self._bar = None
        self._postfix = ""
        if not self.enabled:
            return
        if self.terminal:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=f" {unit}", file=sys.stderr,
                             dynamic_ncols=True, leave=False)
        else:
            size = f": {total:,} {unit}" if total is not None else ""
            start = f" (from {initial:,})" if initial else ""
            note(f"{desc}{size}{start} ...")

    def set_postfix(self, **values) -> None:
        """Figures shown beside the bar (and in the periodic plain lines), e.g. loss=0.41."""
        self._postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(values)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last_line >= PLAIN_EVERY_S:
            self._last_line = now
            rate = (self.done - self.initial) / max(now - self.start, 1e-9)
            extra = f", {self._postfix}" if self._postfix else ""
            if self.total:
                eta = (self.total - self.done) / max(rate, 1e-9)
                note(f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%), "
                     f"{rate:.1f} {self.unit}/s, ETA {_duration(eta)}{extra}")
            else:
                note(f"{self.desc}: {self.done:,} {self.unit}, {rate:.1f} {self.unit}/s{extra}")

    def close(self, status: str = "done") -> float:
        """End the phase; returns its seconds."""
        elapsed = time.perf_counter() - self.start
        if not self.enabled:
            return elapsed
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        ran = self.done - self.initial
        rate = f" ({ran / max(elapsed, 1e-9):.1f} {self.unit}/s)" if ran else ""
        count = f"{ran:,} {self.unit} " if ran else ""
        extra = f"; {self._postfix}" if self._postfix else ""
        note(f"{self.desc}: {status}, {count}in {elapsed:.1f} s{rate}{extra}")
        return elapsed

    def __enter__(self) -> "Phase":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("done" if exc_type is None else f"stopped ({exc_type.__name__})")


def phase(desc: str, total: int | None = None, unit: str = "it", enabled: bool = True, *,
          terminal: bool | None = None, initial: int = 0) -> Phase:
    return Phase(desc, total, unit, enabled, terminal, initial)
