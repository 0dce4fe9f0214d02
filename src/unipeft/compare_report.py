"""The report of ``unipeft compare``: a measured "PEFT methods: summary" table, JSON and plots.

``unipeft compare`` trains several PEFT methods on one task and measures each; this
module turns its result dict (schema in :func:`write_report`) into

* ``report.md``   -- a title, one line of set-up, the table of :func:`markdown_table`
  and a short "How to read this";
* ``report.json`` -- the dict as given;
* ``metric_vs_params.png`` -- the main metric against the % of trainable parameters;
* ``cost.png``    -- training time and peak memory per method;
* ``forgetting.png`` -- with ``--forgetting``: the change of the general-text perplexity / MLM loss.

Every file is written atomically: to a temporary name in the same folder, then
``os.replace``, so a reader never sees half a report.

Formatting: counts as ``1.2M``/``22.7M``/``850K``; sizes in binary units (1 KB = 1024 B)
as ``299 KB``/``87.3 MB``; latency ratios to the base model as ``1.03x``; ``—`` where a
value does not exist (a method that cannot be merged has no merged latency).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from . import fileio
from .analysis import plotting

DASH = "—"
MD_NAME, JSON_NAME = "report.md", "report.json"
METRIC_PLOT, COST_PLOT, FORGETTING_PLOT = "metric_vs_params.png", "cost.png", "forgetting.png"

COLUMNS = (
    "Method", "Type", "Trainable params (% of base)", "Delta file", "Train time",
    "Peak memory (MB)", "Latency unmerged", "Latency merged", "{main}", "Other metrics",
    "Changed params (% of base)", "Forgetting (before -> after)",
)

HOW_TO_READ = """\
**How to read this.** Each method was trained on the same task with the same budget (steps,
batch size, sequence length) and then measured. *Trainable params* counts the parameters the
optimizer updated and their share of the base model's parameters. *Delta file* is the size of
the saved adapter (what has to be stored per task on top of the shared base model). *Train time*
is the wall-clock time of the training steps, with the throughput in training examples per
second. *Peak memory* is the peak of the process that trained that method (each method runs in
its own process): resident memory (RSS) on CPU, allocated CUDA memory on a GPU. *Latency* is the
time of a forward pass over the dev batches relative to the base model without any adapter
(1.00x = no overhead), once with the adapter as trained (unmerged) and once merged into the base
weights; `—` means the method cannot be merged (it adds modules or tokens the base model does not
have). The metric columns are measured on the dev examples after training; "from" gives the value
before training where it was measured. A method that failed is listed with its error and left
out of the plots. *Changed params* is the share of the base model's parameters that differ once the
delta is merged, plus the parameters it adds where it cannot be merged (as the notes' summary table
counts them; task heads left out): LoRA on two matrices per layer changes every element of them.
*Forgetting* (with `--forgetting`) is the base model's own ability on held-out general text with the
delta switched off and on: perplexity for causal LMs, masked-LM loss for encoders with a pretrained
MLM head (lower is better), else a BBC News topic probe's accuracy on the encoder's pooled features
(higher is better); the change in %.
"""


# --------------------------------------------------------------------------- formatting

def human_count(n) -> str:
    """1234 -> '1.2K', 22_700_000 -> '22.7M'; below 1000 the number itself."""
    if n is None:
        return DASH
    n = float(n)
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{_sig(n / div)}{unit}"
    return f"{n:.0f}"


def human_bytes(n) -> str:
    """299 * 1024 -> '299 KB', 87.3 * 1024**2 -> '87.3 MB' (binary units)."""
    if n is None:
        return DASH
    n = float(n)
    for div, unit in ((1024 ** 4, "TB"), (1024 ** 3, "GB"), (1024 ** 2, "MB"), (1024, "KB")):
        if abs(n) >= div:
            return f"{_sig(n / div)} {unit}"
    return f"{n:.0f} B"


def ratio(value, base) -> str:
    """value / base as '1.03x', or '—' when either is missing or base is not positive."""
    if value is None or base is None or not _finite(value) or not _finite(base) or base <= 0:
        return DASH
    return f"{value / base:.2f}x"


def percent(p) -> str:
    """A percentage with enough digits to tell small ones apart: 12.3%, 0.95%, 0.042%."""
    if p is None or not _finite(p):
        return DASH
    if p == 0:
        return "0%"
    if abs(p) >= 10:
        return f"{p:.1f}%"
    if abs(p) >= 0.1:
        return f"{p:.2f}%"
    return f"{p:.2g}%"


def metric(value) -> str:
    """Fractions with 3 decimals (0.912), larger scales (BLEU, ROUGE-L, NIST) with 2."""
    if value is None:
        return DASH
    if not _finite(value):
        return str(value)
    return f"{value:.3f}" if abs(value) <= 1 else f"{value:.2f}"


def _sig(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}"


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _cell(text) -> str:
    """One markdown cell: one line, no column breaks."""
    return " ".join(str(text).split()).replace("|", "\\|")


# --------------------------------------------------------------------------- table

def _trainable_pct(report, m):
    pct = m.get("trainable_pct")
    if pct is None and m.get("trainable_params") is not None and report.get("base_params"):
        pct = 100.0 * m["trainable_params"] / report["base_params"]
    return pct


def _row(report, m) -> list[str]:
    main = report.get("main_metric", "")
    label = m.get("label") or m.get("method", "?")
    if m.get("error"):
        row = [label, m.get("type", ""), f"failed: {m['error']}"]
        return row + [""] * (len(COLUMNS) - len(row))
    trainable = f"{human_count(m.get('trainable_params'))} ({percent(_trainable_pct(report, m))})"
    secs, eps = m.get("train_seconds"), m.get("examples_per_s")
    train = DASH if secs is None else f"{secs:.1f} s" + ("" if eps is None else f", {eps:.1f} ex/s")
    mem = m.get("peak_memory_mb")
    memory = DASH if mem is None else f"{mem:.0f} ({str(m.get('memory_kind', '')).upper() or '?'})"
    lat = m.get("latency_ms") or {}
    unmerged = ratio(lat.get("unmerged"), lat.get("base"))
    merged = ratio(lat.get("merged"), lat.get("base")) if m.get("mergeable", True) else DASH
    metrics = m.get("metrics") or {}
    main_cell = metric(metrics.get(main))
    if m.get("undertrained"):  # at the majority label's level: the budget speaks, not the method (see notes)
        main_cell = f"too few steps ({main_cell})"
    if m.get("metric_before") is not None and main in metrics:
        main_cell += f" (from {metric(m['metric_before'])})"
    others = ", ".join(f"{k} {metric(v)}" for k, v in metrics.items() if k != main) or DASH
    changed = DASH if m.get("changed_params") is None else \
        f"{human_count(m['changed_params'])} ({percent(m.get('changed_pct'))})"
    return [label, m.get("type", ""), trainable, human_bytes(m.get("delta_bytes")), train, memory,
            unmerged, merged, main_cell, others, changed, forgetting_cell(m.get("forgetting"))]


def forgetting_cell(f) -> str:
    """'ppl 12.31 -> 12.90 (+4.8%)', 'MLM loss 2.31 -> 2.35 (+1.7%)', the note, or a dash."""
    if not f:
        return DASH
    if f.get("note"):
        return f"not measured: {f['note']}"
    what = {"perplexity": "ppl", "masked_lm_loss": "MLM loss", "probe_accuracy": "BBC probe acc"}.get(
        f.get("measure"), f.get("measure", ""))
    digits = 3 if f.get("measure") == "probe_accuracy" else 2
    return f"{what} {f['before']:.{digits}f} -> {f['after']:.{digits}f} ({f['change_pct']:+.1f}%)"


def markdown_table(report) -> str:
    """The measured summary table, one row per method (GitHub markdown)."""
    header = [c.format(main=report.get("main_metric") or "metric") for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for m in report.get("methods", []):
        lines.append("| " + " | ".join(_cell(c) for c in _row(report, m)) + " |")
    return "\n".join(lines) + "\n"


def notes(report) -> str:
    """Lines for the methods whose row needs a word (AdapterFusion: what it fused, how its numbers add up;
    a method the budget left at the majority label's accuracy: why its number says nothing yet)."""
    lines = [f"- *{m.get('label') or m.get('method', '?')}*: {_cell(m['note'])}"
             for m in report.get("methods", []) if m.get("note") and not m.get("error")]
    return "\n".join(["**Notes.**", ""] + lines) + "\n" if lines else ""


def setup_line(report) -> str:
    b = report.get("budget") or {}
    budget = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in b.items())
    parts = [f"model `{report.get('model', '?')}`", f"task `{report.get('task', '?')}`",
             f"device {report.get('device', '?')}", f"{report.get('threads', '?')} threads"]
    if report.get("base_params"):
        parts.append(f"base {human_count(report['base_params'])} parameters")
    if budget:
        parts.append(f"budget: {budget}")
    return "; ".join(parts) + "."


