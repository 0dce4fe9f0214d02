"""`unipeft search`: the S4 search, greedy stage by stage, with short training runs (Chen et al. 2023).

    S1 grouping:    for each of the 5 patterns, k random designs (uniform allocation, every group
                    tuned, a random strategy subset per group); keep the pattern with the best mean
    S2 allocation:  for each of the 3 patterns, k random designs on that grouping; keep the best mean
    S3 tunable:     every group tuned, or one group frozen (G + 1 candidates, strategies random)
    S4 strategies:  group by group, G1 first: candidate subsets of {A, P, B, L} for that group, the
                    other groups at the best design so far; keep the best

Scores are the dev split's main metric after a short run (``max_steps``); the ``runs`` option
splits a total number of runs over the stages (30%, 20%, 15%, 35%), so the search fits a CPU.
Every finished run is appended to ``<out>/runs.jsonl`` (its design, its composition, its score);
a search started again with the same options and seed draws the same candidates and reuses
those scores, so a killed search resumes where it stopped. The winner is written as
``<out>/best.yaml``, a config ``unipeft train --config`` takes, and ``<out>/search.json``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .. import fileio, progress
from ..errors import UnipeftError
from .space import ALLOCATIONS, GROUPINGS, SUBSETS, Design, Sizer

STAGE_SHARES = (0.30, 0.20, 0.15, 0.35)
LOWER_IS_BETTER = ("loss", "perplexity", "mse", "rmse", "mae")


def search(model: str = "minilm", task: str = "sst2", *, out, budget: float = 0.005, groups: int = 4,
           runs: int = 40, seed: int = 0, data: dict | None = None, say=print, **settings) -> dict:
    """Run the search; returns {"best": design key, "score", "config": the winning Compose's options, ...}."""
    from ..training.run import load_model
    from ..training import data as data_mod

    if not 0 < budget < 1:
        raise UnipeftError(f"search: budget is a fraction of the base model's parameters (0 < budget < 1), "
                           f"got {budget}")
    if runs < 4:
        raise UnipeftError(f"search: runs must be at least 4 (one per stage), got {runs}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = data_mod.load_task(task, seed=seed, **(data or {}))
    base, _ = load_model(model, dataset.task)
    n_base = sum(p.numel() for p in base.parameters())
    sizer = Sizer(base, int(budget * n_base), groups)
    metric = dataset.task.main_metric
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    log = out / "runs.jsonl"
    done = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a killed search was writing: that run is done again
            done[rec["design"]] = rec
    rng = random.Random(seed)
    per_stage = [max(1, int(runs * s)) for s in STAGE_SHARES]

    def score(design: Design) -> float:
        key = design.key()
        if key in done:
            say(f"  {key:48s} {metric} {done[key]['score']:.4f}  (from {log.name})")
            return sign * done[key]["score"]
        cfg, params = sizer.compose(design)
        options = cfg.to_dict()
        from ..training.run import train

        res = train(model, task, "compose", method_options={"methods": options["methods"]}, data=data,
                    seed=seed, **settings)
        value = float(res["dev"][metric])
        rec = {"design": key, "score": value, "params": params, "methods": options["methods"]}
        with open(log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        done[key] = rec
        say(f"  {key:48s} {metric} {value:.4f}  ({params:,} parameters)")
        return sign * value

    def random_design(grouping, allocation, tuned=None) -> Design:
        strategies = tuple(rng.choice(SUBSETS) for _ in range(groups))
        return Design(grouping, allocation, tuned or (True,) * groups, strategies)

    def best_mean(stage: str, options, make, k: int):
        say(f"{stage}:")
        means = {}
        for opt in options:
            scores = [score(make(opt)) for _ in range(k)]
            means[opt] = sum(scores) / len(scores)
            say(f"  -> {opt}: mean {sign * means[opt]:.4f}")
        best = max(means, key=means.get)
        say(f"  chosen: {best}")
        return best

    k1 = max(1, per_stage[0] // len(GROUPINGS))
    grouping = best_mean("S1 grouping pattern", GROUPINGS, lambda g: random_design(g, "uniform"), k1)
    k2 = max(1, per_stage[1] // len(ALLOCATIONS))
    allocation = best_mean("S2 parameter allocation", ALLOCATIONS, lambda a: random_design(grouping, a), k2)
    frozen_options = [None] + list(range(groups))
    k3 = max(1, per_stage[2] // len(frozen_options))
    frozen = best_mean("S3 tunable groups (None: all tuned, i: group i frozen)", frozen_options,
                       lambda f: random_design(grouping, allocation,
                                               tuple(i != f for i in range(groups))), k3)
    tuned = tuple(i != frozen for i in range(groups))
    current = random_design(grouping, allocation, tuned)
    best_score = score(current)
    per_group = max(1, per_stage[3] // max(1, sum(tuned)))
    for g in (i for i in range(groups) if tuned[i]):
        say(f"S4 strategies of group G{g + 1} (others: {current.key()}):")
        for subset in rng.sample(SUBSETS, min(per_group, len(SUBSETS))):
            strategies = tuple(subset if i == g else s for i, s in enumerate(current.strategies))
            cand = Design(grouping, allocation, tuned, strategies)
            value = score(cand)
            if value > best_score:
                current, best_score = cand, value
        say(f"  chosen: {current.strategies[g]}")
    cfg, params = sizer.compose(current)
    options = cfg.to_dict()
    result = {"best": current.key(), "score": sign * best_score, "metric": metric, "params": params,
              "budget": sizer.budget, "base_params": n_base, "config": options, "runs": len(done)}
    fileio.write_json(out / "search.json", result, indent=2)
    _write_yaml(out / "best.yaml", model, task, options)
    progress.note(f"best: {current.key()} {metric} {sign * best_score:.4f} with {params:,} parameters; "
                  f"train it: unipeft train --config {out / 'best.yaml'}", True)
    return result


def _write_yaml(path: Path, model: str, task: str, options: dict) -> None:
    import yaml

    doc = {"model": model, "task": task, "method": "compose", "method_option": [{"methods": options["methods"]}]}
    text = "# the S4 search's winning composition (unipeft search)\n" + yaml.safe_dump(doc, sort_keys=False)
    fileio.write_text(path, text)
