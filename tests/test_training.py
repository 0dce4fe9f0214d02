"""The trainer and its parts on tiny models: batching, checkpoints, divergence, accumulation, aux LM, recipes."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import tiny
import unipeft as up
from unipeft.errors import UnipeftError
from unipeft.training import TrainConfig, Trainer, TrainingDiverged, checkpoint, run
from unipeft.training.batching import IGNORE, Collator, batch_order, encode
from unipeft.training.defaults import DEFAULTS, parse_method_options, parse_value, resolve
from unipeft.training.tasks import Task

SENT = Task("sent", "classification", labels=("neg", "pos"))
GEN = Task("gen", "causal_lm")
S2S = Task("gen", "seq2seq")


def sent_examples(n, seed=0):
    return [{"text": t, "target": y} for t, y in tiny.sentiment_rows(n, seed)]


def gen_examples(n, seed=0):
    return [{"text": s, "target": t} for s, t in tiny.table_rows(n, seed)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for fam, head in (("bert", "cls"), ("gpt2", "lm"), ("gpt2", "cls"), ("t5", "seq2seq")):
        out[f"{fam}-{head}"] = tiny.save(root / f"{fam}-{head}", fam, head)
        out[f"{fam}-{head}-nodrop"] = tiny.save(root / f"{fam}-{head}-nodrop", fam, head, dropout=False)
    return out


def load(path, task):
    return run.load_model(path, task)


def fit(path, task, train, dev=None, method=up.LoRA(), out=None, **cfg):
    torch.manual_seed(0)  # the delta's initialisation (the trainer seeds only what comes after)
    model, tok = load(path, task)
    up.attach(model, method, name="t", tokenizer=tok)
    cfg.setdefault("precision", "fp32")
    cfg.setdefault("progress", False)
    trainer = Trainer(model, tok, task, train, dev, TrainConfig(**cfg), out, cache=False)
    return trainer, trainer.fit()


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------

def test_batch_order_covers_every_example_once_and_is_deterministic():
    lengths = [((i * 37) % 23) + 1 for i in range(203)]
    a = batch_order(lengths, 8, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(203))
    assert a == batch_order(lengths, 8, seed=3, epoch=1)
    assert a != batch_order(lengths, 8, seed=3, epoch=2)
    # grouping by length pads less than a random order
    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert padding(a) < 0.5 * padding(batch_order(lengths, 8, 3, 1, group_by_length=False))


def test_encode_classification_causal_and_seq2seq(models):
    _, tok = load(models["gpt2-lm"], GEN)
    enc = encode(GEN, [{"text": "name = Alpha", "target": "Alpha serves"}], tok, 32, cache_dir=None)
    ex = enc.example(0)
    prompt = tok("name = Alpha\n")["input_ids"]
    assert ex["input_ids"].tolist() == prompt + tok("Alpha serves", add_special_tokens=False)["input_ids"] + [4]
    assert ex["labels"].tolist()[:len(prompt)] == [IGNORE] * len(prompt)  # loss on the target only
    assert ex["labels"].tolist()[len(prompt):] == ex["input_ids"].tolist()[len(prompt):]
    _, tok = load(models["t5-seq2seq"], S2S)
    enc = encode(S2S, [{"text": "name = Alpha", "target": "Alpha serves"}], tok, 32, cache_dir=None)
    assert enc.example(0)["labels"].tolist() == tok("Alpha serves")["input_ids"]
    _, tok = load(models["bert-cls"], SENT)
    pair = Task("p", "classification", labels=("a", "b"), pair=True)
    enc = encode(pair, [{"text": "good", "text_pair": "bad film", "target": 1}], tok, 32, cache_dir=None)
    assert enc.example(0)["token_type_ids"].tolist() == [0, 0, 0, 1, 1, 1]
    assert int(enc.example(0)["labels"]) == 1


def test_tokenisation_cache_is_reused_and_a_damaged_file_is_rebuilt(models, tmp_path):
    _, tok = load(models["bert-cls"], SENT)
    exs = sent_examples(20)
    a = encode(SENT, exs, tok, 16, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    b = encode(SENT, exs, tok, 16, cache_dir=tmp_path)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels)
    encode(SENT, exs, tok, 20, cache_dir=tmp_path)  # another max_length is another entry
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    files[0].write_bytes(b"garbage")
    c = encode(SENT, exs, tok, 16, cache_dir=tmp_path)
    assert torch.equal(a.ids, c.ids)


def test_collator_pads_dynamically_on_either_side():
    items = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([IGNORE, 6, 7])},
             {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}]
    right = Collator(0)(items)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    left = Collator(0, "left")(items)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    s2s = Collator(0)([{"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([1, 2, 3])},
                       {"input_ids": torch.tensor([5]), "labels": torch.tensor([4])}])
    assert s2s["labels"].tolist() == [[1, 2, 3], [4, IGNORE, IGNORE]]


# ---------------------------------------------------------------------------
# configuration and defaults
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"lr": 0}, "lr must be > 0"), ({"batch_size": 0}, "batch_size"), ({"precision": "fp8"}, "'auto', 'fp32' or 'bf16'"),
    ({"schedule": "cosine"}, "'linear' or 'constant'"), ({"warmup_ratio": 1.5}, "warmup_ratio"),
    ({"early_stopping": 0}, "early_stopping"),
])
def test_train_config_rejects_bad_values(kw, match):
    with pytest.raises(UnipeftError, match=match):
        TrainConfig(**kw)


def test_method_defaults_resolve_and_options_override():
    cfg, d = resolve("lora", {"r": 4})
    assert isinstance(cfg, up.LoRA) and cfg.r == 4 and d.train["lr"] > 0
    for name in DEFAULTS:  # every default builds a valid config and names its source
        given = {"adapters": ["a", "b"]} if DEFAULTS[name].kind == "adapter_fusion" else None  # what a run names
        assert resolve(name, given)[1].source
    with pytest.raises(UnipeftError, match="two or more adapter"):  # and without them, says so in one line
        resolve("adapter_fusion")
    with pytest.raises(UnipeftError, match="unknown method 'lorra'.*lora"):
        resolve("lorra")
    with pytest.raises(UnipeftError, match="unknown option"):
        resolve("lora", {"rank": 4})
    assert parse_value("16") == 16 and parse_value("q,v") == ("q", "v") and parse_value("true") is True
    assert parse_method_options(["lora.r=16", "train_head=false"], ["lora", "bitfit"]) == {
        "lora": {"r": 16, "train_head": False}, "bitfit": {"train_head": False}}
    with pytest.raises(UnipeftError, match="not run"):
        parse_method_options(["ia3.x=1"], ["lora"])
    with pytest.raises(UnipeftError, match="unknown training option"):
        run.train_config({}, {"learning_rate": 1})


def test_defaults_per_model_family(models, tmp_path, monkeypatch):
    """A method's training settings may differ by family (screened separately); the recipe reads the
    family from the model's config and uses that family's settings, the user's on top."""
    import transformers as tf

    from unipeft.training import defaults

    for d in DEFAULTS.values():  # every per-family entry names a known family
        assert set(d.family_train) <= set(defaults.FAMILIES), d.label
    assert [defaults.model_family(c) for c in (tf.BertConfig(), tf.RobertaConfig(), tf.GPT2Config(),
                                              tf.LlamaConfig(), tf.T5Config(), tf.BartConfig())] == \
        ["encoder", "encoder", "decoder", "decoder", "encoder-decoder", "encoder-decoder"]
    assert run.family_of(models["gpt2-cls"]) == "decoder" and run.family_of(models["bert-cls"]) == "encoder"
    monkeypatch.setitem(DEFAULTS, "bitfit", dataclasses.replace(
        DEFAULTS["bitfit"], train={"lr": 1e-3}, family_train={"decoder": {"lr": 7e-3}}))
    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(40)]
    data = {"train": tiny.write_csv(tmp_path / "train.csv", ["text", "label"], rows)}
    common = dict(data=data, max_steps=2, batch_size=8, progress=False, precision="fp32", evaluate_test=False)
    assert run.train(models["gpt2-cls"], "sent", "bitfit", **common)["lr"] == 7e-3
    assert run.train(models["bert-cls"], "sent", "bitfit", **common)["lr"] == 1e-3
    assert run.train(models["gpt2-cls"], "sent", "bitfit", lr=2e-3, **common)["lr"] == 2e-3  # the user's wins


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------

