"""The memory estimator reproduces the lecture notes' numbers (seed 000, "GPU Memory Estimated")."""
import json
import os
import subprocess
import sys

import pytest

from unipeft.analysis import PRESETS, estimate, format_hardware_table, hardware_table
from unipeft.cli import main
from unipeft.errors import UnipeftError

FULL = {"weights_gb": 13.03, "gradients_gb": 13.03, "hidden_gb": 3.16, "optimizer_gb": 26.06, "overhead_gb": 1.0,
        "total_gb": 56.28}


def test_notes_full_finetuning():
    d = estimate("llama-2-7b", method="full", dtype="fp16", seq_len=4096, batch_size=1).to_dict()
    assert {k: d[k] for k in FULL} == FULL
    assert d["exact"]["hidden_gb"] == 3.15625  # 2 * 32 * (20*32*4096 + 3*4096^2) / 2^30


def test_notes_peft_200k():
    e = estimate("llama-2-7b", method="lora", trainable_params=200_000, seq_len=4096)
    d = e.to_dict()
    assert d["total_gb"] == 17.19 and d["weights_gb"] == 13.03 and d["hidden_gb"] == 3.16
    assert e.exact["gradients_gb"] * 2**30 == 400_000 and e.exact["optimizer_gb"] * 2**30 == 800_000
    assert "0.4 MB" in e.table() and "0.8 MB" in e.table() and "17.19" in e.table()


def test_hidden_scales_with_batch_and_detailed_formula():
    one = estimate("llama-2-7b").hidden_gb
    assert estimate("llama-2-7b", batch_size=4).hidden_gb == pytest.approx(4 * one)
    assert estimate("llama-2-7b", hidden="detailed").hidden_gb > 100


def test_sizes_presets_and_config_object():
    assert estimate("7B").to_dict()["total_gb"] == 56.28
    assert estimate("135M").n_params == 135_000_000
    for name in PRESETS:
        assert estimate(name, method="lora").total_gb > 1.0
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
    e = estimate(cfg, method="full", dtype="fp32", seq_len=16)
    # embeddings + head 2*100*64; per layer q,o 2*64*64, k,v 2*64*32, MLP 3*64*128
    assert e.n_params == 2 * 100 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    assert (e.layers, e.heads, e.hidden_size, e.vocab) == (2, 4, 64, 100)


def test_local_folder(tmp_path):
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=50).save_pretrained(tmp_path)
    assert estimate(str(tmp_path)).layers == 1


def test_errors():
    with pytest.raises(UnipeftError, match="llama-2-7b.*minilm-l6"):
        estimate("llama-9")
    with pytest.raises(UnipeftError, match="method"):
        estimate("llama-2-7b", method="nope")


def test_offline_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnipeftError, match="someone/no-such-model") as ei:
        estimate("someone/no-such-model")
    assert "\n" not in str(ei.value)


def test_hardware_table_every_cell_has_a_rule():
    rows = hardware_table()
    assert len(rows) == 7 * 7
    assert len({(r["method"], r["size"]) for r in rows}) == 49
    for r in rows:
        assert r["rule"] and r["computed_gb"] > 0 and r["notes_gb"] > 0
        assert 0.4 < r["computed_gb"] / r["notes_gb"] < 1.6  # same ballpark as the notes
    text = format_hardware_table(rows)
    assert "QLoRA (2-bit)" in text and "8x22B" in text and "B/param" in text


def test_cli_json_and_table(capsys):
    assert main(["estimate", "--model", "llama-2-7b", "--method", "full", "--seq-len", "4096",
                 "--batch-size", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_gb"] == 56.28
    assert main(["estimate", "--model", "llama-2-7b", "--method", "lora", "--trainable-params", "200000",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_gb"] == 17.19
    assert main(["estimate", "--model", "llama-2-7b"]) == 0
    assert "56.28" in capsys.readouterr().out
    assert main(["estimate", "--hardware-table"]) == 0
    assert "Full (AMP)" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["estimate", "--model", "llama-9"], ["estimate", "--method", "x"],
                                  ["estimate", "--model", "7B", "--batch-size", "zero"], ["estimate"], [],
                                  ["estimate", "--model", "someone/no-such-model"]])
def test_cli_user_errors_are_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_help(capsys):
    for argv in (["--help"], ["estimate", "--help"]):
        with pytest.raises(SystemExit) as ei:
            main(argv)
        assert ei.value.code == 0
    assert "--trainable-params" in capsys.readouterr().out


def test_python_m_unipeft():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "unipeft", "estimate", "--model", "llama-2-7b", "--json"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total_gb"] == 56.28


def test_cpu_estimate_terms():
    """The CPU estimate's terms follow its docstring: the weight copy only for full fine-tuning,
    prompt tokens lengthen the activations but not the logits, and the parts sum to the total."""
    from unipeft.analysis.memory_cpu import estimate_cpu

    full = estimate_cpu("smollm2-135m", method="full", batch_size=4, seq_len=64)
    lora = estimate_cpu("smollm2-135m", method="lora", trainable_params=4_884_480, batch_size=4, seq_len=64)
    prompt = estimate_cpu("smollm2-135m", method="prompt", trainable_params=11_520, batch_size=4, seq_len=64,
                          prompt_length=20)
    assert full["parts_mb"]["weights_copy"] == full["parts_mb"]["weights"] > 0
    assert lora["parts_mb"]["weights_copy"] == 0
    assert prompt["parts_mb"]["logits"] == lora["parts_mb"]["logits"] > 0
    # a frozen linear layer saves no input for backward: only methods that train the linears pay for it
    assert prompt["parts_mb"]["linear_inputs"] == 0
    assert full["parts_mb"]["linear_inputs"] == lora["parts_mb"]["linear_inputs"] > 0
    assert abs(prompt["parts_mb"]["activations"] / lora["parts_mb"]["activations"] - 84 / 64) < 1e-9
    for est in (full, lora, prompt):
        assert abs(sum(est["parts_mb"].values()) - est["total_mb"]) < 1e-6
    cls = estimate_cpu("minilm-l6", method="lora", trainable_params=74_498, batch_size=32, seq_len=128,
                       task="seq-cls")
    assert cls["parts_mb"]["logits"] == 0


def test_cli_cpu_estimate(capsys):
    from unipeft.cli import main

    assert main(["estimate", "--model", "minilm-l6", "--method", "lora", "--trainable-params", "74498",
                 "--batch-size", "32", "--seq-len", "128", "--device", "cpu", "--task", "seq-cls", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parts_mb"]["logits"] == 0 and out["parts_mb"]["weights"] > 80 and out["total_mb"] > 1000
