"""PET / iPET (`unipeft pet`): the three pitfalls of the reference code, resuming, iPET's growing sets, the CLI."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import tiny
from unipeft.cli import main
from unipeft.errors import UnipeftError
from unipeft.prompting import Scorer, Template, Verbalizer, pet

PATTERNS = [("{text} . it was {label} .", "pos=good|very nice,neg=bad"), ("{text} . {label} movie .", "pos=great,neg=awful")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pet")
    rows = [(t, ["neg", "pos"][y]) for t, y in tiny.sentiment_rows(100)]
    return {"root": root, "model": tiny.save(root / "gpt2", "gpt2", "lm", dropout=False),
            "data": {"train": tiny.write_csv(root / "train.csv", ["text", "label"], rows[:80]),
                     "dev": tiny.write_csv(root / "dev.csv", ["text", "label"], rows[80:])}}


def small(**kw):
    base = dict(method="lora", lr=1e-2, steps=3, final_steps=3, batch_size=4, lm_batch_size=2, max_length=48)
    return pet.PETConfig(**{**base, **kw})


def run(files, out, cfg, patterns=PATTERNS, **kw):
    return pet.run(files["model"], "sent", patterns, cfg, out=out, data=files["data"], train_size=8,
                   unlabelled_size=24, **kw)


def soft_labels(out, generation=0):
    from safetensors.torch import load_file

    return load_file(str(out / f"gen{generation}" / "soft_labels" / pet.SCORES))["probs"]


# ---------------------------------------------------------------------------
# pitfall 1 (pet issue 30): alpha weights the LM loss
# ---------------------------------------------------------------------------

def test_alpha_weights_the_language_modelling_loss():
    ce, lm = torch.tensor(2.0), torch.tensor(10.0)
    assert torch.isclose(pet.pet_loss(ce, lm, 1e-4), torch.tensor((1 - 1e-4) * 2.0 + 1e-4 * 10.0))
    assert pet.pet_loss(ce, lm, 0.0) == ce and pet.pet_loss(ce, None, 1e-4) == ce
    with pytest.raises(UnipeftError, match="weight of the auxiliary LM loss.*0.9999.*pet issue 30"):
        pet.PETConfig(lm_weight=0.9999)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_the_lm_loss_is_the_models_own_over_the_predicted_tokens(family):
    """Next-token loss over the real tokens (causal) or the loss at 15% masked tokens (masked), as the
    model's full logits give it, though only the predicted positions' logits are computed."""
    model, tok = tiny.make(family, "mlm" if family == "bert" else "lm"), tiny.tokenizer(family)
    tok.add_special_tokens({"mask_token": "[MASK]"})
    texts = ["the movie was good", "a plot", "it is very dull and boring"]
    got = pet._lm_loss(model, tok, texts, 32, torch.Generator().manual_seed(0))
    enc = tok(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if family == "gpt2":
        logits = model(**enc).logits[:, :-1]
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    else:
        special = torch.tensor([[t in tok.all_special_ids for t in row] for row in ids.tolist()])
        pick = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.15) & (mask == 1) & ~special
        assert pick.any()
        logits = model(input_ids=ids.masked_fill(pick, tok.mask_token_id), attention_mask=mask).logits
        target = ids.masked_fill(~pick, -100)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_training_adds_alpha_times_the_lm_loss(monkeypatch):
    model, tok = tiny.make("gpt2"), tiny.tokenizer("gpt2")
    calls = []
    real = pet._lm_loss

    def counting(*a, **k):
        loss = real(*a, **k)
        calls.append(loss.detach())
        return loss

    monkeypatch.setattr(pet, "_lm_loss", counting)
    head = pet.PromptHead.build(*PATTERNS[0])
    net = head.wrap(model, tok)
    texts, targets = ["the movie was good . it was", "a bad plot . it was"], torch.eye(2)[[1, 0]]
    grads = {}
    for alpha in (0.0, 0.25):
        model.zero_grad()
        torch.manual_seed(0)
        cfg = pet.PETConfig(lm_weight=alpha, steps=1, batch_size=2, lm_batch_size=2)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        pet._fit(net, tok, texts, targets, cfg, 1, 1e-3, seed=0, lm=model, unlabelled=["a good film", "the plot"])
        grads[alpha] = sum(float((p.detach() - before[n]).abs().sum()) for n, p in model.named_parameters())
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(before[n])
    assert len(calls) == 1  # the LM loss is computed only when alpha > 0
    assert grads[0.0] > 0 and grads[0.25] != grads[0.0]


# ---------------------------------------------------------------------------
# pitfall 2 (pet issue 14): no stale results merged; resuming reads only completed, fingerprinted units
# ---------------------------------------------------------------------------

def test_resume_retrains_only_incomplete_units_and_ignores_stray_files(files, tmp_path):
    out = tmp_path / "run"
    first = run(files, out, small())
    assert first["trained"] == ["weights", "gen0/p0", "gen0/p1", "gen0/final"] and first["reused"] == []
    soft = soft_labels(out)
    assert soft.shape == (24, 2) and torch.allclose(soft.sum(-1), torch.ones(24))
    # a killed run: p1's scores written, its done.json not yet; a stray unit folder from some other run
    (out / "gen0" / "p1" / pet.DONE).unlink()
    shutil.copytree(out / "gen0" / "p0", out / "gen0" / "p7")
    again = run(files, out, small())
    assert again["trained"] == ["gen0/p1"] and again["reused"] == ["weights", "gen0/p0", "gen0/final"]
    # a reused unit keeps the time it took when it was trained, so a resumed run's whole cost is known
    assert set(first["unit_seconds"]) == {"weights", "gen0/p0", "gen0/p1", "gen0/final"}
    assert all(v > 0 for v in first["unit_seconds"].values())
    assert again["unit_seconds"]["gen0/p0"] == first["unit_seconds"]["gen0/p0"]
    assert again["unit_seconds"]["gen0/final"] == first["unit_seconds"]["gen0/final"]
    assert again["weights"] == first["weights"] and again["unit_seconds"]["weights"] == first["unit_seconds"]["weights"]
    assert torch.allclose(soft_labels(out), soft, atol=1e-6)  # the retrained unit is the same (seeded)
    assert again["ensemble_dev"] == first["ensemble_dev"]


def test_changed_settings_never_reuse_stale_scores(files, tmp_path):
    out = tmp_path / "run"
    run(files, out, small(steps=2))
    changed = run(files, out, small(steps=4))
    # every trained unit's fingerprint changed: nothing from the old run is merged; the zero-shot ensemble
    # weights depend only on the base, T, the patterns and max_length
    assert changed["reused"] == ["weights"]
    fresh = run(files, tmp_path / "fresh", small(steps=4))
    assert torch.allclose(soft_labels(out), soft_labels(tmp_path / "fresh"), atol=1e-6)
    assert changed["ensemble_dev"] == fresh["ensemble_dev"]
    # scores whose fingerprint does not match their done.json are not trusted either
    done = json.loads((out / "gen0" / "p0" / pet.DONE).read_text())
    shutil.copy(tmp_path / "fresh" / "gen0" / "p1" / pet.SCORES, out / "gen0" / "p0" / pet.SCORES)
    assert pet._load_scores(out / "gen0" / "p0", done["fingerprint"]) is None


# ---------------------------------------------------------------------------
# pitfall 3 (pet issue 92): multi-token verbalizer words with a BPE tokenizer
# ---------------------------------------------------------------------------

def bpe_model(folder):
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [t for t, _ in tiny.sentiment_rows(300)] + ["it was . movie"] * 5
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=90, special_tokens=["<pad>", "<unk>", "<eos>"]))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    cfg = tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0,
                        eos_token_id=2, bos_token_id=2)
    torch.manual_seed(0)
    tf.GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder), tok


def test_multi_token_verbalizers_with_bpe(files, tmp_path):
    folder, tok = bpe_model(tmp_path / "bpe")
    verbalizer = Verbalizer.parse("pos=good|superb,neg=terrible|bad")
    lengths = [len(w) for ws in verbalizer.token_ids(tok) for w in ws]
    assert min(lengths) >= 2 and max(lengths) >= 4  # BPE splits every word here
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder).eval()
    s = Scorer(model, tok, Template("{text} it was {label}"), verbalizer, [("a good film", "pos")])
    ex = [("the movie was great", None), ("a dull plot", None)]
    assert torch.allclose(s.scores(ex), s.naive(ex), atol=1e-4)
    files = dict(files, model=folder)
    res = run(files, tmp_path / "run", small(), patterns=[("{text} it was {label}", verbalizer)])
    assert res["trained"] == ["weights", "gen0/p0", "gen0/final"] and 0 <= res["dev"]["accuracy"] <= 1


# ---------------------------------------------------------------------------
# iPET and the command line
# ---------------------------------------------------------------------------

def test_ipet_grows_each_training_set_by_d(files, tmp_path):
    out = tmp_path / "ipet"
    res = run(files, out, small(generations=2, factor=2.0, sample_fraction=1.0))
    assert res["trained"] == ["weights", "gen0/p0", "gen0/p1", "gen1/p0", "gen1/p1", "gen2/p0", "gen2/p1", "gen2/final"]
    sizes = [json.loads((out / f"gen{g}" / "p0" / pet.DONE).read_text())["train_examples"] for g in range(3)]
    assert sizes[0] == 8 and 8 < sizes[1] <= 16 and sizes[1] < sizes[2] <= 8 * 4
    with pytest.raises(UnipeftError, match="iPET needs at least 2"):
        run(files, tmp_path / "one", small(generations=1), patterns=PATTERNS[:1])


def test_ipet_after_pet_in_the_same_folder_starts_from_pets_generation_0(files, tmp_path):
    out = tmp_path / "both"
    pet_res = run(files, out, small())
    ipet = run(files, out, small(generations=1))
    assert ipet["reused"] == ["weights", "gen0/p0", "gen0/p1"] and ipet["trained"] == ["gen1/p0", "gen1/p1", "gen1/final"]
    fresh = run(files, tmp_path / "fresh", small(generations=1))
    assert ipet["dev"] == fresh["dev"] and ipet["ensemble_dev"] == fresh["ensemble_dev"]
    again = run(files, out, small())  # and PET again: its own soft labels and classifier, kept beside iPET's
    assert again["dev"] == pet_res["dev"] and again["ensemble_dev"] == pet_res["ensemble_dev"]
    assert again["trained"] == [] and again["reused"] == ["weights", "gen0/p0", "gen0/p1", "gen0/final"]
    kept = {g: json.loads((out / f"gen{g}" / "results.json").read_text()) for g in (0, 1)}
    assert [kept[g]["generations"] for g in (0, 1)] == [0, 1] and kept[1]["dev"] == ipet["dev"]
    assert (out / "gen0" / "final" / "delta").is_dir() and (out / "gen1" / "final" / "delta").is_dir()
    assert not torch.allclose(soft_labels(out, 0), soft_labels(out, 1))
    assert json.loads((out / "results.json").read_text())["generations"] == 0  # the top one: the latest run's


def test_cli_pet_json_and_resume(files, tmp_path, capsys):
    args = ["pet", "--model", files["model"], "--task", "sent", "--train", files["data"]["train"], "--dev",
            files["data"]["dev"], "--template", " || ".join(p for p, _ in PATTERNS),
            "--verbalizer", " || ".join(v for _, v in PATTERNS), "--labelled", "8", "--unlabelled", "16",
            "--steps", "2", "--final-steps", "2", "--max-length", "48", "--out", tmp_path / "cli", "--json"]
    assert main([str(a) for a in args]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["patterns"] == 2 and "accuracy" in first["dev"] and len(first["trained"]) == 4
    assert main([str(a) for a in args]) == 0
    assert json.loads(capsys.readouterr().out)["reused"] == first["trained"]
    assert main([str(a) for a in args] + ["--alpha", "0.9999"]) == 2
    assert "pet issue 30" in capsys.readouterr().err