def test_full_fine_tuning_learns_the_synthetic_task_and_logs(models, tmp_path):
    trainer, summary = fit(models["bert-cls"], SENT, sent_examples(160), sent_examples(40, 1), up.FullFineTune(),
                           out=tmp_path, lr=3e-3, max_steps=60, batch_size=16, eval_every=20, log_every=5)
    assert summary["steps"] == 60 and summary["best_metric"] >= 0.9
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in steps] == list(range(5, 61, 5))
    assert {"lr", "examples_per_s", "epoch"} <= set(steps[0]) and [r["step"] for r in evals] == [20, 40, 60]
    assert steps[-1]["loss"] < steps[0]["loss"]
    lrs = [r["lr"] for r in steps]
    assert lrs == sorted(lrs, reverse=True)  # linear decay after warm-up


def test_generation_tasks_train_and_generate_with_lora_prompt_and_prefix(models):
    for method in (up.LoRA(r=4), up.PromptTuning(length=3), up.PrefixTuning(length=3, reparam_hidden=16)):
        trainer, summary = fit(models["gpt2-lm"], GEN, gen_examples(64), gen_examples(16, 1), method, lr=5e-3,
                               max_steps=6, batch_size=16, max_new_tokens=6)
        assert summary["metric"] == "loss" and summary["best_metric"] < 10
        metrics = trainer.evaluate(generation=True)
        assert {"loss", "bleu", "rouge_l"} <= set(metrics)
    trainer, summary = fit(models["t5-seq2seq"], S2S, gen_examples(32), gen_examples(8, 1), up.LoRA(r=4),
                           max_steps=4, batch_size=8, max_new_tokens=5)
    assert {"bleu", "rouge_l"} <= set(trainer.evaluate(generation=True))


