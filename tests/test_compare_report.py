"""The compare report: files, valid PNGs, JSON round trip and the formatted table cells."""
import json

import pytest

from unipeft.compare_report import human_bytes, human_count, markdown_table, percent, ratio, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _method(**kw):
    m = {
        "method": "lora", "label": "LoRA r=8", "type": "reparameterization", "mergeable": True,
        "config": {"r": 8, "alpha": 16}, "lr": 5e-4,
        "trainable_params": 1_200_000, "trainable_pct": 0.95, "delta_bytes": 299 * 1024,
        "train_seconds": 42.0, "examples_per_s": 12.3, "tokens_per_s": 1500.0, "steps": 100,
        "peak_memory_mb": 812.4, "memory_kind": "rss",
        "latency_ms": {"base": 10.0, "unmerged": 12.0, "merged": 10.3},
        "metrics": {"accuracy": 0.912, "f1": 0.9}, "metric_before": 0.5, "error": None,
    }
    m.update(kw)
    return m


@pytest.fixture
def report():
    return {
        "model": "tiny-bert", "task": "sst2", "main_metric": "accuracy", "device": "cpu", "threads": 2,
        "budget": {"steps": 100, "batch_size": 8, "max_length": 64, "train_examples": 800, "dev_examples": 200},
        "base_params": 126_000_000, "unipeft_version": "0.1.0", "created": "2024-01-01T00:00:00",
        "methods": [
            _method(),
            _method(method="prefix", label="Prefix tuning", type="additive", mergeable=False,
                    trainable_params=22_700_000, trainable_pct=18.0, delta_bytes=int(87.3 * 1024 ** 2),
                    latency_ms={"base": 10.0, "unmerged": 11.0, "merged": None},
                    metrics={"accuracy": 0.85, "f1": 0.84}, metric_before=None),
            _method(method="ia3", label="IA3", type="additive", error="out of memory | while training",
                    metrics={}, trainable_params=None),
        ],
    }


def test_formatting_helpers():
    assert human_count(1_200_000) == "1.2M"
    assert human_count(22_700_000) == "22.7M"
    assert human_count(512) == "512"
    assert human_bytes(299 * 1024) == "299 KB"
    assert human_bytes(87.3 * 1024 ** 2) == "87.3 MB"
    assert human_bytes(100) == "100 B"
    assert ratio(10.3, 10.0) == "1.03x"
    assert ratio(None, 10.0) == "—" and ratio(1.0, 0) == "—"
    assert percent(0.95) == "0.95%" and percent(18.0) == "18.0%" and percent(0.042) == "0.042%"


def test_markdown_table_cells(report):
    table = markdown_table(report)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 3
    assert "accuracy" in lines[0] and "Latency merged" in lines[0]
    lora, prefix, failed = lines[2:]
    assert "LoRA r=8" in lora and "1.2M (0.95%)" in lora and "299 KB" in lora
    assert "1.20x" in lora and "1.03x" in lora and "812 (RSS)" in lora
    assert "0.912 (from 0.500)" in lora and "f1 0.900" in lora and "42.0 s, 12.3 ex/s" in lora
    cells = [c.strip() for c in prefix.strip("|").split(" | ")]
    assert cells[6] == "1.10x" and cells[7] == "—"  # not mergeable: no merged latency
    assert "22.7M (18.0%)" in prefix and "87.3 MB" in prefix
    assert "failed: out of memory \\| while training" in failed  # the pipe cannot break the table
    assert failed.count(" | ") == lines[0].count(" | ")


def test_write_report_files(report, tmp_path):
    paths = write_report(report, tmp_path / "out")
    assert set(paths) == {"md", "json", "plots"}
    assert paths["md"].name == "report.md" and paths["json"].name == "report.json"
    assert json.loads(paths["json"].read_text()) == report
    md = paths["md"].read_text()
    assert md.startswith("# ") and "tiny-bert" in md and "2 threads" in md and "steps 100" in md
    assert markdown_table(report) in md and "How to read this" in md
    assert [p.name for p in paths["plots"]] == ["metric_vs_params.png", "cost.png"]
    for p in paths["plots"]:
        assert p.read_bytes()[:8] == PNG_MAGIC
    leftovers = [p.name for p in (tmp_path / "out").iterdir()]
    assert sorted(leftovers) == ["cost.png", "metric_vs_params.png", "report.json", "report.md"]  # no temp files


def test_all_failed_writes_no_plots(report, tmp_path):
    report["methods"] = [report["methods"][2]]
    paths = write_report(report, tmp_path)
    assert paths["plots"] == []
    assert "failed: out of memory" in paths["md"].read_text()


def test_undertrained_methods_are_named_not_ranked(report, tmp_path):
    """A method the budget left at the majority label's accuracy gets 'too few steps' in its cell
    and a note that says why, not a bare number a reader would take as the method's quality."""
    from types import SimpleNamespace

    from unipeft.compare_report import notes
    from unipeft.comparison import flag_undertrained, majority_baseline

    task = SimpleNamespace(kind="classification", main_metric="accuracy", labels=("neg", "pos"))
    dev = [{"target": 1}] * 120 + [{"target": 0}] * 80
    base = majority_baseline(SimpleNamespace(task=task, splits={"dev": dev}))
    assert base["label"] == "pos" and base["accuracy"] == 0.6 and base["examples"] == 200
    assert abs(base["margin"] - 2 * (0.6 * 0.4 / 200) ** 0.5) < 1e-12
    stuck, fine = _method(metrics={"accuracy": 0.62}, steps=40), _method(metrics={"accuracy": 0.75})
    for rec in (stuck, fine):
        flag_undertrained(rec, base)
    assert stuck["undertrained"] and "'pos'" in stuck["note"] and "40 steps" in stuck["note"]
    assert "undertrained" not in fine and "note" not in fine
    report["methods"] = [stuck, fine]
    table = markdown_table(report)
    assert "too few steps (0.620)" in table and "too few steps" not in table.splitlines()[-1]
    assert "no better than always answering 'pos'" in notes(report)
    # tasks without a majority label (regression, generation) or with another main metric: no baseline
    reg = SimpleNamespace(task=SimpleNamespace(kind="regression", main_metric="pearson", labels=None),
                          splits={"dev": [{"target": 0.5}]})
    assert majority_baseline(reg) is None
    rec = _method(metrics={"accuracy": 0.1})
    flag_undertrained(rec, None)
    assert "undertrained" not in rec


def test_plots_with_many_methods(report, tmp_path):
    """The main job's 27 methods: numbered points with a key, one bar row per method."""
    from unipeft.compare_report import plot_cost, plot_metric_vs_params

    import struct

    def size(path):  # a PNG's width and height, from its IHDR chunk
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC
        return struct.unpack(">II", data[16:24])

    few = dict(report, methods=[_method(label=f"method {i}", metrics={"accuracy": i / 30}) for i in range(3)])
    many = dict(report, methods=[_method(label=f"method {i}", metrics={"accuracy": i / 30}) for i in range(27)])
    (w3, h3), (w27, h27) = (size(plot_metric_vs_params(r, tmp_path / f"m{len(r['methods'])}.png")) for r in (few, many))
    assert w27 > w3 * 1.2  # the key beside the axes
    (_, c3), (_, c27) = (size(plot_cost(r, tmp_path / f"c{len(r['methods'])}.png")) for r in (few, many))
    assert c27 > 3 * c3  # a row per method, not 27 labels squeezed under a fixed-width axis
