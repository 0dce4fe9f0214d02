"""The notes' training-memory estimate from Python (no model is loaded: a preset's shapes).

Run: python docs/examples/memory_estimate.py
"""
# --8<-- [start:estimate]
from unipeft.analysis.memory import estimate

full = estimate("llama-2-7b", method="full", seq_len=4096, batch_size=1)
lora = estimate("llama-2-7b", method="lora", trainable_params=200_000, seq_len=4096, batch_size=1)
print(f"full {full.total_gb:.2f} GB, LoRA {lora.total_gb:.2f} GB")     # full 56.28 GB, LoRA 17.19 GB
print(lora.weights_gb, lora.gradients_gb, lora.optimizer_gb, lora.hidden_gb, lora.overhead_gb)
# --8<-- [end:estimate]
assert round(full.total_gb, 2) == 56.28 and round(lora.total_gb, 2) == 17.19
print("ok")