@pytest.mark.parametrize("method", [up.LoRA(r=4), up.PromptTuning(length=3, init="random")], ids=["lora", "prompt"])
def test_causal_loss_from_the_target_positions_is_the_models_own(models, method):
    """The trainer's causal-LM loss computes the vocabulary logits only before target tokens: the same loss
    and gradients as the model's own loss over every position (prompts and padding ignored)."""
    from unipeft.training.evaluation import causal_lm_loss

    model, tok = load(models["gpt2-lm-nodrop"], GEN)
    up.attach(model, method, name="t", tokenizer=tok)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)  # LoRA's B starts at zero: give the delta an effect
    enc = encode(GEN, gen_examples(5), tok, 64)
    batch = Collator(tok.pad_token_id or 0)([enc.example(i) for i in range(5)])
    assert (batch["labels"] == IGNORE).float().mean() > 0.3  # prompts and padding: many positions left out
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape[:-1]))
    results = []
    for loss_of in (lambda: causal_lm_loss(model, batch), lambda: model(**batch).loss):
        model.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    hook.remove()
    targets = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert seen[0] == (1, targets) and seen[1] == batch["input_ids"].shape  # the vocabulary product: targets only
    (a, ga), (b, gb) = results
    assert a == pytest.approx(b, rel=1e-6)
    assert all(torch.allclose(ga[n], gb[n], atol=1e-6) for n in ga)


def test_dev_loss_of_a_causal_lm_is_the_models_own(models):
    from unipeft.training.evaluation import mean_loss

    model, tok = load(models["gpt2-lm-nodrop"], GEN)
    enc = encode(GEN, gen_examples(7), tok, 64)
    picked = mean_loss(model, enc, tok, batch_size=3, causal=True)
    assert picked == pytest.approx(mean_loss(model, enc, tok, batch_size=3), rel=1e-6)


