"""AdapterFusion in ``unipeft compare``: it fuses the adapters the same run trains (or trains them in
its arm, or reads saved ones), and its row counts both stages (``unipeft.compare_fusion``)."""
import json

import pytest

import tiny
import unipeft as up
from unipeft.comparison import compare


@pytest.fixture
def setup(tmp_path):
    folder = tiny.save(tmp_path / "bert", "bert", "cls")
    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(40)]
    data = {"train": tiny.write_csv(tmp_path / "train.csv", ["text", "label"], rows[:32]),
            "dev": tiny.write_csv(tmp_path / "dev.csv", ["text", "label"], rows[32:])}

    def run(methods, out="cmp", options=None):
        return compare(str(folder), "sent", methods, out=tmp_path / out, data=data, method_options=options,
                       in_process=True, quiet=True, max_steps=2, batch_size=8, precision="fp32")
    return run, tmp_path


def rows(report):
    return {m["method"]: m for m in report["methods"]}


def test_the_fusion_fuses_the_runs_adapter_rows_after_them_and_counts_both_stages(setup):
    run, tmp = setup
    report = run(["adapter_fusion", "adapter", "compacter"])  # named first: it runs after the rows it fuses
    assert [m["method"] for m in report["methods"]] == ["adapter", "compacter", "adapter_fusion"]
    got = rows(report)
    fusion = got["adapter_fusion"]
    assert not fusion["error"], fusion["error"]
    assert [(e["name"], e["source"]) for e in fusion["fused"]] == [("adapter", "row"), ("compacter", "row")]
    assert fusion["config"]["adapters"] == ["adapter", "compacter"]
    for key in ("train_seconds", "trainable_params", "delta_bytes"):
        assert fusion[key] == pytest.approx(fusion["stage_two"][key] + sum(got[m][key] for m in ("adapter", "compacter")))
    assert fusion["changed_params"] > got["adapter"]["changed_params"] + got["compacter"]["changed_params"]
    assert fusion["note"].startswith("fuses adapter (this run's row), compacter (this run's row); time")
    md = (tmp / "cmp" / "report.md").read_text()
    assert "**Notes.**" in md and "fuses adapter (this run's row)" in md


def test_with_no_adapter_row_the_arm_trains_two_first_and_counts_their_time(setup):
    run, tmp = setup
    report = run(["bitfit", "adapter_fusion"])
    fusion = rows(report)["adapter_fusion"]
    assert not fusion["error"], fusion["error"]
    assert [(e["name"], e["source"]) for e in fusion["fused"]] == [("adapter", "arm"), ("houlsby", "arm")]
    stage_one = [e["stats"] for e in fusion["fused"]]
    assert all(s["train_seconds"] > 0 and s["trainable_params"] > 0 for s in stage_one)
    assert fusion["train_seconds"] == pytest.approx(fusion["stage_two"]["train_seconds"]
                                                    + sum(s["train_seconds"] for s in stage_one))
    assert "trained in this arm" in fusion["note"]
    for name in ("adapter", "houlsby"):  # the stage-one runs are kept beside the fusion's
        assert (tmp / "cmp" / "runs" / "adapter_fusion" / "stage_one" / name / "delta" / "delta.json").is_file()


def test_saved_adapters_are_named_through_the_method_options(setup):
    run, tmp = setup
    run(["adapter", "houlsby"], out="first")
    first = tmp / "first" / "runs"
    report = run(["adapter_fusion"], out="second",  # a run directory and a delta directory, both saved as 'sent'
                 options={"adapter_fusion": {"adapters": (str(first / "adapter"), str(first / "houlsby" / "delta"))}})
    fusion = rows(report)["adapter_fusion"]
    assert not fusion["error"], fusion["error"]
    assert [(e["name"], e["source"]) for e in fusion["fused"]] == [("saved_adapter", "saved"), ("saved_houlsby", "saved")]
    trained = json.loads((first / "adapter" / "results.json").read_text())
    assert fusion["fused"][0]["stats"]["train_seconds"] == trained["train_seconds"]
    saved = json.loads((tmp / "second" / "runs" / "adapter_fusion" / "delta" / "delta.json").read_text())
    assert saved["method"]["options"]["sources"] == {"saved_adapter": str(first / "adapter" / "delta"),
                                                     "saved_houlsby": str(first / "houlsby" / "delta")}
    base, _ = up.training.run.load_run(tmp / "second" / "runs" / "adapter_fusion")[:2]  # the adapters come back
    assert {"saved_adapter", "saved_houlsby"} <= set(up.deltas(base))


@pytest.mark.parametrize("adapters,message", [
    (("adapter",), r"^adapter_fusion: adapters= names 1 adapter; a fusion needs two or more$"),
    (("adapter", "lora"), r"^adapter_fusion: 'lora' is not a sequential adapter in every layer"),
    (("adapter", "/no/such/dir"), r"^adapter_fusion: adapters entry '/no/such/dir' is neither an adapter method"),
])
def test_what_cannot_be_fused_is_a_one_line_error_before_any_training(setup, adapters, message):
    run, tmp = setup
    with pytest.raises(up.UnipeftError, match=message) as err:
        run(["adapter_fusion"], options={"adapter_fusion": {"adapters": adapters}})
    assert "\n" not in str(err.value) and not (tmp / "cmp" / "runs").exists()


def test_a_failed_adapter_row_leaves_nothing_to_fuse(setup):
    run, _ = setup
    # n=3 divides the bottleneck (the config is valid) but not the tiny model's width: the row fails in training
    report = run(["compacter", "adapter_fusion"], options={"compacter": {"n": 3, "bottleneck": 63}})
    got = rows(report)
    assert got["compacter"]["error"]
    assert got["adapter_fusion"]["error"] == ("adapter_fusion: nothing to fuse: the adapter row(s) 'compacter' it "
                                              "would fuse failed (see their rows)")
