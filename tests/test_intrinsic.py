"""Intrinsic-dimension training (up.Intrinsic): the projections, the subspace, the few-KB delta, SAID,
the memory bound of FastFood and bad input. The contract grid (tests/test_grid.py) and routing
(tests/test_routing.py) cover attach/detach/save/load/merge on every family."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tiny
import unipeft as up
from unipeft.fastfood import KINDS, Projection, fwht, hadamard, seed_for
from unipeft.methods.intrinsic import SubspaceDelta


def hadamard_matrix(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def base_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def space(model, name="t"):
    return up.engine.registry(model).deltas[name].module


@pytest.mark.parametrize("n", [1, 2, 8, 64, 32, 2048])
def test_fwht_is_the_hadamard_matrix_and_its_own_gradient(n):
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fwht(x), x @ hadamard_matrix(n).T)
    if n <= 64:
        assert torch.autograd.gradcheck(hadamard, (x,))
    with pytest.raises(ValueError, match="power-of-2"):
        fwht(torch.randn(6))


@pytest.mark.parametrize("bits", [12, 13, 17])
def test_fwht_of_long_vectors_follows_the_recursion(bits):
    """H_2n [x1; x2] = [H x1 + H x2; H x1 - H x2]: with the matrix test above (up to 2^11) this checks
    the passes whose index bits rotate through 2, 3 and 5 passes (17 = 4 + 4 + 4 + 4 + 1)."""
    n = 1 << bits
    x = torch.randn(2, n, dtype=torch.float64)
    h1, h2 = fwht(x[:, : n // 2]), fwht(x[:, n // 2:])
    torch.testing.assert_close(fwht(x), torch.cat([h1 + h2, h1 - h2], dim=1))


@pytest.mark.parametrize("kind", KINDS)
def test_projections_stay_float32_under_autocast(kind):
    """Autocast would run the transform's products in bf16, rounding every pass: P is float32 regardless."""
    p = Projection(kind, 30, 3000, seed=3)
    theta = torch.randn(30, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = p(theta)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, p(theta), rtol=0, atol=0)
    (g,) = torch.autograd.grad(y.sum(), theta)
    (g_ref,) = torch.autograd.grad(p(theta).sum(), theta)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


