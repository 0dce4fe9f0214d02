"""Multi-task training: mixing rules, per-task deltas trained together through up.route, per-task heads,
each task's delta saved on its own (eval/predict alone) and served routed."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

import tiny
import unipeft as up
from unipeft.cli import main
from unipeft.errors import UnipeftError
from unipeft.training import TrainConfig, multitask, run

CUISINES = ("italian", "indian", "french")


def cuisine_rows(n, seed=0):
    """A 3-label task: which cuisine the sentence names."""
    rng = random.Random(seed)
    names = "Alpha Bravo Delta Echo Kilo Lima".split()
    rows = []
    for i in range(n):
        c = CUISINES[i % 3]
        rows.append((f"{rng.choice(names)} serves {c} food near the {rng.choice(['pub', 'cafe', 'centre'])}", c))
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt")
    sent = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(160)]
    food = cuisine_rows(90)
    return {
        "root": root,
        "model": tiny.save(root / "bert", "bert", "cls", dropout=False),
        "gpt2": tiny.save(root / "gpt2", "gpt2", "lm"),
        "sent": {"train": tiny.write_csv(root / "s_train.csv", ["text", "label"], sent[:128]),
                 "dev": tiny.write_csv(root / "s_dev.csv", ["text", "label"], sent[128:])},
        "food": {"train": tiny.write_csv(root / "f_train.csv", ["text", "label"], food[:72]),
                 "dev": tiny.write_csv(root / "f_dev.csv", ["text", "label"], food[72:])},
    }


def task_list(s):
    return [{"task": "sent", **s["sent"]}, {"task": "food", **s["food"]}]


# ---------------------------------------------------------------------------
# mixing
# ---------------------------------------------------------------------------

def test_proportional_mixing_sees_every_example_once_per_epoch():
    batches = multitask.mixed_batches([30, 10, 5], 8, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(45))
    assert batches == multitask.mixed_batches([30, 10, 5], 8, seed=1, epoch=0)
    assert batches != multitask.mixed_batches([30, 10, 5], 8, seed=1, epoch=1)


@pytest.mark.parametrize("sampling", ["proportional", "temperature"])
def test_mixed_batches_grouped_by_length_pad_less_and_keep_the_same_examples(sampling):
    sizes = [300, 300]  # task 0's texts short (8 tokens), task 1's long (60)
    lengths = [8] * 300 + [60] * 300
    plain = multitask.mixed_batches(sizes, 16, seed=0, epoch=0, sampling=sampling)
    grouped = multitask.mixed_batches(sizes, 16, seed=0, epoch=0, sampling=sampling, lengths=lengths)
    assert Counter(i for b in grouped for i in b) == Counter(i for b in plain for i in b)  # the same draw
    padded = lambda batches: sum(len(b) * max(lengths[i] for i in b) for b in batches)  # noqa: E731
    assert padded(grouped) < 0.65 * padded(plain)  # plain batches mix both tasks: nearly all pad to 60
    assert grouped == multitask.mixed_batches(sizes, 16, seed=0, epoch=0, sampling=sampling, lengths=lengths)
    assert {min(i // 300 for i in b) for b in grouped} == {0, 1}  # both tasks still train


def test_temperature_mixing_follows_n_to_the_one_over_t():
    sizes = [900, 100]
    rates = multitask.mixing_rates(sizes, "temperature", 2.0)
    assert rates == pytest.approx([30 / 40, 10 / 40])  # sqrt(900) : sqrt(100)
    assert multitask.mixing_rates(sizes, "proportional", 2.0) == pytest.approx([0.9, 0.1])
    assert multitask.mixing_rates(sizes, "temperature", 1e9) == pytest.approx([0.5, 0.5], abs=1e-6)
    order = [i for b in multitask.mixed_batches(sizes, 10, seed=0, epoch=0, sampling="temperature") for i in b]
    share = sum(i >= 900 for i in order) / len(order)
    assert share == pytest.approx(0.25, abs=0.04)  # the small task is up-sampled from 10% to ~25%
    small = Counter(i for i in order if i >= 900)
    assert max(small.values()) - min(small.values()) <= 1  # cycled: every example before any repeats
    with pytest.raises(UnipeftError, match="temperature must be > 0"):
        multitask.mixing_rates(sizes, "temperature", 0)
    with pytest.raises(UnipeftError, match="unknown sampling"):
        multitask.mixing_rates(sizes, "uniform", 1)


# ---------------------------------------------------------------------------
# per-task deltas in one batch
# ---------------------------------------------------------------------------

def trainer_for(setup, mode="per_task", method=None):
    members = multitask.load_members(multitask.parse_tasks(task_list(setup)))
    model, tok = run.load_model(setup["model"], multitask.base_task(members))
    names = [m.name for m in members] if mode == "per_task" else ["shared"]
    for n in names:
        torch.manual_seed(0)
        up.attach(model, method or up.LoRA(r=2), name=n)
    multitask.train_together(model, names)
    cfg = TrainConfig(lr=1e-2, max_steps=1, batch_size=8, precision="fp32", progress=False)
    return multitask.MultiTaskTrainer(model, tok, members, cfg, per_task=mode == "per_task", cache=False), members


def grads(model, name):
    from unipeft.engine import registry

    return [p.grad for p in registry(model).deltas[name].parameters()]


def test_a_tasks_delta_gets_no_gradient_from_another_tasks_rows(setup):
    trainer, members = trainer_for(setup)
    model = trainer.raw_model
    sent_rows = list(range(0, 8))                  # the first task's examples come first
    food_rows = list(range(128, 136))
    for rows, trained, untouched in ((sent_rows, "sent", "food"), (food_rows, "food", "sent")):
        model.zero_grad(set_to_none=True)
        loss, _ = trainer._forward(rows)
        loss.backward()
        assert all(g is None or not g.any() for g in grads(model, untouched)), untouched
        assert any(g is not None and g.any() for g in grads(model, trained)), trained
    # each task's head: only its own slice of the wide head learns (sent: rows 0-1, food: rows 2-4)
    from unipeft.engine import registry

    model.zero_grad(set_to_none=True)
    loss, _ = trainer._forward(sent_rows[:4] + food_rows[:4])
    loss.backward()
    for name, own in (("sent", slice(0, 2)), ("food", slice(2, 5))):
        head = registry(model).deltas[name].linear["classifier"].weight.grad
        assert head[own].abs().sum() > 0
        rest = torch.ones(5, dtype=torch.bool)
        rest[own] = False
        assert not head[rest].any()


@pytest.mark.parametrize("kind", ["classification", "causal_lm"])
def test_under_fsdp_a_shard_without_a_task_gives_its_delta_an_exact_zero_gradient(setup, kind):
    """FSDP2 needs every process to reduce the same gradients: a shard with no row of a task adds one of
    its rows that runs through the task's delta with no loss, so the loss is unchanged and the task's
    delta gets zeros, not None (tests/test_distributed.py runs it under two FSDP2 processes)."""
    if kind == "classification":
        trainer, _ = trainer_for(setup)
        rows = list(range(0, 6))  # sentiment rows only: the cuisine task is absent
        absent, present = "food", "sent"
    else:
        members = multitask.load_members(multitask.parse_tasks(
            [{"task": t, "kind": "causal_lm", "train": setup["sent"]["train"], "dev": setup["sent"]["dev"],
              "text_column": "text", "target_column": "label"} for t in ("a", "b")]))
        model, tok = run.load_model(setup["gpt2"], multitask.base_task(members))
        for n in ("a", "b"):
            up.attach(model, up.LoRA(r=2), name=n)
        multitask.train_together(model, ["a", "b"])
        cfg = TrainConfig(lr=1e-2, max_steps=1, batch_size=8, precision="fp32", progress=False)
        trainer = multitask.MultiTaskTrainer(model, tok, members, cfg, cache=False)
        rows, absent, present = list(range(0, 6)), "b", "a"
    model = trainer.raw_model
    model.eval()  # no dropout: the two passes must match
    plain, _ = trainer._forward(rows)
    assert trainer._silent_rows(rows) == []  # one process, or DDP: nothing added
    trainer.fsdp = True
    assert len(trainer._silent_rows(rows)) == 1
    model.zero_grad(set_to_none=True)
    loss, _ = trainer._forward(rows)
    loss.backward()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)
    assert all(g is not None and not g.any() for g in grads(model, absent))
    assert any(g is not None and g.any() for g in grads(model, present))


def test_routed_loss_equals_each_task_alone(setup):
    """One routed pass over a mixed batch gives the same loss as each task's rows with its delta alone."""
    trainer, members = trainer_for(setup)
    from unipeft.engine import registry

    torch.manual_seed(3)
    with torch.no_grad():
        for m in members:  # make the deltas differ, so routing matters
            for p in registry(trainer.raw_model).deltas[m.name].parameters():
                p.add_(torch.randn_like(p) * 0.1)
    mixed = [0, 1, 128, 2, 129, 130]
    together, _ = trainer._forward(mixed)
    parts = []
    for rows in ([0, 1, 2], [128, 129, 130]):
        loss, _ = trainer._forward(rows)
        parts.append(loss * len(rows))
    assert together.item() == pytest.approx(sum(p.item() for p in parts) / len(mixed), rel=1e-5)


