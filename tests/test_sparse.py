"""Sparse deltas (seed 004's sparse fine-tuning, seed 001's diff pruning): what the grid does not check.

The file holds indices + values only (its size grows with k, pinned), two sparse deltas on one
model add up and each detaches leaving the other exact, a corrupted file is one error and
leaves the model as it was, each selection (LT-SFT, magnitude, movement, FISH) picks its k
entries by itself at step ``select_after`` of a plain loop, of unipeft's trainer and of
transformers.Trainer, weight decay never leaks outside the mask, DiffPruning's L0 penalty
works with no line in the loop and its projection keeps exactly k entries, and what
``up.save`` writes is the model in memory at any moment.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
import unipeft as up
from unipeft import sparse
from unipeft.errors import UnipeftError

FAMILY = "bert"


def record(model, name="t"):
    return up.engine.registry(model).deltas[name]


def targets(model, name="t"):
    return list(record(model, name).sparse.values)


def base_values(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "unipeft_" not in n}


def loss(model, inputs):
    return tiny.logits(model, inputs).float().pow(2).mean()


def steps(model, inputs, n, lr=1e-2, weight_decay=0.0, opt=None):
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                   weight_decay=weight_decay)
    model.train()
    for _ in range(n):
        loss(model, inputs).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


def changed(model, before, paths):
    """Entries of ``paths`` that differ from ``before``, per path (flat indices)."""
    return {p: (model.get_parameter(p).detach().reshape(-1) != before[p].reshape(-1)).nonzero().view(-1)
            for p in paths}


def total(model, paths):
    return sum(model.get_parameter(p).numel() for p in paths)


def run(model, inputs):
    with torch.no_grad():
        return tiny.logits(model, inputs)


# ---------------------------------------------------------------------------
# storage: indices + values, size proportional to k
# ---------------------------------------------------------------------------

def test_the_file_holds_indices_and_values_and_grows_with_k(tmp_path):
    x = tiny.batch(FAMILY)
    sizes = {}
    for density in (0.01, 0.04):
        model = tiny.make(FAMILY)
        up.attach(model, up.SparseFT(select="magnitude", density=density, train_head=False), name="t")
        steps(model, x, 2)
        k = record(model).sparse.count()
        assert k == round(density * total(model, targets(model)))
        d = up.save(model, tmp_path / str(density), name="t")
        tensors = load_file(str(d / "delta.safetensors"))
        assert set(tensors) == {f"sparse:{p}.{part}" for p in targets(model) for part in ("indices", "values")}
        assert sum(t.numel() for k_, t in tensors.items() if k_.endswith(".indices")) == k
        assert all(t.dtype == torch.int32 for k_, t in tensors.items() if k_.endswith(".indices"))
        assert json.loads((d / "delta.json").read_text())["parameters"] == 2 * k
        sizes[density] = (k, (d / "delta.safetensors").stat().st_size)
    (k1, s1), (k2, s2) = sizes[0.01], sizes[0.04]
    # 4 bytes of index + 4 of value per entry; the header differs only by a few digits of shapes
    assert abs((s2 - s1) - 8 * (k2 - k1)) <= 64, (s1, s2, k1, k2)
    assert s1 <= 8 * k1 + 200 * 2 * len(targets(model)) + 1024  # nothing else: no dense tensor, no mask


def test_save_mid_selection_writes_the_model_in_memory(tmp_path):
    """During LT-SFT's dense phase the delta is dense: the file says so, and loads to the same model."""
    model, x = tiny.make(FAMILY), tiny.batch(FAMILY)
    up.attach(model, up.SparseFT(select="lt-sft", density=0.02, select_after=5), name="t")
    steps(model, x, 2)
    expected = run(model, x)
    d = up.save(model, tmp_path / "mid", name="t")
    assert torch.equal(run(model, x), expected)  # saving changes nothing: memory is original + values
    fresh = tiny.make(FAMILY)
    up.load(fresh, d)
    assert torch.equal(run(fresh, x), run(model, x))
    assert record(fresh).sparse.count() == total(fresh, targets(fresh))


# ---------------------------------------------------------------------------
# composition: theta + delta_task + delta_lang
# ---------------------------------------------------------------------------

