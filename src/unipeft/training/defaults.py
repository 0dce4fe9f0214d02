"""Method-aware training defaults: a learning rate and settings per method that work out of the box.

Each entry names the method's config (``config``: options passed to the method's
``MethodConfig``) and its training settings (``train``: fields of ``TrainConfig``),
with the source of the numbers. Every value can be overridden by the user
(``--lr``, ``--method-option lora.r=16``, a YAML file, or keyword arguments).

The short names are what ``unipeft compare --methods`` and ``unipeft train --method`` accept.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import METHODS, MethodConfig
from ..errors import UnipeftError, choices


# model families whose defaults may differ (screen_defaults.py screens each: --model minilm, smollm2)
FAMILIES = ("encoder", "decoder", "encoder-decoder")


@dataclass(frozen=True)
class MethodDefaults:
    kind: str                      # the MethodConfig kind ("lora", "prompt_tuning", ...)
    label: str                     # how reports name it
    config: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    # training settings that differ for one family, on top of ``train`` (with their source)
    family_train: dict[str, dict[str, Any]] = field(default_factory=dict)

    def train_for(self, family: str | None) -> dict[str, Any]:
        """The training settings for a model of ``family`` (None: the shared ones)."""
        return {**self.train, **self.family_train.get(family or "", {})}


def model_family(config) -> str:
    """'encoder-decoder' (T5, BART), 'encoder' (models with a masked-LM head: BERT, RoBERTa, ...)
    or 'decoder' (GPT-2, Llama, ...), from a transformers config."""
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return "encoder" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "decoder"


DEFAULTS: dict[str, MethodDefaults] = {
    "full": MethodDefaults(
        "full", "Full fine-tuning", {}, {"lr": 2e-4, "weight_decay": 0.01},
        "Devlin et al. 2019 (BERT) search {2e-5, 3e-5, 5e-5} over 3 epochs; short budgets (the common case here) "
        "need more: screen_defaults.py (README: 'Defaults chosen on evidence'): mean accuracy over BBC, SST-2 and "
        "tweets at the main job's budget: 2e-4 0.799, 5e-4 0.759, 1e-4 0.770, 5e-5 (the former default) 0.745; "
        "for several epochs on a large model, pass --lr 2e-5..5e-5; decoders (SmolLM2-135M over BBC, SST-2 and E2E "
        "BLEU/100, screen_defaults.py --model smollm2 --only full,freeze): 2e-4 0.801, 5e-5 0.615 (carries over)"),
    "lora": MethodDefaults(
        "lora", "LoRA", {"r": 8, "alpha": 16.0, "targets": "all-linear"}, {"lr": 2e-3},
        "every linear map of the blocks (QLoRA, Dettmers et al. 2023; He et al. 2022) at r=8, lr 2e-3: "
        "screen_defaults.py (README: 'Defaults chosen on evidence'): mean accuracy over BBC, SST-2 and tweets at the main job's budget: 0.782, vs 0.566 for Hu et al.'s r=8 on Wq, Wv at 1e-3 and 0.732 for all-linear at 1e-3"),
    "adapter": MethodDefaults(
        "adapter", "Adapter (Pfeiffer)", {"style": "pfeiffer", "bottleneck": 64}, {"lr": 3e-3, "warmup_ratio": 0.2},
        "Pfeiffer et al. 2021 (AdapterFusion): reduction 16; with the zero-initialised up-projection, "
        "screen_defaults.py (README: 'Defaults chosen on evidence'): mean accuracy over BBC, SST-2 and tweets at the main job's budget: 3e-3 0.760, 1e-3 0.469, 1e-2 0.648; "
        "decoders (SmolLM2-135M, BBC, SST-2, E2E BLEU/100): 3e-3 0.785, 1e-3 0.741 (carries over); warm-up over 20% of the "
        "steps, not 6%: screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): 0.777 vs 0.745 (none 0.752; 5e-3 0.693): early steps at the full rate "
        "knock a zero-initialised adapter's model off the base (tweets collapse to the majority label)"),
    "houlsby": MethodDefaults(
        "adapter", "Adapter (Houlsby)", {"style": "houlsby", "bottleneck": 64}, {"lr": 3e-3, "warmup_ratio": 0.2},
        "Houlsby et al. 2019: bottleneck {8, 64, 256}; 3e-3 as for the Pfeiffer adapter, whose screen showed "
        "zero-initialised sequential adapters need it (screen_defaults.py (README: 'Defaults chosen on evidence'): mean accuracy over BBC, SST-2 and tweets at the main job's budget: Houlsby at 3e-3 0.688); warm-up over 20% "
        "of the steps: screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): 0.764 vs 0.686 with 6%"),
    "parallel": MethodDefaults(
        "adapter", "Parallel adapter", {"style": "scaled_parallel", "bottleneck": 64}, {"lr": 1e-3, "warmup_ratio": 0.2},
        "He et al. 2022 (unified view): scaled parallel adapter at the FFN, s=4, zero-initialised up-projection; "
        "screen_defaults.py (README: 'Defaults chosen on evidence'): mean accuracy over BBC, SST-2 and tweets at the main job's budget: 1e-3 0.750, 3e-3 0.720; warm-up over 20% "
        "of the steps: screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): 0.767 vs 0.755 with 6% (2e-3 0.696)"),
    "compacter": MethodDefaults(
        "compacter", "Compacter", {"n": 4, "bottleneck": 64, "rank": 1}, {"lr": 3e-2},
        "Karimi Mahabadi et al. 2021: n=4, rank-1 B_i; its up-projection is a product of three factors starting "
        "at zero, so it needs ten times an adapter's rate: MiniLM on BBC (600 examples, 38 steps, two seeds): 3e-2 "
        "0.946/0.939, 1e-2 0.919/0.922, 3e-3 0.517; confirmed by screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): 3e-2 0.767, 1e-2 0.694"),
    "compacter_pp": MethodDefaults(
        "compacter", "Compacter++", {"n": 4, "bottleneck": 64, "rank": 1, "plus": True}, {"lr": 3e-2},
        "Karimi Mahabadi et al. 2021: Compacter++ keeps only the adapter after the FFN (as Pfeiffer's); the same "
        "PHM projections as Compacter, so Compacter's rate (MiniLM on BBC: 3e-2 0.946/0.939, 1e-2 0.919/0.922). "
        "screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): 3e-2 0.702, 1e-2 0.674"),
    "adapter_bias": MethodDefaults(
        "adapter_bias", "AdapterBias", {}, {"lr": 1e-2},
        "Fu et al. 2022 (AdapterBias): MiniLM on BBC (600 examples, 38 steps, two seeds): 1e-2 0.933/0.946, "
        "3e-2 0.919/0.930, 3e-3 0.884; confirmed by screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): 1e-2 0.770, 3e-2 0.725, 3e-3 0.675"),
    "adapter_drop": MethodDefaults(
        "adapter", "AdapterDrop (Pfeiffer, lowest 2 layers dropped)",
        {"style": "pfeiffer", "bottleneck": 64, "drop": 2}, {"lr": 3e-3, "warmup_ratio": 0.2},
        "Rücklé et al. 2021 (AdapterDrop) drop the lowest 5 of 12 layers; 2 of MiniLM's 6 is that share. The adapters "
        "above are the Pfeiffer adapter's, unchanged, so its screened rate and warm-up are kept (screen_defaults.py: "
        "3e-3 0.760, 1e-3 0.469, 1e-2 0.648; warm-up 20% 0.777 vs 6% 0.745); not screened separately"),
    "p_tuning": MethodDefaults(
        "p_tuning", "P-tuning (v1, LSTM encoder)", {"version": 1, "length": 20, "encoder": "lstm", "hidden": 128},
        {"lr": 1e-2},
        "Liu et al. 2021 (GPT Understands, Too): bidirectional LSTM + MLP prompt encoder; peft's P-tuning example "
        "(RoBERTa-large, MRPC) trains it at 1e-3 with a 128-wide encoder (the embedding width, 384 on MiniLM, makes a "
        "6.4M-parameter encoder: 28% of the base while training; the saved delta is p x d either way). That rate "
        "does not move the prompts in a short run: screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): 1e-2 0.670, 3e-3 0.620, 1e-3 0.364 "
        "(BBC 0.305: the majority label)"),
    "p_tuning_v2": MethodDefaults(
        "p_tuning", "P-tuning v2", {"version": 2, "length": 20}, {"lr": 1e-2},
        "Liu et al. 2022 (P-Tuning v2) train deep prompts at 5e-3 to 1e-2 in their GLUE/SuperGLUE scripts; "
        "screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): 1e-2 0.684, 5e-3 0.669, 2e-3 0.448 (at least as good on each task at 1e-2)"),
    "pasta": MethodDefaults(
        "pasta", "PASTA (special-token vectors)", {}, {"lr": 3e-2},
        "Yang et al. 2023 (PASTA): one vector per layer and special token, found from the tokenizer; vectors added "
        "to hidden states, like (IA)3's scales (screened at 3e-2 here); screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): 3e-2 0.722, "
        "1e-2 0.707, 1e-1 0.659"),
    "adamix": MethodDefaults(
        "adamix", "AdaMix (4 adapter copies)", {"experts": 4, "bottleneck": 64}, {"lr": 3e-3},
        "Wang et al. 2022 (AdaMix): M=4 copies of each projection, consistency weight 1; Houlsby placement, so the "
        "Houlsby adapter's rate is kept (screen_defaults.py: zero-initialised sequential adapters need 3e-3). Each "
        "step runs the batch twice. screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): 3e-3 0.720, 1e-3 0.418"),
    "adapter_fusion": MethodDefaults(
        "adapter_fusion", "AdapterFusion", {}, {"lr": 1e-3},
        "Pfeiffer et al. 2021 (AdapterFusion) train the fusion at 5e-5 for 10 epochs; short runs need more: 1e-3, "
        "the rate benchmarks/adapters_vs_adapterhub.py trains it at on MiniLM + SST-2 (W_V starts at the identity, "
        "so the fusion starts at the adapters' mean). Not screened. It needs trained adapters (--method-option "
        "adapters=DIR,DIR for unipeft train); unipeft compare fuses the run's own adapter rows (compare_fusion.py)"),
    "compose": MethodDefaults(
        "compose", "Composition",
        {"methods": ({"kind": "prefix_tuning", "options": {"length": 10}},
                     {"kind": "adapter", "options": {"style": "scaled_parallel", "bottleneck": 64}})}, {"lr": 1e-3},
        "a composition is given by its parts (--method-option 'methods=[{\"kind\": ..., \"options\": {...}}]' or a "
        "YAML config's method_option: - methods: [...]); the default parts are He et al.'s MAM pairing at a "
        "smaller size, and its rate the scaled parallel adapter's (screen_defaults.py: 1e-3 0.750). Not screened"),
    "mam": MethodDefaults(
        "mam", "MAM adapter", {"prefix_length": 30, "reparam_hidden": 512, "bottleneck": 512, "scale": 4.0},
        {"lr": 1e-3},
        "He et al. 2022 (unified view): prefix l=30 at the attention, scaled parallel adapter r=512, s=4 at the FFN. "
        "The adapter holds most of the parameters, so the scaled parallel adapter's screened rate is used "
        "(screen_defaults.py: 1e-3 0.750, 3e-3 0.720; prefix tuning alone 5e-3); screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): "
        "1e-3 0.696, 3e-3 0.626"),
    "unipelt": MethodDefaults(
        "unipelt", "UniPELT (adapter + prefix + LoRA, gated)",
        {"bottleneck": 48, "prefix_length": 10, "reparam_hidden": 512, "r": 8, "alpha": 16.0}, {"lr": 5e-3},
        "Mao et al. 2022 (UniPELT): adapter bottleneck 48, prefix length 10, LoRA r=8 on W_q, W_v, each behind a "
        "gate; the highest of the parts' screened rates (prefix tuning's 5e-3) beats the lowest (LoRA's 2e-3): screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): 5e-3 0.774, 2e-3 0.720"),
    "prefix": MethodDefaults(
        "prefix_tuning", "Prefix tuning", {"length": 10, "reparam_hidden": 512}, {"lr": 2e-3, "warmup_ratio": 0.2},
        "Li & Liang 2021: lr 5e-5..8e-5 for GPT-2 over 10 epochs with the MLP reparameterisation; "
        "higher rates are needed for short runs; screen_defaults.py (README: 'Defaults chosen on evidence'): mean "
        "accuracy over BBC, SST-2 and tweets at the main job's budget: 5e-3 0.673, 2e-3 0.668, 1e-2 0.610; "
        "decoders (SmolLM2-135M over BBC, SST-2 and E2E BLEU/100, screen_defaults.py --model smollm2, "
        "2026-12-01): 2e-3 0.711, 5e-3 0.676 (SST-2 0.640 vs 0.525). Length 10 kept: screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): "
        "20 0.717, 10 0.668, 5 0.675, where only the tweets differ (10 and 5 stay at the majority label, 0.429, as "
        "in the first screen); unscreened on decoders, so not changed yet. Warm-up over 20% of the steps: screen_defaults.py round 5 (--only round5 --max-length 64 --seed 0 and --seed 1; mean over BBC, SST-2 and tweets at the main job's budget, seed 0 / seed 1): "
        "20% 0.717 / 0.669, 6% 0.668 / 0.659 (20% keeps the tweets off the majority label, as for adapters); "
        "screened on encoders only (at 5e-3). 2e-3 for both families since 2026-12-02: on a longer encoder job "
        "(SST-2, 5,000 sentences, one epoch of 313 steps, MiniLM, `unipeft compare --task sst2 --train-size 5000 "
        "--dev-size 500 --methods prefix --lr L --seed S --batch-size 16 --max-length 64`) 5e-3 collapsed to the "
        "majority label on seed 0 (0.500; the loss 0.47 at step 150, back at 0.69 by step 200) and gave 0.768 on "
        "seed 1, 2e-3 gave 0.790 and 0.778; the 40-step screen above could not tell the two apart"),
    "prompt": MethodDefaults(
        "prompt_tuning", "Prompt tuning", {"length": 20, "init": "vocab"}, {"lr": 3e-2},
        "Lester et al. 2021: lr 0.3 with Adafactor on T5; AdamW needs about 1e-2 to 3e-2; screen_defaults.py "
        "(README: 'Defaults chosen on evidence'): mean accuracy over BBC, SST-2 and tweets at the main job's budget: "
        "3e-2 0.682, 1e-1 0.670, 1e-2 0.659; decoders (SmolLM2-135M over BBC, SST-2 and E2E BLEU/100, "
        "screen_defaults.py --model smollm2): 1e-2 0.638, 3e-2 0.551. Length 20 kept: screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): "
        "20 0.677, 50 0.675, 10 0.665",
        family_train={"decoder": {"lr": 1e-2}}),
    "bitfit": MethodDefaults(
        "bitfit", "BitFit", {}, {"lr": 2e-3},
        "Ben Zaken et al. 2022: lr {1e-4, 4e-4, 7e-4, 1e-3}; biases move slowly, so short runs go above; "
        "screen_defaults.py (README: 'Defaults chosen on evidence'): mean accuracy over BBC, SST-2 and tweets at the main job's budget: 2e-3 0.695, 5e-3 0.667; "
        "decoders (SmolLM2-135M, BBC, SST-2, E2E BLEU/100): 2e-3 0.747, 5e-3 0.756 (one seed: within noise, kept "
        "then); the instruction task (screen_defaults.py --model smollm2 --tasks instruct, ROUGE-L of 48 held-out "
        "replies, 2026-12-02): 5e-3 69.7, 2e-3 63.8. Both decoder screens prefer 5e-3 (four-task mean 0.741 vs "
        "0.720), so decoders train at 5e-3: SmolLM2's biases are BitFit's added zero vectors (Llama has none), "
        "which start further from useful than a pretrained bias",
        family_train={"decoder": {"lr": 5e-3}}),
    "ia3": MethodDefaults(
        "ia3", "(IA)3", {}, {"lr": 3e-2, "warmup_ratio": 0.2},
        "Liu et al. 2022 (T-Few) use 3e-3 with Adafactor over 1,000 steps; for AdamW and short runs, "
        "screen_defaults.py (README: 'Defaults chosen on evidence'): mean accuracy over BBC, SST-2 and tweets at the main job's budget: 3e-2 0.775, 1e-2 0.715, 3e-3 0.625. "
        "Warm-up over 20% of the steps: screen_defaults.py round 5 (--only round5 --max-length 64 --seed 0 and --seed 1; mean over BBC, SST-2 and tweets at the main job's budget, seed 0 / seed 1): 20% 0.767 / 0.734, 6% 0.765 / 0.714 (both seeds; screened on encoders only)"),
    "sparse_ft": MethodDefaults(
        "sparse_ft", "Sparse FT (FISH mask)", {"select": "fish", "density": 0.01, "select_after": 0.05,
                                               "targets": "all-linear"}, {"lr": 1e-3},
        "Sung et al. 2021 (FISH mask): the 1% of entries with the largest empirical Fisher information, "
        "estimated on the first 5% of the batches (about Sung et al.'s 1,024 examples in a 20,000-sentence job), "
        "then trained; chosen over LT-SFT (the notes' first) on evidence: benchmarks/sparse_sst2.py (SST-2, "
        "MiniLM, one seed, 2026-12-01), 20,000 sentences at 2e-4: FISH 0.811, LT-SFT 0.681, movement 0.513, "
        "magnitude 0.512 (selection after a dense phase leaves the mask half a decaying schedule); 4,000 "
        "sentences: FISH 1e-3 0.791 vs 2e-4 0.724, magnitude 2e-3 0.731 vs 2e-4 0.509, LT-SFT 2e-4 0.572 vs "
        "1e-3 0.509, movement 2e-4 0.579 vs 1e-3 0.517. One task only: not the three-task screen"),
    "lt_sft": MethodDefaults(
        "sparse_ft", "Sparse FT (LT-SFT)", {"select": "lt-sft", "density": 0.01, "select_after": 0.5,
                                            "targets": "all-linear"}, {"lr": 2e-4},
        "Ansell et al. 2022 (LT-SFT): a full fine-tuning phase, then as long again on the entries that moved most "
        "(select_after 0.5 of the run), one optimizer and one schedule for both; density 1%. The rate is full "
        "fine-tuning's (its dense phase is full fine-tuning): benchmarks/sparse_sst2.py (SST-2, 4,000 sentences) "
        "2e-4 0.572 vs 1e-3 0.509; 20,000 sentences 0.681. The same rate suits select='movement' (0.579 vs 0.517)"),
    "diff_pruning": MethodDefaults(
        "diff_pruning", "Diff pruning", {"sparsity": 0.995, "l0_weight": 1.25e-7, "targets": "all-linear"},
        {"lr": 1e-3},
        "Guo et al. 2021 (diff pruning): 0.5% of the entries change (sparsity 0.995), L0 weight lambda 1.25e-7, "
        "magnitude projection at the end (up.finalize). The rate 1e-3 is a choice, not the paper's (w starts at zero "
        "like LoRA's B, so it sits between LoRA's 2e-3 and full fine-tuning's 2e-4), kept by a one-task check: "
        "benchmarks/sparse_sst2.py (SST-2, MiniLM, 4,000 sentences) 1e-3 0.564 vs 5e-3 0.491; 20,000 sentences 0.584: "
        "far from converged at one epoch; screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): 1e-3 0.431, 3e-3 0.373 (both need "
        "more than 40 steps)"),
    "dylora": MethodDefaults(
        "dylora", "DyLoRA", {"r": 8, "alpha": 16.0, "targets": "all-linear"}, {"lr": 2e-3, "warmup_ratio": 0.2},
        "Valipour et al. 2023 (DyLoRA); LoRA's default placement and scale at r=8; benchmarks/lora_family_sst2.py "
        "(SST-2, 2,000 sentences, one seed): 2e-3 0.744 at rank 8, 5e-3 diverged to chance (alpha/b is 16 at b=1). "
        "Each row gets about 1/r of the updates: give it more steps rather than a higher rate; screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): "
        "2e-3 0.734, 5e-3 0.705. Warm-up over 20% of the steps since 2026-12-01: at 6% SST-2's 20,000-sentence job "
        "(unipeft compare, 625 steps) stayed at chance (0.557); 20% 0.768 there; 1e-3 0.829 there but at chance on the "
        "main job's budget (round 5: 0.500 / 0.613 vs 2e-3 0.734 / 0.666); screen_defaults.py round 5 (--only round5 --max-length 64 --seed 0 and --seed 1; mean over BBC, SST-2 and tweets at the main job's budget, seed 0 / seed 1): 2e-3 with 20% 0.734 / 0.678"),
    "qlora": MethodDefaults(
        "qlora", "QLoRA", {"bits": 4, "r": 8, "alpha": 16.0, "targets": "all-linear"}, {"lr": 2e-3},
        "Dettmers et al. 2023 (QLoRA): NF4 + double quantisation, LoRA on every linear map of the blocks; the "
        "paper's 2e-4 is for r=64 on 7B-13B models; here LoRA's screened r=8 rate (the base's rounding does "
        "not change the LoRA update's scale); not screened on a quantized base yet (benchmarks/qlora.py)"),
    "adalora": MethodDefaults(
        "adalora", "AdaLoRA", {"init_r": 12, "target_r": 8, "tinit": 0.1, "tfinal": 0.2, "deltaT": 5,
                               "targets": "all-linear"}, {"lr": 2e-2},
        "Zhang et al. 2023 (AdaLoRA): init_r 12 -> target_r 8, as peft's example; budget schedule as fractions of "
        "the run; benchmarks/lora_family_sst2.py (SST-2, 2,000 sentences, one seed): 2e-2 0.762 (peft's AdaLoRA "
        "0.794), 2e-3 stays at chance for both (lambda starts at zero); screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): 2e-2 0.715, "
        "5e-3 0.667"),
    "intrinsic": MethodDefaults(
        "intrinsic", "Intrinsic dimension (FastFood, d=1000)", {"d": 1000, "projection": "fastfood"}, {"lr": 1e-2},
        "Li et al. 2018, Aghajanyan et al. 2021: theta = theta_0 + P(theta_d), d swept over 10..10^5 (about 200 "
        "parameters reach 90% of full fine-tuning for RoBERTa on MRPC); screen_defaults.py round 4 (--only round4 --max-length 64; mean accuracy over BBC, SST-2 and tweets at the main job's budget): 1e-2 0.694, "
        "2e-3 0.475 (the rate until 2026-12-01, under which the d90 sweep in docs/methods/intrinsic.md ran)"),
    "said": MethodDefaults(
        "intrinsic", "Intrinsic dimension, SAID (d=1000)", {"d": 1000, "projection": "fastfood", "said": True},
        {"lr": 1e-2},
        "Aghajanyan et al. 2021 (structure-aware: one lambda per weight matrix within d); the rate of 'intrinsic' "
        "(screened as intrinsic, not as SAID)"),
    "new_tokens": MethodDefaults(
        "new_tokens", "New tokens (BPE, 1000) + head", {"count": 1000, "train_head": True}, {"lr": 5e-3},
        "seed 003 (BPE); needs --method-option new_tokens.corpus=FILE; not screened yet: the new rows are input "
        "embeddings like a soft prompt's (3e-2 screened for prompt tuning) but start at a trained point, the mean "
        "of their pieces, and the head trains with them (adapters: 3e-3); 5e-3 between the two"),
    "freeze": MethodDefaults(
        "freeze", "Freeze (train the last third of the layers)", {"train_share": 1 / 3},
        {"lr": 3e-4, "weight_decay": 0.01},
        "Lee et al. 2019 (what would Elsa do): tuning only the top layers; screen_defaults.py (README: 'Defaults "
        "chosen on evidence'): mean accuracy over BBC, SST-2 and tweets at the main job's budget: 3e-4 0.797, "
        "1e-3 0.791, 1e-4 (the former default) 0.660; decoders (SmolLM2-135M over BBC, SST-2 and E2E BLEU/100, "
        "screen_defaults.py --model smollm2 --only full,freeze): 3e-4 0.612, 1e-4 0.414. Depth: the last third "
        "of each stack since 2026-12-02 (the last 2 until then): the same 2 of MiniLM's 6 blocks, and on "
        "SmolLM2 10 of 30 against 2 (screen_defaults.py --model smollm2 --tasks bbc,sst2,e2e,instruct --only "
        "freeze:share-third): BBC 0.955 vs 0.740, SST-2 0.755 vs 0.650, E2E BLEU 56.2 vs 44.6, instruction ROUGE-L 73.8 vs 40.2"),
}

# the methods `unipeft compare` runs when none are named (the main job): every entry above that applies to an
# encoder classifier such as MiniLM, the first eight (the main job's list until 2026-12) first. Left out:
#   new_tokens -- extends the vocabulary from a corpus of the domain (--method-option new_tokens.corpus=FILE),
#                 a change of tokenizer rather than a way to learn a task;
#   qlora      -- its default 4 bits need bitsandbytes, an optional extra (pip install unipeft[quantize]),
#                 not a dependency of unipeft;
#   said       -- intrinsic dimension's structure-aware variant: the intrinsic row's method with said=True;
#   lt_sft     -- sparse fine-tuning with the LT-SFT mask: the sparse_ft row's method with select=lt-sft (its
#                 dense phase takes half of a budget this short and leaves it near chance).
# Random-rank LoRA (up.LoRA(r=(1, 16))) and the unscaled parallel adapter (parallel.style=parallel) are
# options of lora and parallel, not entries of their own. The budget per method: comparison.MAIN_JOB_BUDGET.
COMPARE_DEFAULT = ("full", "lora", "adapter", "prefix", "prompt", "bitfit", "ia3", "freeze",
                   "houlsby", "parallel", "compacter", "compacter_pp", "adapter_drop", "adapter_bias", "adamix",
                   "adapter_fusion", "p_tuning", "p_tuning_v2", "pasta", "compose", "mam", "unipelt",
                   "dylora", "adalora", "sparse_ft", "diff_pruning", "intrinsic")


def resolve(name: str, options: dict[str, Any] | None = None) -> tuple[MethodConfig, MethodDefaults]:
    """The method config for a short name (or a MethodConfig kind), with user options applied."""
    if name in DEFAULTS:
        d = DEFAULTS[name]
    elif name in METHODS:
        d = next((v for v in DEFAULTS.values() if v.kind == name), MethodDefaults(name, name))
    else:
        raise UnipeftError(f"unknown method {name!r}; valid methods: {choices(sorted(DEFAULTS))}")
    cfg = {**d.config, **(options or {})}
    return METHODS[d.kind](**cfg), d


def parse_value(text: str) -> Any:
    """'16' -> 16, '0.1' -> 0.1, 'true' -> True, 'q,v' -> ('q', 'v'), JSON lists and objects
    ('[{"kind": "lora"}]': a composition's parts) as JSON, anything else stays a string."""
    low = text.strip().lower()
    if low[:1] in ("[", "{"):
        import json

        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if "," in text:
        return tuple(parse_value(t) for t in text.split(",") if t.strip())
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text.strip()


def parse_method_options(items: list[str] | None, methods: list[str],
                         what: str = "method option") -> dict[str, dict[str, Any]]:
    """``["lora.r=16", "r=4"]`` -> {"lora": {"r": 16}, <every method>: {"r": 4}}; errors name the bad item.

    Also parses per-method training settings (``what="method setting"``: ``["lora.lr=5e-4"]``).
    """
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UnipeftError(f"{what} {item!r} must look like 'method.option=value' or 'option=value'")
        method, dot, opt = key.strip().rpartition(".")
        targets = [method] if dot else list(methods)
        for m in targets:
            if m not in out:
                raise UnipeftError(f"{what} {item!r} names method {m!r}, which is not run; "
                                   f"methods run: {choices(methods)}")
            out[m][opt] = parse_value(value)
    return out
