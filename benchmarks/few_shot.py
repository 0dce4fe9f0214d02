"""Few-shot table in the shape of the notes' PET table (seed 004): accuracy against the number of labels |T|.

    python benchmarks/few_shot.py --task sst2 --data-dir ../shared/data/glue/SST-2 --out results/few_shot_sst2.json
    python benchmarks/few_shot.py --task bbc --out results/few_shot_bbc.json
    python benchmarks/few_shot.py --tiny            # smoke run: tiny random GPT-2, synthetic sentences (< 1 min)

Every finished cell is written to --out at once, and a rerun with the same settings keeps it: a killed
run resumes (and PET's and iPET's units, kept under <out>.work/, resume inside a cell; iPET
reuses PET's generation-0 deltas). Rows can run in two processes (``--rows pet --out a.json`` and ``--rows ipet --out
b.json``), then ``--out a.json --cells-from b.json`` (all rows) prints and writes the whole table.

Rows (SmolLM2-135M unless --model): zero-shot (template + verbalizer, contextual calibration),
ICL (k = min(|T|, --shots) demonstrations from the |T| labelled examples, seeded, balanced,
calibrated), supervised head (LoRA + a new classification head, `unipeft train`), prompt-based
fine-tuning (LoRA, `--head verbalizer`), PET and iPET (`unipeft pet`: LoRA per pattern, |D| unlabelled
texts from the rest of train). Columns |T| = --sizes (default 0, 10, 50, 100, 1000; the rows that
train need |T| > 0). Each cell: dev accuracy, mean ± std over --seeds (the labelled set, the
demonstrations and the initialisation change with the seed), and the row's wall time per run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

import unipeft as up  # noqa: E402
from unipeft.prompting import icl, pet  # noqa: E402
from unipeft.prompting.head import PromptHead  # noqa: E402

# task -> (patterns: [(template, verbalizer)], description)
PROMPTS = {
    "sst2": ([("{text} It was {label}.", "positive=great|good,negative=terrible|bad"),
              ("Review: {text}\nSentiment: {label}", "positive=positive,negative=negative")],
             "Classify the sentiment of each movie review."),
    "bbc": ([("{text}\nTopic: {label}", "business=business,entertainment=entertainment,politics=politics,"
                                        "sports=sport,tech=technology"),
             ("News: {text}\nThis article is about {label}", "business=business|economy,entertainment=film|music,"
                                                             "politics=politics,sports=sport,tech=technology")],
            "Classify each BBC News article by its topic."),
    "tiny": ([("{text} . it was {label} .", "pos=good|very nice,neg=bad"),
              ("{text} . {label} movie .", "pos=great,neg=awful")], ""),
}
ROWS = ("zero-shot", "icl", "head-lora", "prompt-ft", "pet", "ipet")


def cell(row: str, size: int, seed: int, args, model: str, task: str, data: dict, lm) -> float:
    patterns, description = PROMPTS[args.prompts]
    template, verbalizer = patterns[0]
    labelled = {**data, "train_size": size} if size else data
    if row in ("pet", "ipet") and args.work:
        # PET and iPET of one (size, seed) share a folder: iPET starts from PET's generation-0 deltas
        # (pet.run reuses a unit only when its fingerprint matches, so nothing stale is ever merged)
        return _cell(row, size, seed, args, model, task, data, lm, Path(args.work) / f"pet-n{size}-s{seed}",
                     template, verbalizer, patterns, description, labelled)
    with tempfile.TemporaryDirectory(prefix=f"few_shot_{row}_") as work:
        return _cell(row, size, seed, args, model, task, data, lm, Path(work), template, verbalizer, patterns,
                     description, labelled)


def _cell(row, size, seed, args, model, task, data, lm, work, template, verbalizer, patterns, description,
          labelled) -> float:
    if row in ("zero-shot", "icl"):
        r = icl.run(model, task, shots=0 if row == "zero-shot" else min(size, args.shots), template=template,
                    verbalizer=verbalizer, description=description, seed=seed, balanced=True, calibrate=True,
                    data=labelled, limit=args.dev_limit, max_text_tokens=args.max_text_tokens, lm=lm,
                    batch_size=args.batch_size)
        return r["accuracy"]
    settings = dict(max_steps=args.steps, batch_size=min(args.train_batch, size), seed=seed, progress=False,
                    max_length=args.max_length, eval_max_examples=args.dev_limit, eval_every=0)
    if row == "head-lora":
        r = up.train(model=model, task=task, method="lora", data=labelled, out=work, evaluate_test=False, **settings)
        return r["dev"]["accuracy"]
    if row == "prompt-ft":
        r = up.train(model=model, task=task, method="lora", data=labelled, out=work, evaluate_test=False,
                     head=PromptHead.build(template, verbalizer), **settings)
        return r["dev"]["accuracy"]
    cfg = pet.PETConfig(method="lora", steps=args.steps, final_steps=args.final_steps, seed=seed,
                        batch_size=min(args.train_batch, size), max_length=args.max_length,
                        generations=args.ipet_generations if row == "ipet" else 0)
    r = pet.run(model, task, patterns, cfg, out=work, data=data, train_size=size, unlabelled_size=args.unlabelled,
                dev_limit=args.dev_limit)
    return r["dev"]["accuracy"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sst2", choices=("sst2", "bbc"))
    ap.add_argument("--data-dir", default="../shared/data/glue/SST-2", help="SST-2 folder (bbc: not needed)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sizes", default="0,10,50,100,1000")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--shots", type=int, default=4, help="most ICL demonstrations")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps of every trained model")
    ap.add_argument("--final-steps", type=int, default=200, help="PET's distilled classifier")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8, help="ICL examples per forward pass")
    ap.add_argument("--unlabelled", type=int, default=1000, help="PET's |D|")
    ap.add_argument("--ipet-generations", type=int, default=2)
    ap.add_argument("--dev-limit", type=int, help="first N dev examples")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--max-text-tokens", type=int, default=None, help="ICL: cut texts (BBC articles) to N tokens")
    ap.add_argument("--tiny", action="store_true", help="smoke run on a tiny random GPT-2 and synthetic data")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--out", help="JSON results, rewritten after every cell; a rerun with the same settings "
                                  "keeps the cells it holds (a killed run resumes)")
    ap.add_argument("--work", help="PET/iPET folders, kept and shared by the two rows (default: <out>.work "
                                   "with --out, else temporary)")
    ap.add_argument("--cells-from", action="append", default=[], metavar="JSON",
                    help="also keep the finished cells of another run's --out with the same settings (repeatable): "
                         "rows split over two processes, each with its own --out, then one table")
    args = ap.parse_args(argv)
    args.prompts = args.task
    if args.work is None and args.out:
        args.work = str(Path(args.out).with_suffix("")) + ".work"
    missing = [f for f in args.cells_from if not Path(f).is_file()]
    if missing:
        ap.error(f"--cells-from {missing[0]}: no such file")
    from unipeft.training.cli import setup_runtime

    setup_runtime(threads=args.threads, quiet=True)  # one JSON line per cell and the table; no loading reports
    sizes, seeds, rows = ([int(x) for x in args.sizes.split(",")], [int(x) for x in args.seeds.split(",")],
                          args.rows.split(","))
    if args.tiny:
        import tiny

        root = Path(tempfile.mkdtemp(prefix="few_shot_tiny_"))
        model = tiny.save(root / "gpt2", "gpt2", "lm", dropout=False)
        rows_ = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(160)]
        data = {"train": tiny.write_csv(root / "train.csv", ["text", "label"], rows_[:120]),
                "dev": tiny.write_csv(root / "dev.csv", ["text", "label"], rows_[120:])}
        task, args.prompts = "sent", "tiny"
    else:
        model, task = args.model, args.task
        data = {"data_dir": args.data_dir} if task == "sst2" else {}
    lm = icl.load_lm(model)
    results = {"model": model, "task": task, "sizes": sizes, "seeds": seeds, "settings": vars(args), "cells": []}
    done, runs = {}, {}
    for path in ([args.out] if args.out else []) + args.cells_from:
        cells_, runs_ = _finished(path, results)
        done.update(cells_)
        runs.update(runs_)
    results["runs"] = list(runs.values())
    resumed = set(runs)
    for row in rows:
        for size in sizes:
            if (row == "zero-shot") != (size == 0):
                continue  # zero-shot is the |T| = 0 column; every other row needs labels
            if (row, size) in done:
                results["cells"].append(done[(row, size)])
                print(json.dumps({**done[(row, size)], "resumed": True}), flush=True)
                continue
            accs, secs, reused = [], [], []
            for seed in (seeds[:1] if row == "zero-shot" else seeds):  # zero-shot has nothing to draw
                run = runs.get((row, size, seed))
                if run is None:  # a run is a seed of a cell: each is saved, so a killed cell resumes at its seed
                    # iPET starts from PET's generation 0 when PET ran here before
                    after_pet = row == "ipet" and bool(args.work) and (
                        Path(args.work) / f"pet-n{size}-s{seed}" / "gen0").is_dir()
                    t0 = time.perf_counter()
                    acc = cell(row, size, seed, args, model, task, data, lm)
                    run = {"row": row, "size": size, "seed": seed, "accuracy": acc,
                           "seconds": time.perf_counter() - t0, "after_pet": after_pet,
                           "cpu": torch.backends.cpu.get_cpu_capability()}  # AVX2 and AVX512 round differently
                    if row in ("pet", "ipet") and args.work:
                        pet_results = Path(args.work) / f"pet-n{size}-s{seed}" / "results.json"
                        _add_reused_unit_seconds(run, pet_results)
                        if row == "ipet":
                            _add_pet_share(run, pet_results)
                    runs[(row, size, seed)] = run
                    results["runs"] = list(runs.values())
                    if args.out:
                        _save(args.out, results)
                # a cell is up to three runs of minutes each: a line per run on stderr shows it moving
                print(f"{row} |T|={size} seed {seed}: {run['accuracy']:.3f} in {run['seconds']:.0f} s"
                      f"{' (resumed)' if (row, size, seed) in resumed else ''}", file=sys.stderr, flush=True)
                accs.append(run["accuracy"])
                if not run.get("seconds_partial"):  # iPET: its time beyond PET's, whether PET ran first or not
                    secs.append(run["seconds"] - run.get("pet_seconds", 0.0))
                reused.append(run["after_pet"] or "pet_seconds" in run)
            rec = {"row": row, "size": size, "accuracy": accs, "mean": statistics.mean(accs),
                   "std": statistics.pstdev(accs), "runs_timed": len(secs),
                   "seconds_per_run": statistics.mean(secs) if secs else None,
                   "cpu": sorted({r["cpu"] for k, r in runs.items() if k[:2] == (row, size)})}
            if any(reused):
                rec["after_pet_runs"] = sum(reused)  # runs whose time leaves out PET's generation 0
            results["cells"].append(rec)
            print(json.dumps(rec), flush=True)
            if args.out:
                _save(args.out, results)
    print(table(results))
    if args.out:
        _save(args.out, results)
    return results


# Settings that change a cell's numbers; the others (rows, sizes, seeds lists, out, threads, cells_from, work)
# only choose which cells run, so a rerun that adds rows or sizes keeps the finished ones.
_CELL_SETTINGS = ("tiny", "task", "data_dir", "model", "shots", "steps", "final_steps", "train_batch", "unlabelled",
                  "ipet_generations", "dev_limit", "max_length", "max_text_tokens")


def _finished(out: str, results: dict) -> tuple[dict, dict]:
    """The cells, and the single-seed runs, of an earlier run written to ``out`` with the same cell settings
    and seeds (runs: those of cells it did not finish too, so a killed cell resumes at its next seed)."""
    path = Path(out)
    if not path.exists():
        return {}, {}
    old = json.loads(path.read_text())
    same = all(old["settings"].get(k) == results["settings"].get(k) for k in _CELL_SETTINGS)
    # the seeds as a set: --seeds 1,2,0 resumes a table of seeds 0,1,2 in another order (a cell's mean is the same)
    if not same or sorted(old.get("seeds", [])) != sorted(results["seeds"]):
        raise SystemExit(f"{out} holds a run with other settings or seeds; give another --out or delete it")
    runs = {(r["row"], r["size"], r["seed"]): r for r in old.get("runs", [])}
    return {(c["row"], c["size"]): c for c in old["cells"]}, runs


def _add_reused_unit_seconds(run: dict, pet_results: Path) -> None:
    """A PET or iPET run that resumed from saved units costs this call plus what those units took when they
    were trained (their ``done.json``); iPET's time leaves out PET's generation 0 (and its ensemble weights)
    when it came after PET.
    Units saved without their time make the run's time partial: the table's mean leaves it out."""
    res = json.loads(pet_results.read_text())
    needed = [u for u in res["reused"] if not (run["after_pet"] and (u == "weights" or u.startswith("gen0/")))]
    unit_seconds = [res.get("unit_seconds", {}).get(u) for u in needed]
    if None in unit_seconds:
        run["seconds_partial"] = True
    else:
        run["seconds"] += sum(unit_seconds)


def _save(out: str, results: dict) -> None:
    from unipeft import fileio

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fileio.write_text(Path(out), json.dumps(results, indent=1))


def _partly_timed(cell: dict) -> bool:
    """Whether the cell's time leaves out some of its runs (resumed from units saved without their time)."""
    return cell.get("runs_timed", len(cell["accuracy"])) < len(cell["accuracy"])