def test_two_sparse_deltas_add_up_and_each_detaches_leaving_the_other_exact(tmp_path):
    x, other = tiny.batch(FAMILY), tiny.batch(FAMILY, seed=5)
    model = tiny.make(FAMILY)
    base, before = run(model, x), base_values(model)
    up.attach(model, up.SparseFT(select="magnitude", density=0.05, train_head=False), name="task")
    steps(model, x, 3)
    up.save(model, tmp_path / "task", name="task")
    up.attach(model, up.SparseFT(select="fish", density=0.05, select_after=1, train_head=False), name="lang")
    steps(model, other, 3)
    up.save(model, tmp_path / "lang", name="lang")
    up.activate(model, ["task", "lang"])
    task, lang = record(model, "task").sparse, record(model, "lang").sparse
    for p in targets(model, "task"):
        want = before[p].reshape(-1).clone()
        want.index_add_(0, task.indices[p], task.values[p])
        want.index_add_(0, lang.indices[p], lang.values[p])
        assert torch.equal(model.get_parameter(p).reshape(-1), want), p
    assert any(bool((task.indices[p].unsqueeze(1) == lang.indices[p]).any()) for p in task.values)  # overlap
    both = run(model, x)
    alone = {}
    for name in ("task", "lang"):
        fresh = tiny.make(FAMILY)
        up.load(fresh, tmp_path / name)
        alone[name] = run(fresh, x)
    assert not torch.equal(both, alone["task"]) and not torch.equal(both, alone["lang"])
    up.detach(model, "task")
    assert up.active(model) == ["lang"]
    assert torch.equal(run(model, x), alone["lang"])
    up.detach(model, "lang")
    assert torch.equal(run(model, x), base)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_switching_one_of_two_sparse_deltas_off_and_on_is_exact():
    x = tiny.batch(FAMILY)
    model = tiny.make(FAMILY)
    up.attach(model, up.SparseFT(select="magnitude", density=0.05), name="a")
    steps(model, x, 2)
    a_alone = run(model, x)
    up.attach(model, up.SparseFT(select="magnitude", density=0.02, train_head=False), name="b")
    steps(model, x, 2)
    up.activate(model, ["a", "b"])
    both = run(model, x)
    up.activate(model, ["a"])
    assert torch.equal(run(model, x), a_alone)
    up.activate(model, ["a", "b"])
    assert torch.equal(run(model, x), both)


def test_a_sparse_delta_and_a_dense_selective_one_on_one_tensor_are_refused_together():
    model = tiny.make(FAMILY)
    up.attach(model, up.SparseFT(select="magnitude", density=0.05, train_head=False), name="s")
    up.attach(model, up.FullFineTune(train_head=False), name="f")
    with pytest.raises(UnipeftError, match="both train parameter"):
        up.activate(model, ["s", "f"])


# ---------------------------------------------------------------------------
# a corrupted file
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["outside", "negative", "repeated", "lengths", "missing"])
def test_a_corrupted_file_is_one_error_and_the_model_is_unchanged(tmp_path, damage):
    x = tiny.batch(FAMILY)
    model = tiny.make(FAMILY)
    up.attach(model, up.SparseFT(select="magnitude", density=0.05), name="t")
    steps(model, x, 2)
    d = up.save(model, tmp_path / "d", name="t")
    tensors = load_file(str(d / "delta.safetensors"))
    key = max((k for k in tensors if k.endswith(".indices")), key=lambda k: tensors[k].numel())
    p = key[len("sparse:"):-len(".indices")]
    idx = tensors[key].clone()
    if damage == "outside":
        idx[-1] = model.get_parameter(p).numel() + 3
    elif damage == "negative":
        idx[0] = -1
    elif damage == "repeated":
        idx[1] = idx[0]
    tensors[key] = idx
    if damage == "lengths":
        tensors[key] = idx[:-1]
    if damage == "missing":
        del tensors[key]
    save_file(tensors, str(d / "delta.safetensors"))
    meta = json.loads((d / "delta.json").read_text())
    meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()}
    (d / "delta.json").write_text(json.dumps(meta))
    other = tiny.make(FAMILY)
    up.attach(other, up.SparseFT(select="magnitude", density=0.02, train_head=False), name="keep")
    steps(other, x, 1)
    before, out = base_values(other), run(other, x)
    with pytest.raises(UnipeftError) as e:
        up.load(other, d, name="bad")
    assert "\n" not in str(e.value)
    if damage in ("outside", "negative"):
        assert "fall outside the base tensor" in str(e.value)
    assert up.deltas(other).keys() == {"keep"} and up.active(other) == ["keep"]
    assert torch.equal(run(other, x), out)
    for n, p in other.named_parameters():
        assert torch.equal(p, before[n]), n