# ---------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------

def test_cli_per_task_deltas_save_each_task_alone_and_serve_routed(setup, tmp_path, capsys):
    cfg = tmp_path / "mt.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({"model": setup["model"], "task": task_list(setup), "method": "lora",
                                   "lr": 1e-2, "max_steps": 60, "batch_size": 16, "precision": "fp32",
                                   "sampling": "temperature", "temperature": 2.0,
                                   "group_by_length": False}))  # every batch mixes both tasks
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--threads", "1", "--quiet", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["deltas"] == "per_task" and res["tasks"] == ["sent", "food"]
    losses = [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0] - 0.1  # both tasks' rows train their deltas in the same batches
    assert set(res["dev"]["sent"]) == {"accuracy", "f1"} and set(res["dev"]["food"]) == {"accuracy"}
    layout = json.loads((out / "multitask.json").read_text())
    assert [(t["name"], t["offset"], t["outputs"]) for t in layout["tasks"]] == [("sent", 0, 2), ("food", 2, 3)]
    # each task alone: an ordinary run directory (its head cut to its own labels)
    for name in ("sent", "food"):
        assert main(["eval", str(out / name), "--json", "--quiet"]) == 0
        alone = json.loads(capsys.readouterr().out)
        assert alone["accuracy"] == pytest.approx(res["dev"][name]["accuracy"])
    meta = json.loads((out / "food" / "delta" / "delta.json").read_text())
    assert meta["tensors"]["linear:classifier.weight"]["shape"][0] == 3
    texts = ["a great film", "the movie was awful", "Kilo serves indian food near the pub",
             "Lima serves french food near the cafe"]
    tasks = ["sent", "sent", "food", "food"]
    alone = run.predict(out / "sent", texts[:2]) + run.predict(out / "food", texts[2:])
    model, tok, layout = multitask.load(out)
    # one routed pass over a batch mixing the tasks answers as each task's delta alone
    assert multitask.classify(model, tok, layout, texts, tasks) == alone
    assert set(alone[:2]) <= {"neg", "pos"} and set(alone[2:]) <= set(CUISINES)
    # logits too: the saved 3-row head is the food slice of the wide head
    from unipeft.training.batching import Collator, encode

    own, tok2, task, _ = run.load_run(out / "food")
    enc = encode(task, [{"text": t, "target": 0} for t in texts], tok2, 64, prompts_only=True, cache_dir=None)
    batch = Collator(0)([enc.example(i) for i in range(4)])
    with torch.no_grad(), up.route(model, ["food"] * 4):
        assert torch.allclose(own(**batch).logits, model(**batch).logits[:, 2:5], atol=1e-5)


