"""The S4 search: the design space (groupings, allocations, sizes at a budget) and `unipeft search` end to end."""
import json

import pytest
import yaml

import tiny
import unipeft as up
from unipeft.cli import main
from unipeft.search.space import SUBSETS, Design, Sizer, group_layers, weights


def test_groupings_split_the_blocks_into_consecutive_groups_of_the_pattern():
    assert group_layers("uniform", 12, 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    sizes = {p: [len(g) for g in group_layers(p, 12, 4)] for p in ("increasing", "decreasing", "spindle", "bottleneck")}
    assert sizes["increasing"] == sorted(sizes["increasing"]) and sizes["increasing"][0] < sizes["increasing"][-1]
    assert sizes["decreasing"] == sizes["increasing"][::-1]
    assert sizes["spindle"][0] < sizes["spindle"][1] and sizes["spindle"][-1] < sizes["spindle"][-2]
    assert sizes["bottleneck"][0] > sizes["bottleneck"][1] and sizes["bottleneck"][-1] > sizes["bottleneck"][-2]
    assert all(sum(s) == 12 for s in sizes.values())
    assert weights("spindle", 4) == [1, 2, 2, 1] and weights("bottleneck", 4) == [2, 1, 1, 2]
    assert len(SUBSETS) == 15
    with pytest.raises(up.UnipeftError, match="4 groups need at least 4 blocks; the model has 2"):
        group_layers("uniform", 2, 4)


def test_a_design_becomes_a_composition_near_its_budget_with_each_group_on_its_blocks():
    model = tiny.make("bert")
    n_base = sum(p.numel() for p in model.parameters())
    sizer = Sizer(model, budget=3000, groups=2)
    cfg, params = sizer.compose(Design("uniform", "uniform", (True, True), ("AL", "PB")))
    kinds = [(p.kind, p.layers) for p in cfg.methods]
    assert kinds == [("adapter", (0,)), ("lora", (0,)), ("bitfit", (1,)), ("prefix_tuning", (1,))]
    up.attach(model, cfg, name="t")
    rec = up.engine.registry(model).deltas["t"]
    head = sum(p.numel() for path in rec.head for p in rec.linear[path].parameters())
    assert up.engine.delta_parameter_count(model, rec) - head == params
    assert 0.7 * 3000 <= params <= 1.3 * 3000 and params < n_base
    assert set(up.deltas(model)) == {"t"}  # the sizing probes left nothing behind
    frozen, _ = sizer.compose(Design("uniform", "uniform", (False, True), ("AL", "L")))
    assert [p.layers for p in frozen.methods] == [(1,)]


def test_unipeft_search_runs_the_stages_resumes_and_writes_a_config_train_takes(tmp_path, capsys):
    root = tmp_path
    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(48)]
    model = tiny.save(root / "bert", "bert", "cls")
    model_dir = tiny.save(root / "bert4", "bert", "cls")
    import transformers as tf
    cfg = tf.AutoConfig.from_pretrained(model_dir)
    cfg.num_hidden_layers = 4  # four blocks: one per group
    tf.BertForSequenceClassification._from_config(cfg).save_pretrained(model_dir)
    train = tiny.write_csv(root / "train.csv", ["text", "label"], rows[:40])
    dev = tiny.write_csv(root / "dev.csv", ["text", "label"], rows[40:])
    args = ["search", "--model", model_dir, "--task", "sent", "--train", train, "--dev", dev, "--out",
            str(root / "s4"), "--budget", "0.02", "--groups", "2", "--runs", "6", "--max-steps", "1",
            "--batch-size", "8", "--precision", "fp32", "--threads", "1", "--json"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for stage in ("S1 grouping pattern", "S2 parameter allocation", "S3 tunable groups", "S4 strategies of group G1"):
        assert stage in out
    result = json.loads(out.strip().splitlines()[-1])
    runs = (root / "s4" / "runs.jsonl").read_text().splitlines()
    assert result["runs"] == len(runs) >= 6
    # a second start reuses every finished run (a killed search resumes)
    assert main(args) == 0
    assert "(from runs.jsonl)" in capsys.readouterr().out
    assert (root / "s4" / "runs.jsonl").read_text().splitlines() == runs
    best = yaml.safe_load((root / "s4" / "best.yaml").read_text())
    assert best["method"] == "compose" and best["method_option"][0]["methods"] == result["config"]["methods"]
    assert main(["train", "--config", str(root / "s4" / "best.yaml"), "--train", train, "--dev", dev,
                 "--out", str(root / "run"), "--max-steps", "1", "--batch-size", "8", "--precision", "fp32",
                 "--threads", "1", "--json"]) == 0
    del model


def test_a_design_key_reads_back_and_bad_keys_get_one_line_errors():
    d = Design("spindle", "uniform", (True, False, True, True), ("AL", "P", "APB", "PBL"))
    back = Design.from_key(d.key())
    assert back.key() == "spindle/uniform/AL,-,APB,PBL" and back.tuned == d.tuned
    for key, message in (("spindle/uniform", "expected grouping/allocation"),
                         ("round/uniform/A", "unknown grouping 'round'; valid:"),
                         ("spindle/even/A", "unknown allocation 'even'; valid:"),
                         ("spindle/uniform/A,LA", "group 'LA' is not a set of")):
        with pytest.raises(up.UnipeftError, match=message):
            Design.from_key(key)
