"""CPU (fp32) training-memory estimate, calibrated against measured peak RSS.

``unipeft.analysis.memory.estimate`` reproduces the lecture notes (GPU, 16-bit, CUDA context
1 GB).  ``benchmarks/memory_validation.py`` measured real fp32 training runs on CPU (MiniLM-L6
and SmolLM2-135M; full fine-tuning, LoRA, prompt tuning; peak RSS of 3 AdamW steps minus the
RSS of python + torch) and found the notes' formula 2-11x too low and the detailed per-tensor
formula off by -35% .. +7% (see the benchmark's table).  ``estimate_cpu`` keeps the notes'
static terms and corrects the rest.  Each correction, and why it is needed:

1. **Exact parameter count.**  The base estimator derives N from the config shape and ignores
   biases, norms, position/token-type embeddings and the classification head; for MiniLM this
   is 0.3% low.  Pass ``n_params`` (``up.trainable_parameters(model)[1]``) to use the real count.
   (For prompt tuning / LoRA the adapter parameters are in N as well.)

2. **FullFineTune keeps a second copy of the weights.**  ``up.FullFineTune`` stores the
   pretrained weights so ``up.detach`` can restore the base: +size(float) * N.  The notes
   have no such term (it is a unipeft choice, not a property of full fine-tuning).

3. **Transient of the optimizer step / weight gradients (full fine-tuning only).**  On CPU
   ``torch.optim.AdamW`` runs the single-tensor (for-loop) implementation; every step makes
   temporaries the size of a parameter (``exp_avg_sq.sqrt()``, the update), and during backward
   the weight gradient of a matrix is computed into a fresh buffer before it becomes ``.grad``;
   the dense gradient of the embedding (vocab x h) is built in a fresh buffer.  The largest
   such temporaries are the size of the largest parameter, the embedding matrix; measured:
   ~``FULL_TRANSIENT`` = 2 x size(float) x vocab x h (MiniLM 94 MB, SmolLM2 216 MB).  With few trainable parameters (LoRA, prompt) this is negligible.

4. **Runtime overhead instead of the CUDA context.**  There is no 1 GB CUDA context on CPU, but
   the first training step costs ``RUNTIME_MB`` (~0.1 GB): modelling code + tokenizer loaded
   with the model, autograd engine and OpenMP/oneDNN worker buffers, glibc arenas.

5. **Activations (hidden states), per architecture family.**  The notes' ``L(20 H seq +
   3 seq^2)`` uses H = number of heads where the tensors are h (hidden size) wide, so it is
   ~h/H = 32-64x too small for the per-token part; it is not a usable activation formula.  The
   detailed slide (``3hs + 18Lhs + 3LHs^2 + Vs``) has the right shape; on CPU/fp32 the
   coefficients differ:

   * per token and layer: ``k_tok * h`` values saved for backward plus the activation
     gradients alive at the backward peak.  BERT (post-LN, GELU, dropout masks, q/k/v kept by
     the math attention): k_tok ~ 25 (notes: 18).  Llama (RMSNorm, gated SiLU MLP of width
     ``intermediate``, RoPE'd q/k): the MLP term scales with ``intermediate`` so it is written
     ``k_tok_h * h + k_tok_i * intermediate``.
   * attention scores: BERT trains with attention dropout 0.1 and an attention mask, so
     torch's CPU SDPA falls back to the math kernel, which materialises scores, softmax,
     the dropout mask and the dropped probabilities: k_att ~ 3.5 values per head per seq^2
     (notes: 3).  Llama (no dropout, causal) runs the CPU flash kernel, which keeps only the
     output and the log-sum-exp: k_att = 0.
   * logits: the notes' ``V s`` term exists only for a language-model head; a sequence
     classifier has none (``task="seq-cls"``).  For a causal LM in fp32 the logits, their
     log-softmax (cross-entropy) and the logits' gradient coexist: ``k_logits ~ 3`` x b s V.
   * prompt tuning lengthens every sequence by the ``prompt_length`` virtual tokens
     (``seq_len + prompt_length`` in every activation term; not in the logits, because
     unipeft drops the prompt positions before the LM head).
   * Llama's coefficients come from two measurements, not from the full fine-tuning runs alone:
     the tensors autograd saves in SmolLM2-135M (``saved_tensors_hooks``: 344 MB for LoRA r=16
     all-linear and 376 MB for full fine-tuning at batch 4 x 64, i.e. ~8 h + 4.6 i values per
     token and layer), and the LoRA run's peak, which puts ~7 x b s V values in the loss and
     its backward (logits, log-softmax, their gradients). Of the 8 h + 4.6 i, the inputs of the
     linear layers (3 h + 1 i) are saved only when those layers have trainable weights (full
     fine-tuning, LoRA): a frozen linear layer needs only its weight to pass the gradient back,
     so prompt tuning saves 5 h + 3.6 i. A first fit on full fine-tuning alone
     (6 h + 3 i, 3 x logits) missed LoRA by -25%: there the optimizer states and gradients
     dwarf the activations, so they hid a too-small activation term.

   The same activation formula holds for full, LoRA and prompt tuning: backward through a
   frozen base still needs the saved inputs of every matrix that an activation gradient
   flows through (only a frozen *prefix* of the network, before the first trainable
   parameter, is free - not the case for any method here).

Returns a dict with ``total_mb`` (MB = 2^20 bytes), ``parts_mb`` and the formulas used.
"""
from __future__ import annotations

