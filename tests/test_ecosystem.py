"""unipeft in the surrounding ecosystem: transformers.Trainer, TRL's SFTTrainer,
torch.compile and the Hugging Face Hub.

* Trainer / SFTTrainer: a delta trains with gradient checkpointing on (the
  reentrant form too, where a frozen embedding would cut the gradient), the loss
  falls, the base stays put, and every checkpoint holds the delta twice: in the
  Trainer's own model.safetensors and as an ``up.save`` folder written by
  ``SaveDeltaCallback``, which loads onto a fresh base with the same outputs.
* torch.compile: compiled and eager agree (forward and gradients) with LoRA,
  (IA)3 and adapters, with no graph break, and the compiled model follows
  activate / merge / detach. The fast tests use the ``aot_eager`` backend
  (dynamo + AOTAutograd, where a unipeft construct would break); one ``slow``
  test runs inductor, which builds C++ kernels.
* Hub: the upload is captured by replacing ``HfApi.create_repo/upload_folder``
  and the download by replacing ``snapshot_download``; offline mode and an
  unreachable endpoint are the real ones (no network is needed for either).
"""
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
import unipeft as up
from unipeft.compat import is_activation_checkpointing
from unipeft.integrations import SaveDeltaCallback

METHODS = {
    "lora": lambda: up.LoRA(r=4, alpha=8),
    "ia3": lambda: up.IA3(),
    "houlsby": lambda: up.Adapter(style="houlsby", bottleneck=8),
    "parallel": lambda: up.Adapter(style="parallel", bottleneck=8, locations=("attention", "ffn")),
}


def lm_rows(n=8, length=12, distinct=4):
    """A few token sequences repeated: a causal LM can memorise them in a few steps."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, tiny.VOCAB, (distinct, length), generator=g)
    mask = torch.ones(length, dtype=torch.long)
    return [{"input_ids": ids[i % distinct], "attention_mask": mask, "labels": ids[i % distinct]} for i in range(n)]


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(**x).logits


def delta_keys(path, name):
    """The delta's tensors inside a Trainer-written model.safetensors."""
    return {k: v for k, v in load_file(str(path)).items() if f".unipeft_deltas.{name}." in k}


def live_delta(model, name):
    return {n: p.detach() for n, p in model.named_parameters() if f".unipeft_deltas.{name}." in n}


# ---------------------------------------------------------------------------
# transformers.Trainer
# ---------------------------------------------------------------------------

def hf_args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), max_steps=8, save_steps=4, per_device_train_batch_size=4, learning_rate=3e-2,
                lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                seed=0, activation_checkpointing=True)
    base.update(kw)
    return TrainingArguments(**base)


def hf_train(out, method, reentrant, **kw):
    from transformers import Trainer

    model = tiny.make("gpt2")
    up.attach(model, METHODS[method](), name="t")
    args = hf_args(out, activation_checkpointing_kwargs={"use_reentrant": reentrant}, **kw)
    trainer = Trainer(model=model, args=args, train_dataset=lm_rows(), callbacks=[SaveDeltaCallback()])
    return model, trainer


