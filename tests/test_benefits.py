"""The benefits the notes claim, measured: changed parameters, forgetting (perplexity / masked-LM loss), low data."""
from __future__ import annotations

import json
import math

import pytest
import torch

import tiny
import unipeft as up
from unipeft.analysis import forgetting as fg
from unipeft.analysis import low_data
from unipeft.cli import main
from unipeft.engine import registry
from unipeft.errors import UnipeftError


def randomize(model, name, scale=0.05):
    """Give a fresh delta nonzero values everywhere (LoRA's B starts at zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in registry(model).deltas[name].parameters():
            p.add_(torch.randn_like(p) * scale)


def target_elements(model, suffixes):
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for n, m in model.named_modules() if n.endswith(suffixes) and hasattr(m, "weight"))


# ---------------------------------------------------------------------------
# changed parameters
# ---------------------------------------------------------------------------

def test_lora_changes_every_element_of_its_matrices_and_adds_nothing():
    model = tiny.make("llama")
    wq = target_elements(model, ("q_proj", "v_proj"))
    up.attach(model, up.LoRA(r=2, targets=["q_proj", "v_proj"]), name="l")
    zero = fg.changed_parameters(model, "l")
    assert zero["changed"] == 0 and zero["how"] == "merged"  # B = 0: merging changes nothing yet
    randomize(model, "l")
    out = fg.changed_parameters(model, "l")
    trainable, _ = up.trainable_parameters(model)
    assert out["changed"] == wq and out["added"] == 0
    assert out["changed"] > 3 * trainable  # the notes: LoRA's changed share far above its trainable share
    assert out["changed_pct"] == pytest.approx(100 * wq / out["base"])
    before = {n: p.clone() for n, p in model.named_parameters()}
    fg.changed_parameters(model, "l")  # merged and unmerged: the model is as before
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_adapters_and_prompts_add_bitfit_and_full_change_in_place():
    model = tiny.make("gpt2")
    up.attach(model, up.Adapter(), name="a")
    a = fg.changed_parameters(model, "a")
    assert a["changed"] == 0 and a["added"] == up.trainable_parameters(model)[0] and a["how"] == "added"
    up.detach(model, "a")
    up.attach(model, up.PromptTuning(length=3), name="p")
    p = fg.changed_parameters(model, "p")
    assert p["added"] == 3 * 32 and p["changed"] == 0
    up.detach(model, "p")
    up.attach(model, up.BitFit(), name="b")
    assert fg.changed_parameters(model, "b")["changed"] == 0  # nothing trained yet
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.bias[:5] += 1.0
    b = fg.changed_parameters(model, "b")
    assert b["changed"] == 5 and b["how"] == "in place"


# ---------------------------------------------------------------------------
# forgetting
# ---------------------------------------------------------------------------

def test_perplexity_is_exp_of_the_models_own_loss_and_delta_off_is_the_base():
    model, tok = tiny.make("gpt2"), tiny.tokenizer("gpt2")
    text = " ".join(["the movie was good and the plot was very nice"] * 3)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = math.exp(model(input_ids=ids, labels=ids).loss.item())
    assert fg.perplexity(model, tok, text, max_length=64) == pytest.approx(expected, rel=1e-5)
    base = fg.perplexity(model, tok, text, 64)
    up.attach(model, up.LoRA(r=2), name="l")
    randomize(model, "l", 0.5)
    f = fg.causal_forgetting(model, tok, "l", text, 64)
    assert f["before"] == pytest.approx(base, rel=1e-6) and f["after"] != pytest.approx(base, rel=1e-3)
    assert f["change_pct"] == pytest.approx(100 * (f["after"] / f["before"] - 1))
    assert up.active(model) == ["l"]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    mlm = tiny.save(root / "mlm", "bert", "mlm")
    tok = tiny.tokenizer("bert")
    tok.add_special_tokens({"mask_token": "[MASK]"})
    tok.save_pretrained(mlm)
    return {"mlm": mlm, "cls": tiny.save(root / "cls", "bert", "cls"), "tok": tok}


def test_encoder_forgetting_is_the_masked_lm_loss_with_the_deltas_body(encoders):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    tok = encoders["tok"]
    text = " ".join(["the film was good and the acting was very nice"] * 8)
    mlm = AutoModelForMaskedLM.from_pretrained(encoders["mlm"])
    base_loss = fg.masked_lm_loss(mlm, tok, text, 32)
    assert 0 < base_loss < 20 and fg.masked_lm_loss(mlm, tok, text, 32) == base_loss  # fixed mask positions
    cls = AutoModelForSequenceClassification.from_pretrained(encoders["mlm"], num_labels=2)
    up.attach(cls, up.LoRA(r=2), name="l")
    randomize(cls, "l", 0.5)
    f = fg.encoder_forgetting(encoders["mlm"], cls, tok, "l", text, 32)
    assert f["measure"] == "masked_lm_loss" and f["before"] == pytest.approx(base_loss, rel=1e-5)
    assert f["after"] != pytest.approx(base_loss, rel=1e-3)
    n = len(registry(cls).deltas["l"].linear) - len(registry(cls).deltas["l"].head)
    assert f["tensors_from_delta"] == f"{2 * n}/{2 * n}"  # every LoRA factor; the classifier left out
    # a checkpoint without a pretrained MLM head: a second task's probe (BBC topics) instead
    cls2 = AutoModelForSequenceClassification.from_pretrained(encoders["cls"])
    up.attach(cls2, up.LoRA(r=2), name="l")  # B = 0: the delta changes nothing yet
    probe = fg.encoder_forgetting(encoders["cls"], cls2, tok, "l", text, 32)
    assert probe["measure"] == "probe_accuracy" and "no pretrained masked-LM head" in probe["why"]
    assert 0 <= probe["before"] <= 1 and probe["after"] == probe["before"]
    randomize(cls2, "l", 0.5)
    moved = fg.probe_forgetting(cls2, tok, "l", max_length=32)
    assert moved["before"] == probe["before"] and 0 <= moved["after"] <= 1


def test_general_text_ships_and_short_texts_are_refused(tmp_path):
    assert len(fg.read_text().split()) > 500
    short = tmp_path / "s.txt"
    short.write_text("too short")
    with pytest.raises(UnipeftError, match="at least 50 words"):
        fg.read_text(short)
    with pytest.raises(UnipeftError, match="does not exist"):
        fg.read_text(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------
# compare --forgetting, --train-sizes
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gen_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    text = root / "general.txt"
    text.write_text(" ".join(["the pub near the riverside serves cheap english food and the cafe is in the "
                              "centre"] * 6))
    return {"model": tiny.save(root / "gpt2", "gpt2", "lm"), "text": str(text),
            "train": tiny.write_csv(root / "t.csv", ["text", "target"], tiny.table_rows(40))}


def test_compare_reports_forgetting_and_changed_parameters(gen_setup, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--model", gen_setup["model"], "--task", "tab", "--kind", "causal_lm", "--train",
            gen_setup["train"], "--methods", "lora,bitfit,prompt", "--max-steps", "3", "--batch-size", "8",
            "--lr", "5e-2", "--max-new-tokens", "4", "--max-length", "32", "--precision", "fp32", "--threads", "1", "--in-process",
            "--forgetting", gen_setup["text"], "--out", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "Changed params" in table and "ppl " in table
    report = json.loads((out / "report.json").read_text())
    by = {m["method"]: m for m in report["methods"]}
    assert by["lora"]["changed_how"] == "merged" and by["lora"]["changed_params"] > by["lora"]["trainable_params"]
    assert by["prompt"]["changed_how"] == "added"
    for m in by.values():
        f = m["forgetting"]
        assert f["measure"] == "perplexity" and f["before"] == pytest.approx(by["lora"]["forgetting"]["before"])
        assert f["after"] > 0
    assert (out / "forgetting.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory):
    """A tiny BERT classifier and a sentiment task's train/dev files for the low-data sweeps."""
    root = tmp_path_factory.mktemp("sweep")
    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(80)]
    return (tiny.save(root / "bert", "bert", "cls"), tiny.write_csv(root / "train.csv", ["text", "label"], rows[:60]),
            tiny.write_csv(root / "dev.csv", ["text", "label"], rows[60:]))