def markdown(report) -> str:
    """The whole of report.md."""
    title = f"# PEFT comparison: {report.get('task', '?')} on {report.get('model', '?')}"
    stamp = " ".join(x for x in (f"unipeft {report['unipeft_version']}" if report.get("unipeft_version") else "",
                                 report.get("created") or "") if x)
    parts = [title, "", setup_line(report)]
    if stamp:
        parts += ["", f"_{stamp}_"]
    parts += ["", markdown_table(report)] + ([notes(report)] if notes(report) else []) + [HOW_TO_READ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- files

def _save_fig(fig, path: Path) -> Path:
    return fileio.atomic_write(path, lambda tmp: plotting.save(fig, tmp))


def _ok(report):
    return [m for m in report.get("methods", []) if not m.get("error")]


LABELLED_POINTS = 10  # up to this many methods the scatter names each point; beyond, a numbered key


def plot_metric_vs_params(report, png) -> Path | None:
    """Main metric against % trainable parameters (log x), one point per method.

    A few methods get their names beside the points; many (the main job's 27) would print names
    over each other, so each point then carries a number and a key beside the axes names it,
    sorted by the metric as the table is read."""
    main = report.get("main_metric", "")
    pts = []
    for m in _ok(report):
        pct, val = _trainable_pct(report, m), (m.get("metrics") or {}).get(main)
        if pct is not None and val is not None and _finite(pct) and _finite(val) and pct > 0:
            pts.append((m.get("label") or m.get("method", "?"), float(pct), float(val)))
    if not pts:
        return None
    plt = plotting.pyplot()
    keyed = len(pts) > LABELLED_POINTS
    fig, ax = plt.subplots(figsize=(9.6, max(4.4, 0.2 * len(pts) + 1.0)) if keyed else (6.4, 4.4))
    if keyed:
        pts.sort(key=lambda p: -p[2])
        ax.scatter([x for _, x, _ in pts], [y for _, _, y in pts], s=40, zorder=3, color="tab:blue")
        for i, (label, x, y) in enumerate(pts, 1):
            ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        key = "\n".join(f"{i:2d}  {label}  ({y:.3f})" for i, (label, _, y) in enumerate(pts, 1))
        ax.text(1.03, 1.0, key, transform=ax.transAxes, va="top", ha="left", fontsize=7, family="monospace")
    else:
        for label, x, y in pts:
            ax.scatter([x], [y], s=40, zorder=3)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("trainable parameters (% of base, log scale)")
    ax.set_ylabel(main)
    ax.set_title(f"{report.get('task', '')}: {main} vs trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    return _save_fig(fig, png)


def plot_cost(report, png) -> Path | None:
    """Two panels of horizontal bars, training time and peak memory, one row per method (in the
    table's order, first at the top): names stay level and readable however many methods ran."""
    ms = _ok(report)
    if not ms:
        return None
    labels = [m.get("label") or m.get("method", "?") for m in ms]
    secs = [float(m.get("train_seconds") or 0.0) for m in ms]
    mem = [float(m.get("peak_memory_mb") or 0.0) for m in ms]
    kinds = sorted({str(m.get("memory_kind", "")).upper() for m in ms if m.get("memory_kind")})
    plt = plotting.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, sharey=True, figsize=(9.0, 0.28 * len(ms) + 1.6))
    rows = range(len(ms))
    ax1.barh(rows, secs, color="tab:blue")
    ax1.set_xlabel("training time (s)")
    ax1.set_title("training time")
    ax2.barh(rows, mem, color="tab:orange")
    ax2.set_xlabel(f"peak memory (MB{', ' + '/'.join(kinds) if kinds else ''})")
    ax2.set_title("peak memory")
    ax1.set_yticks(list(rows))
    ax1.set_yticklabels(labels, fontsize=8)
    ax1.invert_yaxis()  # the table's first method at the top
    for ax in (ax1, ax2):
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return _save_fig(fig, png)


def plot_forgetting(report, png) -> Path | None:
    """Per method: the change of the general-text perplexity (or MLM loss) after adapting, in %."""
    ms = [m for m in _ok(report) if (m.get("forgetting") or {}).get("change_pct") is not None]
    if not ms:
        return None
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(ms) + 2), 4.2))
    vals = [float(m["forgetting"]["change_pct"]) for m in ms]
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(ms)))
    ax.set_xticklabels([m.get("label") or m.get("method", "?") for m in ms], rotation=30, ha="right", fontsize=8)
    measure = ms[0]["forgetting"]["measure"]
    worse_up = measure != "probe_accuracy"  # losses and perplexity rise when the base forgets; accuracy falls
    ax.bar(range(len(ms)), vals, color=["tab:red" if (v > 0) == worse_up and v != 0 else "tab:green" for v in vals])
    what = {"perplexity": "general-text perplexity", "masked_lm_loss": "general-text masked-LM loss",
            "probe_accuracy": "BBC topic probe accuracy"}.get(measure, measure)
    ax.set_ylabel(f"change of the {what} (%)")
    ax.set_title(f"{report.get('task', '')}: forgetting ({'higher' if worse_up else 'lower'} = more forgotten)")
    ax.grid(True, axis="y", alpha=0.3)
    return _save_fig(fig, png)


