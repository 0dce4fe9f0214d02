"""Tiny random models of every supported family, built from configs (no download).

``make(family, head, seed)`` builds the same weights for the same seed, so a
"fresh base" in a test is ``make(...)`` again. ``batch(family, head)`` gives a
small padded batch that the model accepts.
"""
from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96
FAMILIES = ("gpt2", "llama", "bert", "roberta", "t5", "bart")


def config(family: str):
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)
    if family == "llama":
        return tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              pad_token_id=0)
    if family == "bert":
        return tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=64)
    if family == "roberta":
        return tf.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=70, pad_token_id=1)
    if family == "t5":
        return tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    if family == "bart":
        return tf.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                             decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                             eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    raise KeyError(family)


CLASSES = {
    ("gpt2", "lm"): tf.GPT2LMHeadModel, ("gpt2", "cls"): tf.GPT2ForSequenceClassification,
    ("llama", "lm"): tf.LlamaForCausalLM, ("llama", "cls"): tf.LlamaForSequenceClassification,
    ("bert", "cls"): tf.BertForSequenceClassification, ("bert", "mlm"): tf.BertForMaskedLM,
    ("roberta", "cls"): tf.RobertaForSequenceClassification,
    ("t5", "seq2seq"): tf.T5ForConditionalGeneration,
    ("bart", "seq2seq"): tf.BartForConditionalGeneration, ("bart", "cls"): tf.BartForSequenceClassification,
}

# the head each family is tested with in the grid
DEFAULT_HEAD = {"gpt2": "lm", "llama": "lm", "bert": "cls", "roberta": "cls", "t5": "seq2seq", "bart": "seq2seq"}


def make(family: str, head: str | None = None, seed: int = 0, attn: str | None = None):
    head = head or DEFAULT_HEAD[family]
    cfg = config(family)
    if head == "cls":
        cfg.num_labels = 3
    torch.manual_seed(seed)
    kw = {"attn_implementation": attn} if attn else {}
    model = CLASSES[(family, head)]._from_config(cfg, **kw)
    return model.eval()


def batch(family: str, head: str | None = None, seed: int = 1, length: int = 7):
    head = head or DEFAULT_HEAD[family]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    pad = config(family).pad_token_id or 0
    ids[1, -2:] = pad
    mask[1, -2:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if head == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=g)
    return out


def logits(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out.logits