def test_gradient_accumulation_equals_the_large_batch(models):
    exs = sent_examples(48)
    kw = dict(method=up.FullFineTune(), lr=1e-3, max_steps=3, group_by_length=False, max_grad_norm=None)
    a, _ = fit(models["bert-cls-nodrop"], SENT, exs, batch_size=8, **kw)
    b, _ = fit(models["bert-cls-nodrop"], SENT, exs, batch_size=4, grad_accum=2, **kw)
    pa, pb = trainable(a.raw_model), trainable(b.raw_model)
    assert max((pa[n] - pb[n]).abs().max().item() for n in pa) < 1e-5


def test_gradient_checkpointing_gives_the_same_training(models):
    kw = dict(method=up.LoRA(r=4), lr=1e-2, max_steps=3, batch_size=8)
    a, _ = fit(models["gpt2-lm-nodrop"], GEN, gen_examples(24), **kw)
    b, _ = fit(models["gpt2-lm-nodrop"], GEN, gen_examples(24), gradient_checkpointing=True, **kw)
    pa, pb = trainable(a.raw_model), trainable(b.raw_model)
    assert max((pa[n] - pb[n]).abs().max().item() for n in pa) < 1e-6


def test_gradient_checkpointing_on_a_model_that_cannot_is_refused_by_name(models, monkeypatch):
    """The support flag is read under either of transformers' names (activation_ from 5.2x, gradient_
    before); a class without it is refused with its name, not trained without checkpointing."""
    from unipeft.compat import supports_activation_checkpointing

    model, tok = load(models["gpt2-lm-nodrop"], GEN)
    assert supports_activation_checkpointing(model)
    monkeypatch.setattr(type(model), "supports_gradient_checkpointing", False)
    monkeypatch.setattr(type(model), "supports_activation_checkpointing", False, raising=False)
    assert not supports_activation_checkpointing(model)
    up.attach(model, up.LoRA(r=4), name="t", tokenizer=tok)
    cfg = TrainConfig(gradient_checkpointing=True, precision="fp32", progress=False, max_steps=1)
    with pytest.raises(UnipeftError, match=f"{type(model).__name__} does not support gradient checkpointing"):
        Trainer(model, tok, GEN, gen_examples(8), None, cfg, None, cache=False)


def test_optimizer_is_fused_adamw_and_takes_the_same_steps_as_the_loop_kernel():
    from unipeft.training.trainer import make_adamw

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = make_adamw([{"params": params, "weight_decay": 0.01}], lr=1e-2)
    loop = torch.optim.AdamW([{"params": twins, "weight_decay": 0.01}], lr=1e-2)
    assert fused.param_groups[0]["fused"] is True
    for _ in range(3):
        for group in (params, twins):
            for p in group:
                p.grad = torch.full_like(p, 0.5) * p.detach()
        fused.step()
        loop.step()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(params, twins))
    # sharded or unusual parameters keep the default kernel
    assert not make_adamw([{"params": [torch.nn.Parameter(torch.randn(2))]}], 1e-3, distributed=True).param_groups[0][
        "fused"]


def test_bf16_autocast_trains_with_fp32_master_weights(models):
    trainer, summary = fit(models["bert-cls"], SENT, sent_examples(32), method=up.LoRA(r=4), precision="bf16",
                           max_steps=3, batch_size=8)
    assert summary["precision"] == "bf16"
    assert all(p.dtype == torch.float32 for p in trainer.raw_model.parameters())


def test_non_finite_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(models, tmp_path):
    model, tok = load(models["bert-cls"], SENT)
    up.attach(model, up.LoRA(r=4), name="t")
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    model.classifier.register_forward_hook(poison)
    trainer = Trainer(model, tok, SENT, sent_examples(64), None,
                      TrainConfig(max_steps=10, batch_size=8, precision="fp32", progress=False, save_every=1),
                      tmp_path, cache=False)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 3 .*last good state is checkpoint"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    last = checkpoint.latest_checkpoint(tmp_path / "checkpoints")
    assert last.name == "step-0000002"
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["diverged"] == "nan"