# ---------------------------------------------------------------------------
# the selections, in a plain loop
# ---------------------------------------------------------------------------

def test_magnitude_keeps_the_k_pretrained_entries_farthest_from_zero():
    model, x = tiny.make(FAMILY), tiny.batch(FAMILY)
    before = base_values(model)
    up.attach(model, up.SparseFT(select="magnitude", density=0.03), name="t")
    paths = targets(model)
    k = round(0.03 * total(model, paths))
    flat = torch.cat([before[p].reshape(-1).abs() for p in paths])
    threshold = flat.topk(k).values.min()
    state = record(model).sparse
    assert state.count() == k and state.fixed()
    for p in paths:
        assert bool((before[p].reshape(-1)[state.indices[p]].abs() >= threshold).all())
    steps(model, x, 3, weight_decay=0.1)
    moved = changed(model, before, paths)
    assert sum(v.numel() for v in moved.values()) == k
    for p in paths:
        assert set(moved[p].tolist()) <= set(state.indices[p].tolist())


def test_lt_sft_trains_densely_keeps_the_k_that_moved_most_resets_and_retrains_them():
    model, x = tiny.make(FAMILY), tiny.batch(FAMILY)
    before = base_values(model)
    up.attach(model, up.SparseFT(select="lt-sft", density=0.02, select_after=3), name="t")
    paths = targets(model)
    opt = steps(model, x, 2)
    assert sum(v.numel() for v in changed(model, before, paths).values()) > 0.5 * total(model, paths)  # dense
    # the third step: the moves it leaves decide the mask
    model.train()
    loss(model, x).backward()
    real = sparse.choose
    seen = {}

    def spy(m, reg, delta, c):
        seen.update({p: (m.get_parameter(p).detach() - before[p]).abs().reshape(-1) for p in paths})
        real(m, reg, delta, c)

    sparse.choose = spy
    try:
        opt.step()
    finally:
        sparse.choose = real
    opt.zero_grad()
    state = record(model).sparse
    k = round(0.02 * total(model, paths))
    assert state.fixed() and state.count() == k
    kept = torch.cat([seen[p][state.indices[p]] for p in paths])
    assert kept.min() >= torch.cat([seen[p] for p in paths]).topk(k).values.min()
    # reset to the pretrained values
    for p in paths:
        assert torch.equal(model.get_parameter(p), before[p]), p
    assert all(bool((v == 0).all()) for v in state.values.values())
    steps(model, x, 3, opt=opt)
    after = changed(model, before, paths)
    assert 0 < sum(v.numel() for v in after.values()) <= k
    for p in paths:
        assert set(after[p].tolist()) <= set(state.indices[p].tolist())


def test_fish_reads_the_fisher_over_n_batches_before_training_then_trains_only_k():
    model, x = tiny.make(FAMILY), tiny.batch(FAMILY)
    before = base_values(model)
    up.attach(model, up.SparseFT(select="fish", density=0.02, select_after=3, train_head=False), name="t")
    paths = targets(model)
    grads = {p: torch.zeros_like(before[p]) for p in paths}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss(model, x).backward()
        for p in paths:
            grads[p] += model.get_parameter(p).grad ** 2
        opt.step()
        opt.zero_grad()
        for p in paths:  # nothing trains while the Fisher is read
            assert torch.equal(model.get_parameter(p), before[p]), p
    state = record(model).sparse
    k = round(0.02 * total(model, paths))
    assert state.fixed() and state.count() == k
    fisher = torch.cat([grads[p].reshape(-1) for p in paths])
    kept = torch.cat([grads[p].reshape(-1)[state.indices[p]] for p in paths])
    assert kept.min() >= fisher.topk(k).values.min() * (1 - 1e-5)
    steps(model, x, 2, opt=opt)
    after = changed(model, before, paths)
    assert 0 < sum(v.numel() for v in after.values()) <= k
    for p in paths:
        assert set(after[p].tolist()) <= set(state.indices[p].tolist())


