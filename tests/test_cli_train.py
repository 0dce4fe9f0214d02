"""`unipeft train / eval / predict / compare` on tiny models: outputs, YAML configs, errors, kill-and-resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import tiny
from unipeft.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(200)]
    return {
        "root": root,
        "model": tiny.save(root / "bert", "bert", "cls"),
        "train": tiny.write_csv(root / "train.csv", ["text", "label"], rows[:160]),
        "dev": tiny.write_csv(root / "dev.csv", ["text", "label"], rows[160:]),
    }


def cli(*args):
    return main([str(a) for a in args])


def common(s, out):
    return ["--model", s["model"], "--task", "sent", "--train", s["train"], "--dev", s["dev"], "--out", out,
            "--precision", "fp32", "--threads", "1"]


def test_train_eval_predict(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("train", *common(setup, out), "--method", "full", "--lr", "3e-3", "--max-steps", "60",
               "--batch-size", "16", "--json") == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "full" and res["steps"] == 60 and res["dev"]["accuracy"] >= 0.9
    assert cli("eval", out, "--json") == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == res["dev"]["accuracy"]
    inp = tmp_path / "in.txt"
    inp.write_text("a great film\nan awful movie\n")
    assert cli("predict", out, "--input", inp) == 0
    preds = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["prediction"] for p in preds] == ["pos", "neg"]


def test_yaml_config_supplies_options_and_the_command_line_wins(setup, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {setup['model']}\ntask: sent\ntrain: {setup['train']}\ndev: {setup['dev']}\n"
                   "method: lora\nmethod_option: [r=2]\nmax-steps: 3\nbatch_size: 8\nprecision: fp32\n")
    assert cli("train", "--config", cfg, "--max-steps", "2", "--out", tmp_path / "r", "--json") == 0
    res = json.loads(capsys.readouterr().out)
    assert res["steps"] == 2 and res["method_config"]["r"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_stepz: 3\n")
    assert cli("train", "--config", bad) == 2
    err = capsys.readouterr().err
    assert "unknown option(s) ['max_stepz']" in err and "max_steps" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["train", "--method", "lorra"], "unknown method 'lorra'"),
    (["train", "--lr", "-1"], "lr must be > 0"),
    (["train", "--train", "/nonexistent.csv", "--task", "x"], "nonexistent.csv"),
    (["train", "--method-option", "rank=4"], "unknown option"),
    (["train", "--resume"], "--resume needs --out"),
    (["eval", "/nonexistent"], "not a run directory"),
    (["compare", "--methods", "lora,nope"], "unknown method(s) ['nope']"),
    (["train", "--precision", "fp8"], "invalid choice"),
])
def test_user_errors_are_one_line_and_exit_2(setup, args, message, capsys):
    if args[0] == "train" and "--model" not in args and "--train" not in args:
        args = args + ["--model", setup["model"], "--task", "sent", "--train", setup["train"]]
    assert cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_help_of_every_training_command(capsys):
    for cmd in ("train", "eval", "predict", "compare"):
        with pytest.raises(SystemExit) as e:
            cli(cmd, "--help")
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "methods and their defaults" in out and "--method-option" in out and "--resume" in out


def test_compare_writes_the_report(setup, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli("compare", *common(setup, out), "--methods", "lora,bitfit", "--max-steps", "3",
               "--batch-size", "8", "--in-process") == 0
    text = capsys.readouterr().out
    assert "| LoRA |" in text and "| BitFit |" in text and "report.md" in text
    report = json.loads((out / "report.json").read_text())
    lora = report["methods"][0]
    assert lora["trainable_params"] > 0 and lora["delta_bytes"] > 0 and lora["latency_ms"]["merged"] > 0
    assert 0 <= lora["metrics"]["accuracy"] <= 1 and report["budget"]["train_examples"] == 160
    assert (out / "report.md").read_text().startswith("#")
    for f in ("metric_vs_params.png", "cost.png"):
        assert (out / f).read_bytes()[:4] == b"\x89PNG"


def test_compare_method_settings_override_the_shared_ones_for_one_method(setup, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli("compare", *common(setup, out), "--methods", "lora,bitfit", "--max-steps", "3", "--batch-size", "8",
               "--lr", "1e-3", "--method-setting", "lora.lr=4e-3", "--method-setting", "lora.max_steps=2",
               "--in-process", "--json") == 0
    lora, bitfit = json.loads(capsys.readouterr().out)["methods"]
    assert (lora["lr"], lora["steps"], lora["train_config"]["lr"]) == (4e-3, 2, 4e-3)
    assert (bitfit["lr"], bitfit["steps"]) == (1e-3, 3)


@pytest.mark.parametrize("setting, message", [
    ("lora.lrr=1", "unknown training setting(s) ['lrr'] for lora"),
    ("ia3.lr=1", "names method 'ia3', which is not run"),
    ("lr", "must look like 'method.option=value'"),
])
def test_compare_method_setting_errors_come_before_training(setup, tmp_path, setting, message, capsys):
    assert cli("compare", *common(setup, tmp_path / "cmp"), "--methods", "lora", "--max-steps", "1",
               "--method-setting", setting) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cmp" / "runs").exists()


def test_compare_forks_each_method_from_one_server_that_outlives_a_dead_worker(setup, tmp_path, capsys):
    import os

    from unipeft.compare_workers import Workers

    out = tmp_path / "cmp"
    assert cli("compare", *common(setup, out), "--methods", "ia3,bitfit", "--max-steps", "2", "--batch-size", "8",
               "--json") == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["methods"]
    assert report["in_process"] is False
    assert all(r["error"] is None and r["memory_kind"] == "rss" and r["peak_memory_mb"] > 50 for r in rows)
    assert len({r["process"] for r in rows} | {os.getpid()}) == 3  # a fresh process per method
    if hasattr(os, "fork"):
        with Workers() as workers:
            last, code = workers._fork(tmp_path / "no-such-spec.json")  # the child dies before any result
            assert code == 1 and "FileNotFoundError" in last
            server = workers.server.pid
            assert workers._fork(tmp_path / "no-such-spec.json")[1] == 1 and workers.server.pid == server


def _train_cmd(setup, out, *extra):
    return [sys.executable, "-m", "unipeft", "train", *common(setup, out), "--method", "lora",
            "--method-option", "dropout=0.1", "--lr", "5e-3", "--batch-size", "4", "--epochs", "3",
            "--save-every", "2", "--eval-every", "0", "--seed", "3", *extra]


def test_a_run_killed_with_sigkill_resumes_to_the_same_parameters(setup, tmp_path):
    # one thread each: the uninterrupted reference run and the run to kill go side by side on 2 cores
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    ref_log = (tmp_path / "ref.log").open("w")  # a file, not a pipe nobody reads until the end
    ref_proc = subprocess.Popen(_train_cmd(setup, ref), env=env, stdout=subprocess.DEVNULL, stderr=ref_log)

    proc = subprocess.Popen(_train_cmd(setup, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = sorted((killed / "checkpoints").glob("step-*")) if (killed / "checkpoints").is_dir() else []
        if done:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "results.json").exists()
    steps = [int(p.name.split("-")[1]) for p in (killed / "checkpoints").glob("step-*")]
    assert steps and max(steps) < 120  # killed mid-training (120 = 40 batches x 3 epochs)

    subprocess.run(_train_cmd(setup, killed, "--resume"), check=True, env=env, capture_output=True)
    assert ref_proc.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    ref_log.close()
    results = json.loads((killed / "results.json").read_text())
    assert results["resumed_from"] and results["steps"] == 120
    a = load_file(str(ref / "delta" / "delta.safetensors"))
    b = load_file(str(killed / "delta" / "delta.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run ended with other parameters"
