"""AdapterDrop, P-tuning v1/v2, PASTA, MAM, UniPELT, AdaMix, compositions and AdapterFusion through
`unipeft train` and `unipeft compare` (tiny BERT)."""
from __future__ import annotations

import json

import pytest

import tiny
from unipeft.cli import main

METHODS = ("adapter_drop", "p_tuning", "p_tuning_v2", "pasta", "mam", "unipelt", "adamix")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(80)]
    return {"model": tiny.save(root / "bert", "bert", "cls"),
            "train": tiny.write_csv(root / "train.csv", ["text", "label"], rows[:64]),
            "dev": tiny.write_csv(root / "dev.csv", ["text", "label"], rows[64:])}


def common(s, out):
    return ["--model", s["model"], "--task", "sent", "--train", s["train"], "--dev", s["dev"], "--out", str(out),
            "--precision", "fp32", "--threads", "1", "--batch-size", "8"]


def test_compare_runs_every_new_method_and_reports_its_latency(setup, tmp_path, capsys):
    out = tmp_path / "cmp"
    # tiny BERT has 2 layers: AdapterDrop's default (the lowest 2 of MiniLM's 6) would leave none
    assert main(["compare", *common(setup, out), "--methods", ",".join(METHODS), "--max-steps", "2",
                 "--method-option", "adapter_drop.drop=1", "--in-process"]) == 0
    report = json.loads((out / "report.json").read_text())
    got = {m["method"]: m for m in report["methods"]}
    assert set(got) == set(METHODS)
    for m in got.values():
        assert m["trainable_params"] > 0 and m["delta_bytes"] > 0 and m["latency_ms"]["unmerged"] > 0
        assert 0 <= m["metrics"]["accuracy"] <= 1


def test_train_a_robust_adapter_drop_and_predict(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *common(setup, out), "--method", "adapter_drop", "--method-option", "drop=1",
                 "--method-option", "drop_robust=true", "--max-steps", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["steps"] == 3
    assert main(["eval", str(out), "--json"]) == 0


def test_a_composition_declared_in_the_yaml_config_trains_and_compares(setup, tmp_path, capsys):
    config = tmp_path / "compose.yaml"
    config.write_text("method: compose\n"
                      "method_option:\n"
                      "  - methods:\n"
                      "      - {kind: lora, options: {r: 2, layers: '0'}}\n"
                      "      - {kind: adapter, options: {style: scaled_parallel, bottleneck: 4, layers: '1'}}\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), *common(setup, out), "--max-steps", "2", "--lr", "1e-3",
                 "--json"]) == 0
    capsys.readouterr()
    meta = json.loads((out / "delta" / "delta.json").read_text()) if (out / "delta").exists() else \
        json.loads(next(out.rglob("delta.json")).read_text())
    parts = meta["method"]["options"]["methods"]
    assert meta["method"]["kind"] == "compose" and [p["kind"] for p in parts] == ["lora", "adapter"]
    assert [p["options"]["layers"] for p in parts] == [[0], [1]]
    cmp_config = tmp_path / "cmp.yaml"
    cmp_config.write_text("methods: compose,lora\n"
                          "method_option:\n"
                          "  - compose.methods: [{kind: prefix_tuning, options: {length: 2}}, {kind: ia3}]\n")
    assert main(["compare", "--config", str(cmp_config), *common(setup, tmp_path / "cmp"), "--max-steps", "2",
                 "--in-process"]) == 0
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert [m["method"] for m in report["methods"]] == ["compose", "lora"]


def test_adapter_fusion_trains_from_the_saved_adapters_of_earlier_runs(setup, tmp_path, capsys):
    dirs = []
    for task in ("sent", "sent2"):  # two adapter runs (the delta is named after the task)
        out = tmp_path / task
        args = common(setup, out)
        args[args.index("--task") + 1] = task
        assert main(["train", *args, "--method", "adapter", "--max-steps", "2", "--json"]) == 0
        dirs.append(str(out / "delta"))
    capsys.readouterr()
    out = tmp_path / "fusion"
    args = common(setup, out)
    args[args.index("--task") + 1] = "fused"  # the fusion's own delta name: not an adapter's
    assert main(["train", *args, "--method", "adapter_fusion", "--method-option",
                 f"adapters={','.join(dirs)}", "--lr", "5e-4", "--max-steps", "2", "--json"]) == 0
    meta = json.loads((out / "delta" / "delta.json").read_text())
    assert meta["method"]["options"]["adapters"] == ["sent", "sent2"]
    assert meta["method"]["options"]["sources"] == {"sent": dirs[0], "sent2": dirs[1]}
    assert main(["eval", str(out), "--json"]) == 0  # the run reloads the fusion and, through it, the adapters