def test_checkpoint_round_trip_restores_parameters_optimizer_and_rng(models, tmp_path):
    trainer, _ = fit(models["bert-cls"], SENT, sent_examples(32), method=up.LoRA(r=4), max_steps=2, batch_size=8)
    saved = checkpoint.save_checkpoint(tmp_path, 2, trainer.raw_model, trainer.optimizer, {"epoch": 0})
    before = trainable(trainer.raw_model)
    state = {n: {k: v.clone() for k, v in s.items()} for n, s in
             zip(before, (trainer.optimizer.state[p] for p in trainer.raw_model.parameters() if p.requires_grad))}
    torch.manual_seed(123)
    expected_rand = torch.rand(3)
    torch.manual_seed(123)
    # spoil everything, then restore
    with torch.no_grad():
        for p in trainer.raw_model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    torch.rand(5)
    meta = checkpoint.load_checkpoint(saved, trainer.raw_model, trainer.optimizer)
    assert meta["step"] == 2 and meta["epoch"] == 0
    after = trainable(trainer.raw_model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    for n, p in zip(before, (p for p in trainer.raw_model.parameters() if p.requires_grad)):
        assert torch.equal(trainer.optimizer.state[p]["exp_avg"], state[n]["exp_avg"])
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), expected_rand)
    # a checkpoint of another method is refused with a clear error
    other, _ = fit(models["bert-cls"], SENT, sent_examples(16), method=up.BitFit(), max_steps=1, batch_size=8)
    with pytest.raises(UnipeftError, match="does not match this model's trainable parameters"):
        checkpoint.load_checkpoint(saved, other.raw_model, other.optimizer)
    # a half-written checkpoint (no state.json) is never picked
    (tmp_path / ".tmp-step-0000009-1").mkdir()
    (tmp_path / "step-0000010").mkdir()
    assert checkpoint.latest_checkpoint(tmp_path) == saved


def test_resume_in_process_reaches_the_uninterrupted_parameters(models, tmp_path):
    exs = sent_examples(40)
    kw = dict(method=up.LoRA(r=4, dropout=0.1), lr=5e-3, batch_size=8, epochs=2, save_every=3)
    ref, _ = fit(models["bert-cls"], SENT, exs, out=tmp_path / "ref", **kw)
    # run 1 stops after 4 steps (a budget cut stands in for a crash); run 2 resumes from step 3
    torch.manual_seed(0)
    model, tok = load(models["bert-cls"], SENT)
    up.attach(model, up.LoRA(r=4, dropout=0.1), name="t")
    cfg = dict(lr=5e-3, batch_size=8, epochs=2, save_every=3, precision="fp32", progress=False)
    t1 = Trainer(model, tok, SENT, exs, None, TrainConfig(**cfg), tmp_path / "run", cache=False)
    t1.total_steps = 4
    t1.fit()
    torch.manual_seed(1)  # another initialisation: the checkpoint must replace it
    model, tok = load(models["bert-cls"], SENT)
    up.attach(model, up.LoRA(r=4, dropout=0.1), name="t")
    t2 = Trainer(model, tok, SENT, exs, None, TrainConfig(**cfg), tmp_path / "run", cache=False)
    summary = t2.fit(resume=True)
    assert summary["resumed_from"].endswith("step-0000004") and summary["steps"] == 10
    a, b = trainable(ref.raw_model), trainable(t2.raw_model)
    assert all(torch.allclose(a[n], b[n], atol=1e-7) for n in a)
    # settings that fix the data order must match
    t3 = Trainer(model, tok, SENT, exs, None, TrainConfig(**{**cfg, "batch_size": 4}), tmp_path / "run", cache=False)
    with pytest.raises(UnipeftError, match="cannot resume.*batch_size"):
        t3.fit(resume=True)


