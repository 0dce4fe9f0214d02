"""AdapterFusion's arm in ``unipeft compare``: which trained adapters it fuses, the stage one it
trains itself when the run has too few, and a report row that counts both stages.

A fusion (stage two) needs trained sequential adapters (stage one). compare finds them so:

* ``--method-option adapter_fusion.adapters=A,B,...`` names them: each entry is a method of the
  run (its row's adapter is fused), another adapter method (``houlsby``, ``compacter``, ...: the
  fusion's arm trains it first), or a saved adapter: a run directory (``unipeft train --out``) or
  a delta directory (``up.save``);
* otherwise the run's own sequential adapter rows (Pfeiffer, Houlsby, Compacter, Compacter++; not
  AdapterDrop's, whose lowest layers hold no adapter, so the fusion would lose them), topped up to
  two with ``TOP_UP`` adapters that the fusion's arm trains first.

The fusion arm runs after the rows it fuses (compare moves it there). Its row counts what the
result cost: training time, trainable parameters, delta files and added parameters of both
stages (an adapter reused from another row is counted again here, as it is part of this
result), and its ``note`` says what was fused and how the numbers add up.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import UnipeftError, choices

FUSION = "adapter_fusion"
TOP_UP = ("adapter", "houlsby")  # trained in the fusion's arm when the run has fewer than two adapters
STATS = ("train_seconds", "trainable_params", "delta_bytes", "added_params")


def fusable(method: str, options: dict | None = None) -> bool:
    """Whether compare method ``method`` trains an adapter a fusion reads (sequential, in every layer)."""
    from .methods.adapter_fusion import FUSABLE
    from .training.defaults import resolve

    try:
        cfg = resolve(method, options)[0]
    except UnipeftError:
        return False
    return (cfg.kind in FUSABLE and getattr(cfg, "style", "pfeiffer") in ("houlsby", "pfeiffer")
            and not getattr(cfg, "drop", 0) and cfg.layers is None)


def _saved(entry: str) -> tuple[Path, Path | None] | None:
    """(delta directory, run directory or None) for a saved adapter's path, or None when it is not one."""
    p = Path(entry)
    if (p / "delta.json").is_file():
        run = p.parent if (p.parent / "run.json").is_file() else None
        return p, run
    if (p / "run.json").is_file() and (p / "delta" / "delta.json").is_file():
        return p / "delta", p
    return None


def _saved_stats(delta: Path, run: Path | None) -> dict:
    import json

    stats = {"delta_bytes": sum(f.stat().st_size for f in delta.iterdir() if f.is_file())}
    results = run / "results.json" if run is not None else None
    if results is not None and results.is_file():
        got = json.loads(results.read_text())
        stats.update({k: got.get(k) for k in ("train_seconds", "trainable_params")})
    return stats


def plan(methods: list[str], method_options: dict, out: Path) -> tuple[list[str], list[dict], dict]:
    """(methods with the fusion after the rows it fuses, what it fuses, the fusion's method options).

    Each entry of what it fuses: ``name`` (the delta name the fusion reads), ``method``, ``source``
    ("row": another row of this run, "arm": trained in the fusion's arm, "saved": a directory),
    ``dir`` (the adapter's delta directory), and for "saved" its known ``stats``.
    """
    from .training.defaults import DEFAULTS

    options = dict(method_options.get(FUSION) or {})
    if "sources" in options:
        raise UnipeftError(f"{FUSION}: in compare, give saved adapters as adapters= entries (run or delta "
                           f"directories), not sources=")
    given = options.pop("adapters", None)
    runs = out / "runs"
    entries: list[dict] = []
    if given is not None:
        for entry in ([given] if isinstance(given, str) else list(given)):
            entry = str(entry)
            if entry in DEFAULTS:
                if not fusable(entry, method_options.get(entry) if entry in methods else None):
                    ok = [m for m in DEFAULTS if fusable(m)]
                    raise UnipeftError(f"{FUSION}: {entry!r} is not a sequential adapter in every layer, which a "
                                       f"fusion reads; adapter methods: {choices(ok)}")
                row = entry in methods
                entries.append({"name": entry, "method": entry, "source": "row" if row else "arm",
                                "dir": str((runs / entry if row else runs / FUSION / "stage_one" / entry) / "delta")})
                continue
            saved = _saved(entry)
            if saved is None:
                ok = [m for m in DEFAULTS if fusable(m)]
                raise UnipeftError(f"{FUSION}: adapters entry {entry!r} is neither an adapter method "
                                   f"({choices(ok)}) nor a saved adapter (a run or delta directory)")
            delta, run = saved
            entries.append({"name": _name_for(run or delta, entries), "method": None, "source": "saved",
                            "dir": str(delta), "stats": _saved_stats(delta, run)})
        if len(entries) < 2:
            raise UnipeftError(f"{FUSION}: adapters= names {len(entries)} adapter; a fusion needs two or more")
    else:
        for m in methods:
            if m != FUSION and fusable(m, method_options.get(m)):
                entries.append({"name": m, "method": m, "source": "row", "dir": str(runs / m / "delta")})
        for m in TOP_UP:
            if len(entries) >= 2:
                break
            if m not in (e["method"] for e in entries):
                entries.append({"name": m, "method": m, "source": "arm",
                                "dir": str(runs / FUSION / "stage_one" / m / "delta")})
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise UnipeftError(f"{FUSION}: an adapter is named twice in {names}")
    rows = [e["method"] for e in entries if e["source"] == "row"]
    order = [m for m in methods if m != FUSION]  # the fusion where it was named, or after its last row
    order.insert(max([methods.index(FUSION)] + [order.index(r) + 1 for r in rows]), FUSION)
    fused = {**options, "adapters": names, "sources": {e["name"]: e["dir"] for e in entries}}
    return order, entries, fused