def test_movement_keeps_the_k_largest_scores_with_what_they_learnt():
    model, x = tiny.make(FAMILY), tiny.batch(FAMILY)
    before = base_values(model)
    up.attach(model, up.SparseFT(select="movement", density=0.02, select_after=2, train_head=False), name="t")
    paths = targets(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scores = {p: torch.zeros_like(before[p]) for p in paths}
    for i in range(2):
        loss(model, x).backward()
        for p in paths:
            param = model.get_parameter(p)
            scores[p] -= param.grad * param.detach()
        trained = {p: (model.get_parameter(p) - 1e-2 * model.get_parameter(p).grad).detach() for p in paths}
        opt.step()
        opt.zero_grad()
    state = record(model).sparse
    k = round(0.02 * total(model, paths))
    assert state.fixed() and state.count() == k
    kept = torch.cat([scores[p].reshape(-1)[state.indices[p]] for p in paths])
    assert kept.min() >= torch.cat([s.reshape(-1) for s in scores.values()]).topk(k).values.min() - 1e-9
    for p in paths:  # kept entries keep their trained values, the others go back to the pretrained ones
        flat, idx = model.get_parameter(p).detach().reshape(-1), state.indices[p]
        want = before[p].reshape(-1).clone()
        want[idx] = trained[p].reshape(-1)[idx]
        torch.testing.assert_close(flat, want, rtol=0, atol=1e-7)


def test_gradients_outside_the_mask_are_zero_before_clipping():
    model, x = tiny.make(FAMILY), tiny.batch(FAMILY)
    up.attach(model, up.SparseFT(select="magnitude", density=0.05, train_head=False), name="t")
    loss(model, x).backward()
    state = record(model).sparse
    for p in targets(model):
        g = model.get_parameter(p).grad.reshape(-1).clone()
        g[state.indices[p]] = 0
        assert not g.any(), p


def test_a_fraction_of_the_run_needs_its_length_in_a_plain_loop():
    model, x = tiny.make(FAMILY), tiny.batch(FAMILY)
    up.attach(model, up.SparseFT(select="lt-sft", select_after=0.5), name="t")
    with pytest.raises(UnipeftError, match="select_after=0.5 is a fraction of the run"):
        steps(model, x, 1)
    from unipeft import step_hooks

    step_hooks.plan(model, 4)
    steps(model, x, 2)
    assert record(model).sparse.fixed()


def test_finalize_fixes_the_mask_of_a_delta_still_selecting():
    model, x = tiny.make(FAMILY), tiny.batch(FAMILY)
    up.attach(model, up.SparseFT(select="lt-sft", density=0.02, select_after=100), name="t")
    steps(model, x, 2)
    up.finalize(model, "t")
    state = record(model).sparse
    assert state.fixed() and state.count() == round(0.02 * total(model, targets(model)))


# ---------------------------------------------------------------------------
# unipeft's trainer and transformers.Trainer run the selection by themselves
# ---------------------------------------------------------------------------

def test_unipeft_trainer_runs_both_lt_sft_phases(tmp_path):
    from unipeft.training import TrainConfig, Trainer
    from unipeft.training import run as recipes
    from unipeft.training.tasks import Task

    path = tiny.save(tmp_path / "bert", "bert", "cls")
    task = Task("sent", "classification", labels=("neg", "pos"))
    train = [{"text": t, "target": y} for t, y in tiny.sentiment_rows(48)]
    model, tok = recipes.load_model(path, task)
    before = base_values(model)
    up.attach(model, up.SparseFT(select="lt-sft", density=0.01, select_after=0.5, train_head=False), name="s",
              tokenizer=tok)
    cfg = TrainConfig(max_steps=6, batch_size=8, lr=1e-2, precision="fp32", progress=False)
    Trainer(model, tok, task, train, None, cfg, None, cache=False).fit()
    paths = targets(model, "s")
    state = record(model, "s").sparse
    assert state.fixed() and state.count() == round(0.01 * total(model, paths))
    moved = changed(model, before, paths)
    assert 0 < sum(v.numel() for v in moved.values()) <= state.count()


def test_transformers_trainer_selects_fish_and_adds_diff_pruning_l0(tmp_path):
    from transformers import Trainer, TrainingArguments

    from unipeft.integrations import SaveDeltaCallback

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, tiny.VOCAB, (4, 12), generator=g)
    rows = [{"input_ids": ids[i % 4], "attention_mask": torch.ones(12, dtype=torch.long), "labels": ids[i % 4]}
            for i in range(16)]
    model = tiny.make("gpt2")
    up.attach(model, up.SparseFT(select="fish", density=0.01, select_after=0.5), name="s")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                             seed=0)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[SaveDeltaCallback()]).train()
    assert record(model, "s").sparse.fixed()
    saved = load_file(str(tmp_path / "out" / "unipeft" / "s" / "delta.safetensors"))
    assert sum(t.numel() for k, t in saved.items() if k.endswith(".indices")) == record(model, "s").sparse.count()

    up.detach(model, "s")
    up.attach(model, up.DiffPruning(sparsity=0.9, l0_weight=1.0), name="d")
    densities = []
    for _ in range(2):
        Trainer(model=model, args=args, train_dataset=rows).train()
        densities.append(density(model, "d"))
    assert densities[1] < densities[0] < 1.0