@pytest.mark.parametrize("method", [
    lambda: up.AdaLoRA(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1),  # masks at every step of 2..7
    lambda: up.DyLoRA(r=4, seed=3),                                          # a new rank at every step
    lambda: up.SparseFT(select="fish", density=0.05, select_after=6),        # scores gathered over steps 1..6
    lambda: up.SparseFT(select="movement", density=0.05, select_after=6),
], ids=["adalora", "dylora", "fish", "movement"])
def test_resume_restores_what_a_delta_learns_between_steps(models, tmp_path, method):
    """AdaLoRA's smoothed importance and kept triplets, DyLoRA's next rank, the scores FISH and movement
    pruning gather before they choose their mask: not parameters, not optimizer state, yet a resumed run
    must continue with them to reach the uninterrupted run's parameters."""
    exs = sent_examples(40)
    cfg = dict(lr=5e-3, batch_size=8, epochs=2, save_every=4, precision="fp32", progress=False)

    def trainer(seed, out):
        torch.manual_seed(seed)
        model, tok = load(models["bert-cls"], SENT)
        up.attach(model, method(), name="t")
        return Trainer(model, tok, SENT, exs, None, TrainConfig(**cfg), out, cache=False)

    ref = trainer(0, tmp_path / "ref")
    ref.fit()
    t1 = trainer(0, tmp_path / "run")
    t1.total_steps = 4  # a crash after step 4 (the schedule was planned for 10)
    t1.fit()
    t2 = trainer(1, tmp_path / "run")
    assert t2.fit(resume=True)["resumed_from"].endswith("step-0000004")
    a, b = trainable(ref.raw_model), trainable(t2.raw_model)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a), max(
        float((a[n] - b[n]).abs().max()) for n in a)


def test_keep_best_and_early_stopping(models):
    trainer, _ = fit(models["bert-cls"], SENT, sent_examples(16), sent_examples(8, 1), method=up.LoRA(r=4),
                     max_steps=1, batch_size=8, early_stopping=2)
    trainer.best_metric = None
    assert trainer._after_eval({"accuracy": 0.5, "f1": 0}) is False and trainer.best_metric == 0.5
    assert trainer._after_eval({"accuracy": 0.4, "f1": 0}) is False and trainer.stale_evals == 1
    assert trainer._after_eval({"accuracy": 0.5, "f1": 0}) is True  # equal is not better: 2 stale evaluations
    gen, _ = fit(models["gpt2-lm"], GEN, gen_examples(16), gen_examples(4, 1), max_steps=1, batch_size=8)
    assert gen._after_eval({"loss": 3.0}) is False and gen._after_eval({"loss": 2.0}) is False
    assert gen.best_metric == 2.0  # lower loss is better


def test_auxiliary_lm_objective(models, tmp_path):
    """The logged loss is L2 + lambda * L1, L1 the next-token loss over the input scored with the tied embeddings."""
    gpt_cls = tiny.save(tmp_path / "g", "gpt2", "cls", dropout=False)
    exs = sent_examples(16)  # one batch of 16: the first step sees every example
    plain, _ = fit(gpt_cls, SENT, exs, max_steps=1, batch_size=16, log_every=1)
    aux, _ = fit(gpt_cls, SENT, exs, max_steps=1, batch_size=16, log_every=1, aux_lm_weight=0.5)
    model, tok = load(gpt_cls, SENT)
    batch = Collator(tok.pad_token_id)([encode(SENT, exs, tok, 128, cache_dir=None).example(i) for i in range(16)])
    with torch.no_grad():
        hidden = model.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        logits = hidden @ model.transformer.wte.weight.t()
    targets = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    l1 = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(), ignore_index=IGNORE)
    assert aux.history[0]["loss"] == pytest.approx(plain.history[0]["loss"] + 0.5 * l1.item(), rel=1e-5)
    with pytest.raises(UnipeftError, match="decoder-only"):
        fit(models["bert-cls"], SENT, exs, max_steps=1, aux_lm_weight=0.5)
    _, gen = fit(models["gpt2-lm-nodrop"], GEN, gen_examples(8), max_steps=1, batch_size=8, aux_lm_weight=1.0)
    assert gen["steps"] == 1


