"""Per-delta serving counters and their Prometheus text exposition.

The engine counts, for every delta (and for the base, labelled with the base's name): requests,
prompt and completion tokens, errors, request latency (a histogram, so p50/p99 can be read off by
Prometheus), load time and loads, cache hits and evictions. ``render`` writes the Prometheus text
format (version 0.0.4) by hand: a few dozen lines, and no global registry shared between the
engines of one process or between tests (prometheus_client keeps one per process).
"""
from __future__ import annotations

import threading
from collections import defaultdict

# request latency buckets in seconds: tiny models answer in milliseconds, SmolLM2 on a CPU in seconds
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# (name, type, help) of the per-delta series, in the order they are written
SERIES = (
    ("requests_total", "counter", "Requests answered"),
    ("errors_total", "counter", "Requests that failed (after being accepted)"),
    ("prompt_tokens_total", "counter", "Prompt (input) tokens processed"),
    ("completion_tokens_total", "counter", "Tokens generated"),
    ("cache_hits_total", "counter", "Batches that found the delta already loaded"),
    ("cache_misses_total", "counter", "Batches that had to load the delta first"),
    ("evictions_total", "counter", "Times the delta was evicted from the cache (least recently used)"),
    ("load_seconds_total", "counter", "Time spent loading the delta from disk and attaching it"),
)


class Metrics:
    """Thread-safe counters keyed by (engine, delta); the worker threads write, /metrics reads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._hist: dict[tuple[str, str], list[int]] = {}
        self._lat_sum: dict[tuple[str, str], float] = defaultdict(float)
        self._gauges: dict[str, tuple[str, dict[str, float], str]] = {}

    def add(self, base: str, delta: str, **amounts: float) -> None:
        with self._lock:
            c = self._counters[(base, delta)]
            for k, v in amounts.items():
                c[k] += v

    def observe_latency(self, base: str, delta: str, seconds: float) -> None:
        with self._lock:
            key = (base, delta)
            h = self._hist.setdefault(key, [0] * (len(BUCKETS) + 1))
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    h[i] += 1
                    break
            else:
                h[-1] += 1
            self._lat_sum[key] += seconds

    def set_gauge(self, name: str, help_: str, labels: dict[str, float], kind: str = "gauge") -> None:
        """A per-base series (``labels``: base name -> value) read from the engines at scrape time;
        ``kind`` "counter" for those that only grow."""
        with self._lock:
            self._gauges[name] = (help_, dict(labels), kind)

    def get(self, base: str, delta: str, counter: str) -> float:
        with self._lock:
            return self._counters.get((base, delta), {}).get(counter, 0.0)

    def snapshot(self) -> dict[tuple[str, str], dict[str, float]]:
        with self._lock:
            return {k: dict(v) for k, v in self._counters.items()}

    def render(self, prefix: str = "unipeft") -> str:
        """Everything in the Prometheus text format, one ``delta`` and one ``base`` label per series."""
        with self._lock:
            lines: list[str] = []
            keys = sorted(set(self._counters) | set(self._hist))
            for name, kind, help_ in SERIES:
                lines += [f"# HELP {prefix}_{name} {help_}, per delta", f"# TYPE {prefix}_{name} {kind}"]
                for key in keys:
                    value = self._counters.get(key, {}).get(name, 0.0)
                    lines.append(f"{prefix}_{name}{{{_labels(key)}}} {_num(value)}")
            name = f"{prefix}_request_latency_seconds"
            lines += [f"# HELP {name} Time from a request's arrival to its answer, per delta",
                      f"# TYPE {name} histogram"]
            for key in keys:
                h = self._hist.get(key, [0] * (len(BUCKETS) + 1))
                total = 0
                for b, n in zip(BUCKETS, h):
                    total += n
                    lines.append(f'{name}_bucket{{{_labels(key)},le="{b}"}} {total}')
                total += h[-1]
                lines.append(f'{name}_bucket{{{_labels(key)},le="+Inf"}} {total}')
                lines.append(f"{name}_sum{{{_labels(key)}}} {_num(self._lat_sum.get(key, 0.0))}")
                lines.append(f"{name}_count{{{_labels(key)}}} {total}")
            for gname, (help_, values, kind) in sorted(self._gauges.items()):
                lines += [f"# HELP {prefix}_{gname} {help_}", f"# TYPE {prefix}_{gname} {kind}"]
                for base, v in sorted(values.items()):
                    lines.append(f'{prefix}_{gname}{{base="{_escape(base)}"}} {_num(v)}')
            return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    # the text format's three escapes inside label values
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(key: tuple[str, str]) -> str:
    return f'base="{_escape(key[0])}",delta="{_escape(key[1])}"'


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