from .memory import DTYPE_BYTES, OPTIMIZER_STATES, check_bits, resolve_model, weight_bytes

MB = 2**20
RUNTIME_MB = 100.0
FULL_TRANSIENT = 2.0  # x the largest parameter (the vocab x h embedding)

# activation values per (layer, token) = k_tok_h*h + k_tok_i*i, plus k_lin_h*h + k_lin_i*i when the
# block's linear layers have trainable weights (full fine-tuning, LoRA on all of them): their inputs
# are saved for the weight gradients; attention values per (layer, head, seq^2) = k_att; logits
# values per (token, vocab) = k_logits.
FAMILIES = {
    # BERT's coefficients were fitted over full, LoRA (q, v) and prompt runs together; its saved
    # linear inputs are a small share next to the math attention's seq^2 tensors, so no split
    "bert": dict(k_tok_h=25.0, k_tok_i=0.0, k_lin_h=0.0, k_lin_i=0.0, k_att=3.5, k_logits=3.0),
    # Llama: inputs of q/k/v (one shared tensor), o, gate/up (shared): 3 h; of down: 1 i
    "llama": dict(k_tok_h=5.0, k_tok_i=3.6, k_lin_h=3.0, k_lin_i=1.0, k_att=0.0, k_logits=7.0),
}
TRAINS_LINEARS = ("full", "lora", "peft")
FAMILY_OF = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert",
             "llama": "llama", "mistral": "llama", "qwen2": "llama", "smollm3": "llama", "gemma": "llama"}


def family(config) -> str:
    mt = getattr(config, "model_type", None) or ""
    return FAMILY_OF.get(mt, "llama" if str(getattr(config, "hidden_act", "")) in ("silu", "swish") else "bert")


def estimate_cpu(config, method: str = "full", trainable_params: int | None = None, n_params: int | None = None,
                 batch_size: int = 1, seq_len: int = 128, task: str = "causal-lm", prompt_length: int = 0,
                 dtype: str = "fp32", optimizer: str = "adamw", coefficients: dict | None = None,
                 bits: int | None = None) -> dict:
    """CPU training-memory estimate (MB = 2^20 bytes); see the module docstring for each term.

    ``config``: a transformers config (or anything ``memory.resolve_model`` accepts);
    ``trainable_params`` / ``n_params``: the real counts (``up.trainable_parameters(model)``);
    ``task``: "causal-lm" (logits over the vocabulary) or "seq-cls" (no logits term);
    ``prompt_length``: virtual tokens of prompt tuning (added to seq_len); ``bits``: QLoRA, the blocks'
    linear maps stored in 8, 4 or 2 bits (``memory.QUANT_BYTES``; the other parameters at ``dtype``)."""
    check_bits(method, bits)
    name, sh = resolve_model(config)
    L, h, H, V, i = sh["layers"], sh["hidden"], sh["heads"], sh["vocab"], sh["intermediate"]
    n = int(n_params) if n_params else sh["n_params"]
    t = n if trainable_params is None else int(trainable_params)
    b, k = DTYPE_BYTES[dtype], OPTIMIZER_STATES[optimizer]
    fam = family(config) if not isinstance(config, str) else ("llama" if "llama" in name or "smollm" in name else "bert")
    c = dict(FAMILIES[fam], **(coefficients or {}))
    s, bs = seq_len + prompt_length, batch_size
    parts = {
        "weights": weight_bytes(dict(sh, n_params=n), b, bits),
        "weights_copy": b * n if method == "full" else 0,
        "gradients": b * t,
        "optimizer": k * b * t,
        "full_transient": FULL_TRANSIENT * b * V * h if method == "full" else 0,
        "runtime": RUNTIME_MB * MB,
        "activations": b * bs * (L * s * (c["k_tok_h"] * h + c["k_tok_i"] * i) + c["k_att"] * L * H * s * s),
        "linear_inputs": b * bs * L * s * (c["k_lin_h"] * h + c["k_lin_i"] * i) if method in TRAINS_LINEARS else 0,
        # unipeft drops the prompt positions before the LM head, so the logits cover seq_len only
        "logits": b * bs * seq_len * V * c["k_logits"] if task == "causal-lm" else 0,
    }
    parts_mb = {key: v / MB for key, v in parts.items()}
    return dict(model=name, family=fam, method=method, bits=bits, batch_size=bs, seq_len=seq_len, effective_seq=s,
                n_params=n, trainable_params=t, coefficients=c, parts_mb=parts_mb,
                total_mb=sum(parts_mb.values()))