def test_tensorboard_writes_events(models, tmp_path):
    pytest.importorskip("tensorboard")
    fit(models["bert-cls"], SENT, sent_examples(16), out=tmp_path, max_steps=2, batch_size=8, log_every=1,
        tensorboard=True)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------
# recipes: train -> evaluate -> predict from the run directory
# ---------------------------------------------------------------------------

def test_recipe_train_evaluate_predict(models, tmp_path):
    rows = tiny.sentiment_rows(120)
    named = [(t, ["neg", "pos"][y]) for t, y in rows]
    data = {"train": tiny.write_csv(tmp_path / "train.csv", ["text", "label"], named[:100]),
            "dev": tiny.write_csv(tmp_path / "dev.csv", ["text", "label"], named[100:])}
    res = run.train(models["bert-cls"], "sent", "full", out=tmp_path / "run", data=data, max_steps=60, lr=3e-3,
                    batch_size=16, progress=False, precision="fp32")
    assert res["dev"]["accuracy"] >= 0.9
    assert {"delta", "run.json", "results.json", "log.jsonl"} <= {p.name for p in (tmp_path / "run").iterdir()}
    assert run.evaluate(tmp_path / "run")["accuracy"] == res["dev"]["accuracy"]
    assert run.predict(tmp_path / "run", ["a great movie", "an awful film"]) == ["pos", "neg"]
    with pytest.raises(UnipeftError, match="not a run directory"):
        run.evaluate(tmp_path)
    with pytest.raises(UnipeftError, match="split 'test' is not in this task's data"):
        run.evaluate(tmp_path / "run", "test")


def test_regression_trains_with_mse_and_reports_correlations(models, tmp_path):
    reg = Task("sim", "regression")
    exs = [{"text": t, "target": float(2 * y + 0.1 * (i % 3))} for i, (t, y) in enumerate(tiny.sentiment_rows(64))]
    path = tiny.save(tmp_path / "reg", "bert", "cls", num_labels=1)
    model, tok = load(path, reg)
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    up.attach(model, up.FullFineTune(), name="t")
    trainer = Trainer(model, tok, reg, exs, exs[:16], TrainConfig(lr=3e-3, max_steps=80, batch_size=16,
                                                               precision="fp32", progress=False), cache=False)
    summary = trainer.fit()
    assert summary["metric"] == "pearson" and summary["best_metric"] > 0.5
    assert set(trainer.evaluate()) == {"pearson", "spearman"}


def test_beam_search_generation_with_prefix_tuning(models):
    trainer, _ = fit(models["gpt2-lm"], GEN, gen_examples(32), gen_examples(8, 1),
                     up.PrefixTuning(length=3, reparam_hidden=16), max_steps=2, batch_size=16, num_beams=3,
                     max_new_tokens=5)
    from unipeft.training.evaluation import generate
    greedy = generate(trainer.raw_model, GEN, ["name = Alpha food = indian"], trainer.tokenizer, max_new_tokens=5)
    beam = generate(trainer.raw_model, GEN, ["name = Alpha food = indian"], trainer.tokenizer, max_new_tokens=5,
                    num_beams=3)
    assert isinstance(greedy[0], str) and isinstance(beam[0], str)
    assert "bleu" in trainer.evaluate(generation=True)


def test_each_epoch_uses_its_own_batch_order(models):
    """Epoch e trains on batch_order(seed, e): the order a resumed run recomputes from (seed, epoch)."""
    model, tok = load(models["bert-cls"], SENT)
    up.attach(model, up.LoRA(r=4), name="t")
    exs = sent_examples(24)
    cfg = TrainConfig(max_steps=None, epochs=3, batch_size=8, precision="fp32", progress=False, seed=5)
    trainer = Trainer(model, tok, SENT, exs, None, cfg, cache=False)
    seen, forward = [], trainer._forward
    trainer._forward = lambda idx: (seen.append(list(idx)), forward(idx))[1]
    trainer.fit()
    lengths = trainer.train_enc.lengths()
    assert seen == [b for e in range(3) for b in batch_order(lengths, 8, 5, e)]