def test_shared_delta_and_task_names_on_the_command_line(setup, tmp_path, capsys):
    out = tmp_path / "shared"
    args = ["train", "--model", setup["model"], "--task", "sent,food", "--deltas", "shared", "--method", "lora",
            "--train", setup["sent"]["train"], "--max-steps", "3", "--batch-size", "8", "--precision", "fp32",
            "--threads", "1", "--quiet", "--out", str(out), "--json"]
    # one --train for two tasks reads the same file twice: allowed, the names still differ
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["deltas"] == "shared" and set(res["dev"]) == {"sent", "food"}
    assert json.loads((out / "sent" / "run.json").read_text())["delta_name"] == "sent"


def test_a_killed_multitask_run_resumes_to_the_uninterrupted_deltas(setup, tmp_path, monkeypatch):
    kw = dict(method="lora", deltas="per_task", sampling="temperature", temperature=2.0, batch_size=8, epochs=1.0,
              save_every=3, precision="fp32", progress=False, lr=5e-3, eval_every=0)  # the cut run evaluates nothing
    ref = multitask.train(setup["model"], task_list(setup), out=tmp_path / "ref", **kw)

    class CutAfter4(multitask.MultiTaskTrainer):  # a crash after step 4 (the run plans 25)
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.total_steps = 4

    with monkeypatch.context() as m:
        m.setattr(multitask, "MultiTaskTrainer", CutAfter4)
        multitask.train(setup["model"], task_list(setup), out=tmp_path / "run", **kw)
    # the same run resumed; another mix is refused before anything is loaded
    with pytest.raises(UnipeftError, match="task mix differs.*temperature: checkpoint 2.0, now 3.0"):
        multitask.train(setup["model"], task_list(setup), out=tmp_path / "run", resume=True,
                        **{**kw, "temperature": 3.0})
    res = multitask.train(setup["model"], task_list(setup), out=tmp_path / "run", resume=True, **kw)
    assert res["resumed_from"].endswith("step-0000004") and res["steps"] == ref["steps"] > 4
    a = {n: p for n, p in ref["_model"].named_parameters() if p.requires_grad}
    b = {n: p for n, p in res["_model"].named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_bad_multitask_setups_are_one_line_errors(setup, tmp_path):
    gen = tiny.write_csv(tmp_path / "g.csv", ["text", "target"], tiny.table_rows(20))
    with pytest.raises(UnipeftError, match="mixes tasks of one model head"):
        multitask.load_members(multitask.parse_tasks([{"task": "sent", **setup["sent"]},
                                                      {"task": "gen", "train": gen, "kind": "causal_lm"}]))
    with pytest.raises(UnipeftError, match="at least two tasks"):
        multitask.parse_tasks("sent")
    with pytest.raises(UnipeftError, match="task names repeat"):
        multitask.parse_tasks(["sst2", "sst2"])
    with pytest.raises(UnipeftError, match="unknown deltas mode"):
        multitask.train(setup["model"], task_list(setup), deltas="each")


def test_generation_tasks_train_together_and_each_evaluates_alone(setup, tmp_path):
    a = tiny.write_csv(tmp_path / "a.csv", ["text", "target"], tiny.table_rows(24, seed=1))
    b = tiny.write_csv(tmp_path / "b.csv", ["text", "target"], [(t, s) for s, t in tiny.table_rows(24, seed=2)])
    out = tmp_path / "gen"
    res = multitask.train(setup["gpt2"], [{"task": "fwd", "train": a, "kind": "causal_lm"},
                                          {"task": "back", "train": b, "kind": "causal_lm"}], "lora",
                          out=out, max_steps=4, batch_size=8, precision="fp32", progress=False, lr=1e-2,
                          max_new_tokens=8)
    assert set(res["dev"]) == {"fwd", "back"} and "loss" in res["dev"]["fwd"]
    for name in ("fwd", "back"):
        assert run.evaluate(out / name, limit=2)["loss"] == pytest.approx(res["dev"][name]["loss"], rel=1e-4)
    # served routed: one batch, row i on its task's delta, as each delta alone
    model, tok, layout = multitask.load(out)
    ids = torch.tensor([tok("name = Alpha food = indian")["input_ids"]] * 2)
    with torch.no_grad():
        with up.route(model, ["fwd", "back"]):
            routed = model(input_ids=ids).logits
        for row, name in enumerate(("fwd", "back")):
            up.activate(model, [name])
            assert torch.allclose(routed[row], model(input_ids=ids[:1]).logits[0], atol=1e-5)
    assert not torch.allclose(routed[0], routed[1])


def test_seq2seq_tasks_train_together_and_serve_routed(setup, tmp_path):
    t5 = tiny.save(tmp_path / "t5", "t5", "seq2seq", dropout=False)
    a = tiny.write_csv(tmp_path / "a.csv", ["text", "target"], tiny.table_rows(24, seed=1))
    b = tiny.write_csv(tmp_path / "b.csv", ["text", "target"], [(t, s) for s, t in tiny.table_rows(24, seed=2)])
    out = tmp_path / "s2s"
    res = multitask.train(t5, [{"task": "fwd", "train": a, "kind": "seq2seq"},
                               {"task": "back", "train": b, "kind": "seq2seq"}], "lora",
                          out=out, max_steps=4, batch_size=8, precision="fp32", progress=False, lr=1e-2,
                          max_new_tokens=4)
    for name in ("fwd", "back"):
        assert run.evaluate(out / name, limit=2)["loss"] == pytest.approx(res["dev"][name]["loss"], rel=1e-4)
    model, tok, _ = multitask.load(out)
    ids = torch.tensor([tok("name = Alpha food = indian")["input_ids"]] * 2)
    dec = torch.tensor([[0, 5, 6]] * 2)
    with torch.no_grad():
        with up.route(model, ["fwd", "back"]):  # encoder and decoder rows both on their task's delta
            routed = model(input_ids=ids, decoder_input_ids=dec).logits
        for row, name in enumerate(("fwd", "back")):
            up.activate(model, [name])
            alone = model(input_ids=ids[:1], decoder_input_ids=dec[:1]).logits[0]
            assert torch.allclose(routed[row], alone, atol=1e-5)
    assert not torch.allclose(routed[0], routed[1])


def test_chat_and_causal_tasks_share_a_run_with_a_given_template(setup, tmp_path):
    from test_chat import TEMPLATE, table_chats, write_jsonl

    chats = write_jsonl(tmp_path / "c.jsonl", table_chats(20))
    plain = tiny.write_csv(tmp_path / "p.csv", ["text", "target"], tiny.table_rows(20, seed=4))
    out = tmp_path / "mixed"
    res = multitask.train(setup["gpt2"], [{"task": "talk", "train": chats, "kind": "chat"},
                                          {"task": "plain", "train": plain, "kind": "causal_lm"}], "lora",
                          out=out, chat_template=TEMPLATE, max_steps=2, batch_size=8, max_length=40,
                          max_new_tokens=4, precision="fp32", progress=False)
    assert set(res["dev"]) == {"talk", "plain"}
    info = json.loads((out / "talk" / "run.json").read_text())
    assert info["task"]["kind"] == "chat" and info["task"]["chat_template"] == TEMPLATE
    assert run.evaluate(out / "talk")["loss"] == pytest.approx(res["dev"]["talk"]["loss"], rel=1e-4)
    with pytest.raises(UnipeftError, match="none of these tasks is one"):
        multitask.train(setup["gpt2"], [{"task": "plain", "train": plain, "kind": "causal_lm"},
                                        {"task": "p2", "train": plain, "kind": "causal_lm"}], chat_template=TEMPLATE)


def test_classification_and_regression_tasks_train_together(setup, tmp_path):
    rows = tiny.sentiment_rows(60, seed=7)
    score = tiny.write_csv(tmp_path / "r.csv", ["text", "label"], [(t, 4.0 * y + 0.5) for t, y in rows])
    out = tmp_path / "reg"
    res = multitask.train(setup["model"], [{"task": "sent", **setup["sent"]},
                                           {"task": "score", "train": score, "kind": "regression"}], "lora",
                          out=out, max_steps=4, batch_size=8, precision="fp32", progress=False, lr=1e-2)
    assert set(res["dev"]["score"]) == {"pearson", "spearman"} and "accuracy" in res["dev"]["sent"]
    layout = json.loads((out / "multitask.json").read_text())
    assert [(t["name"], t["offset"], t["outputs"]) for t in layout["tasks"]] == [("sent", 0, 2), ("score", 2, 1)]
    assert run.evaluate(out / "score")["pearson"] == pytest.approx(res["dev"]["score"]["pearson"], rel=1e-3)
    texts = ["a great film", "an awful movie"]
    model, tok, layout = multitask.load(out)
    routed = multitask.classify(model, tok, layout, texts, ["score", "sent"])
    alone = run.predict(out / "score", texts[:1]) + run.predict(out / "sent", texts[1:])
    assert routed[0] == pytest.approx(alone[0], abs=1e-5) and routed[1] == alone[1]