# ---------------------------------------------------------------------------
# DiffPruning
# ---------------------------------------------------------------------------

def density(model, name):
    from unipeft.methods.diff_pruning import DiffDelta

    with torch.no_grad():
        probs = [d.open_probability() for d in record(model, name).linear.values() if isinstance(d, DiffDelta)]
    return float(sum(p.sum() for p in probs) / sum(p.numel() for p in probs))


def test_diff_pruning_l0_penalty_needs_no_line_in_the_loop_and_stops_at_the_target():
    x = tiny.batch(FAMILY)
    out = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = tiny.make(FAMILY)
        up.attach(model, up.DiffPruning(sparsity=0.5, l0_weight=weight, init_log_alpha=0.5), name="t")
        steps(model, x, 8, lr=0.1)
        out[weight] = density(model, "t")
    assert out[1.0] < out[0.0] - 0.1
    assert out[1.0] >= 0.5 - 0.1  # stopped near the target, not driven to zero


def test_diff_pruning_finalize_keeps_exactly_k_entries_and_save_is_the_model_in_memory(tmp_path):
    from unipeft.methods.diff_pruning import DiffDelta

    model, x = tiny.make(FAMILY), tiny.batch(FAMILY)
    before = base_values(model)
    up.attach(model, up.DiffPruning(sparsity=0.99), name="t")
    steps(model, x, 3)
    maps = [p for p, d in record(model).linear.items() if isinstance(d, DiffDelta)]
    n = sum(model.get_submodule(m).weight.numel() for m in maps)
    d = up.save(model, tmp_path / "d", name="t")  # finalizes the live model too
    state = record(model).sparse
    assert record(model).config.finalized and state.count() == round(0.01 * n)
    assert not any(isinstance(m, DiffDelta) for m in model.modules())
    assert sum(v.numel() for v in changed(model, before, list(state.values)).values()) <= state.count()
    expected = run(model, x)
    fresh = tiny.make(FAMILY)
    up.load(fresh, d)
    assert torch.equal(run(fresh, x), expected)
    up.finalize(model, "t")  # once only
    assert torch.equal(run(model, x), expected)
    assert json.loads((d / "delta.json").read_text())["method"]["options"]["finalized"] is True


