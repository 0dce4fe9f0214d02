"""The intrinsic dimension of a task: d90 (Li et al. 2018; Aghajanyan et al. 2020; seeds 000, 002).

    d90 = the smallest d whose subspace training (up.Intrinsic(d)) reaches 90% of full fine-tuning's metric

``sweep`` trains full fine-tuning once and ``up.Intrinsic`` at each d of a sweep with the training
recipe (``unipeft.training.run.train``: same data, budget and seed for every run), reads each run's
dev metric, and reports each against full fine-tuning's, with d90 and D (the parameters projected
onto). ``plot`` draws the notes' figure: the metric against d on a log axis, the full fine-tuning
level and its 90% line. ``unipeft analyze intrinsic-dim`` is the command line
(``intrinsic_dim_cli``).

d90 is read off the sweep's grid, as in Li et al.: the true d90 lies between the first d that
reaches the line and the one before it.
"""
from __future__ import annotations

import gc
import json
from pathlib import Path

from .. import fileio
from ..errors import UnipeftError

THRESHOLD = 0.9


def d_threshold(metrics: dict[int, float], full: float, fraction: float = THRESHOLD) -> int | None:
    """The smallest d whose metric reaches ``fraction`` of full fine-tuning's (None if none does)."""
    ok = [d for d, m in metrics.items() if m is not None and m >= fraction * full]
    return min(ok) if ok else None


def _metric(result: dict, main: str, what: str) -> float:
    dev = result.get("dev")
    if not dev:
        raise UnipeftError(f"intrinsic-dim: {what} has no dev metrics; the task needs a dev split")
    value = dev.get(main, dev.get("loss"))
    if value is None:
        raise UnipeftError(f"intrinsic-dim: {what} did not report {main!r} on dev")
    return float(value)


def sweep(model: str = "minilm", task: str = "sst2", dims=(10, 100, 1000, 10000), *, out, data: dict | None = None,
          projection: str = "fastfood", said: bool = False, full_settings: dict | None = None,
          intrinsic_settings: dict | None = None, fraction: float = THRESHOLD, say=print, **settings) -> dict:
    """Train full fine-tuning and ``up.Intrinsic(d)`` for each d in ``dims``; return (and write under
    ``out``: ``intrinsic_dim.json``, one run directory per training) the d90 report.

    ``settings`` (TrainConfig fields: max_steps, batch_size, seed, ...) apply to every run;
    ``full_settings`` / ``intrinsic_settings`` (e.g. their own ``lr``) to one side only."""
    from ..engine import registry
    from ..training import run
    from ..training.data import load_task
    from ..training.trainer import TrainingDiverged
    from ..methods.intrinsic import Intrinsic

    dims = sorted({int(d) for d in dims})
    if not dims or dims[0] < 1:
        raise UnipeftError(f"intrinsic-dim: give at least one d >= 1, got {list(dims)}")
    if not 0 < fraction <= 1:
        raise UnipeftError(f"intrinsic-dim: fraction must be in (0, 1], got {fraction}")
    Intrinsic(d=dims[0], projection=projection, said=said)  # bad options fail before any training
    data = dict(data or {})
    dataset = load_task(task, seed=settings.get("seed") or 0, **data)
    main = dataset.task.main_metric
    out = Path(out)
    common = {"data": data, "evaluate_test": False, **{k: v for k, v in settings.items() if v is not None}}

    def train(method, where, options=None, extra=None):
        return run.train(model, task, method, out=out / where, method_options=options,
                         **{**common, **{k: v for k, v in (extra or {}).items() if v is not None}})

    say(f"intrinsic-dim: {dataset.task.name}, {main}, full fine-tuning then d in {dims}")
    res = train("full", "full", extra=full_settings)
    full = _metric(res, main, "full fine-tuning")
    report = {"model": model, "task": dataset.task.name, "main_metric": main, "projection": projection,
              "said": said, "fraction": fraction, "settings": common | {"data": data},
              "full": {"metric": full, "trainable_params": res["trainable_params"], "lr": res["lr"],
                       "train_seconds": res.get("train_seconds")},
              "runs": []}
    _release(res)
    say(f"  full fine-tuning: {main} {full:.4f} ({res['trainable_params']:,} parameters)")
    for d in dims:
        try:
            res = train("intrinsic", f"d{d}", {"d": d, "projection": projection, "said": said}, intrinsic_settings)
        except TrainingDiverged as e:  # one run's rate too high for its d: the sweep goes on, the row says so
            report["runs"].append({"d": d, "metric": None, "fraction_of_full": None, "error": str(e)})
            say(f"  d={d:>8,}: diverged ({e})")
            continue
        value = _metric(res, main, f"d={d}")
        delta = next(iter(registry(res["_model"]).deltas.values()))
        projected = sum({id(s.proj): s.proj.D for s in delta.linear.values() if hasattr(s, "proj")}.values())
        report["D"] = projected
        report["runs"].append({"d": d, "metric": value, "fraction_of_full": value / full if full else None,
                               "trainable_params": res["trainable_params"], "delta_bytes": res.get("delta_bytes"),
                               "lr": res["lr"], "train_seconds": res.get("train_seconds")})
        _release(res)
        say(f"  d={d:>8,}: {main} {value:.4f} ({value / full:.1%} of full)" if full else f"  d={d}: {value:.4f}")
    report["d90"] = d_threshold({r["d"]: r["metric"] for r in report["runs"]}, full, fraction)
    if report["d90"] is not None and report.get("D"):
        report["d90_over_D"] = report["d90"] / report["D"]
    fileio.write_json(out / "intrinsic_dim.json", report, indent=2, default=str)
    return report


