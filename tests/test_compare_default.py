"""The main job's method list (``training.defaults.COMPARE_DEFAULT``): every method in it trains and is
measured through ``unipeft compare`` (on a tiny model: the real job is timed by hand, see the list's comment)."""
import tiny
from unipeft.comparison import compare
from unipeft.training.defaults import COMPARE_DEFAULT, DEFAULTS


def test_the_list_is_every_method_that_applies_to_an_encoder_classifier_but_the_four_said_why():
    assert len(set(COMPARE_DEFAULT)) == len(COMPARE_DEFAULT) and set(COMPARE_DEFAULT) <= set(DEFAULTS)
    assert set(DEFAULTS) - set(COMPARE_DEFAULT) == {"new_tokens", "qlora", "said", "lt_sft"}


def test_every_method_of_the_main_job_runs_through_compare(tmp_path):
    folder = tiny.save(tmp_path / "bert", "bert", "cls")
    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(24)]
    data = {"train": tiny.write_csv(tmp_path / "train.csv", ["text", "label"], rows[:16]),
            "dev": tiny.write_csv(tmp_path / "dev.csv", ["text", "label"], rows[16:])}
    report = compare(str(folder), "sent", None, out=tmp_path / "cmp", data=data, in_process=True, quiet=True,
                     method_options={"adapter_drop": {"drop": 1}},  # MiniLM's 2 of 6 layers; the tiny model has 2
                     max_steps=2, batch_size=8, precision="fp32")
    assert sorted(m["method"] for m in report["methods"]) == sorted(COMPARE_DEFAULT)
    failed = {m["method"]: m["error"] for m in report["methods"] if m.get("error")}
    assert not failed
    assert all(m["trainable_params"] > 0 and m["changed_params"] is not None for m in report["methods"])