def test_diff_pruning_saved_with_keep_training_writes_the_final_form_and_trains_on(tmp_path, monkeypatch):
    """``up.save(..., keep_training=True)`` (a checkpoint in the middle of a run) writes the bytes that
    finalize-then-save writes, without taking the final form: the live delta stays gated and trains on.
    SaveDeltaCallback uses it instead of a deep copy of the whole model (memory for a second copy)."""
    import copy

    from unipeft.methods.diff_pruning import DiffDelta

    model, x = tiny.make(FAMILY), tiny.batch(FAMILY)
    up.attach(model, up.DiffPruning(sparsity=0.99), name="t")
    steps(model, x, 3)
    twin = copy.deepcopy(model)
    before = run(model, x)
    kept = up.save(model, tmp_path / "kept", name="t", keep_training=True)
    assert not record(model).config.finalized and any(isinstance(m, DiffDelta) for m in model.modules())
    assert torch.equal(run(model, x), before)
    final = up.save(twin, tmp_path / "final", name="t")  # takes the final form
    a, b = load_file(str(kept / "delta.safetensors")), load_file(str(final / "delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta_a, meta_b = (json.loads((d / "delta.json").read_text()) for d in (kept, final))
    assert meta_a == meta_b and meta_a["method"]["options"]["finalized"] is True
    steps(model, x, 2)  # still training: the file of the checkpoint is not the model any more
    assert not torch.equal(run(model, x), before)
    real = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda obj, *a, **k: pytest.fail("the callback copied the model")
                        if isinstance(obj, torch.nn.Module) else real(obj, *a, **k))
    from unipeft.integrations import SaveDeltaCallback

    SaveDeltaCallback()._save(model, tmp_path / "ckpt", training=True)
    assert (tmp_path / "ckpt" / "unipeft" / "t" / "delta.json").is_file() and not record(model).config.finalized


def test_diff_pruning_projection_keeps_the_largest_diffs():
    from unipeft.methods.diff_pruning import DiffDelta

    model, x = tiny.make("gpt2"), tiny.batch("gpt2")  # Conv1D: weights stored (in, out)
    up.attach(model, up.DiffPruning(sparsity=0.95), name="t")
    steps(model, x, 2)
    diffs = {}
    for path, d in record(model).linear.items():
        if isinstance(d, DiffDelta):
            with torch.no_grad():
                diffs[f"{path}.weight"] = d.diff(deterministic=True).T.reshape(-1)
    before = base_values(model)
    up.finalize(model, "t")
    state = record(model).sparse
    k = state.count()
    threshold = torch.cat([v.abs() for v in diffs.values()]).topk(k).values.min()
    for p, idx in state.indices.items():
        assert bool((diffs[p][idx].abs() >= threshold).all())
        torch.testing.assert_close(model.get_parameter(p).detach().reshape(-1)[idx],
                                   before[p].reshape(-1)[idx] + diffs[p][idx])


# ---------------------------------------------------------------------------
# routing and bad input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("config", [lambda: up.SparseFT(select="magnitude"), lambda: up.DiffPruning()])
def test_route_names_sparse_deltas_in_a_clear_error(config):
    model, x = tiny.make(FAMILY), tiny.batch(FAMILY)
    up.attach(model, config(), name="s")
    steps(model, x, 1)
    out = run(model, x)
    with pytest.raises(UnipeftError, match=r"delta 's' \((sparse_ft|diff_pruning)\) changes the base model's own weights in place"):
        with up.route(model, ["s", None]):
            pass
    assert up.active(model) == ["s"] and torch.equal(run(model, x), out)


@pytest.mark.parametrize("options,match", [
    ({"density": 0}, "density must be > 0"),
    ({"density": 1}, r"density must be in \(0, 1\)"),
    ({"density": 1.5}, "density must be <= 1"),
    ({"select": "random"}, "select must be 'lt-sft', 'magnitude', 'movement' or 'fish'"),
    ({"select_after": 0}, "select_after must be an integer >= 1"),
    ({"select_after": 1.5}, r"select_after must be a number of steps .* or a fraction of the run in \(0, 1\)"),
    ({"targets": []}, "targets is an empty list"),
    ({"rank": 2}, "unknown option 'rank'"),
])
def test_sparse_ft_bad_options_are_one_line_errors(options, match):
    with pytest.raises(UnipeftError, match=match) as e:
        up.SparseFT(**options)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("options,match", [
    ({"sparsity": 0}, r"sparsity must be in \(0, 1\)"),
    ({"sparsity": 1.0}, r"sparsity must be in \(0, 1\)"),
    ({"sparsity": -0.5}, r"sparsity must be in \(0, 1\)"),
    ({"gamma": 0.1}, "gamma < 0 and zeta > 1"),
    ({"beta": 0}, "beta must be > 0"),
    ({"l0_weight": -1}, "l0_weight must be >= 0"),
])
def test_diff_pruning_bad_options_are_one_line_errors(options, match):
    with pytest.raises(UnipeftError, match=match) as e:
        up.DiffPruning(**options)
    assert "\n" not in str(e.value)


def test_a_target_that_matches_nothing_leaves_the_model_unchanged():
    model, x = tiny.make(FAMILY), tiny.batch(FAMILY)
    out = run(model, x)
    with pytest.raises(UnipeftError, match="matches no linear module"):
        up.attach(model, up.SparseFT(targets="nothing_here"), name="t")
    assert up.engine.registry(model) is None and torch.equal(run(model, x), out)


@pytest.mark.parametrize("method", ["sparse_ft", "diff_pruning"])
def test_unipeft_train_recipe_saves_the_final_sparse_delta(tmp_path, method):
    """`unipeft train` with the defaults: LT-SFT's two phases (select_after a fraction of the run),
    DiffPruning finalized before it is scored and saved; the saved delta is indices + values."""
    from unipeft.training import run as recipes

    folder = tiny.save(tmp_path / "bert", "bert", "cls")
    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(60)]
    data = {"train": tiny.write_csv(tmp_path / "train.csv", ["text", "label"], rows[:50]),
            "dev": tiny.write_csv(tmp_path / "dev.csv", ["text", "label"], rows[50:])}
    res = recipes.train(folder, "sent", method, out=tmp_path / "run", data=data, max_steps=4, batch_size=8,
                        progress=False, precision="fp32", evaluate_test=False,
                        method_options={"density": 0.05} if method == "sparse_ft" else {"sparsity": 0.95})
    model = res["_model"]
    delta = record(model, up.active(model)[0])
    assert delta.sparse is not None and delta.sparse.fixed()
    n = total(model, list(delta.sparse.values))
    assert delta.sparse.count() == round(0.05 * n)
    saved = load_file(str(tmp_path / "run" / "delta" / "delta.safetensors"))
    assert sum(t.numel() for k, t in saved.items() if k.endswith(".indices")) == delta.sparse.count()


