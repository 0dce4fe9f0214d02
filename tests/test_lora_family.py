"""The LoRA family beyond LoRA: random-rank LoRA, DyLoRA and AdaLoRA.

The contract (only the delta trains, save -> load, merge, detach, routing) is in test_grid.py and
test_routing.py; here are what each method promises beyond it:

* random-rank LoRA: ranks drawn per module from the range with the seed, recorded, reloaded to the
  same shapes, an exact parameter count, one-line errors for bad ranges;
* DyLoRA: eq. 7's alpha / b scale, only row b trained in a step, one draw per optimizer step
  (gradient accumulation included), any rank <= r at inference by set_rank or load(rank=);
* AdaLoRA: each of peft's failure modes beaten (reallocation without a call, total_step missing,
  the regulariser without a model loss), under a plain loop, unipeft's trainer and
  transformers.Trainer; the schedule; the saved rank pattern.
"""
from __future__ import annotations

import json

import pytest
import torch

import tiny
import unipeft as up
from unipeft import fused
from unipeft.errors import UnipeftError
from unipeft.methods.adalora import AdaLoRADelta
from unipeft.methods.dylora import DyLoRADelta


def run(model, x):
    with torch.no_grad():
        return tiny.logits(model, x)


def plain_loop(model, x, steps, lr=1e-2, accumulate=1, loss_fn=None):
    """The loop a user writes: loss.backward(); opt.step(); opt.zero_grad(), nothing else."""
    # no weight decay: a parameter with a zero gradient then stays exactly where it is
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        for _ in range(accumulate):
            logits = tiny.logits(model, x)
            loss = loss_fn(logits) if loss_fn else logits.float().pow(2).mean()
            (loss / accumulate).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


def linear(model, name, cls):
    return {p: d for p, d in up.engine.registry(model).deltas[name].linear.items() if isinstance(d, cls)}