@pytest.mark.parametrize("method,reentrant", [("lora", True), ("ia3", False), ("houlsby", True)])
def test_trainer_with_checkpointing_trains_and_checkpoints_the_delta(tmp_path, method, reentrant):
    model, trainer = hf_train(tmp_path, method, reentrant)
    delta_before, base_before = trainable(model), frozen(model)
    trainer.train()
    assert is_activation_checkpointing(model)  # the Trainer really checkpointed
    # reentrant checkpointing behind a frozen embedding gets no gradient unless the embedding's output
    # requires grad (transformers hooks it): the delta would stay at its initial values
    for n, p in trainable(model).items():
        assert not torch.equal(p, delta_before[n]), f"{n} did not train"
    for n, p in frozen(model).items():
        assert torch.equal(p, base_before[n]), f"base parameter {n} changed"
    ls = losses(trainer)
    assert len(ls) == 8 and sum(ls[-2:]) < sum(ls[:2]), ls

    x = tiny.batch("gpt2")
    for step in (4, 8):
        ckpt = tmp_path / f"checkpoint-{step}"
        folder = ckpt / "unipeft" / "t"
        meta = json.loads((folder / "delta.json").read_text())
        assert meta["name"] == "t" and meta["method"]["kind"] == METHODS[method]().kind
        # the Trainer's own checkpoint holds the same delta tensors as the unipeft folder
        in_model = delta_keys(ckpt / "model.safetensors", "t")
        in_delta = load_file(str(folder / "delta.safetensors"))
        assert len(in_model) == len(in_delta) > 0
        for k, v in in_model.items():
            path, pname = k.split(".unipeft_deltas.t.")
            assert torch.equal(v, in_delta[f"linear:{path}.{pname}"]), k
    # the last checkpoint and the end-of-training folder are the trained delta: a fresh base reproduces the model
    final = live_delta(model, "t")
    assert all(torch.equal(final[k], v) for k, v in delta_keys(tmp_path / "checkpoint-8" / "model.safetensors",
                                                               "t").items())
    assert not all(torch.equal(final[k], v) for k, v in delta_keys(tmp_path / "checkpoint-4" / "model.safetensors",
                                                                   "t").items())
    want = outputs(model, x)
    for folder in (tmp_path / "checkpoint-8" / "unipeft" / "t", tmp_path / "unipeft" / "t"):
        fresh = up.load(tiny.make("gpt2"), folder)
        torch.testing.assert_close(outputs(fresh, x), want, rtol=0, atol=1e-6)


def test_trainer_resume_from_checkpoint_restores_the_delta(tmp_path):
    from transformers import Trainer

    model, trainer = hf_train(tmp_path, "lora", reentrant=False, max_steps=4)
    trainer.train()
    x = tiny.batch("gpt2")
    want = outputs(model, x)
    # a fresh base with the same method attached under the same name (new random A): resuming at the last
    # step trains nothing more, so the model is exactly what the Trainer's model.safetensors holds
    fresh = up.attach(tiny.make("gpt2"), up.LoRA(r=4, alpha=8), name="t")
    assert not torch.allclose(outputs(fresh, x), want)
    again = Trainer(model=fresh, args=hf_args(tmp_path, max_steps=4), train_dataset=lm_rows())
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    torch.testing.assert_close(outputs(fresh, x), want, rtol=0, atol=1e-6)