def write_report(report, out_dir) -> dict:
    """Write report.md, report.json and the plots into ``out_dir``; return their paths.

    ``report`` is the dict ``unipeft compare`` builds: ``model``, ``task``, ``main_metric``,
    ``device``, ``threads``, ``budget`` (steps, batch_size, max_length, train_examples,
    dev_examples), ``base_params``, ``unipeft_version``, ``created``, ``baseline`` (the majority
    label's dev accuracy: comparison.majority_baseline, or None) and ``methods``, a list
    of dicts with ``method``, ``label``, ``type``, ``mergeable``, ``config``, ``lr``,
    ``trainable_params``, ``trainable_pct``, ``delta_bytes``, ``train_seconds``,
    ``examples_per_s``, ``tokens_per_s``, ``steps``, ``peak_memory_mb``, ``memory_kind``
    (``"rss"``/``"cuda"``), ``latency_ms`` (``base``, ``unmerged``, ``merged`` or None),
    ``metrics``, ``metric_before``, ``changed_params``/``changed_pct``/``changed_how`` (analysis.forgetting.
    changed_parameters), ``forgetting`` (None, or analysis.forgetting.forgetting's dict), ``error``
    (None, or why the method failed), and where they apply ``note`` (words for the notes) and
    ``undertrained`` (True: at the majority label's accuracy, comparison.flag_undertrained).

    Returns ``{"md": Path, "json": Path, "plots": [Path, ...]}``; a plot with nothing to
    show (every method failed) is not written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": fileio.write_text(out / JSON_NAME, json.dumps(report, indent=2, default=str) + "\n"),
        "md": fileio.write_text(out / MD_NAME, markdown(report)),
    }
    plots = [plot_metric_vs_params(report, out / METRIC_PLOT), plot_cost(report, out / COST_PLOT),
             plot_forgetting(report, out / FORGETTING_PLOT)]
    paths["plots"] = [p for p in plots if p is not None]
    return paths
