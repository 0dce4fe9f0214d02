"""No silent waits: every long phase says what it does and how far it is (plain lines off a terminal),
the final test scoring is announced with its size and can be chosen (--test / --no-test,
--eval-max-examples), and --quiet / --json keep the output clean."""
from __future__ import annotations

import json

import pytest

import tiny
from unipeft import progress
from unipeft.cli import main


def cli(*args):
    return main([str(a) for a in args])


def lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("[unipeft]")]


@pytest.fixture(autouse=True)
def loud():
    progress.set_quiet(False)
    yield
    progress.set_quiet(False)


def test_a_phase_prints_start_periodic_and_end_lines_off_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    with progress.phase("scoring test", total=4, unit="sources", terminal=False) as p:
        p.set_postfix(loss="0.5")
        p.update(1)
        p.update(3)
    out = lines(capsys.readouterr().err)
    assert out[0] == "[unipeft] scoring test: 4 sources ..."
    assert out[1].startswith("[unipeft] scoring test: 1/4 sources (25%),") and "ETA" in out[1] and "loss 0.5" in out[1]
    assert out[-1].startswith("[unipeft] scoring test: done, 4 sources in ") and "sources/s" in out[-1]


def test_a_failing_phase_says_so_and_quiet_silences_everything(capsys):
    with pytest.raises(KeyError):
        with progress.phase("loading x", terminal=False):
            raise KeyError("x")
    assert "loading x: stopped (KeyError)" in capsys.readouterr().err
    progress.set_quiet(True)
    with progress.phase("loading y", total=3, terminal=False) as p:
        p.update(3)
    progress.note("hello")
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(120)]
    gen = tiny.table_rows(60)
    return {
        "bert": tiny.save(root / "bert", "bert", "cls"),
        "gpt2": tiny.save(root / "gpt2", "gpt2", "lm"),
        "train": tiny.write_csv(root / "train.csv", ["text", "label"], rows[:80]),
        "dev": tiny.write_csv(root / "dev.csv", ["text", "label"], rows[80:100]),
        "test": tiny.write_csv(root / "test.csv", ["text", "label"], rows[100:]),
        "gen_train": tiny.write_csv(root / "gtrain.csv", ["source", "target"], gen[:40]),
        "gen_dev": tiny.write_csv(root / "gdev.csv", ["source", "target"], gen[40:50]),
        "gen_test": tiny.write_csv(root / "gtest.csv", ["source", "target"], gen[50:]),
    }


def classify(d, out, *extra):
    return ["train", "--model", d["bert"], "--task", "sent", "--train", d["train"], "--dev", d["dev"], "--out", out,
            "--precision", "fp32", "--threads", "1", "--method", "lora", "--max-steps", "4", "--batch-size", "8",
            "--json", *extra]


def generate(d, out, *extra):
    return ["train", "--model", d["gpt2"], "--task", "gen", "--kind", "causal_lm", "--train", d["gen_train"],
            "--dev", d["gen_dev"], "--text-column", "source", "--target-column", "target", "--out", out,
            "--precision", "fp32", "--threads", "1", "--method", "lora", "--max-steps", "3", "--batch-size", "8",
            "--max-new-tokens", "4", "--json", *extra]


def test_train_announces_every_phase_and_json_stays_clean(data, tmp_path, capsys):
    assert cli(*classify(data, tmp_path / "r", "--test", data["test"])) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out)  # stdout holds the JSON only
    out = "\n".join(lines(cap.err))
    for phase in ("loading ", "training: 4 steps ...", "training: completed, 4 steps in",
                  "scoring dev: forward passes: 20 examples ...", "scoring test: forward passes: 20 examples ...",
                  "scoring test: forward passes: done, 20 examples in"):
        assert phase in out, phase
    assert "test" in res and "dev" in res


def test_no_test_skips_test_scoring_and_eval_max_examples_caps_it(data, tmp_path, capsys):
    assert cli(*classify(data, tmp_path / "a", "--test", data["test"], "--no-test")) == 2  # contradictory
    assert "contradict" in capsys.readouterr().err
    assert cli(*classify(data, tmp_path / "b", "--no-test")) == 0
    cap = capsys.readouterr()
    assert "test" not in json.loads(cap.out) and "scoring test" not in cap.err
    assert cli(*classify(data, tmp_path / "c", "--test", data["test"], "--eval-max-examples", "7")) == 0
    cap = capsys.readouterr()
    assert "scoring test: forward passes: 7 examples" in cap.err
    assert "scoring dev: forward passes: 7 examples" in cap.err
    assert "test" in json.loads(cap.out)


def test_generation_test_scoring_is_announced_with_its_size_and_capped(data, tmp_path, capsys):
    assert cli(*generate(data, tmp_path / "a", "--test", data["gen_test"], "--no-test")) == 2
    assert "contradict" in capsys.readouterr().err
    assert cli(*generate(data, tmp_path / "b", "--test", data["gen_test"])) == 0
    cap = capsys.readouterr()
    assert "scoring test: 10 sources, 10 references, generation up to 4 tokens" in cap.err
    assert "scoring test: generation: done, 10 sources" in cap.err
    assert "scoring test: scoring bleu" in cap.err
    assert "test" in json.loads(cap.out)
    assert cli(*generate(data, tmp_path / "c", "--test", data["gen_test"], "--eval-max-examples", "3")) == 0
    cap = capsys.readouterr()
    assert "scoring test: 3 sources, 3 references" in cap.err


def test_a_generation_task_skips_its_test_split_by_default_and_says_how_to_score_it(data, tmp_path, capsys):
    from unipeft.training import run

    files = {"train": data["gen_train"], "dev": data["gen_dev"], "test": data["gen_test"], "kind": "causal_lm",
             "text_column": "source", "target_column": "target"}
    res = run.train(data["gpt2"], "gen", "lora", data=files, max_steps=2, batch_size=8, precision="fp32",
                    max_new_tokens=4)
    err = capsys.readouterr().err
    assert "test" not in res
    assert "test split not scored: 10 sources to generate for" in err and "--test scores it" in err
    res = run.train(data["gpt2"], "gen", "lora", data=files, max_steps=2, batch_size=8, precision="fp32",
                    max_new_tokens=4, evaluate_test=True)
    assert "bleu" in res["test"]


def test_quiet_prints_no_progress(data, tmp_path, capsys):
    assert cli(*classify(data, tmp_path / "q", "--quiet")) == 0
    cap = capsys.readouterr()
    assert lines(cap.err) == [] and json.loads(cap.out)["steps"] == 4
