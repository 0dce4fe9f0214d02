"""The command line: subcommands registered in one table, one-line errors with exit code 2."""
import json

import torch

import tiny
import unipeft as up
from unipeft.cli import main


def test_analyze_is_registered_and_errors_are_one_line(capsys):
    assert main(["analyze"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lora, attention, probe or intrinsic-dim" in err
    assert main(["analyze", "lora"]) == 2
    assert main(["nonsense"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_analyze_lora_spectrum_of_a_saved_delta(tmp_path, capsys):
    model = tiny.make("bert")
    up.attach(model, up.LoRA(r=3, targets=["query"]), name="t")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_()
    up.save(model, tmp_path / "d")
    assert main(["analyze", "lora", "--spectrum", str(tmp_path / "d"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    values = out["singular_values"]["bert.encoder.layer.0.attention.self.query"]
    assert sum(v > 1e-6 for v in values) == 3  # a rank-3 delta
