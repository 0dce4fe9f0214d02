"""``unipeft compare --train-sizes 10,50,100,1000``: each method's metric against the training-set size.

Seed 000 claims PEFT performs better in low-data regimes (and prefix tuning beats full fine-tuning
there). This runs ``unipeft compare`` once per (size, seed) -- every method on a seeded, stratified
subset of ``size`` training examples (a different subset per seed), the same dev set -- and
collects the main dev metric. ``low_data.md`` holds the table (mean +- standard deviation over
seeds), ``low_data.json`` every run's numbers, ``low_data.png`` the plot (log x, one line per method,
error bars over seeds); each run's own compare report stays under ``runs/n<size>-s<seed>/``.

Every run is scored once, by the comparison after its last step (``eval_every=0``, no evaluation
during training, unless given): at |T| = 10 an epoch is one step, and the trainer's usual per-epoch
evaluation with ``keep_best`` would pick the best of a hundred checkpoints on the dev set -- model
selection a learner with ten labels does not have, and a hundred dev passes per run.

A sweep takes hours on a CPU (SmolLM2 on E2E); ``resume=True`` (``--resume``) keeps every (size, seed)
run an earlier sweep into the same folder finished, when that sweep had the same settings
(``sweep.json``: model, task, methods, data and training settings; the sizes and seeds may differ, so
a sweep can also grow). A sweep with other settings is refused before anything runs.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from .. import fileio
from ..errors import UnipeftError
from . import plotting

MD_NAME, JSON_NAME, PLOT_NAME = "low_data.md", "low_data.json", "low_data.png"


def parse_sizes(text) -> list[int]:
    """``"10,50,100"`` (or a list) -> [10, 50, 100]; a one-line error for anything else."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        sizes = [int(str(s).strip()) for s in items if str(s).strip()]
    except ValueError:
        raise UnipeftError(f"--train-sizes takes comma-separated positive integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes) or len(set(sizes)) != len(sizes):
        raise UnipeftError(f"--train-sizes takes distinct positive integers, got {text!r}")
    return sorted(sizes)


SPEC_NAME = "sweep.json"


def sweep(model: str, task: str, methods, sizes, seeds=(0, 1, 2), *, out="out/low_data", data: dict | None = None,
          compare_kwargs: dict | None = None, quiet: bool = False, resume: bool = False, **settings) -> dict:
    """Run the comparison at every (size, seed); returns the summary also written under ``out``.
    ``resume``: reuse the (size, seed) runs a sweep with the same settings finished in ``out``."""
    from ..comparison import compare

    sizes = parse_sizes(sizes)
    try:
        seeds = [int(s) for s in seeds]
    except ValueError:
        raise UnipeftError(f"--seeds takes comma-separated integers, got {seeds!r}") from None
    if not seeds:
        raise UnipeftError("--seeds needs at least one seed")
    out = Path(out)
    settings = {"eval_every": 0, **settings}  # scored once, after the last step (see the module docstring)
    spec = _spec(model, task, methods, data, settings, compare_kwargs)
    finished = _check_spec(out, spec, resume)
    runs, main = [], None
    for size in sizes:
        for seed in seeds:
            folder = out / "runs" / f"n{size}-s{seed}"
            if folder.name in finished:
                rep = finished[folder.name]
                if not quiet:
                    print(f"n={size}, seed {seed}: kept from the earlier sweep ({folder / 'report.json'})", flush=True)
            else:
                rep = compare(model, task, methods, out=folder, data={**(data or {}), "train_size": size},
                              quiet=quiet, **(compare_kwargs or {}), **{**settings, "seed": seed})
                fileio.write_json(folder / SPEC_NAME, spec, indent=1)  # this run is finished, with these settings
            main = rep["main_metric"]
            for m in rep["methods"]:
                runs.append({"method": m["method"], "label": m.get("label", m["method"]), "size": size,
                             "train_examples": rep["budget"]["train_examples"], "seed": seed,
                             "metric": None if m.get("error") else (m.get("metrics") or {}).get(main),
                             "error": m.get("error")})
    summary = {"model": model, "task": task, "main_metric": main, "sizes": sizes, "seeds": seeds,
               "methods": list(dict.fromkeys(r["method"] for r in runs)), "runs": runs, "table": table(runs)}
    summary["files"] = {k: str(v) for k, v in write(summary, out).items()}
    return summary


def _spec(model, task, methods, data, settings, compare_kwargs) -> dict:
    """What a (size, seed) run's numbers depend on, as JSON (threads and process layout do not count)."""
    extra = {k: v for k, v in (compare_kwargs or {}).items() if k not in ("threads", "in_process") and v}
    spec = {"model": model, "task": task, "methods": list(methods) if methods else None, "data": data or {},
            "settings": {k: v for k, v in settings.items() if k not in ("seed", "progress")}, **extra}
    # a PromptHead (and anything else with to_dict) as its JSON form; other values as their text
    return json.loads(json.dumps(spec, sort_keys=True, default=lambda o: o.to_dict() if hasattr(o, "to_dict")
                                 else repr(o)))


def _check_spec(out: Path, spec: dict, resume: bool) -> dict:
    """{run folder name: its compare report} of the finished runs to keep; writes ``sweep.json``."""
    path = out / SPEC_NAME
    finished = {}
    if resume and path.exists():
        before = json.loads(path.read_text())
        if before != spec:
            changed = sorted(k for k in set(before) | set(spec) if before.get(k) != spec.get(k))
            raise UnipeftError(f"--resume: {out} holds a sweep with other {', '.join(changed)}; give another --out "
                               f"or run without --resume to start over")
        for report in sorted((out / "runs").glob("n*-s*/report.json")):
            # only runs marked finished under these settings: a folder left by a sweep with other
            # settings (or killed before its mark) runs again
            mark = report.parent / SPEC_NAME
            if mark.exists() and json.loads(mark.read_text()) == spec:
                finished[report.parent.name] = json.loads(report.read_text())
    out.mkdir(parents=True, exist_ok=True)
    fileio.write_json(path, spec, indent=1)
    return finished


def table(runs: list[dict]) -> dict:
    """{method: {size: {"mean", "std", "n"}}} over the seeds that did not fail."""
    out: dict = {}
    for r in runs:
        if r["metric"] is None:
            continue
        out.setdefault(r["method"], {}).setdefault(r["size"], []).append(r["metric"])
    return {m: {s: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
                for s, v in sizes.items()} for m, sizes in out.items()}


def markdown(summary: dict) -> str:
    sizes, main = summary["sizes"], summary["main_metric"]
    labels = {r["method"]: r["label"] for r in summary["runs"]}
    lines = [f"# Low data: {main} against the training-set size ({summary['task']} on {summary['model']})", "",
             f"Mean +- standard deviation over seeds {summary['seeds']} (each seed its own subset).", "",
             "| Method | " + " | ".join(f"n={s}" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for m in summary["methods"]:
        cells = []
        for s in sizes:
            c = summary["table"].get(m, {}).get(s)
            cells.append("failed" if c is None else f"{c['mean']:.3f} +- {c['std']:.3f}")
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, png) -> Path | None:
    if not summary["table"]:
        return None
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    labels = {r["method"]: r["label"] for r in summary["runs"]}
    for m, by_size in summary["table"].items():
        xs = sorted(by_size)
        ax.errorbar(xs, [by_size[x]["mean"] for x in xs], yerr=[by_size[x]["std"] for x in xs], marker="o",
                    capsize=3, label=labels.get(m, m))
    ax.set_xscale("log")
    ax.set_xlabel("training examples (log scale)")
    ax.set_ylabel(summary["main_metric"])
    ax.set_title(f"{summary['task']}: {summary['main_metric']} vs training-set size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fileio.atomic_write(Path(png), lambda tmp: plotting.save(fig, tmp))


def write(summary: dict, out) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": fileio.write_text(out / JSON_NAME, json.dumps(summary, indent=2, default=str) + "\n"),
             "md": fileio.write_text(out / MD_NAME, markdown(summary))}
    png = plot(summary, out / PLOT_NAME)
    if png is not None:
        files["plot"] = png
    return files
