"""unipeft.analysis.lora: subspace similarity, amplification and spectrum of LoRA deltas (tiny BERT)."""
import argparse
import json

import pytest
import torch
import transformers as tf

import unipeft as up
from unipeft.analysis import lora as la
from unipeft.analysis import lora_cli
from unipeft.errors import UnipeftError
from unipeft.methods.lora import LoRADelta


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=2)
    return tf.BertForSequenceClassification(cfg).eval()


def lora_modules(model, name):
    return {p: d for p, d in up.engine.registry(model).deltas[name].linear.items() if isinstance(d, LoRADelta)}


def attach_random(model, r, name, seed):
    up.attach(model, up.LoRA(r=r, targets=["query", "value"]), name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in lora_modules(model, name).values():
            d.lora_B.copy_(torch.randn(d.lora_B.shape, generator=g))
    return model


# --- subspace similarity -------------------------------------------------

def test_identical_gives_one_on_diagonal():
    a = torch.randn(8, 32)
    g = la.similarity_grid(a, a)
    assert g.shape == (8, 8)
    assert torch.allclose(torch.diagonal(g), torch.ones(8, dtype=torch.float64), atol=1e-10)
    assert la.subspace_similarity(a, a, 3, 3) == pytest.approx(1.0)
    # a subspace of a larger one: phi = 1 whenever one contains the other
    assert la.subspace_similarity(a, a, 2, 8) == pytest.approx(1.0)


def test_orthogonal_row_spaces_give_zero():
    q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    a1, a2 = torch.randn(4, 4, dtype=torch.float64) @ q[:, :4].T, q[:, 4:12].T
    g = la.similarity_grid(a1, a2)
    assert g.shape == (4, 8)
    assert g.abs().max() < 1e-10


def test_symmetric_and_bounded():
    a1, a2 = torch.randn(8, 32), torch.randn(16, 32)
    g12, g21 = la.similarity_grid(a1, a2), la.similarity_grid(a2, a1)
    assert torch.allclose(g12, g21.T, atol=1e-12)
    assert g12.min() >= 0 and g12.max() <= 1
    # one shared direction: phi(1, 1) = 1 when it dominates both
    e = torch.zeros(1, 32)
    e[0, 0] = 100.0
    b1, b2 = torch.cat([e, torch.randn(3, 32)]), torch.cat([e, torch.randn(7, 32)])
    assert la.subspace_similarity(b1, b2, 1, 1) == pytest.approx(1.0, abs=1e-3)


def test_subspace_similarity_bad_index():
    with pytest.raises(UnipeftError):
        la.subspace_similarity(torch.randn(4, 8), torch.randn(4, 8), 5, 1)


def test_compare_deltas_model_and_saved_dir(tmp_path):
    m1 = attach_random(tiny_bert(), 4, "r4", seed=1)
    m2 = attach_random(tiny_bert(), 8, "r8", seed=2)
    up.save(m1, tmp_path / "r4", name="r4")
    up.save(m2, tmp_path / "r8", name="r8")
    from_models = la.compare_deltas((m1, "r4"), (m2, "r8"))
    from_dirs = la.compare_deltas(tmp_path / "r4", str(tmp_path / "r8"))
    assert set(from_models) == set(from_dirs) == set(lora_modules(m1, "r4"))
    assert len(from_dirs) == 4  # 2 layers x (query, value)
    for p, g in from_models.items():
        assert g.shape == (4, 8)
        assert torch.allclose(g, from_dirs[p], atol=1e-6)
    # a delta against itself, and after load onto a fresh base
    same = la.compare_deltas((m1, "r4"), tmp_path / "r4")
    for g in same.values():
        assert torch.allclose(torch.diagonal(g), torch.ones(4, dtype=torch.float64), atol=1e-6)
    fresh = up.load(tiny_bert(), tmp_path / "r4")
    b = la.compare_deltas((fresh, "r4"), (m1, "r4"), matrix="B")
    for g in b.values():
        assert torch.allclose(torch.diagonal(g), torch.ones(4, dtype=torch.float64), atol=1e-6)


def test_bad_sources(tmp_path):
    with pytest.raises(UnipeftError, match="no delta directory"):
        la.compare_deltas(tmp_path / "missing", tmp_path / "missing")
    with pytest.raises(UnipeftError):
        la.lora_factors(42)
    with pytest.raises(UnipeftError, match="no delta named"):
        la.spectrum((tiny_bert(), "nope"))


# --- amplification -------------------------------------------------------

def _diag_base():
    """Tiny BERT whose query/value weights are diag(32, 31, ..., 1)."""
    model = tiny_bert()
    d = torch.arange(32, 0, -1, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.copy_(torch.diag(d))
            layer.attention.self.value.weight.copy_(torch.diag(d))
    return model


def _rank1_along(model, name, j, c=0.1):
    """r=1 LoRA with ΔW = scale * c * e_j e_j^T (scale = 16)."""
    up.attach(model, up.LoRA(r=1, alpha=16, targets=["query", "value"]), name=name)
    with torch.no_grad():
        for d in lora_modules(model, name).values():
            d.lora_A.zero_()
            d.lora_A[0, j] = 1.0
            d.lora_B.zero_()
            d.lora_B[j, 0] = c
    return model


def test_amplification_known_case(tmp_path):
    q = "bert.encoder.layer.0.attention.self.query"
    top = {r["path"]: r for r in la.amplification(_rank1_along(_diag_base(), "top", 0), "top")}[q]
    low_model = _rank1_along(_diag_base(), "low", 31)
    low = {r["path"]: r for r in la.amplification(low_model, "low")}[q]
    assert top["r"] == low["r"] == 1
    assert top["dW_norm"] == pytest.approx(1.6) and low["dW_norm"] == pytest.approx(1.6)
    assert top["proj_W"] == pytest.approx(32.0) and low["proj_W"] == pytest.approx(32.0)
    assert top["proj_dW"] == pytest.approx(32.0)            # ΔW along W's top direction
    assert low["proj_dW"] == pytest.approx(1.0)             # ΔW along W's weakest direction
    assert top["amplification"] == pytest.approx(1.6 / 32)
    assert low["amplification"] == pytest.approx(1.6)
    assert 0 < top["proj_random"] < 32
    assert top["W_norm"] == pytest.approx(float(torch.arange(1, 33.0).pow(2).sum().sqrt()))
    # the random baseline is seeded
    again = {r["path"]: r for r in la.amplification(low_model, "low")}[q]
    assert again["proj_random"] == low["proj_random"]
    # from a saved directory against the bare base: same numbers
    up.save(low_model, tmp_path / "low", name="low")
    from_dir = {r["path"]: r for r in la.amplification(_diag_base(), tmp_path / "low")}[q]
    assert from_dir["amplification"] == pytest.approx(low["amplification"])
    table = la.format_table(la.amplification(low_model, "low"))
    assert q in table and "amplif." in table


def test_amplification_refuses_merged():
    m = attach_random(tiny_bert(), 2, "a", seed=0)
    up.merge(m, "a")
    with pytest.raises(UnipeftError, match="merged"):
        la.amplification(m, "a")


# --- spectrum and plots --------------------------------------------------

def test_spectrum_rank(tmp_path):
    m = attach_random(tiny_bert(), 3, "r3", seed=0)
    spec = la.spectrum((m, "r3"))
    assert len(spec) == 4
    for s in spec.values():
        assert s.shape == (32,)
        assert int((s > 1e-8 * s[0]).sum()) == 3
    up.save(m, tmp_path / "r3", name="r3")
    for p, s in la.spectrum(tmp_path / "r3").items():
        assert torch.allclose(s, spec[p], atol=1e-5)


def test_plots_write_png(tmp_path):
    m1 = attach_random(tiny_bert(), 4, "a", seed=1)
    m2 = attach_random(tiny_bert(), 8, "b", seed=2)
    out = la.plot_similarity(la.compare_deltas((m1, "a"), (m2, "b")), tmp_path / "sim.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    out = la.plot_spectrum(la.spectrum((m1, "a")), tmp_path / "spec.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


# --- command line --------------------------------------------------------

def _parse(argv):
    ap = argparse.ArgumentParser()
    lora_cli.add_arguments(ap)
    return ap.parse_args(argv)


def test_cli_similarity_and_spectrum_json(tmp_path, capsys):
    up.save(attach_random(tiny_bert(), 2, "a", seed=1), tmp_path / "a", name="a")
    up.save(attach_random(tiny_bert(), 4, "b", seed=2), tmp_path / "b", name="b")
    png = tmp_path / "fig.png"
    assert lora_cli.run(_parse(["--similarity", str(tmp_path / "a"), str(tmp_path / "b"),
                                "--json", "--plot", str(png)])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "similarity" and len(out["phi"]) == 4
    assert all(len(g) == 2 and len(g[0]) == 4 for g in out["phi"].values())
    assert png.stat().st_size > 1000
    assert lora_cli.run(_parse(["--spectrum", str(tmp_path / "b"), "--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert all(len(s) == 32 for s in out["singular_values"].values())
    assert lora_cli.run(_parse(["--similarity", str(tmp_path / "a"), str(tmp_path / "b")])) == 0
    assert "phi(i, i)" in capsys.readouterr().out


def test_cli_amplification_local_base(tmp_path, capsys):
    base = _diag_base()
    base.save_pretrained(tmp_path / "base")
    up.save(_rank1_along(base, "low", 31), tmp_path / "low", name="low")
    args = _parse(["--amplification", "--base", str(tmp_path / "base"), "--delta", str(tmp_path / "low"), "--json"])
    assert lora_cli.run(args) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == 4 and all(r["amplification"] == pytest.approx(1.6, rel=1e-5) for r in rows)
    assert lora_cli.run(_parse(["--amplification", "--base", str(tmp_path / "base"),
                                "--delta", str(tmp_path / "low")])) == 0
    assert "amplif." in capsys.readouterr().out


def test_cli_errors(tmp_path):
    with pytest.raises(UnipeftError, match="exactly one"):
        lora_cli.run(_parse([]))
    with pytest.raises(UnipeftError, match="needs --base"):
        lora_cli.run(_parse(["--amplification"]))
    with pytest.raises(UnipeftError, match="--plot"):
        lora_cli.run(_parse(["--amplification", "--plot", "x.png"]))
    with pytest.raises(UnipeftError, match="neither"):
        lora_cli.run(_parse(["--amplification", "--base", str(tmp_path / "nope"), "--delta", str(tmp_path)]))
    with pytest.raises(UnipeftError, match="no delta directory"):
        lora_cli.run(_parse(["--spectrum", str(tmp_path / "missing")]))


# --- the LoRA family: factors as each method defines them ----------------

def test_factors_of_random_rank_lora_from_a_saved_dir_use_each_modules_rank(tmp_path):
    model = tiny_bert()
    up.attach(model, up.LoRA(r=(1, 6), alpha=8, seed=3, targets=["query", "value"]), name="rr")
    with torch.no_grad():
        for d in lora_modules(model, "rr").values():
            d.lora_B.normal_()
    up.save(model, tmp_path / "rr", name="rr")
    live, saved = la.lora_factors((model, "rr")), la.lora_factors(str(tmp_path / "rr"))
    assert live.keys() == saved.keys() and len({a.shape[0] for a, _, _ in live.values()}) > 1
    for p, (a, b, s) in live.items():
        assert s == pytest.approx(8 / a.shape[0]) and saved[p][2] == pytest.approx(s)
        torch.testing.assert_close(saved[p][0], a)


def test_factors_of_dylora_follow_its_current_rank():
    model = tiny_bert()
    up.attach(model, up.DyLoRA(r=6, alpha=12, targets=["query", "value"]), name="dy")
    up.set_rank(model, "dy", 2)
    for a, b, s in la.lora_factors((model, "dy")).values():
        assert a.shape[0] == 2 and b.shape[1] == 2 and s == pytest.approx(12 / 2)