def test_fish_finalized_before_any_batch_still_keeps_k_entries_of_the_right_tensors():
    model = tiny.make(FAMILY)
    up.attach(model, up.SparseFT(select="fish", density=0.02, select_after=10, train_head=False), name="t")
    up.finalize(model, "t")
    state = record(model).sparse
    assert state.fixed() and state.count() == round(0.02 * total(model, targets(model)))
    for p, idx in state.indices.items():
        assert idx.numel() == 0 or int(idx.max()) < model.get_parameter(p).numel()


def test_unipeft_compare_measures_both_sparse_methods(tmp_path):
    from unipeft.comparison import compare

    folder = tiny.save(tmp_path / "bert", "bert", "cls")
    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(60)]
    data = {"train": tiny.write_csv(tmp_path / "train.csv", ["text", "label"], rows[:50]),
            "dev": tiny.write_csv(tmp_path / "dev.csv", ["text", "label"], rows[50:])}
    report = compare(str(folder), "sent", ["sparse_ft", "diff_pruning"], out=tmp_path / "cmp", data=data,
                     in_process=True, quiet=True, max_steps=2, batch_size=8, precision="fp32")
    got = {m["method"]: m for m in report["methods"]}
    assert set(got) == {"sparse_ft", "diff_pruning"}
    for m in got.values():
        assert m["delta_bytes"] > 0 and m["latency_ms"]["merged"] > 0 and 0 <= m["metrics"]["accuracy"] <= 1


@pytest.mark.parametrize("select", ["lt-sft", "fish"])
def test_a_run_resumed_after_the_selection_continues_on_the_same_mask(tmp_path, select):
    """A checkpoint holds the weights, not the mask: the resumed run reads the mask back from the
    entries that changed, and ends where the uninterrupted run ends."""
    from unipeft.training import TrainConfig, Trainer
    from unipeft.training import run as recipes
    from unipeft.training.tasks import Task

    path = tiny.save(tmp_path / "bert", "bert", "cls")
    task = Task("sent", "classification", labels=("neg", "pos"))
    exs = [{"text": t, "target": y} for t, y in tiny.sentiment_rows(40)]
    cfg = dict(lr=1e-2, batch_size=8, epochs=2, save_every=3, precision="fp32", progress=False)

    def trainer(out):
        torch.manual_seed(0)
        model, tok = recipes.load_model(path, task)
        up.attach(model, up.SparseFT(select=select, density=0.05, select_after=2), name="t", tokenizer=tok)
        return model, Trainer(model, tok, task, exs, None, TrainConfig(**cfg), out, cache=False)

    ref, t = trainer(tmp_path / "ref")
    t.fit()
    model, t1 = trainer(tmp_path / "run")
    t1.total_steps = 4  # stops after 4 steps (a crash); the checkpoint at step 4 is past the selection at 2
    t1.fit()
    model, t2 = trainer(tmp_path / "run")
    assert t2.fit(resume=True)["resumed_from"].endswith("step-0000004")
    a, b = record(ref).sparse, record(model).sparse
    assert b.fixed() and b.count() <= a.count()
    for p in a.values:
        assert set(b.indices[p].tolist()) <= set(a.indices[p].tolist())
        torch.testing.assert_close(model.get_parameter(p), ref.get_parameter(p), rtol=0, atol=1e-6)