def one_line_error(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------
# random-rank LoRA
# ---------------------------------------------------------------------------

def test_random_ranks_are_drawn_from_the_range_with_the_seed_and_recorded():
    def ranks(seed):
        model = tiny.make("llama")
        up.attach(model, up.LoRA(r=(2, 9), seed=seed, train_head=False), name="t")
        return model, up.deltas(model)["t"].rank_pattern

    model, pattern = ranks(1)
    assert set(pattern) == set(up.engine.registry(model).deltas["t"].linear)
    assert all(2 <= r <= 9 for r in pattern.values()) and len(set(pattern.values())) > 1
    assert ranks(1)[1] == pattern and ranks(2)[1] != pattern
    for path, d in up.engine.registry(model).deltas["t"].linear.items():
        assert d.lora_A.shape[0] == d.lora_B.shape[1] == pattern[path]
        assert d.scale == 16.0 / pattern[path]
    # the parameter count is exactly sum_i r_i (in_i + out_i)
    shapes = {p: up.positions.linear_shape(model.get_submodule(p)) for p in pattern}
    assert up.trainable_parameters(model)[0] == sum(r * sum(shapes[p]) for p, r in pattern.items())


def test_random_ranks_are_saved_and_reload_to_the_same_shapes(tmp_path):
    model, x = tiny.make("gpt2"), tiny.batch("gpt2")
    up.attach(model, up.LoRA(r=(1, 6), seed=4), name="t")
    plain_loop(model, x, 2)
    expected = run(model, x)
    up.save(model, tmp_path / "d", name="t")
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    pattern = meta["method"]["options"]["rank_pattern"]
    assert meta["method"]["options"]["r"] == [1, 6] and pattern == up.deltas(model)["t"].rank_pattern
    fresh = tiny.make("gpt2")
    up.load(fresh, tmp_path / "d")
    for path, d in up.engine.registry(fresh).deltas["t"].linear.items():
        if path in pattern:
            assert d.lora_A.shape[0] == pattern[path]
    torch.testing.assert_close(run(fresh, x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("r,message", [
    ((16, 1), r"LoRA: the rank range \(16, 1\) has low 16 > high 1; give r as a rank >= 1 or a range"),
    ((0, 4), r"LoRA: the rank range \(0, 4\) starts at 0; ranks must be >= 1"),
    ((-3, -1), r"starts at -3; ranks must be >= 1"),
    ((1, 2, 3), r"LoRA: r must be a rank >= 1 or a range \(low, high\) of two integer ranks"),
    ((1.5, 4), r"two integer ranks"),
    (0, r"LoRA: r must be an integer >= 1, got 0"),
])
def test_bad_rank_ranges_are_one_line_errors(r, message):
    with pytest.raises(UnipeftError, match=message) as e:
        up.LoRA(r=r)
    one_line_error(e)


def test_a_rank_pattern_that_does_not_fit_the_targets_leaves_the_model_unchanged():
    model, x = tiny.make("bert"), tiny.batch("bert")
    before = run(model, x)
    with pytest.raises(UnipeftError, match="rank_pattern has no rank for") as e:
        up.attach(model, up.LoRA(r=(1, 4), rank_pattern={"bert.encoder.layer.0.attention.self.query": 2}))
    one_line_error(e)
    assert up.engine.registry(model) is None and torch.equal(run(model, x), before)
    assert not any("unipeft" in n for n in model.state_dict())


def test_routing_random_rank_deltas_pads_their_ranks():
    model, x = tiny.make("llama"), tiny.batch("llama")
    up.attach(model, up.LoRA(r=(1, 3), seed=0), name="a")
    up.attach(model, up.LoRA(r=(5, 8), seed=1), name="b")
    reg = up.engine.registry(model)
    ranks = {n: {d.lora_A.shape[0] for d in reg.deltas[n].linear.values() if hasattr(d, "lora_A")} for n in "ab"}
    assert max(ranks["a"]) < min(ranks["b"])  # different ranks at every site: the table pads them
    with torch.no_grad():
        for d in reg.deltas["a"].parameters() + reg.deltas["b"].parameters():
            d.add_(torch.randn_like(d) * 0.3)
    alone = []
    for i, n in enumerate(["a", "b"]):
        up.activate(model, [n])
        alone.append(run(model, {k: v[i:i + 1] for k, v in x.items()}))
    with up.route(model, ["a", "b"]):
        routed = run(model, x)
    torch.testing.assert_close(routed, torch.cat(alone), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------
# DyLoRA
# ---------------------------------------------------------------------------

def scrambled_dylora(family="bert", r=6, alpha=12.0, **kw):
    model = tiny.make(family)
    up.attach(model, up.DyLoRA(r=r, alpha=alpha, **kw), name="d")
    with torch.no_grad():
        for p in up.engine.registry(model).deltas["d"].parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_dylora_at_rank_b_is_lora_with_the_first_b_rows_and_scale_alpha_over_b(rank):
    """Eq. 7: (alpha / b) B[:, :b] A[:b] -- not kohya's alpha / r * sqrt(r / b)."""
    model, x = scrambled_dylora(r=6, alpha=12.0), tiny.batch("bert")
    up.set_rank(model, "d", rank)
    got = run(model, x)
    lora = tiny.make("bert")
    up.attach(lora, up.LoRA(r=rank, alpha=12.0), name="l")
    ours, theirs = up.engine.registry(model).deltas["d"], up.engine.registry(lora).deltas["l"]
    with torch.no_grad():
        for path, d in ours.linear.items():
            t = theirs.linear[path]
            if isinstance(d, DyLoRADelta):
                t.lora_A.copy_(d.lora_A[:rank])
                t.lora_B.copy_(d.lora_B[:, :rank])
                assert t.scale == 12.0 / rank
            else:  # the task head
                t.load_state_dict(d.state_dict())
    torch.testing.assert_close(got, run(lora, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("plain", [False, True])
def test_a_dylora_step_trains_only_row_b(plain):
    """Rows below b frozen (no gradient), row b trained, rows above unused: on the fused path and the plain one."""
    model, x = scrambled_dylora(family="llama", r=5), tiny.batch("llama")
    model.train()
    deltas = linear(model, "d", DyLoRADelta)
    sampler = next(iter(deltas.values())).sampler
    sampler.b = 3
    with fused.disabled() if plain else torch.enable_grad():
        tiny.logits(model, x).pow(2).mean().backward()
    for d in deltas.values():
        rows_a = d.lora_A.grad.abs().sum(1)
        cols_b = d.lora_B.grad.abs().sum(0)
        assert (rows_a[2] > 0) and (cols_b[2] > 0)
        assert rows_a[[0, 1, 3, 4]].eq(0).all() and cols_b[[0, 1, 3, 4]].eq(0).all()


def test_dylora_draws_one_rank_per_optimizer_step_also_with_gradient_accumulation():
    model, x = tiny.make("gpt2"), tiny.batch("gpt2")
    up.attach(model, up.DyLoRA(r=8, seed=5), name="d")
    sampler = next(iter(linear(model, "d", DyLoRADelta).values())).sampler
    expected = [int(torch.randint(1, 9, (1,), generator=torch.Generator().manual_seed(5 * 1_000_003 + t)))
                for t in range(1, 8)]
    assert len(set(expected)) > 2
    seen = []

    def record(module, args):
        if module.training:
            seen.append(sampler.b)
    site = model.get_submodule(next(iter(linear(model, "d", DyLoRADelta))))
    site.register_forward_pre_hook(record)
    plain_loop(model, x, steps=6, accumulate=3)
    # three forwards per step, all on the step's rank; a new rank after every optimizer step only
    assert seen == [b for b in expected[:6] for _ in range(3)]
    assert sampler.b == expected[6]
    tiny.logits(model.train(), x)  # a forward alone draws nothing
    assert sampler.b == expected[6]


def test_dylora_one_delta_serves_every_rank_set_rank_and_load_agree(tmp_path):
    model, x = tiny.make("t5"), tiny.batch("t5")
    up.attach(model, up.DyLoRA(r=4), name="d")
    plain_loop(model, x, steps=12, lr=3e-2)
    outs = {}
    for rank in range(1, 5):
        up.set_rank(model, "d", rank)
        outs[rank] = run(model, x)
    assert all(not torch.allclose(outs[a], outs[b]) for a in outs for b in outs if a < b)
    up.save(model, tmp_path / "d", name="d")  # saved at rank 4 (the last set), every row kept
    assert json.loads((tmp_path / "d" / "delta.json").read_text())["method"]["options"]["rank"] == 4
    for rank in range(1, 5):
        fresh = tiny.make("t5")
        up.load(fresh, tmp_path / "d", rank=rank)
        torch.testing.assert_close(run(fresh, x), outs[rank], rtol=0, atol=0)
    up.set_rank(model, "d", 2)
    up.merge(model, "d")  # merging folds the current rank
    torch.testing.assert_close(run(model, x), outs[2], rtol=1e-4, atol=1e-5)
    with pytest.raises(UnipeftError, match=r"merged at rank 2; up.unmerge\(model, 'd'\) first"):
        up.set_rank(model, "d", 3)
    up.unmerge(model, "d")
    up.save(model, tmp_path / "d2", name="d")
    fresh = tiny.make("t5")
    up.load(fresh, tmp_path / "d2")
    torch.testing.assert_close(run(fresh, x), outs[2], rtol=0, atol=0)


def test_routing_follows_set_rank():
    """Without autograd the routed factors are kept on the site; a new rank must rebuild them."""
    model, x = scrambled_dylora(family="gpt2", r=6), tiny.batch("gpt2")
    up.attach(model, up.DyLoRA(r=3), name="e")  # two of a class: routed through one kept table
    for rank in (6, 2):
        up.set_rank(model, "d", rank)
        up.activate(model, ["d"])
        expected = run(model, {k: v[:1] for k, v in x.items()})
        with up.route(model, ["d", "e"]):
            got = run(model, x)[:1]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_dylora_bad_ranks_are_one_line_errors(tmp_path):
    model = tiny.make("bert")
    up.attach(model, up.DyLoRA(r=4), name="d")
    up.attach(model, up.LoRA(r=4), name="l")
    for bad in (0, 5, 2.0):
        with pytest.raises(UnipeftError, match=r"DyLoRA: rank must be an integer from 1 to r=4") as e:
            up.set_rank(model, "d", bad)
        one_line_error(e)
    with pytest.raises(UnipeftError, match=r"delta 'l' is lora, whose rank is fixed; .* 'dylora'"):
        up.set_rank(model, "l", 2)
    with pytest.raises(UnipeftError, match="DyLoRA: rank must be an integer from 1 to r=4"):
        up.DyLoRA(r=4, rank=8)
    up.save(model, tmp_path / "l", name="l")
    fresh = tiny.make("bert")
    with pytest.raises(UnipeftError, match=r"rank= applies to deltas trained for several ranks \('dylora'\)"):
        up.load(fresh, tmp_path / "l", rank=2)
    up.save(model, tmp_path / "d", name="d")
    with pytest.raises(UnipeftError, match="from 1 to r=4"):
        up.load(fresh, tmp_path / "d", rank=9)
    assert up.engine.registry(fresh) is None


# ---------------------------------------------------------------------------
# AdaLoRA
# ---------------------------------------------------------------------------

def adalora_model(family="bert", **kw):
    kw = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "train_head": False, **kw}
    model = tiny.make(family)
    up.attach(model, up.AdaLoRA(**kw), name="a")
    return model


def kept_triplets(model):
    return {p: int((d.lora_E != 0).sum()) for p, d in linear(model, "a", AdaLoRADelta).items()}


def test_a_plain_loop_reallocates_ranks_with_no_extra_call(tmp_path):
    """peft #1327/#1801/#432: without update_and_allocate peft trains plain LoRA. Here the plain loop
    ends with target_r x modules triplets, spread unevenly, and the pattern is saved and reloaded."""
    model, x = adalora_model(total_step=10), tiny.batch("bert")
    modules = len(linear(model, "a", AdaLoRADelta))
    plain_loop(model, x, steps=10)
    kept = kept_triplets(model)
    assert sum(kept.values()) == 2 * modules
    assert len(set(kept.values())) > 1  # the budget moved between modules
    expected = run(model, x)
    up.save(model, tmp_path / "d", name="a")
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    pattern = meta["method"]["options"]["rank_pattern"]
    assert {p: sum(v) for p, v in pattern.items()} == kept
    fresh = tiny.make("bert")
    up.load(fresh, tmp_path / "d")
    torch.testing.assert_close(run(fresh, x), expected, rtol=0, atol=0)
    shapes = {p: up.positions.linear_shape(fresh.get_submodule(p)) for p in kept}
    # only the kept triplets are stored and rebuilt: r_i (in_i + out_i + 1) parameters per module
    assert meta["parameters"] == sum(k * (sum(shapes[p]) + 1) for p, k in kept.items())
    assert up.trainable_parameters(fresh)[0] == meta["parameters"]


def test_the_budget_follows_the_cubic_schedule_and_the_final_pattern_stays():
    model, x = adalora_model(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=15), tiny.batch("bert")
    modules = len(linear(model, "a", AdaLoRADelta))
    allocator = next(iter(linear(model, "a", AdaLoRADelta).values())).unipeft_controller
    b0, bt = 6 * modules, 2 * modules
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    totals, patterns = [], []
    for t in range(1, 16):
        tiny.logits(model, x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        totals.append(sum(kept_triplets(model).values()))
        patterns.append({p: tuple(d.lora_E.ne(0).tolist()) for p, d in linear(model, "a", AdaLoRADelta).items()})
    for t in range(3, 12):  # eq. 12 between t_init = 2 and T - t_final = 12, masking every 2 steps
        want = int(bt + (b0 - bt) * (1 - (t - 2) / 10) ** 3)
        assert allocator.budget(t) == want
        if (t - 2) % 2 == 0:
            assert totals[t - 1] == want
    assert totals[0] == totals[1] == b0  # warm-up: nothing masked
    assert totals[11:] == [bt] * 4 and all(p == patterns[11] for p in patterns[11:])  # fixed from T - t_final


def test_a_resumed_optimizer_continues_the_schedule_where_it_stopped():
    """A checkpoint's optimizer state in a fresh optimizer: the allocator starts at the optimizer's count."""
    x = tiny.batch("bert")
    kw = dict(init_r=6, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=12)
    first = adalora_model(**kw)
    opt = plain_loop(first, x, steps=5)
    resumed = adalora_model(**kw)
    resumed.load_state_dict(first.state_dict())
    allocator = next(iter(linear(resumed, "a", AdaLoRADelta).values())).unipeft_controller
    params = [p for p in resumed.parameters() if p.requires_grad]
    opt2 = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    opt2.load_state_dict(opt.state_dict())
    resumed.train()
    tiny.logits(resumed, x).pow(2).mean().backward()
    opt2.step()
    assert allocator.steps == 6
    assert sum(kept_triplets(resumed).values()) == allocator.budget(6) < allocator.initial_budget


def test_total_step_missing_is_a_clear_error_at_the_first_step_before_any_change():
    """peft #1971: total_step is needed but undocumented. Here: a one-line error naming the ways to give it."""
    model, x = adalora_model(), tiny.batch("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UnipeftError, match=r"AdaLoRA: total_step is unknown.*up.AdaLoRA\(total_step=") as e:
        plain_loop(model, x, steps=1)
    one_line_error(e)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_unipeft_trainer_gives_total_step_and_checks_the_schedule_against_it(tmp_path):
    from unipeft.training import TrainConfig, Trainer
    from unipeft.training.tasks import Task

    path = tiny.save(tmp_path / "bert", "bert", "cls")
    task = Task("sent", "classification", labels=("neg", "pos"))
    train = [{"text": t, "target": y} for t, y in tiny.sentiment_rows(48)]

    def trainer(**kw):
        from unipeft.training import run as recipes

        model, tok = recipes.load_model(path, task)
        up.attach(model, up.AdaLoRA(**{"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, **kw}), name="a",
                  tokenizer=tok)
        cfg = TrainConfig(max_steps=6, batch_size=8, lr=1e-2, precision="fp32", progress=False)
        return model, Trainer(model, tok, task, train, None, cfg, None, cache=False)

    model, t = trainer()
    t.fit()
    kept = {p: int((d.lora_E != 0).sum()) for p, d in up.engine.registry(model).deltas["a"].linear.items()
            if isinstance(d, AdaLoRADelta)}
    assert sum(kept.values()) == 2 * len(kept) and len(set(kept.values())) > 1
    with pytest.raises(UnipeftError, match=r"tinit=5 \+ tfinal=1 steps\) is as long as the training \(6 steps\)"):
        trainer(tinit=5)


def test_transformers_trainer_reallocates_with_the_integration_callback(tmp_path):
    from transformers import Trainer, TrainingArguments

    from unipeft.integrations import SaveDeltaCallback

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, tiny.VOCAB, (4, 12), generator=g)
    rows = [{"input_ids": ids[i % 4], "attention_mask": torch.ones(12, dtype=torch.long), "labels": ids[i % 4]}
            for i in range(16)]
    model = tiny.make("gpt2")
    up.attach(model, up.AdaLoRA(init_r=4, target_r=2, tinit=1, tfinal=1), name="a")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                             seed=0)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[SaveDeltaCallback()]).train()
    kept = kept_triplets(model)
    assert sum(kept.values()) == 2 * len(kept) and len(set(kept.values())) > 1
    saved = json.loads((tmp_path / "out" / "unipeft" / "a" / "delta.json").read_text())
    assert {p: sum(v) for p, v in saved["method"]["options"]["rank_pattern"].items()} == kept


def test_transformers_trainer_resume_takes_back_the_importance(tmp_path):
    """A run stopped at a checkpoint and resumed with resume_from_checkpoint=True reaches the
    uninterrupted run's parameters: the callback saved AdaLoRA's smoothed importance with the checkpoint."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from unipeft.integrations import SaveDeltaCallback

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, tiny.VOCAB, (4, 12), generator=g)
    rows = [{"input_ids": ids[i % 4], "attention_mask": torch.ones(12, dtype=torch.long), "labels": ids[i % 4]}
            for i in range(32)]

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step == 4

    def run(out, resume=None, stop=False):
        torch.manual_seed(0)
        model = tiny.make("gpt2")  # its dropout draws from the RNG the Trainer's checkpoint restores
        up.attach(model, up.AdaLoRA(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1), name="a")
        args = TrainingArguments(output_dir=str(out), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
                                 report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="steps", save_steps=4,
                                 seed=0)
        Trainer(model=model, args=args, train_dataset=rows,
                callbacks=[SaveDeltaCallback()] + ([StopAt()] if stop else [])).train(resume_from_checkpoint=resume)
        return model

    ref = run(tmp_path / "ref")
    run(tmp_path / "run", stop=True)
    assert (tmp_path / "run" / "checkpoint-4" / "unipeft" / "step_state.safetensors").is_file()
    resumed = run(tmp_path / "run", resume=True)
    a = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    assert kept_triplets(resumed) == kept_triplets(ref)
    # without the file the resumed run warns that the importance starts afresh
    (tmp_path / "run" / "checkpoint-4" / "unipeft" / "step_state.safetensors").unlink()
    with pytest.warns(UserWarning, match="starts afresh"):
        run(tmp_path / "run", resume=str(tmp_path / "run" / "checkpoint-4"))


@torch.no_grad()
def orthogonality(model):
    return sum(float((d.lora_B.t() @ d.lora_B - torch.eye(d.lora_B.shape[1])).pow(2).sum()
                     + (d.lora_A @ d.lora_A.t() - torch.eye(d.lora_A.shape[0])).pow(2).sum())
               for d in linear(model, "a", AdaLoRADelta).values())


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_the_regulariser_works_when_the_model_returns_no_loss(weight):
    """peft adds its regulariser to outputs.loss only. Here the loop computes its own loss from logits
    (zero task gradient, so only the regulariser can move P and Q): with a weight, P and Q move towards
    orthogonality; without, they do not move at all."""
    model, x = adalora_model(total_step=30, orth_reg_weight=weight, tinit=20, tfinal=0), tiny.batch("bert")
    before = orthogonality(model)
    plain_loop(model, x, steps=5, lr=1e-2, loss_fn=lambda logits: logits.sum() * 0)
    after = orthogonality(model)
    assert (after < 0.9 * before) if weight else (after == before)


def test_the_regulariser_gradient_is_that_of_eq_4():
    model = adalora_model(total_step=5, orth_reg_weight=0.3)
    deltas = list(linear(model, "a", AdaLoRADelta).values())
    allocator = deltas[0].unipeft_controller
    params = [p for d in deltas for p in (d.lora_A, d.lora_B)]
    reg = sum((d.lora_B.t() @ d.lora_B - torch.eye(4)).pow(2).sum() + (d.lora_A @ d.lora_A.t() - torch.eye(4)).pow(2).sum()
              for d in deltas) * 0.3 / len(deltas)
    expected = torch.autograd.grad(reg, params)
    allocator.add_orthogonality_gradient(deltas)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_warm_up_and_final_phases_may_be_fractions_of_the_training():
    from unipeft import step_hooks

    model = adalora_model(tinit=0.1, tfinal=0.25)
    allocator = next(iter(linear(model, "a", AdaLoRADelta).values())).unipeft_controller
    step_hooks.plan(model, 200)
    assert (allocator.total, allocator.tinit, allocator.tfinal) == (200, 20, 50)
    fixed = adalora_model(tinit=3, tfinal=0.5, total_step=40)  # the config's total_step wins over the trainer's
    allocator = next(iter(linear(fixed, "a", AdaLoRADelta).values())).unipeft_controller
    step_hooks.plan(fixed, 1000)
    assert (allocator.total, allocator.tinit, allocator.tfinal) == (40, 3, 20)
    with pytest.raises(UnipeftError, match=r"tinit=6 \+ tfinal=15 steps\) is as long as the training \(20 steps\)"):
        step_hooks.plan(adalora_model(tinit=0.3, tfinal=0.75), 20)


@pytest.mark.parametrize("kw,message", [
    ({"init_r": 4, "target_r": 8}, r"AdaLoRA: target_r 8 > init_r 4; the budget only shrinks"),
    ({"tinit": 5, "tfinal": 5, "total_step": 10}, r"tinit=5 \+ tfinal=5 steps\) is as long as the training \(10 steps\)"),
    ({"beta1": 1.0}, r"AdaLoRA: beta1 must be in \(0, 1\)"),
    ({"deltaT": 0}, r"AdaLoRA: deltaT must be an integer >= 1"),
    ({"tinit": 1.5}, r"AdaLoRA: tinit must be a number of steps \(an integer >= 0\) or a fraction of total_step"),
    ({"tfinal": 0.5, "tinit": 0.5, "total_step": 10}, r"tinit=5 \+ tfinal=5 steps\) is as long as the training"),
    ({"bogus": 1}, r"AdaLoRA: unknown option 'bogus'"),
])
def test_bad_adalora_options_are_one_line_errors(kw, message):
    with pytest.raises(UnipeftError, match=message) as e:
        up.AdaLoRA(**kw)
    one_line_error(e)


def test_the_cli_trains_dylora_and_adalora(tmp_path, capsys):
    from unipeft.cli import main

    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(64)]
    model = tiny.save(tmp_path / "bert", "bert", "cls")
    train = tiny.write_csv(tmp_path / "train.csv", ["text", "label"], rows[:48])
    dev = tiny.write_csv(tmp_path / "dev.csv", ["text", "label"], rows[48:])
    for method, option in (("dylora", "dylora.r=4"), ("adalora", "adalora.target_r=2")):
        out = tmp_path / method
        assert main(["train", "--model", model, "--task", "sent", "--train", train, "--dev", dev, "--out", str(out),
                     "--precision", "fp32", "--threads", "1", "--method", method, "--method-option", option,
                     "--max-steps", "6", "--batch-size", "8", "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["method"] == method and res["steps"] == 6


# ---------------------------------------------------------------------------
# peft exchange
# ---------------------------------------------------------------------------

def test_random_rank_lora_exports_to_peft_with_its_rank_pattern(tmp_path):
    peft = pytest.importorskip("peft")
    model, x = tiny.make("bert", "cls"), tiny.batch("bert", "cls")
    up.attach(model, up.LoRA(r=(1, 5), seed=2), name="t")
    plain_loop(model, x, 3)
    up.export_peft(model, tmp_path / "p", name="t")
    theirs = peft.PeftModel.from_pretrained(tiny.make("bert", "cls"), str(tmp_path / "p"))
    torch.testing.assert_close(run(theirs.eval(), x), run(model, x), rtol=1e-5, atol=1e-6)
    # and back: per-module ranks come in as the same rank_pattern
    back = up.import_peft(tiny.make("bert", "cls"), tmp_path / "p", name="t")
    assert up.deltas(back)["t"].rank_pattern == up.deltas(model)["t"].rank_pattern
    torch.testing.assert_close(run(back, x), run(model, x), rtol=1e-5, atol=1e-6)


def test_peft_lora_with_a_rank_pattern_imports_as_lora_with_that_pattern(tmp_path):
    peft = pytest.importorskip("peft")
    x = tiny.batch("llama")
    pm = peft.get_peft_model(tiny.make("llama"), peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}))
    with torch.no_grad():  # B starts at zero in peft: give the delta something to carry
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    pm.save_pretrained(str(tmp_path / "p"))
    ours = up.import_peft(tiny.make("llama"), tmp_path / "p", name="t")
    ranks = up.deltas(ours)["t"].rank_pattern
    assert sorted(set(ranks.values())) == [2, 4] and all((r == 2) == p.endswith("v_proj") for p, r in ranks.items())
    with torch.no_grad():
        torch.testing.assert_close(ours(**x).logits, pm.eval()(**x).logits, rtol=1e-5, atol=1e-5)


def test_adalora_crosses_to_peft_and_back(tmp_path):
    peft = pytest.importorskip("peft")
    x = tiny.batch("bert", "cls")
    # ours -> peft: the kept triplets and the pattern under peft's keys
    model = tiny.make("bert", "cls")
    up.attach(model, up.AdaLoRA(init_r=4, target_r=2, tinit=1, tfinal=1, total_step=6), name="a")
    plain_loop(model, x, 6)
    up.export_peft(model, tmp_path / "ours", name="a")
    theirs = peft.PeftModel.from_pretrained(tiny.make("bert", "cls"), str(tmp_path / "ours"))
    torch.testing.assert_close(run(theirs.eval(), x), run(model, x), rtol=1e-4, atol=1e-5)
    # peft -> ours: a peft AdaLoRA trained with its update_and_allocate
    pm = peft.get_peft_model(tiny.make("bert", "cls"), peft.AdaLoraConfig(
        task_type="SEQ_CLS", init_r=4, target_r=2, tinit=1, tfinal=1, total_step=6, target_modules=["query", "value"]))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    for t in range(6):
        pm(**x, labels=torch.tensor([0, 1])).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(t)
        opt.zero_grad()
    pm.save_pretrained(str(tmp_path / "theirs"))
    pattern = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["rank_pattern"]
    base = tiny.make("bert", "cls")
    up.import_peft(base, tmp_path / "theirs", name="p")
    torch.testing.assert_close(run(base, x), run(pm.eval(), x), rtol=1e-4, atol=1e-5)
    got = {p: d.lora_E.shape[0] for p, d in linear(base, "p", AdaLoRADelta).items()}
    assert got == {k[:-len(".lora_E")]: sum(v) for k, v in pattern.items() if sum(v)}