def test_diff_pruning_trains_on_past_a_checkpoint_and_resumes_exactly(tmp_path):
    """SaveDeltaCallback writes DiffPruning's projected (final) form at each checkpoint without projecting
    the live delta: the training goes on with the parameters the optimizer holds (before, it stopped at
    the first checkpoint), and a run resumed from that checkpoint ends where the uninterrupted one does."""
    from transformers import Trainer

    from unipeft.engine import registry

    def run(out, resume=None, seed=0):
        torch.manual_seed(seed)  # a resumed run starts from another initialisation: the checkpoint must win
        model = up.attach(tiny.make("gpt2"), up.DiffPruning(sparsity=0.9), name="t")
        trainer = Trainer(model=model, args=hf_args(out), train_dataset=lm_rows(), callbacks=[SaveDeltaCallback()])
        trainer.train(resume_from_checkpoint=resume)
        return model

    x = tiny.batch("gpt2")
    model = run(tmp_path / "a")
    assert registry(model).deltas["t"].config.finalized   # the end of training: the final form, file == memory
    want = outputs(model, x)
    at4 = up.load(tiny.make("gpt2"), tmp_path / "a" / "checkpoint-4" / "unipeft" / "t")
    assert registry(at4).deltas["t"].config.finalized
    assert not torch.allclose(outputs(at4, x), want, atol=1e-4)   # steps 5-8 changed the delta
    resumed = run(tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-4"), seed=1)
    torch.testing.assert_close(outputs(resumed, x), want, rtol=0, atol=1e-6)


def test_save_delta_callback_errors(tmp_path):
    from transformers import TrainerControl, TrainerState

    args, state, control = hf_args(tmp_path), TrainerState(), TrainerControl()
    with pytest.raises(up.UnipeftError, match="no unipeft delta attached"):
        SaveDeltaCallback().on_train_begin(args, state, control, model=tiny.make("gpt2"))
    model = up.attach(tiny.make("gpt2"), up.LoRA(r=2), name="a")
    with pytest.raises(up.UnipeftError, match=r"no delta named 'b'; attached deltas: 'a'"):
        SaveDeltaCallback(names="b").on_train_begin(args, state, control, model=model)
    with pytest.raises(up.UnipeftError, match="folder must be a plain folder name"):
        SaveDeltaCallback(folder="a/b")
    state.global_step = 3  # no checkpoint-3 folder: the callback does not invent one
    with pytest.raises(up.UnipeftError, match="saved no checkpoint folder"):
        SaveDeltaCallback().on_save(args, state, control, model=model)
    assert not (tmp_path / "checkpoint-3").exists()
    # a torch.compile wrapper is seen through; names= saves a delta that is switched off
    up.attach(model, up.IA3(), name="b")
    SaveDeltaCallback(names=["a", "b"]).on_train_end(args, state, control, model=torch.compile(model))
    assert (tmp_path / "unipeft" / "a" / "delta.json").is_file()
    assert (tmp_path / "unipeft" / "b" / "delta.json").is_file()


# ---------------------------------------------------------------------------
# TRL's SFTTrainer
# ---------------------------------------------------------------------------

def test_trl_sft_trainer_with_checkpointing(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model, tok = tiny.make("llama"), tiny.tokenizer("llama")
    up.attach(model, up.LoRA(r=4, alpha=8, targets="all-linear"), name="sft")
    delta_before, base_before = trainable(model), frozen(model)
    data = Dataset.from_list([{"text": f"{a} {b}"} for a, b in tiny.table_rows(8)])
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=8, save_steps=4, per_device_train_batch_size=4,
                         learning_rate=3e-2, lr_scheduler_type="constant", activation_checkpointing=True, max_length=32,
                         logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                         # SFTConfig defaults to bf16, and accelerate then leaves the model's forward under autocast
                         bf16=False)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                             callbacks=[SaveDeltaCallback()])
    trainer.train()
    assert is_activation_checkpointing(model)
    for n, p in trainable(model).items():
        assert not torch.equal(p, delta_before[n]), f"{n} did not train"
    for n, p in frozen(model).items():
        assert torch.equal(p, base_before[n]), f"base parameter {n} changed"
    ls = losses(trainer)
    assert sum(ls[-2:]) < sum(ls[:2]), ls
    for step in (4, 8):
        assert delta_keys(tmp_path / f"checkpoint-{step}" / "model.safetensors", "sft")
        assert (tmp_path / f"checkpoint-{step}" / "unipeft" / "sft" / "delta.safetensors").is_file()
    x = tiny.batch("llama")
    fresh = up.load(tiny.make("llama"), tmp_path / "checkpoint-8" / "unipeft" / "sft")
    torch.testing.assert_close(outputs(fresh, x), outputs(model, x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------

def randomize(model, name):
    """Move a delta away from its identity init so that it changes the outputs."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in up.engine.registry(model).deltas[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def compile_check(family, backend, backward=True):
    """LoRA, (IA)3, a sequential and a parallel adapter active together, compiled as one graph (and the
    training graphs, forward and backward, with ``backward``)."""
    torch._dynamo.reset()
    model, x = tiny.make(family), tiny.batch(family)
    base = outputs(model, x)
    for name, make in METHODS.items():
        up.attach(model, make(), name=name)
        randomize(model, name)
    up.activate(model, list(METHODS))
    eager = outputs(model, x)
    assert not torch.allclose(eager, base)  # the deltas are in the computation being compared
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: a graph break fails
    with torch.no_grad():
        torch.testing.assert_close(compiled(**x).logits, eager, rtol=1e-5, atol=1e-5)
    if not backward:
        return
    # one backward step, compiled and eager (eval mode: no dropout, so both compute the same function)
    grads = []
    for m in (compiled, model):
        model.zero_grad()
        m(**x).logits.float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert {n.split(".unipeft_deltas.")[1].split(".")[0] for n in grads[1]} == set(METHODS)
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_compile_matches_eager():
    compile_check("gpt2", "aot_eager")


def test_compiled_model_follows_activate_merge_detach():
    torch._dynamo.reset()
    model, x = tiny.make("llama"), tiny.batch("llama")
    base = outputs(model, x)
    up.attach(model, up.LoRA(r=4, alpha=8), name="a")
    up.attach(model, up.IA3(), name="b")
    randomize(model, "a")
    randomize(model, "b")
    up.activate(model, ["a", "b"])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)

    def same():
        with torch.no_grad():
            got = compiled(**x).logits
        want = outputs(model, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return want

    both = same()
    up.activate(model, ["a"])  # the sites' tuples of active deltas are guarded: this recompiles
    only_a = same()
    assert not torch.allclose(only_a, both) and not torch.allclose(only_a, base)
    up.merge(model, "a")
    torch.testing.assert_close(same(), only_a, rtol=1e-5, atol=1e-5)
    up.unmerge(model, "a")
    up.detach(model, "a")
    up.detach(model, "b")  # the linear maps get their own classes back
    torch.testing.assert_close(same(), base, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        pytest.skip("inductor on CPU needs a C++ compiler")
    # the inference graph only: the aot_eager test traces the training graphs (forward and backward) with the
    # same deltas, and inductor's C++ builds of those two were most of this test's time (77 s with a
    # fresh inductor cache on 2 cores, 38 s for the inference graph alone with two other jobs running)
    compile_check("gpt2", "inductor", backward=False)


# ---------------------------------------------------------------------------
# Hugging Face Hub
# ---------------------------------------------------------------------------

@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """HfApi.create_repo / upload_folder and snapshot_download against a folder: repo id -> files."""
    import huggingface_hub

    root = tmp_path / "hub"
    calls = {"create_repo": [], "upload_folder": [], "snapshot_download": []}

    def create_repo(self, repo_id, **kw):
        calls["create_repo"].append({"repo_id": repo_id, "token": self.token, **kw})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, **kw):
        calls["upload_folder"].append({"repo_id": repo_id, "allow_patterns": allow_patterns, **kw})
        target = root / repo_id
        target.mkdir(parents=True, exist_ok=True)
        for f in Path(folder_path).iterdir():
            if allow_patterns is None or f.name in allow_patterns:
                shutil.copy(f, target / f.name)

    def snapshot_download(repo_id, *, allow_patterns=None, **kw):
        calls["snapshot_download"].append({"repo_id": repo_id, "allow_patterns": allow_patterns, **kw})
        src, out = root / repo_id, tmp_path / "cache" / repo_id
        out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir() if src.is_dir() else ():
            if allow_patterns is None or f.name in allow_patterns:
                shutil.copy(f, out / f.name)
        return str(out)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return root, calls


def trained_bert():
    model = up.attach(tiny.make("bert"), up.LoRA(r=4, alpha=8), name="sst2")
    randomize(model, "sst2")
    return model


def test_push_uploads_the_delta_and_a_model_card(fake_hub):
    root, calls = fake_hub
    model = trained_bert()
    url = up.push(model, "someone/tiny-lora", name="sst2", token="hf_x", private=True)
    assert url == "https://huggingface.co/someone/tiny-lora"
    (create,), (upload,) = calls["create_repo"], calls["upload_folder"]
    assert create["repo_id"] == "someone/tiny-lora" and create["private"] is True and create["exist_ok"] is True
    assert create["token"] == "hf_x"
    assert "sst2" in upload["commit_message"] and "lora" in upload["commit_message"]
    repo = root / "someone" / "tiny-lora"
    assert sorted(f.name for f in repo.iterdir()) == ["README.md", "delta.json", "delta.safetensors"]
    card = (repo / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: unipeft\n") and "- lora" in card
    assert 'up.load(model, "someone/tiny-lora")' in card and "BertForSequenceClassification" in card
    assert json.loads((repo / "delta.json").read_text())["base"]["fingerprint"] == up.fingerprint(model)
    # what was uploaded is the delta: a fresh base loads it from the folder
    x = tiny.batch("bert")
    torch.testing.assert_close(outputs(up.load(tiny.make("bert"), repo), x), outputs(model, x), rtol=0, atol=1e-6)


def test_load_from_a_hub_repo_id_fetches_only_the_delta_files(fake_hub):
    root, calls = fake_hub
    model = trained_bert()
    up.push(model, "someone/tiny-lora")
    (root / "someone" / "tiny-lora" / "pytorch_model.bin").write_bytes(b"never fetched, never unpickled")
    x = tiny.batch("bert")
    fresh = up.load(tiny.make("bert"), "someone/tiny-lora", revision="v1", token="hf_x")
    torch.testing.assert_close(outputs(fresh, x), outputs(model, x), rtol=0, atol=1e-6)
    (call,) = calls["snapshot_download"]
    assert call["repo_id"] == "someone/tiny-lora" and call["revision"] == "v1" and call["token"] == "hf_x"
    assert sorted(call["allow_patterns"]) == ["delta.json", "delta.safetensors"]
    # a repo without a delta in it
    (root / "someone" / "empty").mkdir(parents=True)
    other = tiny.make("bert")
    with pytest.raises(up.UnipeftError, match=r"'someone/empty' holds no unipeft delta \(delta.json and "):
        up.load(other, "someone/empty")
    assert up.deltas(other) == {}


def test_hub_offline_gives_one_clear_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # nothing cached
    model = trained_bert()
    for call in (lambda: up.push(model, "someone/tiny-lora"), lambda: up.load(tiny.make("bert"), "someone/tiny-lora")):
        with pytest.raises(up.UnipeftError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "'someone/tiny-lora'" in msg, msg
        assert "offline mode is on (HF_HUB_OFFLINE=1)" in msg and "unset HF_HUB_OFFLINE" in msg, msg


def test_hub_unreachable_gives_one_clear_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    with socket.socket() as s:  # a local port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    model = trained_bert()
    for call in (lambda: up.push(model, "someone/tiny-lora"), lambda: up.load(tiny.make("bert"), "someone/tiny-lora")):
        with pytest.raises(up.UnipeftError, match=r"the Hugging Face Hub is unreachable .*check the network"):
            call()


def test_local_paths_and_repo_ids(tmp_path, monkeypatch):
    model = trained_bert()
    # an existing folder named like a repo id stays local (and works offline)
    monkeypatch.chdir(tmp_path)
    up.save(model, "acme/sst2", name="sst2")
    x = tiny.batch("bert")
    torch.testing.assert_close(outputs(up.load(tiny.make("bert"), "acme/sst2"), x), outputs(model, x),
                               rtol=0, atol=1e-6)
    with pytest.raises(up.UnipeftError, match=r"revision= applies to Hugging Face Hub repos"):
        up.load(tiny.make("bert"), "acme/sst2", revision="main")
    # a missing path that is not a repo id, or a Path object, keeps the local error
    for missing in (str(tmp_path / "nothing"), "a/b/c", Path("acme/missing"), "nothing"):
        with pytest.raises(up.UnipeftError, match="no delta directory"):
            up.load(tiny.make("bert"), missing)
    for bad in ("not a repo", "a/b/c", "/abs/path", "user/", "user/repo.git", 42):
        with pytest.raises(up.UnipeftError, match="not a Hugging Face Hub repo id"):
            up.push(model, bad)
    with pytest.raises(up.UnipeftError, match="nothing to push"):  # before any network call
        up.push(tiny.make("bert"), "someone/tiny-lora")


def test_a_resume_without_the_deltas_step_state_warns_and_one_with_it_does_not(tmp_path):
    """DyLoRA's next rank lives outside the parameters and the optimizer: a bare Trainer checkpoint lacks it,
    so the first resumed step trains another rank than the uninterrupted run. That run says so (naming the
    callback that keeps it); a run whose checkpoint came from SaveDeltaCallback says nothing."""
    import warnings

    from transformers import Trainer

    def run(out, callbacks, resume=None):
        torch.manual_seed(0)
        model = up.attach(tiny.make("gpt2"), up.DyLoRA(r=8, seed=0), name="t")
        trainer = Trainer(model=model, args=hf_args(out), train_dataset=lm_rows(), callbacks=callbacks)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train(resume_from_checkpoint=resume)
        return [str(w.message) for w in caught if "optimizer resumes" in str(w.message)]

    assert run(tmp_path / "bare", []) == [] and run(tmp_path / "kept", [SaveDeltaCallback()]) == []
    said = run(tmp_path / "bare", [], resume=str(tmp_path / "bare" / "checkpoint-4"))
    assert len(said) == 1 and "DyLoRA's rank for step 5" in said[0] and "SaveDeltaCallback" in said[0]
    assert run(tmp_path / "kept", [SaveDeltaCallback()], resume=str(tmp_path / "kept" / "checkpoint-4")) == []