def _add_pet_share(run: dict, pet_results: Path) -> None:
    """What PET's share of an iPET run (its generation-0 units and the ensemble weights) added to the run's time:
    the units it trained, and those it reused when it did not start after PET (their time was added). The row's
    time is then the same thing in every run: iPET's time beyond PET's."""
    res = json.loads(pet_results.read_text())
    counted = res["trained"] + ([] if run["after_pet"] else res["reused"])
    share = [res.get("unit_seconds", {}).get(u) for u in counted if u == "weights" or u.startswith("gen0/")]
    if None in share:
        run["seconds_partial"] = True
    elif share:
        run["pet_seconds"] = sum(share)


def table(results: dict) -> str:
    sizes = results["sizes"]
    head = "| row | " + " | ".join(f"|T| = {s}" for s in sizes) + " | s / run |\n|---|" + "---|" * (len(sizes) + 1)
    lines = [head]
    for row in dict.fromkeys(c["row"] for c in results["cells"]):
        cells = {c["size"]: c for c in results["cells"] if c["row"] == row}
        vals = [f"{100 * cells[s]['mean']:.1f} ± {100 * cells[s]['std']:.1f}" if s in cells else "" for s in sizes]
        timed = [c["seconds_per_run"] for c in cells.values() if c.get("seconds_per_run") is not None]
        secs = f"{statistics.mean(timed):.1f}" if timed else "?"
        after = any(c.get("after_pet_runs") for c in cells.values())
        some = any(map(_partly_timed, cells.values()))
        lines.append(f"| {row} | " + " | ".join(vals) + f" | {secs}{' + PET' if after else ''}{' *' if some else ''} |")
    if any(c.get("after_pet_runs") for c in results["cells"]):
        lines.append("\n+ PET: iPET's time beyond PET's generation 0 (the PET row's deltas, or its own share left out).")
    if any(map(_partly_timed, results["cells"])):
        lines.append("\n* the mean leaves out runs resumed from units saved without their wall time.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