def test_train_sizes_sweep_writes_the_table_and_plot(sweep_files, tmp_path, capsys):
    model, train, dev = sweep_files
    out = tmp_path / "low"
    assert main(["compare", "--model", model, "--task", "s", "--train", train, "--dev", dev, "--methods",
                 "lora,bitfit", "--train-sizes", "8,16", "--seeds", "0,1", "--max-steps", "4", "--batch-size", "4",
                 "--precision", "fp32", "--threads", "1", "--in-process", "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "low_data.json").read_text())
    assert summary["sizes"] == [8, 16] and len(summary["runs"]) == 2 * 2 * 2
    assert {r["train_examples"] for r in summary["runs"]} == {8, 16}
    assert set(summary["table"]) == {"lora", "bitfit"} and summary["table"]["lora"]["16"]["n"] == 2
    assert (out / "low_data.png").read_bytes()[:4] == b"\x89PNG"
    assert "| n=8 | n=16 |" in (out / "low_data.md").read_text()
    assert (out / "runs" / "n8-s1" / "report.json").is_file()
    # no evaluation during training, only compare's after the last step: at n=8 the 4 steps are two
    # epochs, and per-epoch evaluations would let keep_best choose among checkpoints on the dev set
    logs = list((out / "runs" / "n8-s0").rglob("log.jsonl"))
    assert logs and not any('"eval"' in p.read_text() for p in logs)
    with pytest.raises(UnipeftError, match="distinct positive integers"):
        low_data.parse_sizes("10,0")


def test_a_resumed_sweep_keeps_finished_runs_and_refuses_other_settings(sweep_files, tmp_path, capsys):
    model, train, dev = sweep_files
    out = tmp_path / "low"
    args = ["compare", "--model", model, "--task", "s", "--train", train, "--dev", dev, "--methods", "bitfit",
            "--train-sizes", "8", "--batch-size", "4", "--precision", "fp32", "--threads", "1", "--in-process",
            "--out", str(out)]
    assert main(args + ["--seeds", "0,1", "--max-steps", "2"]) == 0
    first = json.loads((out / "low_data.json").read_text())["runs"]
    # a killed sweep's last run: its report exists but it never got its finished mark, so it runs again
    (out / "runs" / "n8-s1" / low_data.SPEC_NAME).unlink()
    capsys.readouterr()
    assert main(args + ["--seeds", "0,1,2", "--max-steps", "2", "--resume"]) == 0
    said = capsys.readouterr().out
    assert "n=8, seed 0: kept from the earlier sweep" in said
    assert "seed 1: kept" not in said and "seed 2: kept" not in said
    runs = json.loads((out / "low_data.json").read_text())["runs"]
    assert [r["seed"] for r in runs] == [0, 1, 2] and runs[0] == first[0]
    capsys.readouterr()
    assert main(args + ["--seeds", "0", "--max-steps", "3", "--resume"]) != 0
    assert "holds a sweep with other settings" in capsys.readouterr().err
    assert json.loads((out / "low_data.json").read_text())["runs"] == runs  # nothing ran, nothing was lost
    assert main(["compare", "--model", model, "--task", "s", "--train", train, "--dev", dev, "--methods", "bitfit",
                 "--resume", "--out", str(tmp_path / "one")]) != 0
    assert "nothing to resume" in capsys.readouterr().err