def test_fastfood_is_H_G_Pi_H_B_cut_to_D():
    """The fast transform equals the explicit product of the notes' factors, scaled."""
    d, D = 5, 12
    p = Projection("fastfood", d, D, seed=7)
    L = p.L
    assert L == 16
    H = hadamard_matrix(L)
    B, Pi, G = p.factors()
    assert torch.equal(G, p.G) and torch.equal(B[:d], p.B)
    Pi = torch.eye(L, dtype=torch.float64)[Pi]
    M = H @ torch.diag(G.double()) @ Pi @ H @ torch.diag(B.double())
    explicit = (M[:D, :d] * p.scale).float()
    x = torch.randn(d)
    torch.testing.assert_close(p(x), explicit @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d, D", [(37, 5000), (1000, 70000), (600, 600)])
def test_fastfood_first_transform_at_the_block_size_equals_the_full_one(d, D):
    """H B pad(x) is computed as a block-sized transform picked at Pi mod block: the same P x and the same
    gradient as the full L-sized transform (in float64) and the full permutation."""
    p = Projection("fastfood", d, D, seed=11)
    B, Pi, G = (t.double() if t.is_floating_point() or t.dtype == torch.int8 else t for t in p.factors())
    x = torch.randn(d, dtype=torch.float64, requires_grad=True)
    full = fwht(fwht(torch.nn.functional.pad(x, (0, p.L - d)) * B)[Pi] * G)[:D] * p.scale
    x32 = x.detach().float().requires_grad_()
    fast = p(x32)
    torch.testing.assert_close(fast.double(), full, rtol=1e-4, atol=1e-6)
    g = torch.randn(D, dtype=torch.float64)
    (gx,) = torch.autograd.grad(full, x, g)
    (gx32,) = torch.autograd.grad(fast, x32, g.float())
    torch.testing.assert_close(gx32.double(), gx, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_projections_are_linear_seeded_and_keep_norms(kind):
    d, D = 40, 5000
    p, same, other = Projection(kind, d, D, 1), Projection(kind, d, D, 1), Projection(kind, d, D, 2)
    x, y = torch.randn(d), torch.randn(d)
    torch.testing.assert_close(p(2 * x - 3 * y), 2 * p(x) - 3 * p(y), rtol=1e-4, atol=1e-4)
    assert torch.equal(p(x), same(x))
    assert not torch.allclose(p(x), other(x))
    ratios = torch.stack([p(v).norm() / v.norm() for v in torch.randn(20, d)])
    assert 0.8 < ratios.mean() < 1.2, ratios  # unit-norm columns (about): the kinds share a learning rate
    assert p.state_dict() == {}  # regenerated from the seed, never saved


def test_seed_for_is_stable_and_distinguishes_tensors():
    assert seed_for(0, "a.b") == seed_for(0, "a.b")
    assert len({seed_for(0, "a.b"), seed_for(1, "a.b"), seed_for(0, "a.c")}) == 3
    assert seed_for(0, "a.b") == 3017535922844728467  # fixed across processes and releases


def test_starts_at_the_base_and_trains_only_theta_d():
    model, x = tiny.make("bert"), tiny.batch("bert")
    before = base_state(model)
    with torch.no_grad():
        base = tiny.logits(model, x)
    up.attach(model, up.Intrinsic(d=200, train_head=False), name="t")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["unipeft_modules.t.theta"]
    assert up.trainable_parameters(model)[0] == 200
    with torch.no_grad():
        assert torch.equal(tiny.logits(model, x), base)
    opt = torch.optim.Adam([space(model).theta], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = tiny.logits(model, x).float().pow(2).mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.7 * losses[0]
    for n, p in model.named_parameters():
        if "unipeft_" not in n:
            assert torch.equal(p, before[n]), n


def test_every_linear_map_and_embedding_table_by_default():
    model = tiny.make("bert")
    up.attach(model, up.Intrinsic(d=100, train_head=False), name="t")
    reg = up.engine.registry(model)
    sites = reg.deltas["t"].linear
    tables = {"bert.embeddings.word_embeddings"}
    assert set(sites) == set(reg.map.roles) | tables
    for path, d in sites.items():
        m = model.get_submodule(path)
        assert d.proj.D == m.weight.numel() + (m.bias.numel() if path not in tables else 0)
    base_numel = sum(p.numel() for n, p in model.named_parameters() if "unipeft_" not in n)
    left_out = sum(p.numel() for n, p in model.named_parameters()  # LayerNorms, position tables, the head
                   if "LayerNorm" in n or "position" in n or "token_type" in n
                   or n.startswith(("classifier", "bert.pooler")))
    assert sum(d.proj.D for d in sites.values()) == base_numel - left_out


def test_a_tied_lm_head_sees_the_embedding_change_and_merging_adds_it_once():
    model, x = tiny.make("gpt2"), tiny.batch("gpt2")
    before = base_state(model)
    up.attach(model, up.Intrinsic(d=100), name="t")
    sites = up.engine.registry(model).deltas["t"].linear
    assert sites["lm_head"].proj is sites["transformer.wte"].proj and sites["lm_head"].follower
    assert list(sites).index("lm_head") < list(sites).index("transformer.wte")  # merges (as a no-op) first
    with torch.no_grad():
        space(model).theta.normal_()
        unmerged = tiny.logits(model, x)
        up.merge(model, "t")
        torch.testing.assert_close(tiny.logits(model, x), unmerged, rtol=1e-4, atol=1e-4)
        dw = sites["transformer.wte"].change()[0]
        torch.testing.assert_close(model.lm_head.weight, before["transformer.wte.weight"] + dw)
        up.unmerge(model, "t")
        assert torch.equal(tiny.logits(model, x), unmerged)
    up.detach(model, "t")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_embeddings_false_projects_the_linear_maps_only():
    model = tiny.make("bert")
    up.attach(model, up.Intrinsic(d=100, embeddings=False, train_head=False), name="t")
    reg = up.engine.registry(model)
    assert set(reg.deltas["t"].linear) == set(reg.map.roles)


@pytest.mark.parametrize("kind", KINDS)
def test_the_delta_file_is_theta_d_alone_a_few_kb(kind, tmp_path):
    import json

    model, x = tiny.make("gpt2"), tiny.batch("gpt2")
    up.attach(model, up.Intrinsic(d=1000, projection=kind, seed=5), name="t")
    with torch.no_grad():
        space(model).theta.normal_(0, 0.05)
        expected = tiny.logits(model, x)
    target = up.save(model, tmp_path / "d", name="t")
    meta = json.loads((target / "delta.json").read_text())
    assert set(meta["tensors"]) == {"model:theta"}  # gpt2's LM head is tied: no head of its own
    assert meta["method"]["options"]["seed"] == 5
    assert (target / "delta.safetensors").stat().st_size < 4000 + 200
    fresh = tiny.make("gpt2")
    up.load(fresh, target)
    with torch.no_grad():
        assert torch.equal(tiny.logits(fresh, x), expected)
    up.detach(fresh, "t")
    up.load(fresh, target, name="other")
    fresh2 = tiny.make("gpt2")  # another seed gives another subspace: the same theta_d lands elsewhere
    up.attach(fresh2, up.Intrinsic(d=1000, projection=kind, seed=6), name="t")
    with torch.no_grad():
        space(fresh2).theta.copy_(space(fresh, "other").theta)
        assert not torch.allclose(tiny.logits(fresh2, x), expected)


class _Largest(TorchDispatchMode):
    """The largest tensor any operation produces (what a D x d matrix would be)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", ["fastfood", "sparse"])
def test_no_D_by_d_tensor_is_ever_built(kind):
    """Attach, forward, backward and merge with d = 1,000: FastFood and sparse never hold anything of
    the size of a D x d projection (here D_i x d >= 1M for the FFN maps): FastFood stays O(D), sparse
    O(d sqrt(D))."""
    model, x = tiny.make("bert"), tiny.batch("bert")
    d = 1000
    with _Largest() as seen:
        up.attach(model, up.Intrinsic(d=d, projection=kind, train_head=False), name="t")
        space(model).theta.data.normal_()
        tiny.logits(model, x).float().pow(2).mean().backward()
        up.merge(model, "t")
    largest_site = max(d.proj.D for d in up.engine.registry(model).deltas["t"].linear.values())
    assert largest_site * d > 2_000_000
    bound = 4 * 4096 if kind == "fastfood" else 2 * d * int(largest_site ** 0.5 + 1)
    assert seen.largest <= bound, (seen.largest, bound)
    assert space(model).theta.grad is not None


def test_said_one_scale_per_matrix_within_d():
    model, x = tiny.make("llama"), tiny.batch("llama")
    up.attach(model, up.Intrinsic(d=100, said=True, train_head=False), name="t")
    sites = list(up.engine.registry(model).deltas["t"].linear.values())
    m = len(sites)
    s = space(model)
    assert s.theta.numel() == 100 - m and s.scales.numel() == m
    assert up.trainable_parameters(model)[0] == 100
    assert sorted(d.index for d in sites) == list(range(m))
    with torch.no_grad():
        s.theta.normal_()
        dw, _ = sites[0].change()
        s.scales[sites[0].index] = 3.0
        dw3, _ = sites[0].change()
        torch.testing.assert_close(dw3, 3 * dw)
        assert torch.equal(sites[1].change()[0], sites[1].change()[0])
    tiny.logits(model, x).float().pow(2).mean().backward()
    assert s.scales.grad is not None and s.scales.grad.abs().sum() > 0


def test_targets_restrict_the_projected_maps():
    model = tiny.make("bert")
    up.attach(model, up.Intrinsic(d=50, targets=["query", "value"], embeddings=False, train_head=False), name="t")
    paths = list(up.engine.registry(model).deltas["t"].linear)
    assert len(paths) == 4 and all(p.endswith(("query", "value")) for p in paths)


def test_composes_with_lora_at_the_same_maps():
    model, x = tiny.make("bert"), tiny.batch("bert")
    up.attach(model, up.Intrinsic(d=64, train_head=False), name="i")
    up.attach(model, up.LoRA(r=2, targets="all-linear", init="gaussian", train_head=False), name="l")
    with torch.no_grad():
        space(model, "i").theta.normal_(0, 0.1)
        for p in up.engine.registry(model).deltas["l"].parameters():
            p.normal_(0, 0.1)
        up.activate(model, ["i"])
        only_i = tiny.logits(model, x)
        up.activate(model, ["i", "l"])
        both = tiny.logits(model, x)
        up.merge(model, "i")
        torch.testing.assert_close(tiny.logits(model, x), both, rtol=1e-4, atol=1e-5)
        up.unmerge(model, "i")
    assert not torch.allclose(only_i, both)


def test_bfloat16_base_computes_the_projection_in_float32():
    model, x = tiny.make("gpt2").to(torch.bfloat16), tiny.batch("gpt2")
    up.attach(model, up.Intrinsic(d=100), name="t")
    assert space(model).theta.dtype == torch.bfloat16
    d = next(iter(up.engine.registry(model).deltas["t"].linear.values()))
    assert d.change()[0].dtype == torch.float32
    out = tiny.logits(model, x)
    out.float().pow(2).mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(space(model).theta.grad).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"d": 10**9}, r"d=1000000000 is larger than the D=.* parameters it projects onto"),
    ({"d": 10, "said": True}, r"with said=True, d=10 must exceed the m=\d+ per-matrix scales"),
    ({"d": 64, "targets": "nonexistent_map"}, r"target 'nonexistent_map' matches no linear module"),
])
def test_bad_sizes_one_line_error_and_model_unchanged(kwargs, match):
    model = tiny.make("llama")
    before = base_state(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(up.UnipeftError, match=match) as e:
        up.attach(model, up.Intrinsic(**kwargs), name="t")
    assert "\n" not in str(e.value)
    assert up.engine.registry(model) is None
    assert {n: type(m) for n, m in model.named_modules()} == classes
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad


def test_dense_refuses_a_projection_too_large(monkeypatch):
    import unipeft.methods.intrinsic as intrinsic

    monkeypatch.setattr(intrinsic, "DENSE_LIMIT", 10_000)
    model = tiny.make("bert")
    with pytest.raises(up.UnipeftError, match="dense projection would hold d x D = .*use projection='fastfood'"):
        up.attach(model, up.Intrinsic(d=100, projection="dense"), name="t")
    assert up.engine.registry(model) is None
    up.attach(model, up.Intrinsic(d=100, projection="fastfood"), name="t")


@pytest.mark.parametrize("kwargs,match", [
    ({"projection": "gaussian"}, r"projection must be 'fastfood', 'dense' or 'sparse', got 'gaussian'"),
    ({"d": 0}, r"d must be an integer >= 1"),
    ({"d": 2.5}, r"d must be an integer >= 1"),
    ({"said": "yes"}, r"said must be True or False"),
    ({"embeddings": 1}, r"embeddings must be True or False"),
    ({"seed": "x"}, r"seed must be an integer"),
    ({"dim": 3}, r"unknown option 'dim'"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(up.UnipeftError, match=match) as e:
        up.Intrinsic(**kwargs)
    assert "\n" not in str(e.value)


def test_every_site_is_a_subspace_delta_holding_no_tensor_of_its_own():
    model = tiny.make("t5")
    up.attach(model, up.Intrinsic(d=32, projection="sparse", train_head=False), name="t")
    ds = list(up.engine.registry(model).deltas["t"].linear.values())
    assert ds and all(isinstance(d, SubspaceDelta) and d.state_dict() == {} for d in ds)
    assert all(d.space is space(model) for d in ds)  # one theta_d for the whole model


# ---------------------------------------------------------------------------
# unipeft analyze intrinsic-dim: the d90 sweep
# ---------------------------------------------------------------------------

def test_d90_is_the_smallest_d_reaching_90_percent_of_full():
    from unipeft.analysis.intrinsic_dim import d_threshold

    metrics = {10: 0.50, 100: 0.79, 1000: 0.82, 10000: 0.80}
    assert d_threshold(metrics, full=0.90) == 1000        # 0.9 * 0.90 = 0.81: 0.79 misses, 0.82 reaches
    assert d_threshold(metrics, full=0.87) == 100         # 0.783
    assert d_threshold(metrics, full=0.99) is None
    assert d_threshold(metrics, full=0.90, fraction=0.5) == 10


def test_sweep_on_a_tiny_model_reports_each_d_against_full_fine_tuning(tmp_path, capsys):
    """The whole command on a tiny BERT and synthetic sentiment: a run per d and one of full
    fine-tuning, the JSON report, the table and the log-scale figure."""
    import json

    from unipeft import cli
    from unipeft.analysis import intrinsic_dim

    folder = tiny.save(tmp_path / "bert", "bert", "cls", dropout=False)
    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(120)]
    train = tiny.write_csv(tmp_path / "train.csv", ["text", "label"], rows[:100])
    dev = tiny.write_csv(tmp_path / "dev.csv", ["text", "label"], rows[100:])
    out = tmp_path / "sweep"
    rc = cli.main(["analyze", "intrinsic-dim", "--model", folder, "--task", "sent", "--train", train, "--dev", dev,
                   "--dims", "8,2048",
                   "--max-steps", "60", "--batch-size", "16", "--lr", "3e-2", "--full-lr", "3e-3",
                   "--out", str(out), "--plot", str(tmp_path / "d90.png"), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    report = intrinsic_dim.read_report(out)
    assert printed["d90"] == report["d90"]
    assert [r["d"] for r in report["runs"]] == [8, 2048]
    assert report["main_metric"] == "accuracy" and report["full"]["metric"] >= 0.85  # full fine-tuning learns it
    assert report["full"]["lr"] == 3e-3 and all(r["lr"] == 3e-2 for r in report["runs"])
    # d counts the subspace; the trained classifier head (32 x 2 + 2) comes on top
    assert [r["trainable_params"] for r in report["runs"]] == [8 + 66, 2048 + 66]
    # the notes' picture on a toy: 8 directions are not enough, 2,048 of the 22,016 reach full fine-tuning
    assert report["runs"][0]["fraction_of_full"] < 0.9 <= report["runs"][1]["fraction_of_full"]
    assert report["d90"] == 2048
    model = tiny.make("bert")
    assert report["D"] == sum(p.numel() for n, p in model.named_parameters()  # no LayerNorm, position table, head
                              if "LayerNorm" not in n and "position" not in n and "token_type" not in n
                              and not n.startswith(("classifier", "bert.pooler")))
    for r in report["runs"]:
        assert r["fraction_of_full"] == pytest.approx(r["metric"] / report["full"]["metric"])
    assert {"full", "d8", "d2048"} <= {p.name for p in out.iterdir()}
    assert (tmp_path / "d90.png").stat().st_size > 1000
    text = intrinsic_dim.format_report(report)
    assert "full" in text and "2,048" in text and "d90 = 2,048 of D = " in text
    assert cli.main(["analyze", "intrinsic-dim", "--report", str(out)]) == 0
    assert "d90" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--dims", "10,x"], "--dims must be comma-separated integers"),
    (["--dims", "0,10"], "--dims must be comma-separated integers >= 1"),
    (["--report", "/nonexistent/sweep"], "no intrinsic-dim report at"),
])
def test_intrinsic_dim_cli_bad_input(argv, match, capsys):
    from unipeft import cli

    assert cli.main(["analyze", "intrinsic-dim", *argv]) != 0
    err = capsys.readouterr().err
    assert match in err


def test_without_autograd_the_change_is_computed_once_until_theta_moves():
    model = tiny.make("bert")
    up.attach(model, up.Intrinsic(d=64, said=True, train_head=False), name="t")
    site = next(iter(up.engine.registry(model).deltas["t"].linear.values()))
    s = space(model)
    with torch.no_grad():
        first = site.change()[0]
        assert site.change()[0] is first  # evaluation and generation reuse it
        s.theta.add_(0.1)
        moved = site.change()[0]
        assert moved is not first and not torch.equal(moved, first)
        s.scales.mul_(2)
        torch.testing.assert_close(site.change()[0], 2 * moved)
    with_grad = site.change()[0]
    assert with_grad is not moved and with_grad.requires_grad  # training recomputes, for the gradient


def test_sweep_goes_on_past_a_diverged_run_and_reads_d90_off_the_rest(tmp_path, monkeypatch):
    """The sweep's bookkeeping with the training replaced: a diverged d is a row without a metric."""
    from unipeft.analysis import intrinsic_dim
    from unipeft.training import TrainingDiverged, run

    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(20)]
    data = {"train": tiny.write_csv(tmp_path / "train.csv", ["text", "label"], rows[:10]),
            "dev": tiny.write_csv(tmp_path / "dev.csv", ["text", "label"], rows[10:])}
    scores = {10: 0.6, 100: None, 1000: 0.85}

    def fake_train(model, task, method, out=None, method_options=None, **kw):
        if method == "full":
            return {"dev": {"accuracy": 0.9}, "trainable_params": 1000, "lr": kw.get("lr") or 2e-4}
        d = method_options["d"]
        if scores[d] is None:
            raise TrainingDiverged("the loss became nan at step 3")
        net = up.attach(tiny.make("bert"), up.Intrinsic(d=d), name="t")
        return {"dev": {"accuracy": scores[d]}, "trainable_params": d, "lr": 2e-3, "_model": net}

    monkeypatch.setattr(run, "train", fake_train)
    report = intrinsic_dim.sweep("unused", "sent", [1000, 10, 100], out=tmp_path / "s", data=data,
                                 say=lambda *a: None)
    assert [r["d"] for r in report["runs"]] == [10, 100, 1000]
    assert report["runs"][1]["metric"] is None and "nan" in report["runs"][1]["error"]
    assert report["d90"] == 1000 and report["runs"][2]["fraction_of_full"] == pytest.approx(0.85 / 0.9)
    assert "diverged" in intrinsic_dim.format_report(report)
    intrinsic_dim.plot(report, tmp_path / "p.png")
    assert intrinsic_dim.read_report(tmp_path / "s")["d90"] == 1000


def test_fastfood_speed_benchmark_quick_run(capsys):
    """benchmarks/fastfood_speed.py's smoke run: its former computation still agrees with the module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fastfood_speed.py"
    spec = importlib.util.spec_from_file_location("fastfood_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--threads", str(threads)]) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark sets the process's thread count
    out = capsys.readouterr().out
    diff = float(out.rsplit("largest relative difference ", 1)[1].split()[0])
    assert diff < 1e-5, out