def _name_for(path: Path, entries: list[dict]) -> str:
    """A delta name for a saved adapter, from its folder ('saved_<folder>'), unique among ``entries``."""
    base = "saved_" + (re.sub(r"[^A-Za-z0-9_-]+", "_", path.resolve().name) or "adapter")
    taken = {e["name"] for e in entries}
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def ready(entries: list[dict], records: list[dict]) -> tuple[list[dict], str | None]:
    """The entries with the stats of the rows they reuse, or (entries, why the fusion cannot run)."""
    by_method = {r["method"]: r for r in records}
    out, failed = [], []
    for e in entries:
        e = dict(e)
        if e["source"] == "row":
            rec = by_method.get(e["method"]) or {"error": "not run"}
            if rec.get("error"):
                failed.append(e["method"])
            e["stats"] = {k: rec.get(k) for k in STATS}
        out.append(e)
    if failed:
        return out, (f"{FUSION}: nothing to fuse: the adapter row(s) {choices(failed)} it would fuse failed "
                     f"(see their rows)")
    return out, None


def train_stage_one(spec: dict) -> list[dict]:
    """Train the adapters marked "arm" (inside the fusion's worker); every entry with its stats."""
    import gc

    from . import engine
    from .analysis.forgetting import changed_parameters
    from .training import run

    done = []
    for e in spec["fuse"]:
        e = dict(e)
        if e["source"] == "arm":
            from . import progress

            progress.note(f"{FUSION}: training {e['method']}, an adapter it fuses (stage one) ...")
            try:
                res = run.train(spec["model"], spec["task"], e["method"], out=str(Path(e["dir"]).parent),
                                data=spec.get("data"), evaluate_test=False, **spec.get("stage_one_settings", {}))
            except UnipeftError as err:
                raise UnipeftError(f"{FUSION}: training {e['method']}, an adapter it fuses, failed: {err}") from None
            model = res["_model"]
            added = changed_parameters(model, engine.active(model)[0])["added"]
            e["stats"] = {"train_seconds": res["train_seconds"], "trainable_params": res["trainable_params"],
                          "delta_bytes": res.get("delta_bytes"), "added_params": added}
            del res, model
            gc.collect()
        done.append(e)
    return done


def account(record: dict, entries: list[dict], model) -> dict:
    """Make the fusion's row count both stages; keeps the fusion stage's own numbers under ``stage_two``."""
    from .analysis.forgetting import changed_parameters

    for e in entries:  # the adapters' added parameters, as the fusion model holds them (frozen, switched off)
        if e["stats"].get("added_params") is None:
            e["stats"]["added_params"] = changed_parameters(model, e["name"])["added"]
    record["stage_two"] = {k: record.get(k) for k in ("train_seconds", "trainable_params", "delta_bytes")}
    record["fused"] = entries

    def total(key: str, own):
        known = [e["stats"].get(key) for e in entries if e["stats"].get(key) is not None]
        return None if own is None else own + sum(known)
    record["train_seconds"] = total("train_seconds", record["train_seconds"])
    record["trainable_params"] = total("trainable_params", record["trainable_params"])
    record["trainable_pct"] = 100 * record["trainable_params"] / max(1, record["base_params"])
    record["delta_bytes"] = total("delta_bytes", record.get("delta_bytes"))
    record["changed_params"] = total("added_params", record["changed_params"])
    record["changed_pct"] = 100 * record["changed_params"] / max(1, record["base_params"])
    where = {"row": "this run's row", "arm": "trained in this arm", "saved": "saved"}
    fused = ", ".join(f"{e['method'] or e['dir']} ({where[e['source']]})" for e in entries)
    unknown = [e["method"] or e["dir"] for e in entries if e["stats"].get("train_seconds") is None]
    two = record["stage_two"]
    record["note"] = (f"fuses {fused}; time, trainable parameters, delta files and added parameters count "
                      f"both stages (the fusion alone: {two['train_seconds']:.1f} s, {two['trainable_params']:,} "
                      f"trainable; throughput is the fusion stage's)"
                      + (f"; training time unknown for {', '.join(unknown)}, not counted" if unknown else ""))
    return record