def _release(res: dict) -> None:
    """Drop a finished run's model, tokenizer and trainer before the next run trains."""
    for k in [k for k in res if k.startswith("_")]:
        res.pop(k)
    gc.collect()


def format_report(report: dict) -> str:
    main, full = report["main_metric"], report["full"]["metric"]
    lines = [f"intrinsic dimension of {report['task']} ({report['model']}, {report['projection']}"
             f"{', SAID' if report['said'] else ''}): {main}",
             f"{'d':>10}  {main:>10}  {'of full':>8}",
             f"{'full':>10}  {full:>10.4f}  {'100.0%':>8}  ({report['full']['trainable_params']:,} parameters)"]
    for r in report["runs"]:
        if r["metric"] is None:
            lines.append(f"{r['d']:>10,}  {'diverged':>10}  {'-':>8}")
            continue
        frac = f"{r['fraction_of_full']:.1%}" if r["fraction_of_full"] is not None else "-"
        lines.append(f"{r['d']:>10,}  {r['metric']:>10.4f}  {frac:>8}")
    pct = int(round(100 * report["fraction"]))
    if report["d90"] is None:
        lines.append(f"d{pct}: not reached in this sweep (no d gets {pct}% of full fine-tuning)")
    else:
        lines.append(f"d{pct} = {report['d90']:,} of D = {report.get('D', 0):,} projected parameters "
                     f"({100 * report.get('d90_over_D', 0):.3g}%)")
    return "\n".join(lines)


def plot(report: dict, png) -> Path:
    """The notes' figure: the metric against d (log scale), full fine-tuning and its 90% line."""
    from .plotting import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    runs = [r for r in report["runs"] if r["metric"] is not None]  # diverged runs have no point
    ax.plot([r["d"] for r in runs], [r["metric"] for r in runs], "o-", label=f"subspace ({report['projection']})")
    full = report["full"]["metric"]
    pct = int(round(100 * report["fraction"]))
    ax.axhline(full, color="k", ls="--", lw=1, label="full fine-tuning")
    ax.axhline(report["fraction"] * full, color="r", ls=":", lw=1, label=f"{pct}% of full")
    if report["d90"] is not None:
        ax.axvline(report["d90"], color="r", lw=0.8)
        ax.annotate(f"d{pct} = {report['d90']:,}", (report["d90"], report["fraction"] * full),
                    textcoords="offset points", xytext=(5, -12), color="r")
    ax.set_xscale("log")
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel(f"dev {report['main_metric']}")
    ax.set_title(f"{report['task']}, {report['model']}")
    ax.legend(loc="lower right")
    return save(fig, png)


def read_report(path) -> dict:
    """A report written by ``sweep`` (its ``intrinsic_dim.json`` or the folder holding it)."""
    p = Path(path)
    p = p / "intrinsic_dim.json" if p.is_dir() else p
    if not p.is_file():
        raise UnipeftError(f"no intrinsic-dim report at {str(p)!r}: run `unipeft analyze intrinsic-dim` first")
    return json.loads(p.read_text())
